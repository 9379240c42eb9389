//! Command line: options shared by every scenario, then one subcommand per scenario.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::mqtt::Protocol;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "A neutral MQTT 3.1.1 and 5 load generator: the same raw packets for every broker",
    long_about = "A neutral MQTT 3.1.1 and 5 load generator. It writes and parses raw MQTT packets \
                  over tokio (no client library), so it costs the same against every broker. \
                  Each scenario prints one summary line of key=value pairs on stdout, and the \
                  full report as JSON with --json. Every wait is bounded."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Where the broker is, how to reach it, and where the report goes.
#[derive(Debug, Args)]
#[command(next_help_heading = "Broker, connections and report (any scenario)")]
pub struct Common {
    /// Broker hosts, comma-separated (e.g. 127.0.0.1,127.0.0.2); connections are spread over
    /// them round-robin.
    #[arg(long, global = true, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT port.
    #[arg(long, global = true, default_value_t = 1883)]
    pub port: u16,
    /// Process id of the broker: its CPU time and resident memory (from /proc) go into the
    /// report.
    #[arg(long, global = true, value_name = "PID")]
    pub broker_pid: Option<u32>,
    /// Also write the full report to this file as JSON.
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// MQTT keep-alive of every connection, seconds; clients that only read send a PINGREQ
    /// every half of it.
    #[arg(long, global = true, default_value_t = 60)]
    pub keepalive: u16,
    /// Bound for each connection step (TCP connect, CONNACK, SUBACK of a setup client),
    /// seconds.
    #[arg(long, global = true, default_value = "10", value_parser = seconds)]
    pub step_timeout: Duration,
    /// Connections opened at the same time while setting up.
    #[arg(long, global = true, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// MQTT over TLS (the idle and connect-rate scenarios): every connection makes a full
    /// handshake (no session resumption); needs --cafile.
    #[arg(long, global = true)]
    pub tls: bool,
    /// PEM file of the CA certificate(s) that verify the broker's certificate (with --tls;
    /// no system roots are used).
    #[arg(long, global = true, value_name = "PATH")]
    pub cafile: Option<PathBuf>,
    /// The name the broker's certificate is verified against [default: the --host entry a
    /// connection goes to], e.g. localhost when connecting to 127.0.0.1.
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Client certificate (PEM) presented by every connection, with --key.
    #[arg(long, global = true, value_name = "PATH", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key of --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, value_name = "PATH", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Local addresses to connect from, comma-separated (e.g. 127.0.0.2,127.0.0.3), handed
    /// out round-robin (the idle and connect-rate scenarios): each has its own ephemeral ports,
    /// and a broker sees them as different clients [default: the kernel's choice].
    #[arg(long, global = true, value_name = "ADDRS")]
    pub source: Option<String>,
    /// MQTT protocol level of every connection: 4 (3.1.1) or 5 (MQTT 5; the generator sends
    /// no properties and skips the broker's). The retained-subscribe scenario speaks 4 only.
    #[arg(long, global = true, default_value_t = 4, value_name = "LEVEL",
          value_parser = clap::value_parser!(u8).range(4..=5))]
    pub protocol: u8,
}

impl Common {
    /// The protocol of `--protocol`.
    pub fn protocol(&self) -> Protocol {
        Protocol::from_level(self.protocol).unwrap_or_default()
    }
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Many publishers, one subscriber: N connections publish QoS 0 to in/<i> while one
    /// subscriber on in/# counts what it receives. Reports messages written and delivered
    /// per second over the measurement window and, with --broker-pid, the broker's CPU time
    /// per delivered message and its RSS.
    FanIn(FanIn),
    /// A big SUBSCRIBE over many retained messages: loads R retained messages, starts a
    /// bystander doing round trips on its own topic, then sends ONE SUBSCRIBE of F filters
    /// and reads every retained message it brings. Reports the time to SUBACK, the return
    /// codes, the retained messages received and when the last came, and the bystander's
    /// round-trip times meanwhile.
    RetainedSubscribe(RetainedSubscribe),
    /// Idle connections: opens N connections (TCP, or TLS with --tls), waits --settle seconds
    /// and, with --broker-pid, reports the broker's RSS before and after and the KiB per
    /// connection; then holds them for --hold seconds (PINGREQs only) and disconnects.
    Idle(Idle),
    /// Connect rate: opens N connections at R per second (open loop: each starts at its time,
    /// whatever the ones before are doing) and reports the CONNACK latency from the start of
    /// the TCP connect to the CONNACK (with --tls, the handshake included), p50/p99/max, and
    /// with --broker-pid the broker's CPU per connect. Connections stay open until the last
    /// one is answered, then disconnect. With --password-seed each device logs in with its
    /// own user name and password; --flood adds connects with wrong passwords at the same
    /// time.
    ConnectRate(ConnectRate),
    /// QoS 1 to persistent sessions: M subscribers with persistent sessions (clean session 0),
    /// subscriber j on p/<j>/# at QoS 1, online or (--offline) gone after their SUBACK; N
    /// publishers, publisher i on p/<i % M>/<i>, each keeping --window QoS 1 messages
    /// unacknowledged. Reports PUBACKs per second over the window and, with --broker-pid, the
    /// broker's CPU seconds per 1,000 acknowledged messages. MQTT 3.1.1 only.
    PersistentPublish(PersistentPublish),
    /// Fills the broker with S persistent sessions PREFIX<n>, each subscribed to f/<n> at QoS 1
    /// and gone, then queues Q QoS 1 messages for each (every one acknowledged). MQTT 3.1.1 only.
    PersistentFill(PersistentFill),
    /// After a restart on filled state: the time until the broker accepts a connection, and
    /// until the resumed session PREFIX<n> gets its first and its last queued message, counted
    /// from --since-ns; with --broker-pid, the broker's RSS then. MQTT 3.1.1 only.
    PersistentResume(PersistentResume),
    /// Prints `user:password` lines for the devices PREFIX<n> (the input of `mosquitto_passwd
    /// -U` or `broker passwd --bulk`): user name = client id, password derived from the seed
    /// as connect-rate --password-seed (and device-sim) derive it.
    Provision(Provision),
}

#[derive(Debug, Args)]
pub struct Idle {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    /// Seconds between "all connected" and the broker's RSS reading.
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub settle: Duration,
    /// Seconds the connections stay open after the reading.
    #[arg(long, default_value = "0", value_parser = seconds)]
    pub hold: Duration,
}

#[derive(Debug, Args)]
pub struct ConnectRate {
    /// Connections to open.
    #[arg(long, default_value_t = 5_000)]
    pub connections: usize,
    /// Connections started per second.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,
    /// Client ids are PREFIX<n> for n from --start-number [default: lg<pid>-rate-].
    #[arg(long, value_name = "PREFIX")]
    pub client_prefix: Option<String>,
    /// The number of the first client id.
    #[arg(long, default_value_t = 0)]
    pub start_number: u64,
    /// Each connection logs in with its client id as user name and the password derived from
    /// SEED and the client id (see `provision`). Without it, CONNECTs carry no credentials.
    #[arg(long, value_name = "SEED")]
    pub password_seed: Option<String>,
    /// Send wrong passwords (a password derived from another seed): every CONNECT should be
    /// refused, and the report gives the time to each refusal.
    #[arg(long, requires = "password_seed")]
    pub wrong_password: bool,
    /// At the same time, N more connects with wrong passwords, for user names (and client
    /// ids) PREFIX<n> from --flood-start-number, at --flood-rate; reported apart.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        requires = "password_seed"
    )]
    pub flood: usize,
    /// Flood connects started per second [default: --rate].
    #[arg(long, value_name = "PER_S")]
    pub flood_rate: Option<f64>,
    /// The number of the first flood client id [default: the one after the last connection's].
    #[arg(long, value_name = "N")]
    pub flood_start_number: Option<u64>,
    /// Local addresses the flood connects from, comma-separated, round-robin [default: --source].
    #[arg(long, value_name = "ADDRS")]
    pub flood_source: Option<String>,
}

#[derive(Debug, Args)]
pub struct Provision {
    /// User names (client ids) are PREFIX<n>.
    #[arg(long, value_name = "PREFIX", default_value = "dev-")]
    pub client_prefix: String,
    /// The number of the first device.
    #[arg(long, default_value_t = 0)]
    pub start_number: u64,
    /// Devices to print.
    #[arg(long)]
    pub count: u64,
    /// The seed passwords are derived from.
    #[arg(long, value_name = "SEED")]
    pub password_seed: String,
}

#[derive(Debug, Args)]
pub struct FanIn {
    /// Publisher connections; publisher i publishes to in/<i>.
    #[arg(long, default_value_t = 1000)]
    pub publishers: usize,
    /// Total messages per second over all publishers, spread evenly. Without it, every
    /// publisher writes as fast as its socket takes.
    #[arg(long, value_name = "MSG_PER_S")]
    pub rate: Option<f64>,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    pub payload_size: usize,
    /// QoS of the messages and of the subscription: 0, or 1 (needs --rate; each publisher
    /// keeps at most a few messages unacknowledged, the subscriber acknowledges each).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// SO_SNDBUF of each publisher socket, bytes (the kernel doubles it); 0 leaves the
    /// kernel's autotuning, which on loopback lets every connection buffer megabytes, so that
    /// "written" would count bytes parked in the kernel rather than taken by the broker.
    #[arg(long, default_value_t = 65536)]
    pub send_buffer: u32,
    /// Seconds of publishing before the measurement window opens.
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub warmup: Duration,
    /// Seconds of the measurement window.
    #[arg(long, default_value = "20", value_parser = seconds)]
    pub duration: Duration,
}

#[derive(Debug, Args)]
pub struct RetainedSubscribe {
    /// Retained messages loaded first, on topics r/<i/1000>/<i%1000>.
    #[arg(long, default_value_t = 100_000)]
    pub retained: usize,
    /// Payload bytes of each retained message.
    #[arg(long, default_value_t = 1)]
    pub payload_size: usize,
    /// Connections that load the retained messages, each a share of the topics.
    #[arg(long, default_value_t = 4)]
    pub loaders: usize,
    /// Topic filters in the one SUBSCRIBE.
    #[arg(long, default_value_t = 10_000)]
    pub filters: usize,
    /// Share of the filters that contain wildcards: first r/<k>/+ for each group k of 1,000
    /// topics, then r/+/<j>, then +/<k>/<j>. The others name one retained topic each.
    #[arg(long, default_value_t = 0.1, value_parser = share)]
    pub wildcard_share: f64,
    /// Bound on the whole subscribe phase (SUBSCRIBE until the last retained message);
    /// when it passes, what arrived so far is reported. Seconds.
    #[arg(long, default_value = "60", value_parser = seconds)]
    pub timeout: Duration,
    /// After the SUBACK, stop waiting once no message has arrived for this long (a broker
    /// may drop what it cannot queue). Seconds.
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub idle_timeout: Duration,
    /// Bound on loading the retained messages (until the broker confirms it has stored them
    /// all). Seconds.
    #[arg(long, default_value = "120", value_parser = seconds)]
    pub load_timeout: Duration,
    /// Pause between two bystander round trips (one is outstanding at a time), milliseconds.
    #[arg(long, default_value_t = 1.0)]
    pub bystander_interval_ms: f64,
    /// Seconds of bystander round trips before the SUBSCRIBE, reported as its baseline.
    #[arg(long, default_value = "1", value_parser = seconds)]
    pub baseline: Duration,
}

#[derive(Debug, Args)]
pub struct PersistentPublish {
    /// Publisher connections (clean sessions: only the subscribers' sessions persist).
    #[arg(long, default_value_t = 50)]
    pub publishers: usize,
    /// Persistent subscribers; each gets the messages of its share of the publishers. Fewer
    /// than publishers: a subscriber's in-flight limit at the broker may hold up more than one
    /// publisher's window (and Mosquitto drops QoS 1 messages beyond 1,000 queued).
    #[arg(long, default_value_t = 50)]
    pub subscribers: usize,
    /// The subscribers leave after their SUBACK: the messages queue in their sessions (until
    /// the broker's queue limit, beyond which it drops them).
    #[arg(long)]
    pub offline: bool,
    /// QoS 1 messages each publisher keeps unacknowledged.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    pub payload_size: usize,
    /// Seconds of publishing before the measurement window opens.
    #[arg(long, default_value = "5", value_parser = seconds)]
    pub warmup: Duration,
    /// Seconds of the measurement window.
    #[arg(long, default_value = "20", value_parser = seconds)]
    pub duration: Duration,
}

#[derive(Debug, Args)]
pub struct PersistentFill {
    /// Persistent sessions to create (one connection each, --connect-concurrency at a time).
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// QoS 1 messages queued in each session.
    #[arg(long, default_value_t = 10)]
    pub queued: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    pub payload_size: usize,
    /// Publisher connections that queue the messages.
    #[arg(long, default_value_t = 20)]
    pub publishers: usize,
    /// QoS 1 messages each publisher keeps unacknowledged.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Session client ids are PREFIX<n>, n from 0.
    #[arg(long, value_name = "PREFIX", default_value = "ps-")]
    pub client_prefix: String,
}

#[derive(Debug, Args)]
pub struct PersistentResume {
    /// The session resumed is PREFIX<n> (as filled by persistent-fill).
    #[arg(long, value_name = "PREFIX", default_value = "ps-")]
    pub client_prefix: String,
    /// Its number n.
    #[arg(long, default_value_t = 0)]
    pub session: usize,
    /// Queued messages expected: the wait ends once they arrived, or 2 s after the last.
    #[arg(long, default_value_t = 10)]
    pub expect: u64,
    /// The caller's clock (nanoseconds since the Unix epoch) when it started the broker: the
    /// origin of the reported times.
    #[arg(long, value_name = "NS")]
    pub since_ns: u64,
    /// Bound on the broker's start and the first queued message, seconds.
    #[arg(long, default_value = "300", value_parser = seconds)]
    pub timeout: Duration,
}

fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(v).map_err(|_| format!("{s:?} is not a non-negative duration"))
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share between 0 and 1")),
    }
}
