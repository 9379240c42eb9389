//! The command line: the subcommands and their options ([`RunArgs`], [`ProvisionArgs`],
//! [`VerifyArgs`]), the checks clap cannot make ([`RunArgs::check`]) and the settings derived
//! from the options.
//! `run` options are accepted without the subcommand too.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::client::Protocol;
use crate::credentials::{Credentials, Password, User};
use crate::device::{EndState, Telemetry, KEEPALIVE_MULTIPLIER};
use crate::scenario::{MixKind, Scenario};
use crate::transport::{self, ClientCert, Kind};

/// Largest PUBLISH remaining length device-sim sends (1 MiB, the default `mqtt.max_packet_size`
/// of Heartwire), so also the bound of `--payload-size`.
const MAX_PAYLOAD: u64 = 1024 * 1024;
/// Exit codes, for `--help` (the numbers are `main`'s).
const EXIT_CODES: &str = "Exit codes: 0 success; 1 verify: the broker disagrees with the truth; \
                          2 error (bad options, unreachable API or database, I/O); \
                          3 run: no device ever connected (the first error of each kind is \
                          printed on stderr and in --json).";
/// Environment variable that carries `--password` (to the workers too): other users cannot read
/// it from the process list.
pub const PASSWORD_ENV: &str = "DEVICE_SIM_PASSWORD";
/// Environment variable that carries `--password-seed` (to the workers too), for the same
/// reason.
pub const PASSWORD_SEED_ENV: &str = "DEVICE_SIM_PASSWORD_SEED";
/// The shortest keep-alive of `--protocol 5`, in seconds: rumqttc's MQTT 5 client refuses
/// (panics on) anything shorter, 0 included.
const MIN_V5_KEEPALIVE: u16 = 5;
/// Range of `verify --keepalive-multiplier`, the range the broker accepts for its
/// `mqtt.keepalive_multiplier`.
const MULTIPLIER_RANGE: std::ops::RangeInclusive<f64> = 1.0..=10.0;

/// Command line: `run` options are accepted without the subcommand too.
#[derive(Debug, Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated MQTT device fleet for Heartwire",
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    // The subcommand, if any (`run` when there is none).
    #[command(subcommand)]
    pub command: Option<Command>,
    // The options of `run` given without the subcommand.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a fleet of simulated devices (the default).
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Compare a run's ground truth with the broker's presence API.
    ///
    /// Checks every device's final state and the reason recorded for every session end the
    /// simulator caused. A session recorded as broker_restart is accepted when it was open at a
    /// broker crash: its boot (from GET /api/v1/nodes) was recovered by a later boot, it was
    /// closed at that boot's last heartbeat, and the truth had it open then (for a silent death:
    /// its keep-alive deadline was not yet due); their number is printed. After a run with
    /// --protocol 5, every DISCONNECT reason code a device received must match the reason the
    /// broker recorded for that session (0x8E takeover, 0x8D keepalive_timeout, 0x8B
    /// broker_shutdown, 0x98 kicked, 0x87 not_authorized, 0x81/0x82 protocol_error).
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
    /// Print `user:password` lines for the devices of a run, to create their accounts.
    ///
    /// One line per device (user name = client id, the password from --password-seed or
    /// --password), for `broker passwd --bulk FILE` or `mosquitto_passwd`-style tools; the
    /// devices of `run --count N --prefix P --start-number S --username-from-client-id
    /// --password-seed SEED` log in with them.
    #[command(after_help = EXIT_CODES)]
    Provision(ProvisionArgs),
}

/// Options of `device-sim run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Broker hosts, comma separated; devices are spread round-robin over every host × port pair.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub host: Vec<String>,
    /// Broker ports, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1883")]
    pub port: Vec<u16>,
    /// Number of devices.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Number of the first device; client ids are PREFIX + number.
    #[arg(long, default_value_t = 0)]
    pub start_number: u64,
    /// Client id prefix.
    #[arg(long, default_value = "dev-")]
    pub prefix: String,
    /// New devices started per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// MQTT keep-alive in seconds (0 disables pings, and silent deaths become abrupt closes).
    #[arg(long, default_value_t = 30)]
    pub keepalive: u16,
    /// The broker's `mqtt.keepalive_multiplier` (1.0 to 10.0): a silently dead device stays
    /// away until the broker must have closed its connection, keep-alive × this (plus 1 s).
    #[arg(long, default_value_t = KEEPALIVE_MULTIPLIER, value_parser = keepalive_multiplier)]
    pub keepalive_multiplier: f64,
    /// MQTT protocol level of every device: 3.1.1 (alias 4) or 5. With 5 each DISCONNECT the
    /// broker sends (its reason code) is recorded in --truth and counted in the summary, and
    /// verify checks it against the reason the broker recorded for that session; 5 needs
    /// --keepalive 5 or more (rumqttc's MQTT 5 client allows no shorter keep-alive).
    #[arg(long, value_enum, default_value_t = Protocol::V311)]
    pub protocol: Protocol,
    /// MQTT clean-session flag (`--clean false` for persistent sessions; with --protocol 5,
    /// clean start false and a session that never expires).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub clean: bool,
    /// Length of the run in seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// MQTT user name sent in CONNECT by every device.
    #[arg(
        long,
        help_heading = "Credentials",
        group = "user",
        value_name = "NAME"
    )]
    pub username: Option<String>,
    /// Every device sends its client id as its MQTT user name (for a broker with
    /// `auth.bind_client_id = "username"`).
    #[arg(long, help_heading = "Credentials", group = "user")]
    pub username_from_client_id: bool,
    /// MQTT password sent in CONNECT by every device; needs --username or
    /// --username-from-client-id. Prefer the environment variable, which other users cannot
    /// read from the process list.
    #[arg(
        long,
        help_heading = "Credentials",
        env = PASSWORD_ENV,
        hide_env_values = true,
        requires = "user"
    )]
    pub password: Option<String>,
    /// Each device's password is the first 24 hex digits of SHA-256(SEED || client id), as
    /// `device-sim provision` prints it; needs --username-from-client-id.
    #[arg(
        long,
        help_heading = "Credentials",
        value_name = "SEED",
        env = PASSWORD_SEED_ENV,
        hide_env_values = true,
        conflicts_with = "password"
    )]
    pub password_seed: Option<String>,
    /// Telemetry: seconds between two messages of one device while it is connected (decimals
    /// allowed); without it devices only ping.
    #[arg(long)]
    pub publish_interval: Option<f64>,
    /// Telemetry: quality of service of the messages (0, 1 or 2).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Telemetry: payload size in bytes (a JSON object padded or cut to exactly this size); a
    /// PUBLISH (payload, topic and 4 bytes) must fit in 1 MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=MAX_PAYLOAD))]
    pub payload_size: u64,
    /// Telemetry: topic; `%c` becomes the client id, `%i` the device number.
    #[arg(long, default_value = "devices/%c/telemetry")]
    pub topic: String,
    /// Timeout for TCP connect plus CONNACK, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,
    /// File written once all devices are connected for the first time.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// What happens during the run.
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    pub scenario: Scenario,
    /// churn and takeover: devices per minute that leave (churn) or are taken over, in percent
    /// of --count (may exceed 100).
    #[arg(long, default_value_t = 10.0)]
    pub churn_percent: f64,
    /// churn: ways of leaving to pick from at random, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "clean,abrupt,silent"
    )]
    pub churn_mix: Vec<MixKind>,
    /// churn: mean seconds away before coming back (a silent death stays away at least
    /// 1.5 × keep-alive + 1 s).
    #[arg(long, default_value_t = 1.0)]
    pub churn_pause: f64,
    /// flap: number of devices (the first ones) that reconnect rapidly.
    #[arg(long, default_value_t = 5)]
    pub flappers: u64,
    /// storm: seconds between storms (one storm half-way when the run is shorter).
    #[arg(long, default_value_t = 30)]
    pub storm_every: u64,
    /// durable: command messages per device (numbered from 1; keep it under the broker's
    /// mqtt.max_queued_messages, 1000 by default, past which a session's queue drops them).
    #[arg(long, help_heading = "Durable scenario", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub messages: u32,
    /// durable: publisher connections; each sends every message of its share of the devices.
    #[arg(long, help_heading = "Durable scenario", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub publishers: u32,
    /// durable: PUBLISHes each publisher keeps in flight (sent, PUBACK not yet received).
    #[arg(long, help_heading = "Durable scenario", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub window: u32,
    /// durable: PUBLISHes per second over all publishers, command and state messages together
    /// (0: as fast as the broker acknowledges).
    #[arg(long, help_heading = "Durable scenario", default_value_t = 0.0)]
    pub publish_rate: f64,
    /// durable: seconds every connection keeps trying to reach an absent broker (restarted
    /// or crashed) before the run gives up.
    #[arg(long, help_heading = "Durable scenario", default_value_t = 60.0)]
    pub broker_wait: f64,
    /// Ground truth output: one JSON line per state change, then each device's final state
    /// (durable: one line per device, its acknowledged and delivered messages).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// At the end of --duration: `disconnect` every device cleanly, or `keep` the connected
    /// ones connected (final state recorded, file flushed) until SIGINT/SIGTERM.
    #[arg(long, value_enum, default_value_t = EndState::Disconnect)]
    pub end_state: EndState,
    /// Write the final summary as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Split --count into N contiguous ranges of device numbers, each run by a child process
    /// (--rate and --flappers are split too; --truth FILE is merged from FILE.worker-K).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: u32,
    /// Serve Prometheus metrics on ADDR (host:port) at GET /metrics; with --workers the
    /// parent serves the sum of all workers.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// MQTT over TLS; needs --cafile.
    #[arg(long, help_heading = "Transport", conflicts_with_all = ["ws", "wss"])]
    pub tls: bool,
    /// MQTT over WebSocket (ws://HOST:PORT/--ws-path, subprotocol "mqtt").
    #[arg(long, help_heading = "Transport", conflicts_with = "wss")]
    pub ws: bool,
    /// MQTT over WebSocket over TLS (wss://HOST:PORT/--ws-path); needs --cafile.
    #[arg(long, help_heading = "Transport")]
    pub wss: bool,
    /// HTTP path of the broker's WebSocket endpoint, with --ws or --wss
    /// [default: /mqtt].
    #[arg(long, help_heading = "Transport", value_name = "PATH")]
    pub ws_path: Option<String>,
    /// TLS: PEM file of the CA certificate(s) that verify the broker's certificate; required
    /// with --tls and --wss (device-sim trusts no system roots).
    #[arg(long, help_heading = "Transport", value_name = "PATH")]
    pub cafile: Option<PathBuf>,
    /// TLS: client certificate presented by every device (PEM, the device certificate first,
    /// then any intermediates); needs --key.
    #[arg(
        long,
        help_heading = "Transport",
        value_name = "PATH",
        requires = "key",
        conflicts_with = "cert_dir"
    )]
    pub cert: Option<PathBuf>,
    /// TLS: private key of --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        help_heading = "Transport",
        value_name = "PATH",
        requires = "cert",
        conflicts_with = "cert_dir"
    )]
    pub key: Option<PathBuf>,
    /// TLS: a certificate per device: DIR/<client id>.crt and DIR/<client id>.key (PEM), read
    /// when the device starts.
    #[arg(long, help_heading = "Transport", value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// TLS: the name the broker's certificate is verified against [default: the --host a
    /// device connects to], e.g. `localhost` when connecting to 127.0.0.1.
    #[arg(long, help_heading = "Transport", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Internal: this process is worker K of a --workers parent (machine-readable output).
    #[arg(long, hide = true)]
    pub worker_id: Option<u32>,
}

impl RunArgs {
    /// Checks options that clap cannot.
    pub fn check(&self) -> Result<()> {
        if self.protocol == Protocol::V5 && self.keepalive < MIN_V5_KEEPALIVE {
            bail!(
                "--protocol 5 needs --keepalive of at least {MIN_V5_KEEPALIVE} seconds (got {}): \
                 rumqttc's MQTT 5 client refuses shorter keep-alives, 0 included; use \
                 --protocol 3.1.1 for those",
                self.keepalive
            );
        }
        if self.scenario == Scenario::Durable {
            self.check_durable()?;
        }
        if self.churn_mix.is_empty() {
            bail!("--churn-mix needs at least one kind");
        }
        if !(self.churn_percent.is_finite() && self.churn_percent >= 0.0) {
            bail!("--churn-percent must be a non-negative number");
        }
        if !(self.churn_pause.is_finite() && self.churn_pause >= 0.0) {
            bail!("--churn-pause must be a non-negative number of seconds");
        }
        if let Some(i) = self.publish_interval {
            if !(i.is_finite() && i >= 0.001) {
                bail!("--publish-interval must be a number of seconds, at least 0.001");
            }
            // The expanded topic of the device with the longest number (the prefix is in it too).
            let last = self.start_number.saturating_add(self.count - 1);
            let topic = self
                .telemetry()
                .map(|t| t.topic_for(&format!("{}{last}", self.prefix), last))
                .unwrap_or_default();
            if topic.is_empty()
                || topic.contains(['+', '#', '\0'])
                || topic.len() > usize::from(u16::MAX)
            {
                bail!(
                    "--topic (with --prefix) must expand to a topic name without wildcards (+, #), \
                     1 to 65535 bytes; got {topic:?}"
                );
            }
            // PUBLISH remaining length: topic length field + topic + packet id + payload.
            let publish = 2 + topic.len() as u64 + 2 + self.payload_size;
            if publish > MAX_PAYLOAD {
                bail!(
                    "--payload-size {} with topic {topic:?} makes PUBLISH packets of {publish} bytes, \
                     over 1 MiB (Heartwire's default mqtt.max_packet_size)",
                    self.payload_size
                );
            }
        }
        self.transport()?;
        self.credentials()?;
        Ok(())
    }

    /// The `durable` scenario's limits: one process, MQTT 3.1.1 over plain TCP.
    fn check_durable(&self) -> Result<()> {
        let unsupported = [
            ("--workers", self.workers > 1),
            ("--protocol 5", self.protocol == Protocol::V5),
            ("--tls", self.tls),
            ("--ws", self.ws),
            ("--wss", self.wss),
            ("--publish-interval", self.publish_interval.is_some()),
        ];
        if let Some((flag, _)) = unsupported.iter().find(|(_, set)| *set) {
            bail!(
                "--scenario durable runs MQTT 3.1.1 over plain TCP in one process; {flag} is not \
                 supported with it"
            );
        }
        if !(self.publish_rate.is_finite() && self.publish_rate >= 0.0) {
            bail!("--publish-rate must be a non-negative number of PUBLISHes per second");
        }
        if !(self.broker_wait.is_finite() && self.broker_wait > 0.0) {
            bail!("--broker-wait must be a positive number of seconds");
        }
        Ok(())
    }

    /// The credentials settings (`--username`, `--username-from-client-id`, `--password`,
    /// `--password-seed`), checked: a seed derives a password per client id, so it needs the
    /// client id as user name (clap rejects the conflicting flags).
    pub fn credentials(&self) -> Result<Credentials> {
        let user = match (&self.username, self.username_from_client_id) {
            (Some(name), _) if name.is_empty() => bail!(
                "--username must not be empty (MQTT 3.1.1 sends a password only with a user name)"
            ),
            (Some(name), _) => User::Shared(name.clone()),
            (None, true) => User::ClientId,
            (None, false) => User::None,
        };
        let password = match (&self.password, &self.password_seed) {
            (_, Some(seed)) if seed.is_empty() => bail!("--password-seed must not be empty"),
            (_, Some(seed)) => Password::Seeded(seed.clone()),
            (Some(password), None) => Password::Shared(password.clone()),
            (None, None) => Password::None,
        };
        if matches!(password, Password::Seeded(_)) && user != User::ClientId {
            bail!(
                "--password-seed needs --username-from-client-id: the seed derives one password \
                 per client id, for a user of that name"
            );
        }
        Ok(Credentials { user, password })
    }

    /// The transport settings (`--tls`, `--ws`, `--wss` and their options), checked: TLS needs
    /// `--cafile`, and the TLS and WebSocket options need a transport that uses them (clap
    /// rejects the conflicting flags).
    pub fn transport(&self) -> Result<transport::Settings> {
        let kind = match (self.tls, self.ws, self.wss) {
            (true, _, _) => Kind::Tls,
            (_, true, _) => Kind::Ws,
            (_, _, true) => Kind::Wss,
            _ => Kind::Tcp,
        };
        if !kind.is_tls() {
            let given = [
                ("--cafile", self.cafile.is_some()),
                ("--cert", self.cert.is_some()),
                ("--key", self.key.is_some()),
                ("--cert-dir", self.cert_dir.is_some()),
                ("--tls-server-name", self.tls_server_name.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
                bail!("{flag} needs --tls or --wss");
            }
        } else if self.cafile.is_none() {
            bail!(
                "--{} needs --cafile PATH: the PEM CA certificate that signed the broker's \
                 certificate (device-sim trusts no system roots)",
                if kind == Kind::Tls { "tls" } else { "wss" }
            );
        }
        if self.ws_path.is_some() && !kind.is_ws() {
            bail!("--ws-path needs --ws or --wss");
        }
        let ws_path = self.ws_path.clone().unwrap_or_else(|| "/mqtt".to_owned());
        if !ws_path.starts_with('/') || ws_path.contains(char::is_whitespace) {
            bail!("--ws-path must be an absolute HTTP path without spaces, like /mqtt; got {ws_path:?}");
        }
        let client_cert = match (&self.cert, &self.key, &self.cert_dir) {
            (Some(cert), Some(key), _) => ClientCert::Shared {
                cert: cert.clone(),
                key: key.clone(),
            },
            (_, _, Some(dir)) => ClientCert::PerDevice(dir.clone()),
            _ => ClientCert::None,
        };
        Ok(transport::Settings {
            kind,
            ws_path,
            cafile: self.cafile.clone(),
            client_cert,
            server_name: self.tls_server_name.clone(),
        })
    }

    /// The telemetry settings, if `--publish-interval` asks for any.
    pub fn telemetry(&self) -> Option<Telemetry> {
        let interval = Duration::from_secs_f64(self.publish_interval?);
        Some(Telemetry {
            interval,
            qos: match self.qos {
                0 => rumqttc::QoS::AtMostOnce,
                1 => rumqttc::QoS::AtLeastOnce,
                _ => rumqttc::QoS::ExactlyOnce,
            },
            payload_size: usize::try_from(self.payload_size).unwrap_or(usize::MAX),
            topic: self.topic.clone(),
        })
    }
}

/// Options of `device-sim provision`: the devices of a run (same defaults as `run`) and their
/// passwords.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("secret").required(true))]
pub struct ProvisionArgs {
    /// Number of devices.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Number of the first device; client ids (and user names) are PREFIX + number.
    #[arg(long, default_value_t = 0)]
    pub start_number: u64,
    /// Client id prefix.
    #[arg(long, default_value = "dev-")]
    pub prefix: String,
    /// Each device's password is derived from SEED and its client id, as by `run
    /// --password-seed`.
    #[arg(
        long,
        value_name = "SEED",
        env = PASSWORD_SEED_ENV,
        hide_env_values = true,
        group = "secret"
    )]
    pub password_seed: Option<String>,
    /// The same password for every device, as by `run --password`.
    #[arg(long, env = PASSWORD_ENV, hide_env_values = true, group = "secret")]
    pub password: Option<String>,
    /// Store the credentials in the broker's database through its admin API at this base URL
    /// (e.g. http://127.0.0.1:8080; the broker needs `auth.database`) instead of printing the
    /// `user:password` lines. A device that has a credential already gets its password set
    /// again, so provisioning can be repeated.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// Bearer token for a broker whose API is protected (`http.api_tokens_file`): a token of
    /// role admin, as `broker token NAME admin` prints it.
    #[arg(
        long,
        env = "DEVICE_SIM_API_TOKEN",
        hide_env_values = true,
        requires = "api"
    )]
    pub api_token: Option<String>,
}

impl ProvisionArgs {
    /// The credentials of the devices: their client ids as user names, and the password(s).
    pub fn credentials(&self) -> Result<Credentials> {
        let password = match (&self.password_seed, &self.password) {
            (Some(seed), _) if seed.is_empty() => bail!("--password-seed must not be empty"),
            (Some(seed), _) => Password::Seeded(seed.clone()),
            (None, Some(password)) if password.is_empty() => {
                bail!("--password must not be empty")
            }
            (None, Some(password)) => Password::Shared(password.clone()),
            (None, None) => bail!("provision needs --password-seed SEED or --password"),
        };
        Ok(Credentials {
            user: User::ClientId,
            password,
        })
    }
}

/// Options of `device-sim verify`.
#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// Truth file written by `device-sim run --truth`.
    #[arg(long)]
    pub truth: PathBuf,
    /// Base URL of the broker's HTTP API, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub api: String,
    /// Bearer token for a broker whose API is protected (`http.api_tokens_file`): a token of
    /// role read, as `broker token NAME read` prints it.
    #[arg(long, env = "DEVICE_SIM_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Also compare the final states with the presence database directly (`postgres://…` or
    /// `sqlite://…`, the broker's `devices` table).
    #[arg(long)]
    pub database_url: Option<String>,
    /// Seconds to wait before checking. A silent death is detected up to
    /// --keepalive-multiplier × keep-alive after it happened: use at least that when the run
    /// ended with devices dead.
    #[arg(long, default_value_t = 5.0)]
    pub settle: f64,
    /// The broker's `mqtt.keepalive_multiplier` (1.0 to 10.0): it closes a connection that sent
    /// nothing for keep-alive × this. Sets the deadline of every silent death (its detection
    /// overshoot, and whether a broker crash came before it); give the broker's value when it
    /// is not the default (`broker --print-config` shows it).
    #[arg(long, default_value_t = KEEPALIVE_MULTIPLIER, value_parser = keepalive_multiplier)]
    pub keepalive_multiplier: f64,
}

/// Parses `--keepalive-multiplier`: a number in the range the broker accepts.
fn keepalive_multiplier(value: &str) -> Result<f64, String> {
    match value.trim().parse::<f64>() {
        Ok(m) if MULTIPLIER_RANGE.contains(&m) => Ok(m),
        _ => Err(format!(
            "expected a number between {:.1} and {:.1} (the broker's mqtt.keepalive_multiplier; \
             default {KEEPALIVE_MULTIPLIER})",
            MULTIPLIER_RANGE.start(),
            MULTIPLIER_RANGE.end()
        )),
    }
}

/// The command-line name of a clap value.
pub fn value_name<T: ValueEnum>(v: &T) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn defaults_and_bad_lists() -> Result<()> {
        let cli = Cli::try_parse_from(["device-sim"])?.run;
        assert_eq!(cli.host, ["127.0.0.1"]);
        assert_eq!(cli.scenario, Scenario::Steady);
        assert_eq!(cli.end_state, EndState::Disconnect);
        assert_eq!(cli.churn_mix.len(), 3);
        assert_eq!(cli.port, [1883]);
        assert!(cli.clean);
        assert!(Cli::try_parse_from(["device-sim", "--port", "1883,x"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--count", "0"]).is_err());
        let cli = Cli::try_parse_from(["device-sim", "--clean", "false"])?.run;
        assert!(!cli.clean);
        let cli = Cli::try_parse_from([
            "device-sim",
            "verify",
            "--truth",
            "t.jsonl",
            "--api",
            "http://127.0.0.1:8080",
        ])?;
        match cli.command {
            Some(Command::Verify(v)) => assert_eq!(v.settle, 5.0),
            other => bail!("expected verify, got {other:?}"),
        }
        assert!(Cli::try_parse_from(["device-sim", "verify", "--api", "http://x:1"]).is_err());
        let cli = Cli::try_parse_from([
            "device-sim",
            "run",
            "--scenario",
            "churn",
            "--churn-mix",
            "silent",
            "--end-state",
            "keep",
        ])?;
        let Some(Command::Run(run)) = cli.command else {
            bail!("expected run");
        };
        assert_eq!(run.churn_mix, [MixKind::Silent]);
        assert_eq!(run.end_state, EndState::Keep);
        assert!(
            run.telemetry().is_none(),
            "no telemetry without --publish-interval"
        );

        assert!(Cli::try_parse_from(["device-sim", "--qos", "3"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--payload-size", "0"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--password", "p"]).is_err());
        let run = Cli::try_parse_from(["device-sim", "--publish-interval", "0"])?.run;
        assert!(run.check().is_err(), "interval 0");
        let telemetry_with = |extra: [&str; 2]| {
            Cli::try_parse_from(["device-sim", "--publish-interval", "1", extra[0], extra[1]])
                .map(|c| c.run)
        };
        assert!(
            telemetry_with(["--topic", "a/+/b"])?.check().is_err(),
            "wildcard topic"
        );
        let prefixed = telemetry_with(["--prefix", "a#"])?;
        assert!(prefixed.check().is_err(), "wildcard in the expanded topic");
        let run = Cli::try_parse_from(["device-sim", "--prefix", "a#"])?.run;
        run.check()?; // no telemetry, no topic
        let run = Cli::try_parse_from([
            "device-sim",
            "--publish-interval",
            "1",
            "--payload-size",
            "1048576",
        ])?
        .run;
        assert!(run.check().is_err(), "PUBLISH over 1 MiB");
        let run = Cli::try_parse_from(["device-sim", "--username", ""])?.run;
        assert!(run.check().is_err(), "empty user name");
        let run = Cli::try_parse_from([
            "device-sim",
            "--publish-interval",
            "0.5",
            "--qos",
            "2",
            "--payload-size",
            "10",
        ])?
        .run;
        run.check()?;
        let t = run.telemetry().context("telemetry")?;
        assert_eq!(
            (t.interval, t.qos, t.payload_size),
            (Duration::from_millis(500), rumqttc::QoS::ExactlyOnce, 10)
        );
        Ok(())
    }

    /// `device-sim` with `args`, parsed and checked: the transport settings, or the error
    /// message (clap's or the check's).
    fn transport_of(args: &[&str]) -> Result<transport::Settings, String> {
        let mut argv = vec!["device-sim"];
        argv.extend_from_slice(args);
        let run = Cli::try_parse_from(argv).map_err(|e| e.to_string())?.run;
        run.check().map_err(|e| e.to_string())?;
        run.transport().map_err(|e| e.to_string())
    }

    #[test]
    fn transport_flags() -> Result<()> {
        let tcp = transport_of(&[]).map_err(anyhow::Error::msg)?;
        assert_eq!((tcp.kind, tcp.client_cert), (Kind::Tcp, ClientCert::None));
        let ws = transport_of(&["--ws"]).map_err(anyhow::Error::msg)?;
        assert_eq!((ws.kind, ws.ws_path.as_str()), (Kind::Ws, "/mqtt"));
        let wss = transport_of(&["--wss", "--ws-path", "/x", "--cafile", "ca.pem"])
            .map_err(anyhow::Error::msg)?;
        assert_eq!((wss.kind, wss.ws_path.as_str()), (Kind::Wss, "/x"));
        let tls = transport_of(&[
            "--tls",
            "--cafile",
            "ca.pem",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
            "--tls-server-name",
            "localhost",
        ])
        .map_err(anyhow::Error::msg)?;
        assert_eq!(tls.kind, Kind::Tls);
        assert_eq!(tls.cafile, Some(PathBuf::from("ca.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("localhost"));
        assert_eq!(
            tls.client_cert,
            ClientCert::Shared {
                cert: "c.pem".into(),
                key: "k.pem".into()
            }
        );
        let dir = transport_of(&["--tls", "--cafile", "ca", "--cert-dir", "certs"])
            .map_err(anyhow::Error::msg)?;
        assert_eq!(dir.client_cert, ClientCert::PerDevice("certs".into()));
        // The run subcommand takes them too.
        let cli = Cli::try_parse_from(["device-sim", "run", "--wss", "--cafile", "ca"])?;
        let Some(Command::Run(run)) = cli.command else {
            bail!("expected run");
        };
        assert_eq!(run.transport()?.kind, Kind::Wss);

        // Each refusal names the flags at fault.
        for (args, flags) in [
            (&["--tls", "--ws"][..], &["--tls", "--ws"][..]),
            (&["--ws", "--wss"], &["--ws", "--wss"]),
            (&["--tls", "--wss", "--cafile", "c"], &["--tls", "--wss"]),
            (&["--tls", "--cafile", "c", "--cert", "c"], &["--key"]),
            (&["--tls", "--cafile", "c", "--key", "k"], &["--cert"]),
            (
                &[
                    "--tls",
                    "--cafile",
                    "c",
                    "--cert",
                    "c",
                    "--key",
                    "k",
                    "--cert-dir",
                    "d",
                ],
                &["--cert", "--cert-dir"],
            ),
            (&["--tls"], &["--tls", "--cafile"]),
            (&["--wss"], &["--wss", "--cafile"]),
            (&["--cafile", "c"], &["--cafile", "--tls or --wss"]),
            (
                &["--ws", "--cert-dir", "d"],
                &["--cert-dir", "--tls or --wss"],
            ),
            (
                &["--tls-server-name", "x"],
                &["--tls-server-name", "--tls or --wss"],
            ),
            (&["--ws-path", "/x"], &["--ws-path", "--ws or --wss"]),
            (
                &["--tls", "--cafile", "c", "--ws-path", "/x"],
                &["--ws-path"],
            ),
            (&["--ws", "--ws-path", "mqtt"], &["--ws-path"]),
        ] {
            let Err(e) = transport_of(args) else {
                bail!("{args:?} was accepted");
            };
            for flag in flags {
                assert!(e.contains(flag), "{args:?}: {e:?} does not name {flag}");
            }
        }
        Ok(())
    }

    #[test]
    fn credentials_flags() -> Result<()> {
        let credentials_of = |args: &[&str]| -> Result<Credentials, String> {
            let mut argv = vec!["device-sim"];
            argv.extend_from_slice(args);
            let run = Cli::try_parse_from(argv).map_err(|e| e.to_string())?.run;
            run.check().map_err(|e| e.to_string())?;
            run.credentials().map_err(|e| e.to_string())
        };
        let ok = |args: &[&str]| credentials_of(args).map_err(anyhow::Error::msg);
        assert_eq!(ok(&[])?, Credentials::none());
        assert_eq!(
            ok(&["--username-from-client-id", "--password-seed", "s"])?,
            Credentials {
                user: User::ClientId,
                password: Password::Seeded("s".into())
            }
        );
        assert_eq!(
            ok(&["--username-from-client-id", "--password", "p"])?.for_device("dev-1"),
            Some(("dev-1".into(), "p".into()))
        );
        assert_eq!(
            ok(&["--username", "u", "--password", "p"])?.for_device("dev-1"),
            Some(("u".into(), "p".into()))
        );
        // The run subcommand takes them too.
        let cli = Cli::try_parse_from([
            "device-sim",
            "run",
            "--username-from-client-id",
            "--password-seed",
            "s",
        ])?;
        let Some(Command::Run(run)) = cli.command else {
            bail!("expected run");
        };
        assert_eq!(run.credentials()?.user, User::ClientId);

        // Each refusal names the flags at fault.
        for (args, flags) in [
            (
                &["--username", "u", "--username-from-client-id"][..],
                &["--username <NAME>", "--username-from-client-id"][..],
            ),
            (
                &[
                    "--username-from-client-id",
                    "--password",
                    "p",
                    "--password-seed",
                    "s",
                ],
                &["--password", "--password-seed"],
            ),
            (&["--password", "p"], &["--password", "--username"]),
            (
                &["--password-seed", "s"],
                &["--password-seed", "--username-from-client-id"],
            ),
            (
                &["--username", "u", "--password-seed", "s"],
                &["--password-seed", "--username-from-client-id"],
            ),
            (&["--username", ""], &["--username"]),
            (
                &["--username-from-client-id", "--password-seed", ""],
                &["--password-seed"],
            ),
        ] {
            let Err(e) = credentials_of(args) else {
                bail!("{args:?} was accepted");
            };
            for flag in flags {
                assert!(e.contains(flag), "{args:?}: {e:?} does not name {flag}");
            }
        }
        Ok(())
    }

    #[test]
    fn provision_takes_the_devices_and_a_secret() -> Result<()> {
        let provision = |args: &[&str]| {
            let mut argv = vec!["device-sim", "provision"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Some(Command::Provision(p)) => Some(p),
                _ => None,
            })
        };
        let p = provision(&["--password-seed", "s"])?.context("provision")?;
        assert_eq!(
            (p.count, p.start_number, p.prefix.as_str()),
            (100, 0, "dev-")
        );
        assert_eq!(p.credentials()?.password, Password::Seeded("s".into()));
        let p = provision(&["--password", "p", "--count", "3"])?.context("provision")?;
        assert_eq!(p.credentials()?.password, Password::Shared("p".into()));
        let e = provision(&[]).err().context("no secret")?.to_string();
        assert!(
            e.contains("--password-seed") && e.contains("--password"),
            "{e}"
        );
        assert!(provision(&["--password", "p", "--password-seed", "s"]).is_err());
        Ok(())
    }

    #[test]
    fn protocol_is_3_1_1_unless_5_is_asked_for() -> Result<()> {
        let protocol = |extra: &[&str]| {
            let mut argv = vec!["device-sim", "run"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Some(Command::Run(r)) => Some(r.protocol),
                _ => None,
            })
        };
        assert_eq!(protocol(&[])?, Some(Protocol::V311));
        assert_eq!(protocol(&["--protocol", "3.1.1"])?, Some(Protocol::V311));
        assert_eq!(protocol(&["--protocol", "4"])?, Some(Protocol::V311));
        assert_eq!(protocol(&["--protocol", "5"])?, Some(Protocol::V5));
        assert_eq!(value_name(&Protocol::V311), "3.1.1");
        assert_eq!(value_name(&Protocol::V5), "5");
        // Every transport works with either protocol.
        for transport in [
            &["--ws"][..],
            &["--wss", "--cafile", "c"],
            &["--tls", "--cafile", "c"],
        ] {
            let mut args = vec!["--protocol", "5"];
            args.extend_from_slice(transport);
            transport_of(&args).map_err(anyhow::Error::msg)?;
        }
        let e = protocol(&["--protocol", "3"]).err().context("3 refused")?;
        assert!(e.to_string().contains("3.1.1"), "{e}");
        // rumqttc's MQTT 5 client takes no keep-alive under 5 s: refused, naming both options.
        for short in ["0", "4"] {
            let Err(e) = transport_of(&["--protocol", "5", "--keepalive", short]) else {
                bail!("--protocol 5 --keepalive {short} was accepted");
            };
            assert!(
                e.contains("--protocol 5") && e.contains("--keepalive"),
                "{e}"
            );
        }
        transport_of(&["--protocol", "4", "--keepalive", "0"]).map_err(anyhow::Error::msg)?;
        transport_of(&["--protocol", "5", "--keepalive", "5"]).map_err(anyhow::Error::msg)?;
        Ok(())
    }

    #[test]
    fn keepalive_multiplier_is_checked_like_the_brokers() -> Result<()> {
        let verify = |extra: &[&str]| {
            let mut argv = vec![
                "device-sim",
                "verify",
                "--truth",
                "t",
                "--api",
                "http://x:1",
            ];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Some(Command::Verify(v)) => v.keepalive_multiplier,
                _ => f64::NAN,
            })
        };
        assert_eq!(verify(&[])?, 1.5);
        assert_eq!(verify(&["--keepalive-multiplier", "2"])?, 2.0);
        assert_eq!(verify(&["--keepalive-multiplier", "1.0"])?, 1.0);
        assert_eq!(verify(&["--keepalive-multiplier", "10"])?, 10.0);
        for bad in ["0.5", "10.5", "x", "NaN", "inf", ""] {
            let Err(e) = verify(&["--keepalive-multiplier", bad]) else {
                bail!("--keepalive-multiplier {bad:?} was accepted");
            };
            assert!(e.to_string().contains("between 1.0 and 10.0"), "{e}");
        }
        Ok(())
    }
}
