//! MQTT 3.1.1 on the wire: the few packets the generator sends, encoded by hand, and a frame
//! reader that splits the incoming stream by fixed header and remaining length.
//!
//! Only what the scenarios need: CONNECT (clean session, no will, optionally a user name and
//! password), SUBSCRIBE,
//! PUBLISH at QoS 0, PINGREQ and DISCONNECT out; CONNACK, SUBACK and PUBLISH understood in.
//! Anything else that arrives is still framed correctly and left to the caller to ignore.
//! Keeping the codec this small keeps the generator cheap and identical for every broker.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Packet types (the high nibble of the fixed header's first byte).
pub const CONNACK: u8 = 2;
pub const PUBLISH: u8 = 3;
pub const SUBACK: u8 = 9;

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

/// CONNECT with protocol level 4, clean session, no will and no user name.
pub fn connect(client_id: &str, keep_alive_s: u16) -> Vec<u8> {
    connect_with_login(client_id, keep_alive_s, None)
}

/// CONNECT with protocol level 4, clean session, no will, and the user name and password of
/// `login` if given.
pub fn connect_with_login(
    client_id: &str,
    keep_alive_s: u16,
    login: Option<(&str, &str)>,
) -> Vec<u8> {
    let login_len = login.map_or(0, |(user, password)| 4 + user.len() + password.len());
    let mut body = Vec::with_capacity(12 + client_id.len() + login_len);
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level: 3.1.1
                  // Connect flags: clean session, plus user name (0x80) and password (0x40) with a login.
    body.push(if login.is_some() { 0xC2 } else { 0x02 });
    body.extend_from_slice(&keep_alive_s.to_be_bytes());
    put_str(&mut body, client_id);
    if let Some((user, password)) = login {
        put_str(&mut body, user);
        put_str(&mut body, password);
    }
    packet(0x10, &body)
}

/// SUBSCRIBE of every filter at QoS 0, in one packet.
pub fn subscribe<'a>(packet_id: u16, filters: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    for filter in filters {
        put_str(&mut body, filter);
        body.push(0); // requested QoS
    }
    packet(0x82, &body)
}

/// PUBLISH at QoS 0 (so without a packet id), optionally retained.
pub fn publish(topic: &str, payload: &[u8], retain: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + topic.len() + payload.len());
    put_str(&mut body, topic);
    body.extend_from_slice(payload);
    packet(if retain { 0x31 } else { 0x30 }, &body)
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
}

/// An incoming PUBLISH.
#[derive(Debug)]
pub struct Publish<'a> {
    pub topic: &'a [u8],
    pub retain: bool,
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
        let payload_at = 2 + topic_len + if qos > 0 { 2 } else { 0 };
        Some(Publish {
            topic,
            retain: self.first_byte & 0x01 != 0,
            payload: self.body.get(payload_at..)?,
        })
    }

    /// CONNACK's return code (0 = accepted).
    pub fn connack_code(&self) -> Option<u8> {
        if self.kind() != CONNACK {
            return None;
        }
        self.body.get(1).copied()
    }

    /// SUBACK's packet id and return codes (0-2 = granted QoS, 0x80 = failure).
    pub fn suback(&self) -> Option<(u16, &'a [u8])> {
        if self.kind() != SUBACK || self.body.len() < 2 {
            return None;
        }
        Some((
            u16::from_be_bytes([self.body[0], self.body[1]]),
            &self.body[2..],
        ))
    }
}

/// Reads whole packets from a byte stream into one reusable buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes `start..end` of `buf` are received but not yet handed out.
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// `capacity` is the initial buffer size; it grows only for a packet that does not fit.
    pub fn new(inner: R, capacity: usize) -> Self {
        Self {
            inner,
            buf: vec![0; capacity.max(64)],
            start: 0,
            end: 0,
        }
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
            connect("ab", 60),
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'a', b'b']
        );
    }

    #[test]
    fn connect_with_login_carries_user_name_and_password() {
        // Flags 0xC2: user name, password, clean session; the two strings follow the client id.
        assert_eq!(
            connect_with_login("ab", 60, Some(("u", "pw"))),
            [
                0x10, 21, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60, 0, 2, b'a', b'b', 0, 1,
                b'u', 0, 2, b'p', b'w'
            ]
        );
        assert_eq!(connect_with_login("ab", 60, None), connect("ab", 60));
    }

    #[test]
    fn publishes_are_framed_and_parsed_back_across_small_reads() {
        let mut stream = Vec::new();
        let big = vec![7u8; 300];
        stream.extend(publish("in/1", b"hello", false));
        stream.extend(publish("r/0/1", &big, true));
        stream.extend(subscribe(9, ["a/+", "b/#"]));
        // A 16-byte buffer forces growth and compaction.
        let frames = read_all(stream, 16);
        assert_eq!(frames.len(), 3);
        let first = Frame {
            first_byte: frames[0].0,
            body: &frames[0].1,
        };
        let p = first.publish().expect("publish");
        assert_eq!(
            (p.topic, p.retain, p.payload),
            (&b"in/1"[..], false, &b"hello"[..])
        );
        let second = Frame {
            first_byte: frames[1].0,
            body: &frames[1].1,
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
        };
        assert_eq!(suback.suback(), Some((1, &[0, 0x80, 1][..])));
        let connack = Frame {
            first_byte: 0x20,
            body: &[0, 0],
        };
        assert_eq!(connack.connack_code(), Some(0));
        assert_eq!(suback.connack_code(), None);
    }

    #[test]
    fn a_truncated_stream_ends_without_a_frame() {
        let mut stream = publish("in/1", b"hello", false);
        stream.truncate(stream.len() - 1);
        assert!(read_all(stream, 64).is_empty());
    }
}
