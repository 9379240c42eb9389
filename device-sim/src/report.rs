//! Shared run statistics: live counters for the per-second status line and a
//! CONNACK latency histogram for the final summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::Notify;

/// Highest latency the histogram tracks exactly, in microseconds (10 minutes);
/// larger samples are clamped to it.
const MAX_TRACKED_US: u64 = 600_000_000;

/// Counters and histogram shared by all simulated devices.
///
/// Counters are plain atomics so that devices never contend on a lock except
/// for the brief histogram update after a CONNACK.
pub struct Stats {
    target: u64,
    connected: AtomicU64,
    connecting: AtomicU64,
    errors: AtomicU64,
    reconnects: AtomicU64,
    away: AtomicU64,
    takeovers: AtomicU64,
    all_connected: Notify,
    connack_us: Mutex<Histogram<u64>>,
}

/// Point-in-time copy of the live counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Devices whose MQTT session is currently established.
    pub connected: u64,
    /// Devices started but not currently connected (dialling or backing off).
    pub connecting: u64,
    /// Connection errors seen so far (failed attempts and dropped sessions).
    pub errors: u64,
    /// Sessions re-established after an earlier session of the same device was lost.
    pub reconnects: u64,
    /// Devices that left on purpose (scenario) and have not come back yet.
    pub away: u64,
    /// Completed takeovers (a second connection replaced the first).
    pub takeovers: u64,
}

/// CONNACK latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Number of recorded samples.
    pub samples: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl Stats {
    /// Creates empty statistics for a run that aims at `target` connected devices.
    pub fn new(target: u64) -> anyhow::Result<Self> {
        let hist = Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)?;
        Ok(Self {
            target,
            connected: AtomicU64::new(0),
            connecting: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            away: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            all_connected: Notify::new(),
            connack_us: Mutex::new(hist),
        })
    }

    /// A device task started and is about to dial.
    pub fn device_started(&self) {
        self.connecting.fetch_add(1, Ordering::Relaxed);
    }

    /// A device received a successful CONNACK `latency` after starting its attempt.
    /// `reconnect` tells whether this device had been connected before.
    pub fn connected(&self, latency: Duration, reconnect: bool) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Ok(mut h) = self.connack_us.lock() {
            h.saturating_record(us.clamp(1, MAX_TRACKED_US));
        }
        if reconnect {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.connecting.fetch_sub(1, Ordering::Relaxed);
        let now = self.connected.fetch_add(1, Ordering::Relaxed) + 1;
        if now == self.target {
            // notify_one stores a permit, so a waiter that subscribes late still wakes.
            self.all_connected.notify_one();
        }
    }

    /// A device failed to connect, or lost its session; `was_connected` tells which.
    pub fn error(&self, was_connected: bool) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if was_connected {
            self.connected.fetch_sub(1, Ordering::Relaxed);
            self.connecting.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A connected device left on purpose (clean, abrupt or silent) and will come back later.
    pub fn left(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
        self.away.fetch_add(1, Ordering::Relaxed);
    }

    /// A device that left is dialling again.
    pub fn returned(&self) {
        self.away.fetch_sub(1, Ordering::Relaxed);
        self.connecting.fetch_add(1, Ordering::Relaxed);
    }

    /// A second connection replaced a connected device's first one.
    pub fn took_over(&self) {
        self.takeovers.fetch_add(1, Ordering::Relaxed);
    }

    /// A device task ended; `was_connected` tells whether it held a session.
    pub fn device_stopped(&self, was_connected: bool) {
        if was_connected {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.connecting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Resolves the first time all target devices are connected at once.
    pub async fn wait_all_connected(&self) {
        self.all_connected.notified().await;
    }

    /// Copies the live counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connecting: self.connecting.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            away: self.away.load(Ordering::Relaxed),
            takeovers: self.takeovers.load(Ordering::Relaxed),
        }
    }

    /// Percentiles of all CONNACK latencies recorded so far.
    pub fn latency(&self) -> Latency {
        let h = match self.connack_us.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        };
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// Formats the once-per-second status line.
pub fn status_line(elapsed_s: u64, s: &Snapshot) -> String {
    format!(
        "t={elapsed_s} connected={} connecting={} away={} errors={} reconnects={} takeovers={}",
        s.connected, s.connecting, s.away, s.errors, s.reconnects, s.takeovers
    )
}

/// Formats the final summary line.
pub fn summary_line(connected: u64, target: u64, l: &Latency, s: &Snapshot) -> String {
    format!(
        "summary connected={connected} target={target} connack_p50_ms={:.3} connack_p90_ms={:.3} \
         connack_p99_ms={:.3} connack_max_ms={:.3} connack_samples={} errors={} reconnects={} \
         takeovers={}",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.samples, s.errors, s.reconnects, s.takeovers
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_device_lifecycle() -> anyhow::Result<()> {
        let stats = Stats::new(2)?;
        stats.device_started();
        stats.device_started();
        stats.connected(Duration::from_millis(2), false);
        stats.error(false);
        let s = stats.snapshot();
        assert_eq!((s.connected, s.connecting, s.errors), (1, 1, 1));
        stats.error(true);
        stats.connected(Duration::from_millis(4), true);
        let s = stats.snapshot();
        assert_eq!((s.connected, s.connecting, s.reconnects), (1, 1, 1));
        stats.left();
        assert_eq!((stats.snapshot().connected, stats.snapshot().away), (0, 1));
        stats.returned();
        stats.connected(Duration::from_millis(1), true);
        assert_eq!(stats.snapshot().away, 0);
        stats.device_stopped(true);
        stats.device_stopped(false);
        assert_eq!(stats.snapshot().connected + stats.snapshot().connecting, 0);
        let l = stats.latency();
        assert_eq!(l.samples, 3);
        assert!(l.max_ms >= 3.9 && l.max_ms <= 4.1, "{l:?}");
        Ok(())
    }
}
