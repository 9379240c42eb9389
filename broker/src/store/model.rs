//! What the presence store holds, as the API and the presence pipeline read it: a device's
//! current state, its sessions (the history rows), the totals, the node boots, and what crash
//! recovery did. Plain data: the SQL that fills it is in the backends.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::labels::{AuthMethod, Listener, Protocol};

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
    /// The listener (transport) of the current session.
    pub listener: Listener,
    /// The identity of the current session's verified TLS client certificate (mutual TLS);
    /// `None` without one.
    pub identity: Option<String>,
    /// The user name the current session authenticated as; `None` without one, or when no
    /// password was checked.
    pub username: Option<String>,
    /// How the current session was authenticated.
    pub auth_method: AuthMethod,
    /// The current session's keep-alive, seconds.
    pub keep_alive: i32,
    /// The protocol level of the current session: `3.1.1` or `5`.
    pub protocol: Protocol,
    /// While the device is offline: until when the broker holds its persistent session
    /// (subscriptions and queued messages) for it. `None` when no session is held: the device
    /// is online, its last session ended with its connection, or has expired.
    pub session_expires_at: Option<DateTime<Utc>>,
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
    /// The MQTT 5 reason code of the DISCONNECT that ended it: the client's when the client
    /// disconnected, else the one the broker sent; `None` for MQTT 3.1.1 and without one.
    pub reason_code: Option<i32>,
    /// The reason string of the client's MQTT 5 DISCONNECT (control characters escaped, at
    /// most 256 characters).
    pub reason_string: Option<String>,
    /// The peer address.
    pub peer: String,
    /// The listener (transport) it came in on.
    pub listener: Listener,
    /// The identity of its verified TLS client certificate (mutual TLS); `None` without one.
    pub identity: Option<String>,
    /// The user name it authenticated as; `None` without one, or when no password was checked.
    pub username: Option<String>,
    /// How it was authenticated.
    pub auth_method: AuthMethod,
    /// Keep-alive in seconds.
    pub keep_alive: i32,
    /// The CONNECT's clean-session flag (MQTT 5: clean start).
    pub clean_session: bool,
    /// The protocol level: `3.1.1` or `5`.
    pub protocol: Protocol,
    /// Until when the persistent session was to be held after this connection ended (its
    /// expiry as of the disconnect); `None` when it ended with the connection or went on with
    /// a newer one (takeover).
    pub session_expires_at: Option<DateTime<Utc>>,
    /// Further sessions of the device folded into this row: they began and ended within the
    /// same batch as this one, after it, with the same reason, and have no row of their own.
    pub coalesced: i32,
    /// When the persistent session that this connection used last was discarded (expired)
    /// without a connection.
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
    /// Offline devices of the node whose held persistent session ended while the node was
    /// down: it expired, or the broker state did not keep it (`persistence.mode = "off"`).
    /// The session row gets `expired_at`: the earlier of its expiry and this start.
    pub held_sessions_ended: u64,
    /// Offline devices whose persistent session the broker state restored: held again, until
    /// their new expiry.
    pub held_sessions_restored: u64,
}

/// A device credential (a row of the `credentials` table) as the API lists it: never its
/// hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credential {
    /// The user name the device connects with (usually its client id).
    pub username: String,
    /// Topic filters it may publish to; `None`: none listed.
    pub publish: Option<Vec<String>>,
    /// Topic filters it may subscribe to; `None`: none listed.
    pub subscribe: Option<Vec<String>>,
    /// When it was created (or created again after a revocation).
    pub created_at: DateTime<Utc>,
    /// When it last changed (created, rotated, revoked).
    pub updated_at: DateTime<Utc>,
    /// When it was revoked; `None` while it authenticates.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A credential with its password hash: what authentication reads, and what a new one is
/// written from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    /// The row's other columns.
    pub credential: Credential,
    /// The password's argon2id PHC string.
    pub password_hash: String,
}
