//! Framing on top of rumqttc's `mqttbytes` codec: the checks it leaves out (fixed-header flag
//! bits, the CONNECT header before the full parse) and a PUBLISH encoder that needs no copy of the
//! topic.

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::{self, v4::Packet, QoS};

use crate::labels::PacketType;

/// CONNACK return codes of MQTT 3.1.1 that the broker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnackCode {
    /// 0x00: connection accepted.
    Accepted = 0,
    /// 0x01: the protocol level is not supported.
    UnacceptableProtocolVersion = 1,
    /// 0x02: the client identifier is not allowed.
    IdentifierRejected = 2,
    /// 0x03: the server is unavailable (`mqtt.max_connections` reached).
    ServerUnavailable = 3,
    /// 0x04: bad user name or password.
    BadUsernamePassword = 4,
    /// 0x05: not authorized.
    NotAuthorized = 5,
}

/// Why the bytes from a client are not a valid packet. Every variant closes the connection.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The remaining length exceeds `mqtt.max_packet_size`.
    #[error("packet of {size} bytes exceeds the maximum packet size of {max}")]
    TooLarge {
        /// Declared remaining length.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
    /// Reserved flag bits are wrong for the packet type.
    #[error("invalid fixed-header flags {flags:#06b} for packet type {packet_type}")]
    BadFlags {
        /// The packet type nibble.
        packet_type: u8,
        /// The flags nibble.
        flags: u8,
    },
    /// The packet could not be decoded.
    #[error("malformed packet: {0}")]
    Malformed(mqttbytes::Error),
    /// The CONNECT is not MQTT 3.1.1; the client gets CONNACK 0x01.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// Protocol name from the CONNECT.
        name: String,
        /// Protocol level from the CONNECT.
        level: u8,
    },
    /// The CONNECT's flags break the specification (reserved bit, password without user name).
    #[error("invalid CONNECT flags {0:#010b}")]
    BadConnectFlags(u8),
    /// A packet's remaining length does not fit its type: a body on PINGREQ or DISCONNECT, more
    /// or less than a packet id on PUBACK/PUBREC/PUBREL/PUBCOMP, bytes after a CONNECT's last
    /// field.
    #[error(
        "packet type {packet_type} with a remaining length of {length} bytes, expected {expected}"
    )]
    BadLength {
        /// The packet type nibble.
        packet_type: u8,
        /// The remaining length received.
        length: usize,
        /// The remaining length its fields call for.
        expected: usize,
    },
    /// SUBSCRIBE or UNSUBSCRIBE with packet id 0 (MQTT 3.1.1 section 2.3.1).
    #[error("packet type {0} with packet identifier 0")]
    PacketIdZero(u8),
}

/// Checks the fixed header at the start of `buf` and decodes one packet when complete.
///
/// Returns `Ok(None)` when more bytes are needed.
pub fn read_packet(buf: &mut BytesMut, max_size: usize) -> Result<Option<Packet>, CodecError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_flags(byte1)?;
    let header = match mqttbytes::check(buf.iter(), max_size) {
        Ok(header) => header,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(CodecError::TooLarge {
                size,
                max: max_size,
            })
        }
        Err(e) => return Err(CodecError::Malformed(e)),
    };
    let packet_type = byte1 >> 4;
    // The fixed header is byte 1 plus 1-4 remaining-length bytes (check() validated them).
    let length_bytes = buf.iter().skip(1).take_while(|b| *b & 0x80 != 0).count() + 1;
    let length = header.frame_length() - 1 - length_bytes;
    let expected = match packet_type {
        1 => Some(check_connect_header(&buf[..header.frame_length()])?),
        4..=7 => Some(2),
        12 | 14 => Some(0),
        _ => None,
    };
    if let Some(expected) = expected.filter(|e| *e != length) {
        return Err(CodecError::BadLength {
            packet_type,
            length,
            expected,
        });
    }
    let packet = Packet::read(buf, max_size).map_err(CodecError::Malformed)?;
    match &packet {
        Packet::Subscribe(s) if s.pkid == 0 => Err(CodecError::PacketIdZero(packet_type)),
        Packet::Unsubscribe(u) if u.pkid == 0 => Err(CodecError::PacketIdZero(packet_type)),
        _ => Ok(Some(packet)),
    }
}

/// Total length of the packet starting at `buf[0]` (fixed header included), as soon as its
/// fixed header has arrived, complete or not; `None` until then or when the length is malformed
/// (the decoder reports that).
pub fn frame_length(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + i + 1 + remaining);
        }
    }
    None
}

/// MQTT 3.1.1 section 2.2.2: the flags each packet type must carry.
fn check_flags(byte1: u8) -> Result<(), CodecError> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0f;
    let ok = match packet_type {
        // PUBLISH: QoS 3 is invalid; DUP must be 0 for QoS 0.
        3 => {
            let qos = (flags >> 1) & 0b11;
            qos != 3 && !(qos == 0 && flags & 0b1000 != 0)
        }
        6 | 8 | 10 => flags == 0b0010,
        _ => flags == 0,
    };
    if ok {
        Ok(())
    } else {
        Err(CodecError::BadFlags { packet_type, flags })
    }
}

/// Looks at the protocol name, level and flags of a complete CONNECT frame before the full
/// decode, so that an unsupported protocol gets CONNACK 0x01 instead of a bare close. Returns the
/// remaining length that the CONNECT's fields add up to (the decoder ignores bytes after them).
fn check_connect_header(frame: &[u8]) -> Result<usize, CodecError> {
    // Skip the fixed header: byte 1 plus 1-4 remaining-length bytes.
    let mut i = 1;
    while i < frame.len() && frame[i] & 0x80 != 0 {
        i += 1;
    }
    let var = &frame[(i + 1).min(frame.len())..];
    let malformed = || CodecError::Malformed(mqttbytes::Error::MalformedPacket);
    if var.len() < 2 {
        return Err(malformed());
    }
    let name_len = u16::from_be_bytes([var[0], var[1]]) as usize;
    if var.len() < 2 + name_len + 2 {
        return Err(malformed());
    }
    let name = &var[2..2 + name_len];
    let level = var[2 + name_len];
    let flags = var[3 + name_len];
    match (name, level) {
        (b"MQTT", 4) => {}
        (b"MQTT", _) | (b"MQIsdp", _) => {
            return Err(CodecError::UnsupportedProtocol {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
            })
        }
        _ => return Err(CodecError::Malformed(mqttbytes::Error::InvalidProtocol)),
    }
    let reserved = flags & 0b1 != 0;
    let password_without_user = flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0;
    if reserved || password_without_user {
        return Err(CodecError::BadConnectFlags(flags));
    }
    // Variable header (name, level, flags, keep-alive), then the length-prefixed fields that the
    // flags announce: client id, will topic and message, user name, password.
    let mut at = 2 + name_len + 4;
    let fields = 1
        + 2 * usize::from(flags & 0b100 != 0)
        + usize::from(flags & 0b1000_0000 != 0)
        + usize::from(flags & 0b0100_0000 != 0);
    for _ in 0..fields {
        let len = var.get(at..at + 2).ok_or_else(malformed)?;
        at += 2 + u16::from_be_bytes([len[0], len[1]]) as usize;
    }
    Ok(at)
}

/// Appends a PUBLISH to `buf` (pkid is ignored for QoS 0).
pub fn write_publish(
    buf: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: QoS,
    pkid: u16,
    retain: bool,
    dup: bool,
) {
    let mut byte1 = 0b0011_0000 | ((qos as u8) << 1);
    if retain {
        byte1 |= 1;
    }
    if dup {
        byte1 |= 0b1000;
    }
    let mut remaining = 2 + topic.len() + payload.len();
    if qos != QoS::AtMostOnce {
        remaining += 2;
    }
    buf.reserve(5 + remaining);
    buf.put_u8(byte1);
    write_remaining_length(buf, remaining);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic.as_bytes());
    if qos != QoS::AtMostOnce {
        buf.put_u16(pkid);
    }
    buf.put_slice(payload);
}

fn write_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

/// Appends any other packet using rumqttc's encoder.
pub fn write_packet(buf: &mut BytesMut, packet: &Packet) {
    // Broker-generated control packets are a few bytes; the size limit cannot be hit.
    if let Err(error) = packet.write(buf, usize::MAX) {
        tracing::error!(%error, ?packet, "Cannot encode packet.");
    }
}

/// The type of `packet`.
pub fn packet_type(packet: &Packet) -> PacketType {
    match packet {
        Packet::Connect(_) => PacketType::Connect,
        Packet::ConnAck(_) => PacketType::ConnAck,
        Packet::Publish(_) => PacketType::Publish,
        Packet::PubAck(_) => PacketType::PubAck,
        Packet::PubRec(_) => PacketType::PubRec,
        Packet::PubRel(_) => PacketType::PubRel,
        Packet::PubComp(_) => PacketType::PubComp,
        Packet::Subscribe(_) => PacketType::Subscribe,
        Packet::SubAck(_) => PacketType::SubAck,
        Packet::Unsubscribe(_) => PacketType::Unsubscribe,
        Packet::UnsubAck(_) => PacketType::UnsubAck,
        Packet::PingReq => PacketType::PingReq,
        Packet::PingResp => PacketType::PingResp,
        Packet::Disconnect => PacketType::Disconnect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::Connect;

    fn connect_bytes(level: u8, flags: u8) -> BytesMut {
        let mut b = BytesMut::new();
        write_packet(&mut b, &Packet::Connect(Connect::new("c")));
        // byte 0 type, byte 1 remaining length, 2-3 name length, 4-7 "MQTT", 8 level, 9 flags
        b[8] = level;
        b[9] = flags;
        b
    }

    #[test]
    fn accepts_a_plain_connect() {
        let mut b = connect_bytes(4, 0b10);
        assert!(matches!(
            read_packet(&mut b, 1024),
            Ok(Some(Packet::Connect(_)))
        ));
        assert!(b.is_empty());
    }

    #[test]
    fn refuses_other_protocol_levels_and_bad_flags() {
        for level in [3, 5, 6] {
            let mut b = connect_bytes(level, 0b10);
            assert!(matches!(
                read_packet(&mut b, 1024),
                Err(CodecError::UnsupportedProtocol { .. })
            ));
        }
        let mut b = connect_bytes(4, 0b11);
        assert!(matches!(
            read_packet(&mut b, 1024),
            Err(CodecError::BadConnectFlags(_))
        ));
        let mut b = connect_bytes(4, 0b0100_0010);
        assert!(matches!(
            read_packet(&mut b, 1024),
            Err(CodecError::BadConnectFlags(_))
        ));
    }

    #[test]
    fn connect_length_must_match_its_fields() {
        let mut connect = Connect::new("c");
        connect.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
            "w/t",
            b"bye".to_vec(),
            QoS::AtLeastOnce,
            true,
        ));
        connect.set_login("user", "secret");
        let mut b = BytesMut::new();
        write_packet(&mut b, &Packet::Connect(connect));
        let exact = b.clone();
        assert!(matches!(
            read_packet(&mut b, 1024),
            Ok(Some(Packet::Connect(c))) if c.login.is_some() && c.last_will.is_some()
        ));
        // One byte more inside the remaining length.
        let mut b = exact;
        b[1] += 1;
        b.extend_from_slice(&[0]);
        assert!(matches!(
            read_packet(&mut b, 1024),
            Err(CodecError::BadLength { packet_type: 1, .. })
        ));
    }

    #[test]
    fn checks_fixed_header_flags() {
        // SUBSCRIBE must carry 0b0010.
        let mut b = BytesMut::from(&[0x80u8, 0x00][..]);
        assert!(matches!(
            read_packet(&mut b, 1024),
            Err(CodecError::BadFlags { .. })
        ));
        // PINGREQ with a flag bit set.
        let mut b = BytesMut::from(&[0xC1u8, 0x00][..]);
        assert!(read_packet(&mut b, 1024).is_err());
        // PUBLISH QoS 3.
        let mut b = BytesMut::from(&[0x36u8, 0x00][..]);
        assert!(read_packet(&mut b, 1024).is_err());
    }

    #[test]
    fn waits_for_more_bytes_and_limits_size() {
        let mut b = BytesMut::from(&[0x30u8][..]);
        assert!(matches!(read_packet(&mut b, 1024), Ok(None)));
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x03][..]);
        assert!(matches!(
            read_packet(&mut b, 1024),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn frame_length_is_known_from_the_fixed_header() {
        assert_eq!(frame_length(&[0x30]), None);
        assert_eq!(frame_length(&[0x30, 0x05]), Some(7));
        assert_eq!(frame_length(&[0x30, 0x80]), None);
        assert_eq!(frame_length(&[0x30, 0x80, 0x01]), Some(3 + 128));
        assert_eq!(
            frame_length(&[0x30, 0xff, 0xff, 0xff, 0x7f]),
            Some(5 + 268_435_455)
        );
        assert_eq!(frame_length(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), None);
    }

    #[test]
    fn publish_encoding_round_trips() {
        for (qos, pkid) in [
            (QoS::AtMostOnce, 0),
            (QoS::AtLeastOnce, 7),
            (QoS::ExactlyOnce, 9),
        ] {
            let payload = vec![7u8; 300];
            let mut b = BytesMut::new();
            write_publish(
                &mut b,
                "a/b",
                &payload,
                qos,
                pkid,
                true,
                qos != QoS::AtMostOnce,
            );
            let Ok(Some(Packet::Publish(p))) = read_packet(&mut b, 1024) else {
                panic!("publish did not decode");
            };
            assert_eq!(p.topic, "a/b");
            assert_eq!(p.qos, qos);
            assert_eq!(p.pkid, pkid);
            assert!(p.retain);
            assert_eq!(&p.payload[..], &payload[..]);
        }
    }
}
