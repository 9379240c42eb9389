//! The MQTT 3.1.1 side of the broker: the listener, one task per connection, sessions, topic
//! matching, subscriptions, retained messages and fan-out.
//!
//! Data flows one way: [`listener`] accepts sockets and spawns a [`connection`] task each; the
//! connection decodes packets ([`codec`]), keeps its [`session`] and hands messages to the
//! [`router`]; connection lifecycle events go out on the presence channel.

pub mod budget;
pub mod codec;
pub mod connection;
pub mod expiry;
pub mod listener;
pub mod message;
pub mod retained;
pub mod router;
pub mod session;
pub mod topic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::config::MqttConfig;
use crate::event::{EventSender, SessionId};
use crate::metrics::metrics;
use budget::ByteBudget;
use router::Router;
use session::Session;

pub use listener::{serve, serve_shared};

/// A read-only view of the broker's sessions, for the API: which devices are connected here
/// and when each last sent something.
///
/// It holds only the session table, not the event sender, so that it never keeps the event
/// stream open after the MQTT layer has shut down.
#[derive(Clone)]
pub struct Registry(Arc<SessionTable>);

/// Client id -> session.
type SessionTable = Mutex<HashMap<Arc<str>, Arc<Session>>>;

impl Registry {
    /// A view of `shared`'s sessions.
    pub fn new(shared: &Shared) -> Self {
        Self(Arc::clone(&shared.sessions))
    }

    /// When a device connected to this broker last sent a packet; `None` when it is not
    /// connected here.
    pub fn last_seen(&self, client_id: &str) -> Option<std::time::SystemTime> {
        let session = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(client_id)
            .cloned()?;
        let online = session.state().online;
        online.then(|| session.last_seen())
    }

    /// Connections open on this broker now.
    pub fn connected(&self) -> i64 {
        metrics().connections_current.get()
    }
}

/// The outcome of [`Shared::attach`].
pub enum Attach {
    /// The connection owns the session now.
    Attached(Attached),
    /// Another connection owns it and was asked to close: wait for `released`, then retry.
    Wait,
    /// The session object is no longer registered: fetch the current one and retry.
    Retry,
}

/// A successful attach.
pub struct Attached {
    /// The new connection's id (UUIDv7).
    pub session_id: SessionId,
    /// Broker-wide increasing number of this connection (per client id, in attach order).
    pub seq: u64,
    /// CONNACK's session-present flag.
    pub session_present: bool,
    /// Subscriptions of a discarded previous session, to remove from the router.
    pub dropped_subscriptions: Vec<Box<str>>,
}

/// What every connection task shares.
pub struct Shared {
    /// Listener and protocol settings.
    pub config: MqttConfig,
    /// Subscriptions, retained messages, fan-out.
    pub router: Router,
    /// Client id -> session, for takeover and persistent sessions.
    sessions: Arc<SessionTable>,
    /// Where connection events go.
    pub events: EventSender,
    /// Last connection sequence number handed out (under the registry lock).
    seq: AtomicU64,
    /// Last session key handed out.
    session_key: AtomicU64,
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
    /// writer now waits for the client), for publishers waiting to route a message.
    pub drained: Notify,
    /// Persistent sessions whose client left, in the order their expiry falls due.
    pub expiring: expiry::ExpiryQueue,
}

impl Shared {
    /// Shared state for one listener.
    pub fn new(config: MqttConfig, events: EventSender) -> Self {
        Self {
            router: Router::new(&config),
            read_budget: ByteBudget::new(
                config.max_buffered_read_bytes,
                metrics().buffered_read_bytes.clone(),
            ),
            read_budget_freed: Notify::new(),
            drained: Notify::new(),
            expiring: expiry::ExpiryQueue::default(),
            config,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            events,
            seq: AtomicU64::new(0),
            session_key: AtomicU64::new(0),
            connection_closed: Notify::new(),
            released: Notify::new(),
        }
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session of `client_id`, created empty when there is none.
    pub fn session(&self, client_id: &str) -> Arc<Session> {
        let mut sessions = self.sessions();
        if let Some(s) = sessions.get(client_id) {
            return Arc::clone(s);
        }
        let key = self.session_key.fetch_add(1, Ordering::Relaxed) + 1;
        let client_id: Arc<str> = client_id.into();
        let session = Arc::new(Session::new(Arc::clone(&client_id), key));
        sessions.insert(client_id, Arc::clone(&session));
        session
    }

    /// Makes connection `owner` the owner of `session`.
    ///
    /// While another connection owns it, that one is asked to close (takeover) and
    /// [`Attach::Wait`] says to wait for [`Shared::released`] and call again. When the session
    /// was forgotten meanwhile, [`Attach::Retry`] says to start over with [`Shared::session`].
    /// A clean-session connect discards the previous state.
    pub fn attach(&self, session: &Arc<Session>, clean_session: bool) -> Attach {
        let sessions = self.sessions();
        if !sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            return Attach::Retry;
        }
        let mut st = session.state();
        if st.online {
            tracing::debug!(previous = %st.connection, "Taking over the session.");
            session.kick();
            return Attach::Wait;
        }
        session.reset_signals();
        session.set_online(true);
        let was_persistent = st.persistent;
        let mut dropped = Vec::new();
        let session_present = if clean_session {
            dropped = st.clear(self.router.limits());
            false
        } else {
            was_persistent
        };
        // Both are taken under the registry lock, so that for one client id a later connection
        // always has a higher seq and a later (greater) session id.
        let session_id = SessionId::new();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        st.persistent = !clean_session;
        st.connection = session_id;
        st.online = true;
        drop(st);
        drop(sessions);
        match (was_persistent, !clean_session) {
            (false, true) => metrics().persistent_sessions.inc(),
            (true, false) => metrics().persistent_sessions.dec(),
            _ => {}
        }
        Attach::Attached(Attached {
            session_id,
            seq,
            session_present,
            dropped_subscriptions: dropped,
        })
    }

    /// Asks every connection that owns a session to close with reason broker_shutdown.
    pub fn close_all(&self) {
        for session in self.sessions().values() {
            if session.state().online {
                session.shut_down();
            }
        }
    }

    /// Ends `session_id`'s ownership of `session`. A session that is not persistent is then
    /// forgotten; the returned filters must be removed from the router.
    pub fn detach(&self, session: &Arc<Session>, session_id: SessionId) -> Vec<Box<str>> {
        let mut sessions = self.sessions();
        let mut st = session.state();
        if st.online && st.connection == session_id {
            st.online = false;
        }
        if st.online {
            return Vec::new();
        }
        if st.persistent {
            st.leaves = st.leaves.wrapping_add(1);
            let leave = st.leaves;
            drop(st);
            drop(sessions);
            self.expiring.schedule(
                session,
                leave,
                tokio::time::Instant::now() + self.config.persistent_session_expiry,
            );
            return Vec::new();
        }
        let dropped = st.clear(self.router.limits());
        st.ended = true;
        drop(st);
        if sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.client_id);
        }
        dropped
    }

    /// Forgets `session` if it is still the persistent session its client left for the
    /// `leave`-th time (the client has not come back since). Returns the id of the last
    /// connection that used it, and the filters to remove from the router.
    fn expire(&self, session: &Arc<Session>, leave: u32) -> Option<(SessionId, Vec<Box<str>>)> {
        let mut sessions = self.sessions();
        let mut st = session.state();
        if st.online || !st.persistent || st.ended || st.leaves != leave {
            return None;
        }
        let dropped = st.clear(self.router.limits());
        st.persistent = false;
        st.ended = true;
        let last = st.connection;
        drop(st);
        if sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            sessions.remove(&session.client_id);
        }
        Some((last, dropped))
    }
}
