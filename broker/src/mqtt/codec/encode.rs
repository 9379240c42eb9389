//! The packets the server sends, at either protocol level. MQTT 5 fields are left out of a
//! 3.1.1 packet; MQTT 5 packets take the short forms the specification allows (an
//! acknowledgement with reason 0x00 and no properties is just its packet id).

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::QoS;

use super::ConnackCode;
use crate::labels::PacketType;
use crate::mqtt::packet::{reason, Protocol};

/// MQTT 5 property identifiers the server writes.
pub mod property {
    /// Message expiry interval (four-byte integer).
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    /// Subscription identifier (variable byte integer).
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    /// Session expiry interval (four-byte integer).
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    /// Assigned client identifier (UTF-8 string).
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    /// Server keep alive (two-byte integer).
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    /// Authentication method (UTF-8 string).
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    /// Authentication data (binary data).
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    /// Reason string (UTF-8 string).
    pub const REASON_STRING: u8 = 0x1F;
    /// Receive maximum (two-byte integer).
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    /// Topic alias maximum (two-byte integer).
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    /// Topic alias (two-byte integer).
    pub const TOPIC_ALIAS: u8 = 0x23;
    /// Maximum QoS (byte).
    pub const MAXIMUM_QOS: u8 = 0x24;
    /// Retain available (byte).
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    /// Maximum packet size (four-byte integer).
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    /// Wildcard subscription available (byte).
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    /// Subscription identifier available (byte).
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    /// Shared subscription available (byte).
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// A property list being built: identifier and value, in order.
#[derive(Debug, Default)]
pub struct Properties(Vec<u8>);

impl Properties {
    /// A byte property.
    pub fn byte(&mut self, id: u8, value: u8) -> &mut Self {
        self.0.extend_from_slice(&[id, value]);
        self
    }

    /// A two-byte integer property.
    pub fn u16(&mut self, id: u8, value: u16) -> &mut Self {
        self.0.push(id);
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A four-byte integer property.
    pub fn u32(&mut self, id: u8, value: u32) -> &mut Self {
        self.0.push(id);
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A UTF-8 string or binary data property (at most 65,535 bytes: longer values are cut,
    /// at a character boundary for strings).
    pub fn bytes(&mut self, id: u8, value: &[u8]) -> &mut Self {
        let len = value.len().min(usize::from(u16::MAX));
        self.0.push(id);
        self.0.extend_from_slice(&(len as u16).to_be_bytes());
        self.0.extend_from_slice(&value[..len]);
        self
    }

    /// A UTF-8 string property.
    pub fn string(&mut self, id: u8, value: &str) -> &mut Self {
        let mut end = value.len().min(usize::from(u16::MAX));
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes(id, &value.as_bytes()[..end])
    }

    /// The encoded properties, without their length.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

/// Bytes a variable byte integer takes.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a variable byte integer (remaining length, property length, subscription id).
pub fn write_varint(buf: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Appends a property list: its length, then the properties.
fn write_properties(buf: &mut BytesMut, properties: &[u8]) {
    write_varint(buf, properties.len());
    buf.put_slice(properties);
}

/// Appends a CONNACK. `properties` go into an MQTT 5 CONNACK only.
pub fn write_connack(
    buf: &mut BytesMut,
    protocol: Protocol,
    code: ConnackCode,
    session_present: bool,
    properties: &Properties,
) {
    buf.put_u8(0x20);
    match protocol {
        Protocol::V311 => {
            buf.put_u8(2);
            buf.put_u8(u8::from(session_present));
            buf.put_u8(code.v311());
        }
        Protocol::V5 => {
            let props = properties.as_slice();
            write_varint(buf, 2 + varint_len(props.len()) + props.len());
            buf.put_u8(u8::from(session_present));
            buf.put_u8(code.v5());
            write_properties(buf, props);
        }
    }
}

/// Appends a PUBACK, PUBREC, PUBREL or PUBCOMP (`kind`) with an MQTT 5 reason code (left out
/// of a 3.1.1 packet, and of an MQTT 5 one when it is 0x00).
pub fn write_ack(buf: &mut BytesMut, protocol: Protocol, kind: PacketType, pkid: u16, code: u8) {
    let byte1 = match kind {
        PacketType::PubAck => 0x40,
        PacketType::PubRec => 0x50,
        PacketType::PubRel => 0x62,
        _ => 0x70,
    };
    buf.put_u8(byte1);
    if protocol == Protocol::V5 && code != reason::SUCCESS {
        buf.put_u8(3);
        buf.put_u16(pkid);
        buf.put_u8(code);
    } else {
        buf.put_u8(2);
        buf.put_u16(pkid);
    }
}

/// Appends a SUBACK with one MQTT 5 reason code per filter (in 3.1.1: 0x00-0x02 as they are,
/// every refusal as 0x80).
pub fn write_suback(buf: &mut BytesMut, protocol: Protocol, pkid: u16, codes: &[u8]) {
    buf.put_u8(0x90);
    match protocol {
        Protocol::V311 => {
            write_varint(buf, 2 + codes.len());
            buf.put_u16(pkid);
            buf.extend(codes.iter().map(|c| if *c < 0x80 { *c } else { 0x80 }));
        }
        Protocol::V5 => {
            write_varint(buf, 3 + codes.len());
            buf.put_u16(pkid);
            buf.put_u8(0);
            buf.put_slice(codes);
        }
    }
}

/// Appends an UNSUBACK; an MQTT 5 one carries a reason code per filter.
pub fn write_unsuback(buf: &mut BytesMut, protocol: Protocol, pkid: u16, codes: &[u8]) {
    buf.put_u8(0xB0);
    match protocol {
        Protocol::V311 => {
            buf.put_u8(2);
            buf.put_u16(pkid);
        }
        Protocol::V5 => {
            write_varint(buf, 3 + codes.len());
            buf.put_u16(pkid);
            buf.put_u8(0);
            buf.put_slice(codes);
        }
    }
}

/// Appends a PINGRESP.
pub fn write_pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xD0, 0x00]);
}

/// Appends an MQTT 5 DISCONNECT with `code` and, if given, a reason string.
pub fn write_disconnect(buf: &mut BytesMut, code: u8, reason_string: Option<&str>) {
    let mut props = Properties::default();
    if let Some(text) = reason_string {
        props.string(property::REASON_STRING, text);
    }
    let props = props.as_slice();
    buf.put_u8(0xE0);
    write_varint(buf, 1 + varint_len(props.len()) + props.len());
    buf.put_u8(code);
    write_properties(buf, props);
}

/// Appends an MQTT 5 AUTH with `code` and its properties (method, data, reason string).
pub fn write_auth(buf: &mut BytesMut, code: u8, properties: &Properties) {
    let props = properties.as_slice();
    buf.put_u8(0xF0);
    write_varint(buf, 1 + varint_len(props.len()) + props.len());
    buf.put_u8(code);
    write_properties(buf, props);
}

/// A PUBLISH to write.
#[derive(Debug, Clone, Copy)]
pub struct OutPublish<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS.
    pub qos: QoS,
    /// Packet id (ignored for QoS 0).
    pub pkid: u16,
    /// Retain flag.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// MQTT 5: the message's remaining expiry interval in seconds.
    pub message_expiry: Option<u32>,
    /// MQTT 5: the properties forwarded as the publisher sent them (already encoded).
    pub forwarded: &'a [u8],
    /// MQTT 5: the identifiers of the subscriptions it matched.
    pub subscription_ids: &'a [u32],
    /// MQTT 5: the topic alias it sets (with a topic) or uses (with an empty topic).
    pub topic_alias: Option<u16>,
}

impl<'a> OutPublish<'a> {
    /// A PUBLISH without MQTT 5 properties.
    pub fn new(topic: &'a str, payload: &'a [u8], qos: QoS, pkid: u16, retain: bool) -> Self {
        Self {
            topic,
            payload,
            qos,
            pkid,
            retain,
            dup: false,
            message_expiry: None,
            forwarded: &[],
            subscription_ids: &[],
            topic_alias: None,
        }
    }

    /// Length of its property list (MQTT 5), without the length's own bytes.
    fn properties_len(&self) -> usize {
        self.message_expiry.map_or(0, |_| 5)
            + self.topic_alias.map_or(0, |_| 3)
            + self.forwarded.len()
            + self
                .subscription_ids
                .iter()
                .map(|id| 1 + varint_len(*id as usize))
                .sum::<usize>()
    }

    fn remaining_length(&self, protocol: Protocol) -> usize {
        let mut remaining = 2 + self.topic.len() + self.payload.len();
        if self.qos != QoS::AtMostOnce {
            remaining += 2;
        }
        if protocol == Protocol::V5 {
            let props = self.properties_len();
            remaining += varint_len(props) + props;
        }
        remaining
    }

    /// Its size on the wire at `protocol`'s level, fixed header included (what a client's
    /// maximum packet size is compared with).
    pub fn size(&self, protocol: Protocol) -> usize {
        let remaining = self.remaining_length(protocol);
        1 + varint_len(remaining) + remaining
    }
}

/// Appends a PUBLISH.
pub fn write_publish(buf: &mut BytesMut, protocol: Protocol, p: &OutPublish<'_>) {
    let mut byte1 = 0b0011_0000 | ((p.qos as u8) << 1);
    if p.retain {
        byte1 |= 1;
    }
    if p.dup {
        byte1 |= 0b1000;
    }
    let remaining = p.remaining_length(protocol);
    buf.reserve(5 + remaining);
    buf.put_u8(byte1);
    write_varint(buf, remaining);
    buf.put_u16(p.topic.len() as u16);
    buf.put_slice(p.topic.as_bytes());
    if p.qos != QoS::AtMostOnce {
        buf.put_u16(p.pkid);
    }
    if protocol == Protocol::V5 {
        write_varint(buf, p.properties_len());
        if let Some(expiry) = p.message_expiry {
            buf.put_u8(property::MESSAGE_EXPIRY_INTERVAL);
            buf.put_u32(expiry);
        }
        if let Some(alias) = p.topic_alias {
            buf.put_u8(property::TOPIC_ALIAS);
            buf.put_u16(alias);
        }
        buf.put_slice(p.forwarded);
        for id in p.subscription_ids {
            buf.put_u8(property::SUBSCRIPTION_IDENTIFIER);
            write_varint(buf, *id as usize);
        }
    }
    buf.put_slice(p.payload);
}
