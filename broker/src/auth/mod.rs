//! Who may connect, and as whom: the credentials of a CONNECT checked against what `auth`
//! configures, by a chain of providers tried in the order of `auth.providers`:
//! [`password_file`] (Mosquitto's password files, and argon2id lines), [`jwt`] (a token in the
//! password field) and [`database`] (credentials in the presence store). Each answers allow,
//! deny, or not mine (the next one is asked); when none claims a user name and password, they
//! are bad credentials. Without a user name, the TLS client certificate's identity, then
//! anonymous access, decide as before.
//!
//! A password hash costs milliseconds of CPU by design, so it is verified off the async
//! runtime, at most `auth.max_concurrent_verifications` at a time (JWT signatures too): a
//! flood of bad CONNECTs waits its turn and never delays keep-alive or other clients. A
//! verified user and password are remembered (as a keyed SHA-256, never the password) so that a
//! reconnect storm of known devices is cheap; the memory is cleared when the password file is
//! reloaded, and a database credential's goes with its row.

pub mod acl;
pub mod database;
pub mod jwt;
pub mod password_file;
pub mod scram;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ring::digest;
use tokio::sync::Semaphore;

use crate::config::{AuthConfig, AuthProvider, ClientIdBinding};
use crate::labels::{AuthMethod, VerifyOutcome};
use crate::metrics::metrics;
use database::{CredentialSource, Database};
use jwt::{Jwt, JwtError};
use password_file::{PasswordFile, PasswordFileError};

/// Why the authentication configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The password file could not be read or has a malformed line.
    #[error("auth.password_file: {0}")]
    PasswordFile(#[from] PasswordFileError),
    /// The JWT key file could not be read or holds no usable key (the message names its key).
    #[error("{0}")]
    Jwt(#[from] JwtError),
    /// No secure random source for the credential cache's key.
    #[error("no random source for the credential cache")]
    Random,
}

/// Topic filters a client's credentials grant (JWT claims, its database row).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Filters of the topics it may publish to.
    pub publish: Vec<Box<str>>,
    /// Filters it may subscribe to (and read retained messages of).
    pub subscribe: Vec<Box<str>>,
}

impl Grants {
    /// Grants of these filters, each checked to be a valid MQTT topic filter; `Err` names the
    /// first that is not.
    pub fn new(publish: Vec<Box<str>>, subscribe: Vec<Box<str>>) -> Result<Self, String> {
        if let Some(bad) = publish.iter().chain(&subscribe).find(|f| !valid_filter(f)) {
            return Err(format!("{bad:?} is not a valid topic filter"));
        }
        Ok(Self { publish, subscribe })
    }
}

/// Whether `filter` is a valid MQTT 3.1.1 topic filter: not empty, at most 65535 bytes, no
/// NUL, `+` alone in its level, `#` alone in the last level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.len() > 65_535 || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| {
        (!level.contains('+') || *level == "+")
            && (!level.contains('#') || (*level == "#" && i == levels.len() - 1))
    })
}

/// A CONNECT that was let in: how, and what its credentials grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// How it was authenticated.
    pub method: AuthMethod,
    /// The topic filters its credentials grant, when they carry any (a JWT's `publish` and
    /// `subscribe` claims, a database row's lists); `None` for the other methods.
    pub grants: Option<Arc<Grants>>,
}

impl Authenticated {
    fn new(method: AuthMethod) -> Self {
        Self {
            method,
            grants: None,
        }
    }
}

/// A provider's answer.
enum Answer {
    /// Let in.
    Allow(Authenticated),
    /// Refused; no other provider is asked.
    Deny(Refusal),
    /// Not this provider's credentials: the next is asked.
    NotMine,
}

/// Rate limit of the warning that database credentials cannot be read.
static LOOKUP_FAILED: crate::telemetry::LogLimiter =
    crate::telemetry::LogLimiter::new(Duration::from_secs(10));

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
    /// The credentials could not be checked (the presence store did not answer): CONNACK 0x03.
    Unavailable,
}

/// The configured authentication, shared by every connection.
pub struct Auth {
    allow_anonymous: bool,
    bind_client_id: ClientIdBinding,
    /// The providers a user name and password are offered to, in order.
    chain: Vec<AuthProvider>,
    password_file: Option<(PathBuf, RwLock<Arc<PasswordFile>>)>,
    jwt: Option<Jwt>,
    database: Option<Database>,
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
        let jwt = match config.jwt.enabled() {
            true => Some(Jwt::new(&config.jwt)?),
            false => None,
        };
        let database = config
            .configures(AuthProvider::Database)
            .then(|| Database::new(config.database_cache_ttl, config.credential_cache_size));
        let mut cache_key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut cache_key)
            .map_err(|_| AuthError::Random)?;
        Ok(Self {
            allow_anonymous: config.allow_anonymous || !config.has_provider(),
            bind_client_id: config.bind_client_id,
            chain: config.chain(),
            password_file,
            jwt,
            database,
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
            chain: Vec::new(),
            password_file: None,
            jwt: None,
            database: None,
            verifications: Semaphore::new(1),
            cache: Mutex::new(HashMap::new()),
            cache_size: 0,
            cache_key: [0; 32],
            failure_delay_max: Duration::ZERO,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Reads the password file and the JWT key file again (not counted: SIGHUP and the reload
    /// endpoint go through [`crate::reload::Reloader`], which counts each file); on failure the
    /// one in force stays (the first error is returned, after both were tried). Blocking: call
    /// it off the async runtime. `Ok(false)` when there is neither.
    pub fn reload(&self) -> Result<bool, AuthError> {
        let password_file = self.reload_password_file().map(|r| r.is_some());
        let jwt = self.reload_jwt_key();
        Ok(password_file? | jwt?)
    }

    /// Reads the password file again (not counted: the caller counts); on failure the one in
    /// force stays. Blocking. `Ok(None)` without a password file, else the users the new file
    /// no longer lets in with their old password (removed or changed), whose connections the
    /// caller closes.
    pub fn reload_password_file(&self) -> Result<Option<Vec<String>>, AuthError> {
        let Some((path, current)) = &self.password_file else {
            return Ok(None);
        };
        let file = Arc::new(PasswordFile::load(path)?);
        let old = std::mem::replace(
            &mut *current.write().unwrap_or_else(|e| e.into_inner()),
            Arc::clone(&file),
        );
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
        Ok(Some(
            old.revoked_in(&file)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        ))
    }

    /// Whether JWTs are checked (`auth.jwt`), so that there is a key file to reload.
    pub fn has_jwt(&self) -> bool {
        self.jwt.is_some()
    }

    /// Reads the JWT key file again (not counted: the caller counts); on failure the key in
    /// force stays. Blocking. `Ok(false)` without JWT.
    pub fn reload_jwt_key(&self) -> Result<bool, AuthError> {
        let Some(jwt) = &self.jwt else {
            return Ok(false);
        };
        jwt.reload()?;
        Ok(true)
    }

    /// Reads database credentials from `source` from now on (the presence store, once open).
    /// Without `auth.database` it is not used.
    pub fn attach_credentials(&self, source: Arc<dyn CredentialSource>) {
        if let Some(database) = &self.database {
            database.attach(source);
        }
    }

    /// Forgets what was read of `username`'s database credential, after it was changed here
    /// (created, rotated, revoked): the next CONNECT reads it again.
    pub fn forget_credential(&self, username: &str) {
        if let Some(database) = &self.database {
            database.forget(username);
        }
    }

    /// Checks `request`; how it was authenticated and what its credentials grant, or why it
    /// is refused.
    pub async fn authenticate(&self, request: Request<'_>) -> Result<Authenticated, Refusal> {
        let chosen = match request.username {
            // Boxed: the providers' futures would otherwise sit in every connection's future.
            Some(user) if !self.chain.is_empty() => {
                Some(Box::pin(self.chain(user, request)).await?)
            }
            _ => None,
        };
        let authenticated = match chosen {
            Some(authenticated) => authenticated,
            None if request.identity.is_some() => Authenticated::new(AuthMethod::Certificate),
            None if self.allow_anonymous => Authenticated::new(AuthMethod::Anonymous),
            None => return Err(Refusal::NotAuthorized),
        };
        self.bind(request, authenticated)
    }

    /// `request`, whose user name was proven by SCRAM-SHA-256 ([`Auth::scram_verifier`]),
    /// authenticated, as far as the client id binding allows.
    pub fn authenticated_by_scram(&self, request: Request<'_>) -> Result<Authenticated, Refusal> {
        self.bind(request, Authenticated::new(AuthMethod::Scram))
    }

    /// `authenticated`, unless `auth.bind_client_id` refuses its client id.
    fn bind(
        &self,
        request: Request<'_>,
        authenticated: Authenticated,
    ) -> Result<Authenticated, Refusal> {
        let bound = match self.bind_client_id {
            ClientIdBinding::None => true,
            ClientIdBinding::Username => match authenticated.method {
                AuthMethod::Password | AuthMethod::Database | AuthMethod::Scram => {
                    request.username == Some(request.client_id)
                }
                // The token's client id claim equals the client id already.
                AuthMethod::Jwt => true,
                AuthMethod::Anonymous | AuthMethod::Certificate => false,
            },
            ClientIdBinding::Identity => request.identity == Some(request.client_id),
        };
        if !bound {
            return Err(Refusal::NotAuthorized);
        }
        Ok(authenticated)
    }

    /// Whether MQTT 5 enhanced authentication with SCRAM-SHA-256 is offered: the password
    /// file provider is configured (its `SCRAM-SHA-256$` entries are the verifiers).
    pub fn offers_scram(&self) -> bool {
        self.password_file.is_some() && self.chain.contains(&AuthProvider::PasswordFile)
    }

    /// The SCRAM-SHA-256 verifier of `user` in the password file; `None` for a user it does
    /// not have, or has with another kind of hash.
    pub fn scram_verifier(&self, user: &str) -> Option<scram::Verifier> {
        let (_, file) = self.password_file.as_ref()?;
        let file = file.read().unwrap_or_else(|e| e.into_inner());
        match file.lookup(user)? {
            password_file::Hash::Scram(verifier) => Some(verifier.clone()),
            _ => None,
        }
    }

    /// The salt shown to a SCRAM client naming a user without a verifier: made up, but the
    /// same at every attempt, so that the answer does not tell which users exist.
    pub fn scram_unknown_salt(&self, user: &str) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.cache_key);
        ring::hmac::sign(&key, user.as_bytes()).as_ref()[..16].to_vec()
    }

    /// Offers `user` and the password to each provider in turn; bad credentials when none
    /// claims them.
    async fn chain(&self, user: &str, request: Request<'_>) -> Result<Authenticated, Refusal> {
        let password = request.password.unwrap_or_default();
        for provider in &self.chain {
            let answer = match provider {
                AuthProvider::PasswordFile => self.check_password_file(user, password).await,
                AuthProvider::Jwt => self.check_jwt(password, request.client_id).await,
                AuthProvider::Database => self.check_database(user, password).await,
            };
            match answer {
                Answer::Allow(authenticated) => return Ok(authenticated),
                Answer::Deny(refusal) => return Err(refusal),
                Answer::NotMine => {}
            }
        }
        metrics().auth_verifications.inc(VerifyOutcome::Rejected);
        Err(Refusal::BadCredentials)
    }

    /// The password file: a user it does not have is not its.
    async fn check_password_file(&self, user: &str, password: &[u8]) -> Answer {
        let Some((_, file)) = &self.password_file else {
            return Answer::NotMine;
        };
        let file = Arc::clone(&file.read().unwrap_or_else(|e| e.into_inner()));
        if file.lookup(user).is_none() {
            return Answer::NotMine;
        }
        match self.verify(&file, user, password).await {
            Ok(()) => Answer::Allow(Authenticated::new(AuthMethod::Password)),
            Err(refusal) => Answer::Deny(refusal),
        }
    }

    /// A JWT in the password field: a password that is not one is not its.
    async fn check_jwt(&self, password: &[u8], client_id: &str) -> Answer {
        let Some(jwt) = &self.jwt else {
            return Answer::NotMine;
        };
        if !jwt::is_jwt(password) {
            return Answer::NotMine;
        }
        let verifier = jwt.verifier();
        let (token, client_id) = (password.to_vec(), client_id.to_owned());
        let checked = self
            .off_runtime(move || verifier.verify(&token, &client_id))
            .await
            .unwrap_or(Err(Refusal::NotAuthorized));
        match checked {
            Ok(grants) => {
                metrics().auth_verifications.inc(VerifyOutcome::Verified);
                Answer::Allow(Authenticated {
                    method: AuthMethod::Jwt,
                    grants: grants.map(Arc::new),
                })
            }
            Err(refusal) => {
                metrics().auth_verifications.inc(VerifyOutcome::Rejected);
                Answer::Deny(refusal)
            }
        }
    }

    /// The presence store's credentials: a user name without a row is not theirs.
    async fn check_database(&self, user: &str, password: &[u8]) -> Answer {
        let Some(database) = &self.database else {
            return Answer::NotMine;
        };
        let remembered = self.remembered(user, password);
        let found = match database.find(user, &remembered).await {
            Ok(found) => found,
            Err(error) => {
                if let Some(suppressed) = LOOKUP_FAILED.check() {
                    tracing::warn!(%error, suppressed,
                        "Database credentials cannot be read; CONNECTs that need them are \
                         refused with CONNACK 0x03 (this line at most every 10 s).");
                }
                return Answer::Deny(Refusal::Unavailable);
            }
        };
        let Some(credential) = found.credential else {
            return Answer::NotMine;
        };
        let allowed = || {
            Answer::Allow(Authenticated {
                method: AuthMethod::Database,
                grants: credential.grants.clone(),
            })
        };
        if credential.revoked {
            metrics().auth_verifications.inc(VerifyOutcome::Rejected);
            return Answer::Deny(Refusal::BadCredentials);
        }
        if found.verified {
            metrics().auth_verifications.inc(VerifyOutcome::CacheHit);
            return allowed();
        }
        if !self.check(credential.hash.clone(), password).await {
            return Answer::Deny(Refusal::BadCredentials);
        }
        metrics().auth_verifications.inc(VerifyOutcome::Verified);
        database.verified(user, &credential, remembered);
        allowed()
    }

    /// Verifies `password` against `hash` on the blocking pool, within the verification
    /// limit; a mismatch is counted as rejected.
    async fn check(&self, hash: password_file::Hash, password: &[u8]) -> bool {
        let password = password.to_vec();
        let right = self
            .off_runtime(move || hash.verify(&password))
            .await
            .unwrap_or(false);
        if !right {
            metrics().auth_verifications.inc(VerifyOutcome::Rejected);
        }
        right
    }

    /// Runs `work` on the blocking pool, at most `auth.max_concurrent_verifications` at a
    /// time; `None` if it could not run.
    async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _permit = self.verifications.acquire().await.ok()?;
        tokio::task::spawn_blocking(work).await.ok()
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
        file: &PasswordFile,
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
        let Some(hash) = file.lookup(user).cloned() else {
            metrics().auth_verifications.inc(VerifyOutcome::Rejected);
            return Err(Refusal::BadCredentials);
        };
        if !self.check(hash, password).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_of_grants_are_checked() {
        for good in [
            "a", "a/b", "+", "#", "a/+/c", "a/#", "+/+", "/", "$SYS/#", "a//b",
        ] {
            assert!(valid_filter(good), "{good:?}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "a\0b", "++"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
        assert!(Grants::new(vec!["a/#".into()], vec!["b/+".into()]).is_ok());
        let error = Grants::new(vec!["a/#".into()], vec!["b/#/c".into()]).expect_err("bad");
        assert!(error.contains("b/#/c"), "{error}");
    }

    /// A password file of `users` (argon2id hashes of `password`) in a temporary directory.
    fn password_file(users: &[&str], password: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("dir");
        let hash = password_file::Hash::new_argon2id(password).expect("hash");
        let text: String = users
            .iter()
            .map(|u| format!("{u}:{}\n", hash.to_line_field()))
            .collect();
        std::fs::write(dir.path().join("pw"), text).expect("write");
        dir
    }

    fn request<'a>(user: &'a str, password: &'a [u8]) -> Request<'a> {
        Request {
            peer: IpAddr::from([127, 0, 0, 1]),
            client_id: user,
            username: Some(user),
            password: Some(password),
            identity: None,
        }
    }

    #[tokio::test]
    async fn not_mine_asks_the_next_provider_and_deny_ends_the_chain() {
        let dir = password_file(&["alice"], b"pw-alice");
        let config = AuthConfig {
            password_file: Some(dir.path().join("pw")),
            database: true,
            database_cache_ttl: Duration::ZERO,
            ..AuthConfig::default()
        };
        let auth = Auth::new(&config).expect("auth");
        // The file has alice: it decides, and the database (not attached: it would answer
        // "unavailable") is never asked.
        let ok = auth.authenticate(request("alice", b"pw-alice")).await;
        assert_eq!(ok.map(|a| a.method), Ok(AuthMethod::Password));
        let wrong = auth.authenticate(request("alice", b"nope")).await;
        assert_eq!(wrong, Err(Refusal::BadCredentials));
        // The file does not have bob: the database is asked.
        let bob = auth.authenticate(request("bob", b"pw")).await;
        assert_eq!(bob, Err(Refusal::Unavailable));
        // Database first: it is asked for alice too.
        let config = AuthConfig {
            providers: vec![AuthProvider::Database, AuthProvider::PasswordFile],
            ..config
        };
        let auth = Auth::new(&config).expect("auth");
        let first = auth.authenticate(request("alice", b"pw-alice")).await;
        assert_eq!(first, Err(Refusal::Unavailable));
        // Without a user name the chain is skipped: no credentials, not authorised.
        let anonymous = auth
            .authenticate(Request {
                username: None,
                password: None,
                ..request("carol", b"")
            })
            .await;
        assert_eq!(anonymous, Err(Refusal::NotAuthorized));
    }
}
