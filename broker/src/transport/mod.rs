//! The byte streams under MQTT: what the listeners do between accepting a socket and reading
//! its CONNECT. [`proxy`]: the PROXY protocol header a load balancer puts in front of a
//! connection; [`tls`]: the rustls server configuration, its reload and the client
//! certificate's identity; [`ws`]: MQTT over WebSocket. Each knows bytes and framing, nothing
//! of MQTT: the connection layer reads packets from whichever stream these produce.

pub mod proxy;
pub mod tls;
pub mod tls_stream;
pub mod ws;
