//! PostgreSQL backend: a batch is a few set-based statements over UNNEST arrays in one
//! transaction.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
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

/// A PostgreSQL connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Sessions kept per device and batch before folding ([`PresenceStore::coalescing`]).
    coalesce_after: usize,
}

impl PgStore {
    /// The pool, for tests and benchmarks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn device(row: &PgRow) -> Result<Device, sqlx::Error> {
    Ok(Device {
        device_id: row.try_get("device_id")?,
        online: row.try_get("online")?,
        session_id: row.try_get("session_id")?,
        node_id: row.try_get("node_id")?,
        connected_at: row.try_get("connected_at")?,
        disconnected_at: row.try_get("disconnected_at")?,
        last_reason: row.try_get("last_reason")?,
        peer: row.try_get("peer")?,
        listener: listener(row.try_get("listener")?)?,
        identity: row.try_get("identity")?,
        username: row.try_get("username")?,
        auth_method: auth_method(row.try_get("auth_method")?)?,
        keep_alive: row.try_get("keep_alive")?,
        protocol: protocol(row.try_get("protocol")?)?,
        session_expires_at: row.try_get("session_expires_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn session(row: &PgRow) -> Result<Session, sqlx::Error> {
    Ok(Session {
        session_id: row.try_get("session_id")?,
        device_id: row.try_get("device_id")?,
        node_id: row.try_get("node_id")?,
        boot_id: row.try_get("boot_id")?,
        seq: row.try_get("seq")?,
        connected_at: row.try_get("connected_at")?,
        disconnected_at: row.try_get("disconnected_at")?,
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
        session_expires_at: row.try_get("session_expires_at")?,
        coalesced: row.try_get("coalesced")?,
        expired_at: row.try_get("expired_at")?,
    })
}

fn boot(row: &PgRow) -> Result<Boot, sqlx::Error> {
    Ok(Boot {
        node_id: row.try_get("node_id")?,
        boot_id: row.try_get("boot_id")?,
        started_at: row.try_get("started_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        recovered: row.try_get("recovered")?,
    })
}

fn credential(row: &PgRow) -> Result<Credential, sqlx::Error> {
    Ok(Credential {
        username: row.try_get("username")?,
        publish: filters_from_json(row.try_get("publish")?)?,
        subscribe: filters_from_json(row.try_get("subscribe")?)?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

impl PresenceStore for PgStore {
    /// A pool that connects on first use, so the broker starts while the database is down.
    /// A read-only pool's sessions refuse writes (`default_transaction_read_only`).
    async fn open(url: &str, max_connections: u32, access: Access) -> Result<Self, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?.application_name("heartwire");
        if access == Access::ReadOnly {
            options = options
                .application_name("heartwire-api")
                .options([("default_transaction_read_only", "on")]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            coalesce_after: 0,
        })
    }

    fn coalescing(mut self, coalesce_after: usize) -> Self {
        self.coalesce_after = coalesce_after;
        self
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/postgres")
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
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO nodes (boot_id, node_id, started_at, heartbeat_at) VALUES ($1, $2, $3, $3) \
             ON CONFLICT (boot_id) DO NOTHING",
        )
        .bind(boot_id)
        .bind(node_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let boots = sqlx::query(
            "SELECT boot_id, heartbeat_at FROM nodes \
             WHERE node_id = $1 AND boot_id <> $2 AND NOT recovered FOR UPDATE",
        )
        .bind(node_id)
        .bind(boot_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut recovery = Recovery {
            boots: boots.len() as u64,
            ..Recovery::default()
        };
        for boot in &boots {
            let old: Uuid = boot.try_get("boot_id")?;
            let last_alive: DateTime<Utc> = boot.try_get("heartbeat_at")?;
            let closed = sqlx::query(
                "WITH closed AS ( \
                   UPDATE sessions SET disconnected_at = GREATEST($2, connected_at), reason = $3 \
                   WHERE boot_id = $1 AND disconnected_at IS NULL \
                   RETURNING session_id, device_id, disconnected_at) \
                 , offline AS ( \
                   UPDATE devices d SET online = FALSE, disconnected_at = c.disconnected_at, \
                          last_reason = $3, updated_at = now() \
                   FROM closed c \
                   WHERE d.device_id = c.device_id AND d.session_id = c.session_id AND d.online \
                   RETURNING 1) \
                 SELECT (SELECT count(*) FROM closed) AS sessions, \
                        (SELECT count(*) FROM offline) AS devices",
            )
            .bind(old)
            .bind(last_alive)
            .bind(BROKER_RESTART)
            .fetch_one(&mut *tx)
            .await?;
            recovery.sessions_closed += closed.try_get::<i64, _>("sessions")? as u64;
            recovery.devices_offline += closed.try_get::<i64, _>("devices")? as u64;
            sqlx::query("UPDATE nodes SET recovered = TRUE WHERE boot_id = $1")
                .bind(old)
                .execute(&mut *tx)
                .await?;
        }
        // The sessions the broker state restored are held by this boot, until their new
        // expiry; the other sessions the earlier boots held for offline devices ended: they
        // expired while the node was down, or the broker state did not keep them.
        let held_ids: Vec<&str> = held.iter().map(|(id, _)| id.as_str()).collect();
        let held_until: Vec<DateTime<Utc>> = held.iter().map(|(_, at)| *at).collect();
        let settled = sqlx::query(
            "WITH restored AS ( \
               SELECT * FROM UNNEST($2::text[], $3::timestamptz[]) AS u(device_id, expires_at)) \
             , gone AS ( \
               SELECT d.device_id, d.session_id, LEAST(d.session_expires_at, $4) AS at \
               FROM devices d \
               WHERE d.node_id = $1 AND d.session_expires_at IS NOT NULL AND NOT d.online \
                 AND NOT EXISTS (SELECT 1 FROM restored r WHERE r.device_id = d.device_id) \
               FOR UPDATE OF d) \
             , expired AS ( \
               UPDATE sessions s SET expired_at = g.at FROM gone g \
               WHERE s.session_id = g.session_id AND s.expired_at IS NULL) \
             , dropped AS ( \
               UPDATE devices d SET session_expires_at = NULL, updated_at = now() FROM gone g \
               WHERE d.device_id = g.device_id RETURNING 1) \
             , held AS ( \
               UPDATE devices d SET session_expires_at = r.expires_at, updated_at = now() \
               FROM restored r WHERE d.device_id = r.device_id AND NOT d.online RETURNING 1) \
             SELECT (SELECT count(*) FROM dropped) AS ended, (SELECT count(*) FROM held) AS held",
        )
        .bind(node_id)
        .bind(held_ids)
        .bind(held_until)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        recovery.held_sessions_ended = settled.try_get::<i64, _>("ended")? as u64;
        recovery.held_sessions_restored = settled.try_get::<i64, _>("held")? as u64;
        tx.commit().await?;
        Ok(recovery)
    }

    async fn heartbeat(&self, boot_id: Uuid, now: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET heartbeat_at = $2 WHERE boot_id = $1")
            .bind(boot_id)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn apply(&self, batch: &[PresenceRecord]) -> Result<(), StoreError> {
        let plan = BatchPlan::new(batch, self.coalesce_after);
        let mut tx = self.pool.begin().await?;

        if !plan.boots.is_empty() {
            let b = &plan.boots;
            sqlx::query(
                "INSERT INTO nodes (boot_id, node_id, started_at, heartbeat_at) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::timestamptz[]) \
                 ON CONFLICT (boot_id) DO UPDATE \
                 SET heartbeat_at = GREATEST(nodes.heartbeat_at, EXCLUDED.heartbeat_at)",
            )
            .bind(b.iter().map(|r| r.boot_id).collect::<Vec<_>>())
            .bind(b.iter().map(|r| r.node_id.as_str()).collect::<Vec<_>>())
            .bind(b.iter().map(|r| r.first).collect::<Vec<_>>())
            .bind(b.iter().map(|r| r.last).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        if !plan.inserts.is_empty() {
            let s = &plan.inserts;
            sqlx::query(
                "INSERT INTO sessions (session_id, device_id, node_id, boot_id, seq, connected_at, \
                                       peer, keep_alive, clean_session, coalesced, listener, \
                                       identity, username, auth_method, protocol) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::int8[], \
                                      $6::timestamptz[], $7::text[], $8::int4[], $9::bool[], \
                                      $10::int4[], $11::text[], $12::text[], $13::text[], \
                                      $14::text[], $15::text[]) \
                 ON CONFLICT (session_id) DO NOTHING",
            )
            .bind(s.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.node_id.as_str()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.boot_id).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.seq).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.connected_at).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.peer.as_str()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.keep_alive).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.clean_session).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.coalesced).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.listener.as_str()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.identity.as_deref()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.username.as_deref()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.auth_method.as_str()).collect::<Vec<_>>())
            .bind(s.iter().map(|r| r.protocol.as_str()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        if !plan.closes.is_empty() {
            let c = &plan.closes;
            sqlx::query(
                "UPDATE sessions s SET disconnected_at = u.at, reason = u.reason, \
                        reason_code = u.reason_code, reason_string = u.reason_string, \
                        session_expires_at = u.expires_at \
                 FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::int4[], $5::text[], \
                             $6::timestamptz[]) \
                      AS u(session_id, at, reason, reason_code, reason_string, expires_at) \
                 WHERE s.session_id = u.session_id AND s.disconnected_at IS NULL",
            )
            .bind(c.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.at).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.reason).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.reason_code).collect::<Vec<_>>())
            .bind(
                c.iter()
                    .map(|r| r.reason_string.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(c.iter().map(|r| r.expires_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        if !plan.offline.is_empty() {
            let c = &plan.offline;
            sqlx::query(
                "UPDATE devices d SET online = FALSE, disconnected_at = u.at, \
                        last_reason = u.reason, session_expires_at = u.expires_at, \
                        updated_at = now() \
                 FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[], $4::text[], \
                             $5::timestamptz[]) \
                      AS u(device_id, session_id, at, reason, expires_at) \
                 WHERE d.device_id = u.device_id AND d.session_id = u.session_id AND d.online",
            )
            .bind(c.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.at).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.reason).collect::<Vec<_>>())
            .bind(c.iter().map(|r| r.expires_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        if !plan.upserts.is_empty() {
            let u = &plan.upserts;
            // Newer session wins; the same session may only go from online to offline. While
            // online again, the previous disconnect time and reason are kept; a held session is
            // the newest session's (none while it is online).
            sqlx::query(
                "INSERT INTO devices (device_id, online, session_id, node_id, connected_at, \
                                      disconnected_at, last_reason, peer, keep_alive, listener, \
                                      identity, username, auth_method, protocol, \
                                      session_expires_at, updated_at) \
                 SELECT device_id, online, session_id, node_id, connected_at, disconnected_at, \
                        last_reason, peer, keep_alive, listener, identity, username, auth_method, \
                        protocol, session_expires_at, now() \
                 FROM UNNEST($1::text[], $2::bool[], $3::uuid[], $4::text[], $5::timestamptz[], \
                             $6::timestamptz[], $7::text[], $8::text[], $9::int4[], $10::text[], \
                             $11::text[], $12::text[], $13::text[], $14::text[], \
                             $15::timestamptz[]) \
                      AS u(device_id, online, session_id, node_id, connected_at, disconnected_at, \
                           last_reason, peer, keep_alive, listener, identity, username, \
                           auth_method, protocol, session_expires_at) \
                 ON CONFLICT (device_id) DO UPDATE SET \
                   online = EXCLUDED.online, session_id = EXCLUDED.session_id, \
                   node_id = EXCLUDED.node_id, connected_at = EXCLUDED.connected_at, \
                   disconnected_at = COALESCE(EXCLUDED.disconnected_at, devices.disconnected_at), \
                   last_reason = COALESCE(EXCLUDED.last_reason, devices.last_reason), \
                   peer = EXCLUDED.peer, keep_alive = EXCLUDED.keep_alive, \
                   listener = EXCLUDED.listener, identity = EXCLUDED.identity, \
                   username = EXCLUDED.username, auth_method = EXCLUDED.auth_method, \
                   protocol = EXCLUDED.protocol, \
                   session_expires_at = EXCLUDED.session_expires_at, \
                   updated_at = EXCLUDED.updated_at \
                 WHERE devices.session_id < EXCLUDED.session_id \
                    OR (devices.session_id = EXCLUDED.session_id AND devices.online \
                        AND NOT EXCLUDED.online)",
            )
            .bind(
                u.iter()
                    .map(|r| r.session.device_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(u.iter().map(|r| r.closed.is_none()).collect::<Vec<_>>())
            .bind(u.iter().map(|r| r.session.session_id).collect::<Vec<_>>())
            .bind(
                u.iter()
                    .map(|r| r.session.node_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(u.iter().map(|r| r.session.connected_at).collect::<Vec<_>>())
            .bind(
                u.iter()
                    .map(|r| r.last_close().map(|c| c.0))
                    .collect::<Vec<_>>(),
            )
            .bind(
                u.iter()
                    .map(|r| r.last_close().map(|c| c.1))
                    .collect::<Vec<_>>(),
            )
            .bind(
                u.iter()
                    .map(|r| r.session.peer.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(u.iter().map(|r| r.session.keep_alive).collect::<Vec<_>>())
            .bind(
                u.iter()
                    .map(|r| r.session.listener.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                u.iter()
                    .map(|r| r.session.identity.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                u.iter()
                    .map(|r| r.session.username.as_deref())
                    .collect::<Vec<_>>(),
            )
            .bind(
                u.iter()
                    .map(|r| r.session.auth_method.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                u.iter()
                    .map(|r| r.session.protocol.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(u.iter().map(|r| r.held_until).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        if !plan.expiries.is_empty() {
            let e = &plan.expiries;
            sqlx::query(
                "UPDATE sessions s SET expired_at = u.at \
                 FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(session_id, at) \
                 WHERE s.session_id = u.session_id AND s.expired_at IS NULL",
            )
            .bind(e.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .bind(e.iter().map(|r| r.at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            // The device holds no session any more, unless it has connected since (then its
            // current session is a newer one, and this expiry is not about it).
            sqlx::query(
                "UPDATE devices d SET session_expires_at = NULL, updated_at = now() \
                 FROM UNNEST($1::text[], $2::uuid[]) AS u(device_id, session_id) \
                 WHERE d.device_id = u.device_id AND d.session_id = u.session_id \
                   AND NOT d.online AND d.session_expires_at IS NOT NULL",
            )
            .bind(e.iter().map(|r| r.device_id.as_str()).collect::<Vec<_>>())
            .bind(e.iter().map(|r| r.session_id).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }

        tx.commit().await?;
        count_folded(&plan);
        Ok(())
    }

    async fn device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE device_id = $1"
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
             WHERE ($1::bool IS NULL OR online = $1) AND ($2::text IS NULL OR device_id > $2) \
             ORDER BY device_id LIMIT $3"
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
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE device_id = $1 \
             ORDER BY session_id DESC LIMIT $2"
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
            .bind(before)
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
            "SELECT {BOOT_COLUMNS} FROM nodes WHERE ($1::text IS NULL OR node_id = $1) \
             ORDER BY started_at DESC, boot_id DESC LIMIT $2"
        ))
        .bind(node_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(boot).collect::<Result<_, _>>()?)
    }

    async fn credential(&self, username: &str) -> Result<Option<CredentialRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {CREDENTIAL_COLUMNS}, password_hash FROM credentials WHERE username = $1"
        ))
        .bind(username)
        .fetch_optional(&self.pool)
        .await?;
        let record = |row: &PgRow| -> Result<CredentialRecord, sqlx::Error> {
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
             VALUES ($1, $2, $3, $4, $5, $6, NULL) \
             ON CONFLICT (username) DO UPDATE SET password_hash = excluded.password_hash, \
             publish = excluded.publish, subscribe = excluded.subscribe, \
             created_at = excluded.created_at, updated_at = excluded.updated_at, revoked_at = NULL \
             WHERE credentials.revoked_at IS NOT NULL",
        )
        .bind(&c.username)
        .bind(&record.password_hash)
        .bind(filters_to_json(c.publish.as_deref()))
        .bind(filters_to_json(c.subscribe.as_deref()))
        .bind(c.created_at)
        .bind(c.updated_at)
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
            "UPDATE credentials SET password_hash = $2, updated_at = $3 \
             WHERE username = $1 AND revoked_at IS NULL",
        )
        .bind(username)
        .bind(password_hash)
        .bind(now)
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
            "UPDATE credentials SET revoked_at = $2, updated_at = $2 \
             WHERE username = $1 AND revoked_at IS NULL",
        )
        .bind(username)
        .bind(now)
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
             WHERE ($1::text IS NULL OR username > $1) ORDER BY username LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(credential).collect::<Result<_, _>>()?)
    }
}
