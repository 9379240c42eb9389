//! The presence store: where device state, session history and node boots are persisted.
//!
//! One trait, [`PresenceStore`], and one implementation per backend: [`PgStore`] (PostgreSQL)
//! and [`SqliteStore`] (embedded SQLite). The broker picks one once at start from the scheme of
//! `database.url` and runs generic over it (`broker::run_with`), as atuin's server does; a
//! further backend is one more implementation. The models the store returns are in [`model`];
//! both backends apply a batch of connection events in one transaction with set-based
//! statements planned once for both by the pure batch planner (`plan`, unit-tested there); the
//! SQL they share is in `sql`.
//! Queries are built at run time, so building needs no database. History is bounded by the
//! pruning statements ([`PresenceStore::prune_ended_before`], [`PresenceStore::prune_device`]);
//! when to run them is the presence pipeline's business. The store takes its options
//! (pool size, access, coalescing) from its caller and imports nothing above it.

pub mod model;
mod plan;
pub mod postgres;
mod sql;
pub mod sqlite;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::auth::database::{CredentialSource, Lookup, LookupError, StoredCredential};
use crate::auth::password_file::Hash;
use crate::auth::Grants;
use crate::event::PresenceRecord;
use crate::metrics::metrics;

pub use model::{Boot, Credential, CredentialRecord, Device, Recovery, Session, Stats};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a query, or is unreachable.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema migrations could not be applied.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The call took longer than its caller allows (`bridge.store_timeout` for the bridge); it
    /// was abandoned, and a transaction it had begun is rolled back.
    #[error("no answer from the database within {0:?}")]
    Timeout(Duration),
    /// `database.url` names no supported backend.
    #[error(
        "unsupported scheme in database.url {0:?}: use postgres://, postgresql:// or sqlite://"
    )]
    Scheme(String),
    /// The directory for the SQLite file cannot be created.
    #[error("cannot create directory {path} for the SQLite database (database.url): {source}")]
    Directory {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What a pool is for. The bridge and the API get a pool each, so that API reads never make
/// presence writes wait for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Writes and reads (the bridge, the node heartbeat, history pruning, tests). SQLite uses a
    /// single connection: it has one writer at a time.
    ReadWrite,
    /// Reads only (the API). SQLite connections are `query_only`, and in WAL mode they read
    /// beside the writer without blocking it; PostgreSQL sessions are read-only.
    ReadOnly,
}

/// The operations the presence pipeline and the API need from a database: one implementation
/// per backend. A store is a cheap handle on a connection pool (cloning shares the pool).
pub trait PresenceStore: Clone + Send + Sync + 'static {
    /// Opens the database named by `url` with a pool of up to `max_connections` for `access`.
    /// The store folds no sessions until told to ([`PresenceStore::coalescing`]).
    fn open(
        url: &str,
        max_connections: u32,
        access: Access,
    ) -> impl Future<Output = Result<Self, StoreError>> + Send;
    /// As [`PresenceStore::open`], for writes and reads ([`Access::ReadWrite`]).
    fn connect(
        url: &str,
        max_connections: u32,
    ) -> impl Future<Output = Result<Self, StoreError>> + Send {
        Self::open(url, max_connections, Access::ReadWrite)
    }
    /// This store, folding a device's short sessions within a batch beyond the first
    /// `coalesce_after` of them (0: never), as the batch planner describes
    /// (`bridge.coalesce_after`).
    fn coalescing(self, coalesce_after: usize) -> Self;
    /// Applies the schema migrations of this backend.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Records a new boot of `node_id` and closes the sessions that earlier boots of the node
    /// left open, with reason broker_restart at that boot's last heartbeat. Of the persistent
    /// sessions the earlier boots held for offline devices, those in `held` (client id, when
    /// each expires unless its client connects: what the broker state restored) are held by
    /// this boot; the others ended while the node was down and are marked expired. One
    /// transaction: no reader sees a restored session as gone.
    fn begin_boot(
        &self,
        node_id: &str,
        boot_id: Uuid,
        now: DateTime<Utc>,
        held: &[(String, DateTime<Utc>)],
    ) -> impl Future<Output = Result<Recovery, StoreError>> + Send;
    /// Marks the boot alive at `now`.
    fn heartbeat(
        &self,
        boot_id: Uuid,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Applies a batch of events in one transaction. Applying the same batch twice (a retry)
    /// leaves the same state as applying it once.
    fn apply(
        &self,
        batch: &[PresenceRecord],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One device's current state.
    fn device(
        &self,
        device_id: &str,
    ) -> impl Future<Output = Result<Option<Device>, StoreError>> + Send;
    /// Devices ordered by id, after `after` (keyset pagination), optionally only online or
    /// offline ones.
    fn devices(
        &self,
        online: Option<bool>,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Device>, StoreError>> + Send;
    /// A device's sessions, newest first.
    fn sessions(
        &self,
        device_id: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Session>, StoreError>> + Send;
    /// Totals.
    fn stats(&self) -> impl Future<Output = Result<Stats, StoreError>> + Send;
    /// Deletes up to `limit` closed sessions that ended before `before`, oldest first; returns
    /// how many. Open sessions are never deleted.
    fn prune_ended_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes up to `limit` of `device_id`'s closed sessions older than its `keep` newest
    /// (`keep` at least 1), oldest first; returns how many. Open sessions are never deleted.
    fn prune_device(
        &self,
        device_id: &str,
        keep: u32,
        limit: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Boots of every node, or of `node_id`, newest first (by `started_at`).
    fn nodes(
        &self,
        node_id: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Boot>, StoreError>> + Send;
    /// The credential of `username`, revoked or not, with its hash.
    fn credential(
        &self,
        username: &str,
    ) -> impl Future<Output = Result<Option<CredentialRecord>, StoreError>> + Send;
    /// Stores `record` as a new credential; `false` (and nothing written) when its user name
    /// has one that is not revoked. A revoked one is replaced.
    fn create_credential(
        &self,
        record: &CredentialRecord,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Replaces the password hash of `username`'s credential; `false` when it has none that is
    /// not revoked.
    fn rotate_credential(
        &self,
        username: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Revokes `username`'s credential; `false` when it has none that is not revoked.
    fn revoke_credential(
        &self,
        username: &str,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Credentials ordered by user name, after `after` (keyset pagination), revoked ones
    /// included.
    fn credentials(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Credential>, StoreError>> + Send;
}

/// A store as the source of database credentials (`auth.database`): the store points down at
/// the authentication, which never names the store.
#[derive(Clone)]
pub struct StoreCredentials<S>(pub S);

impl<S: PresenceStore> CredentialSource for StoreCredentials<S> {
    fn credential<'a>(&'a self, username: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            let Some(record) = self
                .0
                .credential(username)
                .await
                .map_err(|e| LookupError(e.to_string()))?
            else {
                return Ok(None);
            };
            stored(record).map(Some).map_err(LookupError)
        })
    }
}

/// What authentication needs of a credential row: its hash parsed, its filters as grants.
fn stored(record: CredentialRecord) -> Result<StoredCredential, String> {
    let c = record.credential;
    let hash = Hash::parse(&record.password_hash).map_err(|e| {
        format!(
            "the stored hash of credential {:?} is unusable: {e}",
            c.username
        )
    })?;
    let grants = match (c.publish, c.subscribe) {
        (None, None) => None,
        (publish, subscribe) => {
            let boxed = |f: Option<Vec<String>>| {
                f.unwrap_or_default()
                    .into_iter()
                    .map(String::into_boxed_str)
                    .collect()
            };
            let grants = Grants::new(boxed(publish), boxed(subscribe))
                .map_err(|e| format!("credential {:?}: {e}", c.username))?;
            Some(Arc::new(grants))
        }
    };
    Ok(StoredCredential {
        hash,
        grants,
        revoked: c.revoked_at.is_some(),
    })
}

/// Counts what a committed plan folded (`heartwire_presence_sessions_coalesced_total`).
fn count_folded(plan: &plan::BatchPlan) {
    if plan.coalesced > 0 {
        metrics().presence_coalesced.inc_by(plan.coalesced);
    }
}
