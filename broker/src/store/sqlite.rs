//! SQLite backend, the embedded default: a WAL-mode file created on first start. A batch is
//! multi-row VALUES inserts and upserts plus prepared per-row updates, in one transaction.
//!
//! Timestamps are stored as INTEGER microseconds since the Unix epoch; UUIDs as lowercase
//! hyphenated TEXT (text order = time order for UUIDv7).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use uuid::Uuid;

use super::model::{Boot, Credential, CredentialRecord, Device, Recovery, Session, Stats};
use super::plan::BatchPlan;
use super::sql::{
    auth_method, filters_from_json, filters_to_json, listener, protocol, stats_from_rows,
    BOOT_COLUMNS, BROKER_RESTART, CREDENTIAL_COLUMNS, DEVICE_COLUMNS, PRUNE_DEVICE,
    PRUNE_ENDED_BEFORE, SESSION_COLUMNS, STATS_REASONS, STATS_TOTALS,
};
use super::{count_folded, Access, PresenceStore, StoreError};
use crate::event::PresenceRecord;

/// Rows per multi-row statement: 16 parameters each stays under SQLite's 32,766 limit.
const ROWS_PER_STATEMENT: usize = 2_000;

/// A SQLite connection pool.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Sessions kept per device and batch before folding ([`PresenceStore::coalescing`]).
    coalesce_after: usize,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(v).unwrap_or_default()
}

fn uuid(text: &str) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn credential(row: &SqliteRow) -> Result<Credential, sqlx::Error> {
    Ok(Credential {
        username: row.try_get("username")?,
        publish: filters_from_json(row.try_get("publish")?)?,
        subscribe: filters_from_json(row.try_get("subscribe")?)?,
        created_at: from_micros(row.try_get("created_at")?),
        updated_at: from_micros(row.try_get("updated_at")?),
        revoked_at: row
            .try_get::<Option<i64>, _>("revoked_at")?
            .map(from_micros),
    })
}

fn device(row: &SqliteRow) -> Result<Device, sqlx::Error> {
    Ok(Device {
        device_id: row.try_get("device_id")?,
        online: row.try_get("online")?,
        session_id: uuid(row.try_get("session_id")?)?,
        node_id: row.try_get("node_id")?,
        connected_at: from_micros(row.try_get("connected_at")?),
        disconnected_at: row
            .try_get::<Option<i64>, _>("disconnected_at")?
            .map(from_micros),
        last_reason: row.try_get("last_reason")?,
        peer: row.try_get("peer")?,
        listener: listener(row.try_get("listener")?)?,
        identity: row.try_get("identity")?,
        username: row.try_get("username")?,
        auth_method: auth_method(row.try_get("auth_method")?)?,
        keep_alive: row.try_get("keep_alive")?,
        protocol: protocol(row.try_get("protocol")?)?,
        session_expires_at: row
            .try_get::<Option<i64>, _>("session_expires_at")?
            .map(from_micros),
        updated_at: from_micros(row.try_get("updated_at")?),
    })
}

fn session(row: &SqliteRow) -> Result<Session, sqlx::Error> {
    Ok(Session {
        session_id: uuid(row.try_get("session_id")?)?,
        device_id: row.try_get("device_id")?,
        node_id: row.try_get("node_id")?,
        boot_id: uuid(row.try_get("boot_id")?)?,
        seq: row.try_get("seq")?,
        connected_at: from_micros(row.try_get("connected_at")?),
        disconnected_at: row
            .try_get::<Option<i64>, _>("disconnected_at")?
            .map(from_micros),
        reason: row.try_get("reason")?,
        reason_code: row.try_get("reason_code")?,
        reason_string: row.try_get("reason_string")?,
        peer: row.try_get("peer")?,
        listener: listener(row.try_get("listener")?)?,
        identity: row.try_get("identity")?,
        username: row.try_get("username")?,
        auth_method: auth_method(row.try_get("auth_method")?)?,
        keep_alive: row.try_get("keep_alive")?,
        clean_session: row.try_get("clean_session")?,
        protocol: protocol(row.try_get("protocol")?)?,
        session_expires_at: row
            .try_get::<Option<i64>, _>("session_expires_at")?
            .map(from_micros),
        coalesced: row.try_get("coalesced")?,
        expired_at: row
            .try_get::<Option<i64>, _>("expired_at")?
            .map(from_micros),
    })
}

fn boot(row: &SqliteRow) -> Result<Boot, sqlx::Error> {
    Ok(Boot {
        node_id: row.try_get("node_id")?,
        boot_id: uuid(row.try_get("boot_id")?)?,
        started_at: from_micros(row.try_get("started_at")?),
        heartbeat_at: from_micros(row.try_get("heartbeat_at")?),
        recovered: row.try_get("recovered")?,
    })
}

impl PresenceStore for SqliteStore {
    /// Opens the database file named by a `sqlite://PATH` URL. A read-write pool creates the
    /// file when missing and is a single connection (SQLite has one writer at a time; a second
    /// one would only wait for the lock); a read-only pool has up to `max_connections`
    /// `query_only` connections, which WAL mode lets read beside the writer.
    async fn open(url: &str, max_connections: u32, access: Access) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .busy_timeout(Duration::from_secs(5))
            // 256 KiB page cache per connection (SQLite's default is 2 MiB): the memory
            // belongs to device connections; presence writes touch few pages.
            .pragma("cache_size", "-256")
            .foreign_keys(true);
        if access == Access::ReadOnly {
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(1))
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.pragma("query_only", "ON"))
                .await?;
            return Ok(Self {
                pool,
                coalesce_after: 0,
            });
        }
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal);
        let file = options.get_filename();
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            if file != Path::new(":memory:") {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|source| StoreError::Directory {
                        path: dir.display().to_string(),
                        source,
                    })?;
            }
        }
        // Kept open: while it is, the WAL and shared-memory files stay, and the readers with
        // them.
        let pool_options = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(5));
        // Switching a new file to WAL takes an exclusive lock that SQLite does not wait for; a
        // second process (or pool) opening the file at that moment gets SQLITE_BUSY at once.
        let mut attempt = 0;
        loop {
            match pool_options.clone().connect_with(options.clone()).await {
                Ok(pool) => {
                    return Ok(Self {
                        pool,
                        coalesce_after: 0,
                    })
                }
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("5") && attempt < 50 =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn coalescing(mut self, coalesce_after: usize) -> Self {
        self.coalesce_after = coalesce_after;
        self
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/sqlite")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn begin_boot(
        &self,
        node_id: &str,
        boot_id: Uuid,
        now: DateTime<Utc>,
        held: &[(String, DateTime<Utc>)],
    ) -> Result<Recovery, StoreError> {
        let now_us = micros(now);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO nodes (boot_id, node_id, started_at, heartbeat_at) VALUES (?1, ?2, ?3, ?3) \
             ON CONFLICT (boot_id) DO NOTHING",
        )
        .bind(boot_id.to_string())
        .bind(node_id)
        .bind(now_us)
        .execute(&mut *tx)
        .await?;
        let boots = sqlx::query(
            "SELECT boot_id, heartbeat_at FROM nodes \
             WHERE node_id = ?1 AND boot_id <> ?2 AND NOT recovered",
        )
        .bind(node_id)
        .bind(boot_id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let mut recovery = Recovery {
            boots: boots.len() as u64,
            ..Recovery::default()
        };
        for boot in &boots {
            let old: String = boot.try_get("boot_id")?;
            let last_alive: i64 = boot.try_get("heartbeat_at")?;
            // Devices first: their rows are matched against the sessions still open.
            let devices = sqlx::query(
                "UPDATE devices SET online = 0, last_reason = ?3, updated_at = ?4, \
                        disconnected_at = max(?2, connected_at) \
                 WHERE online AND session_id IN \
                       (SELECT session_id FROM sessions WHERE boot_id = ?1 AND disconnected_at IS NULL)",
            )
            .bind(&old)
            .bind(last_alive)
            .bind(BROKER_RESTART)
            .bind(now_us)
            .execute(&mut *tx)
            .await?;
            let sessions = sqlx::query(
                "UPDATE sessions SET disconnected_at = max(?2, connected_at), reason = ?3 \
                 WHERE boot_id = ?1 AND disconnected_at IS NULL",
            )
            .bind(&old)
            .bind(last_alive)
            .bind(BROKER_RESTART)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE nodes SET recovered = 1 WHERE boot_id = ?1")
                .bind(&old)
                .execute(&mut *tx)
                .await?;
            recovery.sessions_closed += sessions.rows_affected();
            recovery.devices_offline += devices.rows_affected();
        }
        // The sessions the broker state restored, in a table of this connection for the
        // statements below (dropped again before the commit).
        sqlx::query(
            "CREATE TEMP TABLE restored (device_id TEXT PRIMARY KEY, expires_at INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        for chunk in held.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT OR REPLACE INTO temp.restored (device_id, expires_at) ");
            q.push_values(chunk, |mut b, (client_id, at)| {
                b.push_bind(client_id).push_bind(micros(*at));
            });
            q.build().persistent(false).execute(&mut *tx).await?;
        }
        // The other sessions the earlier boots held for offline devices ended: they expired
        // while the node was down, or the broker state did not keep them.
        sqlx::query(
            "UPDATE sessions SET expired_at = min(d.session_expires_at, ?2) FROM devices AS d \
             WHERE d.node_id = ?1 AND d.session_expires_at IS NOT NULL AND NOT d.online \
               AND d.device_id NOT IN (SELECT device_id FROM temp.restored) \
               AND sessions.session_id = d.session_id AND sessions.expired_at IS NULL",
        )
        .bind(node_id)
        .bind(now_us)
        .execute(&mut *tx)
        .await?;
        let ended = sqlx::query(
            "UPDATE devices SET session_expires_at = NULL, updated_at = ?2 \
             WHERE node_id = ?1 AND session_expires_at IS NOT NULL AND NOT online \
               AND device_id NOT IN (SELECT device_id FROM temp.restored)",
        )
        .bind(node_id)
        .bind(now_us)
        .execute(&mut *tx)
        .await?;
        recovery.held_sessions_ended = ended.rows_affected();
        // The restored ones are held by this boot, until their new expiry.
        let restored = sqlx::query(
            "UPDATE devices SET session_expires_at = r.expires_at, updated_at = ?1 \
             FROM temp.restored AS r WHERE devices.device_id = r.device_id AND NOT devices.online",
        )
        .bind(now_us)
        .execute(&mut *tx)
        .await?;
        recovery.held_sessions_restored = restored.rows_affected();
        sqlx::query("DROP TABLE temp.restored")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(recovery)
    }

    async fn heartbeat(&self, boot_id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET heartbeat_at = ?2 WHERE boot_id = ?1")
            .bind(boot_id.to_string())
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn apply(&self, batch: &[PresenceRecord]) -> Result<(), StoreError> {
        let plan = BatchPlan::new(batch, self.coalesce_after);
        let now = micros(Utc::now());
        let mut tx = self.pool.begin().await?;

        for b in &plan.boots {
            sqlx::query(
                "INSERT INTO nodes (boot_id, node_id, started_at, heartbeat_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (boot_id) DO UPDATE \
                 SET heartbeat_at = max(nodes.heartbeat_at, excluded.heartbeat_at)",
            )
            .bind(b.boot_id.to_string())
            .bind(&b.node_id)
            .bind(micros(b.first))
            .bind(micros(b.last))
            .execute(&mut *tx)
            .await?;
        }

        for chunk in plan.inserts.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO sessions (session_id, device_id, node_id, boot_id, seq, connected_at, \
                                       peer, keep_alive, clean_session, coalesced, listener, \
                                       identity, username, auth_method, protocol) ",
            );
            q.push_values(chunk, |mut b, s| {
                b.push_bind(s.session_id.to_string())
                    .push_bind(&s.device_id)
                    .push_bind(&s.node_id)
                    .push_bind(s.boot_id.to_string())
                    .push_bind(s.seq)
                    .push_bind(micros(s.connected_at))
                    .push_bind(&s.peer)
                    .push_bind(s.keep_alive)
                    .push_bind(s.clean_session)
                    .push_bind(s.coalesced)
                    .push_bind(s.listener.as_str())
                    .push_bind(s.identity.as_deref())
                    .push_bind(s.username.as_deref())
                    .push_bind(s.auth_method.as_str())
                    .push_bind(s.protocol.as_str());
            });
            q.push(" ON CONFLICT (session_id) DO NOTHING");
            // Not cached: the text changes with the row count, and a cached multi-row
            // statement per batch size would hold megabytes per pooled connection.
            q.build().persistent(false).execute(&mut *tx).await?;
        }

        // Closes and offline marks are written a chunk of rows per statement, as the inserts
        // are: sqlx hands every statement to SQLite's worker thread and back, and a storm of
        // disconnects written one statement each kept that thread and the runtime switching
        // for most of a second (bench/auth.sh).
        for chunk in plan.closes.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "UPDATE sessions SET disconnected_at = v.column2, reason = v.column3, \
                        reason_code = v.column4, reason_string = v.column5, \
                        session_expires_at = v.column6 FROM (",
            );
            q.push_values(chunk, |mut b, c| {
                b.push_bind(c.session_id.to_string())
                    .push_bind(micros(c.at))
                    .push_bind(c.reason)
                    .push_bind(c.reason_code)
                    .push_bind(c.reason_string.as_deref())
                    .push_bind(c.expires_at.map(micros));
            });
            q.push(
                ") AS v WHERE sessions.session_id = v.column1 AND sessions.disconnected_at IS NULL",
            );
            q.build().persistent(false).execute(&mut *tx).await?;
        }

        for chunk in plan.offline.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "UPDATE devices SET online = 0, disconnected_at = v.column3, \
                        last_reason = v.column4, updated_at = v.column5, \
                        session_expires_at = v.column6 FROM (",
            );
            q.push_values(chunk, |mut b, c| {
                b.push_bind(&c.device_id)
                    .push_bind(c.session_id.to_string())
                    .push_bind(micros(c.at))
                    .push_bind(c.reason)
                    .push_bind(now)
                    .push_bind(c.expires_at.map(micros));
            });
            q.push(
                ") AS v WHERE devices.device_id = v.column1 AND devices.session_id = v.column2 \
                 AND devices.online",
            );
            q.build().persistent(false).execute(&mut *tx).await?;
        }

        for chunk in plan.upserts.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO devices (device_id, online, session_id, node_id, connected_at, \
                                      disconnected_at, last_reason, peer, keep_alive, listener, \
                                      identity, username, auth_method, protocol, \
                                      session_expires_at, updated_at) ",
            );
            q.push_values(chunk, |mut b, u| {
                b.push_bind(&u.session.device_id)
                    .push_bind(u.closed.is_none())
                    .push_bind(u.session.session_id.to_string())
                    .push_bind(&u.session.node_id)
                    .push_bind(micros(u.session.connected_at))
                    .push_bind(u.last_close().map(|c| micros(c.0)))
                    .push_bind(u.last_close().map(|c| c.1))
                    .push_bind(&u.session.peer)
                    .push_bind(u.session.keep_alive)
                    .push_bind(u.session.listener.as_str())
                    .push_bind(u.session.identity.as_deref())
                    .push_bind(u.session.username.as_deref())
                    .push_bind(u.session.auth_method.as_str())
                    .push_bind(u.session.protocol.as_str())
                    .push_bind(u.held_until.map(micros))
                    .push_bind(now);
            });
            // Same rules as PostgreSQL: newer session wins; the same session may only go
            // offline; the previous disconnect is kept while online again; a held session is the
            // newest session's (none while it is online).
            q.push(
                " ON CONFLICT (device_id) DO UPDATE SET \
                   online = excluded.online, session_id = excluded.session_id, \
                   node_id = excluded.node_id, connected_at = excluded.connected_at, \
                   disconnected_at = COALESCE(excluded.disconnected_at, devices.disconnected_at), \
                   last_reason = COALESCE(excluded.last_reason, devices.last_reason), \
                   peer = excluded.peer, keep_alive = excluded.keep_alive, \
                   listener = excluded.listener, identity = excluded.identity, \
                   username = excluded.username, auth_method = excluded.auth_method, \
                   protocol = excluded.protocol, \
                   session_expires_at = excluded.session_expires_at, \
                   updated_at = excluded.updated_at \
                 WHERE devices.session_id < excluded.session_id \
                    OR (devices.session_id = excluded.session_id AND devices.online \
                        AND NOT excluded.online)",
            );
            // Not cached: the text changes with the row count, and a cached multi-row
            // statement per batch size would hold megabytes per pooled connection.
            q.build().persistent(false).execute(&mut *tx).await?;
        }

        for chunk in plan.expiries.chunks(ROWS_PER_STATEMENT) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("UPDATE sessions SET expired_at = v.column2 FROM (");
            q.push_values(chunk, |mut b, e| {
                b.push_bind(e.session_id.to_string())
                    .push_bind(micros(e.at));
            });
            q.push(") AS v WHERE sessions.session_id = v.column1 AND sessions.expired_at IS NULL");
            q.build().persistent(false).execute(&mut *tx).await?;
            // The device holds no session any more, unless it has connected since (then its
            // current session is a newer one, and this expiry is not about it).
            let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
                "UPDATE devices SET session_expires_at = NULL, updated_at = v.column3 FROM (",
            );
            q.push_values(chunk, |mut b, e| {
                b.push_bind(&e.device_id)
                    .push_bind(e.session_id.to_string())
                    .push_bind(now);
            });
            q.push(
                ") AS v WHERE devices.device_id = v.column1 AND devices.session_id = v.column2 \
                 AND NOT devices.online AND devices.session_expires_at IS NOT NULL",
            );
            q.build().persistent(false).execute(&mut *tx).await?;
        }

        tx.commit().await?;
        count_folded(&plan);
        Ok(())
    }

    async fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = ?1"
        ))
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(device).transpose()?)
    }

    async fn devices(
        &self,
        online: Option<bool>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices \
             WHERE (?1 IS NULL OR online = ?1) AND (?2 IS NULL OR device_id > ?2) \
             ORDER BY device_id LIMIT ?3"
        ))
        .bind(online)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(device).collect::<Result<_, _>>()?)
    }

    async fn sessions(&self, device_id: &str, limit: u32) -> Result<Vec<Session>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE device_id = ?1 \
             ORDER BY session_id DESC LIMIT ?2"
        ))
        .bind(device_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(session).collect::<Result<_, _>>()?)
    }

    async fn stats(&self) -> Result<Stats, StoreError> {
        let totals = sqlx::query(STATS_TOTALS).fetch_one(&self.pool).await?;
        let reasons = sqlx::query(STATS_REASONS).fetch_all(&self.pool).await?;
        Ok(stats_from_rows(&totals, &reasons)?)
    }

    async fn prune_ended_before(
        &self,
        before: DateTime<Utc>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(PRUNE_ENDED_BEFORE)
            .bind(micros(before))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn prune_device(
        &self,
        device_id: &str,
        keep: u32,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(PRUNE_DEVICE)
            .bind(device_id)
            .bind(i64::from(keep.max(1)))
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn nodes(&self, node_id: Option<&str>, limit: u32) -> Result<Vec<Boot>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {BOOT_COLUMNS} FROM nodes WHERE (?1 IS NULL OR node_id = ?1) \
             ORDER BY started_at DESC, boot_id DESC LIMIT ?2"
        ))
        .bind(node_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(boot).collect::<Result<_, _>>()?)
    }

    async fn credential(&self, username: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CREDENTIAL_COLUMNS}, password_hash FROM credentials WHERE username = ?1"
        ))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        let record = |row: &SqliteRow| -> Result<CredentialRecord, sqlx::Error> {
            Ok(CredentialRecord {
                credential: credential(row)?,
                password_hash: row.try_get("password_hash")?,
            })
        };
        Ok(row.as_ref().map(record).transpose()?)
    }

    async fn create_credential(&self, record: &CredentialRecord) -> Result<bool, StoreError> {
        let c = &record.credential;
        let done = sqlx::query(
            "INSERT INTO credentials \
             (username, password_hash, publish, subscribe, created_at, updated_at, revoked_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL) \
             ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash, \
             publish = excluded.publish, subscribe = excluded.subscribe, \
             created_at = excluded.created_at, updated_at = excluded.updated_at, revoked_at = NULL \
             WHERE credentials.revoked_at IS NOT NULL",
        )
        .bind(&c.username)
        .bind(&record.password_hash)
        .bind(filters_to_json(c.publish.as_deref()))
        .bind(filters_to_json(c.subscribe.as_deref()))
        .bind(micros(c.created_at))
        .bind(micros(c.updated_at))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn rotate_credential(
        &self,
        username: &str,
        password_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE credentials SET password_hash = ?2, updated_at = ?3 \
             WHERE username = ?1 AND revoked_at IS NULL",
        )
        .bind(username)
        .bind(password_hash)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn revoke_credential(
        &self,
        username: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE credentials SET revoked_at = ?2, updated_at = ?2 \
             WHERE username = ?1 AND revoked_at IS NULL",
        )
        .bind(username)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn credentials(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Credential>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM credentials \
             WHERE (?1 IS NULL OR username > ?1) ORDER BY username LIMIT ?2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(credential).collect::<Result<_, _>>()?)
    }
}
