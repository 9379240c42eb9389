//! Connection events: what the MQTT layer tells the presence pipeline, and the record the
//! pipeline stores (the event with the broker boot that emitted it). Imports nothing of the
//! broker but its label sets, so that the MQTT layer, the presence pipeline and the store all
//! point down at it.

use std::fmt;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::labels::{AuthMethod, DisconnectReason, Listener, Protocol, TransitionKind};

/// Most characters of a client's DISCONNECT reason string kept in a [`ConnectionEvent::Disconnected`].
pub const MAX_REASON_STRING_CHARS: usize = 256;

/// Unique, time-sortable identifier of one accepted connection (UUIDv7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub uuid::Uuid);

impl SessionId {
    /// A new identifier; later calls sort after earlier ones.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One connection lifecycle event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ConnectionEvent {
    /// A CONNECT was accepted (CONNACK 0 is being sent).
    Connected {
        /// The device's MQTT client id (generated when the client sent an empty one).
        client_id: String,
        /// This connection's unique id.
        session_id: SessionId,
        /// Broker-wide increasing number of this connection; higher means accepted later.
        seq: u64,
        /// The client's address (from the PROXY protocol header or a trusted proxy's
        /// X-Forwarded-For where the listener is configured for them).
        peer: SocketAddr,
        /// The listener the connection came in on (TCP in journals written before there were
        /// other listeners).
        #[serde(default)]
        listener: Listener,
        /// The identity of the client's verified TLS certificate (mutual TLS), if any.
        identity: Option<String>,
        /// The user name it authenticated as (`None` without one, or when no password was
        /// checked).
        #[serde(default)]
        username: Option<String>,
        /// How it was authenticated (anonymous in journals written before there was
        /// authentication).
        #[serde(default)]
        auth_method: AuthMethod,
        /// The keep-alive in force, in seconds (after clamping); 0 means none.
        keep_alive: u16,
        /// The CONNECT's clean-session flag (MQTT 5: clean start).
        clean_session: bool,
        /// The protocol level the client speaks (3.1.1 in journals written before it was
        /// recorded).
        #[serde(default)]
        protocol: Protocol,
        /// When the connection was accepted.
        time: SystemTime,
    },
    /// A persistent session (3.1.1: clean_session = false, held for
    /// `mqtt.persistent_session_expiry`; MQTT 5: a session expiry interval, capped by
    /// `mqtt.max_session_expiry`) was discarded without a connection: its subscriptions and
    /// queued messages are gone. Comes after the Disconnected of its last connection.
    SessionExpired {
        /// The device's MQTT client id.
        client_id: String,
        /// The last connection that used the session.
        session_id: SessionId,
        /// When it was discarded.
        time: SystemTime,
    },
    /// A connection that was announced by `Connected` ended.
    Disconnected {
        /// The device's MQTT client id.
        client_id: String,
        /// The id of the connection that ended.
        session_id: SessionId,
        /// The `seq` of the connection that ended.
        seq: u64,
        /// Why it ended.
        reason: DisconnectReason,
        /// The MQTT 5 reason code of the DISCONNECT that ended it: the client's when the
        /// client disconnected (0x00 normal, 0x04 with will, ...), else the one the broker sent
        /// the client (0x8E takeover, 0x8D keep-alive timeout, ...); `None` for MQTT 3.1.1, for
        /// a connection that ended without a DISCONNECT either way, and in older journals.
        #[serde(default)]
        reason_code: Option<u8>,
        /// The reason string of the client's MQTT 5 DISCONNECT, if it sent one: control
        /// characters escaped, at most [`MAX_REASON_STRING_CHARS`] characters (see
        /// [`reason_string()`]).
        #[serde(default)]
        reason_string: Option<String>,
        /// Until when the broker holds the client's persistent session after this connection
        /// (its subscriptions and queued messages), unless the client connects again; `None`
        /// when the session ended with the connection, for a takeover (the session goes on
        /// with the new connection), for a broker shutdown without persistence, and in
        /// older journals.
        #[serde(default)]
        session_expires_at: Option<SystemTime>,
        /// When it ended.
        time: SystemTime,
    },
}

impl ConnectionEvent {
    /// What happened.
    pub fn kind(&self) -> TransitionKind {
        match self {
            Self::Connected { .. } => TransitionKind::Connected,
            Self::Disconnected { .. } => TransitionKind::Disconnected,
            Self::SessionExpired { .. } => TransitionKind::SessionExpired,
        }
    }

    /// The client id the event is about.
    pub fn client_id(&self) -> &str {
        match self {
            Self::Connected { client_id, .. }
            | Self::Disconnected { client_id, .. }
            | Self::SessionExpired { client_id, .. } => client_id,
        }
    }

    /// The connection the event is about.
    pub fn session_id(&self) -> SessionId {
        match self {
            Self::Connected { session_id, .. }
            | Self::Disconnected { session_id, .. }
            | Self::SessionExpired { session_id, .. } => *session_id,
        }
    }

    /// When it happened.
    pub fn time(&self) -> SystemTime {
        match self {
            Self::Connected { time, .. }
            | Self::Disconnected { time, .. }
            | Self::SessionExpired { time, .. } => *time,
        }
    }
}

/// A client's reason string as a [`ConnectionEvent::Disconnected`] keeps it: control
/// characters escaped (`\n`, `\u{1b}`), cut to [`MAX_REASON_STRING_CHARS`] characters.
pub fn reason_string(text: &str) -> String {
    let mut kept = String::new();
    for c in text.chars() {
        if c.is_control() {
            kept.extend(c.escape_default());
        } else {
            kept.push(c);
        }
    }
    kept.chars().take(MAX_REASON_STRING_CHARS).collect()
}

/// The sending half, held by the MQTT layer.
pub type EventSender = mpsc::Sender<ConnectionEvent>;
/// The receiving half, held by the presence pipeline.
pub type EventReceiver = mpsc::Receiver<ConnectionEvent>;

/// A bounded event channel.
pub fn channel(capacity: usize) -> (EventSender, EventReceiver) {
    mpsc::channel(capacity)
}

/// A connection event together with the broker boot that emitted it: what the presence
/// pipeline journals and stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// The broker node's configured id.
    pub node_id: String,
    /// The boot (process start) of that node.
    pub boot_id: Uuid,
    /// What happened.
    pub event: ConnectionEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_strings_are_escaped_and_bounded() {
        assert_eq!(reason_string("bye"), "bye");
        assert_eq!(reason_string("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J");
        assert_eq!(reason_string(&"é".repeat(1000)).chars().count(), 256);
    }

    #[test]
    fn events_of_older_journals_still_read() {
        let old = r#"{"event":"disconnected","client_id":"a","session_id":"0190a0a0-0000-7000-8000-000000000000","seq":1,"reason":"client_disconnect","time":{"secs_since_epoch":1,"nanos_since_epoch":0}}"#;
        let event: ConnectionEvent = serde_json::from_str(old).expect("old Disconnected");
        assert!(matches!(
            event,
            ConnectionEvent::Disconnected {
                reason_code: None,
                reason_string: None,
                session_expires_at: None,
                ..
            }
        ));
    }
}
