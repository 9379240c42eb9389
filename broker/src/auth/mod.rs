//! Who may connect, and as whom: the credentials of a CONNECT checked against what `auth`
//! configures. [`password_file`]: Mosquitto's password files (and argon2id lines).
//!
//! A password hash costs milliseconds of CPU by design, so it is verified off the async
//! runtime, at most `auth.max_concurrent_verifications` at a time: a flood of bad CONNECTs
//! waits its turn and never delays keep-alive or other clients. A verified user and password
//! are remembered (as a keyed SHA-256, never the password) so that a reconnect storm of known
//! devices is cheap; the memory is cleared when the password file is reloaded.

pub mod acl;
pub mod password_file;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ring::digest;
use tokio::sync::Semaphore;

use crate::config::{AuthConfig, ClientIdBinding};
use crate::labels::{AuthMethod, VerifyOutcome};
use crate::metrics::metrics;
use password_file::{PasswordFile, PasswordFileError};

/// Why the authentication configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password file could not be read or has a malformed line.
    #[error("auth.password_file: {0}")]
    PasswordFile(#[from] PasswordFileError),
    /// No secure random source for the credential cache's key.
    #[error("no random source for the credential cache")]
    Random,
}

/// First delay of a refusal that follows another; doubles with each further one.
const FAILURE_DELAY_MIN: Duration = Duration::from_millis(200);
/// Failures older than this are forgotten.
const FAILURE_MEMORY: Duration = Duration::from_secs(60);
/// Addresses and client ids whose failures are remembered at most.
const FAILURE_KEYS_MAX: usize = 100_000;

/// What a CONNECT presents.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Where it comes from.
    pub peer: IpAddr,
    /// The client id it asks for (after validation).
    pub client_id: &'a str,
    /// The CONNECT's user name, if any.
    pub username: Option<&'a str>,
    /// The CONNECT's password, if any.
    pub password: Option<&'a [u8]>,
    /// The identity of its verified TLS client certificate, if any.
    pub identity: Option<&'a str>,
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Unknown user or wrong password: CONNACK 0x04.
    BadCredentials,
    /// No credentials where they are required, or a client id the credentials do not allow:
    /// CONNACK 0x05.
    NotAuthorized,
}

/// The configured authentication, shared by every connection.
pub struct Auth {
    allow_anonymous: bool,
    bind_client_id: ClientIdBinding,
    password_file: Option<(PathBuf, RwLock<Arc<PasswordFile>>)>,
    verifications: Semaphore,
    cache: Mutex<HashMap<String, digest::Digest>>,
    cache_size: usize,
    cache_key: [u8; 32],
    failure_delay_max: Duration,
    /// Refusals in a row by source address and by client id, and when the last was.
    failures: Mutex<HashMap<FailureKey, (u32, Instant)>>,
}

/// What repeated refusals are remembered by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FailureKey {
    Peer(IpAddr),
    ClientId(Box<str>),
}

impl Auth {
    /// The authentication `config` describes; reads the password file (blocking: at start).
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let password_file = match &config.password_file {
            Some(path) => Some((
                path.clone(),
                RwLock::new(Arc::new(PasswordFile::load(path)?)),
            )),
            None => None,
        };
        let mut cache_key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut cache_key)
            .map_err(|_| AuthError::Random)?;
        Ok(Self {
            allow_anonymous: config.allow_anonymous || !config.has_provider(),
            bind_client_id: config.bind_client_id,
            password_file,
            verifications: Semaphore::new(config.max_concurrent_verifications.max(1)),
            cache: Mutex::new(HashMap::new()),
            cache_size: config.credential_cache_size,
            cache_key,
            failure_delay_max: config.failure_delay_max,
            failures: Mutex::new(HashMap::new()),
        })
    }

    /// No authentication: every client is accepted (what a broker on loopback only, or with
    /// `auth.allow_anonymous`, does).
    pub fn open() -> Self {
        Self {
            allow_anonymous: true,
            bind_client_id: ClientIdBinding::None,
            password_file: None,
            verifications: Semaphore::new(1),
            cache: Mutex::new(HashMap::new()),
            cache_size: 0,
            cache_key: [0; 32],
            failure_delay_max: Duration::ZERO,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the password file again; on failure the one in force stays. Blocking: call it
    /// off the async runtime. `Ok(false)` when there is no password file.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let Some((path, current)) = &self.password_file else {
            return Ok(false);
        };
        let file = PasswordFile::load(path)?;
        *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(file);
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(true)
    }

    /// Checks `request`; how it was authenticated, or why it is refused.
    pub async fn authenticate(&self, request: Request<'_>) -> Result<AuthMethod, Refusal> {
        let method = match (&self.password_file, request.username) {
            (Some((_, file)), Some(user)) => {
                let password = request.password.unwrap_or_default();
                self.verify(file, user, password).await?;
                AuthMethod::Password
            }
            _ if request.identity.is_some() => AuthMethod::Certificate,
            _ if self.allow_anonymous => AuthMethod::Anonymous,
            _ => return Err(Refusal::NotAuthorized),
        };
        let bound = match self.bind_client_id {
            ClientIdBinding::None => true,
            ClientIdBinding::Username => {
                method == AuthMethod::Password && request.username == Some(request.client_id)
            }
            ClientIdBinding::Identity => request.identity == Some(request.client_id),
        };
        if !bound {
            return Err(Refusal::NotAuthorized);
        }
        Ok(method)
    }

    /// Records a refusal of `request`; how long to wait before answering it: nothing the first
    /// time, then 200 ms doubling per refusal in a row from its address or for its client id,
    /// up to `auth.failure_delay_max`.
    pub fn refused(&self, request: &Request<'_>) -> Duration {
        if self.failure_delay_max.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= FAILURE_KEYS_MAX {
            failures.retain(|_, (_, last)| now.duration_since(*last) < FAILURE_MEMORY);
            if failures.len() >= FAILURE_KEYS_MAX {
                failures.clear();
            }
        }
        let mut count = 0;
        for key in [
            FailureKey::Peer(request.peer),
            FailureKey::ClientId(request.client_id.into()),
        ] {
            let entry = failures.entry(key).or_insert((0, now));
            if now.duration_since(entry.1) >= FAILURE_MEMORY {
                entry.0 = 0;
            }
            entry.0 = entry.0.saturating_add(1);
            entry.1 = now;
            count = count.max(entry.0);
        }
        if count <= 1 {
            return Duration::ZERO;
        }
        let doublings = (count - 2).min(16);
        (FAILURE_DELAY_MIN * 2u32.pow(doublings)).min(self.failure_delay_max)
    }

    /// Forgets the refusals of `request`'s client id and address after it was accepted.
    pub fn accepted(&self, request: &Request<'_>) {
        if self.failure_delay_max.is_zero() {
            return;
        }
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.is_empty() {
            return;
        }
        failures.remove(&FailureKey::Peer(request.peer));
        failures.remove(&FailureKey::ClientId(request.client_id.into()));
    }

    /// Verifies `user`'s `password` against the password file: from the cache, or hashed on
    /// the blocking pool within the verification limit.
    async fn verify(
        &self,
        file: &RwLock<Arc<PasswordFile>>,
        user: &str,
        password: &[u8],
    ) -> Result<(), Refusal> {
        let remembered = self.remembered(user, password);
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache
                .get(user)
                .is_some_and(|d| d.as_ref() == remembered.as_ref())
            {
                metrics().auth_verifications.inc(VerifyOutcome::CacheHit);
                return Ok(());
            }
        }
        let file = Arc::clone(&file.read().unwrap_or_else(|e| e.into_inner()));
        let Some(hash) = file.lookup(user).cloned() else {
            metrics().auth_verifications.inc(VerifyOutcome::Rejected);
            return Err(Refusal::BadCredentials);
        };
        let _permit = self
            .verifications
            .acquire()
            .await
            .map_err(|_| Refusal::NotAuthorized)?;
        let password = password.to_vec();
        let right = tokio::task::spawn_blocking(move || hash.verify(&password))
            .await
            .unwrap_or(false);
        if !right {
            metrics().auth_verifications.inc(VerifyOutcome::Rejected);
            return Err(Refusal::BadCredentials);
        }
        metrics().auth_verifications.inc(VerifyOutcome::Verified);
        if self.cache_size > 0 {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= self.cache_size {
                cache.clear();
            }
            cache.insert(user.to_owned(), remembered);
        }
        Ok(())
    }

    /// The keyed digest a verified (user, password) is remembered by.
    fn remembered(&self, user: &str, password: &[u8]) -> digest::Digest {
        let mut context = digest::Context::new(&digest::SHA256);
        context.update(&self.cache_key);
        context.update(&(user.len() as u64).to_be_bytes());
        context.update(user.as_bytes());
        context.update(password);
        context.finish()
    }
}
