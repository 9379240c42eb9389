//! Sessions: the state the broker keeps per client id, across connections when
//! clean_session = false (subscriptions, queued and in-flight messages, QoS 2 receipts).
//!
//! A [`Session`] is shared between the connection that currently owns it, the router (which
//! enqueues messages for it) and the registry. Locking rule: a session's state lock is never held
//! while taking the router's subscription lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use atomic_waker::AtomicWaker;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;

use super::budget::ByteBudget;
use super::codec::encode::{self, OutPublish};
use super::message::{Delivery, Message, MinQos, SubOptions};
use super::packet::Protocol;
use super::retained::Cursor;
use crate::auth::acl::{Access, ClientAcl, Subscription};
use crate::event::SessionId;
use crate::labels::{AuthMethod, DisconnectReason, DropReason, Label, PacketType};
use crate::metrics::metrics;
use crate::state::{Record, StateStore, StoredAccess, Ticket};

/// The bounds of every session's queue: per session in messages and bytes, and one byte budget
/// for all sessions together.
#[derive(Debug)]
pub struct QueueLimits {
    /// `mqtt.max_queued_messages`.
    pub max_messages: usize,
    /// `mqtt.max_queued_bytes`.
    pub max_bytes: usize,
    /// `mqtt.max_queued_bytes_total`, shared by all sessions.
    pub total: ByteBudget,
    /// Where persistent sessions' changes are made durable (`None`: `persistence.mode =
    /// "off"`, everything in memory).
    pub store: Option<Arc<dyn StateStore>>,
}

impl std::fmt::Debug for dyn StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateStore")
    }
}

/// One message waiting for a client.
#[derive(Debug, Clone)]
struct Outgoing {
    message: Arc<Message>,
    /// min(publish QoS, subscription QoS).
    qos: QoS,
    /// The retain flag it is sent with.
    retain: bool,
    /// A retained message sent in answer to a SUBSCRIBE: it comes from the retained store,
    /// not the queue, and is not accounted in the queue's bytes.
    stored: bool,
    /// The identifiers of the subscriptions it matched (MQTT 5).
    ids: Option<Box<[u32]>>,
    /// The shared subscription it came through ([`Delivery::shared`]).
    shared: Option<Arc<str>>,
    /// Its id in the durable state, 0 when it is not stored.
    id: u64,
}

impl Outgoing {
    /// Bytes it holds of the session's queue budget.
    fn cost(&self) -> usize {
        if self.stored {
            0
        } else {
            self.message.size()
        }
    }
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Inflight {
    pkid: u16,
    out: Outgoing,
    stage: Stage,
}

/// Mutable session state, behind [`Session::state`].
#[derive(Debug, Default)]
pub struct SessionState {
    /// clean_session = false: the state outlives the connection.
    pub persistent: bool,
    /// The connection using the session now (`online`), or the last one that did.
    pub connection: SessionId,
    /// Whether `connection` is using the session now.
    pub online: bool,
    /// How often a connection of this persistent session has left: an expiry scheduled at one
    /// leave is void if the client came back (and maybe left again) since.
    pub leaves: u32,
    /// The session's key in the durable state ([`Session::incarnation`]).
    key: u64,

    /// Topic filters and their options (also held by the router, which matches them).
    subscriptions: HashMap<Box<str>, SubOptions>,
    /// Messages not yet sent (beyond the in-flight window, or written out soon).
    pending: VecDeque<Outgoing>,
    /// QoS 1/2 messages sent and not yet acknowledged, oldest first.
    inflight: VecDeque<Inflight>,
    /// Retained deliveries in progress and QoS 2 receipts, allocated only while there are some
    /// (8 bytes in every session instead of 56).
    extras: Option<Box<Extras>>,
    /// Bytes of `pending` and `inflight` held against [`QueueLimits`].
    queued_bytes: usize,
    /// Last packet id used for an outgoing message.
    last_pkid: u16,
    /// Messages have been dropped since the queue was last empty (logged once per episode).
    overflowing: bool,
    /// The session was forgotten (its clean-session connection ended): the router may still
    /// hold it for a moment, but nothing is queued any more.
    pub ended: bool,
    /// What its client may read and write (`None`: no ACL restricts it). Set by the
    /// connection that attaches the session, replaced when the ACL file is reloaded.
    pub acl: Option<Arc<ClientAcl>>,
    /// Who its client logged in as, when a password or database credential was checked: a
    /// credential revoked while it is connected (a password file reloaded without it, a
    /// database credential revoked or rotated) closes the connection (`not_authorized`).
    pub login: Option<Box<Login>>,
    /// What the client of the connection using the session (or that last did) accepts: kept
    /// here (12 bytes, in what would be padding) rather than in the extras, so that an MQTT 5
    /// session allocates nothing more than a 3.1.1 one.
    peer: Peer,
}

/// What a client accepts of the PUBLISHes sent to it: set from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its protocol level.
    pub protocol: Protocol,
    /// MQTT 5 receive maximum: most QoS 1/2 PUBLISHes it takes unacknowledged.
    pub receive_maximum: u16,
    /// MQTT 5 maximum packet size, 0 for none: larger messages are dropped for it.
    pub maximum_packet_size: u32,
    /// MQTT 5 topic alias maximum: most topic aliases the broker may set for it.
    pub topic_alias_maximum: u16,
}

impl Default for Peer {
    fn default() -> Self {
        Self {
            protocol: Protocol::V311,
            receive_maximum: u16::MAX,
            maximum_packet_size: 0,
            topic_alias_maximum: 0,
        }
    }
}

/// A verified login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// The user name.
    pub username: Box<str>,
    /// What verified it: [`AuthMethod::Password`] or [`AuthMethod::Database`].
    pub method: AuthMethod,
}

/// The parts of a session that most sessions do not use at a given moment.
#[derive(Debug, Default)]
struct Extras {
    /// Subscriptions whose retained messages are still being sent, oldest first. Each is a
    /// subscription of the session, at most one per filter.
    retained: VecDeque<Cursor>,
    /// Packet ids of QoS 2 messages received and not yet released (PUBREL).
    incoming_qos2: Vec<u16>,
    /// The MQTT 5 session expiry interval (`None`: a 3.1.1 session, which outlives its
    /// connection by `mqtt.persistent_session_expiry` when persistent).
    expiry: Option<std::time::Duration>,
    /// The topic aliases the broker set for the connection's client (index alias - 1).
    aliases: Vec<Box<str>>,
    /// Bytes of topic names in `aliases`.
    alias_bytes: usize,
    /// The alias last reassigned once all were taken.
    next_alias: usize,
}

impl Extras {
    fn is_empty(&self) -> bool {
        self.retained.is_empty()
            && self.incoming_qos2.is_empty()
            && self.expiry.is_none()
            && self.aliases.is_empty()
    }
}

/// What [`SessionState::apply_acl`] changed: subscriptions to take out of the router, and
/// the ones kept with whether each is checked on delivery.
#[derive(Debug, Default)]
pub struct AclChanges {
    /// Filters no longer readable at all.
    pub revoked: Vec<Box<str>>,
    /// Filters kept: filter, options, checked.
    pub kept: Vec<(Box<str>, SubOptions, bool)>,
}

/// What [`SessionState::clear`] leaves for the router.
#[derive(Debug, Default)]
pub struct Cleared {
    /// The subscriptions to remove.
    pub subscriptions: Vec<Box<str>>,
    /// Messages that came through a shared subscription (its filter) and that the client has
    /// not acknowledged, with their QoS: they go to another member of the group.
    pub orphans: Vec<(Arc<str>, Arc<Message>, QoS)>,
    /// When the session was persistent: the ticket of its end in the durable state.
    pub ticket: Option<Ticket>,
}

/// A persistent session as the durable state gave it back ([`SessionState::restore`]).
#[derive(Debug, Default)]
pub struct Restored {
    /// Its subscriptions.
    pub subscriptions: Vec<(Box<str>, SubOptions)>,
    /// Its messages, oldest first.
    pub queue: Vec<RestoredMessage>,
    /// QoS 2 packet ids received and not released.
    pub incoming_qos2: Vec<u16>,
    /// Its MQTT 5 session expiry interval (`None`: 3.1.1).
    pub expiry: Option<std::time::Duration>,
}

/// A message of a restored session's queue.
#[derive(Debug)]
pub struct RestoredMessage {
    /// The message.
    pub message: Arc<Message>,
    /// How it goes to the session.
    pub delivery: Delivery,
    /// Its id in the durable state.
    pub id: u64,
    /// The packet id it was sent with; 0 when not sent.
    pub pkid: u16,
    /// QoS 2: PUBREC received, only PUBREL goes again.
    pub released: bool,
}

/// What [`SessionState::write_pending`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// The queue is empty.
    Empty,
    /// QoS 1/2 messages wait for the client to acknowledge earlier ones (in-flight window full).
    Blocked,
    /// The buffer reached its limit with messages ready to follow.
    More,
}

impl SessionState {
    /// Forgets everything but the owner (a clean-session connect, or a session that ends) and
    /// gives its queue's bytes back. Returns the subscriptions the router must drop, and the
    /// messages that came through shared subscriptions and were not acknowledged (for other
    /// members of their groups).
    pub fn clear(&mut self, limits: &QueueLimits) -> Cleared {
        let ticket = self.journal(limits, |key| Record::SessionEnd { key });
        metrics().messages_queued.sub(self.pending.len() as i64);
        limits.total.release(self.queued_bytes);
        self.queued_bytes = 0;
        let inflight = std::mem::take(&mut self.inflight)
            .into_iter()
            .filter(|f| f.stage == Stage::Published)
            .map(|f| f.out);
        let orphans = std::mem::take(&mut self.pending)
            .into_iter()
            .chain(inflight)
            .filter_map(|out| Some((out.shared?, out.message, out.qos)))
            .collect();
        self.extras = None;
        self.last_pkid = 0;
        Cleared {
            subscriptions: std::mem::take(&mut self.subscriptions)
                .into_keys()
                .collect(),
            orphans,
            ticket,
        }
    }

    /// Fills a new session with what the durable state held for it: it is persistent, its
    /// client away. Nothing is recorded again (it is stored already).
    pub fn restore(&mut self, restored: Restored, limits: &QueueLimits) {
        if !self.persistent {
            metrics().persistent_sessions.inc();
        }
        self.persistent = true;
        self.online = false;
        self.leaves = 1;
        self.subscriptions.extend(restored.subscriptions);
        for q in restored.queue {
            let cost = q.message.size();
            limits.total.force_reserve(cost);
            self.queued_bytes += cost;
            let out = Outgoing {
                message: q.message,
                qos: q.delivery.qos,
                retain: q.delivery.retain,
                stored: false,
                ids: q.delivery.ids,
                shared: q.delivery.shared,
                id: q.id,
            };
            if q.pkid == 0 || out.qos == QoS::AtMostOnce {
                self.pending.push_back(out);
                metrics().messages_queued.inc();
            } else {
                self.last_pkid = self.last_pkid.max(q.pkid);
                self.inflight.push_back(Inflight {
                    pkid: q.pkid,
                    out,
                    stage: if q.released {
                        Stage::Released
                    } else {
                        Stage::Published
                    },
                });
            }
        }
        if restored.expiry.is_some() || !restored.incoming_qos2.is_empty() {
            let extras = self.extras.get_or_insert_with(Box::default);
            extras.expiry = restored.expiry;
            extras.incoming_qos2 = restored.incoming_qos2;
        }
    }

    /// Applies the client's rules `acl` to the subscriptions held: those of which nothing
    /// may be read any more are forgotten; the others come back with whether their messages
    /// must be checked. The router must be told both (after the session lock is released).
    pub fn apply_acl(&mut self, acl: Option<Arc<ClientAcl>>) -> AclChanges {
        let mut changes = AclChanges::default();
        if let Some(rules) = &acl {
            self.subscriptions.retain(|filter, options| {
                match rules.subscription(super::router::unshared(filter)) {
                    Subscription::Denied => {
                        changes.revoked.push(filter.clone());
                        false
                    }
                    decision => {
                        changes.kept.push((
                            filter.clone(),
                            *options,
                            decision == Subscription::Checked,
                        ));
                        true
                    }
                }
            });
        } else if self.acl.is_some() {
            changes.kept = self
                .subscriptions
                .iter()
                .map(|(filter, options)| (filter.clone(), *options, false))
                .collect();
        }
        if !changes.revoked.is_empty() {
            if let Some(extras) = &mut self.extras {
                let gone: HashSet<&str> = changes.revoked.iter().map(|f| &**f).collect();
                extras.retained.retain(|c| !gone.contains(&*c.filter));
            }
            self.trim_extras();
        }
        self.acl = acl;
        changes
    }

    /// Subscriptions held.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Whether `filter` is subscribed.
    pub fn is_subscribed(&self, filter: &str) -> bool {
        self.subscriptions.contains_key(filter)
    }

    /// Records a subscription (replacing the options of an existing one). Returns the ticket
    /// of its record in the durable state, when the SUBACK must wait for it.
    pub fn add_subscription(
        &mut self,
        filter: &str,
        options: SubOptions,
        limits: &QueueLimits,
    ) -> Option<Ticket> {
        match self.subscriptions.get_mut(filter) {
            Some(existing) => *existing = options,
            None => {
                self.subscriptions.insert(filter.into(), options);
            }
        }
        self.journal(limits, |key| Record::Subscribe {
            key,
            filter: filter.into(),
            options: options.to_stored(),
        })
    }

    /// Forgets a subscription; false when there was none. The ticket is that of its record
    /// in the durable state, when the UNSUBACK must wait for it.
    pub fn remove_subscription(
        &mut self,
        filter: &str,
        limits: &QueueLimits,
    ) -> (bool, Option<Ticket>) {
        if self.subscriptions.remove(filter).is_none() {
            return (false, None);
        }
        let ticket = self.journal(limits, |key| Record::Unsubscribe {
            key,
            filter: filter.into(),
        });
        (true, ticket)
    }

    /// Appends the record `record(key)` to the durable state if the session is persistent
    /// and persistence is on. Returns its ticket when acknowledgements wait for durability.
    fn journal(&self, limits: &QueueLimits, record: impl FnOnce(u64) -> Record) -> Option<Ticket> {
        let store = limits.store.as_deref().filter(|_| self.persistent)?;
        let ticket = store.append(record(self.key));
        store.acks_wait().then_some(ticket)
    }

    /// Records in the durable state that the session is persistent (with its expiry and who
    /// its client logged in as, for its access rules), for `client_id`; a session that is not
    /// persistent has nothing stored. Returns the ticket.
    pub fn journal_session(&self, client_id: &str, limits: &QueueLimits) -> Option<Ticket> {
        let expiry = self
            .expiry()
            .map(|e| u32::try_from(e.as_secs()).unwrap_or(u32::MAX));
        self.journal(limits, |key| Record::Session {
            key,
            client_id: client_id.into(),
            expiry,
            access: self.acl.as_ref().map(|acl| {
                let (username, publish, subscribe) = acl.login();
                StoredAccess {
                    username: username.map(Into::into),
                    publish,
                    subscribe,
                }
            }),
        })
    }

    /// Records in the durable state that the client left now (its expiry counts from here).
    pub fn journal_left(&self, limits: &QueueLimits) {
        let at_ms = super::message::unix_ms(std::time::SystemTime::now());
        self.journal(limits, |key| Record::Left { key, at_ms });
    }

    /// Queues the retained deliveries of new subscriptions, after any still running. A filter
    /// subscribed again restarts its delivery (its retained messages are sent again, as MQTT
    /// 3.1.1 section 3.8.4 requires), so there is at most one cursor per filter.
    pub fn add_retained(&mut self, cursors: Vec<Cursor>) {
        if cursors.is_empty() {
            return;
        }
        let retained = &mut self.extras.get_or_insert_with(Box::default).retained;
        if !retained.is_empty() {
            let new: HashSet<&str> = cursors.iter().map(|c| &*c.filter).collect();
            retained.retain(|c| !new.contains(&*c.filter));
        }
        retained.extend(cursors);
    }

    /// Stops the retained deliveries of unsubscribed filters.
    pub fn remove_retained(&mut self, filters: &[String]) {
        let Some(extras) = &mut self.extras else {
            return;
        };
        let gone: HashSet<&str> = filters.iter().map(String::as_str).collect();
        extras.retained.retain(|c| !gone.contains(&*c.filter));
        self.trim_extras();
    }

    /// The oldest retained delivery still running, taken out while it is walked (put it back
    /// with [`SessionState::resume_retained`] unless it finished).
    pub fn next_retained(&mut self) -> Option<Cursor> {
        let cursor = self.extras.as_mut()?.retained.pop_front();
        self.trim_extras();
        cursor
    }

    /// Puts back a retained delivery that has more to send, first in line.
    pub fn resume_retained(&mut self, cursor: Cursor) {
        self.extras
            .get_or_insert_with(Box::default)
            .retained
            .push_front(cursor);
    }

    /// Gives the extras back once nothing is in them.
    fn trim_extras(&mut self) {
        if self.extras.as_ref().is_some_and(|e| e.is_empty()) {
            self.extras = None;
        }
    }

    /// Whether the queue holds a quarter of its limits or less (a congested session that got
    /// there no longer holds publishers back).
    pub fn below_low_water(&self, limits: &QueueLimits) -> bool {
        self.pending.len() <= limits.max_messages / 4 && self.queued_bytes <= limits.max_bytes / 4
    }

    /// Room left in the in-flight window (`max_inflight`, or the client's receive maximum
    /// when lower).
    pub fn inflight_room(&self, max_inflight: usize) -> usize {
        self.window(max_inflight)
            .saturating_sub(self.inflight.len())
    }

    /// The in-flight window: `max_inflight`, or the client's receive maximum when lower.
    fn window(&self, max_inflight: usize) -> usize {
        max_inflight.min(usize::from(self.peer().receive_maximum))
    }

    /// Whether a message was queued or sent since the session started.
    pub fn has_messages(&self) -> bool {
        !self.pending.is_empty() || !self.inflight.is_empty()
    }

    /// Records a received QoS 2 packet id; false when it was already recorded (a redelivery that
    /// must not be routed again).
    pub fn receive_qos2(&mut self, pkid: u16, limits: &QueueLimits) -> (bool, Option<Ticket>) {
        let received = &mut self.extras.get_or_insert_with(Box::default).incoming_qos2;
        if received.contains(&pkid) {
            return (false, None);
        }
        received.push(pkid);
        (
            true,
            self.journal(limits, |key| Record::Received { key, pkid }),
        )
    }

    /// QoS 2 messages received and not yet released.
    pub fn unreleased_qos2(&self) -> usize {
        self.extras.as_ref().map_or(0, |e| e.incoming_qos2.len())
    }

    /// Forgets a received QoS 2 packet id (PUBREL); false when it was not recorded. The
    /// ticket is that of its record in the durable state, when the PUBCOMP must wait for it.
    pub fn release_qos2(&mut self, pkid: u16, limits: &QueueLimits) -> (bool, Option<Ticket>) {
        let Some(extras) = &mut self.extras else {
            return (false, None);
        };
        let before = extras.incoming_qos2.len();
        extras.incoming_qos2.retain(|p| *p != pkid);
        let found = extras.incoming_qos2.len() < before;
        self.trim_extras();
        if !found {
            return (false, None);
        }
        (
            true,
            self.journal(limits, |key| Record::Completed { key, pkid }),
        )
    }

    /// What the client accepts of the PUBLISHes sent to it.
    pub fn peer(&self) -> Peer {
        self.peer
    }

    /// Records what the client of the connection now using the session accepts (a new
    /// connection: the topic aliases of the previous one are gone).
    pub fn set_peer(&mut self, peer: Peer) {
        if let Some(extras) = &mut self.extras {
            extras.aliases = Vec::new();
            extras.alias_bytes = 0;
        }
        self.peer = peer;
        self.trim_extras();
    }

    /// The topic alias the connection's client already knows for `topic`.
    fn known_alias(&self, topic: &str) -> Option<u16> {
        let extras = self.extras.as_ref()?;
        let i = extras.aliases.iter().position(|t| &**t == topic)?;
        Some((i + 1) as u16)
    }

    /// A new topic alias for `topic` (sent with it, so the client learns it), at most
    /// `maximum` of them; `None` when the client takes none or [`ALIAS_BYTES`] would be passed.
    fn new_alias(&mut self, topic: &str, maximum: u16) -> Option<u16> {
        let slots = usize::from(maximum).min(ALIAS_SLOTS);
        if slots == 0 {
            return None;
        }
        let extras = self.extras.get_or_insert_with(Box::default);
        if extras.alias_bytes + topic.len() > ALIAS_BYTES {
            return None;
        }
        if extras.aliases.len() < slots {
            extras.aliases.push(topic.into());
            extras.alias_bytes += topic.len();
            return Some(extras.aliases.len() as u16);
        }
        // All taken: one is given to the new topic, in turn.
        extras.next_alias = (extras.next_alias + 1) % slots;
        let slot = extras.next_alias;
        extras.alias_bytes = extras.alias_bytes + topic.len() - extras.aliases[slot].len();
        extras.aliases[slot] = topic.into();
        Some((slot + 1) as u16)
    }

    /// The MQTT 5 session expiry interval; `None` for a 3.1.1 session.
    pub fn expiry(&self) -> Option<std::time::Duration> {
        self.extras.as_ref().and_then(|e| e.expiry)
    }

    /// Sets the session expiry interval: `Some` for MQTT 5 (at CONNECT; a DISCONNECT may
    /// change it), `None` for 3.1.1 with `persistent` from clean session. The session becomes
    /// persistent, or stops being so, with it.
    pub fn set_expiry(
        &mut self,
        persistent: bool,
        expiry: Option<std::time::Duration>,
        limits: &QueueLimits,
    ) {
        match (self.persistent, persistent) {
            (false, true) => metrics().persistent_sessions.inc(),
            (true, false) => {
                metrics().persistent_sessions.dec();
                // Its stored state ends now; it lives on in memory until the connection ends.
                self.journal(limits, |key| Record::SessionEnd { key });
            }
            _ => {}
        }
        self.persistent = persistent;
        // Only a persistent session needs its interval (an extras allocation).
        let expiry = expiry.filter(|_| persistent);
        if expiry != self.expiry() {
            self.extras.get_or_insert_with(Box::default).expiry = expiry;
            self.trim_extras();
        }
    }

    /// PUBACK: the QoS 1 message is delivered.
    pub fn puback(&mut self, pkid: u16, limits: &QueueLimits) -> bool {
        self.remove_inflight(pkid, Stage::Published, QoS::AtLeastOnce, limits)
    }

    /// PUBREC: the QoS 2 message is received; the caller sends PUBREL.
    pub fn pubrec(&mut self, pkid: u16, limits: &QueueLimits) -> bool {
        let Some(f) = self
            .inflight
            .iter_mut()
            .find(|f| f.pkid == pkid && f.out.qos == QoS::ExactlyOnce)
        else {
            return false;
        };
        f.stage = Stage::Released;
        if f.out.id != 0 {
            self.journal(limits, |key| Record::Released { key, pkid });
        }
        true
    }

    /// PUBCOMP: the QoS 2 exchange is complete.
    pub fn pubcomp(&mut self, pkid: u16, limits: &QueueLimits) -> bool {
        self.remove_inflight(pkid, Stage::Released, QoS::ExactlyOnce, limits)
    }

    fn remove_inflight(&mut self, pkid: u16, stage: Stage, qos: QoS, limits: &QueueLimits) -> bool {
        match self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.stage == stage && f.out.qos == qos)
        {
            Some(i) => {
                if let Some(done) = self.inflight.remove(i) {
                    self.release(done.out.cost(), limits);
                    self.journal_done(&done.out, limits);
                }
                true
            }
            None => false,
        }
    }

    /// Records that a stored message left the session's queue (acknowledged or dropped).
    fn journal_done(&self, out: &Outgoing, limits: &QueueLimits) {
        if out.id != 0 {
            let id = out.id;
            self.journal(limits, |key| Record::Done { key, id });
        }
    }

    fn release(&mut self, cost: usize, limits: &QueueLimits) {
        self.queued_bytes -= cost;
        limits.total.release(cost);
    }

    /// Writes every in-flight message again (PUBLISH with DUP, or PUBREL), as a reconnecting
    /// persistent session requires.
    pub fn write_inflight(&self, buf: &mut BytesMut) -> usize {
        let now = tokio::time::Instant::now();
        let protocol = self.peer().protocol;
        for f in &self.inflight {
            let before = buf.len();
            let kind = match f.stage {
                Stage::Published => PacketType::Publish,
                Stage::Released => PacketType::PubRel,
            };
            match f.stage {
                Stage::Published => {
                    let mut publish = outgoing(&f.out, f.pkid, now);
                    publish.dup = true;
                    encode::write_publish(buf, protocol, &publish);
                }
                Stage::Released => encode::write_ack(buf, protocol, PacketType::PubRel, f.pkid, 0),
            }
            metrics().sent.count(kind, 1, buf.len() - before);
        }
        self.inflight.len()
    }

    /// Moves pending messages into `buf` until it holds `limit` bytes or the in-flight window is
    /// full. Returns how many PUBLISH packets were written and what is left.
    pub fn write_pending(
        &mut self,
        buf: &mut BytesMut,
        limit: usize,
        max_inflight: usize,
        limits: &QueueLimits,
    ) -> (usize, Backlog) {
        let mut written = 0;
        let backlog = loop {
            let Some(front) = self.pending.front() else {
                break Backlog::Empty;
            };
            if front.qos != QoS::AtMostOnce && self.inflight.len() >= self.window(max_inflight) {
                break Backlog::Blocked;
            }
            if buf.len() >= limit {
                break Backlog::More;
            }
            let Some(out) = self.pending.pop_front() else {
                break Backlog::Empty;
            };
            metrics().messages_queued.dec();
            written += usize::from(self.write(buf, out, limits));
        };
        if self.pending.is_empty() {
            self.overflowing = false;
            if self.pending.capacity() > 16 {
                self.pending = VecDeque::new();
            }
        }
        (written, backlog)
    }

    /// Writes retained messages of a subscription granted `granted` (call with at most
    /// [`SessionState::inflight_room`] messages when `granted` is above QoS 0).
    pub fn write_retained(
        &mut self,
        buf: &mut BytesMut,
        messages: Vec<Arc<Message>>,
        cursor: &Cursor,
        limits: &QueueLimits,
    ) {
        for message in messages {
            let qos = cursor.qos.min_qos(message.qos);
            let out = Outgoing {
                message,
                qos,
                retain: true,
                stored: true,
                ids: (cursor.id != 0).then(|| Box::from([cursor.id])),
                shared: None,
                id: 0,
            };
            self.write(buf, out, limits);
        }
    }

    /// Writes one PUBLISH; a QoS 1/2 message moves to the in-flight window, a QoS 0 message
    /// gives its queue bytes back. A message whose MQTT 5 expiry passed, or that is larger than
    /// the client accepts, is dropped and counted instead (false).
    fn write(&mut self, buf: &mut BytesMut, out: Outgoing, limits: &QueueLimits) -> bool {
        let now = tokio::time::Instant::now();
        let peer = self.peer();
        let mut publish = outgoing(&out, 0, now);
        let drop = if publish.message_expiry == Some(0) {
            Some(DropReason::Expired)
        } else if peer.maximum_packet_size > 0
            && publish.size(peer.protocol) > peer.maximum_packet_size as usize
        {
            Some(DropReason::PacketTooLarge)
        } else {
            None
        };
        if let Some(reason) = drop {
            metrics().messages_dropped.inc(reason);
            self.release(out.cost(), limits);
            self.journal_done(&out, limits);
            return false;
        }
        if peer.protocol == Protocol::V5 && peer.topic_alias_maximum > 0 {
            if let Some(alias) = self.known_alias(publish.topic) {
                publish.topic_alias = Some(alias);
                publish.topic = "";
            } else if peer.maximum_packet_size == 0
                || publish.size(peer.protocol) + 3 <= peer.maximum_packet_size as usize
            {
                publish.topic_alias = self.new_alias(publish.topic, peer.topic_alias_maximum);
            }
        }
        if out.qos != QoS::AtMostOnce {
            publish.pkid = self.next_pkid();
        }
        let pkid = publish.pkid;
        encode::write_publish(buf, peer.protocol, &publish);
        if out.qos == QoS::AtMostOnce {
            self.release(out.cost(), limits);
        } else {
            if out.id != 0 {
                let id = out.id;
                self.journal(limits, |key| Record::Sent { key, id, pkid });
            }
            self.inflight.push_back(Inflight {
                pkid,
                out,
                stage: Stage::Published,
            });
        }
        true
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid == 0 {
                continue;
            }
            let pkid = self.last_pkid;
            if !self.inflight.iter().any(|f| f.pkid == pkid) {
                return pkid;
            }
        }
    }
}

/// Most topic aliases the broker sets for one client (fewer when the client takes fewer).
const ALIAS_SLOTS: usize = 64;
/// Most bytes of topic names the broker's topic aliases for one client stand for.
const ALIAS_BYTES: usize = 16 * 1024;

/// The PUBLISH that sends `out` with packet id `pkid` at `now` (its remaining expiry then).
fn outgoing(out: &Outgoing, pkid: u16, now: tokio::time::Instant) -> OutPublish<'_> {
    let message = &out.message;
    let mut publish = OutPublish::new(&message.topic, &message.payload, out.qos, pkid, out.retain);
    if let Some(properties) = &message.properties {
        publish.message_expiry = message.expiry_left(now);
        publish.forwarded = &properties.forwarded;
    }
    if let Some(ids) = &out.ids {
        publish.subscription_ids = ids;
    }
    publish
}

/// Flag in [`Session::flow`]: the queue passed half its limits; publishers feeding it wait
/// until it is down to a quarter, unless the client is the one behind.
const CONGESTED: u8 = 1;
/// Flag in [`Session::flow`]: no connection drains the queue (the client is away): it holds
/// nobody back, and what does not fit is dropped.
const OFFLINE: u8 = 2;
/// How long a congested session may have waited for its client (socket full, in-flight window
/// full) and still hold publishers back. A fast client whose socket filled with one burst reads
/// it within this time; a client that stays behind longer is a slow consumer: publishers stop
/// waiting for it, and what does not fit its queue is dropped and counted.
pub const CLIENT_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// Milliseconds since the first call in this process, wrapping after 49 days: a clock that fits
/// in an `AtomicU32`, compared with `wrapping_sub`. Never 0 (0 means "not set").
fn now_ms() -> u32 {
    static ORIGIN: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    (ORIGIN.elapsed().as_millis() as u32).max(1)
}

/// Flag in [`Session::signals`]: messages were queued.
const QUEUED: u8 = 1;
/// Flag in [`Session::signals`]: a newer connection wants the session; the owner must close.
const KICKED: u8 = 2;
/// Flag in [`Session::signals`]: the broker is shutting down; the owner must close.
const SHUTDOWN: u8 = 4;
/// Bits of [`Session::signals`] above the flags: a close asked for with a reason
/// ([`Session::close_with`]), as the reason's position in [`DisconnectReason::ALL`] plus one; 0
/// when none is asked for. The first reason asked for wins.
const CLOSE_SHIFT: u32 = 3;

/// What the owning connection is asked to do, read by [`Session::take_signals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals(u8);

impl Signals {
    /// A newer connection with the same client id is waiting: close with reason takeover.
    pub fn kicked(self) -> bool {
        self.0 & KICKED != 0
    }

    /// The broker is shutting down: close with reason broker_shutdown.
    pub fn shutdown(self) -> bool {
        self.0 & SHUTDOWN != 0
    }

    /// The broker asked the connection to close with this reason (kicked, not_authorized).
    pub fn close_requested(self) -> Option<DisconnectReason> {
        let n = usize::from(self.0 >> CLOSE_SHIFT);
        n.checked_sub(1)
            .and_then(|i| DisconnectReason::ALL.get(i))
            .copied()
    }
}

/// The state of one client id.
///
/// Kept small: one exists per connected device. The owning connection is woken through an
/// [`AtomicWaker`] plus flag bits rather than per-connection channels, tokens or futures; a
/// connection waiting to take a session over waits on [`super::Broker::released`].
#[derive(Debug)]
pub struct Session {
    /// The MQTT client id.
    pub client_id: Arc<str>,
    /// Unique per `Session` object, so that the router can tell two incarnations of a client id
    /// apart (a session that ended and a new one of the same client id).
    pub incarnation: u64,
    state: Mutex<SessionState>,
    /// Flags for the owner ([`QUEUED`], [`KICKED`], [`SHUTDOWN`]) and a requested close's
    /// reason (above [`CLOSE_SHIFT`]).
    signals: AtomicU8,
    /// Flow control, read by publishers without the state lock ([`CONGESTED`], [`OFFLINE`]).
    flow: AtomicU8,
    /// While congested: since when ([`now_ms`]) the writer has been waiting for the client; 0
    /// when it has not.
    client_behind_since: AtomicU32,
    /// The owning connection's task.
    waker: AtomicWaker,
    /// When the owner last received a packet, in milliseconds since the Unix epoch. Kept in
    /// memory only: every PINGREQ updates it, the database never sees it.
    last_seen_ms: AtomicU64,
}

impl Session {
    /// A new, empty session.
    pub fn new(client_id: Arc<str>, incarnation: u64) -> Self {
        Self {
            client_id,
            incarnation,
            state: Mutex::new(SessionState {
                key: incarnation,
                ..SessionState::default()
            }),
            signals: AtomicU8::new(0),
            flow: AtomicU8::new(OFFLINE),
            client_behind_since: AtomicU32::new(0),
            waker: AtomicWaker::new(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    /// Records that the owner received a packet now.
    pub fn touch(&self) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// When the owner last received a packet.
    pub fn last_seen(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed))
    }

    /// Locks the state. A poisoned lock (a panic elsewhere) still yields the state: every
    /// mutation leaves it consistent.
    pub fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self, flag: u8) {
        self.signals.fetch_or(flag, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Asks the owning connection to close with reason takeover.
    pub fn kick(&self) {
        self.signal(KICKED);
    }

    /// Asks the owning connection to close with reason broker_shutdown.
    pub fn shut_down(&self) {
        self.signal(SHUTDOWN);
    }

    /// Asks the owning connection to close with `reason` (unless another reason was asked for
    /// already and not yet seen).
    pub fn close_with(&self, reason: DisconnectReason) {
        let code = (reason.index() + 1) as u8;
        let _ = self
            .signals
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |signals| {
                (signals >> CLOSE_SHIFT == 0).then_some(signals | (code << CLOSE_SHIFT))
            });
        self.waker.wake();
    }

    /// Registers the owner's waker and returns (and clears) the pending signals. Register first,
    /// then read: a signal raised in between still wakes the task.
    pub fn take_signals(&self, waker: &Waker) -> Signals {
        self.waker.register(waker);
        Signals(self.signals.swap(0, Ordering::AcqRel))
    }

    /// Clears signals meant for a previous owner (called with the state locked, on attach).
    pub fn reset_signals(&self) {
        self.signals.store(0, Ordering::Release);
    }

    /// Whether publishers feeding this session should wait before sending it more: its queue is
    /// congested, a connection drains it, and the broker rather than the client is behind (the
    /// writer has not been waiting for the client for longer than [`CLIENT_GRACE`]).
    pub fn holds_back_publishers(&self) -> bool {
        if self.flow.load(Ordering::Acquire) & (CONGESTED | OFFLINE) != CONGESTED {
            return false;
        }
        let since = self.client_behind_since.load(Ordering::Acquire);
        since == 0 || now_ms().wrapping_sub(since) < CLIENT_GRACE.as_millis() as u32
    }

    /// Records whether a connection drains the queue now. Returns true when going offline ends
    /// the session holding publishers back (they should be told).
    pub fn set_online(&self, online: bool) -> bool {
        if online {
            self.flow.fetch_and(!OFFLINE, Ordering::AcqRel);
            false
        } else {
            self.flow.fetch_or(OFFLINE, Ordering::AcqRel) & (CONGESTED | OFFLINE) == CONGESTED
        }
    }

    /// Records that the writer stopped because of the client (socket or in-flight window
    /// full). While the queue stays congested, that time counts towards [`CLIENT_GRACE`].
    pub fn client_behind(&self) {
        if self.flow.load(Ordering::Acquire) & CONGESTED != 0
            && self.client_behind_since.load(Ordering::Acquire) == 0
        {
            self.client_behind_since.store(now_ms(), Ordering::Release);
        }
    }

    /// Ends congestion once the queue is down to a quarter of its limits (call with the state
    /// locked, after writing). Returns true when publishers waiting for it should be told.
    pub fn relieve(&self, st: &SessionState, limits: &QueueLimits) -> bool {
        if self.flow.load(Ordering::Acquire) & CONGESTED == 0 || !st.below_low_water(limits) {
            return false;
        }
        self.client_behind_since.store(0, Ordering::Release);
        self.flow.fetch_and(!CONGESTED, Ordering::AcqRel) & OFFLINE == 0
    }

    /// Whether a connection uses the session now.
    pub fn is_online(&self) -> bool {
        self.flow.load(Ordering::Acquire) & OFFLINE == 0
    }

    /// Whether the client may read `topic` (its ACL, if any, says so).
    pub fn may_read(&self, topic: &str) -> bool {
        let acl = self.state().acl.clone();
        acl.is_none_or(|acl| acl.allows(Access::Read, topic))
    }

    /// Queues a message for the client and wakes its connection. A QoS 1/2 message for a
    /// persistent session is made durable: its body once per routing (`stored` holds its id
    /// once written, 0 before), then its place in this session's queue. Returns the ticket of
    /// that when the publisher's acknowledgement must wait for it.
    pub fn enqueue(
        &self,
        message: Arc<Message>,
        delivery: Delivery,
        limits: &QueueLimits,
        stored: &mut u64,
    ) -> Result<Option<Ticket>, DropReason> {
        let qos = delivery.qos;
        let ticket = {
            let mut st = self.state();
            if st.ended {
                return Err(DropReason::SessionEnded);
            }
            if !st.online && qos == QoS::AtMostOnce {
                return Err(DropReason::Qos0Offline);
            }
            let cost = message.size();
            let refusal = if st.pending.len() >= limits.max_messages {
                Some(DropReason::QueueFull)
            } else if st.queued_bytes > 0 && st.queued_bytes + cost > limits.max_bytes {
                Some(DropReason::QueueBytes)
            } else if !limits.total.try_reserve(cost) {
                Some(DropReason::MemoryLimit)
            } else {
                None
            };
            if let Some(reason) = refusal {
                if !st.overflowing {
                    st.overflowing = true;
                    if let Some(suppressed) = QUEUE_FULL_LOG.check() {
                        tracing::warn!(
                            client_id = &*self.client_id,
                            online = st.online,
                            reason = reason.as_str(),
                            queued_messages = st.pending.len(),
                            queued_bytes = st.queued_bytes,
                            suppressed,
                            "Session queue full: dropping its messages until the client catches \
                             up (counted in heartwire_messages_dropped_total)."
                        );
                    }
                }
                return Err(reason);
            }
            st.queued_bytes += cost;
            let mut id = 0;
            let mut ticket = None;
            if let Some(store) = limits.store.as_deref().filter(|_| st.persistent) {
                if qos != QoS::AtMostOnce {
                    if *stored == 0 {
                        *stored = store.next_message_id();
                        store.append(Record::Message {
                            id: *stored,
                            message: message.to_stored(),
                        });
                    }
                    id = *stored;
                    ticket = st.journal(limits, |key| Record::Enqueue {
                        key,
                        id,
                        delivery: delivery.to_stored(),
                    });
                }
            }
            st.pending.push_back(Outgoing {
                message,
                qos,
                retain: delivery.retain,
                stored: false,
                ids: delivery.ids,
                shared: delivery.shared,
                id,
            });
            if st.pending.len() >= limits.max_messages / 2
                || st.queued_bytes >= limits.max_bytes / 2
            {
                self.flow.fetch_or(CONGESTED, Ordering::AcqRel);
            }
            ticket
        };
        metrics().messages_queued.inc();
        self.signal(QUEUED);
        Ok(ticket)
    }
}

/// Sessions starting to drop messages: one line per interval for the whole broker.
static QUEUE_FULL_LOG: crate::telemetry::LogLimiter =
    crate::telemetry::LogLimiter::new(std::time::Duration::from_secs(10));

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn a_requested_close_carries_its_reason_and_the_first_one_wins() {
        let session = Session::new("c".into(), 1);
        let waker = std::task::Waker::noop();
        assert_eq!(session.take_signals(waker).close_requested(), None);
        session.close_with(DisconnectReason::NotAuthorized);
        session.close_with(DisconnectReason::Kicked);
        session.signal(QUEUED);
        let signals = session.take_signals(waker);
        assert_eq!(
            signals.close_requested(),
            Some(DisconnectReason::NotAuthorized)
        );
        assert!(!signals.kicked() && !signals.shutdown());
        // Taken: the next owner starts clean.
        assert_eq!(session.take_signals(waker).close_requested(), None);
        for reason in DisconnectReason::ALL {
            session.close_with(*reason);
            assert_eq!(session.take_signals(waker).close_requested(), Some(*reason));
        }
        session.close_with(DisconnectReason::Kicked);
        session.reset_signals();
        assert_eq!(session.take_signals(waker).close_requested(), None);
    }

    fn msg(qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
            properties: None,
            origin: 0,
            origin_hash: 0,
        })
    }

    fn limits(max_messages: usize, max_bytes: usize, total: usize) -> QueueLimits {
        QueueLimits {
            max_messages,
            max_bytes,
            total: ByteBudget::new(total, prometheus::IntGauge::new("q", "q").expect("gauge")),
            store: None,
        }
    }

    fn online() -> Session {
        let s = Session::new("c".into(), 1);
        s.state().online = true;
        s
    }

    /// Queues a one-byte message at `qos` for `s`, as its subscription asked.
    fn put(s: &Session, qos: QoS, l: &QueueLimits) -> Result<Option<Ticket>, DropReason> {
        s.enqueue(msg(qos), Delivery::qos(qos), l, &mut 0)
    }

    #[test]
    fn inflight_window_and_acks() {
        let l = limits(100, 1000, 1000);
        let s = online();
        for _ in 0..5 {
            put(&s, QoS::AtLeastOnce, &l).expect("room");
        }
        let mut st = s.state();
        let mut buf = BytesMut::new();
        assert_eq!(
            st.write_pending(&mut buf, 1 << 20, 2, &l),
            (2, Backlog::Blocked)
        );
        assert_eq!(st.inflight.len(), 2);
        assert!(st.puback(1, &l));
        assert!(
            !st.puback(1, &l),
            "a second PUBACK for the same id is ignored"
        );
        assert_eq!(st.write_pending(&mut buf, 1 << 20, 2, &l).0, 1);
        assert_eq!(
            st.inflight.iter().map(|f| f.pkid).collect::<Vec<_>>(),
            [2, 3]
        );
        // Two queued, two in flight: four bytes (topic "t" and payload "x" each).
        assert_eq!((st.queued_bytes, l.total.used()), (8, 8));
        st.clear(&l);
        assert_eq!(l.total.used(), 0);
    }

    #[test]
    fn qos2_stages() {
        let l = limits(100, 1000, 1000);
        let s = online();
        put(&s, QoS::ExactlyOnce, &l).expect("room");
        let mut st = s.state();
        let mut buf = BytesMut::new();
        st.write_pending(&mut buf, 1 << 20, 10, &l);
        assert!(
            !st.pubcomp(1, &l),
            "PUBCOMP before PUBREC does not complete"
        );
        assert!(st.pubrec(1, &l));
        assert!(st.pubcomp(1, &l));
        assert!(!st.has_messages());
        assert_eq!(l.total.used(), 0);
    }

    #[test]
    fn offline_qos0_is_not_queued_and_queue_is_bounded() {
        let l = limits(3, 1000, 1000);
        let s = Session::new("c".into(), 1);
        assert_eq!(put(&s, QoS::AtMostOnce, &l), Err(DropReason::Qos0Offline));
        for _ in 0..3 {
            put(&s, QoS::AtLeastOnce, &l).expect("room");
        }
        assert_eq!(put(&s, QoS::AtLeastOnce, &l), Err(DropReason::QueueFull));
    }

    #[test]
    fn queues_are_bounded_in_bytes_per_session_and_in_total() {
        let big = |n| {
            Arc::new(Message {
                topic: "t".into(),
                payload: Bytes::from(vec![0u8; n]),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: None,
                origin: 0,
                origin_hash: 0,
            })
        };
        let l = limits(100, 100, 250);
        let (a, b, c) = (online(), online(), online());
        // One message bigger than the session's budget fits into an empty queue.
        assert_eq!(
            a.enqueue(big(149), Delivery::qos(QoS::AtMostOnce), &l, &mut 0),
            Ok(None)
        );
        assert_eq!(
            a.enqueue(big(1), Delivery::qos(QoS::AtMostOnce), &l, &mut 0),
            Err(DropReason::QueueBytes)
        );
        assert_eq!(
            b.enqueue(big(59), Delivery::qos(QoS::AtMostOnce), &l, &mut 0),
            Ok(None)
        );
        assert_eq!(
            b.enqueue(big(39), Delivery::qos(QoS::AtMostOnce), &l, &mut 0),
            Ok(None)
        );
        assert_eq!(
            c.enqueue(big(99), Delivery::qos(QoS::AtMostOnce), &l, &mut 0),
            Err(DropReason::MemoryLimit)
        );
        // Writing a QoS 0 message gives its bytes back.
        let mut buf = BytesMut::new();
        a.state().write_pending(&mut buf, usize::MAX, 10, &l);
        assert_eq!(l.total.used(), 100);
        assert_eq!(
            c.enqueue(big(99), Delivery::qos(QoS::AtMostOnce), &l, &mut 0),
            Ok(None)
        );
    }

    #[test]
    fn congestion_holds_publishers_back_until_drained_or_the_client_falls_behind() {
        let l = limits(8, 1000, 10_000);
        let s = online();
        assert!(!s.set_online(true));
        for _ in 0..3 {
            put(&s, QoS::AtMostOnce, &l).expect("room");
        }
        assert!(!s.holds_back_publishers(), "below half the queue");
        put(&s, QoS::AtMostOnce, &l).expect("room");
        assert!(s.holds_back_publishers(), "half the queue: congested");
        // Drained to a quarter: relieved, and waiting publishers are to be told.
        let mut st = s.state();
        st.write_pending(&mut BytesMut::new(), 1, 10, &l);
        assert!(!s.relieve(&st, &l), "three left: more than a quarter");
        st.write_pending(&mut BytesMut::new(), 1, 10, &l);
        assert!(s.relieve(&st, &l));
        drop(st);
        assert!(!s.holds_back_publishers());
        // Congested again while the client is behind: held back only for a grace period.
        for _ in 0..2 {
            put(&s, QoS::AtMostOnce, &l).expect("room");
        }
        s.client_behind();
        assert!(s.holds_back_publishers());
        let deadline = std::time::Instant::now() + 20 * CLIENT_GRACE;
        while s.holds_back_publishers() {
            assert!(std::time::Instant::now() < deadline, "grace never ended");
            std::thread::yield_now();
        }
        // Nobody holds back for a session whose client is away.
        let t = online();
        for _ in 0..4 {
            put(&t, QoS::AtLeastOnce, &l).expect("room");
        }
        assert!(!t.holds_back_publishers(), "offline until attached");
        t.set_online(true);
        assert!(t.holds_back_publishers());
        assert!(
            t.set_online(false),
            "going offline releases waiting publishers"
        );
        assert!(!t.holds_back_publishers());
    }

    #[test]
    fn retained_cursors_are_one_per_filter() {
        let mut st = SessionState::default();
        let c = |f: &str| Cursor::new(f.into(), QoS::AtMostOnce);
        st.add_retained(vec![c("a"), c("b")]);
        st.add_retained(vec![c("a")]);
        st.remove_retained(&["b".to_owned()]);
        assert_eq!(st.next_retained().map(|c| c.filter), Some("a".into()));
        assert_eq!(st.next_retained(), None);
    }
}
