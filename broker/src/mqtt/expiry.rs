//! Expiry of persistent sessions: a client that connected with clean_session = false and left
//! keeps its subscriptions and queued messages for `mqtt.persistent_session_expiry` (Mosquitto's
//! persistent_client_expiration), then they are discarded, counted and recorded in presence, so
//! that abandoned client ids do not hold memory for ever.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::event::ConnectionEvent;
use crate::metrics::metrics;

/// Expires persistent sessions as their time comes, until `shutdown`.
pub async fn run(broker: Arc<Broker>, shutdown: CancellationToken) {
    loop {
        let next = broker.expiring.next_due();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = broker.expiring.scheduled() => continue,
            _ = async { tokio::time::sleep_until(next.expect("guarded")).await }, if next.is_some() => {}
        }
        while let Some(due) = broker.expiring.pop_due(Instant::now()) {
            let Some((last_connection, dropped)) =
                broker
                    .sessions
                    .expire(&due.session, due.leave, broker.router.limits())
            else {
                continue;
            };
            broker.forget(&due.session, dropped);
            metrics().persistent_sessions.dec();
            metrics().sessions_expired.inc();
            tracing::debug!(
                client_id = &*due.session.client_id,
                session_id = %last_connection,
                "Persistent session expired."
            );
            let event = ConnectionEvent::SessionExpired {
                client_id: due.session.client_id.to_string(),
                session_id: last_connection,
                time: SystemTime::now(),
            };
            broker.send_event(event).await;
        }
    }
}
