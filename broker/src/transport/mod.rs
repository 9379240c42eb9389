//! The byte streams under MQTT: what the listeners do between accepting a socket and reading
//! its CONNECT. [`tls`]: rustls server configuration, reload and client identity. Knows nothing
//! of MQTT: the connection layer reads packets from whichever stream these produce.

pub mod tls;
