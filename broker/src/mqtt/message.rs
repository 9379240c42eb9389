//! A message as the broker routes it: published once, shared by every subscriber it goes to.

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;

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
}

impl Message {
    /// Bytes it is accounted for in queues and the retained store: topic and payload.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
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
