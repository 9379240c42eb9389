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

use crate::labels::{AuthMethod, DisconnectReason, Listener, TransitionKind};

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
        /// The CONNECT's clean-session flag.
        clean_session: bool,
        /// When the connection was accepted.
        time: SystemTime,
    },
    /// A persistent session (clean_session = false) was discarded after
    /// `mqtt.persistent_session_expiry` without a connection: its subscriptions and queued
    /// messages are gone. Comes after the Disconnected of its last connection.
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
