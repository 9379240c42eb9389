//! The session table: client id -> [`Session`], and the rules of who uses a session when —
//! attach (with takeover), detach, expiry (scheduled in the [`ExpiryQueue`], carried out by
//! [`super::expiry`]) — plus [`LiveSessions`], the read-only view the API gets.

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::session::{Cleared, QueueLimits, Session};
use crate::event::SessionId;
use crate::labels::{AuthMethod, DisconnectReason};
use crate::metrics::metrics;
use crate::state::Ticket;

/// Client id -> session.
type Map = Mutex<HashMap<Arc<str>, Arc<Session>>>;

/// Every session the broker holds: connected ones, and persistent ones whose client is away.
pub struct SessionTable {
    map: Arc<Map>,
    /// Last connection sequence number handed out (under the table lock).
    seq: AtomicU64,
    /// Last [`Session::incarnation`] handed out.
    incarnations: AtomicU64,
}

/// The outcome of [`SessionTable::attach`].
pub enum Attach {
    /// The connection uses the session now.
    Attached(Attached),
    /// Another connection uses it and was asked to close (takeover): wait until a connection
    /// releases its session, then try again.
    Wait,
    /// The session is no longer in the table: look it up again and retry.
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
    /// What a discarded previous session left: subscriptions to remove from the router, and
    /// shared subscriptions' messages for other members.
    pub dropped: Cleared,
    /// The ticket of what the attach changed in the durable state (a stored session
    /// discarded): the CONNACK waits for it.
    pub ticket: Option<Ticket>,
}

/// The outcome of [`SessionTable::detach`].
pub enum Detached {
    /// A newer connection uses the session already (it took it over).
    TakenOver,
    /// A persistent session whose client is away now, for the `leave`-th time: it expires
    /// after `expiry` unless the client comes back in time.
    Kept {
        /// How often its client has left, the stamp of this leave.
        leave: u32,
        /// Its MQTT 5 session expiry interval (`None`: `mqtt.persistent_session_expiry`).
        expiry: Option<std::time::Duration>,
    },
    /// A clean session, ended and forgotten: its subscriptions must leave the router, and its
    /// shared subscriptions' messages go to other members.
    Forgotten(Cleared),
}

impl Default for SessionTable {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            map: Arc::new(Mutex::new(HashMap::new())),
            seq: AtomicU64::new(0),
            incarnations: AtomicU64::new(0),
        }
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session of `client_id`, created empty when there is none.
    pub fn get_or_create(&self, client_id: &str) -> Arc<Session> {
        let mut map = self.map();
        if let Some(s) = map.get(client_id) {
            return Arc::clone(s);
        }
        let incarnation = self.incarnations.fetch_add(1, Ordering::Relaxed) + 1;
        let client_id: Arc<str> = client_id.into();
        let session = Arc::new(Session::new(Arc::clone(&client_id), incarnation));
        map.insert(client_id, Arc::clone(&session));
        session
    }

    /// Puts back a persistent session of `client_id` read from the durable state, under its
    /// stored `key` (later sessions get greater ones).
    pub fn restore(&self, client_id: &str, key: u64) -> Arc<Session> {
        self.incarnations.fetch_max(key, Ordering::Relaxed);
        let client_id: Arc<str> = client_id.into();
        let session = Arc::new(Session::new(Arc::clone(&client_id), key));
        self.map().insert(client_id, Arc::clone(&session));
        session
    }

    /// Makes sure no session created from now on gets a key up to `key` (one the durable state
    /// used already).
    pub fn reserve_keys(&self, key: u64) {
        self.incarnations.fetch_max(key, Ordering::Relaxed);
    }

    /// Makes a new connection the user of `session`.
    ///
    /// While another connection uses it, that one is asked to close (takeover) and
    /// [`Attach::Wait`] says to wait and call again. When the session left the table meanwhile,
    /// [`Attach::Retry`] says to start over with [`SessionTable::get_or_create`]. A clean
    /// start discards the previous state (its queue's bytes go back to `limits`); a
    /// `persistent` session outlives the connection (by the MQTT 5 session expiry interval
    /// `expiry`, or for 3.1.1 by `mqtt.persistent_session_expiry`).
    pub fn attach(
        &self,
        session: &Arc<Session>,
        clean_start: bool,
        (persistent, expiry): (bool, Option<std::time::Duration>),
        limits: &QueueLimits,
    ) -> Attach {
        let map = self.map();
        if !map
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
        let mut dropped = Cleared::default();
        let session_present = if clean_start {
            dropped = st.clear(limits);
            false
        } else {
            was_persistent
        };
        // Both are taken under the table lock, so that for one client id a later connection
        // always has a higher seq and a later (greater) session id.
        let session_id = SessionId::new();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        st.set_expiry(persistent, expiry, limits);
        // The session's own record follows once the connection's access rules are known
        // (the handshake records it).
        let ticket = dropped.ticket;
        st.connection = session_id;
        st.online = true;
        drop(st);
        drop(map);
        Attach::Attached(Attached {
            session_id,
            seq,
            session_present,
            dropped,
            ticket,
        })
    }

    /// Ends connection `session_id`'s use of `session`. A clean session is then forgotten.
    pub fn detach(
        &self,
        session: &Arc<Session>,
        session_id: SessionId,
        limits: &QueueLimits,
    ) -> Detached {
        let mut map = self.map();
        let mut st = session.state();
        if st.online && st.connection == session_id {
            st.online = false;
        }
        if st.online {
            return Detached::TakenOver;
        }
        if st.persistent {
            st.leaves = st.leaves.wrapping_add(1);
            st.journal_left(limits);
            return Detached::Kept {
                leave: st.leaves,
                expiry: st.expiry(),
            };
        }
        let dropped = st.clear(limits);
        st.ended = true;
        drop(st);
        Self::remove(&mut map, session);
        Detached::Forgotten(dropped)
    }

    /// Forgets `session` if it is still the persistent session its client left for the
    /// `leave`-th time (the client has not come back since). Returns the id of the last
    /// connection that used it, and what the router must take back.
    pub fn expire(
        &self,
        session: &Arc<Session>,
        leave: u32,
        limits: &QueueLimits,
    ) -> Option<(SessionId, Cleared)> {
        let mut map = self.map();
        let mut st = session.state();
        if st.online || !st.persistent || st.ended || st.leaves != leave {
            return None;
        }
        let dropped = st.clear(limits);
        st.persistent = false;
        st.ended = true;
        let last = st.connection;
        drop(st);
        Self::remove(&mut map, session);
        Some((last, dropped))
    }

    /// Removes `session` from the table if it is still the one registered for its client id.
    fn remove(map: &mut HashMap<Arc<str>, Arc<Session>>, session: &Arc<Session>) {
        if map
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            map.remove(&session.client_id);
        }
    }

    /// Asks every connection that uses a session to close with reason broker_shutdown.
    pub fn close_all(&self) {
        for session in self.map().values() {
            if session.state().online {
                session.shut_down();
            }
        }
    }

    /// Asks the connection using `client_id`'s session, if one does, to close with `reason`;
    /// whether one does. It closes as every connection does (will, Disconnected event with
    /// `reason`, session kept or forgotten).
    pub fn disconnect(&self, client_id: &str, reason: DisconnectReason) -> bool {
        disconnect(&self.map, client_id, reason)
    }

    /// Closes every connection logged in by `method` as one of `users`, with reason
    /// `not_authorized`; how many were asked to close.
    pub fn disconnect_logins(&self, method: AuthMethod, users: &HashSet<&str>) -> usize {
        disconnect_logins(&self.map, method, users)
    }

    /// Every session held now (connected or not), for a pass over all of them.
    pub fn all(&self) -> Vec<Arc<Session>> {
        snapshot(&self.map)
    }

    /// A read-only view for the API.
    pub fn live(&self) -> LiveSessions {
        LiveSessions(Arc::clone(&self.map))
    }
}

/// The sessions of `map` now; the table lock is held only to copy them out.
fn snapshot(map: &Map) -> Vec<Arc<Session>> {
    let map = map.lock().unwrap_or_else(|e| e.into_inner());
    map.values().cloned().collect()
}

/// Asks the connections in `map` logged in by `method` as one of `users` to close with reason
/// `not_authorized` (their credentials were revoked).
fn disconnect_logins(map: &Map, method: AuthMethod, users: &HashSet<&str>) -> usize {
    if users.is_empty() {
        return 0;
    }
    let mut closed = 0;
    for session in snapshot(map) {
        let revoked = {
            let st = session.state();
            st.online
                && st
                    .login
                    .as_ref()
                    .is_some_and(|l| l.method == method && users.contains(&*l.username))
        };
        if revoked && disconnect(map, &session.client_id, DisconnectReason::NotAuthorized) {
            closed += 1;
        }
    }
    closed
}

/// Asks the connection using `client_id`'s session in `map` to close with `reason`.
fn disconnect(map: &Map, client_id: &str, reason: DisconnectReason) -> bool {
    let Some(session) = map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(client_id)
        .cloned()
    else {
        return false;
    };
    // Under the state lock, as attach is: the signal reaches the connection online now, never
    // a later one (attach clears signals meant for an earlier owner).
    let st = session.state();
    if !st.online {
        return false;
    }
    session.close_with(reason);
    true
}

/// A view of the broker's sessions, for the API: which devices are connected here and when
/// each last sent something, and the admin's way to close a connection
/// ([`LiveSessions::disconnect`]).
///
/// It holds only the table, not the event sender, so that it never keeps the event stream open
/// after the MQTT layer has shut down.
#[derive(Clone)]
pub struct LiveSessions(Arc<Map>);

impl LiveSessions {
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

    /// Asks the connection of `client_id` on this broker, if there is one, to close with
    /// `reason` (as [`SessionTable::disconnect`]); whether there is one.
    pub fn disconnect(&self, client_id: &str, reason: DisconnectReason) -> bool {
        disconnect(&self.0, client_id, reason)
    }

    /// Closes the connections logged in by `method` as one of `users` (`not_authorized`).
    pub fn disconnect_logins(&self, method: AuthMethod, users: &HashSet<&str>) -> usize {
        disconnect_logins(&self.0, method, users)
    }

    /// Connections open on this broker now.
    pub fn connected(&self) -> i64 {
        metrics().connections_current.get()
    }
}

/// One scheduled expiry: void if the client came back since its `leave`-th leave.
pub struct Expiring {
    /// When it falls due.
    pub at: Instant,
    /// The session.
    pub session: Arc<Session>,
    /// The leave it was scheduled for.
    pub leave: u32,
}

impl PartialEq for Expiring {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Expiring {}

impl PartialOrd for Expiring {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Expiring {
    /// Reversed: the earliest expiry is the greatest, on top of the heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

/// Persistent sessions whose client left, earliest expiry first (each session has its own
/// expiry interval: `mqtt.persistent_session_expiry` for 3.1.1, the client's session expiry
/// interval for MQTT 5).
#[derive(Default)]
pub struct ExpiryQueue {
    queue: Mutex<BinaryHeap<Expiring>>,
    /// Signalled when an expiry is scheduled ahead of every other.
    scheduled: Notify,
}

impl ExpiryQueue {
    /// Schedules the expiry of `session` at `at`, for its client's `leave`-th leave.
    pub fn schedule(&self, session: &Arc<Session>, leave: u32, at: Instant) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let first = queue.peek().is_none_or(|e| at < e.at);
        queue.push(Expiring {
            at,
            session: Arc::clone(session),
            leave,
        });
        drop(queue);
        if first {
            self.scheduled.notify_one();
        }
    }

    /// Signalled when an expiry is scheduled ahead of every other.
    pub fn scheduled(&self) -> tokio::sync::futures::Notified<'_> {
        self.scheduled.notified()
    }

    /// The earliest scheduled expiry.
    pub fn next_due(&self) -> Option<Instant> {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.peek().map(|e| e.at)
    }

    /// Takes the next expiry due at `now`.
    pub fn pop_due(&self, now: Instant) -> Option<Expiring> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.peek().is_some_and(|e| e.at <= now) {
            queue.pop()
        } else {
            None
        }
    }
}
