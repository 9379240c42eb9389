//! A message as the broker routes it: published once, shared by every subscriber it goes to.

use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::time::Instant;

use super::packet;
use crate::state::{StoredDelivery, StoredMessage, StoredOptions, StoredProperties};

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
    /// The publishing session ([`crate::mqtt::session::Session::incarnation`]), 0 for the
    /// broker's own (wills, tests): a no-local subscription of that session does not get it.
    pub origin: u64,
    /// A hash of the publisher's client id (shared subscriptions' `hash_client_id` strategy).
    pub origin_hash: u64,
}

/// The options of a subscription, as the router and the session keep them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    /// The granted QoS.
    pub qos: QoS,
    /// MQTT 5 no local: messages of the subscribing session are not sent back to it.
    pub no_local: bool,
    /// MQTT 5 retain as published: the retain flag is forwarded as published (else cleared on
    /// live delivery).
    pub retain_as_published: bool,
    /// MQTT 5 subscription identifier, 0 for none.
    pub id: u32,
}

impl SubOptions {
    /// A 3.1.1 subscription: `qos`, nothing else.
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            no_local: false,
            retain_as_published: false,
            id: 0,
        }
    }
}

impl SubOptions {
    /// The options as the durable state keeps them.
    pub fn to_stored(self) -> StoredOptions {
        StoredOptions {
            qos: self.qos as u8,
            no_local: self.no_local,
            retain_as_published: self.retain_as_published,
            id: self.id,
        }
    }

    /// Options read back from the durable state.
    pub fn from_stored(o: StoredOptions) -> Self {
        Self {
            qos: qos(o.qos),
            no_local: o.no_local,
            retain_as_published: o.retain_as_published,
            id: o.id,
        }
    }
}

/// How a routed message goes to one session: the highest QoS among its matching
/// subscriptions, its retain flag, and their subscription identifiers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// The retain flag it is sent with.
    pub retain: bool,
    /// The identifiers of the matching subscriptions that have one.
    pub ids: Option<Box<[u32]>>,
    /// The shared subscription (`$share/{group}/{filter}`) it came through, when it came
    /// through one only: should the session end before the client has it, it goes to another
    /// member of the group.
    pub shared: Option<Arc<str>>,
}

impl Delivery {
    /// At `qos`, not retained, without identifiers.
    pub fn qos(qos: QoS) -> Self {
        Self {
            qos,
            retain: false,
            ids: None,
            shared: None,
        }
    }
}

impl Delivery {
    /// The delivery as the durable state keeps it.
    pub fn to_stored(&self) -> StoredDelivery {
        StoredDelivery {
            qos: self.qos as u8,
            retain: self.retain,
            ids: self.ids.clone(),
            shared: self.shared.clone(),
        }
    }

    /// A delivery read back from the durable state.
    pub fn from_stored(d: StoredDelivery) -> Self {
        Self {
            qos: qos(d.qos),
            retain: d.retain,
            ids: d.ids,
            shared: d.shared,
        }
    }
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
            origin: 0,
            origin_hash: 0,
        }
    }

    /// The same, published by the session of incarnation `origin` of client `client_id`.
    pub fn from_session(mut self, origin: u64, client_id: &str) -> Self {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same client id hashes the same for the broker's life.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut hasher);
        self.origin = origin;
        self.origin_hash = hasher.finish();
        self
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

impl Message {
    /// The message as the durable state keeps it (its expiry as a wall-clock time).
    pub fn to_stored(&self) -> StoredMessage {
        StoredMessage {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos as u8,
            retain: self.retain,
            properties: self.properties.as_ref().map(|p| StoredProperties {
                expires_at_ms: p.expires_at.map_or(0, |at| {
                    let left = at.saturating_duration_since(Instant::now());
                    unix_ms(std::time::SystemTime::now() + left).max(1)
                }),
                forwarded: p.forwarded.clone(),
            }),
        }
    }

    /// A message read back from the durable state.
    pub fn from_stored(stored: StoredMessage) -> Self {
        let properties = stored.properties.map(|p| {
            let now_ms = unix_ms(std::time::SystemTime::now());
            Box::new(Properties {
                expires_at: (p.expires_at_ms != 0).then(|| {
                    Instant::now()
                        + std::time::Duration::from_millis(p.expires_at_ms.saturating_sub(now_ms))
                }),
                forwarded: p.forwarded,
            })
        });
        Self {
            topic: stored.topic,
            payload: stored.payload,
            qos: qos(stored.qos),
            retain: stored.retain,
            properties,
            origin: 0,
            origin_hash: 0,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The QoS of a stored level (0, 1 or 2; anything else is read as 2).
pub fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
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
