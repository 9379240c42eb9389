//! Presence: the connection events the MQTT layer emits, and the bridge that persists them.
//!
//! The MQTT layer sends exactly one [`ConnectionEvent::Connected`] and, later, exactly one
//! [`ConnectionEvent::Disconnected`] per accepted connection, on a bounded channel. A full channel
//! makes connecting and disconnecting clients wait: events are never dropped. The
//! [`bridge::Bridge`] consumes the channel and writes to the store, buffering in memory and in
//! the [`journal`] while the database is away. [`retention`] keeps the session history it
//! writes bounded.

pub mod bridge;
mod event;
pub mod journal;
pub mod retention;

pub use event::{
    channel, ConnectionEvent, DisconnectReason, EventReceiver, EventSender, SessionId,
};
