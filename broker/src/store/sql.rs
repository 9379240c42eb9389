//! The SQL text both backends share: the column lists of the models, the totals, and the
//! pruning statements. Parameters are written `$N`, which PostgreSQL and SQLite (through sqlx)
//! both bind by number; what differs is only what is bound (SQLite stores timestamps as integer
//! microseconds). Everything else is backend-specific and lives in its backend's file.

use super::model::Stats;
use crate::labels::{AuthMethod, DisconnectReason, Listener, Protocol};

/// Columns of [`Device`](super::Device), in both backends' `devices` table.
pub(super) const DEVICE_COLUMNS: &str = "device_id, online, session_id, node_id, connected_at, \
     disconnected_at, last_reason, peer, listener, identity, username, auth_method, keep_alive, \
     protocol, session_expires_at, updated_at";
/// Columns of [`Session`](super::Session), in both backends' `sessions` table.
pub(super) const SESSION_COLUMNS: &str = "session_id, device_id, node_id, boot_id, seq, \
     connected_at, disconnected_at, reason, peer, listener, identity, username, auth_method, \
     keep_alive, clean_session, coalesced, expired_at, reason_code, reason_string, protocol, \
     session_expires_at";
/// Columns of [`Boot`](super::Boot), in both backends' `nodes` table.
pub(super) const BOOT_COLUMNS: &str = "boot_id, node_id, started_at, heartbeat_at, recovered";
/// Totals for [`Stats`]; the same SQL on both backends.
pub(super) const STATS_TOTALS: &str =
    "SELECT (SELECT count(*) FROM devices WHERE online) AS online, \
     (SELECT count(*) FROM devices) AS known, \
     (SELECT count(*) + coalesce(sum(coalesced), 0) FROM sessions) AS connects";
/// Ended sessions by reason (folded ones included), for [`Stats`].
pub(super) const STATS_REASONS: &str = "SELECT reason, count(*) + sum(coalesced) AS n \
     FROM sessions WHERE reason IS NOT NULL GROUP BY reason";

/// [`Stats`] from the rows of [`STATS_TOTALS`] and [`STATS_REASONS`], on either backend.
pub(super) fn stats_from_rows<R: sqlx::Row>(totals: &R, reasons: &[R]) -> Result<Stats, sqlx::Error>
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

/// The listener of a stored name (`listener` of both tables), on either backend; a name this
/// version does not know (written by a newer one) is a decode error.
pub(super) fn listener(name: &str) -> Result<Listener, sqlx::Error> {
    Listener::from_name(name)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown listener {name:?}").into()))
}

/// The authentication method of a stored name (`auth_method` of both tables), on either
/// backend; a name this version does not know (written by a newer one) is a decode error.
pub(super) fn auth_method(name: &str) -> Result<AuthMethod, sqlx::Error> {
    AuthMethod::from_name(name)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown auth_method {name:?}").into()))
}

/// The protocol level of a stored name (`protocol` of both tables), on either backend; a name
/// this version does not know (written by a newer one) is a decode error.
pub(super) fn protocol(name: &str) -> Result<Protocol, sqlx::Error> {
    Protocol::from_name(name)
        .ok_or_else(|| sqlx::Error::Decode(format!("unknown protocol {name:?}").into()))
}

/// The stored name of broker_restart.
pub(super) const BROKER_RESTART: &str = DisconnectReason::BrokerRestart.as_str();

/// Deletes up to `$2` closed sessions that ended before `$1`, oldest first. The sessions'
/// `disconnected_at` index finds them in that order (SQLite's is partial, on closed sessions,
/// hence the `IS NOT NULL` its planner needs; open sessions, NULL there, never match anyway).
pub(super) const PRUNE_ENDED_BEFORE: &str = "DELETE FROM sessions WHERE session_id IN ( \
       SELECT session_id FROM sessions \
       WHERE disconnected_at IS NOT NULL AND disconnected_at < $1 \
       ORDER BY disconnected_at LIMIT $2)";

/// Deletes up to `$3` of device `$1`'s closed sessions older than its `$2` newest (`$2` at
/// least 1), oldest first. The `sessions_device` index (device_id, session_id DESC) finds the
/// `$2`-th newest, then what is older.
pub(super) const PRUNE_DEVICE: &str = "DELETE FROM sessions WHERE session_id IN ( \
       SELECT session_id FROM sessions \
       WHERE device_id = $1 AND disconnected_at IS NOT NULL AND session_id < ( \
         SELECT session_id FROM sessions WHERE device_id = $1 \
         ORDER BY session_id DESC LIMIT 1 OFFSET $2 - 1) \
       ORDER BY session_id LIMIT $3)";

/// The columns of a [`Credential`] row (the hash is read only where it is needed).
pub(super) const CREDENTIAL_COLUMNS: &str =
    "username, publish, subscribe, created_at, updated_at, revoked_at";

/// A filter list as stored (a JSON array), or NULL.
pub(super) fn filters_to_json(filters: Option<&[String]>) -> Option<String> {
    filters.map(|f| serde_json::Value::from(f.to_vec()).to_string())
}

/// A stored filter list; text that is not a JSON array of strings is a decode error.
pub(super) fn filters_from_json(text: Option<String>) -> Result<Option<Vec<String>>, sqlx::Error> {
    text.map(|t| {
        serde_json::from_str(&t)
            .map_err(|e| sqlx::Error::Decode(format!("credential filters: {e}").into()))
    })
    .transpose()
}
