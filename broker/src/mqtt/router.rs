//! The router: subscriptions (a trie of topic levels), retained messages, and fan-out of each
//! published message to the sessions whose filters match.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use rumqttc::mqttbytes::QoS;

use super::session::{Message, Session};
use super::topic;
use crate::metrics::metrics;

/// One level of the subscription trie.
#[derive(Default)]
struct Node {
    /// Child levels, including the wildcard levels "+" and "#".
    children: HashMap<Box<str>, Node>,
    /// Sessions whose filter ends at this node, by session key.
    subscribers: HashMap<u64, (Arc<Session>, QoS)>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }

    /// Removes `key` under the path; prunes nodes left empty. Returns whether it was there.
    fn remove(&mut self, mut levels: std::str::Split<'_, char>, key: u64) -> bool {
        match levels.next() {
            None => self.subscribers.remove(&key).is_some(),
            Some(level) => {
                let Some(child) = self.children.get_mut(level) else {
                    return false;
                };
                let removed = child.remove(levels, key);
                if child.is_empty() {
                    self.children.remove(level);
                }
                removed
            }
        }
    }

    /// Collects the subscribers of every filter below this node that matches `levels`.
    fn collect<'a>(
        &'a self,
        levels: &[&str],
        first: bool,
        out: &mut HashMap<u64, (&'a Arc<Session>, QoS)>,
    ) {
        // Topics starting with '$' are not matched by a wildcard in the first level.
        let dollar = first && levels.first().is_some_and(|l| l.starts_with('$'));
        if !dollar {
            if let Some(hash) = self.children.get("#") {
                add(out, &hash.subscribers);
            }
        }
        let Some((level, rest)) = levels.split_first() else {
            add(out, &self.subscribers);
            return;
        };
        if !dollar {
            if let Some(plus) = self.children.get("+") {
                plus.collect(rest, false, out);
            }
        }
        if let Some(exact) = self.children.get(*level) {
            exact.collect(rest, false, out);
        }
    }
}

/// Keeps the highest QoS when a session has several matching filters: it gets one copy.
fn add<'a>(
    out: &mut HashMap<u64, (&'a Arc<Session>, QoS)>,
    subscribers: &'a HashMap<u64, (Arc<Session>, QoS)>,
) {
    for (key, (session, qos)) in subscribers {
        out.entry(*key)
            .and_modify(|e| {
                if *qos > e.1 {
                    e.1 = *qos;
                }
            })
            .or_insert((session, *qos));
    }
}

/// Subscriptions and retained messages of the whole broker.
pub struct Router {
    subscriptions: RwLock<Node>,
    retained: Mutex<HashMap<Box<str>, Arc<Message>>>,
    max_queued: usize,
}

impl Router {
    /// An empty router; `max_queued` bounds each session's queue.
    pub fn new(max_queued: usize) -> Self {
        Self {
            subscriptions: RwLock::new(Node::default()),
            retained: Mutex::new(HashMap::new()),
            max_queued,
        }
    }

    /// Adds or updates a subscription. The filter must be valid. Returns true when it is new.
    pub fn subscribe(&self, session: &Arc<Session>, filter: &str, qos: QoS) -> bool {
        let mut root = self
            .subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let mut node = &mut *root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let new = node
            .subscribers
            .insert(session.key, (Arc::clone(session), qos))
            .is_none();
        if new {
            metrics().subscriptions.inc();
        }
        new
    }

    /// Removes subscriptions of one session.
    pub fn unsubscribe<'f>(&self, session_key: u64, filters: impl IntoIterator<Item = &'f str>) {
        let mut root = self
            .subscriptions
            .write()
            .unwrap_or_else(|e| e.into_inner());
        for filter in filters {
            if root.remove(filter.split('/'), session_key) {
                metrics().subscriptions.dec();
            }
        }
    }

    /// Routes a message: updates the retained store when the retain flag is set, then queues
    /// it for every matching session with min(publish QoS, granted QoS).
    pub fn publish(&self, message: Message) {
        metrics().messages_published.inc();
        let message = Arc::new(message);
        if message.retain {
            self.retain(&message);
        }
        let targets: Vec<(Arc<Session>, QoS)> = {
            let root = self.subscriptions.read().unwrap_or_else(|e| e.into_inner());
            let levels: Vec<&str> = message.topic.split('/').collect();
            let mut out = HashMap::new();
            root.collect(&levels, true, &mut out);
            out.into_values().map(|(s, q)| (Arc::clone(s), q)).collect()
        };
        for (session, granted) in targets {
            let qos = granted.min_qos(message.qos);
            if let Err(reason) = session.enqueue(Arc::clone(&message), qos, false, self.max_queued)
            {
                metrics()
                    .messages_dropped
                    .with_label_values(&[reason.as_str()])
                    .inc();
                tracing::debug!(
                    client_id = &*session.client_id,
                    topic = &*message.topic,
                    reason = reason.as_str(),
                    "Message dropped for subscriber."
                );
            }
        }
    }

    fn retain(&self, message: &Arc<Message>) {
        let mut retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
        if message.payload.is_empty() {
            if retained.remove(&message.topic).is_some() {
                metrics().retained_messages.dec();
            }
        } else if retained
            .insert(message.topic.clone(), Arc::clone(message))
            .is_none()
        {
            metrics().retained_messages.inc();
        }
    }

    /// Queues the retained messages matching a new subscription, with the retain flag set.
    pub fn send_retained(&self, session: &Session, filter: &str, granted: QoS) {
        let matching: Vec<Arc<Message>> = {
            let retained = self.retained.lock().unwrap_or_else(|e| e.into_inner());
            retained
                .values()
                .filter(|m| topic::matches(filter, &m.topic))
                .cloned()
                .collect()
        };
        for message in matching {
            let qos = granted.min_qos(message.qos);
            if let Err(reason) = session.enqueue(message, qos, true, self.max_queued) {
                metrics()
                    .messages_dropped
                    .with_label_values(&[reason.as_str()])
                    .inc();
            }
        }
    }
}

trait MinQos {
    fn min_qos(self, other: QoS) -> QoS;
}

impl MinQos for QoS {
    fn min_qos(self, other: QoS) -> QoS {
        if (self as u8) <= (other as u8) {
            self
        } else {
            other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn online(key: u64) -> Arc<Session> {
        let s = Arc::new(Session::new(format!("c{key}").into(), key));
        s.state().owner = Some(crate::presence::SessionId::new());
        s
    }

    fn publish(router: &Router, topic: &str, qos: QoS, retain: bool, payload: &'static [u8]) {
        router.publish(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos,
            retain,
        });
    }

    fn queued(s: &Session) -> usize {
        let mut buf = bytes::BytesMut::new();
        s.state().write_pending(&mut buf, usize::MAX, 100)
    }

    #[test]
    fn fan_out_with_wildcards_and_dedup() {
        let router = Router::new(100);
        let a = online(1);
        let b = online(2);
        router.subscribe(&a, "home/+/temp", QoS::AtLeastOnce);
        router.subscribe(&a, "home/#", QoS::AtMostOnce);
        router.subscribe(&b, "home/kitchen/temp", QoS::AtMostOnce);
        publish(&router, "home/kitchen/temp", QoS::AtLeastOnce, false, b"21");
        assert_eq!(queued(&a), 1, "one copy for overlapping filters");
        assert_eq!(queued(&b), 1);
        publish(&router, "office/temp", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&a) + queued(&b), 0);
        router.unsubscribe(1, ["home/+/temp", "home/#"]);
        publish(&router, "home/kitchen/temp", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&a), 0);
        assert_eq!(queued(&b), 1);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let router = Router::new(100);
        let a = online(1);
        router.subscribe(&a, "#", QoS::AtMostOnce);
        router.subscribe(&a, "+/x", QoS::AtMostOnce);
        publish(&router, "$SYS/x", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&a), 0);
        router.subscribe(&a, "$SYS/#", QoS::AtMostOnce);
        publish(&router, "$SYS/x", QoS::AtMostOnce, false, b"x");
        assert_eq!(queued(&a), 1);
    }

    #[test]
    fn retained_set_replace_clear() {
        let router = Router::new(100);
        let a = online(1);
        publish(&router, "r/1", QoS::AtMostOnce, true, b"one");
        publish(&router, "r/1", QoS::AtMostOnce, true, b"two");
        publish(&router, "r/2", QoS::AtMostOnce, true, b"x");
        publish(&router, "r/2", QoS::AtMostOnce, true, b"");
        router.send_retained(&a, "r/#", QoS::AtLeastOnce);
        assert_eq!(queued(&a), 1);
    }
}
