//! Presence as the broker reports it: a device's current state, the one shape in which
//! `verify` reads both the presence API and the presence database ([`crate::db`]).

/// A device's current state as the broker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    /// Whether the broker holds a session for the device.
    pub online: bool,
    /// Why its last session ended, if one did (`client_disconnect`, `keepalive_timeout`, …).
    pub last_reason: Option<String>,
}
