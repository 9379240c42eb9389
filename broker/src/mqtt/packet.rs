//! Packets as the connection layer sees them, whichever protocol level the client speaks: the
//! codec ([`super::codec`]) decodes MQTT 3.1.1 and MQTT 5 client packets into these types and
//! encodes the server's packets for either level. Fields that only MQTT 5 carries have the value
//! a 3.1.1 packet means (no expiry, no properties, reason code 0).

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;

use crate::labels::PacketType;

pub use crate::labels::Protocol;

/// A packet a client sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet {
    /// CONNECT.
    Connect(Box<Connect>),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(Ack),
    /// PUBREC.
    PubRec(Ack),
    /// PUBREL.
    PubRel(Ack),
    /// PUBCOMP.
    PubComp(Ack),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT.
    Disconnect(Disconnect),
    /// AUTH (MQTT 5 only).
    Auth(Auth),
    /// A packet only a server sends (CONNACK, SUBACK, UNSUBACK, PINGRESP): well formed, but a
    /// protocol error from a client.
    ServerOnly(PacketType),
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::PingReq => PacketType::PingReq,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
            Packet::ServerOnly(kind) => *kind,
        }
    }
}

/// CONNECT.
#[derive(Debug, Clone, PartialEq)]
pub struct Connect {
    /// The protocol level asked for.
    pub protocol: Protocol,
    /// Client identifier as sent (may be empty).
    pub client_id: String,
    /// Clean session (3.1.1) or clean start (5).
    pub clean_start: bool,
    /// Keep-alive in seconds, 0 for none.
    pub keep_alive: u16,
    /// User name, if sent.
    pub username: Option<String>,
    /// Password, if sent (binary in MQTT 5).
    pub password: Option<Bytes>,
    /// The will, if any.
    pub will: Option<Will>,
    /// Session expiry interval in seconds (MQTT 5; 0 for 3.1.1: 3.1.1 sessions are governed by
    /// clean session and `mqtt.persistent_session_expiry`). `u32::MAX` means never.
    pub session_expiry: u32,
    /// Most QoS 1/2 PUBLISHes the client takes unacknowledged (65,535 when not sent).
    pub receive_maximum: u16,
    /// Largest packet the client accepts, in bytes (`None`: no limit but the protocol's).
    pub maximum_packet_size: Option<u32>,
    /// Most topic aliases the client accepts from the server (0: none).
    pub topic_alias_maximum: u16,
    /// Whether reason strings and user properties may be sent on any packet (else only on
    /// PUBLISH, CONNACK and DISCONNECT).
    pub request_problem_information: bool,
    /// Whether the client asks for response information in the CONNACK.
    pub request_response_information: bool,
    /// Enhanced authentication method (MQTT 5).
    pub authentication_method: Option<String>,
    /// Enhanced authentication data (MQTT 5).
    pub authentication_data: Option<Bytes>,
    /// User properties (MQTT 5).
    pub user_properties: Vec<(String, String)>,
}

impl Connect {
    /// A CONNECT of `protocol` with the defaults of a minimal packet: no will, no login, no
    /// properties.
    pub fn new(protocol: Protocol, client_id: impl Into<String>) -> Self {
        Self {
            protocol,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            session_expiry: 0,
            receive_maximum: u16::MAX,
            maximum_packet_size: None,
            topic_alias_maximum: 0,
            request_problem_information: true,
            request_response_information: false,
            authentication_method: None,
            authentication_data: None,
            user_properties: Vec::new(),
        }
    }
}

/// A will message.
#[derive(Debug, Clone, PartialEq)]
pub struct Will {
    /// Topic it is published to.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Will delay interval in seconds (MQTT 5; 0 for 3.1.1).
    pub delay: u32,
    /// Its message properties (MQTT 5).
    pub properties: Option<Box<Properties>>,
}

/// The properties a PUBLISH (or a will) carries to its subscribers (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    /// Message expiry interval in seconds, as received.
    pub message_expiry: Option<u32>,
    /// The properties forwarded unchanged, in their wire encoding as received (identifier
    /// byte, value), in order: payload format indicator, content type, response topic,
    /// correlation data, user properties. Encoded once when received, copied into every
    /// PUBLISH to an MQTT 5 subscriber.
    pub forwarded: Bytes,
}

impl Properties {
    /// Whether there is nothing to forward.
    pub fn is_empty(&self) -> bool {
        self.message_expiry.is_none() && self.forwarded.is_empty()
    }
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq)]
pub struct Publish {
    /// Topic name (empty in MQTT 5 when a topic alias stands for it).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// Packet identifier (0 for QoS 0).
    pub pkid: u16,
    /// Topic alias (MQTT 5).
    pub topic_alias: Option<u16>,
    /// Message properties (MQTT 5), `None` when there are none.
    pub properties: Option<Box<Properties>>,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Packet identifier.
    pub pkid: u16,
    /// Reason code (MQTT 5; 0 for 3.1.1).
    pub reason: u8,
}

/// One topic filter of a SUBSCRIBE with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// The topic filter.
    pub path: String,
    /// Maximum QoS asked for.
    pub qos: QoS,
    /// No local (MQTT 5): messages the client publishes are not sent back to it.
    pub no_local: bool,
    /// Retain as published (MQTT 5): the retain flag is forwarded as published.
    pub retain_as_published: bool,
    /// Retain handling (MQTT 5): 0 send retained messages, 1 only for a new subscription, 2
    /// never.
    pub retain_handling: u8,
}

impl Filter {
    /// A 3.1.1 filter: `path` at `qos`, default options.
    pub fn new(path: impl Into<String>, qos: QoS) -> Self {
        Self {
            path: path.into(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
        }
    }
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier.
    pub pkid: u16,
    /// Subscription identifier (MQTT 5).
    pub id: Option<u32>,
    /// Filters and options.
    pub filters: Vec<Filter>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier.
    pub pkid: u16,
    /// Topic filters.
    pub filters: Vec<String>,
}

/// DISCONNECT from the client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// Reason code (0 normal; 0x04 disconnect with will message).
    pub reason: u8,
    /// A new session expiry interval (MQTT 5).
    pub session_expiry: Option<u32>,
    /// Reason string (MQTT 5).
    pub reason_string: Option<String>,
}

/// AUTH (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Reason code: 0x00 success, 0x18 continue authentication, 0x19 re-authenticate.
    pub reason: u8,
    /// Authentication method.
    pub method: Option<String>,
    /// Authentication data.
    pub data: Option<Bytes>,
    /// Reason string.
    pub reason_string: Option<String>,
}

/// MQTT 5 reason codes the broker sends or reads.
pub mod reason {
    /// Success / normal disconnection / granted QoS 0.
    pub const SUCCESS: u8 = 0x00;
    /// Granted QoS 1.
    pub const GRANTED_QOS_1: u8 = 0x01;
    /// Granted QoS 2.
    pub const GRANTED_QOS_2: u8 = 0x02;
    /// DISCONNECT: disconnect with will message.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    /// PUBACK/PUBREC: no matching subscribers.
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    /// UNSUBACK: no subscription existed.
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// AUTH: continue authentication.
    pub const CONTINUE_AUTHENTICATION: u8 = 0x18;
    /// AUTH: re-authenticate.
    pub const RE_AUTHENTICATE: u8 = 0x19;
    /// Unspecified error.
    pub const UNSPECIFIED_ERROR: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED_PACKET: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Implementation specific error.
    pub const IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
    /// CONNACK: unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    /// CONNACK: client identifier not valid.
    pub const CLIENT_IDENTIFIER_NOT_VALID: u8 = 0x85;
    /// CONNACK: bad user name or password.
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// CONNACK: server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// CONNACK: banned.
    pub const BANNED: u8 = 0x8A;
    /// DISCONNECT: server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// Bad authentication method.
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    /// DISCONNECT: keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// DISCONNECT: session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// SUBACK/UNSUBACK: topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// PUBREL/PUBCOMP: packet identifier not found.
    pub const PACKET_IDENTIFIER_NOT_FOUND: u8 = 0x92;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Message rate too high.
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// Payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// Retain not supported.
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    /// QoS not supported.
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    /// Shared subscriptions not supported.
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    /// Connection rate exceeded.
    pub const CONNECTION_RATE_EXCEEDED: u8 = 0x9F;
    /// Subscription identifiers not supported.
    pub const SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED: u8 = 0xA1;
    /// Wildcard subscriptions not supported.
    pub const WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0xA2;
}
