//! Retained messages: a trie of topic levels, bounded in count and bytes, and a resumable walk
//! that finds the messages matching a filter a few at a time.
//!
//! A subscription's retained messages are not gathered at SUBSCRIBE time: its [`Cursor`] is
//! walked in small steps as the client's socket takes bytes, so a filter that matches 100,000
//! messages neither holds the lock for long nor fills the session's queue. An exact filter is
//! one lookup; a wildcard filter walks only the branches its levels allow.
//!
//! Order: the walk visits topics in lexicographic order of their level lists (a node before its
//! children, children in byte order of their level), so a cursor is simply the level list of
//! the last node visited: everything up to it has been considered, and the next walk resumes
//! after it even if messages were added or removed meanwhile.

use std::collections::BTreeMap;
use std::ops::{Bound, ControlFlow};
use std::sync::Arc;

use rumqttc::mqttbytes::QoS;

use super::message::Message;
use crate::labels::RetainRefusal;

/// One level of the trie.
#[derive(Default)]
struct Node {
    /// Child levels in byte order (the walk's order).
    children: BTreeMap<Box<str>, Node>,
    /// The retained message of the topic ending here.
    message: Option<Arc<Message>>,
}

/// The retained messages of the broker.
pub struct RetainedStore {
    root: Node,
    count: usize,
    bytes: usize,
    max_count: usize,
    max_bytes: usize,
}

/// What [`RetainedStore::set`] changed, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Change {
    /// Change in the number of messages held.
    pub count: isize,
    /// Change in the bytes held.
    pub bytes: isize,
}

/// Where a retained delivery stands: one per subscription whose retained messages are still
/// being sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// The subscription's filter.
    pub filter: Box<str>,
    /// The QoS granted to the subscription.
    pub qos: QoS,
    /// The subscription's MQTT 5 identifier, 0 for none.
    pub id: u32,
    /// Levels of the last node visited; `None` before the first step.
    after: Option<Box<[Box<str>]>>,
}

impl Cursor {
    /// A cursor at the start of `filter`'s retained messages.
    pub fn new(filter: Box<str>, qos: QoS) -> Self {
        Self {
            filter,
            qos,
            id: 0,
            after: None,
        }
    }

    /// The same, for a subscription with identifier `id`.
    pub fn with_id(mut self, id: u32) -> Self {
        self.id = id;
        self
    }
}

/// Bytes a retained message is accounted for: topic and payload.
fn size(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

impl RetainedStore {
    /// An empty store holding at most `max_count` messages and `max_bytes` bytes of topics and
    /// payloads.
    pub fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            root: Node::default(),
            count: 0,
            bytes: 0,
            max_count,
            max_bytes,
        }
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of topics and payloads held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `message` as its topic's retained message, or clears the topic when the payload
    /// is empty. A refused message leaves the topic without a retained message rather than with
    /// an outdated one.
    pub fn set(&mut self, message: &Arc<Message>) -> (Change, Result<(), RetainRefusal>) {
        let old = self.take(&message.topic);
        let mut change = Change::default();
        if let Some(old) = &old {
            change.count -= 1;
            change.bytes -= size(old) as isize;
        }
        if message.payload.is_empty() {
            return (change, Ok(()));
        }
        let refusal = if self.count >= self.max_count {
            Some(RetainRefusal::Count)
        } else if self.bytes + size(message) > self.max_bytes {
            Some(RetainRefusal::Bytes)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            return (change, Err(refusal));
        }
        let mut node = &mut self.root;
        for level in message.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        node.message = Some(Arc::clone(message));
        self.count += 1;
        self.bytes += size(message);
        change.count += 1;
        change.bytes += size(message) as isize;
        (change, Ok(()))
    }

    /// Removes and returns `topic`'s retained message, pruning the branch left empty.
    fn take(&mut self, topic: &str) -> Option<Arc<Message>> {
        fn remove(node: &mut Node, mut levels: std::str::Split<'_, char>) -> Option<Arc<Message>> {
            match levels.next() {
                None => node.message.take(),
                Some(level) => {
                    let child = node.children.get_mut(level)?;
                    let taken = remove(child, levels);
                    if child.message.is_none() && child.children.is_empty() {
                        node.children.remove(level);
                    }
                    taken
                }
            }
        }
        let taken = remove(&mut self.root, topic.split('/'));
        if let Some(message) = &taken {
            self.count -= 1;
            self.bytes -= size(message);
        }
        taken
    }

    /// Appends to `out` the next retained messages matching `cursor`'s filter, visiting at
    /// most `max_visits` trie nodes (besides the path back to where the cursor stopped) and
    /// taking at most `max_messages`. Returns true when the cursor is finished.
    pub fn step(
        &self,
        cursor: &mut Cursor,
        max_visits: usize,
        max_messages: usize,
        out: &mut Vec<Arc<Message>>,
    ) -> bool {
        let filter: Vec<&str> = cursor.filter.split('/').collect();
        if !filter.iter().any(|l| *l == "+" || *l == "#") {
            // An exact filter names one topic.
            if cursor.after.is_none() {
                if let Some(message) = self.get(&cursor.filter) {
                    out.push(Arc::clone(message));
                }
            }
            return true;
        }
        let after: Vec<&str> = cursor
            .after
            .as_deref()
            .map(|a| a.iter().map(|l| &**l).collect())
            .unwrap_or_default();
        let mut walk = Walk {
            filter: &filter,
            after: cursor.after.is_some().then_some(&after[..]),
            path: Vec::new(),
            visits_left: max_visits.max(1),
            messages_left: max_messages.max(1),
            out,
            stopped_at: None,
        };
        let finished = walk
            .visit(&self.root, 0, cursor.after.is_some())
            .is_continue();
        cursor.after = walk.stopped_at.take();
        finished
    }

    /// The retained message of `topic`.
    fn get(&self, topic: &str) -> Option<&Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }
}

/// One resumable depth-first walk of the trie for a wildcard filter.
struct Walk<'t, 'w> {
    filter: &'w [&'w str],
    /// Where the previous step stopped (exclusive); `None` on the first step.
    after: Option<&'w [&'w str]>,
    /// Levels from the root to the node being visited.
    path: Vec<&'t str>,
    visits_left: usize,
    messages_left: usize,
    out: &'w mut Vec<Arc<Message>>,
    /// Set when the walk stops early: the path of the last node visited.
    stopped_at: Option<Box<[Box<str>]>>,
}

impl<'t> Walk<'t, '_> {
    /// Visits `node` (whose path is `self.path`) matched against filter level `fi`. `on_path`:
    /// the node lies on the path to where the previous step stopped, so its own message was
    /// already considered.
    fn visit(&mut self, node: &'t Node, fi: usize, on_path: bool) -> ControlFlow<()> {
        let multi = self.filter.get(fi) == Some(&"#");
        if !on_path {
            // A node's own topic matches when the filter ends here, or at "#" (which also
            // matches its parent level: "a/#" matches "a").
            if fi == self.filter.len() || multi {
                if let Some(message) = &node.message {
                    self.out.push(Arc::clone(message));
                    self.messages_left -= 1;
                }
            }
            self.visits_left -= 1;
            if self.visits_left == 0 || self.messages_left == 0 {
                self.stopped_at = Some(self.path.iter().map(|l| Box::from(*l)).collect());
                return ControlFlow::Break(());
            }
        }
        let Some(&level) = self.filter.get(fi) else {
            return ControlFlow::Continue(());
        };
        let depth = self.path.len();
        // On the resume path, children before the resume point are done.
        let lower = self
            .after
            .filter(|_| on_path)
            .and_then(|after| after.get(depth).copied());
        match level {
            "+" | "#" => {
                let next = if multi { fi } else { fi + 1 };
                let children = match lower {
                    Some(lower) => node
                        .children
                        .range::<str, _>((Bound::Included(lower), Bound::Unbounded)),
                    None => node.children.range::<str, _>(..),
                };
                for (key, child) in children {
                    // Topics starting with '$' are not matched by a wildcard at the first level.
                    if depth == 0 && key.starts_with('$') {
                        continue;
                    }
                    self.path.push(key);
                    let flow = self.visit(child, next, lower == Some(&**key));
                    self.path.pop();
                    flow?;
                }
            }
            exact => {
                if lower.is_some_and(|lower| exact < lower) {
                    return ControlFlow::Continue(());
                }
                if let Some((key, child)) = node.children.get_key_value(exact) {
                    self.path.push(key);
                    let flow = self.visit(child, fi + 1, lower == Some(exact));
                    self.path.pop();
                    flow?;
                }
            }
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::topic;
    use bytes::Bytes;

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: None,
            origin: 0,
            origin_hash: 0,
        })
    }

    fn store(topics: &[&str]) -> RetainedStore {
        let mut s = RetainedStore::new(usize::MAX, usize::MAX);
        for t in topics {
            assert!(s.set(&msg(t, b"x")).1.is_ok());
        }
        s
    }

    /// Every match of `filter`, walked in steps of `visits` nodes.
    fn walk_all(s: &RetainedStore, filter: &str, visits: usize) -> Vec<String> {
        let mut cursor = Cursor::new(filter.into(), QoS::AtMostOnce);
        let mut out = Vec::new();
        for _ in 0..10_000 {
            if s.step(&mut cursor, visits, usize::MAX, &mut out) {
                return out.iter().map(|m| m.topic.to_string()).collect();
            }
        }
        panic!("walk of {filter} does not finish");
    }

    const TOPICS: &[&str] = &[
        "a", "a/b", "a/b/c", "a/c", "a//d", "b/b", "$SYS/x", "$SYS/y/z", "/lead", "z/b/c",
    ];

    #[test]
    fn walks_match_the_topic_rules_at_every_step_size() {
        let s = store(TOPICS);
        for filter in [
            "#", "+", "a/#", "a/+", "+/b", "+/+/c", "$SYS/#", "+/#", "a/b", "a//d", "/+", "q/#",
            "a/+/c", "+/b/#",
        ] {
            let mut expected: Vec<String> = TOPICS
                .iter()
                .filter(|t| topic::matches(filter, t))
                .map(|t| t.to_string())
                .collect();
            expected.sort();
            for visits in [1, 2, 3, 100] {
                let mut got = walk_all(&s, filter, visits);
                got.sort();
                assert_eq!(got, expected, "{filter} in steps of {visits}");
            }
        }
    }

    #[test]
    fn a_cursor_resumes_where_it_stopped_while_the_store_changes() {
        let mut s = store(&["r/1", "r/2", "r/3", "r/4"]);
        let mut cursor = Cursor::new("r/+".into(), QoS::AtLeastOnce);
        let mut out = Vec::new();
        assert!(!s.step(&mut cursor, 100, 2, &mut out));
        assert_eq!(out.len(), 2);
        // Behind the cursor: not sent. Ahead of it: sent. Removed ahead: not sent.
        assert!(s.set(&msg("r/0", b"x")).1.is_ok());
        assert!(s.set(&msg("r/5", b"x")).1.is_ok());
        assert!(s.set(&msg("r/3", b"")).1.is_ok());
        while !s.step(&mut cursor, 1, 1, &mut out) {}
        let topics: Vec<&str> = out.iter().map(|m| &*m.topic).collect();
        assert_eq!(topics, ["r/1", "r/2", "r/4", "r/5"]);
    }

    #[test]
    fn exact_filters_are_one_lookup() {
        let s = store(TOPICS);
        let mut cursor = Cursor::new("a/b/c".into(), QoS::AtMostOnce);
        let mut out = Vec::new();
        assert!(s.step(&mut cursor, 1, 1, &mut out));
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn limits_refuse_and_replace_clears() {
        let mut s = RetainedStore::new(2, 10);
        assert_eq!(s.set(&msg("a", b"1234")).1, Ok(()));
        assert_eq!(s.set(&msg("b", b"1")).1, Ok(()));
        assert_eq!(s.set(&msg("c", b"1")).1, Err(RetainRefusal::Count));
        // Replacing keeps the count; a replacement over the byte limit leaves the topic empty.
        assert_eq!(s.set(&msg("b", b"12")).1, Ok(()));
        assert_eq!((s.len(), s.bytes()), (2, 5 + 3));
        let (change, refused) = s.set(&msg("b", b"1234567"));
        assert_eq!(refused, Err(RetainRefusal::Bytes));
        assert_eq!(
            change,
            Change {
                count: -1,
                bytes: -3
            }
        );
        assert_eq!((s.len(), s.bytes()), (1, 5));
        // Clearing prunes the branch.
        assert_eq!(s.set(&msg("a", b"")).1, Ok(()));
        assert!(s.is_empty() && s.root.children.is_empty());
    }
}
