//! The router: subscriptions (a trie of topic levels), retained messages, and fan-out of each
//! published message to the sessions whose filters match.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::budget::ByteBudget;
use super::message::{Delivery, Message, MinQos, SubOptions};
use super::retained::{Cursor, RetainedStore};
use super::session::{QueueLimits, Session};
use crate::config::{MqttConfig, SharedStrategy};
use crate::labels::{AclDenial, DropReason};
use crate::metrics::metrics;
use crate::state::{Record, StateStore, Ticket};
use crate::telemetry::LogLimiter;

/// One level of the subscription trie.
#[derive(Default)]
struct Node {
    /// Child levels, including the wildcard levels "+" and "#".
    children: HashMap<Box<str>, Node>,
    /// Sessions whose filter ends at this node, by incarnation.
    subscribers: HashMap<u64, Subscriber>,
    /// Shared subscriptions (`$share/{group}/...`) whose filter ends at this node, by group.
    shared: HashMap<Box<str>, Group>,
}

/// A session subscribed to a filter.
struct Subscriber {
    session: Arc<Session>,
    options: SubOptions,
    /// The ACL lets the session read only some topics of the filter: each message is checked.
    checked: bool,
}

/// The members of one shared subscription group on one filter: each message goes to one.
struct Group {
    /// `$share/{group}/{filter}`, carried by the messages it delivers.
    key: Arc<str>,
    members: Vec<(u64, Subscriber)>,
    /// Round robin: the member that got the last message.
    next: AtomicUsize,
}

impl Group {
    /// The member that gets a message published by `origin_hash`'s client: among the members
    /// whose client is connected (all, when none is).
    fn pick(&self, strategy: SharedStrategy, origin_hash: u64) -> Option<&(u64, Subscriber)> {
        let online = self
            .members
            .iter()
            .filter(|(_, m)| m.session.is_online())
            .count();
        let (count, only_online) = if online > 0 {
            (online, true)
        } else {
            (self.members.len(), false)
        };
        if count == 0 {
            return None;
        }
        let n = match strategy {
            SharedStrategy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % count,
            SharedStrategy::Random => (random_u64() % count as u64) as usize,
            SharedStrategy::HashClientId => (origin_hash % count as u64) as usize,
        };
        self.members
            .iter()
            .filter(|(_, m)| !only_online || m.session.is_online())
            .nth(n)
    }
}

/// A cheap random number for picking a shared subscription's member.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()),
    ));
    hasher.finish()
}

/// A session a message goes to: its highest granted QoS among the matching filters, whether
/// the ACL must be asked (only when every matching filter is checked), the retain flag and the
/// matching subscriptions' identifiers.
struct Target<'a> {
    session: &'a Arc<Session>,
    qos: QoS,
    checked: bool,
    retain: bool,
    ids: Vec<u32>,
    /// The shared subscription it came through, when only through that one.
    shared: Option<&'a Arc<str>>,
}

/// What a message being matched brings: its levels, its retain flag and who published it.
struct Matching<'m> {
    levels: &'m [&'m str],
    retain: bool,
    origin: u64,
    origin_hash: u64,
    strategy: SharedStrategy,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }

    /// The node of `filter`'s levels, created as needed.
    fn node_mut(&mut self, filter: &str) -> &mut Node {
        let mut node = self;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node
    }

    /// Removes `key` under the path (from `group` when given); prunes nodes left empty.
    /// Returns whether it was there.
    fn remove(
        &mut self,
        mut levels: std::str::Split<'_, char>,
        group: Option<&str>,
        key: u64,
    ) -> bool {
        match levels.next() {
            None => match group {
                None => self.subscribers.remove(&key).is_some(),
                Some(group) => {
                    let Some(g) = self.shared.get_mut(group) else {
                        return false;
                    };
                    let before = g.members.len();
                    g.members.retain(|(k, _)| *k != key);
                    let removed = g.members.len() < before;
                    if g.members.is_empty() {
                        self.shared.remove(group);
                    }
                    removed
                }
            },
            Some(level) => {
                let Some(child) = self.children.get_mut(level) else {
                    return false;
                };
                let removed = child.remove(levels, group, key);
                if child.is_empty() {
                    self.children.remove(level);
                }
                removed
            }
        }
    }

    /// Collects the subscribers of every filter below this node that matches `levels`.
    fn collect<'a>(&'a self, m: &Matching<'_>, depth: usize, out: &mut HashMap<u64, Target<'a>>) {
        let levels = &m.levels[depth..];
        // Topics starting with '$' are not matched by a wildcard in the first level.
        let dollar = depth == 0 && levels.first().is_some_and(|l| l.starts_with('$'));
        if !dollar {
            if let Some(hash) = self.children.get("#") {
                hash.add_to(m, out);
            }
        }
        let Some(level) = levels.first() else {
            self.add_to(m, out);
            return;
        };
        if !dollar {
            if let Some(plus) = self.children.get("+") {
                plus.collect(m, depth + 1, out);
            }
        }
        if let Some(exact) = self.children.get(*level) {
            exact.collect(m, depth + 1, out);
        }
    }

    /// Adds this node's subscribers, and one member of each of its shared groups.
    fn add_to<'a>(&'a self, m: &Matching<'_>, out: &mut HashMap<u64, Target<'a>>) {
        for (key, sub) in &self.subscribers {
            add(out, *key, sub, m, None);
        }
        for group in self.shared.values() {
            if let Some((key, sub)) = group.pick(m.strategy, m.origin_hash) {
                add(out, *key, sub, m, Some(&group.key));
            }
        }
    }
}

/// Keeps the highest QoS when a session has several matching filters: it gets one copy,
/// checked against the ACL only if no matching filter is wholly readable, retained if one of
/// them retains as published, with the identifiers of all of them. A no-local subscription
/// does not match its own session's messages.
fn add<'a>(
    out: &mut HashMap<u64, Target<'a>>,
    key: u64,
    sub: &'a Subscriber,
    m: &Matching<'_>,
    shared: Option<&'a Arc<str>>,
) {
    let o = &sub.options;
    if o.no_local && m.origin == key {
        return;
    }
    let retain = m.retain && o.retain_as_published;
    let target = match out.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => {
            let target = e.into_mut();
            // Also matched otherwise: not the group's alone to redeliver.
            target.shared = None;
            target
        }
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Target {
            session: &sub.session,
            qos: o.qos,
            checked: sub.checked,
            retain,
            ids: Vec::new(),
            shared,
        }),
    };
    if o.qos > target.qos {
        target.qos = o.qos;
    }
    target.checked &= sub.checked;
    target.retain |= retain;
    if o.id != 0 {
        target.ids.push(o.id);
    }
}

/// A shared subscription's group and filter: `$share/{group}/{filter}` (MQTT 5 section
/// 4.8.2); `None` for any other filter.
pub fn shared(filter: &str) -> Option<(&str, &str)> {
    filter.strip_prefix("$share/")?.split_once('/')
}

/// The filter a subscription matches topics with: a shared subscription's filter without its
/// `$share/{group}/`.
pub fn unshared(filter: &str) -> &str {
    shared(filter).map_or(filter, |(_, f)| f)
}

/// How hard [`Router::route`] tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Not while a subscriber holds publishers back, nor over the disk budget.
    Try,
    /// Regardless of subscribers, not over the disk budget.
    Force,
    /// Regardless of both.
    Always,
}

/// A message [`Router::try_publish`] did not route; it comes back to the caller.
#[derive(Debug)]
pub enum NotRouted {
    /// A matching subscriber's queue is congested: try again when one drains.
    HeldBack(Arc<Message>),
    /// It would add to the durable state, which is over `persistence.max_disk`.
    DiskFull(Arc<Message>),
}

impl NotRouted {
    /// The message.
    pub fn into_message(self) -> Arc<Message> {
        match self {
            NotRouted::HeldBack(m) | NotRouted::DiskFull(m) => m,
        }
    }
}

/// Subscriptions and retained messages of the whole broker.
pub struct Router {
    subscriptions: RwLock<Node>,
    retained: RwLock<RetainedStore>,
    limits: QueueLimits,
    strategy: SharedStrategy,
}

/// Refused retained messages: one line per interval for the whole broker.
static RETAIN_REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

impl Router {
    /// An empty router with the queue and retained-store limits of `config`.
    pub fn new(config: &MqttConfig) -> Self {
        Self {
            subscriptions: RwLock::new(Node::default()),
            retained: RwLock::new(RetainedStore::new(
                config.max_retained_messages,
                config.max_retained_bytes,
            )),
            limits: QueueLimits {
                max_messages: config.max_queued_messages,
                max_bytes: config.max_queued_bytes,
                total: ByteBudget::new(
                    config.max_queued_bytes_total,
                    metrics().queued_bytes.clone(),
                ),
                store: None,
            },
            strategy: config.shared_subscription_strategy,
        }
    }

    /// The bounds of every session's queue.
    pub fn limits(&self) -> &QueueLimits {
        &self.limits
    }

    /// Makes persistent sessions and retained messages durable in `store`.
    pub fn set_store(&mut self, store: Arc<dyn StateStore>) {
        self.limits.store = Some(store);
    }

    /// The durable state, when persistence is on.
    pub fn store(&self) -> Option<&Arc<dyn StateStore>> {
        self.limits.store.as_ref()
    }

    /// Adds or updates subscriptions of `session`, under one lock. The filters must be valid.
    pub fn subscribe<'f>(
        &self,
        session: &Arc<Session>,
        filters: impl IntoIterator<Item = (&'f str, QoS)>,
    ) {
        self.subscribe_checked(
            session,
            filters
                .into_iter()
                .map(|(f, q)| (f, SubOptions::qos(q), false)),
        );
    }

    /// The same with options, each filter with whether its messages must be checked against
    /// the session's ACL on delivery ([`crate::auth::acl::Subscription::Checked`]). A
    /// `$share/{group}/{filter}` filter joins the group.
    pub fn subscribe_checked<'f>(
        &self,
        session: &Arc<Session>,
        filters: impl IntoIterator<Item = (&'f str, SubOptions, bool)>,
    ) {
        let mut root = self
            .subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for (filter, options, checked) in filters {
            let subscriber = Subscriber {
                session: Arc::clone(session),
                options,
                checked,
            };
            let key = session.incarnation;
            let new = match shared(filter) {
                None => root
                    .node_mut(filter)
                    .subscribers
                    .insert(key, subscriber)
                    .is_none(),
                Some((group_name, inner)) => {
                    let members = &mut root
                        .node_mut(inner)
                        .shared
                        .entry(group_name.into())
                        .or_insert_with(|| Group {
                            key: filter.into(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        })
                        .members;
                    match members.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, existing)) => {
                            *existing = subscriber;
                            false
                        }
                        None => {
                            members.push((key, subscriber));
                            true
                        }
                    }
                }
            };
            if new {
                metrics().subscriptions.inc();
            }
        }
    }

    /// Removes subscriptions of one session.
    pub fn unsubscribe<'f>(&self, incarnation: u64, filters: impl IntoIterator<Item = &'f str>) {
        let mut root = self
            .subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for filter in filters {
            let (group, filter) = match shared(filter) {
                Some((group, filter)) => (Some(group), filter),
                None => (None, filter),
            };
            if root.remove(filter.split('/'), group, incarnation) {
                metrics().subscriptions.dec();
            }
        }
    }

    /// Routes a message whatever the state of the subscribers' queues and of the durable
    /// state's disk budget (wills, and a message received whole from a connection that ends):
    /// see [`Router::try_publish`].
    pub fn publish(&self, message: Arc<Message>) -> Option<Ticket> {
        self.route(message, Route::Always).ok().flatten()
    }

    /// Routes a message whatever the state of the subscribers' queues (a publisher that has
    /// waited long enough), unless the durable state is over its disk budget.
    pub fn force_publish(&self, message: Arc<Message>) -> Result<Option<Ticket>, NotRouted> {
        self.route(message, Route::Force)
    }

    /// Routes a message: updates the retained store when the retain flag is set, then queues it
    /// for every matching session with min(publish QoS, granted QoS). When a matching session
    /// holds publishers back (its queue is congested while its writer could drain it), nothing
    /// is routed and the message comes back: the caller stops reading from its client and tries
    /// again when a session drains (TCP back-pressure instead of drops).
    ///
    /// A message that would add to the durable state (a retained message, or a QoS 1/2
    /// message for a persistent session) while it is over `persistence.max_disk` is refused
    /// likewise ([`NotRouted::DiskFull`]). Otherwise returns the ticket the publisher's
    /// acknowledgement waits for, when it must wait for what routing stored.
    pub fn try_publish(&self, message: Arc<Message>) -> Result<Option<Ticket>, NotRouted> {
        self.route(message, Route::Try)
    }

    fn route(&self, message: Arc<Message>, how: Route) -> Result<Option<Ticket>, NotRouted> {
        let targets: Vec<(Arc<Session>, Delivery, bool)> = {
            let root = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
            let levels: Vec<&str> = message.topic.split('/').collect();
            let matching = Matching {
                levels: &levels,
                retain: message.retain,
                origin: message.origin,
                origin_hash: message.origin_hash,
                strategy: self.strategy,
            };
            let mut out = HashMap::new();
            root.collect(&matching, 0, &mut out);
            if how == Route::Try && out.values().any(|t| t.session.holds_back_publishers()) {
                return Err(NotRouted::HeldBack(message));
            }
            if how != Route::Always && self.over_budget() {
                let stores = (message.retain && !message.payload.is_empty())
                    || (message.qos != QoS::AtMostOnce
                        && out
                            .values()
                            .any(|t| t.qos != QoS::AtMostOnce && t.session.state().persistent));
                if stores {
                    return Err(NotRouted::DiskFull(message));
                }
            }
            out.into_values()
                .map(|t| {
                    let delivery = Delivery {
                        qos: t.qos.min_qos(message.qos),
                        retain: t.retain,
                        ids: (!t.ids.is_empty()).then(|| t.ids.into_boxed_slice()),
                        shared: t.shared.cloned(),
                    };
                    (Arc::clone(t.session), delivery, t.checked)
                })
                .collect()
        };
        metrics().messages_published.inc();
        let mut ticket = None;
        if message.retain {
            ticket = self.retain(&message, true);
        }
        // The message's body in the durable state, written with its first stored delivery.
        let mut stored = 0;
        for (session, delivery, checked) in targets {
            if checked && !session.may_read(&message.topic) {
                metrics().acl_denied.inc(AclDenial::Delivery);
                continue;
            }
            match session.enqueue(Arc::clone(&message), delivery, &self.limits, &mut stored) {
                Ok(t) => ticket = ticket.max(t),
                Err(reason) => {
                    metrics().messages_dropped.inc(reason);
                    tracing::debug!(
                        client_id = &*session.client_id,
                        topic = &*message.topic,
                        reason = reason.as_str(),
                        "Message dropped for subscriber."
                    );
                }
            }
        }
        self.routed(stored);
        Ok(ticket)
    }

    /// Puts back a retained message read from the durable state (not recorded again).
    pub fn restore_retained(&self, message: &Arc<Message>) {
        self.retain(message, false);
    }

    /// Records that the message stored as `id` (0: not stored) is routed: no queue gets it
    /// any more, and its body goes once the last queue is done with it.
    fn routed(&self, id: u64) {
        if let (Some(store), true) = (&self.limits.store, id != 0) {
            store.append(Record::Routed { id });
        }
    }

    /// Whether the durable state refuses new state (over `persistence.max_disk`).
    pub fn over_budget(&self) -> bool {
        self.limits
            .store
            .as_ref()
            .is_some_and(|store| store.over_budget())
    }

    /// Gives a message that came through the shared subscription `key` (`$share/{group}/
    /// {filter}`) to another member of the group: its last one ended without acknowledging
    /// it. Dropped and counted when the group has no member left.
    pub fn redeliver(&self, key: &str, message: Arc<Message>, qos: QoS) {
        let target = {
            let root = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
            shared(key).and_then(|(group, filter)| {
                let mut node = &*root;
                for level in filter.split('/') {
                    node = node.children.get(level)?;
                }
                let group = node.shared.get(group)?;
                let (_, sub) = group.pick(self.strategy, message.origin_hash)?;
                let delivery = Delivery {
                    qos: sub.options.qos.min_qos(qos),
                    retain: false,
                    ids: (sub.options.id != 0).then(|| Box::from([sub.options.id])),
                    shared: Some(Arc::clone(&group.key)),
                };
                Some((Arc::clone(&sub.session), delivery))
            })
        };
        let mut stored = 0;
        let result = match target {
            Some((session, delivery)) => {
                session.enqueue(message, delivery, &self.limits, &mut stored)
            }
            None => Err(DropReason::SessionEnded),
        };
        self.routed(stored);
        match result {
            Ok(_) => metrics().shared_redeliveries.inc(),
            Err(reason) => metrics().messages_dropped.inc(reason),
        }
    }

    /// Sets (or clears) the retained message of `message`'s topic, durably when persistence
    /// is on and `record`: returns the ticket the publisher's acknowledgement waits for.
    fn retain(&self, message: &Arc<Message>, record: bool) -> Option<Ticket> {
        let (change, result, held, ticket) = {
            let mut retained = self.retained.write().unwrap_or_else(|e| e.into_inner());
            let (change, result) = retained.set(message);
            // Appended under the lock, so that the stored order is the order of the sets.
            let store = self.limits.store.as_ref().filter(|_| record);
            let ticket = store.and_then(|store| {
                let stored =
                    (result.is_ok() && !message.payload.is_empty()).then(|| message.to_stored());
                let ticket = store.append(Record::Retain {
                    topic: message.topic.clone(),
                    message: stored,
                });
                store.acks_wait().then_some(ticket)
            });
            (change, result, (retained.len(), retained.bytes()), ticket)
        };
        metrics().retained_messages.add(change.count as i64);
        metrics().retained_bytes.add(change.bytes as i64);
        if let Err(refusal) = result {
            metrics().retained_refused.inc(refusal);
            if let Some(suppressed) = RETAIN_REFUSED_LOG.check() {
                tracing::warn!(
                    topic = &*message.topic,
                    limit = refusal.as_str(),
                    retained_messages = held.0,
                    retained_bytes = held.1,
                    suppressed,
                    "Retained message refused: the retained store is at \
                     mqtt.max_retained_messages or mqtt.max_retained_bytes \
                     (counted in heartwire_retained_refused_total)."
                );
            }
        }
        ticket
    }

    /// One step of a retained delivery: appends to `out` the next retained messages matching
    /// `cursor`, at most `max_messages` of them, visiting a bounded number of trie nodes (so the
    /// lock is held briefly whatever the filter). Returns true when the delivery is complete.
    pub fn retained_step(
        &self,
        cursor: &mut Cursor,
        max_messages: usize,
        out: &mut Vec<Arc<Message>>,
    ) -> bool {
        /// Trie nodes one step may visit: some tens of microseconds under the read lock.
        const MAX_VISITS: usize = 512;
        let retained = self.retained.read().unwrap_or_else(|e| e.into_inner());
        retained.step(cursor, MAX_VISITS, max_messages, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn router() -> Router {
        Router::new(&MqttConfig::default())
    }

    fn online(key: u64) -> Arc<Session> {
        let s = Arc::new(Session::new(format!("c{key}").into(), key));
        s.state().online = true;
        s
    }

    fn publish(router: &Router, topic: &str, qos: QoS, retain: bool, payload: &'static [u8]) {
        router.publish(Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos,
            retain,
            properties: None,
            origin: 0,
            origin_hash: 0,
        }));
    }

    fn queued(router: &Router, s: &Session) -> usize {
        let mut buf = bytes::BytesMut::new();
        s.state()
            .write_pending(&mut buf, usize::MAX, 100, router.limits())
            .0
    }

    #[test]
    fn fan_out_with_wildcards_and_dedup() {
        let router = router();
        let a = online(1);
        let b = online(2);
        router.subscribe(
            &a,
            [
                ("home/+/temp", QoS::AtLeastOnce),
                ("home/#", QoS::AtMostOnce),
            ],
        );
        router.subscribe(&b, [("home/kitchen/temp", QoS::AtMostOnce)]);
        publish(&router, "home/kitchen/temp", QoS::AtLeastOnce, false, b"21");
        assert_eq!(queued(&router, &a), 1, "one copy for overlapping filters");
        assert_eq!(queued(&router, &b), 1);
        publish(&router, "office/temp", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&router, &a) + queued(&router, &b), 0);
        router.unsubscribe(1, ["home/+/temp", "home/#"]);
        publish(&router, "home/kitchen/temp", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&router, &a), 0);
        assert_eq!(queued(&router, &b), 1);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let router = router();
        let a = online(1);
        router.subscribe(&a, [("#", QoS::AtMostOnce), ("+/x", QoS::AtMostOnce)]);
        publish(&router, "$SYS/x", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&router, &a), 0);
        router.subscribe(&a, [("$SYS/#", QoS::AtMostOnce)]);
        publish(&router, "$SYS/x", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&router, &a), 1);
    }

    #[test]
    fn retained_set_replace_clear() {
        let router = router();
        publish(&router, "r/1", QoS::AtMostOnce, true, b"one");
        publish(&router, "r/1", QoS::AtMostOnce, true, b"two");
        publish(&router, "r/2", QoS::AtMostOnce, true, b"x");
        publish(&router, "r/2", QoS::AtMostOnce, true, b"");
        let mut cursor = Cursor::new("r/#".into(), QoS::AtLeastOnce);
        let mut out = Vec::new();
        assert!(router.retained_step(&mut cursor, 10, &mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(&out[0].payload[..], b"two");
    }
}
