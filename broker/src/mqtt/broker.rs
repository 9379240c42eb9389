//! [`Broker`]: what every connection task shares — settings, the router, the session table,
//! the event sender, the broker-wide budgets and the signals connections wait on.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::budget::ByteBudget;
use super::limits::{AddressCounts, Flapping};
use super::message::{unix_ms, Delivery, Message, SubOptions};
use super::router::Router;
use super::session::{self, Cleared, RestoredMessage, Session};
use super::sessions::{Detached, ExpiryQueue, LiveSessions, SessionTable};
use crate::auth::acl::{Acl, AclError, ClientAcl};
use crate::auth::Auth;
use crate::config::MqttConfig;
use crate::event::{ConnectionEvent, EventSender, SessionId};
use crate::labels::{AclDenial, AuthMethod, DisconnectReason};
use crate::metrics::metrics;
use crate::state::{Image, Record, StateStore};

/// What an ACL reload did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AclReload {
    /// Rules in the new file.
    pub rules: usize,
    /// Sessions that lost subscriptions.
    pub sessions: usize,
    /// Subscriptions removed.
    pub revoked: usize,
}

/// What [`Broker::restore`] put back.
#[derive(Debug, Default)]
pub struct Restored {
    /// Persistent sessions.
    pub sessions: usize,
    /// Messages queued for them (in flight included).
    pub messages: usize,
    /// Retained messages.
    pub retained: usize,
    /// Sessions whose expiry passed while the broker was down (ended now).
    pub expired: usize,
    /// Each restored session's client id and when it expires unless its client connects.
    pub held: Vec<(String, SystemTime)>,
}

/// The MQTT side's shared state.
pub struct Broker {
    /// Listener and protocol settings.
    pub config: MqttConfig,
    /// Subscriptions, retained messages, fan-out.
    pub router: Router,
    /// Client id -> session, for takeover and persistent sessions.
    pub sessions: SessionTable,
    /// Where connection events go.
    pub events: EventSender,
    /// Signalled whenever a connection closes, so that an accept loop out of file descriptors
    /// retries at once.
    pub connection_closed: Notify,
    /// Signalled whenever a connection has released its session (after its Disconnected
    /// event). Connections waiting to take a session over wait here and check their session
    /// again: one Notify for all sessions keeps every session smaller.
    pub released: Notify,
    /// `mqtt.max_buffered_read_bytes`: what connections may hold for large packets arriving.
    pub read_budget: ByteBudget,
    /// Signalled whenever read budget is released, for connections waiting for some.
    pub read_budget_freed: Notify,
    /// Signalled whenever a session stops holding publishers back (its queue drained, or its
    /// client went away or fell behind), for publishers waiting to route a message.
    pub drained: Notify,
    /// Persistent sessions whose client left, in the order their expiry falls due.
    pub expiring: ExpiryQueue,
    /// Who may connect: every CONNECT's credentials are checked here.
    pub auth: Arc<Auth>,
    /// What clients may read and write: every connection's rules come from here.
    pub acl: Arc<Acl>,
    /// Connections past authentication and not yet closed (`mqtt.max_connections`).
    pub open_connections: std::sync::atomic::AtomicUsize,
    /// Connections past authentication and not yet closed, per source address
    /// (`mqtt.max_connections_per_address`; empty while it is 0).
    pub addresses: AddressCounts,
    /// Flapping detection and its bans (`mqtt.flapping`), shared with the admin API.
    pub flapping: Arc<Flapping>,
}

impl Broker {
    /// The state of one listener.
    pub fn new(config: MqttConfig, events: EventSender) -> Self {
        let flapping = Arc::new(Flapping::new(&config.flapping));
        Self {
            router: Router::new(&config),
            sessions: SessionTable::new(),
            read_budget: ByteBudget::new(
                config.max_buffered_read_bytes,
                metrics().buffered_read_bytes.clone(),
            ),
            read_budget_freed: Notify::new(),
            drained: Notify::new(),
            expiring: ExpiryQueue::default(),
            config,
            events,
            connection_closed: Notify::new(),
            released: Notify::new(),
            auth: Arc::new(Auth::open()),
            acl: Arc::new(Acl::none()),
            open_connections: std::sync::atomic::AtomicUsize::new(0),
            addresses: AddressCounts::default(),
            flapping,
        }
    }

    /// Keeps retained messages and persistent sessions durable in `store` from now on.
    pub fn set_state(&mut self, store: Arc<dyn StateStore>) {
        self.router.set_store(store);
    }

    /// Rebuilds what the durable state held: retained messages, and persistent sessions
    /// (their subscriptions in the router, their queues, their expiry scheduled from when
    /// their client left, or from now when the broker stopped while it was connected). A
    /// session whose expiry passed while the broker was down ends now. Call before serving.
    pub fn restore(&self, image: Image) -> Restored {
        let mut restored = Restored {
            retained: image.retained.len(),
            ..Restored::default()
        };
        for (_, stored) in image.retained {
            self.router
                .restore_retained(&Arc::new(Message::from_stored(stored)));
        }
        let messages: HashMap<u64, Arc<Message>> = image
            .messages
            .into_iter()
            .map(|(id, (m, _))| (id, Arc::new(Message::from_stored(m))))
            .collect();
        let now = SystemTime::now();
        let now_ms = unix_ms(now);
        let limits = self.router.limits();
        for (key, stored) in image.sessions {
            self.sessions.reserve_keys(key);
            let interval = stored
                .expiry
                .map_or(self.config.persistent_session_expiry, |s| {
                    Duration::from_secs(u64::from(s))
                });
            let left_ms = if stored.left_at_ms == 0 {
                now_ms
            } else {
                stored.left_at_ms
            };
            let ends_ms = left_ms.saturating_add(interval.as_millis() as u64);
            if ends_ms <= now_ms {
                if let Some(store) = self.router.store() {
                    store.append(Record::SessionEnd { key });
                }
                restored.expired += 1;
                continue;
            }
            let session = self.sessions.restore(&stored.client_id, key);
            let queue: Vec<RestoredMessage> = stored
                .queue
                .into_iter()
                .filter_map(|q| {
                    Some(RestoredMessage {
                        message: Arc::clone(messages.get(&q.id)?),
                        delivery: Delivery::from_stored(q.delivery),
                        id: q.id,
                        pkid: q.pkid,
                        released: q.released,
                    })
                })
                .collect();
            restored.messages += queue.len();
            let subscriptions: Vec<(Box<str>, SubOptions)> = stored
                .subscriptions
                .into_iter()
                .map(|(f, o)| (f, SubOptions::from_stored(o)))
                .collect();
            self.router.subscribe_checked(
                &session,
                subscriptions.iter().map(|(f, o)| (&**f, *o, false)),
            );
            session.state().restore(
                session::Restored {
                    subscriptions,
                    queue,
                    incoming_qos2: stored.incoming_qos2,
                    expiry: stored.expiry.map(|s| Duration::from_secs(u64::from(s))),
                },
                limits,
            );
            // Its access rules, made again from who its client logged in as: the messages
            // queued before the client is back obey them.
            if let Some(access) = &stored.access {
                let acl = self.acl.client(
                    &stored.client_id,
                    access.username.as_deref(),
                    &access.publish,
                    &access.subscribe,
                );
                self.apply_acl(&session, acl);
            }
            let left = Duration::from_millis(ends_ms - now_ms);
            self.expiring
                .schedule(&session, 1, tokio::time::Instant::now() + left);
            restored.sessions += 1;
            restored.held.push((stored.client_id.into(), now + left));
        }
        restored
    }

    /// The same, checking credentials with `auth`.
    pub fn with_auth(mut self, auth: Arc<Auth>) -> Self {
        self.auth = auth;
        self
    }

    /// Closes the connection of `client_id`, if one is open, with `reason` (such as `kicked`
    /// or `not_authorized`): its will is published and its Disconnected event carries `reason`.
    /// Whether one was open. Returns at once; the connection closes on its own task.
    pub fn disconnect(&self, client_id: &str, reason: DisconnectReason) -> bool {
        self.sessions.disconnect(client_id, reason)
    }

    /// Closes every connection logged in by `method` as one of `users` (their credentials
    /// were revoked), with reason `not_authorized`. How many were asked to close.
    pub fn disconnect_logins(&self, method: AuthMethod, users: &HashSet<&str>) -> usize {
        self.sessions.disconnect_logins(method, users)
    }

    /// The same, deciding what clients may read and write with `acl`.
    pub fn with_acl(mut self, acl: Arc<Acl>) -> Self {
        self.acl = acl;
        self
    }

    /// A read-only view of the sessions, for the API.
    pub fn live_sessions(&self) -> LiveSessions {
        self.sessions.live()
    }

    /// Ends connection `session_id`'s use of `session`: a persistent session's expiry is
    /// scheduled, a clean session's subscriptions leave the router.
    pub fn detach(&self, session: &Arc<Session>, session_id: SessionId) {
        match self
            .sessions
            .detach(session, session_id, self.router.limits())
        {
            Detached::TakenOver => {}
            Detached::Kept { leave, expiry } => {
                let expiry = expiry.unwrap_or(self.config.persistent_session_expiry);
                self.expiring
                    .schedule(session, leave, tokio::time::Instant::now() + expiry)
            }
            Detached::Forgotten(cleared) => self.forget(session, cleared),
        }
    }

    /// Takes back what a session that ended (or was discarded by a clean start) left: its
    /// subscriptions leave the router, then the messages it had from shared subscriptions and
    /// did not acknowledge go to other members of their groups.
    pub fn forget(&self, session: &Session, cleared: Cleared) {
        self.router.unsubscribe(
            session.incarnation,
            cleared.subscriptions.iter().map(|f| &**f),
        );
        for (group, message, qos) in cleared.orphans {
            self.router.redeliver(&group, message, qos);
        }
    }

    /// Gives `session` the client rules `acl` and makes its subscriptions obey them: those
    /// it may no longer read anything of are removed (and counted), the others are checked
    /// on delivery or not as the rules say. Returns how many were removed.
    pub fn apply_acl(&self, session: &Arc<Session>, acl: Option<Arc<ClientAcl>>) -> usize {
        let changes = session.state().apply_acl(acl);
        // The session lock is never held while taking the router's.
        if !changes.kept.is_empty() {
            self.router
                .subscribe_checked(session, changes.kept.iter().map(|(f, q, c)| (&**f, *q, *c)));
        }
        if !changes.revoked.is_empty() {
            metrics()
                .acl_denied
                .inc_by(AclDenial::Revoked, changes.revoked.len() as u64);
            self.router
                .unsubscribe(session.incarnation, changes.revoked.iter().map(|f| &**f));
        }
        changes.revoked.len()
    }

    /// Reads `auth.acl_file` again (blocking: call it off the async runtime) and applies it
    /// to every session: subscriptions no longer readable at all are removed, nothing else is
    /// dropped. `Ok(None)` without an ACL file.
    pub fn reload_acl(&self) -> Result<Option<AclReload>, AclError> {
        let Some(rules) = self.acl.reload()? else {
            return Ok(None);
        };
        let file = self.acl.file();
        let mut reload = AclReload {
            rules,
            ..AclReload::default()
        };
        for session in self.sessions.all() {
            let current = session.state().acl.clone();
            let Some(current) = current else { continue };
            let renewed = current.renewed(file.clone(), &session.client_id);
            let revoked = self.apply_acl(&session, renewed);
            if revoked > 0 {
                reload.sessions += 1;
                reload.revoked += revoked;
            }
        }
        Ok(Some(reload))
    }

    /// Sends a connection event; waits while the channel is full (events are never dropped).
    pub async fn send_event(&self, event: ConnectionEvent) {
        // The receiver only goes away when the broker is being torn down; nothing is left to
        // deliver the event to then, and that is logged loudly.
        if let Err(error) = self.events.send(event).await {
            tracing::error!(event = ?error.0, "Presence pipeline is gone; connection event not delivered.");
        }
    }
}
