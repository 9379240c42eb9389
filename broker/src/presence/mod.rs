//! Presence: the connection events the MQTT layer emits, and their consumers.
//!
//! The MQTT layer sends exactly one [`ConnectionEvent::Connected`] and, later, exactly one
//! [`ConnectionEvent::Disconnected`] per accepted connection, on a bounded channel. A full channel
//! makes connecting and disconnecting clients wait: events are never dropped.

mod event;

pub use event::{
    channel, ConnectionEvent, DisconnectReason, EventReceiver, EventSender, SessionId,
};

use crate::metrics::metrics;

/// Consumes events until every sender is gone, logging each transition.
///
/// This is the consumer used until the persistence bridge takes the channel over; it keeps the
/// channel flowing so that the MQTT layer never waits on it.
pub async fn log_events(mut events: EventReceiver) {
    while let Some(event) = events.recv().await {
        match &event {
            ConnectionEvent::Connected {
                client_id,
                session_id,
                seq,
                peer,
                keep_alive,
                clean_session,
                ..
            } => {
                tracing::debug!(%client_id, %session_id, seq, %peer, keep_alive, clean_session, "Device connected.");
            }
            ConnectionEvent::Disconnected {
                client_id,
                session_id,
                seq,
                reason,
                ..
            } => {
                tracing::debug!(%client_id, %session_id, seq, reason = reason.as_str(), "Device disconnected.");
            }
        }
        metrics()
            .connection_events
            .with_label_values(&[event.kind()])
            .inc();
    }
}
