//! Heartwire's test kit: what the broker's integration tests and benchmark and device-sim's
//! tests share. Each test file imports it like any crate (`use testkit::...`); nothing is
//! included by path.
//!
//! Modules, from the ground up:
//! - `temp`: temporary directories ([`TempDir`] from the `tempfile` crate, [`temp_dir`]).
//! - `wait`: [`WAIT`], the bound of any one wait, and [`eventually`], a wait on a condition.
//! - `net`: [`free_port`], for a server that must be told its port before it starts.
//! - `http`: a minimal HTTP/1.1 client: [`http_response`] (status, headers and body of a GET),
//!   [`http_get`] (the body of a 200), [`http_request`] (any method, with headers and a JSON body).
//! - [`pg`]: a throwaway PostgreSQL ([`pg::TestPostgres`]).
//! - `pki`: a throwaway certificate authority for TLS tests ([`TestPki`]): CA, server and
//!   client certificates as PEM files.
//! - `client`: MQTT test clients: raw bytes ([`RawClient`], [`ConnectOpts`], [`encode`],
//!   [`connect_packet`]) and rumqttc ([`Client`]).
//! - `mosquitto`: a real Mosquitto beside ours ([`Mosquitto`], with or without persistence), and
//!   [`mosquitto_passwd`]; [`find_mosquitto`] for a test that skips without it.
//! - `mqtt`: the MQTT layer alone, in-process on the test's runtime ([`TestBroker`]), with its
//!   connection events.
//! - `full`: the whole broker (MQTT, bridge, store, HTTP) on a runtime of its own
//!   ([`FullBroker`]): ready, graceful stop, crash; [`sqlite_url`] for a database in a directory.
//!
//! Every wait is bounded, and no server has a fixed port: listeners bind 127.0.0.1:0, and a
//! child process that must be told its port gets a [`free_port`].

mod client;
mod full;
pub mod fuzz5;
mod http;
mod mosquitto;
mod mqtt;
mod net;
pub mod pg;
mod pki;
mod process;
mod temp;
pub mod tls;
mod wait;

pub use client::{connect_packet, encode, Client, ConnectOpts, RawClient};
pub use full::{sqlite_url, FullBroker};
pub use http::{http_download, http_get, http_request, http_response, Response};
pub use mosquitto::{mosquitto_bin, mosquitto_passwd, Mosquitto};
pub use mqtt::TestBroker;
pub use net::free_port;
pub use pki::{CertFiles, TestPki};
pub use process::BrokerProcess;
pub use temp::{temp_dir, TempDir};
pub use wait::{eventually, WAIT};

/// A number for unique names (databases, directories) and random picks (ports): different on
/// every call, in every process.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
