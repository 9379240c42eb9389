//! [`Image`]: the durable state that records add up to — what a restart loads, what a snapshot
//! writes back as fewer records.

use std::collections::{HashMap, HashSet, VecDeque};

use super::record::{Record, StoredAccess, StoredDelivery, StoredMessage, StoredOptions};

/// A persistent session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// Its client id.
    pub client_id: Box<str>,
    /// Its MQTT 5 session expiry interval in seconds (`None`: a 3.1.1 session).
    pub expiry: Option<u32>,
    /// Who its client logged in as, when access rules apply to it.
    pub access: Option<StoredAccess>,
    /// When its client left, in milliseconds since the Unix epoch; 0 while it was connected
    /// (when the broker stopped without saying so, it counts from the restart).
    pub left_at_ms: u64,
    /// Its subscriptions, in the order they were made.
    pub subscriptions: Vec<(Box<str>, StoredOptions)>,
    /// Its messages, oldest first: those sent (with a packet id) before those not sent yet.
    pub queue: VecDeque<Queued>,
    /// QoS 2 packet ids received and not yet released.
    pub incoming_qos2: Vec<u16>,
}

/// A message in a stored session's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The message's id (its body is in [`Image::messages`]).
    pub id: u64,
    /// How it goes to the session.
    pub delivery: StoredDelivery,
    /// The packet id it was sent with; 0 when not sent yet.
    pub pkid: u16,
    /// QoS 2: the client acknowledged it with PUBREC (only PUBREL is sent again).
    pub released: bool,
}

/// Durable state: retained messages, persistent sessions and the messages they hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Image {
    /// Retained messages by topic.
    pub retained: HashMap<Box<str>, StoredMessage>,
    /// Persistent sessions by key.
    pub sessions: HashMap<u64, StoredSession>,
    /// Message bodies by id, with how many queues hold each (plus one while it is being
    /// routed).
    pub messages: HashMap<u64, (StoredMessage, u32)>,
    /// Messages being routed: their [`Record::Routed`] has not come yet.
    pub routing: HashSet<u64>,
    /// The highest message id handed out.
    pub message_ids: u64,
    /// Records that referred to what was not there (a session or message already gone):
    /// ignored, as the broker would have.
    pub dangling: u64,
}

impl Image {
    /// Applies one record.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Header { message_ids, .. } => {
                self.message_ids = self.message_ids.max(message_ids);
            }
            Record::Retain { topic, message } => match message {
                Some(message) => {
                    self.retained.insert(topic, message);
                }
                None => {
                    self.retained.remove(&topic);
                }
            },
            Record::Message { id, message } => {
                self.message_ids = self.message_ids.max(id);
                // Held by its routing until Routed, whatever its queues do meanwhile.
                self.messages.insert(id, (message, 1));
                self.routing.insert(id);
            }
            Record::Routed { id } => {
                if self.routing.remove(&id) {
                    self.unref(id);
                }
            }
            Record::Session {
                key,
                client_id,
                expiry,
                access,
            } => {
                let session = self.sessions.entry(key).or_insert_with(|| StoredSession {
                    client_id: client_id.clone(),
                    expiry,
                    access: None,
                    left_at_ms: 0,
                    subscriptions: Vec::new(),
                    queue: VecDeque::new(),
                    incoming_qos2: Vec::new(),
                });
                session.client_id = client_id;
                session.expiry = expiry;
                session.access = access;
                session.left_at_ms = 0;
            }
            Record::Left { key, at_ms } => {
                if let Some(s) = self.session(key) {
                    s.left_at_ms = at_ms;
                }
            }
            Record::SessionEnd { key } => {
                if let Some(session) = self.sessions.remove(&key) {
                    for queued in session.queue {
                        self.unref(queued.id);
                    }
                }
            }
            Record::Subscribe {
                key,
                filter,
                options,
            } => {
                if let Some(s) = self.session(key) {
                    match s.subscriptions.iter_mut().find(|(f, _)| *f == filter) {
                        Some((_, existing)) => *existing = options,
                        None => s.subscriptions.push((filter, options)),
                    }
                }
            }
            Record::Unsubscribe { key, filter } => {
                if let Some(s) = self.session(key) {
                    s.subscriptions.retain(|(f, _)| *f != filter);
                }
            }
            Record::Enqueue { key, id, delivery } => {
                let known = self.messages.contains_key(&id);
                match self.sessions.get_mut(&key) {
                    Some(s) if known => {
                        s.queue.push_back(Queued {
                            id,
                            delivery,
                            pkid: 0,
                            released: false,
                        });
                        if let Some((_, refs)) = self.messages.get_mut(&id) {
                            *refs += 1;
                        }
                    }
                    _ => self.dangling += 1,
                }
            }
            Record::Sent { key, id, pkid } => {
                if let Some(s) = self.session(key) {
                    match s.queue.iter_mut().find(|q| q.id == id && q.pkid == 0) {
                        Some(q) => q.pkid = pkid,
                        None => self.dangling += 1,
                    }
                }
            }
            Record::Released { key, pkid } => {
                if let Some(q) = self
                    .session(key)
                    .and_then(|s| s.queue.iter_mut().find(|q| q.pkid == pkid))
                {
                    q.released = true;
                }
            }
            Record::Done { key, id } => {
                if let Some(s) = self.session(key) {
                    match s.queue.iter().position(|q| q.id == id) {
                        Some(i) => {
                            s.queue.remove(i);
                            self.unref(id);
                        }
                        None => self.dangling += 1,
                    }
                }
            }
            Record::Received { key, pkid } => {
                if let Some(s) = self.session(key) {
                    if !s.incoming_qos2.contains(&pkid) {
                        s.incoming_qos2.push(pkid);
                    }
                }
            }
            Record::Completed { key, pkid } => {
                if let Some(s) = self.session(key) {
                    s.incoming_qos2.retain(|p| *p != pkid);
                }
            }
        }
    }

    fn session(&mut self, key: u64) -> Option<&mut StoredSession> {
        let session = self.sessions.get_mut(&key);
        if session.is_none() {
            self.dangling += 1;
        }
        session
    }

    fn unref(&mut self, id: u64) {
        if let Some((_, refs)) = self.messages.get_mut(&id) {
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.messages.remove(&id);
            }
        }
    }

    /// Ends the routing of every message still being routed: at a start, what a stopped
    /// broker was routing is over (its remaining deliveries were never made).
    pub fn end_routing(&mut self) {
        for id in std::mem::take(&mut self.routing) {
            self.unref(id);
        }
    }

    /// Messages queued in all sessions together.
    pub fn queued(&self) -> usize {
        self.sessions.values().map(|s| s.queue.len()).sum()
    }

    /// The records that rebuild this image, for a snapshot of log generations before
    /// `generation`: header, retained messages, message bodies, then each session with its
    /// subscriptions and queue.
    pub fn records(&self, generation: u64) -> impl Iterator<Item = Record> + '_ {
        let header = std::iter::once(Record::Header {
            generation,
            message_ids: self.message_ids,
        });
        let retained = self.retained.iter().map(|(topic, m)| Record::Retain {
            topic: topic.clone(),
            message: Some(m.clone()),
        });
        let messages = self.messages.iter().map(|(id, (m, _))| Record::Message {
            id: *id,
            message: m.clone(),
        });
        // After the queues: the routing of these was over.
        let routed = self
            .messages
            .keys()
            .filter(|id| !self.routing.contains(id))
            .map(|id| Record::Routed { id: *id });
        let sessions = self.sessions.iter().flat_map(|(key, s)| {
            let key = *key;
            let head = [
                Record::Session {
                    key,
                    client_id: s.client_id.clone(),
                    expiry: s.expiry,
                    access: s.access.clone(),
                },
                Record::Left {
                    key,
                    at_ms: s.left_at_ms,
                },
            ];
            let subscriptions = s.subscriptions.iter().map(move |(f, o)| Record::Subscribe {
                key,
                filter: f.clone(),
                options: *o,
            });
            let queue = s.queue.iter().flat_map(move |q| {
                let enqueue = Record::Enqueue {
                    key,
                    id: q.id,
                    delivery: q.delivery.clone(),
                };
                let sent = (q.pkid != 0).then_some(Record::Sent {
                    key,
                    id: q.id,
                    pkid: q.pkid,
                });
                let released = q.released.then_some(Record::Released { key, pkid: q.pkid });
                std::iter::once(enqueue).chain(sent).chain(released)
            });
            let incoming = s
                .incoming_qos2
                .iter()
                .map(move |pkid| Record::Received { key, pkid: *pkid });
            head.into_iter()
                .chain(subscriptions)
                .chain(queue)
                .chain(incoming)
        });
        header
            .chain(retained)
            .chain(messages)
            .chain(sessions)
            .chain(routed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn message(topic: &str) -> StoredMessage {
        StoredMessage {
            topic: topic.into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
            retain: false,
            properties: None,
        }
    }

    fn delivery() -> StoredDelivery {
        StoredDelivery {
            qos: 1,
            retain: false,
            ids: None,
            shared: None,
        }
    }

    #[test]
    fn a_session_queue_follows_its_records_and_a_snapshot_rebuilds_it() {
        let mut image = Image::default();
        let records = vec![
            Record::Session {
                key: 1,
                client_id: "a".into(),
                expiry: None,
                access: None,
            },
            Record::Subscribe {
                key: 1,
                filter: "t/#".into(),
                options: StoredOptions {
                    qos: 1,
                    no_local: false,
                    retain_as_published: false,
                    id: 0,
                },
            },
            Record::Message {
                id: 10,
                message: message("t/1"),
            },
            Record::Enqueue {
                key: 1,
                id: 10,
                delivery: delivery(),
            },
            Record::Message {
                id: 11,
                message: message("t/2"),
            },
            Record::Enqueue {
                key: 1,
                id: 11,
                delivery: delivery(),
            },
            Record::Sent {
                key: 1,
                id: 10,
                pkid: 1,
            },
            Record::Sent {
                key: 1,
                id: 11,
                pkid: 2,
            },
            Record::Done { key: 1, id: 10 },
            Record::Routed { id: 10 },
            Record::Received { key: 1, pkid: 7 },
            Record::Left { key: 1, at_ms: 5 },
            Record::Retain {
                topic: "r".into(),
                message: Some(message("r")),
            },
        ];
        for r in records {
            image.apply(r);
        }
        assert_eq!(image.dangling, 0);
        assert_eq!(
            image.messages.len(),
            1,
            "message 10 is gone with its last queue"
        );
        let s = &image.sessions[&1];
        assert_eq!(s.queue.len(), 1);
        assert_eq!((s.queue[0].id, s.queue[0].pkid), (11, 2));
        assert_eq!(s.left_at_ms, 5);
        assert_eq!(s.incoming_qos2, [7]);

        let mut rebuilt = Image::default();
        for r in image.records(3) {
            rebuilt.apply(r);
        }
        assert_eq!(rebuilt, image);

        // Message 11 is still being routed: kept without a queue until its routing ends.
        image.apply(Record::SessionEnd { key: 1 });
        assert!(image.sessions.is_empty());
        assert_eq!(image.messages.len(), 1);
        image.end_routing();
        assert!(image.messages.is_empty());
        image.apply(Record::Done { key: 1, id: 11 });
        assert_eq!(image.dangling, 1);
    }
}
