//! Results: the report of each scenario (serialised as JSON), its one-line summary of
//! key=value pairs, and the percentile arithmetic they share.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::sockets::Queues;

/// The broker's resources over a measurement, when `--broker-pid` was given.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BrokerUsage {
    pub pid: u32,
    /// CPU seconds (user + system) the broker used during the window.
    pub cpu_s: f64,
    /// The same as a share of one core, in percent.
    pub cpu_percent: f64,
    pub rss_start_kib: u64,
    /// Highest RSS seen, sampled every 250 ms.
    pub rss_peak_kib: u64,
    pub rss_end_kib: u64,
}

/// The fan-in scenario's result.
#[derive(Debug, Serialize)]
pub struct FanInReport {
    pub publishers: usize,
    pub payload_size: usize,
    /// MQTT protocol level of every connection (4 or 5) and QoS of the messages.
    pub protocol: u8,
    pub qos: u8,
    /// The requested total rate, or `None` for "as fast as the sockets take".
    pub rate: Option<f64>,
    pub warmup_s: f64,
    pub window_s: f64,
    /// Messages the publishers' sockets accepted during the window, per second. The kernel
    /// takes them before the broker reads them: see `read_by_broker_per_s`.
    pub written_per_s: f64,
    /// Messages the broker read from its sockets during the window, per second: written, less
    /// the growth of the bytes queued on the connections to the broker's port (the
    /// publishers' send queues and the broker's receive queues). `None` if /proc/net/tcp was
    /// unreadable.
    pub read_by_broker_per_s: Option<f64>,
    /// Messages the subscriber received during the window, per second.
    pub delivered_per_s: f64,
    /// Lowest and highest delivered count of any whole second of the window.
    pub delivered_min_per_s: u64,
    pub delivered_max_per_s: u64,
    /// Delivered messages of each whole second of the window.
    pub delivered_each_second: Vec<u64>,
    /// 1 - delivered / read by the broker over the window: the share of what the broker took
    /// in that never reached the subscriber (messages queued inside the broker at either edge
    /// of the window blur it slightly).
    pub dropped_share: f64,
    /// Bytes queued between publishers and broker at the start and end of the window.
    pub queued_bytes_start: Option<Queues>,
    pub queued_bytes_end: Option<Queues>,
    /// Broker CPU microseconds per delivered message (with `--broker-pid`).
    pub broker_cpu_us_per_delivered: Option<f64>,
    pub broker: Option<BrokerUsage>,
    /// The generator's own CPU over the window, in percent of one core.
    pub loadgen_cpu_percent: f64,
    /// Publisher connections the broker closed before the end.
    pub publishers_closed_by_broker: u64,
    /// Whether the broker closed the subscriber's connection before the end.
    pub subscriber_closed_by_broker: bool,
    /// PUBLISH packets the subscriber received with a topic outside in/ or another payload
    /// size, over the whole run (0 unless a broker or the generator mangles messages).
    pub unexpected_messages: u64,
    /// Over the whole run (warm-up, window, drain): messages written, PUBACKs the publishers
    /// received (QoS 1), and messages the subscriber received. After the window the
    /// publishers stop and the subscriber reads on until it has them all, nothing more
    /// arrives for a second, or 5 s pass.
    pub written_total: u64,
    pub acked_total: u64,
    pub delivered_total: u64,
    /// written_total - delivered_total: messages lost (or still queued after the drain).
    pub undelivered_total: i64,
    pub drain_s: f64,
}

impl FanInReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "fan-in protocol={} qos={} publishers={} payload={} written_per_s={:.0} read_by_broker_per_s={} \
             delivered_per_s={:.0} delivered_min_per_s={} delivered_max_per_s={} dropped_pct={:.1} \
             queued_mib_end={}",
            self.protocol,
            self.qos,
            self.publishers,
            self.payload_size,
            self.written_per_s,
            self.read_by_broker_per_s
                .map_or_else(|| "none".to_owned(), |r| format!("{r:.0}")),
            self.delivered_per_s,
            self.delivered_min_per_s,
            self.delivered_max_per_s,
            self.dropped_share * 100.0,
            self.queued_bytes_end.map_or_else(
                || "none".to_owned(),
                |q| format!("{:.1}", q.total() as f64 / 1_048_576.0)
            ),
        );
        if let Some(b) = &self.broker {
            let per_msg = self
                .broker_cpu_us_per_delivered
                .map_or_else(|| "none".to_owned(), |us| format!("{us:.1}"));
            let _ = write!(
                s,
                " broker_cpu_pct={:.1} broker_cpu_us_per_delivered={per_msg} rss_start_kib={} \
                 rss_peak_kib={} rss_end_kib={}",
                b.cpu_percent, b.rss_start_kib, b.rss_peak_kib, b.rss_end_kib
            );
        }
        let _ = write!(
            s,
            " loadgen_cpu_pct={:.1} publishers_closed={} subscriber_closed={} unexpected={} \
             written_total={} acked_total={} delivered_total={} undelivered_total={} drain_s={:.1}",
            self.loadgen_cpu_percent,
            self.publishers_closed_by_broker,
            self.subscriber_closed_by_broker,
            self.unexpected_messages,
            self.written_total,
            self.acked_total,
            self.delivered_total,
            self.undelivered_total,
            self.drain_s,
        );
        s
    }
}

/// Round-trip statistics, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Nearest-rank percentiles of `samples_us` (any order).
    pub fn from_micros(mut samples_us: Vec<u64>) -> Self {
        if samples_us.is_empty() {
            return Self::default();
        }
        samples_us.sort_unstable();
        let at = |p: f64| {
            let rank = (p * samples_us.len() as f64).ceil() as usize;
            samples_us[rank.clamp(1, samples_us.len()) - 1] as f64 / 1000.0
        };
        Self {
            count: samples_us.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

/// Why the subscribe phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeEnd {
    /// Every expected retained message arrived.
    Complete,
    /// After the SUBACK, nothing arrived for `--idle-timeout`.
    Idle,
    /// `--timeout` passed.
    Timeout,
    /// The broker closed the connection.
    Closed,
}

impl SubscribeEnd {
    fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::Idle => "idle",
            Self::Timeout => "timeout",
            Self::Closed => "closed",
        }
    }
}

/// The retained-subscribe scenario's result.
#[derive(Debug, Serialize)]
pub struct RetainedReport {
    pub retained: usize,
    /// Seconds from the first retained PUBLISH until the broker confirmed all were stored.
    pub load_s: f64,
    pub filters: usize,
    pub wildcard_filters: usize,
    /// Retained messages a broker sends for these filters: one per matching (filter, topic)
    /// pair, since MQTT 3.1.1 sends retained messages per subscription.
    pub expected_retained: u64,
    /// Milliseconds from writing the SUBSCRIBE to receiving the SUBACK (`None`: no SUBACK).
    pub suback_ms: Option<f64>,
    pub granted: usize,
    pub refused: usize,
    pub retained_received: u64,
    /// Messages received without the retain flag (none are expected).
    pub other_received: u64,
    /// Milliseconds from the SUBSCRIBE to the last retained message.
    pub last_retained_ms: Option<f64>,
    pub end: SubscribeEnd,
    /// Milliseconds from the SUBSCRIBE to the end of the phase.
    pub phase_ms: f64,
    /// Bystander round trips before the SUBSCRIBE.
    pub bystander_baseline: Latency,
    /// Bystander round trips that overlap the period from the SUBSCRIBE until the last
    /// retained message or the SUBACK, whichever came later (or the end of the phase, if
    /// neither came). A round trip still unanswered at the end counts with its time so far.
    pub bystander_during: Latency,
    /// How long a round trip sent within that period was still unanswered when the phase
    /// ended, ms (it is counted in `bystander_during` with this time).
    pub bystander_unanswered_ms: Option<f64>,
    /// The broker's RSS before the retained messages were loaded.
    pub broker_rss_before_load_kib: Option<u64>,
    /// Broker CPU and RSS from the SUBSCRIBE to the end of the phase.
    pub broker: Option<BrokerUsage>,
    /// The generator's own CPU over the phase, in percent of one core.
    pub loadgen_cpu_percent: f64,
}

impl RetainedReport {
    pub fn summary(&self) -> String {
        let opt = |v: Option<f64>| v.map_or_else(|| "none".to_owned(), |v| format!("{v:.1}"));
        let mut s = format!(
            "retained-subscribe retained={} load_s={:.2} filters={} wildcard_filters={} \
             suback_ms={} granted={} refused={} expected_retained={} retained_received={} \
             other_received={} last_retained_ms={} end={} phase_ms={:.0} \
             bystander_baseline_p50_ms={:.2} bystander_baseline_p99_ms={:.2} \
             bystander_rtts={} bystander_p50_ms={:.2} bystander_p99_ms={:.2} bystander_max_ms={:.1} \
             bystander_unanswered_ms={}",
            self.retained,
            self.load_s,
            self.filters,
            self.wildcard_filters,
            opt(self.suback_ms),
            self.granted,
            self.refused,
            self.expected_retained,
            self.retained_received,
            self.other_received,
            opt(self.last_retained_ms),
            self.end.as_str(),
            self.phase_ms,
            self.bystander_baseline.p50_ms,
            self.bystander_baseline.p99_ms,
            self.bystander_during.count,
            self.bystander_during.p50_ms,
            self.bystander_during.p99_ms,
            self.bystander_during.max_ms,
            opt(self.bystander_unanswered_ms),
        );
        if let Some(b) = &self.broker {
            let _ = write!(
                s,
                " broker_cpu_s={:.2} rss_before_load_kib={} rss_start_kib={} rss_peak_kib={} \
                 rss_end_kib={}",
                b.cpu_s,
                self.broker_rss_before_load_kib.unwrap_or(0),
                b.rss_start_kib,
                b.rss_peak_kib,
                b.rss_end_kib
            );
        }
        let _ = write!(s, " loadgen_cpu_pct={:.1}", self.loadgen_cpu_percent);
        s
    }
}

/// The persistent-publish scenario's result.
#[derive(Debug, Serialize)]
pub struct PersistentPublishReport {
    pub publishers: usize,
    pub subscribers: usize,
    /// Whether the subscribers left after their SUBACK (their sessions queue).
    pub offline: bool,
    /// QoS 1 messages each publisher kept unacknowledged.
    pub window: usize,
    pub payload_size: usize,
    pub warmup_s: f64,
    pub window_s: f64,
    /// PUBACKs the publishers received during the window, per second.
    pub acked_per_s: f64,
    /// Broker CPU seconds (user + system) per 1,000 PUBACKs of the window.
    pub broker_cpu_s_per_1000: Option<f64>,
    pub broker: Option<BrokerUsage>,
    pub loadgen_cpu_percent: f64,
    /// Over the whole run (warm-up and window): PUBACKs received, and messages the online
    /// subscribers received.
    pub acked_total: u64,
    pub delivered_total: u64,
    /// Connections the broker closed before the end.
    pub closed_by_broker: u64,
}

impl PersistentPublishReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "persistent-publish publishers={} subscribers={} offline={} window={} payload={} \
             acked_per_s={:.0}",
            self.publishers,
            self.subscribers,
            self.offline,
            self.window,
            self.payload_size,
            self.acked_per_s,
        );
        if let Some(b) = &self.broker {
            let per_1000 = self
                .broker_cpu_s_per_1000
                .map_or_else(|| "none".to_owned(), |s| format!("{s:.4}"));
            let _ = write!(
                s,
                " broker_cpu_pct={:.1} broker_cpu_s_per_1000={per_1000} rss_start_kib={} \
                 rss_peak_kib={} rss_end_kib={}",
                b.cpu_percent, b.rss_start_kib, b.rss_peak_kib, b.rss_end_kib
            );
        }
        let _ = write!(
            s,
            " loadgen_cpu_pct={:.1} acked_total={} delivered_total={} closed={}",
            self.loadgen_cpu_percent, self.acked_total, self.delivered_total, self.closed_by_broker,
        );
        s
    }
}

/// The persistent-fill scenario's result.
#[derive(Debug, Serialize)]
pub struct FillReport {
    pub sessions: usize,
    pub queued_per_session: usize,
    pub payload_size: usize,
    /// Seconds to create the sessions (connect, subscribe, disconnect each).
    pub sessions_s: f64,
    /// PUBACKs received for the queued messages, and the seconds that took.
    pub messages_acked: u64,
    pub queue_s: f64,
    pub acked_per_s: f64,
    /// The broker's RSS once everything is queued (with --broker-pid).
    pub broker_rss_kib: Option<u64>,
}

impl FillReport {
    pub fn summary(&self) -> String {
        format!(
            "persistent-fill sessions={} queued_per_session={} payload={} sessions_s={:.1} \
             messages_acked={} queue_s={:.1} acked_per_s={:.0} rss_kib={}",
            self.sessions,
            self.queued_per_session,
            self.payload_size,
            self.sessions_s,
            self.messages_acked,
            self.queue_s,
            self.acked_per_s,
            self.broker_rss_kib
                .map_or_else(|| "none".to_owned(), |k| k.to_string()),
        )
    }
}

/// The persistent-resume scenario's result; times in seconds from `--since-ns`.
#[derive(Debug, Serialize)]
pub struct ResumeReport {
    /// The client id of the resumed session.
    pub session: String,
    /// The first TCP connect the broker accepted.
    pub accepted_s: f64,
    /// The resumed session's CONNACK, and its session present flag.
    pub connack_s: f64,
    pub session_present: bool,
    /// The first queued message (`None`: none arrived).
    pub first_message_s: Option<f64>,
    pub received: u64,
    /// The last expected message, if all arrived.
    pub all_received_s: Option<f64>,
    /// The broker's RSS after the messages (with --broker-pid).
    pub broker_rss_kib: Option<u64>,
}

impl ResumeReport {
    pub fn summary(&self) -> String {
        let opt = |v: Option<f64>| v.map_or_else(|| "none".to_owned(), |v| format!("{v:.3}"));
        format!(
            "persistent-resume session={} accepted_s={:.3} connack_s={:.3} session_present={} \
             first_message_s={} received={} all_received_s={} rss_kib={}",
            self.session,
            self.accepted_s,
            self.connack_s,
            self.session_present,
            opt(self.first_message_s),
            self.received,
            opt(self.all_received_s),
            self.broker_rss_kib
                .map_or_else(|| "none".to_owned(), |k| k.to_string()),
        )
    }
}

/// The idle scenario's result.
#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub connections: usize,
    pub tls: bool,
    /// MQTT protocol level of the connections (4 or 5).
    pub protocol: u8,
    pub connected: usize,
    pub failed: usize,
    /// The first failure's message, if any failed.
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last CONNACK (or failure).
    pub connect_s: f64,
    pub settle_s: f64,
    /// The broker's RSS before the first connection and after --settle (with --broker-pid).
    pub broker_rss_before_kib: Option<u64>,
    pub broker_rss_after_kib: Option<u64>,
    /// (after - before) / connected, KiB.
    pub broker_kib_per_connection: Option<f64>,
    /// The generator's own RSS with every connection open.
    pub loadgen_rss_kib: Option<u64>,
    /// Connections the broker closed before the generator let them go.
    pub closed_by_broker: usize,
}

impl IdleReport {
    pub fn summary(&self) -> String {
        let opt = |v: Option<u64>| v.map_or_else(|| "none".to_owned(), |v| v.to_string());
        format!(
            "idle connections={} tls={} protocol={} connected={} failed={} connect_s={:.2} \
             settle_s={:.1} rss_before_kib={} rss_after_kib={} kib_per_connection={} \
             loadgen_rss_kib={} closed_by_broker={}",
            self.connections,
            self.tls,
            self.protocol,
            self.connected,
            self.failed,
            self.connect_s,
            self.settle_s,
            opt(self.broker_rss_before_kib),
            opt(self.broker_rss_after_kib),
            self.broker_kib_per_connection
                .map_or_else(|| "none".to_owned(), |k| format!("{k:.2}")),
            opt(self.loadgen_rss_kib),
            self.closed_by_broker,
        )
    }
}

/// The connect-rate scenario's result.
#[derive(Debug, Serialize)]
pub struct ConnectRateReport {
    pub connections: usize,
    /// Requested connects per second.
    pub rate: f64,
    pub tls: bool,
    /// Credentials sent: `none`, `password` (each its own) or `wrong_password`.
    pub login: &'static str,
    /// Answered with CONNACK 0.
    pub connected: usize,
    /// Answered with a non-zero CONNACK.
    pub refused: usize,
    /// Of those, return code 4 (bad user name or password).
    pub refused_bad_credentials: usize,
    /// Not answered: timeouts, connections reset or closed before a CONNACK.
    pub failed: usize,
    /// The first refusal's or failure's message, if any.
    pub first_error: Option<String>,
    /// Seconds from the first connect to the last answer (CONNACK or failure).
    pub elapsed_s: f64,
    /// Answered (connected or refused) per second over `elapsed_s`.
    pub achieved_per_s: f64,
    /// How late the generator started a connect after its scheduled time, at worst, ms (a
    /// busy generator shows here).
    pub start_lag_max_ms: f64,
    /// Connections the kernel dropped from a full listen queue during the run (system-wide
    /// TcpExt ListenOverflows; `None` if unreadable): each costs its client a retransmission.
    pub listen_overflows: Option<u64>,
    /// From the start of the TCP connect to the CONNACK, successful connects only.
    pub connack: Latency,
    /// From the start of the TCP connect to a refusing CONNACK.
    pub refusal: Latency,
    /// Broker CPU and RSS from the first connect until every one (flood included) was
    /// answered (with --broker-pid).
    pub broker: Option<BrokerUsage>,
    /// Broker CPU milliseconds per answered connect (accepted or refused, flood included).
    pub broker_cpu_ms_per_connect: Option<f64>,
    /// The generator's own CPU over the run, in percent of one core.
    pub loadgen_cpu_percent: f64,
    /// The wrong-password connects of `--flood`, if any.
    pub flood: Option<FloodReport>,
}

/// The `--flood` wave of connect-rate: CONNECTs with wrong passwords.
#[derive(Debug, Serialize)]
pub struct FloodReport {
    pub connections: usize,
    /// Requested connects per second.
    pub rate: f64,
    /// Answered with CONNACK 0 (a broker that lets a wrong password in).
    pub accepted: usize,
    /// Answered with a non-zero CONNACK.
    pub refused: usize,
    /// Of those, return code 4.
    pub refused_bad_credentials: usize,
    /// Not answered (timeouts, resets, closed).
    pub failed: usize,
    pub first_error: Option<String>,
    /// From the start of the TCP connect to the refusal.
    pub refusal: Latency,
}

impl ConnectRateReport {
    pub fn summary(&self) -> String {
        let mut s = format!(
            "connect-rate connections={} rate={} tls={} login={} connected={} refused={} \
             refused_bad_credentials={} failed={} elapsed_s={:.2} achieved_per_s={:.0} \
             start_lag_max_ms={:.1} listen_overflows={} connack_p50_ms={:.2} \
             connack_p99_ms={:.2} connack_max_ms={:.1}",
            self.connections,
            self.rate,
            self.tls,
            self.login,
            self.connected,
            self.refused,
            self.refused_bad_credentials,
            self.failed,
            self.elapsed_s,
            self.achieved_per_s,
            self.start_lag_max_ms,
            self.listen_overflows
                .map_or_else(|| "none".to_owned(), |n| n.to_string()),
            self.connack.p50_ms,
            self.connack.p99_ms,
            self.connack.max_ms,
        );
        if self.refusal.count > 0 {
            let _ = write!(
                s,
                " refusal_p50_ms={:.2} refusal_p99_ms={:.2} refusal_max_ms={:.1}",
                self.refusal.p50_ms, self.refusal.p99_ms, self.refusal.max_ms
            );
        }
        if let Some(f) = &self.flood {
            let _ = write!(
                s,
                " flood={} flood_rate={} flood_accepted={} flood_refused={} \
                 flood_refused_bad_credentials={} flood_failed={} flood_refusal_p50_ms={:.2} \
                 flood_refusal_p99_ms={:.2} flood_refusal_max_ms={:.1}",
                f.connections,
                f.rate,
                f.accepted,
                f.refused,
                f.refused_bad_credentials,
                f.failed,
                f.refusal.p50_ms,
                f.refusal.p99_ms,
                f.refusal.max_ms
            );
        }
        if let Some(b) = &self.broker {
            let _ = write!(
                s,
                " broker_cpu_pct={:.1} broker_cpu_ms_per_connect={} rss_start_kib={} rss_end_kib={}",
                b.cpu_percent,
                self.broker_cpu_ms_per_connect
                    .map_or_else(|| "none".to_owned(), |ms| format!("{ms:.3}")),
                b.rss_start_kib,
                b.rss_end_kib
            );
        }
        let _ = write!(s, " loadgen_cpu_pct={:.1}", self.loadgen_cpu_percent);
        s
    }
}

/// Writes `report` as pretty JSON to `path`.
pub fn write_json(path: &Path, report: &impl Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(report)?;
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let l = Latency::from_micros((1..=100).rev().map(|ms| ms * 1000).collect());
        assert_eq!(
            (l.count, l.p50_ms, l.p99_ms, l.max_ms),
            (100, 50.0, 99.0, 100.0)
        );
        let one = Latency::from_micros(vec![2500]);
        assert_eq!((one.p50_ms, one.p99_ms, one.max_ms), (2.5, 2.5, 2.5));
        assert_eq!(Latency::from_micros(Vec::new()).count, 0);
    }
}
