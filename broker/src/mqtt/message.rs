//! A message as the broker routes it: published once, shared by every subscriber it goes to.

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::time::Instant;

use super::packet;

/// A message as routed: shared by every subscriber it goes to.
#[derive(Debug)]
pub struct Message {
    /// The topic it was published to.
    pub topic: Box<str>,
    /// Its own copy of the payload, so that it never pins a connection's read buffer.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The publisher's retain flag.
    pub retain: bool,
    /// What an MQTT 5 publisher attached to it; `None` for most messages.
    pub properties: Option<Box<Properties>>,
}

/// The MQTT 5 properties a message carries to its subscribers.
#[derive(Debug)]
pub struct Properties {
    /// When it expires (its message expiry interval after it was received): not delivered
    /// after that, and delivered with the interval that remains.
    pub expires_at: Option<Instant>,
    /// Properties forwarded unchanged, in their wire encoding (see
    /// [`packet::Properties::forwarded`]).
    pub forwarded: Bytes,
}

impl Message {
    /// A message of `topic` and `payload`, with the properties a PUBLISH or will carried
    /// (received `now`).
    pub fn new(
        topic: Box<str>,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: Option<&packet::Properties>,
        now: Instant,
    ) -> Self {
        let properties = properties.filter(|p| !p.is_empty()).map(|p| {
            Box::new(Properties {
                expires_at: p
                    .message_expiry
                    .map(|secs| now + std::time::Duration::from_secs(u64::from(secs))),
                forwarded: p.forwarded.clone(),
            })
        });
        Self {
            topic,
            payload,
            qos,
            retain,
            properties,
        }
    }

    /// Bytes it is accounted for in queues and the retained store: topic, payload and
    /// forwarded properties.
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + self.properties.as_ref().map_or(0, |p| p.forwarded.len())
    }

    /// Seconds left of its message expiry interval at `now` (rounded up), `Some(0)` once it has
    /// expired, `None` when it never expires.
    pub fn expiry_left(&self, now: Instant) -> Option<u32> {
        let at = self.properties.as_ref()?.expires_at?;
        let left = at.saturating_duration_since(now);
        Some(u32::try_from(left.as_millis().div_ceil(1000)).unwrap_or(u32::MAX))
    }
}

/// The lower of two QoS levels (what a subscriber granted `self` gets of a message sent at
/// `other`).
pub trait MinQos {
    /// min(self, other).
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
