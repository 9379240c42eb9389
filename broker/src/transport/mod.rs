//! Transports that carry MQTT's byte stream to a listener other than plain TCP: the PROXY
//! protocol header a load balancer puts in front of a connection ([`proxy`]), and MQTT over
//! WebSocket ([`ws`]). Each is self-contained: it knows bytes and framing, nothing of MQTT.

pub mod proxy;
pub mod ws;
