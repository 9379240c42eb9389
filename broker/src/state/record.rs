//! The records the broker's durable state is made of, and their portable binary form.
//!
//! Every change to durable state is one [`Record`]: a retained message set or cleared, a
//! persistent session begun, left or ended, a subscription, a message queued for a session,
//! sent, released or done, a QoS 2 packet id received or completed. Applied in order they give
//! the state ([`super::image::Image`]); a snapshot is the same records, fewer of them.
//!
//! On disk each record is framed as `length (u32 LE) | CRC-32C of the body (u32 LE) | body`; a
//! frame whose length or checksum does not hold is a torn write (the end of a crashed log) or
//! corruption. The body is a tag byte and the record's fields, little-endian, strings and byte
//! strings preceded by their length. Nothing in it depends on the engine that stores it: an
//! export ([`super::StateStore::export`]) is a stream of these frames.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A message as the durable state keeps it (a retained message, or one queued for sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its topic.
    pub topic: Box<str>,
    /// Its payload.
    pub payload: Bytes,
    /// The QoS it was published with (0, 1 or 2).
    pub qos: u8,
    /// The publisher's retain flag.
    pub retain: bool,
    /// Its MQTT 5 properties, when it has some.
    pub properties: Option<StoredProperties>,
}

/// The MQTT 5 properties a stored message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredProperties {
    /// When it expires, in milliseconds since the Unix epoch; 0 when it never does.
    pub expires_at_ms: u64,
    /// The properties forwarded unchanged, in their wire encoding.
    pub forwarded: Bytes,
}

/// The options of a stored subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredOptions {
    /// Granted QoS.
    pub qos: u8,
    /// MQTT 5 no local.
    pub no_local: bool,
    /// MQTT 5 retain as published.
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier, 0 for none.
    pub id: u32,
}

/// Who a persistent session's client logged in as, so that its access rules can be made
/// again when the session is restored (before its client comes back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAccess {
    /// The user name its rules are under.
    pub username: Option<Box<str>>,
    /// Topic filters its credentials grant to publish.
    pub publish: Vec<Box<str>>,
    /// Topic filters its credentials grant to subscribe.
    pub subscribe: Vec<Box<str>>,
}

/// How a queued message goes to its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDelivery {
    /// The QoS it is sent with (1 or 2: QoS 0 is never stored).
    pub qos: u8,
    /// The retain flag it is sent with.
    pub retain: bool,
    /// The identifiers of the subscriptions it matched.
    pub ids: Option<Box<[u32]>>,
    /// The shared subscription it came through.
    pub shared: Option<Arc<str>>,
}

/// One change of durable state. Sessions are named by a key (the broker's session
/// incarnation), their client id given once by [`Record::Session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The first record of a snapshot: it holds the state of every log before `generation`.
    Header {
        /// The first log generation not in the snapshot.
        generation: u64,
        /// The highest message id handed out so far.
        message_ids: u64,
    },
    /// `topic`'s retained message is now `message`; `None` clears it.
    Retain {
        /// The topic.
        topic: Box<str>,
        /// The message, or `None`.
        message: Option<StoredMessage>,
    },
    /// A message body, queued for sessions by [`Record::Enqueue`]s that follow until its
    /// [`Record::Routed`]; gone once routing is over and no queue holds it.
    Message {
        /// Its id.
        id: u64,
        /// The message.
        message: StoredMessage,
    },
    /// Session `key` of `client_id` is persistent, with this session expiry interval (`None`:
    /// an MQTT 3.1.1 session, which expires after `mqtt.persistent_session_expiry`); its
    /// client is connected.
    Session {
        /// The session's key.
        key: u64,
        /// Its client id.
        client_id: Box<str>,
        /// Its MQTT 5 session expiry interval in seconds.
        expiry: Option<u32>,
        /// Who its client logged in as, when access rules apply to it.
        access: Option<StoredAccess>,
    },
    /// Session `key`'s client left at `at_ms` (milliseconds since the Unix epoch): its expiry
    /// counts from then.
    Left {
        /// The session's key.
        key: u64,
        /// When.
        at_ms: u64,
    },
    /// Session `key` ended (expired, cleaned or made non-persistent): all of it is gone.
    SessionEnd {
        /// The session's key.
        key: u64,
    },
    /// Session `key` subscribed to `filter` (or changed its options).
    Subscribe {
        /// The session's key.
        key: u64,
        /// The topic filter.
        filter: Box<str>,
        /// Its options.
        options: StoredOptions,
    },
    /// Session `key` unsubscribed from `filter`.
    Unsubscribe {
        /// The session's key.
        key: u64,
        /// The topic filter.
        filter: Box<str>,
    },
    /// Message `id` is queued for session `key`, last.
    Enqueue {
        /// The session's key.
        key: u64,
        /// The message id.
        id: u64,
        /// How it goes to the session.
        delivery: StoredDelivery,
    },
    /// The queued message `id` of session `key` was sent with packet id `pkid`.
    Sent {
        /// The session's key.
        key: u64,
        /// The message id.
        id: u64,
        /// The packet id.
        pkid: u16,
    },
    /// Session `key`'s client received the QoS 2 message sent with `pkid` (PUBREC): only its
    /// PUBREL is sent again.
    Released {
        /// The session's key.
        key: u64,
        /// The packet id.
        pkid: u16,
    },
    /// The queued message `id` of session `key` is done: acknowledged, or dropped.
    Done {
        /// The session's key.
        key: u64,
        /// The message id.
        id: u64,
    },
    /// Session `key` received a QoS 2 PUBLISH with `pkid` and routed it: a redelivery of it is
    /// not routed again until PUBREL.
    Received {
        /// The session's key.
        key: u64,
        /// The packet id.
        pkid: u16,
    },
    /// Session `key`'s client released the QoS 2 packet id `pkid` (PUBREL).
    Completed {
        /// The session's key.
        key: u64,
        /// The packet id.
        pkid: u16,
    },
    /// Message `id` is routed: no more [`Record::Enqueue`] of it follows (until then its body
    /// is kept even if every queue that had it is done with it).
    Routed {
        /// The message id.
        id: u64,
    },
}

/// A frame or body that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a frame (a torn write at the end of a log).
    #[error("truncated record")]
    Truncated,
    /// The frame's checksum does not match its body.
    #[error("checksum mismatch")]
    Checksum,
    /// The body is not a record this version knows.
    #[error("malformed record ({0})")]
    Malformed(&'static str),
}

/// CRC-32C (Castagnoli), with the hardware instruction where there is one.
static CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// Bytes of a frame's header: length and checksum.
pub const FRAME_HEADER: usize = 8;

/// Most bytes of one record's body: a message of the largest packet MQTT allows and its
/// properties fit.
pub const MAX_BODY: usize = 300 * 1024 * 1024;

const HEADER: u8 = 0;
const RETAIN: u8 = 1;
const MESSAGE: u8 = 2;
const SESSION: u8 = 3;
const LEFT: u8 = 4;
const SESSION_END: u8 = 5;
const SUBSCRIBE: u8 = 6;
const UNSUBSCRIBE: u8 = 7;
const ENQUEUE: u8 = 8;
const SENT: u8 = 9;
const RELEASED: u8 = 10;
const DONE: u8 = 11;
const RECEIVED: u8 = 12;
const COMPLETED: u8 = 13;
const ROUTED: u8 = 14;

impl Record {
    /// Appends the record's frame to `out`.
    pub fn write_frame(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u64_le(0);
        self.write_body(out);
        let body_len = out.len() - start - FRAME_HEADER;
        let crc = CRC.checksum(&out[start + FRAME_HEADER..]);
        out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads the frame at the start of `buf`: the record and the frame's length.
    pub fn read_frame(buf: &[u8]) -> Result<(Record, usize), DecodeError> {
        if buf.len() < FRAME_HEADER {
            return Err(DecodeError::Truncated);
        }
        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len > MAX_BODY {
            return Err(DecodeError::Malformed("length"));
        }
        let Some(body) = buf.get(FRAME_HEADER..FRAME_HEADER + len) else {
            return Err(DecodeError::Truncated);
        };
        if CRC.checksum(body) != crc {
            return Err(DecodeError::Checksum);
        }
        let record = Record::read_body(body)?;
        Ok((record, FRAME_HEADER + len))
    }

    fn write_body(&self, out: &mut BytesMut) {
        match self {
            Record::Header {
                generation,
                message_ids,
            } => {
                out.put_u8(HEADER);
                out.put_u64_le(*generation);
                out.put_u64_le(*message_ids);
            }
            Record::Retain { topic, message } => {
                out.put_u8(RETAIN);
                put_str(out, topic);
                match message {
                    None => out.put_u8(0),
                    Some(message) => {
                        out.put_u8(1);
                        put_message(out, message);
                    }
                }
            }
            Record::Message { id, message } => {
                out.put_u8(MESSAGE);
                out.put_u64_le(*id);
                put_message(out, message);
            }
            Record::Session {
                key,
                client_id,
                expiry,
                access,
            } => {
                out.put_u8(SESSION);
                out.put_u64_le(*key);
                put_str(out, client_id);
                match expiry {
                    None => out.put_u8(0),
                    Some(secs) => {
                        out.put_u8(1);
                        out.put_u32_le(*secs);
                    }
                }
                match access {
                    None => out.put_u8(0),
                    Some(a) => {
                        out.put_u8(1 | u8::from(a.username.is_some()) << 1);
                        put_str(out, a.username.as_deref().unwrap_or(""));
                        for list in [&a.publish, &a.subscribe] {
                            out.put_u32_le(list.len() as u32);
                            for filter in list {
                                put_str(out, filter);
                            }
                        }
                    }
                }
            }
            Record::Left { key, at_ms } => {
                out.put_u8(LEFT);
                out.put_u64_le(*key);
                out.put_u64_le(*at_ms);
            }
            Record::SessionEnd { key } => {
                out.put_u8(SESSION_END);
                out.put_u64_le(*key);
            }
            Record::Subscribe {
                key,
                filter,
                options,
            } => {
                out.put_u8(SUBSCRIBE);
                out.put_u64_le(*key);
                put_str(out, filter);
                out.put_u8(
                    options.qos
                        | u8::from(options.no_local) << 2
                        | u8::from(options.retain_as_published) << 3,
                );
                out.put_u32_le(options.id);
            }
            Record::Unsubscribe { key, filter } => {
                out.put_u8(UNSUBSCRIBE);
                out.put_u64_le(*key);
                put_str(out, filter);
            }
            Record::Enqueue { key, id, delivery } => {
                out.put_u8(ENQUEUE);
                out.put_u64_le(*key);
                out.put_u64_le(*id);
                out.put_u8(delivery.qos | u8::from(delivery.retain) << 2);
                let ids = delivery.ids.as_deref().unwrap_or(&[]);
                out.put_u16_le(ids.len() as u16);
                for id in ids {
                    out.put_u32_le(*id);
                }
                put_str(out, delivery.shared.as_deref().unwrap_or(""));
            }
            Record::Sent { key, id, pkid } => {
                out.put_u8(SENT);
                out.put_u64_le(*key);
                out.put_u64_le(*id);
                out.put_u16_le(*pkid);
            }
            Record::Released { key, pkid } => key_pkid(out, RELEASED, *key, *pkid),
            Record::Done { key, id } => {
                out.put_u8(DONE);
                out.put_u64_le(*key);
                out.put_u64_le(*id);
            }
            Record::Received { key, pkid } => key_pkid(out, RECEIVED, *key, *pkid),
            Record::Completed { key, pkid } => key_pkid(out, COMPLETED, *key, *pkid),
            Record::Routed { id } => {
                out.put_u8(ROUTED);
                out.put_u64_le(*id);
            }
        }
    }

    fn read_body(mut b: &[u8]) -> Result<Record, DecodeError> {
        let b = &mut b;
        let tag = u8_(b)?;
        let record = match tag {
            HEADER => Record::Header {
                generation: u64_(b)?,
                message_ids: u64_(b)?,
            },
            RETAIN => Record::Retain {
                topic: str_(b)?,
                message: match u8_(b)? {
                    0 => None,
                    _ => Some(message(b)?),
                },
            },
            MESSAGE => Record::Message {
                id: u64_(b)?,
                message: message(b)?,
            },
            SESSION => Record::Session {
                key: u64_(b)?,
                client_id: str_(b)?,
                expiry: match u8_(b)? {
                    0 => None,
                    _ => Some(u32_(b)?),
                },
                access: match u8_(b)? {
                    0 => None,
                    flags => {
                        let username = str_(b)?;
                        let mut lists = [Vec::new(), Vec::new()];
                        for list in &mut lists {
                            let n = u32_(b)? as usize;
                            if n > b.len() {
                                return Err(DecodeError::Malformed("grant count"));
                            }
                            for _ in 0..n {
                                list.push(str_(b)?);
                            }
                        }
                        let [publish, subscribe] = lists;
                        Some(StoredAccess {
                            username: (flags & 2 != 0).then_some(username),
                            publish,
                            subscribe,
                        })
                    }
                },
            },
            LEFT => Record::Left {
                key: u64_(b)?,
                at_ms: u64_(b)?,
            },
            SESSION_END => Record::SessionEnd { key: u64_(b)? },
            SUBSCRIBE => {
                let key = u64_(b)?;
                let filter = str_(b)?;
                let flags = u8_(b)?;
                Record::Subscribe {
                    key,
                    filter,
                    options: StoredOptions {
                        qos: qos(flags & 3)?,
                        no_local: flags & 4 != 0,
                        retain_as_published: flags & 8 != 0,
                        id: u32_(b)?,
                    },
                }
            }
            UNSUBSCRIBE => Record::Unsubscribe {
                key: u64_(b)?,
                filter: str_(b)?,
            },
            ENQUEUE => {
                let key = u64_(b)?;
                let id = u64_(b)?;
                let flags = u8_(b)?;
                let count = usize::from(u16_(b)?);
                let ids = (0..count)
                    .map(|_| u32_(b))
                    .collect::<Result<Box<[u32]>, _>>()?;
                let shared = str_(b)?;
                Record::Enqueue {
                    key,
                    id,
                    delivery: StoredDelivery {
                        qos: qos(flags & 3)?,
                        retain: flags & 4 != 0,
                        ids: (!ids.is_empty()).then_some(ids),
                        shared: (!shared.is_empty()).then(|| Arc::from(shared)),
                    },
                }
            }
            SENT => Record::Sent {
                key: u64_(b)?,
                id: u64_(b)?,
                pkid: u16_(b)?,
            },
            RELEASED => Record::Released {
                key: u64_(b)?,
                pkid: u16_(b)?,
            },
            DONE => Record::Done {
                key: u64_(b)?,
                id: u64_(b)?,
            },
            RECEIVED => Record::Received {
                key: u64_(b)?,
                pkid: u16_(b)?,
            },
            COMPLETED => Record::Completed {
                key: u64_(b)?,
                pkid: u16_(b)?,
            },
            ROUTED => Record::Routed { id: u64_(b)? },
            _ => return Err(DecodeError::Malformed("tag")),
        };
        if !b.is_empty() {
            return Err(DecodeError::Malformed("trailing bytes"));
        }
        Ok(record)
    }
}

fn key_pkid(out: &mut BytesMut, tag: u8, key: u64, pkid: u16) {
    out.put_u8(tag);
    out.put_u64_le(key);
    out.put_u16_le(pkid);
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32_le(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32_le(b.len() as u32);
    out.put_slice(b);
}

fn put_message(out: &mut BytesMut, m: &StoredMessage) {
    put_str(out, &m.topic);
    put_bytes(out, &m.payload);
    let flags = m.qos | u8::from(m.retain) << 2 | u8::from(m.properties.is_some()) << 3;
    out.put_u8(flags);
    if let Some(p) = &m.properties {
        out.put_u64_le(p.expires_at_ms);
        put_bytes(out, &p.forwarded);
    }
}

fn message(b: &mut &[u8]) -> Result<StoredMessage, DecodeError> {
    let topic = str_(b)?;
    let payload = bytes_(b)?;
    let flags = u8_(b)?;
    let properties = if flags & 8 != 0 {
        Some(StoredProperties {
            expires_at_ms: u64_(b)?,
            forwarded: bytes_(b)?,
        })
    } else {
        None
    };
    Ok(StoredMessage {
        topic,
        payload,
        qos: qos(flags & 3)?,
        retain: flags & 4 != 0,
        properties,
    })
}

fn qos(q: u8) -> Result<u8, DecodeError> {
    if q <= 2 {
        Ok(q)
    } else {
        Err(DecodeError::Malformed("qos"))
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if b.len() < n {
        return Err(DecodeError::Malformed("short body"));
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn u8_(b: &mut &[u8]) -> Result<u8, DecodeError> {
    Ok(take(b, 1)?[0])
}

fn u16_(b: &mut &[u8]) -> Result<u16, DecodeError> {
    Ok(take(b, 2)?.get_u16_le())
}

fn u32_(b: &mut &[u8]) -> Result<u32, DecodeError> {
    Ok(take(b, 4)?.get_u32_le())
}

fn u64_(b: &mut &[u8]) -> Result<u64, DecodeError> {
    Ok(take(b, 8)?.get_u64_le())
}

fn bytes_(b: &mut &[u8]) -> Result<Bytes, DecodeError> {
    let n = u32_(b)? as usize;
    Ok(Bytes::copy_from_slice(take(b, n)?))
}

fn str_(b: &mut &[u8]) -> Result<Box<str>, DecodeError> {
    let n = u32_(b)? as usize;
    std::str::from_utf8(take(b, n)?)
        .map(Box::from)
        .map_err(|_| DecodeError::Malformed("utf-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(expiring: bool) -> StoredMessage {
        StoredMessage {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"payload"),
            qos: 1,
            retain: true,
            properties: expiring.then(|| StoredProperties {
                expires_at_ms: 1_700_000_000_000,
                forwarded: Bytes::from_static(&[0x26, 0, 1, b'k', 0, 1, b'v']),
            }),
        }
    }

    pub(crate) fn every_kind() -> Vec<Record> {
        vec![
            Record::Header {
                generation: 7,
                message_ids: 99,
            },
            Record::Retain {
                topic: "r".into(),
                message: Some(message(true)),
            },
            Record::Retain {
                topic: "r".into(),
                message: None,
            },
            Record::Message {
                id: 5,
                message: message(false),
            },
            Record::Session {
                key: 3,
                client_id: "dev-1".into(),
                expiry: Some(3600),
                access: Some(StoredAccess {
                    username: Some("alice".into()),
                    publish: vec!["a/#".into()],
                    subscribe: vec!["b/+".into(), "c".into()],
                }),
            },
            Record::Session {
                key: 4,
                client_id: "dev-2".into(),
                expiry: None,
                access: None,
            },
            Record::Session {
                key: 5,
                client_id: "dev-3".into(),
                expiry: None,
                access: Some(StoredAccess {
                    username: None,
                    publish: Vec::new(),
                    subscribe: Vec::new(),
                }),
            },
            Record::Left { key: 3, at_ms: 42 },
            Record::SessionEnd { key: 4 },
            Record::Subscribe {
                key: 3,
                filter: "a/+".into(),
                options: StoredOptions {
                    qos: 2,
                    no_local: true,
                    retain_as_published: true,
                    id: 17,
                },
            },
            Record::Unsubscribe {
                key: 3,
                filter: "a/+".into(),
            },
            Record::Enqueue {
                key: 3,
                id: 5,
                delivery: StoredDelivery {
                    qos: 1,
                    retain: true,
                    ids: Some(Box::from([1, 2])),
                    shared: Some("$share/g/a".into()),
                },
            },
            Record::Sent {
                key: 3,
                id: 5,
                pkid: 9,
            },
            Record::Released { key: 3, pkid: 9 },
            Record::Done { key: 3, id: 5 },
            Record::Received { key: 3, pkid: 1 },
            Record::Completed { key: 3, pkid: 1 },
            Record::Routed { id: 5 },
        ]
    }

    #[test]
    fn every_record_round_trips_and_a_torn_or_flipped_frame_is_caught() {
        let mut buf = BytesMut::new();
        for record in every_kind() {
            record.write_frame(&mut buf);
        }
        let mut at = 0;
        for record in every_kind() {
            let (read, len) = Record::read_frame(&buf[at..]).expect("decodes");
            assert_eq!(read, record);
            at += len;
        }
        assert_eq!(at, buf.len());
        // Torn at every length short of the whole first frame.
        let (_, first) = Record::read_frame(&buf).expect("decodes");
        for cut in 0..first {
            assert_eq!(
                Record::read_frame(&buf[..cut]).err(),
                Some(DecodeError::Truncated),
                "cut at {cut}"
            );
        }
        // A flipped bit anywhere in a body fails its checksum.
        for i in FRAME_HEADER..first {
            let mut copy = buf[..first].to_vec();
            copy[i] ^= 0x10;
            assert_eq!(Record::read_frame(&copy).err(), Some(DecodeError::Checksum));
        }
    }
}
