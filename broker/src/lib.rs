//! Heartwire: an MQTT 3.1.1 broker that knows, at every moment, which devices are online, since
//! when, and why each one went offline.
//!
//! Modules, in the order data flows through them:
//! - [`mqtt`]: listener, one task per connection (keep-alive, takeover), sessions, routing;
//!   emits a connection event for every connect and disconnect.
//! - [`presence`]: the connection events and their consumer.
//! - [`config`]: typed configuration (defaults < TOML file < `BROKER_` environment).
//! - [`metrics`]: every Prometheus metric, defined in one place.
//! - [`telemetry`]: tracing setup.

#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod telemetry;

use std::io;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::Config;

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The MQTT listener could not bind its address.
    #[error("cannot listen on {addr} (mqtt.listen): {source}")]
    Bind {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
}

/// Runs the broker until `shutdown` is cancelled, then closes every connection (reason
/// broker_shutdown) and drains the connection events, within `shutdown.grace_period`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let listener = TcpListener::bind(config.mqtt.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.mqtt.listen,
            source,
        })?;
    tracing::info!(
        listen = %listener.local_addr().unwrap_or(config.mqtt.listen),
        "MQTT listener ready."
    );
    let (events, receiver) = presence::channel(config.events.channel_capacity);
    let consumer = tokio::spawn(presence::log_events(receiver));
    let grace = config.shutdown.grace_period;
    mqtt::serve(listener, config.mqtt, events, shutdown, grace).await;
    // Every sender is gone once the connections have closed: the consumer then ends by itself.
    if tokio::time::timeout(grace, consumer).await.is_err() {
        tracing::warn!("Connection events still draining when the grace period ended.");
    }
    tracing::info!("Broker stopped.");
    Ok(())
}
