//! Expiry of persistent sessions: a client that connected with clean_session = false and left
//! keeps its subscriptions and queued messages for `mqtt.persistent_session_expiry` (Mosquitto's
//! persistent_client_expiration), then they are discarded, counted and recorded in presence, so
//! that abandoned client ids do not hold memory for ever.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::Session;
use super::Broker;
use crate::event::ConnectionEvent;
use crate::metrics::metrics;

/// One scheduled expiry: void if the client came back since its `leave`-th leave.
struct Expiring {
    at: Instant,
    session: Arc<Session>,
    leave: u32,
}

/// Persistent sessions whose client left, in the order their expiry falls due (every session
/// gets the same expiry, so the order of leaving is the order of expiring).
#[derive(Default)]
pub struct ExpiryQueue {
    queue: Mutex<VecDeque<Expiring>>,
    /// Signalled when an expiry is scheduled into an empty queue.
    scheduled: Notify,
}

impl ExpiryQueue {
    /// Schedules the expiry of `session` at `at`, for its client's `leave`-th leave.
    pub fn schedule(&self, session: &Arc<Session>, leave: u32, at: Instant) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let was_empty = queue.is_empty();
        queue.push_back(Expiring {
            at,
            session: Arc::clone(session),
            leave,
        });
        drop(queue);
        if was_empty {
            self.scheduled.notify_one();
        }
    }

    /// The earliest scheduled expiry.
    fn next_due(&self) -> Option<Instant> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.front().map(|e| e.at)
    }

    /// Takes the next expiry due at `now`.
    fn pop_due(&self, now: Instant) -> Option<Expiring> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.front().is_some_and(|e| e.at <= now) {
            queue.pop_front()
        } else {
            None
        }
    }
}

/// Expires persistent sessions as their time comes, until `shutdown`.
pub async fn run(broker: Arc<Broker>, shutdown: CancellationToken) {
    loop {
        let next = broker.expiring.next_due();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = broker.expiring.scheduled.notified() => continue,
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
            broker
                .router
                .unsubscribe(due.session.incarnation, dropped.iter().map(|f| &**f));
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
