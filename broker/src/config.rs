//! Typed configuration: defaults < TOML file (`--config PATH`) < environment (`BROKER_` prefix,
//! `__` between sections, e.g. `BROKER_MQTT__LISTEN=0.0.0.0:1883`).
//!
//! Every key is documented on its field; `broker --print-config` prints the effective values.
//! Durations are written as humantime strings ("10s", "1m 30s", "250ms").
//!
//! Unknown keys in the TOML file are refused. `BROKER_*` environment variables that name no key
//! are dropped and reported ([`Loaded::ignored_env`]): Kubernetes sets `BROKER_PORT`,
//! `BROKER_SERVICE_HOST` and the like in every pod of a namespace with a Service named broker.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded. Each message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, the environment or a value could not be parsed.
    #[error("{0}")]
    Parse(#[from] config::ConfigError),
    /// A key holds a value of the wrong type or syntax.
    #[error("invalid value for `{key}`: {message}")]
    Value {
        /// The dotted key, as written in the TOML file.
        key: String,
        /// What the parser said.
        message: String,
    },
    /// A value parsed but is out of its allowed range.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The dotted key, as written in the TOML file.
        key: &'static str,
        /// What is wrong and what would be accepted.
        message: String,
    },
}

/// The whole broker configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The MQTT listener and protocol limits.
    pub mqtt: MqttConfig,
    /// The connection-event channel between the MQTT layer and the presence pipeline.
    pub events: EventsConfig,
    /// The presence store.
    pub database: DatabaseConfig,
    /// The bridge that persists presence events.
    pub bridge: BridgeConfig,
    /// This broker node.
    pub node: NodeConfig,
    /// The HTTP listener (REST API, /metrics, health).
    pub http: HttpConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Logging.
    pub log: LogConfig,
}

/// What happens to a CONNECT whose keep-alive lies outside `[min_keepalive, max_keepalive]`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeepAlivePolicy {
    /// Use the nearest bound instead (MQTT 3.1.1 cannot tell the client, so it is only logged).
    #[default]
    Clamp,
    /// Refuse the connection with CONNACK 0x02 (identifier rejected), as Mosquitto does for 3.1.1.
    Reject,
}

/// MQTT listener settings and protocol limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Address the MQTT listener binds.
    pub listen: SocketAddr,
    /// Time a new TCP connection has to deliver its CONNECT before it is closed.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest accepted packet, in bytes of "remaining length"; larger ones close the connection.
    pub max_packet_size: usize,
    /// A connection is closed when nothing was *received* for keep_alive x this multiplier.
    pub keepalive_multiplier: f64,
    /// Lowest keep-alive (seconds) accepted; 0 from a client counts as "infinite". Unset: no bound.
    pub min_keepalive: Option<u16>,
    /// Highest keep-alive (seconds) accepted; 0 from a client counts as "infinite". Unset: no bound.
    pub max_keepalive: Option<u16>,
    /// What to do with a keep-alive outside the bounds: "clamp" or "reject".
    pub keepalive_policy: KeepAlivePolicy,
    /// A connection whose pending writes make no progress for this long is closed
    /// (connection_lost); also set as TCP_USER_TIMEOUT on every socket.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Longest client identifier accepted, in bytes; longer ones get CONNACK 0x02.
    pub max_client_id_len: usize,
    /// QoS 1 and 2 messages sent to one client and not yet acknowledged.
    pub max_inflight: usize,
    /// Messages waiting for one client (connected or, for persistent sessions, away) beyond the
    /// in-flight window. Further messages are dropped and counted.
    pub max_queued_messages: usize,
    /// Longest wait between two accept attempts while the process is out of file descriptors.
    #[serde(with = "humantime_serde")]
    pub accept_backoff_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1024 * 1024,
            keepalive_multiplier: 1.5,
            min_keepalive: None,
            max_keepalive: None,
            keepalive_policy: KeepAlivePolicy::Clamp,
            write_timeout: Duration::from_secs(30),
            max_client_id_len: 256,
            max_inflight: 32,
            max_queued_messages: 1000,
            accept_backoff_max: Duration::from_secs(1),
        }
    }
}

/// The connection-event channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Events buffered between the MQTT layer and the presence pipeline. When it is full,
    /// connecting and disconnecting clients wait: events are never dropped.
    pub channel_capacity: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            channel_capacity: 8192,
        }
    }
}

/// The presence store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (embedded, the default) or `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub url: String,
    /// Connections in the pool (SQLite uses at most 2: it has one writer at a time).
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/broker.db".to_owned(),
            max_connections: 4,
        }
    }
}

/// The presence bridge.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    /// Most events in one database transaction.
    pub batch_size: usize,
    /// Longest an event waits for its batch to fill.
    #[serde(with = "humantime_serde")]
    pub batch_interval: Duration,
    /// Events kept in memory while the database is unreachable; beyond, they go to the journal.
    pub memory_capacity: usize,
    /// The append-only journal file for events the database could not take yet.
    pub journal_path: PathBuf,
    /// Longest wait between two attempts while the database is unreachable.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// A store call that takes longer counts as failed (and is retried).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// At shutdown, how long the bridge keeps trying to write before leaving the rest in the
    /// journal.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            batch_interval: Duration::from_millis(100),
            memory_capacity: 100_000,
            journal_path: PathBuf::from("data/presence.journal"),
            retry_backoff_max: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// This broker node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Stable name of this node; sessions left open by its earlier boots are closed at its
    /// next start. Defaults to the host name.
    pub id: String,
    /// How often the node records that it is alive (the time a crashed boot's sessions end).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: default_node_id(),
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

fn default_node_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "heartwire".to_owned())
}

/// The HTTP listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the REST API, /metrics, /healthz and /readyz.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long SIGINT/SIGTERM waits for connections to close and events to drain.
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(10),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable, multi-line.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// "pretty" or "json".
    pub format: LogFormat,
    /// Filter used when RUST_LOG is not set, in RUST_LOG syntax.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".to_owned(),
        }
    }
}

/// A loaded configuration, and what the loader left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// `BROKER_*` environment variables that name no configuration key, sorted. They were
    /// ignored; the caller reports them once, when logging is up.
    pub ignored_env: Vec<String>,
}

/// Prefix of the environment variables that set configuration keys.
const ENV_PREFIX: &str = "BROKER_";

/// The configuration key an environment variable sets: `BROKER_MQTT__LISTEN` -> `mqtt.listen`
/// (the mapping of the `config` crate's environment source). `None` without the prefix.
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?;
    Some(rest.to_lowercase().replace("__", "."))
}

/// Every key of the configuration, dotted (`mqtt.listen`): the leaves of the default
/// configuration, unset options included.
pub fn keys() -> BTreeSet<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            // Scalars, and null for an option that is unset by default.
            _ => {
                out.insert(prefix.to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    // Serializing plain structs of scalars into a JSON value cannot fail.
    if let Ok(tree) = serde_json::to_value(Config::default()) {
        walk("", &tree, &mut out);
    }
    out
}

impl Config {
    /// Loads defaults, then the TOML file if given, then `BROKER_*` environment variables, and
    /// validates the result. Environment variables that name no key are ignored; use
    /// [`Config::load_reporting`] to learn which.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::load_reporting(file, env).map(|loaded| loaded.config)
    }

    /// As [`Config::load_from`], also returning the `BROKER_*` environment variables that were
    /// ignored because they name no key.
    pub fn load_reporting(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, ConfigError> {
        let defaults = config::Config::try_from(&Config::default())?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = file {
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let known = keys();
        let mut ignored_env = Vec::new();
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| match env_key(k) {
                None => false,
                Some(key) if known.contains(&key) => true,
                Some(_) => {
                    ignored_env.push(k.clone());
                    false
                }
            })
            .collect();
        ignored_env.sort();
        builder = builder.add_source(
            config::Environment::with_prefix("BROKER")
                .prefix_separator("_")
                .separator("__")
                .source(Some(env)),
        );
        let config: Config =
            serde_path_to_error::deserialize(builder.build()?).map_err(|e| ConfigError::Value {
                key: e.path().to_string(),
                message: e.into_inner().to_string(),
            })?;
        config.validate()?;
        Ok(Loaded {
            config,
            ignored_env,
        })
    }

    /// Checks ranges that the types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if !(m.keepalive_multiplier.is_finite() && (1.0..=10.0).contains(&m.keepalive_multiplier)) {
            return invalid(
                "mqtt.keepalive_multiplier",
                "must be between 1.0 and 10.0 (the MQTT specification uses 1.5)",
            );
        }
        if m.connect_timeout.is_zero() {
            return invalid("mqtt.connect_timeout", "must be greater than 0");
        }
        if m.write_timeout < Duration::from_secs(1) {
            return invalid("mqtt.write_timeout", "must be at least 1s");
        }
        if m.max_packet_size < 64 || m.max_packet_size > 268_435_455 {
            return invalid(
                "mqtt.max_packet_size",
                "must be between 64 and 268435455 bytes",
            );
        }
        if let (Some(min), Some(max)) = (m.min_keepalive, m.max_keepalive) {
            if min > max {
                return invalid(
                    "mqtt.min_keepalive",
                    "must not be greater than mqtt.max_keepalive",
                );
            }
        }
        if m.min_keepalive == Some(0) {
            return invalid(
                "mqtt.min_keepalive",
                "must be at least 1 second (leave it unset for no lower bound)",
            );
        }
        if m.max_keepalive == Some(0) {
            return invalid(
                "mqtt.max_keepalive",
                "must be at least 1 second (leave it unset for no upper bound)",
            );
        }
        if m.max_client_id_len == 0 || m.max_client_id_len > 65_535 {
            return invalid("mqtt.max_client_id_len", "must be between 1 and 65535");
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            return invalid("mqtt.max_inflight", "must be between 1 and 65535");
        }
        if m.accept_backoff_max.is_zero() {
            return invalid("mqtt.accept_backoff_max", "must be greater than 0");
        }
        if self.events.channel_capacity == 0 {
            return invalid("events.channel_capacity", "must be at least 1");
        }
        let scheme = self.database.url.split(':').next().unwrap_or_default();
        if !matches!(scheme, "sqlite" | "postgres" | "postgresql") {
            return invalid(
                "database.url",
                "must start with sqlite://, postgres:// or postgresql://",
            );
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        let b = &self.bridge;
        if b.batch_size == 0 || b.batch_size > 50_000 {
            return invalid("bridge.batch_size", "must be between 1 and 50000");
        }
        if b.batch_interval.is_zero() {
            return invalid("bridge.batch_interval", "must be greater than 0");
        }
        if b.memory_capacity < b.batch_size {
            return invalid(
                "bridge.memory_capacity",
                "must be at least bridge.batch_size",
            );
        }
        if b.retry_backoff_max < Duration::from_millis(100) {
            return invalid("bridge.retry_backoff_max", "must be at least 100ms");
        }
        if b.write_timeout.is_zero() {
            return invalid("bridge.write_timeout", "must be greater than 0");
        }
        if self.node.id.is_empty() {
            return invalid("node.id", "must not be empty");
        }
        if self.node.heartbeat_interval.is_zero() {
            return invalid("node.heartbeat_interval", "must be greater than 0");
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `--print-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_from(None, env(&[])).expect("defaults load");
        assert_eq!(c, Config::default());
        assert_eq!(c.mqtt.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.mqtt.keepalive_multiplier, 1.5);
    }

    #[test]
    fn env_overrides_file_overrides_defaults() {
        let mut file = tempfile_with(
            "[mqtt]\nlisten = \"127.0.0.1:1999\"\nconnect_timeout = \"3s\"\nmax_inflight = 7\n",
        );
        file.flush().expect("flush");
        let c = Config::load_from(
            Some(file.path()),
            env(&[
                ("BROKER_MQTT__LISTEN", "127.0.0.1:2000"),
                ("BROKER_MQTT__KEEPALIVE_MULTIPLIER", "2"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .expect("load");
        assert_eq!(c.mqtt.listen.port(), 2000);
        assert_eq!(c.mqtt.connect_timeout, Duration::from_secs(3));
        assert_eq!(c.mqtt.max_inflight, 7);
        assert_eq!(c.mqtt.keepalive_multiplier, 2.0);
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = Config::load_from(None, env(&[("BROKER_MQTT__LISTEN", "not-an-address")]))
            .expect_err("bad address");
        assert!(err.to_string().contains("mqtt.listen"), "{err}");

        let err = Config::load_from(None, env(&[("BROKER_MQTT__KEEPALIVE_MULTIPLIER", "0.5")]))
            .expect_err("bad multiplier");
        assert!(
            err.to_string().contains("mqtt.keepalive_multiplier"),
            "{err}"
        );

        let err = Config::load_from(None, env(&[("BROKER_MQTT__CONNECT_TIMEOUT", "soon")]))
            .expect_err("bad duration");
        assert!(err.to_string().contains("mqtt.connect_timeout"), "{err}");
    }

    #[test]
    fn unknown_environment_keys_are_ignored_and_reported() {
        // What Kubernetes sets for a Service named broker, beside a real key and a typo.
        let loaded = Config::load_reporting(
            None,
            env(&[
                ("BROKER_SERVICE_HOST", "10.0.0.1"),
                ("BROKER_PORT", "tcp://10.0.0.1:1883"),
                ("BROKER_PORT_1883_TCP_ADDR", "10.0.0.1"),
                ("BROKER_MQTT__LISTEN", "127.0.0.1:2000"),
                ("BROKER_MQTT__LISTEN_ADDR", "127.0.0.1:1"),
                ("BROKER_MQTT", "x"),
                ("OTHER_VAR", "not ours"),
            ]),
        )
        .expect("stray BROKER_ variables do not stop the broker");
        assert_eq!(loaded.config.mqtt.listen.port(), 2000);
        assert_eq!(
            loaded.ignored_env,
            [
                "BROKER_MQTT",
                "BROKER_MQTT__LISTEN_ADDR",
                "BROKER_PORT",
                "BROKER_PORT_1883_TCP_ADDR",
                "BROKER_SERVICE_HOST",
            ]
        );
        let clean =
            Config::load_reporting(None, env(&[("BROKER_LOG__FORMAT", "json")])).expect("load");
        assert!(clean.ignored_env.is_empty());
    }

    #[test]
    fn keys_are_the_leaves_of_the_default_including_unset_options() {
        let keys = keys();
        for key in [
            "mqtt.listen",
            "mqtt.min_keepalive",
            "mqtt.max_keepalive",
            "node.id",
            "log.level",
        ] {
            assert!(keys.contains(key), "{key} missing from {keys:?}");
        }
        assert!(!keys.contains("mqtt"), "sections are not keys");
        // Every key can be set from the environment.
        let loaded = Config::load_reporting(
            None,
            env(&[
                ("BROKER_MQTT__MIN_KEEPALIVE", "5"),
                ("BROKER_MQTT__MAX_KEEPALIVE", "600"),
            ]),
        )
        .expect("load");
        assert!(loaded.ignored_env.is_empty());
        assert_eq!(
            (
                loaded.config.mqtt.min_keepalive,
                loaded.config.mqtt.max_keepalive
            ),
            (Some(5), Some(600))
        );
    }

    #[test]
    fn unknown_keys_in_file_are_refused() {
        let file = tempfile_with("[mqtt]\nlisten_addr = \"127.0.0.1:1\"\n");
        let err = Config::load_from(Some(file.path()), env(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn print_config_round_trips() {
        let c = Config::default();
        let file = tempfile_with(&c.to_toml());
        let back = Config::load_from(Some(file.path()), env(&[])).expect("reload");
        assert_eq!(back, c);
    }

    struct TempFile {
        path: std::path::PathBuf,
        file: std::fs::File,
    }
    impl TempFile {
        fn path(&self) -> &Path {
            &self.path
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
    fn tempfile_with(contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "heartwire-config-{}.toml",
            uuid::Uuid::now_v7().simple()
        ));
        let mut file = std::fs::File::create(&path).expect("create temp file");
        file.write_all(contents.as_bytes()).expect("write");
        TempFile { path, file }
    }
}
