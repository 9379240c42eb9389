//! Presence: the bridge that persists the connection events of [`crate::event`].
//!
//! The MQTT layer sends exactly one `Connected` and, later, exactly one `Disconnected` per
//! accepted connection, on a bounded channel. A full channel makes connecting and disconnecting
//! clients wait: events are never dropped. The [`bridge::Bridge`] consumes the channel and writes
//! to the store, one store call at a time, buffering in memory and in the [`journal`] while the
//! database is away; the journal's file I/O runs on the blocking pool, never on an async
//! worker. [`retention`] keeps the session history it writes bounded. Presence points down at
//! the store and the event types; nothing below imports it.

pub mod bridge;
pub mod journal;
pub mod retention;
