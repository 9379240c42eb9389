//! The wire format. Framing is shared by both protocol levels (fixed-header flags, the remaining
//! length and its limit, the CONNECT's protocol level); [`v311`] decodes MQTT 3.1.1 packets on
//! rumqttc's `mqttbytes`, [`v5`] decodes MQTT 5 packets on rmqtt-codec with the checks it leaves
//! out, both into [`crate::mqtt::packet`]'s types; [`encode`] writes the server's packets at
//! either level.

pub mod encode;
mod v311;
mod v5;

use bytes::BytesMut;

pub use encode::*;

use crate::mqtt::packet::{reason, Packet, Protocol};

/// Why the broker refuses a CONNECT, as a CONNACK code of either protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnackCode {
    /// Connection accepted.
    Accepted,
    /// The protocol level is not supported.
    UnacceptableProtocolVersion,
    /// The client identifier is not allowed.
    IdentifierRejected,
    /// The keep-alive is outside `mqtt.min_keepalive..mqtt.max_keepalive` (policy reject).
    KeepAliveRejected,
    /// The server is unavailable (the credential store cannot answer).
    ServerUnavailable,
    /// `mqtt.max_connections` reached.
    ServerBusy,
    /// `mqtt.max_connections_per_address` reached.
    QuotaExceeded,
    /// Bad user name or password.
    BadUsernamePassword,
    /// Not authorized.
    NotAuthorized,
    /// The client id is banned (flapping).
    Banned,
    /// An enhanced authentication method the broker does not offer.
    BadAuthenticationMethod,
    /// The CONNECT breaks the protocol (MQTT 5 only: a 3.1.1 client is just closed).
    ProtocolError,
    /// The CONNECT is malformed (MQTT 5 only).
    MalformedPacket,
    /// The CONNECT is larger than `mqtt.max_packet_size` (MQTT 5 only).
    PacketTooLarge,
    /// The will topic is not a valid topic name (MQTT 5 only).
    TopicNameInvalid,
}

impl ConnackCode {
    /// The return code of an MQTT 3.1.1 CONNACK.
    pub fn v311(self) -> u8 {
        match self {
            ConnackCode::Accepted => 0,
            ConnackCode::UnacceptableProtocolVersion => 1,
            ConnackCode::IdentifierRejected | ConnackCode::KeepAliveRejected => 2,
            ConnackCode::ServerUnavailable
            | ConnackCode::ServerBusy
            | ConnackCode::QuotaExceeded
            | ConnackCode::ProtocolError
            | ConnackCode::MalformedPacket
            | ConnackCode::PacketTooLarge
            | ConnackCode::TopicNameInvalid => 3,
            ConnackCode::BadUsernamePassword => 4,
            ConnackCode::NotAuthorized
            | ConnackCode::Banned
            | ConnackCode::BadAuthenticationMethod => 5,
        }
    }

    /// The reason code of an MQTT 5 CONNACK.
    pub fn v5(self) -> u8 {
        match self {
            ConnackCode::Accepted => reason::SUCCESS,
            ConnackCode::UnacceptableProtocolVersion => reason::UNSUPPORTED_PROTOCOL_VERSION,
            ConnackCode::IdentifierRejected => reason::CLIENT_IDENTIFIER_NOT_VALID,
            ConnackCode::KeepAliveRejected => reason::IMPLEMENTATION_SPECIFIC_ERROR,
            ConnackCode::ServerUnavailable => reason::SERVER_UNAVAILABLE,
            ConnackCode::ServerBusy => reason::SERVER_BUSY,
            ConnackCode::QuotaExceeded => reason::QUOTA_EXCEEDED,
            ConnackCode::BadUsernamePassword => reason::BAD_USER_NAME_OR_PASSWORD,
            ConnackCode::NotAuthorized => reason::NOT_AUTHORIZED,
            ConnackCode::Banned => reason::BANNED,
            ConnackCode::BadAuthenticationMethod => reason::BAD_AUTHENTICATION_METHOD,
            ConnackCode::ProtocolError => reason::PROTOCOL_ERROR,
            ConnackCode::MalformedPacket => reason::MALFORMED_PACKET,
            ConnackCode::PacketTooLarge => reason::PACKET_TOO_LARGE,
            ConnackCode::TopicNameInvalid => reason::TOPIC_NAME_INVALID,
        }
    }
}

/// Why the bytes from a client are not a valid packet. Every variant closes the connection (an
/// MQTT 5 client is told [`CodecError::reason_code`] first, in a DISCONNECT or a CONNACK).
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
    /// The packet could not be decoded (MQTT 3.1.1).
    #[error("malformed packet: {0}")]
    Malformed(rumqttc::mqttbytes::Error),
    /// The CONNECT is neither MQTT 3.1.1 nor MQTT 5; the client gets CONNACK 0x01.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// Protocol name from the CONNECT.
        name: String,
        /// Protocol level from the CONNECT.
        level: u8,
    },
    /// The CONNECT's flags break the specification (reserved bit, and in 3.1.1 a password
    /// without user name).
    #[error("invalid CONNECT flags {0:#010b}")]
    BadConnectFlags(u8),
    /// A packet's remaining length does not fit its type: a body on PINGREQ or DISCONNECT, more
    /// or less than a packet id on PUBACK/PUBREC/PUBREL/PUBCOMP, bytes after a CONNECT's last
    /// field (MQTT 3.1.1).
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
    /// An MQTT 5 packet that breaks the specification, with the reason code it earns (0x81
    /// malformed packet, 0x82 protocol error, ...).
    #[error("{what} (reason code {code:#04x})")]
    Invalid {
        /// The MQTT 5 reason code.
        code: u8,
        /// What is wrong.
        what: &'static str,
    },
}

impl CodecError {
    /// The MQTT 5 reason code of the DISCONNECT (or CONNACK) that answers it.
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            CodecError::UnsupportedProtocol { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
            CodecError::Invalid { code, .. } => *code,
            CodecError::BadFlags { .. }
            | CodecError::Malformed(_)
            | CodecError::BadConnectFlags(_)
            | CodecError::BadLength { .. }
            | CodecError::PacketIdZero(_) => reason::MALFORMED_PACKET,
        }
    }

    fn malformed(what: &'static str) -> Self {
        CodecError::Invalid {
            code: reason::MALFORMED_PACKET,
            what,
        }
    }
}

/// Checks the fixed header at the start of `buf` and decodes one packet when complete, at
/// `protocol`'s level. Before the CONNECT `protocol` is `None`: the CONNECT's header sets it
/// (before the rest is decoded, so that a refusal is answered at the client's level), and any
/// other first packet is read as 3.1.1 and refused by the handshake.
///
/// Returns `Ok(None)` when more bytes are needed.
pub fn read_packet(
    buf: &mut BytesMut,
    max_size: usize,
    protocol: &mut Option<Protocol>,
) -> Result<Option<Packet>, CodecError> {
    let Some(&byte1) = buf.first() else {
        return Ok(None);
    };
    check_flags(byte1, *protocol)?;
    let (length, header_len) = match remaining_length(&buf[1..]) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(None),
        Err(error) => return Err(error),
    };
    if length > max_size {
        return Err(CodecError::TooLarge {
            size: length,
            max: max_size,
        });
    }
    let frame_len = header_len + length;
    if buf.len() < frame_len {
        return Ok(None);
    }
    let packet_type = byte1 >> 4;
    let (level, connect_len) = if packet_type == 1 {
        let (level, fields) = check_connect_header(&buf[header_len..frame_len])?;
        protocol.get_or_insert(level);
        (level, fields)
    } else {
        (protocol.unwrap_or_default(), None)
    };
    match level {
        Protocol::V311 => v311::read(buf, max_size, length, connect_len).map(Some),
        Protocol::V5 => {
            let frame = buf.split_to(frame_len);
            v5::decode(frame, header_len).map(Some)
        }
    }
}

/// The remaining length at the start of `bytes` (the fixed header after its first byte) and the
/// fixed header's length: `None` until all its bytes are in, an error when it runs past 4 bytes.
fn remaining_length(bytes: &[u8]) -> Result<Option<(usize, usize)>, CodecError> {
    let mut length = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        length |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((length, 1 + i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(CodecError::malformed(
            "remaining length longer than 4 bytes",
        ))
    } else {
        Ok(None)
    }
}

/// Total length of the packet starting at `buf[0]` (fixed header included), as soon as its
/// fixed header has arrived, complete or not; `None` until then or when the length is malformed
/// (the decoder reports that).
pub fn frame_length(buf: &[u8]) -> Option<usize> {
    match remaining_length(buf.get(1..)?) {
        Ok(Some((length, header))) => Some(header + length),
        _ => None,
    }
}

/// MQTT 3.1.1 section 2.2.2 and MQTT 5 section 2.1.3: the flags each packet type must carry.
/// Packet type 0 is reserved, and 15 (AUTH) exists in MQTT 5 only.
fn check_flags(byte1: u8, protocol: Option<Protocol>) -> Result<(), CodecError> {
    let packet_type = byte1 >> 4;
    let flags = byte1 & 0x0f;
    let ok = match packet_type {
        0 => false,
        15 => protocol == Some(Protocol::V5) && flags == 0,
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

/// Looks at the protocol name, level and flags of a CONNECT's body before the full decode, so
/// that an unsupported protocol gets CONNACK 0x01 (0x84) instead of a bare close. Returns the
/// level and, for 3.1.1, the remaining length that the CONNECT's fields add up to (its decoder
/// ignores bytes after them; the MQTT 5 decoder checks that itself).
fn check_connect_header(var: &[u8]) -> Result<(Protocol, Option<usize>), CodecError> {
    let malformed = || CodecError::malformed("CONNECT shorter than its fields");
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
    let protocol = match (name, level) {
        (b"MQTT", 4) => Protocol::V311,
        (b"MQTT", 5) => Protocol::V5,
        (b"MQTT", _) | (b"MQIsdp", _) => {
            return Err(CodecError::UnsupportedProtocol {
                name: String::from_utf8_lossy(name).into_owned(),
                level,
            })
        }
        _ => return Err(CodecError::malformed("unknown protocol name")),
    };
    let reserved = flags & 0b1 != 0;
    // MQTT 5 allows a password without a user name (section 3.1.2.9).
    let password_without_user =
        protocol == Protocol::V311 && flags & 0b0100_0000 != 0 && flags & 0b1000_0000 == 0;
    if reserved || password_without_user {
        return Err(CodecError::BadConnectFlags(flags));
    }
    if protocol == Protocol::V5 {
        return Ok((protocol, None));
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
    Ok((protocol, Some(at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{self, Connect};
    use rumqttc::mqttbytes::QoS;

    /// Encodes a client packet with rumqttc.
    fn write_packet(buf: &mut BytesMut, packet: &v4::Packet) {
        packet.write(buf, usize::MAX).expect("encodes");
    }

    fn read(buf: &mut BytesMut, max: usize) -> Result<Option<Packet>, CodecError> {
        read_packet(buf, max, &mut None)
    }

    fn connect_bytes(level: u8, flags: u8) -> BytesMut {
        let mut b = BytesMut::new();
        write_packet(&mut b, &v4::Packet::Connect(Connect::new("c")));
        // byte 0 type, byte 1 remaining length, 2-3 name length, 4-7 "MQTT", 8 level, 9 flags
        b[8] = level;
        b[9] = flags;
        b
    }

    #[test]
    fn accepts_a_plain_connect() {
        let mut b = connect_bytes(4, 0b10);
        assert!(matches!(read(&mut b, 1024), Ok(Some(Packet::Connect(_)))));
        assert!(b.is_empty());
    }

    #[test]
    fn refuses_other_protocol_levels_and_bad_flags() {
        for level in [3, 6] {
            let mut b = connect_bytes(level, 0b10);
            assert!(matches!(
                read(&mut b, 1024),
                Err(CodecError::UnsupportedProtocol { .. })
            ));
        }
        let mut b = connect_bytes(4, 0b11);
        assert!(matches!(
            read(&mut b, 1024),
            Err(CodecError::BadConnectFlags(_))
        ));
        let mut b = connect_bytes(4, 0b0100_0010);
        assert!(matches!(
            read(&mut b, 1024),
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
        write_packet(&mut b, &v4::Packet::Connect(connect));
        let exact = b.clone();
        assert!(matches!(
            read(&mut b, 1024),
            Ok(Some(Packet::Connect(c))) if c.username.is_some() && c.will.is_some()
        ));
        // One byte more inside the remaining length.
        let mut b = exact;
        b[1] += 1;
        b.extend_from_slice(&[0]);
        assert!(matches!(
            read(&mut b, 1024),
            Err(CodecError::BadLength { packet_type: 1, .. })
        ));
    }

    #[test]
    fn checks_fixed_header_flags() {
        // SUBSCRIBE must carry 0b0010.
        let mut b = BytesMut::from(&[0x80u8, 0x00][..]);
        assert!(matches!(
            read(&mut b, 1024),
            Err(CodecError::BadFlags { .. })
        ));
        // PINGREQ with a flag bit set.
        let mut b = BytesMut::from(&[0xC1u8, 0x00][..]);
        assert!(read(&mut b, 1024).is_err());
        // PUBLISH QoS 3.
        let mut b = BytesMut::from(&[0x36u8, 0x00][..]);
        assert!(read(&mut b, 1024).is_err());
    }

    #[test]
    fn waits_for_more_bytes_and_limits_size() {
        let mut b = BytesMut::from(&[0x30u8][..]);
        assert!(matches!(read(&mut b, 1024), Ok(None)));
        let mut b = BytesMut::from(&[0x30u8, 0xff, 0xff, 0x03][..]);
        assert!(matches!(
            read(&mut b, 1024),
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
            let mut publish = OutPublish::new("a/b", &payload, qos, pkid, true);
            publish.dup = qos != QoS::AtMostOnce;
            write_publish(&mut b, Protocol::V311, &publish);
            assert_eq!(b.len(), publish.size(Protocol::V311));
            let Ok(Some(Packet::Publish(p))) = read(&mut b, 1024) else {
                panic!("publish did not decode");
            };
            assert_eq!(p.topic, "a/b");
            assert_eq!(p.qos, qos);
            assert_eq!(p.pkid, pkid);
            assert!(p.retain);
            assert_eq!(&p.payload[..], &payload[..]);
        }
    }

    #[test]
    fn v5_packets_have_their_sizes() {
        let mut publish = OutPublish::new("t", b"x", QoS::AtLeastOnce, 1, false);
        publish.message_expiry = Some(30);
        publish.forwarded = &[0x01, 0x01];
        publish.subscription_ids = &[1, 300];
        let mut b = BytesMut::new();
        write_publish(&mut b, Protocol::V5, &publish);
        assert_eq!(b.len(), publish.size(Protocol::V5));
        // 2+1 topic, 2 pkid, 1 property length, 5 expiry, 2 forwarded, 2 + 3 ids, 1 payload
        assert_eq!(b.len(), 2 + 3 + 2 + 1 + 5 + 2 + 5 + 1);
        let mut b = BytesMut::new();
        write_disconnect(&mut b, 0x8E, None);
        assert_eq!(&b[..], &[0xE0, 0x02, 0x8E, 0x00]);
        let mut b = BytesMut::new();
        write_ack(
            &mut b,
            Protocol::V5,
            crate::labels::PacketType::PubAck,
            5,
            0x87,
        );
        assert_eq!(&b[..], &[0x40, 0x03, 0x00, 0x05, 0x87]);
        let mut b = BytesMut::new();
        write_ack(
            &mut b,
            Protocol::V5,
            crate::labels::PacketType::PubRel,
            5,
            0,
        );
        assert_eq!(&b[..], &[0x62, 0x02, 0x00, 0x05]);
        let mut b = BytesMut::new();
        write_suback(&mut b, Protocol::V311, 3, &[1, 0x87]);
        assert_eq!(&b[..], &[0x90, 0x04, 0x00, 0x03, 0x01, 0x80]);
        let mut b = BytesMut::new();
        write_suback(&mut b, Protocol::V5, 3, &[1, 0x87]);
        assert_eq!(&b[..], &[0x90, 0x05, 0x00, 0x03, 0x00, 0x01, 0x87]);
        let mut b = BytesMut::new();
        write_connack(
            &mut b,
            Protocol::V5,
            ConnackCode::Accepted,
            true,
            encode::Properties::default().u16(property::RECEIVE_MAXIMUM, 10),
        );
        assert_eq!(&b[..], &[0x20, 0x06, 0x01, 0x00, 0x03, 0x21, 0x00, 0x0A]);
    }
}
