//! MQTT 3.1.1 and 5 on the wire: the few packets the generator sends, encoded by hand, and a
//! frame reader that splits the incoming stream by fixed header and remaining length.
//!
//! Only what the scenarios need: CONNECT (clean session, no will, optionally a user name and
//! password; or a persistent session, 3.1.1 only), SUBSCRIBE, PUBLISH at QoS 0 or 1, PUBACK, PINGREQ and DISCONNECT out; CONNACK,
//! SUBACK, PUBLISH and PUBACK understood in. Anything else that arrives is still framed
//! correctly and left to the caller to ignore. MQTT 5 differs here only by protocol level 5
//! and a property length after the variable header: the generator sends no properties (an
//! empty list, one byte 0) and skips the ones the broker sends. Keeping the codec this small
//! keeps the generator cheap and identical for every broker.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Packet types (the high nibble of the fixed header's first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const SUBACK: u8 = 9;

/// The protocol version a connection speaks (`--protocol 4|5`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1, protocol level 4.
    #[default]
    V311,
    /// MQTT 5, protocol level 5: a property length in CONNECT, CONNACK, PUBLISH, SUBSCRIBE,
    /// SUBACK (and PUBACK when it carries a reason code).
    V5,
}

impl Protocol {
    /// The protocol level of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }

    /// From the protocol level (4 or 5).
    pub fn from_level(level: u8) -> Option<Self> {
        match level {
            4 => Some(Self::V311),
            5 => Some(Self::V5),
            _ => None,
        }
    }

    /// Appends an empty property list (MQTT 5) or nothing (3.1.1).
    fn put_no_properties(self, out: &mut Vec<u8>) {
        if self == Self::V5 {
            out.push(0);
        }
    }

    /// Skips the property list at the start of `body` (MQTT 5), or nothing (3.1.1).
    fn skip_properties(self, body: &[u8]) -> Option<&[u8]> {
        match self {
            Self::V311 => Some(body),
            Self::V5 => {
                let (header_len, total) = varint(body)?;
                body.get(header_len + total..)
            }
        }
    }
}

/// Decodes a variable byte integer at the start of `buf`: (its length in bytes, its value).
fn varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for i in 0..4 {
        let byte = *buf.get(i)?;
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((i + 1, value));
        }
    }
    None
}

/// The largest incoming packet accepted (MQTT's own limit is 256 MiB); a larger remaining
/// length means the stream is garbage, not a packet worth buffering.
const MAX_INCOMING: usize = 16 * 1024 * 1024;

/// Encodes the MQTT variable-length "remaining length" (1 to 4 bytes).
fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends a UTF-8 string with its two-byte length prefix.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("MQTT strings are at most 65,535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Fixed header plus body in one buffer.
fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first_byte);
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with clean session (MQTT 5: clean start, session expiry 0), no will and no user
/// name.
pub fn connect(protocol: Protocol, client_id: &str, keep_alive_s: u16) -> Vec<u8> {
    connect_with_login(protocol, client_id, keep_alive_s, None)
}

/// CONNECT with clean session, no will, and the user name and password of `login` if given.
pub fn connect_with_login(
    protocol: Protocol,
    client_id: &str,
    keep_alive_s: u16,
    login: Option<(&str, &str)>,
) -> Vec<u8> {
    let login_len = login.map_or(0, |(user, password)| 4 + user.len() + password.len());
    let mut body = Vec::with_capacity(13 + client_id.len() + login_len);
    put_str(&mut body, "MQTT");
    body.push(protocol.level());
    // Connect flags: clean session, plus user name (0x80) and password (0x40) with a login.
    body.push(if login.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    protocol.put_no_properties(&mut body);
    put_str(&mut body, client_id);
    if let Some((user, password)) = login {
        put_str(&mut body, user);
        put_str(&mut body, password);
    }
    packet(0x10, &body)
}

/// MQTT 3.1.1 CONNECT without clean session (the broker keeps the session, its subscriptions
/// and its queued QoS 1 messages, after the connection), no will and no user name.
pub fn connect_persistent(client_id: &str, keep_alive_s: u16) -> Vec<u8> {
    let mut packet = connect(Protocol::V311, client_id, keep_alive_s);
    // The connect flags follow the fixed header (2 bytes: the packet is short), the protocol
    // name (6) and level (1).
    packet[9] &= !0x02;
    packet
}

/// SUBSCRIBE of every filter at `qos`, in one packet (MQTT 5: the options byte holds only the
/// QoS: local messages, retain as published 0, retained messages sent).
pub fn subscribe<'a>(
    protocol: Protocol,
    packet_id: u16,
    filters: impl IntoIterator<Item = &'a str>,
    qos: u8,
) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    protocol.put_no_properties(&mut body);
    for filter in filters {
        put_str(&mut body, filter);
        body.push(qos); // requested QoS
    }
    packet(0x82, &body)
}

/// PUBLISH at QoS 0 (`packet_id` `None`) or QoS 1 with `packet_id`, optionally retained.
pub fn publish(
    protocol: Protocol,
    topic: &str,
    payload: &[u8],
    packet_id: Option<u16>,
    retain: bool,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + topic.len() + payload.len());
    put_str(&mut body, topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    protocol.put_no_properties(&mut body);
    body.extend_from_slice(payload);
    let qos_bits = if packet_id.is_some() { 0x02 } else { 0 };
    packet(0x30 | qos_bits | u8::from(retain), &body)
}

/// Where the packet id of an encoded QoS 1 `publish` lies in it, to renumber a copy.
pub fn publish_packet_id_at(packet: &[u8]) -> Option<usize> {
    let (header_len, _) = frame_bounds(packet).ok()??;
    let topic_len = usize::from(u16::from_be_bytes([
        *packet.get(header_len)?,
        *packet.get(header_len + 1)?,
    ]));
    Some(header_len + 2 + topic_len)
}

/// PUBACK of `packet_id` (MQTT 5: reason code 0 and no properties may be left out, so the
/// packet is the same for both versions).
pub fn puback(packet_id: u16) -> [u8; 4] {
    let [hi, lo] = packet_id.to_be_bytes();
    [0x40, 2, hi, lo]
}

pub const PINGREQ: [u8; 2] = [0xC0, 0];
pub const DISCONNECT: [u8; 2] = [0xE0, 0];

/// The stream does not follow MQTT framing.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed(&'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed MQTT stream: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Where the next packet lies in `buf`: `Ok(Some((header_len, total_len)))` once the fixed
/// header is complete (the body may still be incomplete), `Ok(None)` if more bytes are needed
/// to read the header.
fn frame_bounds(buf: &[u8]) -> Result<Option<(usize, usize)>, Malformed> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if len > MAX_INCOMING {
                return Err(Malformed("packet larger than 16 MiB"));
            }
            let header_len = 2 + i;
            return Ok(Some((header_len, header_len + len)));
        }
    }
    Err(Malformed("remaining length longer than 4 bytes"))
}

/// One incoming packet, borrowed from the reader's buffer until the next read.
#[derive(Debug)]
pub struct Frame<'a> {
    /// First byte of the fixed header: type in the high nibble, flags in the low one.
    pub first_byte: u8,
    pub body: &'a [u8],
    /// The connection's protocol: whether the body carries MQTT 5 properties.
    pub protocol: Protocol,
}

/// An incoming PUBLISH.
#[derive(Debug)]
pub struct Publish<'a> {
    pub topic: &'a [u8],
    pub retain: bool,
    /// The packet id of a QoS 1 or 2 message, to acknowledge.
    pub packet_id: Option<u16>,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    pub fn kind(&self) -> u8 {
        self.first_byte >> 4
    }

    /// The PUBLISH carried by this frame, or `None` for another packet type or a body too
    /// short for its topic.
    pub fn publish(&self) -> Option<Publish<'a>> {
        if self.kind() != PUBLISH {
            return None;
        }
        let topic_len = usize::from(u16::from_be_bytes([
            *self.body.first()?,
            *self.body.get(1)?,
        ]));
        let topic = self.body.get(2..2 + topic_len)?;
        let qos = (self.first_byte >> 1) & 0x03;
        let mut rest = self.body.get(2 + topic_len..)?;
        let mut packet_id = None;
        if qos > 0 {
            packet_id = Some(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
            rest = &rest[2..];
        }
        Some(Publish {
            topic,
            retain: self.first_byte & 0x01 != 0,
            packet_id,
            payload: self.protocol.skip_properties(rest)?,
        })
    }

    /// PUBACK's packet id (MQTT 5: whatever reason code follows).
    pub fn puback(&self) -> Option<u16> {
        if self.kind() != PUBACK || self.body.len() < 2 {
            return None;
        }
        Some(u16::from_be_bytes([self.body[0], self.body[1]]))
    }

    /// CONNACK's return code (MQTT 5: reason code; 0 = accepted either way).
    pub fn connack_code(&self) -> Option<u8> {
        if self.kind() != CONNACK {
            return None;
        }
        self.body.get(1).copied()
    }

    /// CONNACK's session present flag: the broker had kept a session for this client id.
    pub fn connack_session_present(&self) -> Option<bool> {
        if self.kind() != CONNACK {
            return None;
        }
        self.body.first().map(|flags| flags & 0x01 != 0)
    }

    /// SUBACK's packet id and return codes (0-2 = granted QoS, 0x80 and up = failure).
    pub fn suback(&self) -> Option<(u16, &'a [u8])> {
        if self.kind() != SUBACK || self.body.len() < 2 {
            return None;
        }
        Some((
            u16::from_be_bytes([self.body[0], self.body[1]]),
            self.protocol.skip_properties(&self.body[2..])?,
        ))
    }
}

/// Reads whole packets from a byte stream into one reusable buffer.
pub struct FrameReader<R> {
    inner: R,
    protocol: Protocol,
    buf: Vec<u8>,
    /// Bytes `start..end` of `buf` are received but not yet handed out.
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `capacity` is the initial buffer size; it grows only for a packet that does not fit.
    /// The frames are MQTT 3.1.1 ones unless [`Self::with_protocol`] says otherwise.
    pub fn new(inner: R, capacity: usize) -> Self {
        Self {
            inner,
            protocol: Protocol::V311,
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
        }
    }

    /// Frames of `protocol` from now on.
    pub fn with_protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Whether a whole packet is already buffered, so that [`Self::next`] returns it without
    /// reading (a reader that answers packets flushes its answers when this turns false).
    pub fn has_frame(&self) -> bool {
        matches!(frame_bounds(&self.buf[self.start..self.end]),
            Ok(Some((_, total))) if total <= self.end - self.start)
    }

    /// The stream, to write to it between reads.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The next packet, or `None` when the peer closed the stream (between packets or not).
    pub async fn next(&mut self) -> io::Result<Option<Frame<'_>>> {
        loop {
            let pending = &self.buf[self.start..self.end];
            let bounds =
                frame_bounds(pending).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let needed = match bounds {
                Some((header_len, total)) if total <= pending.len() => {
                    let at = self.start;
                    self.start += total;
                    return Ok(Some(Frame {
                        first_byte: self.buf[at],
                        body: &self.buf[at + header_len..at + total],
                        protocol: self.protocol,
                    }));
                }
                Some((_, total)) => total,
                None => 5,
            };
            if !self.fill(needed).await? {
                return Ok(None);
            }
        }
    }

    /// Makes room for a packet of `needed` bytes starting at `start`, then reads once.
    /// Returns false on end of stream.
    async fn fill(&mut self, needed: usize) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start + needed > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if needed > self.buf.len() {
            self.buf.resize(needed, 0);
        }
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: Vec<u8>, capacity: usize) -> Vec<(u8, Vec<u8>)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut reader = FrameReader::new(&bytes[..], capacity);
            let mut frames = Vec::new();
            while let Some(f) = reader.next().await.expect("well-formed") {
                frames.push((f.first_byte, f.body.to_vec()));
            }
            frames
        })
    }

    #[test]
    fn persistent_connect_clears_only_clean_session() {
        let clean = connect(Protocol::V311, "ps-1", 60);
        let kept = connect_persistent("ps-1", 60);
        assert_eq!(clean.len(), kept.len());
        assert_eq!((clean[9], kept[9]), (0x02, 0x00));
        assert_eq!(clean[..9], kept[..9]);
        assert_eq!(clean[10..], kept[10..]);
    }

    #[test]
    fn remaining_length_boundaries() {
        for (len, encoded) in [
            (0usize, vec![0x00]),
            (127, vec![0x7F]),
            (128, vec![0x80, 0x01]),
            (16_383, vec![0xFF, 0x7F]),
            (16_384, vec![0x80, 0x80, 0x01]),
            (2_097_152, vec![0x80, 0x80, 0x80, 0x01]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, len);
            assert_eq!(out, encoded, "length {len}");
            let mut frame = vec![0x30];
            frame.extend_from_slice(&out);
            assert_eq!(
                frame_bounds(&frame),
                Ok(Some((1 + encoded.len(), 1 + encoded.len() + len)))
            );
        }
        assert_eq!(frame_bounds(&[0x30]), Ok(None));
        assert_eq!(frame_bounds(&[0x30, 0x80]), Ok(None));
        assert!(frame_bounds(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
    }

    #[test]
    fn connect_matches_the_specification_example() {
        // MQTT 3.1.1 section 3.1: "MQTT", level 4, flags, keep-alive, then the client id.
        assert_eq!(
            connect(Protocol::V311, "ab", 60),
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn connect_with_login_carries_user_name_and_password() {
        // Flags 0xC2: user name, password, clean session; the two strings follow the client id.
        assert_eq!(
            connect_with_login(Protocol::V311, "ab", 60, Some(("u", "pw"))),
            [
                0x10, 21, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 2, b'a', b'b', 0, 1,
                b'u', 0, 2, b'p', b'w'
            ]
        );
        assert_eq!(
            connect_with_login(Protocol::V311, "ab", 60, None),
            connect(Protocol::V311, "ab", 60)
        );
    }

    #[test]
    fn publishes_are_framed_and_parsed_back_across_small_reads() {
        let mut stream = Vec::new();
        let big = vec![7u8; 300];
        stream.extend(publish(Protocol::V311, "in/1", b"hello", None, false));
        stream.extend(publish(Protocol::V311, "r/0/1", &big, None, true));
        stream.extend(subscribe(Protocol::V311, 9, ["a/+", "b/#"], 0));
        // A 16-byte buffer forces growth and compaction.
        let frames = read_all(stream, 16);
        assert_eq!(frames.len(), 3);
        let first = Frame {
            first_byte: frames[0].0,
            body: &frames[0].1,
            protocol: Protocol::V311,
        };
        let p = first.publish().expect("publish");
        assert_eq!(
            (p.topic, p.retain, p.payload),
            (&b"in/1"[..], false, &b"hello"[..])
        );
        let second = Frame {
            first_byte: frames[1].0,
            body: &frames[1].1,
            protocol: Protocol::V311,
        };
        let p = second.publish().expect("publish");
        assert_eq!(
            (p.topic, p.retain, p.payload.len()),
            (&b"r/0/1"[..], true, 300)
        );
        assert_eq!(frames[2].0, 0x82);
        assert_eq!(
            frames[2].1,
            [0, 9, 0, 3, b'a', b'/', b'+', 0, 0, 3, b'b', b'/', b'#', 0]
        );
    }

    #[test]
    fn suback_and_connack_are_understood() {
        let suback = Frame {
            first_byte: 0x90,
            body: &[0, 1, 0, 0x80, 1],
            protocol: Protocol::V311,
        };
        assert_eq!(suback.suback(), Some((1, &[0, 0x80, 1][..])));
        let connack = Frame {
            first_byte: 0x20,
            body: &[0, 0],
            protocol: Protocol::V311,
        };
        assert_eq!(connack.connack_code(), Some(0));
        assert_eq!(suback.connack_code(), None);
    }

    #[test]
    fn mqtt5_packets_carry_property_lengths() {
        // Level 5, then after the keep-alive an empty property list.
        assert_eq!(
            connect(Protocol::V5, "ab", 60),
            [0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 2, b'a', b'b']
        );
        // Packet id, empty properties, then the filter and its options (QoS 1).
        assert_eq!(
            subscribe(Protocol::V5, 1, ["a"], 1),
            [0x82, 7, 0, 1, 0, 0, 1, b'a', 1]
        );
        // QoS 1: topic, packet id, empty properties, payload; renumbered in place.
        let mut p = publish(Protocol::V5, "t", b"xy", Some(7), false);
        assert_eq!(p, [0x32, 8, 0, 1, b't', 0, 7, 0, b'x', b'y']);
        let at = publish_packet_id_at(&p).expect("packet id");
        p[at..at + 2].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(&p[5..7], &[0, 9]);
        assert_eq!(puback(0x0102), [0x40, 2, 1, 2]);
    }

    #[test]
    fn mqtt5_incoming_properties_are_skipped() {
        // A PUBLISH with a message expiry interval property (0x02, four bytes).
        let publish = Frame {
            first_byte: 0x32,
            body: &[0, 1, b't', 0, 5, 5, 0x02, 0, 0, 0, 9, b'h', b'i'],
            protocol: Protocol::V5,
        };
        let p = publish.publish().expect("publish");
        assert_eq!(
            (p.topic, p.packet_id, p.payload),
            (&b"t"[..], Some(5), &b"hi"[..])
        );
        // SUBACK with a reason string property (0x1F, "ok"), then two reason codes.
        let suback = Frame {
            first_byte: 0x90,
            body: &[0, 1, 5, 0x1F, 0, 2, b'o', b'k', 1, 0x87],
            protocol: Protocol::V5,
        };
        assert_eq!(suback.suback(), Some((1, &[1, 0x87][..])));
        // CONNACK with a receive maximum; PUBACK with a reason code and no properties.
        let connack = Frame {
            first_byte: 0x20,
            body: &[0, 0, 3, 0x21, 0, 10],
            protocol: Protocol::V5,
        };
        assert_eq!(connack.connack_code(), Some(0));
        let puback = Frame {
            first_byte: 0x40,
            body: &[0, 3, 0x10],
            protocol: Protocol::V5,
        };
        assert_eq!(puback.puback(), Some(3));
    }

    #[test]
    fn a_truncated_stream_ends_without_a_frame() {
        let mut stream = publish(Protocol::V311, "in/1", b"hello", None, false);
        stream.truncate(stream.len() - 1);
        assert!(read_all(stream, 64).is_empty());
    }
}
