//! Every metric the broker exports, defined in one place.
//!
//! Names follow Prometheus conventions: prefix `heartwire_`, base units, counters end in `_total`.
//! Label values come from the closed sets of [`crate::labels`], and a labelled counter is
//! indexed by its enum ([`Counters`], [`CounterGrid`]): every child is resolved once at start,
//! exported at 0 from the start, and counting does no label hashing. There is never a
//! per-device label. The process is the unit of metrics, so they live in one global registry
//! ([`metrics()`]); each test binary is its own process under nextest.

use std::marker::PhantomData;
use std::sync::LazyLock;

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::labels::{
    AclDenial, ApiRefusal, BackupOutcome, DisconnectReason, DropReason, HandshakeFailure,
    HttpRoute, HttpTimeout, Label, Listener, PacketType, PublishLimit, RefusalReason,
    ReloadOutcome, RetainRefusal, RetentionPolicy, StatusClass, StoreOperation,
    SubscriptionRefusal, TransitionKind, VerifyOutcome,
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
    pub connections_refused: Counters<RefusalReason>,
    /// Sockets accepted, by listener.
    pub listener_accepted: Counters<Listener>,
    /// MQTT connections that completed CONNECT/CONNACK and are open now, by listener.
    pub listener_connections: Gauges<Listener>,
    /// Transport handshakes (PROXY header, TLS, WebSocket upgrade) that failed, by listener
    /// and reason.
    pub handshake_failures: CounterGrid<Listener, HandshakeFailure>,
    /// Reloads of the TLS certificate files, by outcome.
    pub tls_reloads: Counters<ReloadOutcome>,
    /// Passwords checked, by outcome.
    pub auth_verifications: Counters<VerifyOutcome>,
    /// Reloads of the password file, by outcome.
    pub password_file_reloads: Counters<ReloadOutcome>,
    /// Reloads of the JWT key file, by outcome.
    pub jwt_key_reloads: Counters<ReloadOutcome>,
    /// Refusals answered after a delay (they followed others from the same address or for the
    /// same client id).
    pub auth_refusals_delayed: IntCounter,
    /// Times an accept loop waited for `mqtt.max_connection_rate` before accepting, by
    /// listener.
    pub accept_rate_waits: Counters<Listener>,
    /// PUBLISH packets after which a client's reads paused for its publish rate, by the limit
    /// that held it back longest.
    pub publish_throttled: Counters<PublishLimit>,
    /// Seconds clients' reads were paused for their publish rates.
    pub publish_throttled_seconds: Counter,
    /// Client ids banned by flapping detection.
    pub flapping_bans: IntCounter,
    /// MQTT connections that completed CONNECT/CONNACK.
    pub connections_accepted: IntCounter,
    /// Ended MQTT connections, by disconnect reason.
    pub disconnects: Counters<DisconnectReason>,
    /// Connections closed because nothing was received within keep-alive x multiplier.
    pub keepalive_timeouts: IntCounter,
    /// Connections replaced by a newer connection with the same client id.
    pub takeovers: IntCounter,
    /// Packets and bytes received, by packet type.
    pub received: PacketCounters,
    /// Packets and bytes sent (queued for the socket), by packet type.
    pub sent: PacketCounters,
    /// Retained messages held.
    pub retained_messages: IntGauge,
    /// Sessions with clean_session = false (connected or not).
    pub persistent_sessions: IntGauge,
    /// Persistent sessions discarded after `mqtt.persistent_session_expiry` without their client.
    pub sessions_expired: IntCounter,
    /// Topic-filter subscriptions held, over all sessions.
    pub subscriptions: IntGauge,
    /// Messages waiting in session queues (not yet written, beyond the in-flight window).
    pub messages_queued: IntGauge,
    /// Messages accepted from publishers.
    pub messages_published: IntCounter,
    /// Messages not delivered to one subscriber, by reason.
    pub messages_dropped: Counters<DropReason>,
    /// Bytes of messages waiting for clients (queued and in flight), over all sessions.
    pub queued_bytes: IntGauge,
    /// Times a publisher stopped reading because a subscriber it feeds was congested while the
    /// broker, not the subscriber, was behind.
    pub publish_backpressure: IntCounter,
    /// Bytes held by connections for packets larger than 4 KiB still arriving.
    pub buffered_read_bytes: IntGauge,
    /// Times a connection stopped reading because `mqtt.max_buffered_read_bytes` was reached.
    pub read_budget_waits: IntCounter,
    /// Connections closed because a packet was not completed within `mqtt.packet_read_timeout`.
    pub packet_read_timeouts: IntCounter,
    /// Bytes (topics and payloads) of retained messages held.
    pub retained_bytes: IntGauge,
    /// Retained messages not stored, by reason (count, bytes).
    pub retained_refused: Counters<RetainRefusal>,
    /// Topic filters refused in SUBSCRIBE (SUBACK 0x80), by reason.
    pub subscriptions_refused: Counters<SubscriptionRefusal>,
    /// `heartwire_acl_denied_total{action}`.
    pub acl_denied: Counters<AclDenial>,
    /// `heartwire_acl_file_reloads_total{outcome}`.
    pub acl_file_reloads: Counters<ReloadOutcome>,
    /// Last-will messages published.
    /// Messages of a shared subscription given to another member of its group.
    pub shared_redeliveries: IntCounter,
    /// MQTT 5 wills waiting for their will delay.
    pub wills_delayed: IntGauge,
    pub wills_published: IntCounter,
    /// Bytes of broker state on disk (snapshot and logs).
    pub state_disk_bytes: IntGauge,
    /// fsyncs of the broker state's log.
    pub state_fsyncs: IntCounter,
    /// Duration of one fsync of the broker state's log.
    pub state_fsync_seconds: Histogram,
    /// Records per commit of the broker state's log (group commit).
    pub state_commit_records: Histogram,
    /// Failed writes, fsyncs and compactions of the broker state (each retried).
    pub state_write_errors: IntCounter,
    /// Compactions of the broker state (snapshots written).
    pub state_compactions: IntCounter,
    /// Duration of one compaction.
    pub state_compaction_seconds: Histogram,
    /// Seconds the last start took to read the broker state and rebuild sessions.
    pub state_load_seconds: Gauge,
    /// Persistent sessions restored at the last start.
    pub state_sessions_loaded: IntGauge,
    /// Queued messages restored at the last start.
    pub state_messages_loaded: IntGauge,
    /// QoS 1/2 PUBLISHes held back (3.1.1) or refused (MQTT 5: 0x97) because the broker state
    /// is over `persistence.max_disk`.
    pub state_disk_full: IntCounter,
    /// Backups of the broker state (on request or scheduled), by outcome.
    pub state_backups: Counters<BackupOutcome>,
    /// Unix time of the last backup written.
    pub state_last_backup: Gauge,
    /// Accept attempts that failed because the process ran out of file descriptors.
    pub accept_fd_exhausted: IntCounter,
    /// Presence transitions received by the bridge, by kind (connected, disconnected).
    pub presence_transitions: Counters<TransitionKind>,
    /// Events written to the store.
    pub bridge_persisted: IntCounter,
    /// Events waiting for the store (memory and journal).
    pub bridge_queue_depth: IntGauge,
    /// Age of the oldest event not yet in the store, seconds (0 when none waits).
    pub bridge_oldest_age: Gauge,
    /// Size of the journal file, bytes.
    pub bridge_journal_bytes: IntGauge,
    /// Events appended to the journal because memory was full or at shutdown.
    pub bridge_journaled: IntCounter,
    /// Events lost because the journal could not be written (disk full) or read back.
    pub bridge_lost_events: IntCounter,
    /// Batches retried after a store failure.
    pub bridge_retries: IntCounter,
    /// Events per committed batch.
    pub bridge_batch_size: Histogram,
    /// Duration of one store call (batch, migration, recovery), seconds.
    pub bridge_flush_duration: Histogram,
    /// From an event's time to its commit in the store, seconds.
    pub bridge_commit_latency: Histogram,
    /// Store failures by operation.
    pub store_errors: Counters<StoreOperation>,
    /// Sessions folded into a kept history row instead of getting their own.
    pub presence_coalesced: IntCounter,
    /// History rows deleted by retention, by policy.
    pub history_pruned: Counters<RetentionPolicy>,
    /// HTTP API requests by route and status class.
    pub http_requests: CounterGrid<HttpRoute, StatusClass>,
    /// API requests refused for their bearer token, by reason.
    pub http_refused: Counters<ApiRefusal>,
    /// Reloads of the API tokens file, by outcome.
    pub api_tokens_file_reloads: Counters<ReloadOutcome>,
    /// HTTP connections open now.
    pub http_connections: IntGauge,
    /// HTTP connections accepted.
    pub http_connections_accepted: IntCounter,
    /// Times the HTTP listener paused at `http.max_connections`.
    pub http_connection_limit_waits: IntCounter,
    /// HTTP connections closed by a timeout, by kind.
    pub http_connection_timeouts: Counters<HttpTimeout>,
    /// HTTP accept attempts that failed for lack of file descriptors.
    pub http_accept_fd_exhausted: IntCounter,
    /// API requests answered 503 because every store query slot stayed taken.
    pub http_store_busy: IntCounter,
    /// Queries made to refresh the /api/v1/stats cache.
    pub http_stats_refreshes: IntCounter,
}

/// A counter per value of the closed label set `L`.
pub struct Counters<L: Label> {
    children: Vec<IntCounter>,
    label: PhantomData<L>,
}

impl<L: Label> Counters<L> {
    fn new(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        Self {
            children: per_label::<L, _>(&counter_vec(registry, name, help, &[label])),
            label: PhantomData,
        }
    }

    /// Counts one.
    pub fn inc(&self, value: L) {
        self.children[value.index()].inc();
    }

    /// Counts `n`.
    pub fn inc_by(&self, value: L, n: u64) {
        self.children[value.index()].inc_by(n);
    }

    /// The count so far.
    pub fn get(&self, value: L) -> u64 {
        self.children[value.index()].get()
    }
}

/// The child of `vec` for every value of `L`, in [`Label::ALL`] order.
fn per_label<L: Label, P: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<P>,
) -> Vec<P::M> {
    L::ALL
        .iter()
        .map(|value| vec.with_label_values(&[value.as_str()]))
        .collect()
}

/// A gauge per value of the closed label set `L`.
pub struct Gauges<L: Label> {
    children: Vec<IntGauge>,
    label: PhantomData<L>,
}

impl<L: Label> Gauges<L> {
    fn new(registry: &Registry, name: &str, help: &str, label: &str) -> Self {
        let vec = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
        registry
            .register(Box::new(vec.clone()))
            .expect("unique metric");
        Self {
            children: per_label::<L, _>(&vec),
            label: PhantomData,
        }
    }

    /// Adds one.
    pub fn inc(&self, value: L) {
        self.children[value.index()].inc();
    }

    /// Takes one away.
    pub fn dec(&self, value: L) {
        self.children[value.index()].dec();
    }

    /// The value now.
    pub fn get(&self, value: L) -> i64 {
        self.children[value.index()].get()
    }
}

/// A counter per pair of values of the closed label sets `A` and `B`.
pub struct CounterGrid<A: Label, B: Label> {
    children: Vec<IntCounter>,
    labels: PhantomData<(A, B)>,
}

impl<A: Label, B: Label> CounterGrid<A, B> {
    fn new(registry: &Registry, name: &str, help: &str, labels: [&str; 2]) -> Self {
        let vec = counter_vec(registry, name, help, &labels);
        let mut children = Vec::with_capacity(A::ALL.len() * B::ALL.len());
        for a in A::ALL {
            for b in B::ALL {
                children.push(vec.with_label_values(&[a.as_str(), b.as_str()]));
            }
        }
        Self {
            children,
            labels: PhantomData,
        }
    }

    /// Counts one.
    pub fn inc(&self, a: A, b: B) {
        self.children[a.index() * B::ALL.len() + b.index()].inc();
    }

    /// The count so far.
    pub fn get(&self, a: A, b: B) -> u64 {
        self.children[a.index() * B::ALL.len() + b.index()].get()
    }
}

/// Packet and byte counters of one direction, by packet type.
pub struct PacketCounters {
    packets: Counters<PacketType>,
    bytes: Counters<PacketType>,
}

impl PacketCounters {
    fn new(registry: &Registry, direction: &str) -> Self {
        Self {
            packets: Counters::new(
                registry,
                &format!("heartwire_packets_{direction}_total"),
                &format!("MQTT packets {direction}, by type."),
                "type",
            ),
            bytes: Counters::new(
                registry,
                &format!("heartwire_{direction}_bytes_total"),
                &format!("Bytes of MQTT packets {direction}, by packet type."),
                "type",
            ),
        }
    }

    /// Counts `n` packets of type `kind` totalling `bytes` bytes.
    pub fn count(&self, kind: PacketType, n: u64, bytes: usize) {
        self.packets.inc_by(kind, n);
        self.bytes.inc_by(kind, bytes as u64);
    }
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn float_gauge(registry: &Registry, name: &str, help: &str) -> Gauge {
    let g = Gauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn float_counter(registry: &Registry, name: &str, help: &str) -> Counter {
    let c = Counter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
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
            connections_refused: Counters::new(
                &r,
                "heartwire_connections_refused_total",
                "Connections refused or closed before a session started, by reason.",
                "reason",
            ),
            listener_accepted: Counters::new(
                &r,
                "heartwire_listener_accepted_total",
                "Sockets accepted, by listener (tcp, tls, ws, wss).",
                "listener",
            ),
            listener_connections: Gauges::new(
                &r,
                "heartwire_listener_connections",
                "MQTT connections open now (CONNACK sent), by listener (tcp, tls, ws, wss).",
                "listener",
            ),
            handshake_failures: CounterGrid::new(
                &r,
                "heartwire_transport_handshake_failures_total",
                "Transport handshakes (PROXY header, TLS, WebSocket upgrade) that failed before \
                 MQTT began, by listener and reason.",
                ["listener", "reason"],
            ),
            tls_reloads: Counters::new(
                &r,
                "heartwire_tls_reloads_total",
                "Reloads of the TLS certificate files (SIGHUP or the reload endpoint), by outcome; after a failed one \
                 the previous certificate stays in use.",
                "outcome",
            ),
            auth_verifications: Counters::new(
                &r,
                "heartwire_auth_verifications_total",
                "Passwords and JWTs checked at CONNECT, by outcome (cache_hit: verified \
                 recently, no hashing; verified; rejected: wrong password, unknown user, or a \
                 token refused).",
                "outcome",
            ),
            password_file_reloads: Counters::new(
                &r,
                "heartwire_password_file_reloads_total",
                "Reloads of auth.password_file (SIGHUP or the reload endpoint), by outcome; after a failed one the \
                 previous file stays in use.",
                "outcome",
            ),
            jwt_key_reloads: Counters::new(
                &r,
                "heartwire_jwt_key_reloads_total",
                "Reloads of the JWT key file (auth.jwt.secret_file or auth.jwt.public_key_file; \
                 SIGHUP), by outcome; after a failed one the previous key stays in use.",
                "outcome",
            ),
            auth_refusals_delayed: counter(
                &r,
                "heartwire_auth_refusals_delayed_total",
                "Authentication refusals answered after a delay (auth.failure_delay_max): they \
                 followed others from the same address or for the same client id.",
            ),
            accept_rate_waits: Counters::new(
                &r,
                "heartwire_listener_accept_rate_waits_total",
                "Times an accept loop waited for mqtt.max_connection_rate before accepting the \
                 next socket (the kernel's listen backlog holds the others), by listener.",
                "listener",
            ),
            publish_throttled: Counters::new(
                &r,
                "heartwire_publish_throttled_total",
                "PUBLISH packets after which the broker paused reading the client for its \
                 publish rate (mqtt.max_publish_rate: messages, mqtt.max_publish_bytes_rate: \
                 bytes), by the limit that held it back; nothing is dropped.",
                "limit",
            ),
            publish_throttled_seconds: float_counter(
                &r,
                "heartwire_publish_throttled_seconds_total",
                "Time clients' reads were paused for their publish rates (keep-alive does not \
                 count it).",
            ),
            flapping_bans: counter(
                &r,
                "heartwire_flapping_bans_total",
                "Client ids banned for connecting more than mqtt.flapping.max_connects times \
                 within mqtt.flapping.window.",
            ),
            connections_accepted: counter(
                &r,
                "heartwire_connections_accepted_total",
                "MQTT connections accepted (CONNACK 0 sent).",
            ),
            disconnects: Counters::new(
                &r,
                "heartwire_disconnects_total",
                "Ended MQTT connections, by reason.",
                "reason",
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
            received: PacketCounters::new(&r, "received"),
            sent: PacketCounters::new(&r, "sent"),
            retained_messages: gauge(&r, "heartwire_retained_messages", "Retained messages held."),
            persistent_sessions: gauge(
                &r,
                "heartwire_persistent_sessions",
                "Sessions with clean_session = false, connected or not.",
            ),
            sessions_expired: counter(
                &r,
                "heartwire_sessions_expired_total",
                "Persistent sessions discarded after mqtt.persistent_session_expiry without a connection.",
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
            messages_dropped: Counters::new(
                &r,
                "heartwire_messages_dropped_total",
                "Messages not delivered to a subscriber, by reason.",
                "reason",
            ),
            queued_bytes: gauge(
                &r,
                "heartwire_queued_bytes",
                "Bytes of messages waiting for clients (queued and in flight), all sessions.",
            ),
            publish_backpressure: counter(
                &r,
                "heartwire_publish_backpressure_total",
                "Times a publisher paused reading until a congested subscriber queue drained.",
            ),
            buffered_read_bytes: gauge(
                &r,
                "heartwire_buffered_read_bytes",
                "Bytes reserved for packets over 4 KiB still arriving, all connections.",
            ),
            read_budget_waits: counter(
                &r,
                "heartwire_read_budget_waits_total",
                "Times a connection paused reading because mqtt.max_buffered_read_bytes was reached.",
            ),
            packet_read_timeouts: counter(
                &r,
                "heartwire_packet_read_timeouts_total",
                "Connections closed because a packet was not completed within mqtt.packet_read_timeout.",
            ),
            retained_bytes: gauge(
                &r,
                "heartwire_retained_bytes",
                "Bytes (topics and payloads) of retained messages held.",
            ),
            retained_refused: Counters::new(
                &r,
                "heartwire_retained_refused_total",
                "Retained messages not stored because of mqtt.max_retained_*, by limit.",
                "reason",
            ),
            subscriptions_refused: Counters::new(
                &r,
                "heartwire_subscriptions_refused_total",
                "Topic filters refused with SUBACK 0x80, by reason.",
                "reason",
            ),
            acl_denied: Counters::new(
                &r,
                "heartwire_acl_denied_total",
                "What the ACL refused, by action: publishes dropped (acknowledged), deliveries \
                 and retained messages withheld, subscriptions revoked on reload.",
                "action",
            ),
            acl_file_reloads: Counters::new(
                &r,
                "heartwire_acl_file_reloads_total",
                "Reloads of auth.acl_file (SIGHUP), by outcome; after a failed one the previous \
                 file stays in use.",
                "outcome",
            ),
            shared_redeliveries: counter(
                &r,
                "heartwire_shared_redeliveries_total",
                "Messages of a shared subscription given to another member of its group because \
                 the session they were queued or in flight for ended.",
            ),
            wills_delayed: gauge(
                &r,
                "heartwire_wills_delayed",
                "MQTT 5 wills held back by their will delay (published when it passes, unless \
                 the client connects again first).",
            ),
            wills_published: counter(
                &r,
                "heartwire_wills_published_total",
                "Last-will messages published after an abnormal close (or an MQTT 5 DISCONNECT \
                 0x04).",
            ),
            state_disk_bytes: gauge(
                &r,
                "heartwire_state_disk_bytes",
                "Bytes of broker state on disk: snapshot and logs (persistence.dir).",
            ),
            state_fsyncs: counter(
                &r,
                "heartwire_state_fsyncs_total",
                "fsyncs of the broker state's log; each commits the records of many connections.",
            ),
            state_fsync_seconds: histogram(
                &r,
                "heartwire_state_fsync_seconds",
                "Duration of one fsync of the broker state's log.",
                prometheus::exponential_buckets(0.000_05, 2.0, 16).expect("buckets"),
            ),
            state_commit_records: histogram(
                &r,
                "heartwire_state_commit_records",
                "Records per commit (one write and one fsync) of the broker state's log.",
                vec![
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 20000.0,
                ],
            ),
            state_write_errors: counter(
                &r,
                "heartwire_state_write_errors_total",
                "Failed writes, fsyncs and compactions of the broker state; writes are retried \
                 and the acknowledgements waiting for them wait.",
            ),
            state_compactions: counter(
                &r,
                "heartwire_state_compactions_total",
                "Compactions of the broker state (closed logs folded into a new snapshot).",
            ),
            state_compaction_seconds: histogram(
                &r,
                "heartwire_state_compaction_seconds",
                "Duration of one compaction of the broker state (in the background).",
                prometheus::exponential_buckets(0.001, 2.0, 16).expect("buckets"),
            ),
            state_load_seconds: float_gauge(
                &r,
                "heartwire_state_load_seconds",
                "Seconds the last start took to read the broker state and rebuild its sessions, \
                 subscriptions and retained messages.",
            ),
            state_sessions_loaded: gauge(
                &r,
                "heartwire_state_sessions_loaded",
                "Persistent sessions restored from the broker state at the last start.",
            ),
            state_messages_loaded: gauge(
                &r,
                "heartwire_state_messages_loaded",
                "Queued messages restored from the broker state at the last start.",
            ),
            state_disk_full: counter(
                &r,
                "heartwire_state_disk_full_total",
                "QoS 1/2 PUBLISHes held back (MQTT 3.1.1: no PUBACK until space is freed) or \
                 refused (MQTT 5: PUBACK 0x97) because the broker state is over \
                 persistence.max_disk.",
            ),
            state_backups: Counters::new(
                &r,
                "heartwire_state_backups_total",
                "Backups of the broker state (the admin API's and persistence.backup_interval's), \
                 by outcome.",
                "outcome",
            ),
            state_last_backup: float_gauge(
                &r,
                "heartwire_state_last_backup_timestamp_seconds",
                "Unix time of the last backup of the broker state written (0: none since start).",
            ),
            accept_fd_exhausted: counter(
                &r,
                "heartwire_accept_fd_exhausted_total",
                "Accept attempts that failed because the process had no file descriptor left.",
            ),
            presence_transitions: Counters::new(
                &r,
                "heartwire_presence_transitions_total",
                "Presence transitions received by the bridge, by kind.",
                "kind",
            ),
            bridge_persisted: counter(
                &r,
                "heartwire_bridge_persisted_events_total",
                "Presence events committed to the store.",
            ),
            bridge_queue_depth: gauge(
                &r,
                "heartwire_bridge_queue_depth",
                "Presence events waiting for the store (memory and journal).",
            ),
            bridge_oldest_age: float_gauge(
                &r,
                "heartwire_bridge_oldest_unpersisted_age_seconds",
                "Age of the oldest presence event not yet in the store (0 when none waits).",
            ),
            bridge_journal_bytes: gauge(
                &r,
                "heartwire_bridge_journal_bytes",
                "Size of the presence journal file.",
            ),
            bridge_journaled: counter(
                &r,
                "heartwire_bridge_journaled_events_total",
                "Presence events appended to the journal (memory full, or shutdown).",
            ),
            bridge_lost_events: counter(
                &r,
                "heartwire_bridge_lost_events_total",
                "Presence events lost because the journal could not be written or read.",
            ),
            bridge_retries: counter(
                &r,
                "heartwire_bridge_retries_total",
                "Presence batches retried after a store failure.",
            ),
            bridge_batch_size: histogram(
                &r,
                "heartwire_bridge_batch_size",
                "Presence events per committed batch.",
                vec![
                    1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                ],
            ),
            bridge_flush_duration: histogram(
                &r,
                "heartwire_bridge_flush_duration_seconds",
                "Duration of one presence store call.",
                prometheus::exponential_buckets(0.0005, 2.0, 16).expect("buckets"),
            ),
            bridge_commit_latency: histogram(
                &r,
                "heartwire_bridge_commit_latency_seconds",
                "From a connection event to its commit in the store.",
                vec![
                    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ],
            ),
            store_errors: Counters::new(
                &r,
                "heartwire_store_errors_total",
                "Presence store failures, by operation.",
                "operation",
            ),
            presence_coalesced: counter(
                &r,
                "heartwire_presence_sessions_coalesced_total",
                "Sessions that began and ended within one batch folded into a kept history row \
                 (bridge.coalesce_after) instead of getting their own.",
            ),
            history_pruned: Counters::new(
                &r,
                "heartwire_history_pruned_sessions_total",
                "Session history rows deleted by retention, by policy \
                 (database.history_max_age, database.history_max_sessions_per_device).",
                "policy",
            ),
            http_requests: CounterGrid::new(
                &r,
                "heartwire_http_requests_total",
                "HTTP API requests, by route and status class.",
                ["route", "status"],
            ),
            http_refused: Counters::new(
                &r,
                "heartwire_http_requests_refused_total",
                "API requests refused for their bearer token (http.api_tokens_file), by reason \
                 (unauthorized: none or unknown, 401; forbidden: the role may not, 403).",
                "reason",
            ),
            api_tokens_file_reloads: Counters::new(
                &r,
                "heartwire_api_tokens_file_reloads_total",
                "Reloads of http.api_tokens_file (SIGHUP or the reload endpoint), by outcome; \
                 after a failed one the previous tokens stay in force.",
                "outcome",
            ),
            http_connections: gauge(
                &r,
                "heartwire_http_connections",
                "HTTP connections open now.",
            ),
            http_connections_accepted: counter(
                &r,
                "heartwire_http_connections_accepted_total",
                "HTTP connections accepted.",
            ),
            http_connection_limit_waits: counter(
                &r,
                "heartwire_http_connection_limit_waits_total",
                "Times the HTTP listener stopped accepting at http.max_connections (new \
                 connections then wait in the listen backlog).",
            ),
            http_connection_timeouts: Counters::new(
                &r,
                "heartwire_http_connection_timeouts_total",
                "HTTP connections closed by http.header_read_timeout (header_read) or \
                 http.idle_timeout (idle).",
                "kind",
            ),
            http_accept_fd_exhausted: counter(
                &r,
                "heartwire_http_accept_fd_exhausted_total",
                "HTTP accept attempts that failed because the process had no file descriptor left.",
            ),
            http_store_busy: counter(
                &r,
                "heartwire_http_store_busy_total",
                "API requests answered 503 because every store query slot stayed taken \
                 (http.max_store_queries) for http.store_queue_timeout.",
            ),
            http_stats_refreshes: counter(
                &r,
                "heartwire_http_stats_refreshes_total",
                "Store queries made to refresh the cached /api/v1/stats totals.",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_label_sets_exist_from_the_start() {
        let text = metrics().render();
        for line in [
            "heartwire_store_errors_total{operation=\"apply\"} 0",
            "heartwire_disconnects_total{reason=\"broker_restart\"} 0",
            "heartwire_messages_dropped_total{reason=\"queue_full\"} 0",
            "heartwire_connections_refused_total{reason=\"fd_exhausted\"} 0",
            "heartwire_presence_transitions_total{kind=\"connected\"} 0",
            "heartwire_http_connection_timeouts_total{kind=\"idle\"} 0",
            "heartwire_history_pruned_sessions_total{policy=\"max_age\"} 0",
            "heartwire_store_errors_total{operation=\"prune\"} 0",
            "heartwire_sent_bytes_total{type=\"pingresp\"} 0",
            "heartwire_packets_received_total{type=\"unsubscribe\"} 0",
        ] {
            assert!(text.contains(line), "missing {line}");
        }
    }

    #[test]
    fn packet_counters_count_packets_and_bytes_by_type() {
        let m = metrics();
        let bytes = |kind: &str| {
            m.registry
                .gather()
                .iter()
                .find(|f| f.get_name() == "heartwire_received_bytes_total")
                .and_then(|f| {
                    f.get_metric()
                        .iter()
                        .find(|x| x.get_label()[0].get_value() == kind)
                        .map(|x| x.get_counter().get_value())
                })
                .unwrap_or(-1.0)
        };
        let before = bytes("suback");
        m.received.count(PacketType::SubAck, 2, 10);
        assert_eq!(bytes("suback") - before, 10.0);
    }
}
