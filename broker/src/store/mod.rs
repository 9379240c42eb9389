//! The presence store: where device state, session history and node boots are persisted.
//!
//! One trait ([`PresenceStore`]), one implementation per backend ([`postgres`], [`sqlite`]),
//! picked by the scheme of `database.url` ([`Store::connect`]). Queries are built at run time, so
//! building needs no database. Each backend applies a batch of connection events in one
//! transaction with set-based statements, planned here once for both ([`BatchPlan`]):
//!
//! - history rows are idempotent on the session id (a retried batch never duplicates a row, and
//!   a close never overwrites an earlier close);
//! - a Disconnected changes a device's current state only if its session is still the device's
//!   current session, and a Connected never replaces a newer session (session ids are UUIDv7, so
//!   their order is their creation order);
//! - a device's sessions that begin and end within one batch beyond the first few (a reconnect
//!   loop, two clients fighting over one client id) are folded into a kept row's `coalesced`
//!   count instead of a row each ([`BatchPlan`]), so that such a loop cannot multiply writes.
//!
//! History is bounded by age and by rows per device: the pruning statements are here
//! ([`PresenceStore::prune_ended_before`], [`PresenceStore::prune_device`]); when to run them is
//! the presence pipeline's business (`presence::retention`).

pub mod postgres;
pub mod sqlite;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::database_url::{redact, Backend};
use crate::event::{ConnectionEvent, PresenceRecord};
use crate::labels::DisconnectReason;
use crate::metrics::metrics;

/// Sessions of one device opened and closed within one batch that are recorded as rows before
/// the rest are folded into them (`bridge.coalesce_after`).
pub const DEFAULT_COALESCE_AFTER: usize = 3;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a query, or is unreachable.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema migrations could not be applied.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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

/// The current state of one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    /// The MQTT client id.
    pub device_id: String,
    /// Whether its current session is open.
    pub online: bool,
    /// Its current (latest) session.
    pub session_id: Uuid,
    /// The node that holds (or held) that session.
    pub node_id: String,
    /// When the current session started.
    pub connected_at: DateTime<Utc>,
    /// When the device last went offline (kept while it is online again).
    pub disconnected_at: Option<DateTime<Utc>>,
    /// Why it last went offline.
    pub last_reason: Option<String>,
    /// The address of the current session's peer.
    pub peer: String,
    /// The current session's keep-alive, seconds.
    pub keep_alive: i32,
    /// When this row last changed.
    pub updated_at: DateTime<Utc>,
}

/// One session (connection) of a device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    /// UUIDv7 of the connection.
    pub session_id: Uuid,
    /// The MQTT client id.
    pub device_id: String,
    /// The node that held it.
    pub node_id: String,
    /// The boot of that node.
    pub boot_id: Uuid,
    /// The node's connection sequence number.
    pub seq: i64,
    /// When it started.
    pub connected_at: DateTime<Utc>,
    /// When it ended; `None` while open.
    pub disconnected_at: Option<DateTime<Utc>>,
    /// Why it ended.
    pub reason: Option<String>,
    /// The peer address.
    pub peer: String,
    /// Keep-alive in seconds.
    pub keep_alive: i32,
    /// The CONNECT's clean-session flag.
    pub clean_session: bool,
    /// Further sessions of the device folded into this row: they began and ended within the
    /// same batch as this one, after it, with the same reason, and have no row of their own.
    pub coalesced: i32,
    /// When the persistent session (clean_session = false) that this connection used last was
    /// discarded after `mqtt.persistent_session_expiry` without a connection.
    pub expired_at: Option<DateTime<Utc>>,
}

/// Totals for the stats endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Devices online now.
    pub online: i64,
    /// Devices ever seen.
    pub known_devices: i64,
    /// Sessions in the retained history (coalesced ones included).
    pub connects: i64,
    /// Ended sessions in the retained history by reason (coalesced ones included).
    pub disconnects: BTreeMap<String, i64>,
}

/// One boot (process start) of a broker node: a row of the `nodes` table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Boot {
    /// The node's configured id (`node.id`).
    pub node_id: String,
    /// This boot.
    pub boot_id: Uuid,
    /// When it started (or its first event, for a boot known only from its journaled events).
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat (or latest event): it was alive then. A crashed boot's open sessions
    /// are closed at this time, with reason broker_restart.
    pub heartbeat_at: DateTime<Utc>,
    /// Whether a later boot of the node has closed the sessions this one left open: this boot
    /// ended without a graceful shutdown.
    pub recovered: bool,
}

/// What crash recovery did at the start of a boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Earlier boots of this node whose open sessions were closed.
    pub boots: u64,
    /// Sessions closed with reason broker_restart.
    pub sessions_closed: u64,
    /// Devices turned offline by it.
    pub devices_offline: u64,
}

/// The operations the presence pipeline and the API need from a database.
pub trait PresenceStore: Send + Sync {
    /// Applies the schema migrations of this backend.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Records a new boot of `node_id` and closes the sessions that earlier boots of the node
    /// left open, with reason broker_restart at that boot's last heartbeat.
    fn begin_boot(
        &self,
        node_id: &str,
        boot_id: Uuid,
        now: DateTime<Utc>,
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

/// The configured backend.
#[derive(Clone)]
pub enum Store {
    /// PostgreSQL (production).
    Postgres(postgres::PgStore),
    /// SQLite (embedded default).
    Sqlite(sqlite::SqliteStore),
}

impl Store {
    /// Connects to the database named by `url`: `postgres://` / `postgresql://` or `sqlite://`,
    /// with a pool for writes and reads ([`Access::ReadWrite`]). PostgreSQL connects lazily
    /// (the broker starts while the database is down); a SQLite file and its directory are
    /// created when missing.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::open(url, max_connections, Access::ReadWrite).await
    }

    /// As [`Store::connect`], with a pool for `access`. A read-only SQLite pool expects the
    /// file to exist (open the read-write pool first).
    pub async fn open(url: &str, max_connections: u32, access: Access) -> Result<Self, StoreError> {
        match Backend::of_url(url) {
            Some(Backend::Postgres) => Ok(Self::Postgres(postgres::PgStore::connect(
                url,
                max_connections,
                access,
            )?)),
            Some(Backend::Sqlite) => Ok(Self::Sqlite(
                sqlite::SqliteStore::connect(url, max_connections, access).await?,
            )),
            None => Err(StoreError::Scheme(redact(url))),
        }
    }

    /// This store, folding a device's short sessions within a batch beyond the first
    /// `coalesce_after` of them (0: never), as [`BatchPlan`] describes.
    pub fn coalescing(mut self, coalesce_after: usize) -> Self {
        match &mut self {
            Self::Postgres(s) => s.coalesce_after = coalesce_after,
            Self::Sqlite(s) => s.coalesce_after = coalesce_after,
        }
        self
    }

    /// "postgres" or "sqlite", for logs.
    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            Store::Postgres($s) => $call.await,
            Store::Sqlite($s) => $call.await,
        }
    };
}

impl PresenceStore for Store {
    async fn migrate(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.migrate())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.ping())
    }
    async fn begin_boot(
        &self,
        node_id: &str,
        boot_id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Recovery, StoreError> {
        delegate!(self, s => s.begin_boot(node_id, boot_id, now))
    }
    async fn heartbeat(&self, boot_id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        delegate!(self, s => s.heartbeat(boot_id, now))
    }
    async fn apply(&self, batch: &[PresenceRecord]) -> Result<(), StoreError> {
        delegate!(self, s => s.apply(batch))
    }
    async fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        delegate!(self, s => s.device(device_id))
    }
    async fn devices(
        &self,
        online: Option<bool>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, StoreError> {
        delegate!(self, s => s.devices(online, after, limit))
    }
    async fn sessions(&self, device_id: &str, limit: u32) -> Result<Vec<Session>, StoreError> {
        delegate!(self, s => s.sessions(device_id, limit))
    }
    async fn stats(&self) -> Result<Stats, StoreError> {
        delegate!(self, s => s.stats())
    }
    async fn prune_ended_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        delegate!(self, s => s.prune_ended_before(before, limit))
    }
    async fn prune_device(
        &self,
        device_id: &str,
        keep: u32,
        limit: u32,
    ) -> Result<u64, StoreError> {
        delegate!(self, s => s.prune_device(device_id, keep, limit))
    }
    async fn nodes(&self, node_id: Option<&str>, limit: u32) -> Result<Vec<Boot>, StoreError> {
        delegate!(self, s => s.nodes(node_id, limit))
    }
}

/// A Connected event, as a history row to insert.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NewSession {
    pub session_id: Uuid,
    pub device_id: String,
    pub node_id: String,
    pub boot_id: Uuid,
    pub seq: i64,
    pub connected_at: DateTime<Utc>,
    pub peer: String,
    pub keep_alive: i32,
    pub clean_session: bool,
    /// Sessions folded into this one (see [`BatchPlan`]).
    pub coalesced: i32,
}

/// A Disconnected event: closes a history row, and the device if it is still current.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Close {
    pub device_id: String,
    pub session_id: Uuid,
    pub at: DateTime<Utc>,
    pub reason: &'static str,
}

/// The newest session of a device within a batch, with its state at the end of the batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DeviceUpsert {
    pub session: NewSession,
    /// Set when the batch also closed this session.
    pub closed: Option<(DateTime<Utc>, &'static str)>,
    /// The latest close of an older session of the device within the batch (a takeover or a
    /// quick reconnect): the device's last disconnect while this session is online.
    pub previous_close: Option<(DateTime<Utc>, &'static str)>,
}

impl DeviceUpsert {
    /// The device's last disconnect as of the end of the batch, if the batch saw one.
    pub fn last_close(&self) -> Option<(DateTime<Utc>, &'static str)> {
        self.closed.or(self.previous_close)
    }
}

/// A SessionExpired event: marks the history row of the session's last connection.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Expiry {
    pub session_id: Uuid,
    pub at: DateTime<Utc>,
}

/// A broker boot seen in a batch, registered so that crash recovery also finds boots that
/// never reached `begin_boot` (their events came from the journal).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BootSeen {
    pub boot_id: Uuid,
    pub node_id: String,
    /// Earliest event time of the boot in the batch.
    pub first: DateTime<Utc>,
    /// Latest event time: the boot was alive then.
    pub last: DateTime<Utc>,
}

fn later(
    a: Option<(DateTime<Utc>, &'static str)>,
    b: Option<(DateTime<Utc>, &'static str)>,
) -> Option<(DateTime<Utc>, &'static str)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 >= x.0 { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// A batch of events turned into set-based operations, in the order they must run.
///
/// Coalescing: a device's sessions that begin and end within the batch ("transient": a
/// reconnect loop, two clients taking one client id from each other) are recorded as history
/// rows up to `coalesce_after` of them; each later one is folded into the last kept row of the
/// device with the same reason (its `coalesced` count grows by one) and gets no row, no close
/// and no device update, or is kept when no kept row has its reason (so at most
/// `coalesce_after` + 6 transient rows per device and batch). The device's newest session in the
/// batch is never folded, so its current state and `last_session` stay exact, and the totals
/// by reason count folded sessions under their own reason.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct BatchPlan {
    /// History rows to insert (ignored when the session id exists).
    pub inserts: Vec<NewSession>,
    /// History rows to close (only if still open).
    pub closes: Vec<Close>,
    /// Devices to turn offline if the closed session is still their current one (sessions
    /// that did not start in this batch).
    pub offline: Vec<Close>,
    /// Devices whose newest session started in this batch; applied only if that session is
    /// newer than the stored one (or the same one, going offline). Sorted by device id, as is
    /// `offline`, so that concurrent writers lock rows in the same order.
    pub upserts: Vec<DeviceUpsert>,
    /// Boots whose events are in the batch.
    pub boots: Vec<BootSeen>,
    /// Persistent sessions discarded, after the rows above are written.
    pub expiries: Vec<Expiry>,
    /// Sessions folded into kept rows instead of getting their own.
    pub coalesced: u64,
}

pub(crate) fn timestamp(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

impl BatchPlan {
    pub(crate) fn new(batch: &[PresenceRecord], coalesce_after: usize) -> Self {
        let mut plan = BatchPlan::default();
        let mut newest: HashMap<&str, usize> = HashMap::new();
        let mut boots: HashMap<Uuid, BootSeen> = HashMap::new();
        for record in batch {
            let at = timestamp(record.event.time());
            boots
                .entry(record.boot_id)
                .and_modify(|b| {
                    b.first = b.first.min(at);
                    b.last = b.last.max(at);
                })
                .or_insert_with(|| BootSeen {
                    boot_id: record.boot_id,
                    node_id: record.node_id.clone(),
                    first: at,
                    last: at,
                });
            match &record.event {
                ConnectionEvent::Connected {
                    client_id,
                    session_id,
                    seq,
                    peer,
                    keep_alive,
                    clean_session,
                    time,
                } => {
                    let session = NewSession {
                        session_id: session_id.0,
                        device_id: client_id.clone(),
                        node_id: record.node_id.clone(),
                        boot_id: record.boot_id,
                        seq: i64::try_from(*seq).unwrap_or(i64::MAX),
                        connected_at: timestamp(*time),
                        peer: peer.to_string(),
                        keep_alive: i32::from(*keep_alive),
                        clean_session: *clean_session,
                        coalesced: 0,
                    };
                    match newest.get(client_id.as_str()) {
                        Some(&i) if plan.upserts[i].session.session_id >= session.session_id => {}
                        Some(&i) => {
                            let previous_close = plan.upserts[i].last_close();
                            plan.upserts[i] = DeviceUpsert {
                                session: session.clone(),
                                closed: None,
                                previous_close,
                            }
                        }
                        None => {
                            newest.insert(client_id, plan.upserts.len());
                            plan.upserts.push(DeviceUpsert {
                                session: session.clone(),
                                closed: None,
                                previous_close: None,
                            });
                        }
                    }
                    plan.inserts.push(session);
                }
                ConnectionEvent::Disconnected {
                    client_id,
                    session_id,
                    reason,
                    time,
                    ..
                } => {
                    let close = Close {
                        device_id: client_id.clone(),
                        session_id: session_id.0,
                        at: timestamp(*time),
                        reason: reason.as_str(),
                    };
                    match newest.get(client_id.as_str()) {
                        Some(&i) if plan.upserts[i].session.session_id == session_id.0 => {
                            plan.upserts[i].closed = Some((close.at, close.reason));
                        }
                        Some(&i) => {
                            let u = &mut plan.upserts[i];
                            if session_id.0 < u.session.session_id {
                                u.previous_close =
                                    later(u.previous_close, Some((close.at, close.reason)));
                            }
                            plan.offline.push(close.clone());
                        }
                        None => plan.offline.push(close.clone()),
                    }
                    plan.closes.push(close);
                }
                ConnectionEvent::SessionExpired { session_id, .. } => {
                    plan.expiries.push(Expiry {
                        session_id: session_id.0,
                        at,
                    });
                }
            }
        }
        plan.upserts
            .sort_by(|a, b| a.session.device_id.cmp(&b.session.device_id));
        plan.offline.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        plan.boots = boots.into_values().collect();
        plan.boots.sort_by_key(|b| b.boot_id);
        if coalesce_after > 0 {
            plan.coalesce(coalesce_after);
        }
        plan
    }

    /// Folds each device's transient sessions beyond the first `keep` (see [`BatchPlan`]).
    fn coalesce(&mut self, keep: usize) {
        let newest: HashSet<Uuid> = self.upserts.iter().map(|u| u.session.session_id).collect();
        let reasons: HashMap<Uuid, &'static str> = self
            .closes
            .iter()
            .map(|c| (c.session_id, c.reason))
            .collect();
        /// A device's transient rows kept so far.
        #[derive(Default)]
        struct Kept {
            count: usize,
            /// Reason -> the insert index of the last kept row with it.
            by_reason: HashMap<&'static str, usize>,
        }
        let mut kept: HashMap<&str, Kept> = HashMap::new();
        let mut into: Vec<(usize, Uuid)> = Vec::new();
        for (i, session) in self.inserts.iter().enumerate() {
            let Some(&reason) = reasons.get(&session.session_id) else {
                continue; // still open at the end of the batch
            };
            if newest.contains(&session.session_id) {
                continue;
            }
            let device = kept.entry(session.device_id.as_str()).or_default();
            match device.by_reason.get(reason) {
                Some(&row) if device.count >= keep => into.push((row, session.session_id)),
                _ => {
                    device.count += 1;
                    device.by_reason.insert(reason, i);
                }
            }
        }
        if into.is_empty() {
            return;
        }
        let folded: HashSet<Uuid> = into.iter().map(|(_, id)| *id).collect();
        for (row, _) in &into {
            self.inserts[*row].coalesced += 1;
        }
        self.inserts.retain(|s| !folded.contains(&s.session_id));
        self.closes.retain(|c| !folded.contains(&c.session_id));
        self.offline.retain(|c| !folded.contains(&c.session_id));
        self.coalesced = folded.len() as u64;
    }

    /// Counts what a committed plan folded.
    pub(crate) fn committed(&self) {
        if self.coalesced > 0 {
            metrics().presence_coalesced.inc_by(self.coalesced);
        }
    }
}

/// Columns of [`Device`], in both backends' `devices` table.
pub(crate) const DEVICE_COLUMNS: &str = "device_id, online, session_id, node_id, connected_at, \
     disconnected_at, last_reason, peer, keep_alive, updated_at";
/// Columns of [`Session`], in both backends' `sessions` table.
pub(crate) const SESSION_COLUMNS: &str = "session_id, device_id, node_id, boot_id, seq, \
     connected_at, disconnected_at, reason, peer, keep_alive, clean_session, coalesced, \
     expired_at";
/// Columns of [`Boot`], in both backends' `nodes` table.
pub(crate) const BOOT_COLUMNS: &str = "boot_id, node_id, started_at, heartbeat_at, recovered";
/// Totals for [`Stats`]; the same SQL on both backends.
pub(crate) const STATS_TOTALS: &str =
    "SELECT (SELECT count(*) FROM devices WHERE online) AS online, \
     (SELECT count(*) FROM devices) AS known, \
     (SELECT count(*) + coalesce(sum(coalesced), 0) FROM sessions) AS connects";
/// Ended sessions by reason (folded ones included), for [`Stats`].
pub(crate) const STATS_REASONS: &str = "SELECT reason, count(*) + sum(coalesced) AS n \
     FROM sessions WHERE reason IS NOT NULL GROUP BY reason";

/// [`Stats`] from the rows of [`STATS_TOTALS`] and [`STATS_REASONS`], on either backend.
pub(crate) fn stats_from_rows<R: sqlx::Row>(totals: &R, reasons: &[R]) -> Result<Stats, sqlx::Error>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'static str: sqlx::ColumnIndex<R>,
{
    Ok(Stats {
        online: totals.try_get("online")?,
        known_devices: totals.try_get("known")?,
        connects: totals.try_get("connects")?,
        disconnects: reasons
            .iter()
            .map(|r| Ok((r.try_get("reason")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()?,
    })
}

/// The stored name of broker_restart.
pub(crate) const BROKER_RESTART: &str = DisconnectReason::BrokerRestart.as_str();

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SessionId;
    use std::time::Duration;

    fn connected(id: &str, session: SessionId, seq: u64) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: Uuid::nil(),
            event: ConnectionEvent::Connected {
                client_id: id.into(),
                session_id: session,
                seq,
                peer: "127.0.0.1:1".parse().expect("addr"),
                keep_alive: 30,
                clean_session: true,
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(seq),
            },
        }
    }

    fn disconnected(id: &str, session: SessionId) -> PresenceRecord {
        disconnected_as(id, session, DisconnectReason::Takeover)
    }

    fn disconnected_as(id: &str, session: SessionId, reason: DisconnectReason) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: Uuid::nil(),
            event: ConnectionEvent::Disconnected {
                client_id: id.into(),
                session_id: session,
                seq: 0,
                reason,
                time: SystemTime::UNIX_EPOCH,
            },
        }
    }

    /// `n` sessions of `id` that begin and end (with `reason`) one after the other.
    fn transient(id: &str, n: usize, reason: DisconnectReason) -> Vec<PresenceRecord> {
        (0..n)
            .flat_map(|_| {
                let s = SessionId::new();
                [connected(id, s, 1), disconnected_as(id, s, reason)]
            })
            .collect()
    }

    fn coalesced_of(plan: &BatchPlan, id: &str) -> Vec<i32> {
        plan.inserts
            .iter()
            .filter(|s| s.device_id == id)
            .map(|s| s.coalesced)
            .collect()
    }

    #[test]
    fn plan_folds_a_takeover_fight_beyond_the_first_sessions() {
        let mut batch = transient("a", 10, DisconnectReason::Takeover);
        batch.extend(transient("b", 2, DisconnectReason::Takeover));
        let last = SessionId::new();
        batch.push(connected("a", last, 2));
        let plan = BatchPlan::new(&batch, 3);
        assert_eq!(coalesced_of(&plan, "a"), [0, 0, 7, 0]);
        assert_eq!(coalesced_of(&plan, "b"), [0, 0]);
        assert_eq!(plan.coalesced, 7);
        // Only kept rows are closed; the folded ones leave no trace but their count.
        assert_eq!(plan.closes.len(), 3 + 2);
        assert!(plan.offline.is_empty());
        // The device's state is exact: online on its newest session, last closed by takeover.
        let a = &plan.upserts[0];
        assert_eq!(a.session.session_id, last.0);
        assert_eq!(a.closed, None);
        assert_eq!(a.last_close().map(|c| c.1), Some("takeover"));
        // Without coalescing, a row per session.
        let plan = BatchPlan::new(&batch, 0);
        assert_eq!(plan.inserts.len(), 13);
        assert_eq!(plan.coalesced, 0);
    }

    #[test]
    fn plan_folds_sessions_only_into_a_row_with_their_reason() {
        use DisconnectReason::{ClientDisconnect, Takeover};
        let mut batch = transient("a", 5, Takeover);
        batch.extend(transient("a", 2, ClientDisconnect));
        batch.extend(transient("a", 2, Takeover));
        // The newest session also ends in the batch: it stays a row, and the device offline.
        batch.extend(transient("a", 1, ClientDisconnect));
        let plan = BatchPlan::new(&batch, 2);
        let rows: Vec<(i32, &str)> = plan
            .inserts
            .iter()
            .map(|s| {
                let reason = plan
                    .closes
                    .iter()
                    .find(|c| c.session_id == s.session_id)
                    .map_or("open", |c| c.reason);
                (s.coalesced, reason)
            })
            .collect();
        assert_eq!(
            rows,
            [
                (0, "takeover"),
                (5, "takeover"),
                (1, "client_disconnect"),
                (0, "client_disconnect"),
            ]
        );
        // Totals by reason stay exact: 7 takeovers, 3 clean disconnects.
        let total =
            |reason: &str| -> i32 { rows.iter().filter(|r| r.1 == reason).map(|r| 1 + r.0).sum() };
        assert_eq!((total("takeover"), total("client_disconnect")), (7, 3));
        assert_eq!(
            plan.upserts[0].closed.map(|c| c.1),
            Some("client_disconnect")
        );
    }

    #[test]
    fn plan_keeps_the_newest_session_per_device() {
        let old = SessionId::new();
        let s1 = SessionId::new();
        let s2 = SessionId::new();
        let plan = BatchPlan::new(
            &[
                disconnected("a", old),
                connected("a", s1, 1),
                disconnected("a", s1),
                connected("a", s2, 2),
                connected("b", SessionId::new(), 3),
            ],
            DEFAULT_COALESCE_AFTER,
        );
        assert_eq!(plan.inserts.len(), 3);
        assert_eq!(plan.closes.len(), 2);
        assert_eq!(plan.upserts.len(), 2);
        assert_eq!(plan.upserts[0].session.session_id, s2.0);
        assert_eq!(plan.upserts[0].closed, None);
        // The close of `old` is fenced in the database; s1 is superseded by s2 in the batch.
        assert_eq!(
            plan.offline
                .iter()
                .map(|c| c.session_id)
                .collect::<Vec<_>>(),
            [old.0]
        );
    }

    #[test]
    fn plan_keeps_the_takeover_close_for_the_new_session() {
        let s1 = SessionId::new();
        let s2 = SessionId::new();
        let plan = BatchPlan::new(
            &[
                connected("a", s1, 1),
                disconnected("a", s1),
                connected("a", s2, 2),
            ],
            DEFAULT_COALESCE_AFTER,
        );
        assert_eq!(plan.upserts.len(), 1);
        assert_eq!(plan.upserts[0].closed, None);
        assert_eq!(plan.upserts[0].last_close().map(|c| c.1), Some("takeover"));
        assert_eq!(plan.boots.len(), 1);
    }

    #[test]
    fn plan_closes_a_session_opened_in_the_same_batch() {
        let s = SessionId::new();
        let plan = BatchPlan::new(
            &[connected("a", s, 1), disconnected("a", s)],
            DEFAULT_COALESCE_AFTER,
        );
        assert!(plan.offline.is_empty());
        assert_eq!(plan.upserts[0].closed.map(|c| c.1), Some("takeover"));
    }
}
