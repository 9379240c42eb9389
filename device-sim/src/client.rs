//! The MQTT client of one connection of a device, at either protocol level (`--protocol`):
//! rumqttc's 3.1.1 client or its MQTT 5 client (`rumqttc::v5`), behind the few operations a
//! device needs (poll, publish, disconnect), so that [`crate::device`] has one code path for
//! both.
//!
//! Events and errors are reduced to what the device looks at: CONNACK, outgoing packets,
//! acknowledgements of its telemetry, and for MQTT 5 the reason code of a DISCONNECT the broker
//! sent before closing ([`Error::server_disconnect`]).

use std::fmt;
use std::time::Duration;

use rumqttc::v5;
use rumqttc::{NetworkOptions, Outgoing, QoS};

use crate::transport::Link;

/// The MQTT protocol level of every device of a run (`--protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    #[value(name = "3.1.1", alias = "4")]
    V311,
    /// MQTT 5: the broker's DISCONNECT reason codes are recorded in the truth.
    #[value(name = "5")]
    V5,
}

/// What one connection needs to know to dial.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// The protocol level.
    pub protocol: Protocol,
    /// MQTT client identifier.
    pub client_id: &'a str,
    /// Broker host.
    pub host: &'a str,
    /// Broker port.
    pub port: u16,
    /// The device's way to the broker.
    pub link: &'a Link,
    /// MQTT keep-alive (zero: no PINGREQs).
    pub keepalive: Duration,
    /// Clean session (3.1.1) or clean start (5; a persistent MQTT 5 session never expires,
    /// like a 3.1.1 one).
    pub clean: bool,
    /// Largest packet accepted from the broker, in bytes.
    pub max_incoming: usize,
    /// Largest packet sent (3.1.1; an MQTT 5 client obeys the broker's CONNACK instead).
    pub max_outgoing: usize,
    /// User name and password sent in CONNECT.
    pub credentials: Option<(String, String)>,
    /// Bound on connect plus CONNACK, in seconds.
    pub connect_timeout_s: u64,
}

/// One connection's client and event loop (not dialled until polled).
// The 3.1.1 event loop stays inline, as it was before MQTT 5 (a 3.1.1 fleet keeps its memory
// per device); the larger MQTT 5 one is boxed, one allocation per connection.
#[allow(clippy::large_enum_variant)]
pub enum Client {
    /// MQTT 3.1.1.
    V311(rumqttc::AsyncClient, rumqttc::EventLoop),
    /// MQTT 5 (its event loop boxed: it is larger, and a 3.1.1 fleet should not pay for it).
    V5(v5::AsyncClient, Box<v5::EventLoop>),
}

/// What a poll yielded, as far as a device cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A successful CONNACK.
    ConnAck,
    /// A packet written (or, for `AwaitAck`, held back).
    Outgoing(Outgoing),
    /// A PUBACK or PUBCOMP: a telemetry message acknowledged.
    Acked,
    /// Any other incoming packet.
    Incoming,
}

/// Why a connection (or an attempt) ended.
#[derive(Debug)]
pub enum Error {
    /// The 3.1.1 client's error.
    V311(rumqttc::ConnectionError),
    /// The MQTT 5 client's error.
    V5(v5::ConnectionError),
    /// The device gave the connection up (a takeover whose second connection failed).
    Abandoned,
}

impl Error {
    /// The reason code of the DISCONNECT the broker sent before closing (MQTT 5 only).
    pub fn server_disconnect(&self) -> Option<u8> {
        match self {
            Error::V5(v5::ConnectionError::MqttState(v5::StateError::ServerDisconnect {
                reason_code,
                ..
            })) => Some(*reason_code as u8),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::V311(e) => e.fmt(f),
            Error::V5(e) => e.fmt(f),
            Error::Abandoned => f.write_str("abandoned"),
        }
    }
}

impl Client {
    /// A client with a request channel of one (the device queues one request at a time).
    pub fn new(o: &Options<'_>) -> Self {
        let address = o.link.address(o.host, o.port);
        match o.protocol {
            Protocol::V311 => {
                let mut opts = rumqttc::MqttOptions::new(o.client_id, address, o.port);
                opts.set_transport(o.link.transport())
                    .set_keep_alive(o.keepalive)
                    .set_clean_session(o.clean)
                    .set_max_packet_size(o.max_incoming, o.max_outgoing)
                    .set_inflight(1);
                if let Some((user, password)) = &o.credentials {
                    opts.set_credentials(user, password);
                }
                let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1);
                let mut net = NetworkOptions::new();
                net.set_connection_timeout(o.connect_timeout_s);
                eventloop.set_network_options(net);
                Client::V311(client, eventloop)
            }
            Protocol::V5 => {
                let mut opts = v5::MqttOptions::new(o.client_id, address, o.port);
                opts.set_transport(o.link.transport())
                    .set_keep_alive(o.keepalive)
                    .set_clean_start(o.clean)
                    .set_max_packet_size(u32::try_from(o.max_incoming).ok())
                    .set_outgoing_inflight_upper_limit(1)
                    .set_connection_timeout(o.connect_timeout_s);
                if !o.clean {
                    // 0xFFFFFFFF: the session never expires, as a 3.1.1 persistent session.
                    opts.set_session_expiry_interval(Some(u32::MAX));
                }
                if let Some((user, password)) = &o.credentials {
                    opts.set_credentials(user, password);
                }
                let (client, eventloop) = v5::AsyncClient::new(opts, 1);
                Client::V5(client, Box::new(eventloop))
            }
        }
    }

    /// Drives the connection (dialling first if it has none) until the next event.
    pub async fn poll(&mut self) -> Result<Event, Error> {
        match self {
            Client::V311(_, eventloop) => {
                use rumqttc::{Event as E, Packet as P};
                match eventloop.poll().await.map_err(Error::V311)? {
                    E::Incoming(P::ConnAck(_)) => Ok(Event::ConnAck),
                    E::Incoming(P::PubAck(_) | P::PubComp(_)) => Ok(Event::Acked),
                    E::Incoming(_) => Ok(Event::Incoming),
                    E::Outgoing(o) => Ok(Event::Outgoing(o)),
                }
            }
            Client::V5(_, eventloop) => {
                use v5::mqttbytes::v5::Packet as P;
                use v5::Event as E;
                match eventloop.poll().await.map_err(Error::V5)? {
                    E::Incoming(P::ConnAck(_)) => Ok(Event::ConnAck),
                    E::Incoming(P::PubAck(_) | P::PubComp(_)) => Ok(Event::Acked),
                    E::Incoming(_) => Ok(Event::Incoming),
                    E::Outgoing(o) => Ok(Event::Outgoing(o)),
                }
            }
        }
    }

    /// Queues a PUBLISH; `false` when the request channel is full (the previous request still
    /// waits for the event loop).
    pub fn try_publish(&self, topic: &str, qos: QoS, payload: Vec<u8>) -> bool {
        match self {
            Client::V311(client, _) => client.try_publish(topic, qos, false, payload).is_ok(),
            Client::V5(client, _) => {
                let qos = match qos {
                    QoS::AtMostOnce => v5::mqttbytes::QoS::AtMostOnce,
                    QoS::AtLeastOnce => v5::mqttbytes::QoS::AtLeastOnce,
                    QoS::ExactlyOnce => v5::mqttbytes::QoS::ExactlyOnce,
                };
                client.try_publish(topic, qos, false, payload).is_ok()
            }
        }
    }

    /// Queues a DISCONNECT (reason 0x00 in MQTT 5); `false` when the request channel is full.
    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V311(client, _) => client.try_disconnect().is_ok(),
            Client::V5(client, _) => client.try_disconnect().is_ok(),
        }
    }

    /// The protocol level.
    pub fn protocol(&self) -> Protocol {
        match self {
            Client::V311(..) => Protocol::V311,
            Client::V5(..) => Protocol::V5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_v5_server_disconnect_has_a_reason_code() {
        let taken_over = Error::V5(v5::ConnectionError::MqttState(
            v5::StateError::ServerDisconnect {
                reason_code: v5::mqttbytes::v5::DisconnectReasonCode::SessionTakenOver,
                reason_string: None,
            },
        ));
        assert_eq!(taken_over.server_disconnect(), Some(0x8E));
        let eof = Error::V5(v5::ConnectionError::MqttState(
            v5::StateError::ConnectionAborted,
        ));
        assert_eq!(eof.server_disconnect(), None);
        let v311 = Error::V311(rumqttc::ConnectionError::RequestsDone);
        assert_eq!(v311.server_disconnect(), None);
        assert_eq!(Error::Abandoned.server_disconnect(), None);
    }
}
