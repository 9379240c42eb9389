//! Every metric the broker exports, defined in one place.
//!
//! Names follow Prometheus conventions: prefix `heartwire_`, base units, counters end in `_total`.
//! Label values come from closed sets (packet types, disconnect reasons, drop reasons); there is
//! never a per-device label. The process is the unit of metrics, so they live in one global
//! registry ([`metrics()`]); each test binary is its own process under nextest.

use std::sync::LazyLock;

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All broker metrics.
pub struct Metrics {
    /// Where every metric below is registered.
    pub registry: Registry,
    /// MQTT connections that completed CONNECT/CONNACK and are open now.
    pub connections_current: IntGauge,
    /// TCP connections accepted by the listener (before CONNECT).
    pub tcp_accepted: IntCounter,
    /// Connections refused or closed before a session started, by reason.
    pub connections_refused: IntCounterVec,
    /// MQTT connections that completed CONNECT/CONNACK.
    pub connections_accepted: IntCounter,
    /// Ended MQTT connections, by disconnect reason.
    pub disconnects: IntCounterVec,
    /// Connections closed because nothing was received within keep-alive x multiplier.
    pub keepalive_timeouts: IntCounter,
    /// Connections replaced by a newer connection with the same client id.
    pub takeovers: IntCounter,
    /// Packets received, by packet type.
    pub packets_received: IntCounterVec,
    /// Packets sent, by packet type.
    pub packets_sent: IntCounterVec,
    /// Bytes read from client sockets.
    pub bytes_received: IntCounter,
    /// Bytes written to client sockets.
    pub bytes_sent: IntCounter,
    /// Retained messages held.
    pub retained_messages: IntGauge,
    /// Sessions with clean_session = false (connected or not).
    pub persistent_sessions: IntGauge,
    /// Topic-filter subscriptions held, over all sessions.
    pub subscriptions: IntGauge,
    /// Messages waiting in session queues (not yet written, beyond the in-flight window).
    pub messages_queued: IntGauge,
    /// Messages accepted from publishers.
    pub messages_published: IntCounter,
    /// Messages not delivered to one subscriber, by reason.
    pub messages_dropped: IntCounterVec,
    /// Last-will messages published.
    pub wills_published: IntCounter,
    /// Accept attempts that failed because the process ran out of file descriptors.
    pub accept_fd_exhausted: IntCounter,
    /// Connection events handed to the presence pipeline, by kind.
    pub connection_events: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let build = IntGaugeVec::new(
            Opts::new("heartwire_build_info", "Build information; always 1."),
            &["version"],
        )
        .expect("valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build)).expect("unique metric");
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("unique metric");

        Self {
            connections_current: gauge(
                &r,
                "heartwire_connections",
                "MQTT connections open now (after CONNACK).",
            ),
            tcp_accepted: counter(
                &r,
                "heartwire_tcp_connections_accepted_total",
                "TCP connections accepted by the listener.",
            ),
            connections_refused: counter_vec(
                &r,
                "heartwire_connections_refused_total",
                "Connections refused or closed before a session started, by reason.",
                &["reason"],
            ),
            connections_accepted: counter(
                &r,
                "heartwire_connections_accepted_total",
                "MQTT connections accepted (CONNACK 0 sent).",
            ),
            disconnects: counter_vec(
                &r,
                "heartwire_disconnects_total",
                "Ended MQTT connections, by reason.",
                &["reason"],
            ),
            keepalive_timeouts: counter(
                &r,
                "heartwire_keepalive_timeouts_total",
                "Connections closed because nothing was received within keep-alive x multiplier.",
            ),
            takeovers: counter(
                &r,
                "heartwire_takeovers_total",
                "Connections closed by a newer connection with the same client id.",
            ),
            packets_received: counter_vec(
                &r,
                "heartwire_packets_received_total",
                "MQTT packets received, by type.",
                &["type"],
            ),
            packets_sent: counter_vec(
                &r,
                "heartwire_packets_sent_total",
                "MQTT packets sent, by type.",
                &["type"],
            ),
            bytes_received: counter(
                &r,
                "heartwire_received_bytes_total",
                "Bytes read from client connections.",
            ),
            bytes_sent: counter(
                &r,
                "heartwire_sent_bytes_total",
                "Bytes written to client connections.",
            ),
            retained_messages: gauge(&r, "heartwire_retained_messages", "Retained messages held."),
            persistent_sessions: gauge(
                &r,
                "heartwire_persistent_sessions",
                "Sessions with clean_session = false, connected or not.",
            ),
            subscriptions: gauge(
                &r,
                "heartwire_subscriptions",
                "Topic-filter subscriptions held over all sessions.",
            ),
            messages_queued: gauge(
                &r,
                "heartwire_messages_queued",
                "Messages waiting in session queues beyond the in-flight window.",
            ),
            messages_published: counter(
                &r,
                "heartwire_messages_published_total",
                "PUBLISH packets accepted from clients (and wills).",
            ),
            messages_dropped: counter_vec(
                &r,
                "heartwire_messages_dropped_total",
                "Messages not delivered to a subscriber, by reason.",
                &["reason"],
            ),
            wills_published: counter(
                &r,
                "heartwire_wills_published_total",
                "Last-will messages published after an abnormal close.",
            ),
            accept_fd_exhausted: counter(
                &r,
                "heartwire_accept_fd_exhausted_total",
                "Accept attempts that failed because the process had no file descriptor left.",
            ),
            connection_events: counter_vec(
                &r,
                "heartwire_connection_events_total",
                "Connection events emitted to the presence pipeline, by kind.",
                &["kind"],
            ),
            registry: r,
        }
    }

    /// The registry in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "Cannot encode metrics.");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}
