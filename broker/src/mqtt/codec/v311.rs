//! MQTT 3.1.1 packets, decoded by rumqttc's `mqttbytes` (after the framing checks of
//! [`super::read_packet`]) and converted to [`crate::mqtt::packet`]'s types.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;

use super::CodecError;
use crate::labels::PacketType;
use crate::mqtt::packet::{
    Ack, Connect, Disconnect, Filter, Packet, Protocol, Publish, Subscribe, Unsubscribe, Will,
};

/// Decodes the complete packet at the start of `buf` (remaining length `length`; a CONNECT's
/// fields add up to `connect_len`), consuming it.
pub(super) fn read(
    buf: &mut BytesMut,
    max_size: usize,
    length: usize,
    connect_len: Option<usize>,
) -> Result<Packet, CodecError> {
    let packet_type = buf[0] >> 4;
    let expected = match packet_type {
        1 => connect_len,
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
    let packet = v4::Packet::read(buf, max_size).map_err(CodecError::Malformed)?;
    Ok(match packet {
        v4::Packet::Connect(c) => Packet::Connect(Box::new(connect(c))),
        v4::Packet::Publish(p) => Packet::Publish(Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            pkid: p.pkid,
            topic_alias: None,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Packet::PubAck(ack(a.pkid)),
        v4::Packet::PubRec(a) => Packet::PubRec(ack(a.pkid)),
        v4::Packet::PubRel(a) => Packet::PubRel(ack(a.pkid)),
        v4::Packet::PubComp(a) => Packet::PubComp(ack(a.pkid)),
        v4::Packet::Subscribe(s) => {
            if s.pkid == 0 {
                return Err(CodecError::PacketIdZero(packet_type));
            }
            Packet::Subscribe(Subscribe {
                pkid: s.pkid,
                id: None,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| Filter::new(f.path, f.qos))
                    .collect(),
            })
        }
        v4::Packet::Unsubscribe(u) => {
            if u.pkid == 0 {
                return Err(CodecError::PacketIdZero(packet_type));
            }
            Packet::Unsubscribe(Unsubscribe {
                pkid: u.pkid,
                filters: u.topics,
            })
        }
        v4::Packet::PingReq => Packet::PingReq,
        v4::Packet::Disconnect => Packet::Disconnect(Disconnect::default()),
        v4::Packet::ConnAck(_) => Packet::ServerOnly(PacketType::ConnAck),
        v4::Packet::SubAck(_) => Packet::ServerOnly(PacketType::SubAck),
        v4::Packet::UnsubAck(_) => Packet::ServerOnly(PacketType::UnsubAck),
        v4::Packet::PingResp => Packet::ServerOnly(PacketType::PingResp),
    })
}

fn ack(pkid: u16) -> Ack {
    Ack { pkid, reason: 0 }
}

fn connect(c: v4::Connect) -> Connect {
    let mut connect = Connect::new(Protocol::V311, c.client_id);
    connect.clean_start = c.clean_session;
    connect.keep_alive = c.keep_alive;
    if let Some(login) = c.login {
        connect.username = Some(login.username);
        connect.password = Some(Bytes::from(login.password.into_bytes()));
    }
    connect.will = c.last_will.map(|w| Will {
        topic: w.topic,
        payload: w.message,
        qos: w.qos,
        retain: w.retain,
        delay: 0,
        properties: None,
    });
    connect
}
