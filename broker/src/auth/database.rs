//! Database credentials (`auth.database`): per-device user names and argon2id hashes in the
//! presence store's `credentials` table, managed through the REST API, so that a fleet of
//! millions needs no file.
//!
//! The store is reached through [`CredentialSource`], which the store implements (the store
//! points down at this module, not the other way). A user name without a row is not this
//! provider's (the next provider is asked); a revoked row is a bad credential.
//!
//! What was read is remembered for `auth.database_cache_ttl`, a row and the absence of one
//! alike, so that a reconnect storm does not query the database per CONNECT; a verified
//! password is remembered with its row (a keyed digest, never the password) and forgotten with
//! it. A change through the API forgets the row on the node that made it at once; other nodes
//! read it again within the TTL, so a revoked or rotated credential stops working everywhere
//! within `auth.database_cache_ttl`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ring::digest;

use super::password_file::Hash;
use super::Grants;

/// A credential as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCredential {
    /// The password's argon2id hash.
    pub hash: Hash,
    /// The topic filters the credential grants, if its row lists any.
    pub grants: Option<Arc<Grants>>,
    /// Whether it was revoked (it then never authenticates).
    pub revoked: bool,
}

/// Why a credential could not be looked up (the store's error, as text).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LookupError(pub String);

/// A lookup in progress.
pub type Lookup<'a> =
    Pin<Box<dyn Future<Output = Result<Option<StoredCredential>, LookupError>> + Send + 'a>>;

/// Where credentials are read from: the presence store.
pub trait CredentialSource: Send + Sync + 'static {
    /// The credential of `username`, revoked or not; `None` without one.
    fn credential<'a>(&'a self, username: &'a str) -> Lookup<'a>;
}

/// What is remembered of one user name.
struct Entry {
    /// When it was read.
    fetched: Instant,
    /// What was read (`None`: no row).
    credential: Option<Arc<StoredCredential>>,
    /// The keyed digest of the user name and password last verified against this row.
    verified: Option<digest::Digest>,
}

/// The database provider's state.
pub(super) struct Database {
    /// Set once the store is open ([`super::Auth::attach_credentials`]).
    source: OnceLock<Arc<dyn CredentialSource>>,
    /// How long a row read is used.
    ttl: Duration,
    /// Most user names remembered.
    cache_size: usize,
    cache: Mutex<HashMap<Box<str>, Entry>>,
}

/// A credential read (or remembered), and whether `remembered` was verified against it.
pub(super) struct Found {
    pub(super) credential: Option<Arc<StoredCredential>>,
    pub(super) verified: bool,
}

impl Database {
    pub(super) fn new(ttl: Duration, cache_size: usize) -> Self {
        Self {
            source: OnceLock::new(),
            ttl,
            cache_size,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Uses `source` from now on (once; later calls are ignored).
    pub(super) fn attach(&self, source: Arc<dyn CredentialSource>) {
        let _ = self.source.set(source);
    }

    /// `username`'s credential, from the cache while fresh, else from the store.
    pub(super) async fn find(
        &self,
        username: &str,
        remembered: &digest::Digest,
    ) -> Result<Found, LookupError> {
        if !self.ttl.is_zero() {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(entry) = cache
                .get(username)
                .filter(|e| e.fetched.elapsed() < self.ttl)
            {
                return Ok(Found {
                    credential: entry.credential.clone(),
                    verified: entry
                        .verified
                        .is_some_and(|d| d.as_ref() == remembered.as_ref()),
                });
            }
        }
        let source = self
            .source
            .get()
            .ok_or_else(|| LookupError("the presence store is not open yet".to_owned()))?;
        let credential = source.credential(username).await?.map(Arc::new);
        if self.ttl.is_zero() || self.cache_size == 0 {
            return Ok(Found {
                credential,
                verified: false,
            });
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= self.cache_size && !cache.contains_key(username) {
            cache.retain(|_, e| e.fetched.elapsed() < self.ttl);
            if cache.len() >= self.cache_size {
                cache.clear();
            }
        }
        // A password verified against the same hash stays verified; a rotated one does not.
        let kept = cache.get(username).and_then(|old| {
            let same = match (&old.credential, &credential) {
                (Some(a), Some(b)) => a.hash == b.hash && !b.revoked,
                _ => false,
            };
            old.verified.filter(|_| same)
        });
        let verified = kept.is_some_and(|d| d.as_ref() == remembered.as_ref());
        cache.insert(
            username.into(),
            Entry {
                fetched: Instant::now(),
                credential: credential.clone(),
                verified: kept,
            },
        );
        Ok(Found {
            credential,
            verified,
        })
    }

    /// Remembers that `remembered` verified against `credential`, if that is still the row
    /// remembered for `username`.
    pub(super) fn verified(
        &self,
        username: &str,
        credential: &Arc<StoredCredential>,
        remembered: digest::Digest,
    ) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = cache.get_mut(username) {
            if entry
                .credential
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, credential))
            {
                entry.verified = Some(remembered);
            }
        }
    }

    /// Forgets what was read for `username` (its row changed).
    pub(super) fn forget(&self, username: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(username);
    }
}
