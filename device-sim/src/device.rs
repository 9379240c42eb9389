//! One simulated device: an MQTT 3.1.1 client that connects, stays connected
//! (its event loop keeps running so keep-alive PINGREQs go out), retries with
//! jittered exponential backoff after errors, and disconnects cleanly when the
//! run ends.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, NetworkOptions, Outgoing, Packet};
use tokio_util::sync::CancellationToken;

use crate::report::Stats;

/// First retry delay after an error.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Upper bound of the retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest MQTT packet a simulated device sends or accepts, in bytes.
const MAX_PACKET_SIZE: usize = 4096;
/// How long a device waits for its DISCONNECT to be written at shutdown.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings shared by every device of a run.
#[derive(Debug, Clone)]
pub struct Profile {
    /// MQTT keep-alive interval; zero disables PINGREQs.
    pub keepalive: Duration,
    /// MQTT clean-session flag.
    pub clean_session: bool,
    /// Bound on TCP connect plus CONNECT/CONNACK exchange, in whole seconds.
    pub connect_timeout_s: u64,
}

/// Identity and target broker of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// MQTT client identifier.
    pub client_id: String,
    /// Broker host name or address.
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
}

/// Runs one device until `stop` is cancelled, reporting into `stats`.
pub async fn run(
    device: Device,
    profile: Arc<Profile>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut opts = MqttOptions::new(device.client_id, device.host, device.port);
    opts.set_keep_alive(profile.keepalive)
        .set_clean_session(profile.clean_session)
        .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE)
        .set_inflight(1);
    let (client, mut eventloop) = AsyncClient::new(opts, 1);
    let mut net = NetworkOptions::new();
    net.set_connection_timeout(profile.connect_timeout_s);
    eventloop.set_network_options(net);

    stats.device_started();
    let mut connected = false;
    let mut ever_connected = false;
    let mut failures: u32 = 0;
    let mut attempt_start = Instant::now();

    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                stats.connected(attempt_start.elapsed(), ever_connected);
                connected = true;
                ever_connected = true;
                failures = 0;
            }
            Ok(_) => {}
            Err(_) => {
                stats.error(connected);
                connected = false;
                let delay = backoff(failures);
                failures = failures.saturating_add(1);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                attempt_start = Instant::now();
            }
        }
    }

    if connected {
        // Best effort: queue a DISCONNECT and drive the event loop until it is written.
        if client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
    stats.device_stopped(connected);
}

/// Delay before retry number `failures` (0-based): exponential from
/// [`BACKOFF_MIN`] up to [`BACKOFF_MAX`], with "equal jitter" (uniform in the
/// upper half of the step) so that a mass disconnect does not reconnect in lockstep.
pub fn backoff(failures: u32) -> Duration {
    let step = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let half = step / 2;
    let jitter_ms = random_u64() % (u64::try_from(half.as_millis()).unwrap_or(1).max(1) + 1);
    half + Duration::from_millis(jitter_ms)
}

/// A random number from std's per-instance randomly keyed hasher; plenty for jitter.
fn random_u64() -> u64 {
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        for _ in 0..100 {
            let first = backoff(0);
            assert!(
                first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
                "{first:?}"
            );
            let late = backoff(40);
            assert!(late >= BACKOFF_MAX / 2 && late <= BACKOFF_MAX, "{late:?}");
        }
        assert!(backoff(3) >= Duration::from_millis(400));
    }
}
