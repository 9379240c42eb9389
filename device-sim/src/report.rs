//! Shared run statistics: live counters for the per-second status line and a
//! CONNACK latency histogram for the final summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
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
    connect_failed: AtomicU64,
    connection_lost: AtomicU64,
    reconnects: AtomicU64,
    away: AtomicU64,
    takeovers: AtomicU64,
    published: AtomicU64,
    acknowledged: AtomicU64,
    publish_skipped: AtomicU64,
    all_connected: Notify,
    connack_us: Mutex<Histogram<u64>>,
    /// The message of the first `connect_failed` error, for the summary.
    first_connect_failed: OnceLock<String>,
    /// The message of the first `connection_lost` error, for the summary.
    first_connection_lost: OnceLock<String>,
    /// MQTT 5 DISCONNECTs received from the broker, by reason code (rare: a lock is fine).
    server_disconnects: Mutex<BTreeMap<u8, u64>>,
}

/// Point-in-time copy of the live counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Devices whose MQTT session is currently established.
    pub connected: u64,
    /// Devices started but not currently connected (dialling or backing off).
    pub connecting: u64,
    /// Connection errors seen so far (failed attempts and dropped sessions).
    pub errors: u64,
    /// Errors of kind `connect_failed`: an attempt (TCP connect or CONNACK) failed.
    pub connect_failed: u64,
    /// Errors of kind `connection_lost`: an established session dropped unexpectedly.
    pub connection_lost: u64,
    /// Sessions re-established after an earlier session of the same device was lost.
    pub reconnects: u64,
    /// Devices that left on purpose (scenario) and have not come back yet.
    pub away: u64,
    /// Completed takeovers (a second connection replaced the first).
    pub takeovers: u64,
    /// Telemetry PUBLISH packets written (retransmissions included).
    #[serde(default)]
    pub published: u64,
    /// PUBACKs (QoS 1) and PUBCOMPs (QoS 2) received.
    #[serde(default)]
    pub acknowledged: u64,
    /// Telemetry messages not sent because the previous one was still waiting (in flight).
    #[serde(default)]
    pub publish_skipped: u64,
}

/// CONNACK latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
            connect_failed: AtomicU64::new(0),
            connection_lost: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            away: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            published: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            publish_skipped: AtomicU64::new(0),
            all_connected: Notify::new(),
            connack_us: Mutex::new(hist),
            first_connect_failed: OnceLock::new(),
            first_connection_lost: OnceLock::new(),
            server_disconnects: Mutex::new(BTreeMap::new()),
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

    /// A device failed to connect, or lost its session; `was_connected` tells which. The first
    /// error of each kind keeps its message (`detail` is called for that one only).
    pub fn error(&self, was_connected: bool, detail: impl FnOnce() -> String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let (kind, first) = if was_connected {
            (&self.connection_lost, &self.first_connection_lost)
        } else {
            (&self.connect_failed, &self.first_connect_failed)
        };
        if kind.fetch_add(1, Ordering::Relaxed) == 0 {
            let _ = first.set(detail());
        }
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

    /// The broker sent an MQTT 5 DISCONNECT with reason `code` before closing a connection.
    pub fn server_disconnect(&self, code: u8) {
        let mut counts = match self.server_disconnects.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        *counts.entry(code).or_default() += 1;
    }

    /// MQTT 5 DISCONNECTs received so far, by reason code (`0x8E`, ...), for the summary.
    pub fn server_disconnects(&self) -> BTreeMap<String, u64> {
        let counts = match self.server_disconnects.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        counts.iter().map(|(c, n)| (hex(*c), *n)).collect()
    }

    /// A telemetry PUBLISH was written.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// A PUBACK or PUBCOMP arrived.
    pub fn acknowledged(&self) {
        self.acknowledged.fetch_add(1, Ordering::Relaxed);
    }

    /// A telemetry message was skipped because the previous one was still waiting.
    pub fn publish_skipped(&self) {
        self.publish_skipped.fetch_add(1, Ordering::Relaxed);
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
            connect_failed: self.connect_failed.load(Ordering::Relaxed),
            connection_lost: self.connection_lost.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            away: self.away.load(Ordering::Relaxed),
            takeovers: self.takeovers.load(Ordering::Relaxed),
            published: self.published.load(Ordering::Relaxed),
            acknowledged: self.acknowledged.load(Ordering::Relaxed),
            publish_skipped: self.publish_skipped.load(Ordering::Relaxed),
        }
    }

    fn hist(&self) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        match self.connack_us.lock() {
            Ok(h) => h,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The message of the first error of each kind that occurred, by kind name.
    pub fn first_errors(&self) -> BTreeMap<String, String> {
        [
            (CONNECT_FAILED, &self.first_connect_failed),
            (CONNECTION_LOST, &self.first_connection_lost),
        ]
        .into_iter()
        .filter_map(|(kind, first)| Some((kind.to_owned(), first.get()?.clone())))
        .collect()
    }

    /// Percentiles of all CONNACK latencies recorded so far.
    pub fn latency(&self) -> Latency {
        latency_of(&self.hist())
    }

    /// The CONNACK histogram as (value µs, count) pairs, one per recorded bucket; feeding them
    /// to [`merge_recorded`] rebuilds the same histogram (used to merge workers exactly).
    pub fn recorded(&self) -> Vec<(u64, u64)> {
        self.hist()
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    /// Live counters plus the CONNACK histogram in the fixed Prometheus buckets.
    pub fn live(&self) -> Live {
        let h = self.hist();
        Live {
            snapshot: self.snapshot(),
            target: self.target,
            buckets: BUCKETS_S
                .iter()
                .map(|&b| h.count_between(0, (b * 1e6) as u64))
                .collect(),
            count: h.len(),
            sum_s: h.mean() * h.len() as f64 / 1e6,
        }
    }
}

/// Upper bounds (seconds) of the fixed `devicesim_connect_latency_seconds` buckets.
pub const BUCKETS_S: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Live counters and CONNACK histogram (fixed buckets, cumulative counts); what a worker
/// reports each second and what `--metrics-listen` exports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Live {
    /// The counters.
    pub snapshot: Snapshot,
    /// Devices in the run (--count).
    #[serde(default)]
    pub target: u64,
    /// Cumulative sample counts at or below each bound of [`BUCKETS_S`].
    pub buckets: Vec<u64>,
    /// Number of samples.
    pub count: u64,
    /// Sum of the samples in seconds (approximate: mean × count).
    pub sum_s: f64,
}

impl Live {
    /// Adds another process's numbers to these.
    pub fn add(&mut self, o: &Live) {
        let (a, b) = (&mut self.snapshot, &o.snapshot);
        a.connected += b.connected;
        a.connecting += b.connecting;
        a.errors += b.errors;
        a.connect_failed += b.connect_failed;
        a.connection_lost += b.connection_lost;
        a.reconnects += b.reconnects;
        a.away += b.away;
        a.takeovers += b.takeovers;
        a.published += b.published;
        a.acknowledged += b.acknowledged;
        a.publish_skipped += b.publish_skipped;
        self.target += o.target;
        self.buckets.resize(BUCKETS_S.len(), 0);
        for (x, y) in self.buckets.iter_mut().zip(&o.buckets) {
            *x += y;
        }
        self.count += o.count;
        self.sum_s += o.sum_s;
    }
}

fn latency_of(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        samples: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

/// Percentiles of the union of histograms given as [`Stats::recorded`] pairs.
pub fn merge_recorded<'a>(parts: impl IntoIterator<Item = &'a [(u64, u64)]>) -> Result<Latency> {
    let mut h = Histogram::<u64>::new_with_bounds(1, MAX_TRACKED_US, 3)?;
    for part in parts {
        for &(v, n) in part {
            h.saturating_record_n(v.clamp(1, MAX_TRACKED_US), n);
        }
    }
    Ok(latency_of(&h))
}

/// A reason code as the MQTT 5 specification writes it: `0x8E`.
pub fn hex(code: u8) -> String {
    format!("0x{code:02X}")
}

/// Name of the error kind "an attempt (TCP connect, CONNACK or timeout) failed".
pub const CONNECT_FAILED: &str = "connect_failed";
/// Name of the error kind "an established session dropped unexpectedly".
pub const CONNECTION_LOST: &str = "connection_lost";

/// Errors by kind, for the JSON summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    /// All errors.
    pub total: u64,
    /// Failed connection attempts (TCP connect, CONNACK or timeout).
    pub connect_failed: u64,
    /// Established sessions that dropped without the simulator meaning it.
    pub connection_lost: u64,
    /// The message of the first error of each kind that occurred (`connect_failed`,
    /// `connection_lost`), with the broker address; with workers, the lowest worker's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub first: BTreeMap<String, String>,
}

impl Errors {
    /// Adds a worker's errors; the first message of a kind already known is kept.
    pub fn add(&mut self, o: &Errors) {
        self.total += o.total;
        self.connect_failed += o.connect_failed;
        self.connection_lost += o.connection_lost;
        for (kind, message) in &o.first {
            self.first
                .entry(kind.clone())
                .or_insert_with(|| message.clone());
        }
    }

    /// One stderr line per kind: `first connect_failed error: MESSAGE (N in all)`.
    pub fn lines(&self) -> Vec<String> {
        self.first
            .iter()
            .map(|(kind, message)| {
                let n = match kind.as_str() {
                    CONNECT_FAILED => self.connect_failed,
                    CONNECTION_LOST => self.connection_lost,
                    _ => 0,
                };
                format!("first {kind} error: {message} ({n} of this kind in all)")
            })
            .collect()
    }
}

/// Telemetry counters, for the JSON summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Telemetry {
    /// PUBLISH packets written (retransmissions included).
    pub published: u64,
    /// PUBACKs and PUBCOMPs received.
    pub acknowledged: u64,
    /// Messages skipped because the previous one was still in flight.
    pub skipped: u64,
}

impl From<&Snapshot> for Telemetry {
    fn from(s: &Snapshot) -> Self {
        Self {
            published: s.published,
            acknowledged: s.acknowledged,
            skipped: s.publish_skipped,
        }
    }
}

/// The final summary of a run (`--json FILE`; a worker prints it on a `result ` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Devices connected at the end of --duration.
    pub connected: u64,
    /// --count.
    pub target: u64,
    /// CONNACK latency percentiles (ms).
    pub connack: Latency,
    /// How `connack` was obtained: `exact` (one histogram, or the workers' histograms merged).
    pub connack_method: String,
    /// Errors by kind.
    pub errors: Errors,
    /// Sessions re-established.
    pub reconnects: u64,
    /// Completed takeovers.
    pub takeovers: u64,
    /// Telemetry: messages written, acknowledged (QoS 1/2) and skipped.
    #[serde(default)]
    pub telemetry: Telemetry,
    /// --duration in seconds.
    pub duration_s: u64,
    /// Wall time of the whole run, shutdown included, in seconds.
    pub elapsed_s: f64,
    /// --scenario.
    pub scenario: String,
    /// --protocol (`3.1.1` or `5`).
    #[serde(default = "v311")]
    pub protocol: String,
    /// MQTT 5: DISCONNECTs received from the broker, by reason code (`"0x8E": 12`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub server_disconnects: BTreeMap<String, u64>,
    /// Worker processes (1 without --workers).
    pub workers: u32,
    /// Worker only: the CONNACK histogram as (µs, count) pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connack_hist_us: Vec<(u64, u64)>,
}

fn v311() -> String {
    "3.1.1".to_owned()
}

impl Summary {
    /// The human summary line (with MQTT 5, the broker's DISCONNECTs by reason code at its end:
    /// `server_disconnects=0x8D:2,0x8E:5`).
    pub fn line(&self) -> String {
        let l = &self.connack;
        let mut line = format!(
            "summary connected={} target={} connack_p50_ms={:.3} connack_p90_ms={:.3} \
             connack_p99_ms={:.3} connack_max_ms={:.3} connack_samples={} errors={} reconnects={} \
             takeovers={} published={} acknowledged={} publish_skipped={}",
            self.connected,
            self.target,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.max_ms,
            l.samples,
            self.errors.total,
            self.reconnects,
            self.takeovers,
            self.telemetry.published,
            self.telemetry.acknowledged,
            self.telemetry.skipped
        );
        if self.protocol != "3.1.1" {
            let codes: Vec<String> = self
                .server_disconnects
                .iter()
                .map(|(code, n)| format!("{code}:{n}"))
                .collect();
            line.push_str(&format!(
                " protocol={} server_disconnects={}",
                self.protocol,
                if codes.is_empty() {
                    "none".to_owned()
                } else {
                    codes.join(",")
                }
            ));
        }
        line
    }
}

/// Formats the once-per-second status line.
pub fn status_line(elapsed_s: u64, s: &Snapshot) -> String {
    format!(
        "t={elapsed_s} connected={} connecting={} away={} errors={} reconnects={} takeovers={} \
         published={}",
        s.connected, s.connecting, s.away, s.errors, s.reconnects, s.takeovers, s.published
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_errors_add_up_and_keep_the_first_message_of_each_kind() {
        let mut total = Errors::default();
        let mut w0 = Errors {
            total: 2,
            connect_failed: 2,
            ..Errors::default()
        };
        w0.first
            .insert(CONNECT_FAILED.into(), "refused by w0".into());
        let mut w1 = Errors {
            total: 4,
            connect_failed: 3,
            connection_lost: 1,
            ..Errors::default()
        };
        w1.first
            .insert(CONNECT_FAILED.into(), "refused by w1".into());
        w1.first
            .insert(CONNECTION_LOST.into(), "reset by w1".into());
        total.add(&w0);
        total.add(&w1);
        assert_eq!(
            (total.total, total.connect_failed, total.connection_lost),
            (6, 5, 1)
        );
        assert_eq!(
            total.lines(),
            [
                "first connect_failed error: refused by w0 (5 of this kind in all)",
                "first connection_lost error: reset by w1 (1 of this kind in all)",
            ]
        );
    }

    #[test]
    fn counters_follow_device_lifecycle() -> anyhow::Result<()> {
        let stats = Stats::new(2)?;
        stats.device_started();
        stats.device_started();
        stats.connected(Duration::from_millis(2), false);
        stats.error(false, || "refused".to_owned());
        let s = stats.snapshot();
        assert_eq!((s.connected, s.connecting, s.errors), (1, 1, 1));
        stats.error(true, || "reset".to_owned());
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
        let s = stats.snapshot();
        assert_eq!((s.errors, s.connect_failed, s.connection_lost), (2, 1, 1));
        let rec = stats.recorded();
        let merged = merge_recorded([rec.as_slice(), rec.as_slice()])?;
        assert_eq!(merged.samples, 6);
        assert_eq!(merged.max_ms, l.max_ms);
        let mut live = stats.live();
        assert_eq!(live.count, 3);
        assert_eq!(live.buckets[BUCKETS_S.len() - 1], 3);
        live.add(&stats.live());
        assert_eq!((live.count, live.snapshot.errors), (6, 4));

        // The first message of each kind is kept, and only the first is formatted.
        stats.error(false, || {
            unreachable!("only the first message is formatted")
        });
        let first = stats.first_errors();
        assert_eq!(first["connect_failed"], "refused");
        assert_eq!(first["connection_lost"], "reset");
        Ok(())
    }
}
