//! Presence: the bridge that persists the connection events of [`crate::event`].
//!
//! The MQTT layer sends exactly one `Connected` and, later, exactly one `Disconnected` per
//! accepted connection, on a bounded channel. A full channel makes connecting and disconnecting
//! clients wait: events are never dropped. The [`bridge::Bridge`] consumes the channel and writes
//! to the store, buffering in memory and in the [`journal`] while the database is away.
//! [`retention`] keeps the session history it writes bounded.

pub mod bridge;
pub mod journal;
pub mod retention;
