//! Typed configuration: defaults < TOML file (`--config PATH`) < environment (`BROKER_` prefix,
//! `__` between sections, e.g. `BROKER_MQTT__LISTEN=127.0.0.1:1883`).
//!
//! Every key is documented on its field; `broker --print-config` prints the effective values.
//! Durations are written as humantime strings ("10s", "1m 30s", "250ms").
//!
//! Every key's accepted values are listed once, in [`ACCEPTS`]: a value that does not fit stops
//! the broker with a message naming the key, where the value came from and what is valid (the
//! `config` crate alone would say `u16` or silently round 1.5 to 2).
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
    /// Who may connect.
    pub auth: AuthConfig,
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
    /// Durable broker state: retained messages and persistent sessions.
    pub persistence: PersistenceConfig,
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

/// How a message to a shared subscription (`$share/{group}/{filter}`) picks the member of the
/// group that gets it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SharedStrategy {
    /// Each member in turn.
    #[default]
    RoundRobin,
    /// A member at random.
    Random,
    /// The member that the hash of the publisher's client id points to: one publisher's
    /// messages go to one member while the group does not change.
    HashClientId,
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
    /// Highest keep-alive (seconds) accepted; a client's 0 ("never time out") counts as above
    /// it, so with the default a silent connection is closed after at most 65535 s x multiplier.
    /// 0: no upper bound, and a client's 0 means its connection never times out.
    pub max_keepalive: u16,
    /// What to do with a keep-alive outside the bounds: "clamp" or "reject".
    pub keepalive_policy: KeepAlivePolicy,
    /// A connection whose pending writes make no progress for this long is closed
    /// (connection_lost); also set as TCP_USER_TIMEOUT on every socket. Formerly
    /// `mqtt.write_timeout`.
    #[serde(with = "humantime_serde")]
    pub write_stall_timeout: Duration,
    /// Longest client identifier accepted, in bytes; longer ones get CONNACK 0x02.
    pub max_client_id_len: usize,
    /// QoS 1 and 2 messages sent to one client and not yet acknowledged.
    pub max_inflight: usize,
    /// Messages waiting for one client (connected or, for persistent sessions, away) beyond the
    /// in-flight window. Further messages are dropped and counted.
    pub max_queued_messages: usize,
    /// Bytes (topics and payloads) of the messages waiting for one client, in-flight ones
    /// included. A message that would pass it is dropped and counted, unless nothing waits for
    /// the client yet (so one message of up to `max_packet_size` always fits).
    pub max_queued_bytes: usize,
    /// Bytes of the messages waiting for all clients together; beyond, messages are dropped and
    /// counted (reason memory_limit).
    pub max_queued_bytes_total: usize,
    /// Most topic levels in a topic name or filter (a PUBLISH beyond it is a protocol error, a
    /// filter beyond it gets SUBACK 0x80).
    pub max_topic_levels: usize,
    /// Most topic filters in one SUBSCRIBE that are granted; the rest get SUBACK 0x80.
    pub max_filters_per_subscribe: usize,
    /// Most subscriptions one session may hold; filters beyond it get SUBACK 0x80.
    pub max_subscriptions_per_session: usize,
    /// Most retained messages held; further new retained topics are refused (counted and logged,
    /// the message is still delivered to current subscribers).
    pub max_retained_messages: usize,
    /// Most bytes (topics and payloads) of retained messages held; a retained message that would
    /// pass it is refused, and the topic's previous retained message, if any, is cleared.
    pub max_retained_bytes: usize,
    /// Time a client has to send the rest of a packet once its first byte has arrived; a
    /// connection that takes longer is closed (connection_lost).
    #[serde(with = "humantime_serde")]
    pub packet_read_timeout: Duration,
    /// Bytes all connections together may buffer for packets larger than 4 KiB that are still
    /// arriving. A connection that would need more stops reading (TCP back-pressure) until
    /// other packets complete or time out.
    pub max_buffered_read_bytes: usize,
    /// How long a persistent session (clean_session = false) outlives its client's last
    /// connection: then its subscriptions and queued messages are discarded (counted in
    /// heartwire_sessions_expired_total and recorded in the presence history).
    #[serde(with = "humantime_serde")]
    pub persistent_session_expiry: Duration,
    /// The longest session expiry interval an MQTT 5 client gets: a longer one (or "never",
    /// 0xFFFFFFFF) is cut to this, and the CONNACK tells the client so.
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    /// How a shared subscription's group picks the member that gets a message.
    pub shared_subscription_strategy: SharedStrategy,
    /// Longest wait between two accept attempts while the process is out of file descriptors.
    #[serde(with = "humantime_serde")]
    pub accept_backoff_max: Duration,
    /// Connections the kernel holds for every MQTT listener until the accept loop takes them
    /// (the listen queue; capped by `net.core.somaxconn`). A reconnect storm that overflows it
    /// has SYNs dropped, and each such client waits a 1 s retransmission.
    pub listen_backlog: u32,
    /// Most MQTT connections open at once (past CONNECT and authentication); a CONNECT beyond
    /// gets CONNACK 0x03 (server unavailable). 0: no limit but the open-file limit.
    pub max_connections: usize,
    /// Most MQTT connections open at once from one source address (the client's, after the
    /// PROXY protocol header or a trusted proxy's X-Forwarded-For); a CONNECT beyond gets
    /// CONNACK 0x03 (server unavailable). 0: no limit.
    pub max_connections_per_address: usize,
    /// Sockets each MQTT listener accepts per second (a token bucket, as EMQX's
    /// max_conn_rate): beyond, the accept loop waits for a token and the kernel's listen
    /// backlog holds the others. 0: no limit.
    pub max_connection_rate: u64,
    /// Sockets a listener accepts at once before `max_connection_rate` applies. 0: one second's
    /// worth (the rate).
    pub connection_rate_burst: u64,
    /// PUBLISH packets per second one client may send: beyond, the broker stops reading its
    /// socket until the rate allows (TCP then slows the client; nothing is dropped). 0: no
    /// limit.
    pub max_publish_rate: u64,
    /// PUBLISH packets a client may send at once before `max_publish_rate` applies. 0: one
    /// second's worth (the rate).
    pub publish_rate_burst: u64,
    /// Topic and payload bytes per second one client may publish, enforced as
    /// `max_publish_rate` is. 0: no limit.
    pub max_publish_bytes_rate: u64,
    /// Bytes a client may publish at once before `max_publish_bytes_rate` applies. 0: one
    /// second's worth (the rate).
    pub publish_bytes_burst: u64,
    /// Flapping detection: client ids that connect too often are banned for a while.
    pub flapping: FlappingConfig,
    /// Whether every connection to `mqtt.listen` starts with a PROXY protocol header (v1 or v2,
    /// as HAProxy and cloud load balancers send it): the address it carries is recorded as the
    /// client's. A connection without a valid header is closed. Only for a listener that nothing
    /// but the balancer can reach.
    pub proxy_protocol: bool,
    /// MQTT over TLS.
    pub tls: TlsConfig,
    /// MQTT over WebSocket.
    pub ws: WsConfig,
    /// MQTT over WebSocket over TLS (the certificate and client-certificate settings of
    /// `mqtt.tls`).
    pub wss: WsConfig,
}

/// Flapping detection: a client id that connects more than `max_connects` times within
/// `window` is refused (CONNACK 0x05) for `ban_time`. EMQX's defaults are 15 in 1m, banned for
/// 5m.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FlappingConfig {
    /// Accepted CONNECTs of one client id allowed within `window`; one more bans it. 0: off.
    pub max_connects: u32,
    /// The window connects are counted in.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a flapping client id is refused.
    #[serde(with = "humantime_serde")]
    pub ban_time: Duration,
}

impl Default for FlappingConfig {
    fn default() -> Self {
        Self {
            max_connects: 0,
            window: Duration::from_secs(60),
            ban_time: Duration::from_secs(300),
        }
    }
}

/// Lowest TLS protocol version accepted.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// Which part of a verified client certificate names the device.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The subject's common name (CN), as Mosquitto's use_identity_as_username.
    #[default]
    CommonName,
    /// The first DNS name or URI of the subject alternative names.
    San,
}

/// The TLS listener, and the certificate settings that the WSS listener shares.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Address the MQTT-over-TLS listener binds (8883 by convention). Unset: no TLS listener.
    pub listen: Option<SocketAddr>,
    /// The server's certificate chain, PEM, leaf first. Required with `mqtt.tls.listen` or
    /// `mqtt.wss.listen`. Re-read on SIGHUP.
    pub cert_file: Option<PathBuf>,
    /// The certificate's private key, PEM: PKCS#8, PKCS#1 (RSA) or SEC1 (EC); RSA, ECDSA or
    /// Ed25519. Re-read on SIGHUP.
    pub key_file: Option<PathBuf>,
    /// Lowest TLS version accepted: "1.2" or "1.3".
    pub min_version: TlsVersion,
    /// CA certificates (PEM) that client certificates are verified against (mutual TLS). Unset:
    /// clients are not asked for a certificate. Re-read on SIGHUP.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client without a valid certificate is refused. False: a client may connect
    /// without one, but a certificate it presents must verify.
    pub require_client_cert: bool,
    /// What names the device in a verified client certificate: "common_name" or "san" (first
    /// DNS name or URI). Recorded as the session's identity.
    pub identity: IdentitySource,
    /// Whether connections to `mqtt.tls.listen` start with a PROXY protocol header.
    pub proxy_protocol: bool,
}

/// A WebSocket listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    /// Address the listener binds (8083 for ws, 8084 for wss by convention). Unset: none.
    pub listen: Option<SocketAddr>,
    /// The HTTP path of the WebSocket endpoint; other paths get 404.
    pub path: String,
    /// Proxies (addresses or networks such as 10.0.0.0/8) whose X-Forwarded-For header is
    /// believed: the client's address is then the last address in it that is not a trusted
    /// proxy. Empty: the header is ignored. In the environment: comma-separated.
    #[serde(deserialize_with = "networks")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether connections start with a PROXY protocol header.
    pub proxy_protocol: bool,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            listen: None,
            path: "/mqtt".to_owned(),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
        }
    }
}

/// A list of networks, from a list or from a comma-separated string (the environment); a bare
/// address is a network of one.
fn networks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Raw::Many(v) => v,
    };
    items
        .iter()
        .map(|item| parse_network(item).map_err(serde::de::Error::custom))
        .collect()
}

/// `10.0.0.0/8`, `fd00::/8` or a single address.
fn parse_network(item: &str) -> Result<ipnet::IpNet, String> {
    let item = item.trim();
    if item.contains('/') {
        item.parse::<ipnet::IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| format!("{item:?} is not a network such as 10.0.0.0/8"))
    } else {
        item.parse::<std::net::IpAddr>()
            .map(ipnet::IpNet::from)
            .map_err(|_| format!("{item:?} is not an IP address"))
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            connect_timeout: Duration::from_secs(10),
            max_packet_size: 1024 * 1024,
            keepalive_multiplier: 1.5,
            min_keepalive: None,
            max_keepalive: 65_535,
            keepalive_policy: KeepAlivePolicy::Clamp,
            write_stall_timeout: Duration::from_secs(30),
            max_client_id_len: 256,
            max_inflight: 32,
            max_queued_messages: 1000,
            max_queued_bytes: 1024 * 1024,
            max_queued_bytes_total: 256 * 1024 * 1024,
            max_topic_levels: 128,
            max_filters_per_subscribe: 1000,
            max_subscriptions_per_session: 10_000,
            max_retained_messages: 1_000_000,
            max_retained_bytes: 256 * 1024 * 1024,
            packet_read_timeout: Duration::from_secs(30),
            max_buffered_read_bytes: 64 * 1024 * 1024,
            persistent_session_expiry: Duration::from_secs(24 * 3600),
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            shared_subscription_strategy: SharedStrategy::RoundRobin,
            accept_backoff_max: Duration::from_secs(1),
            listen_backlog: 1024,
            max_connections: 0,
            max_connections_per_address: 0,
            max_connection_rate: 0,
            connection_rate_burst: 0,
            max_publish_rate: 0,
            publish_rate_burst: 0,
            max_publish_bytes_rate: 0,
            publish_bytes_burst: 0,
            flapping: FlappingConfig::default(),
            proxy_protocol: false,
            tls: TlsConfig::default(),
            ws: WsConfig::default(),
            wss: WsConfig::default(),
        }
    }
}

/// Which identity a client id must equal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientIdBinding {
    /// Any client id.
    #[default]
    None,
    /// The authenticated user name.
    Username,
    /// The identity of the verified TLS client certificate.
    Identity,
}

/// Authentication: who may connect, and as whom.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Whether a client that presents no credentials is accepted. Without any authentication
    /// configured and with every MQTT listener on a loopback address, clients are accepted
    /// anyway (local-only mode, as Mosquitto 2); a listener on another address then refuses to
    /// start unless this is true.
    pub allow_anonymous: bool,
    /// A Mosquitto-format password file (`user:$7$...` from mosquitto_passwd, or argon2id lines
    /// from `broker passwd`). Re-read on SIGHUP.
    pub password_file: Option<PathBuf>,
    /// A Mosquitto-format ACL file (`topic`, `user`, `pattern` lines with read, write,
    /// readwrite or deny). Once set, what no rule allows is denied (an empty file denies
    /// everything). Re-read on SIGHUP; connections lose what the new file no longer allows.
    pub acl_file: Option<PathBuf>,
    /// Which identity the client id must equal: "none", "username" (the authenticated user
    /// name) or "identity" (the TLS client certificate's). A client claiming another id gets
    /// CONNACK 0x05; the device connected under that id is untouched.
    pub bind_client_id: ClientIdBinding,
    /// Password hashes verified at once, off the async runtime; further CONNECTs wait their turn.
    pub max_concurrent_verifications: usize,
    /// Verified credentials remembered, so that a reconnecting device is not hashed again
    /// (0: none). Cleared when the password file is reloaded.
    pub credential_cache_size: usize,
    /// Longest delay before a refusal is answered. Refusals in a row from one address or for
    /// one client id are answered after 0, 200 ms, 400 ms, ... doubling up to this; a success
    /// or a minute without failures starts over. 0s: no delay.
    #[serde(with = "humantime_serde")]
    pub failure_delay_max: Duration,
    /// The order the credentials of a CONNECT are tried in: "password_file", "jwt",
    /// "database", each at most once and each configured. Each answers allow, deny, or not
    /// mine (then the next is asked). Empty (the default): the configured ones in that order.
    /// In the environment: comma-separated.
    #[serde(deserialize_with = "providers")]
    pub providers: Vec<AuthProvider>,
    /// JWTs in the password field.
    pub jwt: JwtConfig,
    /// Whether the presence store's `credentials` table (managed through the REST API) is a
    /// provider. Also on when `auth.providers` lists "database".
    pub database: bool,
    /// How long a credential read from the database is used before it is read again: a
    /// revoked or rotated credential keeps working on other broker nodes for up to this long
    /// (on the node that served the API call it stops at once). 0s: read on every CONNECT.
    #[serde(with = "humantime_serde")]
    pub database_cache_ttl: Duration,
}

/// One authentication provider of `auth.providers`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AuthProvider {
    /// `auth.password_file`: user name and password.
    PasswordFile,
    /// `auth.jwt`: a JWT in the password field.
    Jwt,
    /// `auth.database`: user name and password from the presence store.
    Database,
}

impl AuthProvider {
    /// Every provider, in the default order.
    pub const ALL: [AuthProvider; 3] = [
        AuthProvider::PasswordFile,
        AuthProvider::Jwt,
        AuthProvider::Database,
    ];

    /// The name used in `auth.providers`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthProvider::PasswordFile => "password_file",
            AuthProvider::Jwt => "jwt",
            AuthProvider::Database => "database",
        }
    }
}

/// A list of providers, from a list or from a comma-separated string (the environment).
fn providers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<AuthProvider>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let items = match Raw::deserialize(d)? {
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Raw::Many(v) => v,
    };
    items
        .iter()
        .map(|item| {
            AuthProvider::ALL
                .into_iter()
                .find(|p| p.as_str() == item.trim())
                .ok_or_else(|| {
                    serde::de::Error::custom(format!(
                        "{item:?} is not a provider: use password_file, jwt or database"
                    ))
                })
        })
        .collect()
}

/// The signature algorithm of `auth.jwt`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with the shared secret of `auth.jwt.secret_file`.
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    /// RSASSA-PKCS1-v1_5 SHA-256 with the RSA public key of `auth.jwt.public_key_file`.
    #[serde(rename = "RS256")]
    Rs256,
    /// ECDSA P-256 SHA-256 with the EC public key of `auth.jwt.public_key_file`.
    #[serde(rename = "ES256")]
    Es256,
}

/// JWT authentication: the token in the CONNECT's password field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// "HS256" (a shared secret), "RS256" or "ES256" (a public key). Tokens signed otherwise
    /// are refused.
    pub algorithm: JwtAlgorithm,
    /// HS256: the file holding the shared secret (its bytes, a final line break dropped).
    /// Setting it (or `public_key_file`) turns JWT authentication on. Re-read on SIGHUP.
    pub secret_file: Option<PathBuf>,
    /// RS256, ES256: the PEM file of the public key tokens are verified with. Re-read on
    /// SIGHUP.
    pub public_key_file: Option<PathBuf>,
    /// The claim that must equal the client id (else CONNACK 0x05).
    pub client_id_claim: String,
    /// Clock difference allowed when checking `exp` and `nbf` (at most 5m).
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            algorithm: JwtAlgorithm::Hs256,
            secret_file: None,
            public_key_file: None,
            client_id_claim: "clientid".to_owned(),
            leeway: Duration::from_secs(30),
        }
    }
}

impl JwtConfig {
    /// Whether JWT authentication is configured (a key file is set).
    pub fn enabled(&self) -> bool {
        self.secret_file.is_some() || self.public_key_file.is_some()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allow_anonymous: false,
            password_file: None,
            acl_file: None,
            bind_client_id: ClientIdBinding::None,
            max_concurrent_verifications: 2,
            credential_cache_size: 100_000,
            failure_delay_max: Duration::from_secs(10),
            providers: Vec::new(),
            jwt: JwtConfig::default(),
            database: false,
            database_cache_ttl: Duration::from_secs(30),
        }
    }
}

impl AuthConfig {
    /// Whether any way of authenticating a client is configured.
    pub fn has_provider(&self) -> bool {
        !self.chain().is_empty()
    }

    /// Whether `provider` is configured (its file or switch is set, or `auth.providers` lists
    /// the database).
    pub fn configures(&self, provider: AuthProvider) -> bool {
        match provider {
            AuthProvider::PasswordFile => self.password_file.is_some(),
            AuthProvider::Jwt => self.jwt.enabled(),
            AuthProvider::Database => {
                self.database || self.providers.contains(&AuthProvider::Database)
            }
        }
    }

    /// The providers in the order they are tried: `auth.providers`, or the configured ones in
    /// the default order.
    pub fn chain(&self) -> Vec<AuthProvider> {
        if self.providers.is_empty() {
            AuthProvider::ALL
                .into_iter()
                .filter(|p| self.configures(*p))
                .collect()
        } else {
            self.providers.clone()
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
    /// Connections of the bridge's pool: presence writes, the node heartbeat and history
    /// pruning. PostgreSQL only: SQLite writes through one connection (it has one writer at a
    /// time). The API reads through a pool of its own (`http.max_store_queries`).
    pub max_connections: u32,
    /// Session history rows that ended longer ago than this are deleted in the background
    /// (at most 100 years; 0 = kept forever). Open sessions are never deleted.
    #[serde(with = "humantime_serde")]
    pub history_max_age: Duration,
    /// Most session history rows kept per device; older closed ones are deleted in the
    /// background (0 = no cap, at most 1000000). A device is checked after every tenth of this
    /// many new sessions, so between passes it may hold up to 10 % more.
    pub history_max_sessions_per_device: u32,
    /// How often retention runs (1s-1d).
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// Most rows one pruning statement deletes (1-100000): retention runs as many of these
    /// short statements as it needs, so that presence writes never wait behind a long one.
    pub prune_batch_size: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://data/broker.db".to_owned(),
            max_connections: 4,
            history_max_age: Duration::from_secs(30 * 86_400),
            history_max_sessions_per_device: 1000,
            prune_interval: Duration::from_secs(60),
            prune_batch_size: 1000,
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
    /// A store call that takes longer counts as failed (and is retried). Formerly
    /// `bridge.write_timeout`.
    #[serde(with = "humantime_serde")]
    pub store_timeout: Duration,
    /// At shutdown, how long the bridge keeps trying to write before leaving the rest in the
    /// journal.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// A device's sessions that begin and end within one batch (a reconnect loop, two clients
    /// fighting over one client id) are recorded as history rows up to this many; later ones
    /// are folded into the last kept row with the same reason, whose `coalesced` count they
    /// increase (0 = a row for every session, at most 1000). The device's state stays exact.
    pub coalesce_after: usize,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            batch_interval: Duration::from_millis(100),
            memory_capacity: 100_000,
            journal_path: PathBuf::from("data/presence.journal"),
            retry_backoff_max: Duration::from_secs(5),
            store_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            coalesce_after: 3,
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
    /// HTTP connections held at once (1-65535), so that HTTP clients can never take the file
    /// descriptors MQTT needs. Beyond it the listener stops accepting: new connections wait in
    /// the kernel's listen backlog (costing the process no descriptor) until one closes.
    pub max_connections: u32,
    /// Time a request head (request line and headers) has to arrive completely, from its first
    /// byte, or from the accept for a connection's first request (100ms-10m).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A keep-alive connection without a request for this long is closed (100ms-1h). Also
    /// bounds a response that the client does not read.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest request target (path and query) accepted, bytes (64-65534); longer gets 414.
    pub max_uri_len: usize,
    /// Longest request head (request line and header fields) accepted, bytes (1024-1048576,
    /// more than `max_uri_len`); longer gets 431.
    pub max_header_size: usize,
    /// Most header fields in a request (1-1000); more gets 431.
    pub max_headers: usize,
    /// API requests that query the store at once (1-1024). The API reads through its own pool
    /// of this many connections plus two (the /stats refresh, /readyz), separate from the
    /// bridge's, so that API reads never delay presence writes. Requests beyond it wait up to
    /// `store_queue_timeout`.
    pub max_store_queries: u32,
    /// How long a request waits for one of the `max_store_queries` slots before it is answered
    /// 503 with `Retry-After` (at most 60s).
    #[serde(with = "humantime_serde")]
    pub store_queue_timeout: Duration,
    /// How long a /api/v1/stats result is reused (at most 1h; 0 = computed per request, still
    /// one query at a time): concurrent requests share one refresh.
    #[serde(with = "humantime_serde")]
    pub stats_cache_ttl: Duration,
    /// API tokens, one line per token: `NAME ROLE SHA256HEX` (role `read` or `admin`; the hex
    /// SHA-256 of the token, made with `broker token NAME ROLE`). Set: every endpoint but
    /// /healthz and /readyz needs `Authorization: Bearer TOKEN`. Re-read on SIGHUP and by
    /// `POST /api/v1/admin/reload`.
    pub api_tokens_file: Option<PathBuf>,
    /// Whether /metrics answers without a token when `api_tokens_file` is set.
    pub metrics_public: bool,
    /// Whether `listen` may be an address other machines can reach without `api_tokens_file`
    /// (then anyone who reaches it may use every endpoint, the admin ones included).
    pub allow_anonymous: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_uri_len: 8192,
            max_header_size: 16_384,
            max_headers: 64,
            max_store_queries: 4,
            store_queue_timeout: Duration::from_secs(1),
            stats_cache_ttl: Duration::from_secs(1),
            api_tokens_file: None,
            metrics_public: false,
            allow_anonymous: false,
        }
    }
}

/// How durable the broker's state is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum PersistenceMode {
    /// An acknowledgement (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK) waits until what it
    /// promises is on disk (fsync): a crash loses nothing acknowledged.
    #[default]
    Sync,
    /// Written as it comes, made durable every `persistence.sync_interval`: a crash of the
    /// machine (not of the broker alone) loses up to that interval; acknowledgements never wait.
    Interval,
    /// Kept in memory only: a restart forgets retained messages and persistent sessions.
    Off,
}

/// Durable broker state: retained messages and persistent sessions (subscriptions, queued
/// and in-flight messages) kept on disk across restarts and crashes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PersistenceConfig {
    /// "sync", "interval" or "off".
    pub mode: PersistenceMode,
    /// The directory of the state (created at first start; one broker at a time).
    pub dir: PathBuf,
    /// Sync mode: fsyncs are at least this far apart, so that under load each one commits
    /// the records of many connections (0 = as soon as the previous one is done).
    #[serde(with = "humantime_serde")]
    pub commit_window: Duration,
    /// Interval mode: how often what was written is made durable.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Bytes on disk (snapshot and logs) past which new state is refused until compaction
    /// frees space: QoS 1/2 messages for persistent sessions and retained messages (0 = no
    /// limit).
    pub max_disk: u64,
    /// A log is closed and a new one started once it holds this many bytes; compaction folds
    /// closed logs into the snapshot once they outweigh it. The next log is grown ahead to
    /// this size.
    pub segment_bytes: u64,
    /// Where backups are written (`None`: `backups` in `dir`). Best on another disk.
    pub backup_dir: Option<PathBuf>,
    /// A backup is written this often (0 = only on request, through the admin API).
    #[serde(with = "humantime_serde")]
    pub backup_interval: Duration,
    /// Scheduled backups kept: older ones are deleted after each new one (backups taken on
    /// request are kept).
    pub backup_keep: u64,
}

impl PersistenceConfig {
    /// The directory backups go to.
    pub fn backup_dir(&self) -> PathBuf {
        self.backup_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("backups"))
    }
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        Self {
            mode: PersistenceMode::Sync,
            dir: PathBuf::from("data/state"),
            commit_window: Duration::from_millis(2),
            sync_interval: Duration::from_secs(1),
            max_disk: 10 * 1024 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            backup_dir: None,
            backup_interval: Duration::ZERO,
            backup_keep: 7,
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

/// What a key accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accepts {
    /// An integer from the first to the second bound (`u64::MAX`: no upper bound).
    Whole(u64, u64),
    /// A finite number from the first to the second bound.
    Number(f64, f64),
    /// A duration in humantime syntax.
    Duration,
    /// An IP address and port; the example shown.
    Address(&'static str),
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A string, described so.
    Text(&'static str),
    /// true or false.
    Bool,
    /// A list of IP addresses or networks (a comma-separated string in the environment).
    Networks,
    /// A list of these words (a comma-separated string in the environment).
    Words(&'static [&'static str]),
}

/// Every key and what it accepts (a test keeps this in step with [`Config`]). Bounds are those
/// of [`Config::validate`], which also checks the rules that span keys.
pub const ACCEPTS: &[(&str, Accepts)] = &[
    ("mqtt.listen", Accepts::Address("127.0.0.1:1883")),
    ("mqtt.connect_timeout", Accepts::Duration),
    ("mqtt.max_packet_size", Accepts::Whole(64, 268_435_455)),
    ("mqtt.keepalive_multiplier", Accepts::Number(1.0, 10.0)),
    ("mqtt.min_keepalive", Accepts::Whole(1, 65_535)),
    ("mqtt.max_keepalive", Accepts::Whole(0, 65_535)),
    (
        "mqtt.keepalive_policy",
        Accepts::OneOf(&["clamp", "reject"]),
    ),
    ("mqtt.write_stall_timeout", Accepts::Duration),
    ("mqtt.max_client_id_len", Accepts::Whole(1, 65_535)),
    ("mqtt.max_inflight", Accepts::Whole(1, 65_535)),
    ("mqtt.max_queued_messages", Accepts::Whole(1, u64::MAX)),
    ("mqtt.max_queued_bytes", Accepts::Whole(1, u64::MAX)),
    ("mqtt.max_queued_bytes_total", Accepts::Whole(1, u64::MAX)),
    ("mqtt.max_topic_levels", Accepts::Whole(1, 1024)),
    (
        "mqtt.max_filters_per_subscribe",
        Accepts::Whole(1, u64::MAX),
    ),
    (
        "mqtt.max_subscriptions_per_session",
        Accepts::Whole(1, u64::MAX),
    ),
    ("mqtt.max_retained_messages", Accepts::Whole(0, u64::MAX)),
    ("mqtt.max_retained_bytes", Accepts::Whole(0, u64::MAX)),
    ("mqtt.packet_read_timeout", Accepts::Duration),
    ("mqtt.max_buffered_read_bytes", Accepts::Whole(64, u64::MAX)),
    ("mqtt.persistent_session_expiry", Accepts::Duration),
    ("mqtt.max_session_expiry", Accepts::Duration),
    (
        "mqtt.shared_subscription_strategy",
        Accepts::OneOf(&["round_robin", "random", "hash_client_id"]),
    ),
    ("mqtt.accept_backoff_max", Accepts::Duration),
    ("mqtt.listen_backlog", Accepts::Whole(1, 65_535)),
    ("mqtt.max_connections", Accepts::Whole(0, u64::MAX)),
    (
        "mqtt.max_connections_per_address",
        Accepts::Whole(0, u64::MAX),
    ),
    ("mqtt.max_connection_rate", Accepts::Whole(0, 1_000_000)),
    ("mqtt.connection_rate_burst", Accepts::Whole(0, 1_000_000)),
    ("mqtt.max_publish_rate", Accepts::Whole(0, 1_000_000)),
    ("mqtt.publish_rate_burst", Accepts::Whole(0, 1_000_000)),
    (
        "mqtt.max_publish_bytes_rate",
        Accepts::Whole(0, 1_000_000_000_000),
    ),
    (
        "mqtt.publish_bytes_burst",
        Accepts::Whole(0, 1_000_000_000_000),
    ),
    ("mqtt.flapping.max_connects", Accepts::Whole(0, 1_000_000)),
    ("mqtt.flapping.window", Accepts::Duration),
    ("mqtt.flapping.ban_time", Accepts::Duration),
    ("mqtt.proxy_protocol", Accepts::Bool),
    ("mqtt.tls.listen", Accepts::Address("0.0.0.0:8883")),
    (
        "mqtt.tls.cert_file",
        Accepts::Text("a file path (PEM certificate chain)"),
    ),
    (
        "mqtt.tls.key_file",
        Accepts::Text("a file path (PEM private key)"),
    ),
    ("mqtt.tls.min_version", Accepts::OneOf(&["1.2", "1.3"])),
    (
        "mqtt.tls.client_ca_file",
        Accepts::Text("a file path (PEM CA certificates)"),
    ),
    ("mqtt.tls.require_client_cert", Accepts::Bool),
    ("mqtt.tls.identity", Accepts::OneOf(&["common_name", "san"])),
    ("mqtt.tls.proxy_protocol", Accepts::Bool),
    ("mqtt.ws.listen", Accepts::Address("0.0.0.0:8083")),
    ("mqtt.ws.path", Accepts::Text("an HTTP path such as /mqtt")),
    ("mqtt.ws.trusted_proxies", Accepts::Networks),
    ("mqtt.ws.proxy_protocol", Accepts::Bool),
    ("mqtt.wss.listen", Accepts::Address("0.0.0.0:8084")),
    ("mqtt.wss.path", Accepts::Text("an HTTP path such as /mqtt")),
    ("mqtt.wss.trusted_proxies", Accepts::Networks),
    ("mqtt.wss.proxy_protocol", Accepts::Bool),
    ("auth.allow_anonymous", Accepts::Bool),
    (
        "auth.password_file",
        Accepts::Text("a file path (Mosquitto password file)"),
    ),
    (
        "auth.acl_file",
        Accepts::Text("a file path (Mosquitto ACL file)"),
    ),
    (
        "auth.bind_client_id",
        Accepts::OneOf(&["none", "username", "identity"]),
    ),
    ("auth.max_concurrent_verifications", Accepts::Whole(1, 1024)),
    ("auth.credential_cache_size", Accepts::Whole(0, u64::MAX)),
    ("auth.failure_delay_max", Accepts::Duration),
    (
        "auth.providers",
        Accepts::Words(&["password_file", "jwt", "database"]),
    ),
    (
        "auth.jwt.algorithm",
        Accepts::OneOf(&["HS256", "RS256", "ES256"]),
    ),
    (
        "auth.jwt.secret_file",
        Accepts::Text("a file path (the HS256 shared secret)"),
    ),
    (
        "auth.jwt.public_key_file",
        Accepts::Text("a file path (PEM public key, RS256 or ES256)"),
    ),
    (
        "auth.jwt.client_id_claim",
        Accepts::Text("a claim name such as clientid"),
    ),
    ("auth.jwt.leeway", Accepts::Duration),
    ("auth.database", Accepts::Bool),
    ("auth.database_cache_ttl", Accepts::Duration),
    ("events.channel_capacity", Accepts::Whole(1, u64::MAX)),
    (
        "database.url",
        Accepts::Text("a URL: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB"),
    ),
    (
        "database.max_connections",
        Accepts::Whole(1, u32::MAX as u64),
    ),
    ("database.history_max_age", Accepts::Duration),
    (
        "database.history_max_sessions_per_device",
        Accepts::Whole(0, 1_000_000),
    ),
    ("database.prune_interval", Accepts::Duration),
    ("database.prune_batch_size", Accepts::Whole(1, 100_000)),
    ("bridge.batch_size", Accepts::Whole(1, 50_000)),
    ("bridge.batch_interval", Accepts::Duration),
    ("bridge.memory_capacity", Accepts::Whole(1, u64::MAX)),
    ("bridge.journal_path", Accepts::Text("a file path")),
    ("bridge.retry_backoff_max", Accepts::Duration),
    ("bridge.store_timeout", Accepts::Duration),
    ("bridge.drain_timeout", Accepts::Duration),
    ("bridge.coalesce_after", Accepts::Whole(0, 1000)),
    ("node.id", Accepts::Text("a name such as broker-1")),
    ("node.heartbeat_interval", Accepts::Duration),
    ("http.listen", Accepts::Address("127.0.0.1:8080")),
    ("http.max_connections", Accepts::Whole(1, 65_535)),
    ("http.header_read_timeout", Accepts::Duration),
    ("http.idle_timeout", Accepts::Duration),
    ("http.max_uri_len", Accepts::Whole(64, 65_534)),
    ("http.max_header_size", Accepts::Whole(1024, 1_048_576)),
    ("http.max_headers", Accepts::Whole(1, 1000)),
    ("http.max_store_queries", Accepts::Whole(1, 1024)),
    ("http.store_queue_timeout", Accepts::Duration),
    ("http.stats_cache_ttl", Accepts::Duration),
    (
        "http.api_tokens_file",
        Accepts::Text("a file path (lines NAME ROLE SHA256HEX, made with `broker token`)"),
    ),
    ("http.metrics_public", Accepts::Bool),
    ("http.allow_anonymous", Accepts::Bool),
    (
        "persistence.mode",
        Accepts::OneOf(&["sync", "interval", "off"]),
    ),
    ("persistence.dir", Accepts::Text("a directory path")),
    ("persistence.commit_window", Accepts::Duration),
    ("persistence.sync_interval", Accepts::Duration),
    ("persistence.max_disk", Accepts::Whole(0, u64::MAX)),
    (
        "persistence.segment_bytes",
        Accepts::Whole(1024 * 1024, 1024 * 1024 * 1024),
    ),
    ("persistence.backup_dir", Accepts::Text("a directory path")),
    ("persistence.backup_interval", Accepts::Duration),
    ("persistence.backup_keep", Accepts::Whole(1, 100_000)),
    ("shutdown.grace_period", Accepts::Duration),
    ("log.format", Accepts::OneOf(&["pretty", "json"])),
    (
        "log.level",
        Accepts::Text("a log filter in RUST_LOG syntax such as info or broker=debug"),
    ),
];

impl std::fmt::Display for Accepts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Accepts::Whole(min, u64::MAX) => write!(f, "a whole number, {min} or more"),
            Accepts::Whole(min, max) => write!(f, "a whole number between {min} and {max}"),
            Accepts::Number(min, max) => write!(f, "a number between {min:?} and {max:?}"),
            Accepts::Duration => f.write_str("a duration such as 10s, 1m 30s, 250ms"),
            Accepts::Address(example) => {
                write!(
                    f,
                    "an address such as {example} (IP address and port, no host name)"
                )
            }
            Accepts::OneOf(words) => write!(f, "one of {}", words.join(", ")),
            Accepts::Text(what) => f.write_str(what),
            Accepts::Bool => f.write_str("true or false"),
            Accepts::Words(words) => write!(
                f,
                "a list of {} such as [\"{}\"] (comma-separated in the environment)",
                words.join(", "),
                words.first().copied().unwrap_or_default()
            ),
            Accepts::Networks => f.write_str(
                "a list of IP addresses or networks such as [\"10.0.0.0/8\", \"192.0.2.7\"] \
                 (comma-separated in the environment)",
            ),
        }
    }
}

impl Accepts {
    /// Whether `value`, as the TOML file or the environment (always a string) gave it, fits.
    fn fits(&self, value: &config::ValueKind) -> bool {
        use config::ValueKind as V;
        let whole =
            |n: Option<u64>, min: u64, max: u64| n.is_some_and(|n| (min..=max).contains(&n));
        let number = |x: Option<f64>, min: f64, max: f64| {
            x.is_some_and(|x| x.is_finite() && (min..=max).contains(&x))
        };
        match (*self, value) {
            // An option left unset.
            (_, V::Nil) => true,
            (Accepts::Whole(min, max), V::I64(n)) => whole(u64::try_from(*n).ok(), min, max),
            (Accepts::Whole(min, max), V::I128(n)) => whole(u64::try_from(*n).ok(), min, max),
            (Accepts::Whole(min, max), V::U64(n)) => whole(Some(*n), min, max),
            (Accepts::Whole(min, max), V::U128(n)) => whole(u64::try_from(*n).ok(), min, max),
            (Accepts::Whole(min, max), V::String(s)) => whole(s.parse().ok(), min, max),
            (Accepts::Number(min, max), V::I64(n)) => number(Some(*n as f64), min, max),
            (Accepts::Number(min, max), V::I128(n)) => number(Some(*n as f64), min, max),
            (Accepts::Number(min, max), V::U64(n)) => number(Some(*n as f64), min, max),
            (Accepts::Number(min, max), V::U128(n)) => number(Some(*n as f64), min, max),
            (Accepts::Number(min, max), V::Float(x)) => number(Some(*x), min, max),
            (Accepts::Number(min, max), V::String(s)) => number(s.parse().ok(), min, max),
            (Accepts::Duration, V::String(s)) => {
                humantime_serde::re::humantime::parse_duration(s).is_ok()
            }
            (Accepts::Address(_), V::String(s)) => s.parse::<SocketAddr>().is_ok(),
            (Accepts::OneOf(words), V::String(s)) => words.contains(&s.as_str()),
            (Accepts::Text(_), V::String(_)) => true,
            (Accepts::Bool, V::Boolean(_)) => true,
            (Accepts::Bool, V::String(s)) => s == "true" || s == "false",
            (Accepts::Networks, V::String(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .all(|s| parse_network(s).is_ok()),
            (Accepts::Words(words), V::String(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .all(|s| words.contains(&s)),
            (Accepts::Words(words), V::Array(items)) => items
                .iter()
                .all(|item| matches!(&item.kind, V::String(s) if words.contains(&s.as_str()))),
            (Accepts::Networks, V::Array(items)) => items
                .iter()
                .all(|item| matches!(&item.kind, V::String(s) if parse_network(s).is_ok())),
            _ => false,
        }
    }
}

/// The environment variable that sets `key`: `mqtt.listen` -> `BROKER_MQTT__LISTEN`.
fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_uppercase().replace('.', "__"))
}

/// `default VALUE` of a key, for messages.
fn default_of(key: &str) -> String {
    let pointer = format!("/{}", key.replace('.', "/"));
    match serde_json::to_value(Config::default())
        .ok()
        .as_ref()
        .and_then(|tree| tree.pointer(&pointer))
    {
        Some(serde_json::Value::String(s)) => format!("default {s}"),
        Some(serde_json::Value::Null) | None => "unset by default".to_owned(),
        Some(other) => format!("default {other}"),
    }
}

/// A raw value for a message: strings quoted, tables and lists named.
fn shown(value: &config::ValueKind) -> String {
    match value {
        config::ValueKind::String(s) => format!("{s:?}"),
        config::ValueKind::Table(_) => "a table".to_owned(),
        config::ValueKind::Array(_) => "a list".to_owned(),
        other => other.to_string(),
    }
}

/// Checks the merged raw values against [`ACCEPTS`] before they are converted, so that a bad
/// value is reported with what is valid (and a float or boolean is never rounded into an
/// integer). Keys the table does not know are left to `deny_unknown_fields`.
fn check_raw(
    merged: &config::Config,
    file: Option<&Path>,
    renamed_env: &[(String, &str)],
) -> Result<(), ConfigError> {
    use config::Source;
    let root = merged.collect()?;
    let from = |key: &str, value: &config::Value| match (value.origin(), file) {
        (Some("the environment"), _) => match renamed_env.iter().find(|(_, new)| *new == key) {
            Some((old_var, _)) => format!("from {old_var}"),
            None => format!("from {}", env_var(key)),
        },
        (_, Some(path)) => format!("in {}", path.display()),
        (_, None) => "from the defaults".to_owned(),
    };
    let mut sections: Vec<&str> = Vec::new();
    for (key, _) in ACCEPTS {
        let section = key.split('.').next().unwrap_or_default();
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    for section in sections {
        let Some(value) = root.get(section) else {
            continue;
        };
        let config::ValueKind::Table(table) = &value.kind else {
            let names: Vec<&str> = ACCEPTS
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(section)?.strip_prefix('.'))
                .collect();
            return Err(ConfigError::Value {
                key: section.to_owned(),
                message: format!(
                    "expected a section [{section}] with the keys {}; got {} ({})",
                    names.join(", "),
                    shown(&value.kind),
                    from(section, value)
                ),
            });
        };
        for (key, accepts) in ACCEPTS {
            let Some(name) = key.strip_prefix(section).and_then(|k| k.strip_prefix('.')) else {
                continue;
            };
            let Some(value) = lookup(table, name) else {
                continue;
            };
            if !accepts.fits(&value.kind) {
                return Err(ConfigError::Value {
                    key: (*key).to_owned(),
                    message: format!(
                        "expected {accepts} ({}); got {} ({})",
                        default_of(key),
                        shown(&value.kind),
                        from(key, value)
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The value at the dotted `name` (`tls.listen`) inside `table`.
fn lookup<'a>(
    table: &'a config::Map<String, config::Value>,
    name: &str,
) -> Option<&'a config::Value> {
    let (first, rest) = match name.split_once('.') {
        Some((first, rest)) => (first, Some(rest)),
        None => (name, None),
    };
    let value = table.get(first)?;
    match (rest, &value.kind) {
        (None, _) => Some(value),
        (Some(rest), config::ValueKind::Table(inner)) => lookup(inner, rest),
        (Some(_), _) => None,
    }
}

/// Keys renamed since an earlier version, as (old, new): the old name still sets the key (a
/// serde alias) and is reported once at start.
pub const RENAMED: &[(&str, &str)] = &[
    ("mqtt.write_timeout", "mqtt.write_stall_timeout"),
    ("bridge.write_timeout", "bridge.store_timeout"),
];

/// The TOML file with the old names of [`RENAMED`] keys replaced by the new ones, and the old
/// names found; `None` when it uses no old name (it is then read as it is).
fn renamed_in_file(path: &Path) -> Result<Option<(String, Vec<&'static str>)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Value {
        key: path.display().to_string(),
        message: format!("cannot read the configuration file: {e}"),
    })?;
    let Ok(mut table) = text.parse::<toml::Table>() else {
        // Malformed: the config crate reports it, naming the file.
        return Ok(None);
    };
    let mut found = Vec::new();
    for (old, new) in RENAMED {
        let (section, old_name) = old.split_once('.').unwrap_or(("", old));
        let new_name = new.split_once('.').map_or(*new, |(_, n)| n);
        if let Some(toml::Value::Table(keys)) = table.get_mut(section) {
            if let Some(value) = keys.remove(old_name) {
                keys.entry(new_name).or_insert(value);
                found.push(*old);
            }
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    Ok(Some((table.to_string(), found)))
}

/// A loaded configuration, and what the loader left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The effective configuration.
    pub config: Config,
    /// `BROKER_*` environment variables that name no configuration key, sorted. They were
    /// ignored; the caller reports them once, when logging is up.
    pub ignored_env: Vec<String>,
    /// Old names of [`RENAMED`] keys that were used (in the file or the environment), sorted;
    /// the caller reports them once, when logging is up.
    pub renamed: Vec<&'static str>,
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
        let mut renamed = Vec::new();
        if let Some(path) = file {
            match renamed_in_file(path)? {
                // Old key names are rewritten to the new ones before anything reads them.
                Some((text, old)) => {
                    renamed.extend(old);
                    builder =
                        builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
                }
                None => {
                    builder = builder.add_source(
                        config::File::from(path)
                            .format(config::FileFormat::Toml)
                            .required(true),
                    );
                }
            }
        }
        let known = keys();
        let mut ignored_env = Vec::new();
        let mut renamed_env = Vec::new();
        let env: config::Map<String, String> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let key = env_key(&k)?;
                if let Some((old, new)) = RENAMED.iter().find(|(old, _)| *old == key) {
                    renamed.push(*old);
                    renamed_env.push((k, *new));
                    return Some((env_var(new), v));
                }
                if known.contains(&key) {
                    Some((k, v))
                } else {
                    ignored_env.push(k);
                    None
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
        renamed.sort_unstable();
        renamed.dedup();
        let merged = builder.build()?;
        check_raw(&merged, file, &renamed_env)?;
        let config: Config =
            serde_path_to_error::deserialize(merged).map_err(|e| ConfigError::Value {
                key: e.path().to_string(),
                message: e.into_inner().to_string(),
            })?;
        config.validate()?;
        Ok(Loaded {
            config,
            ignored_env,
            renamed,
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
        if m.write_stall_timeout < Duration::from_secs(1) {
            return invalid("mqtt.write_stall_timeout", "must be at least 1s");
        }
        if m.max_packet_size < 64 || m.max_packet_size > 268_435_455 {
            return invalid(
                "mqtt.max_packet_size",
                "must be between 64 and 268435455 bytes",
            );
        }
        if let Some(min) = m.min_keepalive.filter(|_| m.max_keepalive != 0) {
            if min > m.max_keepalive {
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
        if m.max_client_id_len == 0 || m.max_client_id_len > 65_535 {
            return invalid("mqtt.max_client_id_len", "must be between 1 and 65535");
        }
        if !(1..=65_535).contains(&m.listen_backlog) {
            return invalid("mqtt.listen_backlog", "must be between 1 and 65535");
        }
        if m.max_inflight == 0 || m.max_inflight > 65_535 {
            return invalid("mqtt.max_inflight", "must be between 1 and 65535");
        }
        if m.max_queued_messages == 0 {
            return invalid("mqtt.max_queued_messages", "must be at least 1");
        }
        if m.max_queued_bytes == 0 {
            return invalid("mqtt.max_queued_bytes", "must be at least 1");
        }
        if m.max_queued_bytes_total < m.max_queued_bytes {
            return invalid(
                "mqtt.max_queued_bytes_total",
                "must be at least mqtt.max_queued_bytes",
            );
        }
        if m.max_topic_levels == 0 || m.max_topic_levels > 1024 {
            return invalid("mqtt.max_topic_levels", "must be between 1 and 1024");
        }
        if m.max_filters_per_subscribe == 0 {
            return invalid("mqtt.max_filters_per_subscribe", "must be at least 1");
        }
        if m.max_subscriptions_per_session == 0 {
            return invalid("mqtt.max_subscriptions_per_session", "must be at least 1");
        }
        if m.packet_read_timeout < Duration::from_secs(1) {
            return invalid("mqtt.packet_read_timeout", "must be at least 1s");
        }
        if m.max_buffered_read_bytes < m.max_packet_size {
            return invalid(
                "mqtt.max_buffered_read_bytes",
                "must be at least mqtt.max_packet_size",
            );
        }
        if m.persistent_session_expiry < Duration::from_secs(1) {
            return invalid(
                "mqtt.persistent_session_expiry",
                "must be at least 1s (use a long time such as 365d to keep sessions practically for ever)",
            );
        }
        if m.max_session_expiry < Duration::from_secs(1)
            || m.max_session_expiry > Duration::from_secs(u64::from(u32::MAX - 1))
        {
            return invalid(
                "mqtt.max_session_expiry",
                "must be between 1s and 4294967294s (about 136 years)",
            );
        }
        if m.accept_backoff_max.is_zero() {
            return invalid("mqtt.accept_backoff_max", "must be greater than 0");
        }
        self.validate_limits()?;
        self.validate_transports()?;
        self.validate_auth()?;
        self.validate_persistence()?;
        if self.events.channel_capacity == 0 {
            return invalid("events.channel_capacity", "must be at least 1");
        }
        if crate::database_url::Backend::of_url(&self.database.url).is_none() {
            return invalid(
                "database.url",
                "must start with sqlite://, postgres:// or postgresql://",
            );
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        let d = &self.database;
        if d.history_max_age > Duration::from_secs(100 * 365 * 86_400) {
            return invalid(
                "database.history_max_age",
                "must be at most 100 years (0 keeps history forever)",
            );
        }
        if d.history_max_sessions_per_device > 1_000_000 {
            return invalid(
                "database.history_max_sessions_per_device",
                "must be between 0 (no cap) and 1000000",
            );
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&d.prune_interval) {
            return invalid("database.prune_interval", "must be between 1s and 1d");
        }
        if !(1..=100_000).contains(&d.prune_batch_size) {
            return invalid("database.prune_batch_size", "must be between 1 and 100000");
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
        if b.store_timeout.is_zero() {
            return invalid("bridge.store_timeout", "must be greater than 0");
        }
        if b.coalesce_after > 1000 {
            return invalid(
                "bridge.coalesce_after",
                "must be between 0 (a row for every session) and 1000",
            );
        }
        if self.node.id.is_empty() {
            return invalid("node.id", "must not be empty");
        }
        if self.node.heartbeat_interval.is_zero() {
            return invalid("node.heartbeat_interval", "must be greater than 0");
        }
        self.validate_http()?;
        Ok(())
    }

    /// The rate limits and flapping detection.
    fn validate_persistence(&self) -> Result<(), ConfigError> {
        let p = &self.persistence;
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if p.dir.as_os_str().is_empty() {
            return invalid("persistence.dir", "must be a directory path");
        }
        if p.commit_window > Duration::from_secs(1) {
            return invalid(
                "persistence.commit_window",
                "must be at most 1s (every acknowledgement may wait this long; a few ms is usual)",
            );
        }
        if p.sync_interval.is_zero() || p.sync_interval > Duration::from_secs(3600) {
            return invalid("persistence.sync_interval", "must be between 1ms and 1h");
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&p.segment_bytes) {
            return invalid(
                "persistence.segment_bytes",
                "must be between 1048576 (1 MiB) and 1073741824 (1 GiB)",
            );
        }
        if p.backup_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return invalid("persistence.backup_dir", "must be a directory path");
        }
        if !p.backup_interval.is_zero() && p.backup_interval < Duration::from_secs(1) {
            return invalid(
                "persistence.backup_interval",
                "must be 0 (backups on request only) or at least 1s",
            );
        }
        if !(1..=100_000).contains(&p.backup_keep) {
            return invalid("persistence.backup_keep", "must be between 1 and 100000");
        }
        if p.max_disk != 0 && p.max_disk < 2 * p.segment_bytes {
            return invalid(
                "persistence.max_disk",
                "must be 0 (no limit) or at least twice persistence.segment_bytes",
            );
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        let rates = [
            (
                "mqtt.max_connection_rate",
                m.max_connection_rate,
                "mqtt.connection_rate_burst",
                m.connection_rate_burst,
                1_000_000,
            ),
            (
                "mqtt.max_publish_rate",
                m.max_publish_rate,
                "mqtt.publish_rate_burst",
                m.publish_rate_burst,
                1_000_000,
            ),
            (
                "mqtt.max_publish_bytes_rate",
                m.max_publish_bytes_rate,
                "mqtt.publish_bytes_burst",
                m.publish_bytes_burst,
                1_000_000_000_000,
            ),
        ];
        for (rate_key, rate, burst_key, burst, max) in rates {
            if rate > max {
                return Err(ConfigError::Invalid {
                    key: rate_key,
                    message: format!("must be between 0 (no limit) and {max}"),
                });
            }
            if burst > max {
                return Err(ConfigError::Invalid {
                    key: burst_key,
                    message: format!("must be between 0 (the rate) and {max}"),
                });
            }
        }
        let f = &m.flapping;
        if f.max_connects > 1_000_000 {
            return invalid(
                "mqtt.flapping.max_connects",
                "must be between 0 (off) and 1000000 (EMQX uses 15)",
            );
        }
        if f.max_connects > 0 {
            if !(Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&f.window) {
                return invalid(
                    "mqtt.flapping.window",
                    "must be between 1s and 1d (EMQX uses 1m)",
                );
            }
            if !(Duration::from_secs(1)..=Duration::from_secs(30 * 86_400)).contains(&f.ban_time) {
                return invalid(
                    "mqtt.flapping.ban_time",
                    "must be between 1s and 30d (EMQX uses 5m)",
                );
            }
        }
        Ok(())
    }

    /// The TLS and WebSocket listeners: what each needs, and no two on one address.
    fn validate_transports(&self) -> Result<(), ConfigError> {
        let m = &self.mqtt;
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let tls_needed = m.tls.listen.is_some() || m.wss.listen.is_some();
        if tls_needed {
            let needs = if m.tls.listen.is_some() {
                "mqtt.tls.listen"
            } else {
                "mqtt.wss.listen"
            };
            if m.tls.cert_file.is_none() {
                return invalid(
                    "mqtt.tls.cert_file",
                    format!("must be set (a PEM certificate chain) when {needs} is set"),
                );
            }
            if m.tls.key_file.is_none() {
                return invalid(
                    "mqtt.tls.key_file",
                    format!("must be set (the certificate's PEM private key) when {needs} is set"),
                );
            }
        }
        if m.tls.require_client_cert && m.tls.client_ca_file.is_none() {
            return invalid(
                "mqtt.tls.require_client_cert",
                "needs mqtt.tls.client_ca_file (the CA that signs the client certificates)"
                    .to_owned(),
            );
        }
        for (key, ws) in [("mqtt.ws.path", &m.ws), ("mqtt.wss.path", &m.wss)] {
            if !ws.path.starts_with('/') || ws.path.chars().any(|c| c.is_whitespace() || c == '?') {
                return invalid(
                    key,
                    format!(
                        "must be an HTTP path starting with / (no spaces, no query), such as \
                         /mqtt; got {:?}",
                        ws.path
                    ),
                );
            }
        }
        let listeners = [
            ("mqtt.listen", Some(m.listen)),
            ("mqtt.tls.listen", m.tls.listen),
            ("mqtt.ws.listen", m.ws.listen),
            ("mqtt.wss.listen", m.wss.listen),
            ("http.listen", Some(self.http.listen)),
        ];
        for (i, (key, addr)) in listeners.iter().enumerate() {
            let Some(addr) = addr.filter(|a| a.port() != 0) else {
                continue;
            };
            if let Some((other, _)) = listeners[..i]
                .iter()
                .find(|(_, a)| a.is_some_and(|a| a.port() == addr.port() && a.ip() == addr.ip()))
            {
                return invalid(
                    key,
                    format!("{addr} is also {other}: each listener needs an address of its own"),
                );
            }
        }
        Ok(())
    }

    /// Secure by default: an MQTT listener that other machines can reach needs authentication,
    /// or `auth.allow_anonymous = true` saying that anyone may connect.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if !(1..=1024).contains(&a.max_concurrent_verifications) {
            return Err(ConfigError::Invalid {
                key: "auth.max_concurrent_verifications",
                message: "must be between 1 and 1024".to_owned(),
            });
        }
        if a.failure_delay_max > Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                key: "auth.failure_delay_max",
                message: "must be at most 60s (0s: refusals are answered at once)".to_owned(),
            });
        }
        if a.bind_client_id == ClientIdBinding::Username
            && !a.configures(AuthProvider::PasswordFile)
            && !a.configures(AuthProvider::Database)
        {
            return Err(ConfigError::Invalid {
                key: "auth.bind_client_id",
                message: "\"username\" needs auth.password_file or auth.database (user names \
                          are not verified without one)"
                    .to_owned(),
            });
        }
        self.validate_providers()?;
        if a.bind_client_id == ClientIdBinding::Identity && self.mqtt.tls.client_ca_file.is_none() {
            return Err(ConfigError::Invalid {
                key: "auth.bind_client_id",
                message: "\"identity\" needs mqtt.tls.client_ca_file (client certificates)"
                    .to_owned(),
            });
        }
        if a.allow_anonymous || a.has_provider() {
            return Ok(());
        }
        let m = &self.mqtt;
        // A TLS listener that requires client certificates authenticates by itself.
        let certified = m.tls.require_client_cert;
        let listeners = [
            ("mqtt.listen", Some(m.listen)),
            ("mqtt.tls.listen", m.tls.listen.filter(|_| !certified)),
            ("mqtt.ws.listen", m.ws.listen),
            ("mqtt.wss.listen", m.wss.listen.filter(|_| !certified)),
        ];
        for (key, addr) in listeners {
            if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "{addr} is reachable from other machines and no authentication is \
                         configured: set auth.password_file, auth.jwt.secret_file, \
                         auth.jwt.public_key_file or auth.database, or set \
                         auth.allow_anonymous = true \
                         to let anyone connect (or listen on a loopback address such as \
                         127.0.0.1)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// `auth.providers` and `auth.jwt`: each listed provider configured and listed once, each
    /// configured one listed, and the JWT key that the algorithm needs.
    fn validate_providers(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        for (i, provider) in a.providers.iter().enumerate() {
            if a.providers[..i].contains(provider) {
                return invalid(
                    "auth.providers",
                    format!(
                        "lists {} twice: each of password_file, jwt, database at most once",
                        provider.as_str()
                    ),
                );
            }
            let needs = match provider {
                AuthProvider::PasswordFile => "auth.password_file",
                AuthProvider::Jwt => "auth.jwt.secret_file or auth.jwt.public_key_file",
                AuthProvider::Database => "",
            };
            if !a.configures(*provider) {
                return invalid(
                    "auth.providers",
                    format!("lists {} but {needs} is not set", provider.as_str()),
                );
            }
        }
        if !a.providers.is_empty() {
            if let Some(missing) = AuthProvider::ALL
                .into_iter()
                .find(|p| a.configures(*p) && !a.providers.contains(p))
            {
                return invalid(
                    "auth.providers",
                    format!(
                        "does not list {}, which is configured: add it (valid: password_file, \
                         jwt, database) or remove its configuration",
                        missing.as_str()
                    ),
                );
            }
        }
        let j = &a.jwt;
        if j.enabled() {
            match j.algorithm {
                JwtAlgorithm::Hs256 if j.secret_file.is_none() => {
                    return invalid(
                        "auth.jwt.secret_file",
                        "must be set with auth.jwt.algorithm = \"HS256\" (or choose RS256 or \
                         ES256 for auth.jwt.public_key_file)"
                            .to_owned(),
                    );
                }
                JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 if j.public_key_file.is_none() => {
                    return invalid(
                        "auth.jwt.public_key_file",
                        "must be set with auth.jwt.algorithm = \"RS256\" or \"ES256\" (or \
                         choose HS256 for auth.jwt.secret_file)"
                            .to_owned(),
                    );
                }
                _ => {}
            }
            if j.secret_file.is_some() && j.public_key_file.is_some() {
                return invalid(
                    "auth.jwt.secret_file",
                    "set either auth.jwt.secret_file (HS256) or auth.jwt.public_key_file \
                     (RS256, ES256), not both"
                        .to_owned(),
                );
            }
            if j.client_id_claim.is_empty() {
                return invalid(
                    "auth.jwt.client_id_claim",
                    "must name a claim, such as clientid".to_owned(),
                );
            }
        }
        if j.leeway > Duration::from_secs(300) {
            return invalid("auth.jwt.leeway", "must be at most 5m".to_owned());
        }
        if a.database_cache_ttl > Duration::from_secs(3600) {
            return invalid(
                "auth.database_cache_ttl",
                "must be at most 1h (0s: the database is read on every CONNECT)".to_owned(),
            );
        }
        Ok(())
    }

    /// The `http` section's ranges.
    fn validate_http(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_owned(),
            })
        };
        if !(1..=65_535).contains(&h.max_connections) {
            return invalid("http.max_connections", "must be between 1 and 65535");
        }
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(600));
        if !(min..=max).contains(&h.header_read_timeout) {
            return invalid("http.header_read_timeout", "must be between 100ms and 10m");
        }
        let max = Duration::from_secs(3600);
        if !(min..=max).contains(&h.idle_timeout) {
            return invalid("http.idle_timeout", "must be between 100ms and 1h");
        }
        if !(64..=65_534).contains(&h.max_uri_len) {
            return invalid("http.max_uri_len", "must be between 64 and 65534 bytes");
        }
        if !(1024..=1_048_576).contains(&h.max_header_size) {
            return invalid(
                "http.max_header_size",
                "must be between 1024 and 1048576 bytes",
            );
        }
        if h.max_header_size <= h.max_uri_len {
            return invalid(
                "http.max_header_size",
                "must be greater than http.max_uri_len (the request line is part of the head)",
            );
        }
        if !(1..=1000).contains(&h.max_headers) {
            return invalid("http.max_headers", "must be between 1 and 1000");
        }
        if !(1..=1024).contains(&h.max_store_queries) {
            return invalid("http.max_store_queries", "must be between 1 and 1024");
        }
        if h.store_queue_timeout > Duration::from_secs(60) {
            return invalid("http.store_queue_timeout", "must be between 0s and 60s");
        }
        if h.stats_cache_ttl > Duration::from_secs(3600) {
            return invalid("http.stats_cache_ttl", "must be between 0s and 1h");
        }
        // Secure by default, as for MQTT (`validate_auth`): an API that other machines can
        // reach needs tokens, or `http.allow_anonymous = true` saying that anyone may use it.
        if !h.listen.ip().is_loopback() && h.api_tokens_file.is_none() && !h.allow_anonymous {
            return Err(ConfigError::Invalid {
                key: "http.listen",
                message: format!(
                    "{} is reachable from other machines and the API is not protected: set \
                     http.api_tokens_file (tokens made with `broker token NAME ROLE`), or set \
                     http.allow_anonymous = true to let anyone use it, admin endpoints included \
                     (or listen on a loopback address such as 127.0.0.1)",
                    h.listen
                ),
            });
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

    /// Each `(key, value)` is refused with a message naming the key.
    fn refused(cases: &[(&str, &str)]) {
        for (key, value) in cases {
            let var = format!("BROKER_{}", key.to_uppercase().replace('.', "__"));
            let err = Config::load_from(None, env(&[(&var, value)])).expect_err(key);
            assert!(err.to_string().contains(key), "{key}={value}: {err}");
        }
    }

    #[test]
    fn persistence_settings_are_checked() {
        refused(&[
            ("persistence.mode", "always"),
            ("persistence.dir", ""),
            ("persistence.commit_window", "2s"),
            ("persistence.sync_interval", "0s"),
            ("persistence.segment_bytes", "1000"),
            ("persistence.max_disk", "1000"),
            ("persistence.backup_dir", ""),
            ("persistence.backup_interval", "300ms"),
            ("persistence.backup_interval", "daily"),
            ("persistence.backup_keep", "0"),
        ]);
        let c = Config::load_from(
            None,
            env(&[
                ("BROKER_PERSISTENCE__DIR", "/var/lib/heartwire"),
                ("BROKER_PERSISTENCE__BACKUP_INTERVAL", "1h"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            c.persistence.backup_dir(),
            std::path::Path::new("/var/lib/heartwire/backups")
        );
        assert_eq!(c.persistence.backup_interval, Duration::from_secs(3600));
    }

    #[test]
    fn rate_limits_and_flapping_are_checked() {
        refused(&[
            ("mqtt.max_connection_rate", "2000000"),
            ("mqtt.connection_rate_burst", "-1"),
            ("mqtt.max_publish_rate", "1.5"),
            ("mqtt.publish_rate_burst", "lots"),
            ("mqtt.max_publish_bytes_rate", "2000000000000"),
            ("mqtt.max_connections_per_address", "-3"),
            ("mqtt.flapping.max_connects", "2000000"),
            ("mqtt.flapping.window", "soon"),
        ]);
        let flapping = |window: &str, ban: &str| {
            Config::load_from(
                None,
                env(&[
                    ("BROKER_MQTT__FLAPPING__MAX_CONNECTS", "15"),
                    ("BROKER_MQTT__FLAPPING__WINDOW", window),
                    ("BROKER_MQTT__FLAPPING__BAN_TIME", ban),
                ]),
            )
        };
        let c = flapping("1m", "5m").expect("EMQX's values");
        assert_eq!(c.mqtt.flapping.max_connects, 15);
        assert_eq!(c.mqtt.flapping.ban_time, Duration::from_secs(300));
        let err = flapping("0s", "5m").expect_err("empty window");
        assert!(err.to_string().contains("mqtt.flapping.window"), "{err}");
        let err = flapping("1m", "100d").expect_err("ban too long");
        assert!(err.to_string().contains("mqtt.flapping.ban_time"), "{err}");
        let c = Config::load_from(
            None,
            env(&[
                ("BROKER_MQTT__MAX_PUBLISH_RATE", "100"),
                ("BROKER_MQTT__PUBLISH_BYTES_BURST", "65536"),
                ("BROKER_MQTT__MAX_CONNECTIONS_PER_ADDRESS", "10"),
            ]),
        )
        .expect("load");
        assert_eq!(c.mqtt.max_publish_rate, 100);
        assert_eq!(c.mqtt.publish_bytes_burst, 65_536);
        assert_eq!(c.mqtt.max_connections_per_address, 10);
    }

    #[test]
    fn http_limits_are_checked() {
        refused(&[
            ("http.max_connections", "0"),
            ("http.max_connections", "70000"),
            ("http.header_read_timeout", "0s"),
            ("http.header_read_timeout", "1h"),
            ("http.idle_timeout", "10ms"),
            ("http.idle_timeout", "2h"),
            ("http.max_uri_len", "10"),
            ("http.max_uri_len", "70000"),
            ("http.max_header_size", "100"),
            ("http.max_header_size", "2000000"),
            ("http.max_headers", "0"),
            ("http.max_headers", "5000"),
            ("http.max_store_queries", "0"),
            ("http.max_store_queries", "5000"),
            ("http.store_queue_timeout", "2m"),
            ("http.stats_cache_ttl", "2h"),
        ]);
        let c = Config::load_from(None, env(&[("BROKER_HTTP__STATS_CACHE_TTL", "0s")]))
            .expect("a TTL of 0 is valid");
        assert_eq!(c.http.stats_cache_ttl, Duration::ZERO);
        let err = Config::load_from(
            None,
            env(&[
                ("BROKER_HTTP__MAX_URI_LEN", "4096"),
                ("BROKER_HTTP__MAX_HEADER_SIZE", "4096"),
            ]),
        )
        .expect_err("head not larger than the URI");
        assert!(err.to_string().contains("http.max_uri_len"), "{err}");
    }

    #[test]
    fn history_bounds_are_checked() {
        refused(&[
            ("database.history_max_age", "200years"),
            ("database.history_max_sessions_per_device", "2000000"),
            ("database.prune_interval", "10ms"),
            ("database.prune_interval", "2days"),
            ("database.prune_batch_size", "0"),
            ("database.prune_batch_size", "1000000"),
            ("bridge.coalesce_after", "5000"),
        ]);
        let c = Config::load_from(
            None,
            env(&[
                ("BROKER_DATABASE__HISTORY_MAX_AGE", "0s"),
                ("BROKER_DATABASE__HISTORY_MAX_SESSIONS_PER_DEVICE", "0"),
                ("BROKER_BRIDGE__COALESCE_AFTER", "0"),
            ]),
        )
        .expect("0 disables each");
        assert_eq!(c.database.history_max_age, Duration::ZERO);
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
            (Some(5), 600)
        );
    }

    /// Internal names that must not reach an operator.
    const INTERNAL: &[&str] = &[
        "u16",
        "u32",
        "u64",
        "usize",
        "f64",
        "SocketAddr",
        "socket address syntax",
        "struct ",
        "enum ",
        "variant constructor",
        "bit integer",
        "floating point",
    ];

    #[test]
    fn bad_values_name_the_key_the_source_and_what_is_valid() {
        const WHOLE: &str = "expected a whole number between 1 and 65535";
        const NUMBER: &str = "expected a number between 1.0 and 10.0";
        const DURATION: &str = "expected a duration such as 10s, 1m 30s, 250ms";
        const MQTT_ADDRESS: &str = "expected an address such as 127.0.0.1:1883";
        // (variable=value, what the message must say); the key is the variable's.
        let cases: &[(&str, &str)] = &[
            ("BROKER_LOG__FORMAT=xml", "expected one of pretty, json"),
            (
                "BROKER_MQTT__KEEPALIVE_POLICY=drop",
                "expected one of clamp, reject",
            ),
            ("BROKER_MQTT__MAX_INFLIGHT=ten", WHOLE),
            ("BROKER_MQTT__MAX_INFLIGHT=-1", WHOLE),
            ("BROKER_MQTT__MAX_INFLIGHT=2.5", WHOLE),
            ("BROKER_MQTT__MAX_INFLIGHT=99999999999999999999999", WHOLE),
            ("BROKER_MQTT__MIN_KEEPALIVE=70000", WHOLE),
            (
                "BROKER_MQTT__MAX_KEEPALIVE=-5",
                "expected a whole number between 0 and 65535",
            ),
            (
                "BROKER_DATABASE__MAX_CONNECTIONS=5000000000",
                "expected a whole number between 1 and 4294967295",
            ),
            (
                "BROKER_EVENTS__CHANNEL_CAPACITY=lots",
                "expected a whole number, 1 or more",
            ),
            ("BROKER_MQTT__KEEPALIVE_MULTIPLIER=yes", NUMBER),
            ("BROKER_MQTT__KEEPALIVE_MULTIPLIER=NaN", NUMBER),
            ("BROKER_MQTT__CONNECT_TIMEOUT=soon", DURATION),
            ("BROKER_MQTT__CONNECT_TIMEOUT=10", DURATION),
            ("BROKER_BRIDGE__STORE_TIMEOUT=-1s", DURATION),
            ("BROKER_MQTT__LISTEN=not-an-address", MQTT_ADDRESS),
            ("BROKER_MQTT__LISTEN=localhost:1883", MQTT_ADDRESS),
            (
                "BROKER_HTTP__LISTEN=8080",
                "expected an address such as 127.0.0.1:8080",
            ),
        ];
        for (case, want) in cases {
            let (var, value) = case.split_once('=').expect("VAR=value");
            let key = env_key(var).expect("a BROKER_ variable");
            let err = Config::load_from(None, env(&[(var, value)]))
                .expect_err(&format!("{case} is refused"))
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{case}: {err}");
            assert!(err.contains(want), "{case}: want {want:?} in: {err}");
            assert!(err.contains(var), "{case}: the variable is named: {err}");
            for name in INTERNAL {
                assert!(!err.contains(name), "{case}: internal {name:?} in: {err}");
            }
        }

        // (TOML file, key, what the message must say)
        let files: &[(&str, &str, &str)] = &[
            ("[mqtt]\nmax_inflight = \"ten\"", "mqtt.max_inflight", WHOLE),
            ("[mqtt]\nmax_inflight = -3", "mqtt.max_inflight", WHOLE),
            ("[mqtt]\nmax_inflight = 1.5", "mqtt.max_inflight", WHOLE),
            ("[mqtt]\nmax_inflight = true", "mqtt.max_inflight", WHOLE),
            (
                "[mqtt]\nmax_inflight = { a = 1 }",
                "mqtt.max_inflight",
                WHOLE,
            ),
            ("[mqtt]\nlisten = 1883", "mqtt.listen", MQTT_ADDRESS),
            (
                "[mqtt]\nconnect_timeout = 10",
                "mqtt.connect_timeout",
                DURATION,
            ),
            (
                "[mqtt]\nkeepalive_multiplier = true",
                "mqtt.keepalive_multiplier",
                NUMBER,
            ),
            (
                "[mqtt]\nkeepalive_multiplier = \"x\"",
                "mqtt.keepalive_multiplier",
                NUMBER,
            ),
            (
                "[log]\nformat = 1",
                "log.format",
                "expected one of pretty, json",
            ),
            (
                "[log]\nformat = \"JSON\"",
                "log.format",
                "expected one of pretty, json",
            ),
            ("[log]\nlevel = 3", "log.level", "expected a log filter"),
            ("[database]\nurl = [1]", "database.url", "expected a URL"),
            ("[node]\nid = 7", "node.id", "expected a name"),
            (
                "mqtt = 3",
                "mqtt",
                "expected a section [mqtt] with the keys listen, ",
            ),
        ];
        for (text, key, want) in files {
            let file = tempfile_with(&format!("{text}\n"));
            let err = Config::load_from(Some(file.path()), env(&[]))
                .expect_err(&format!("{text:?} is refused"))
                .to_string();
            assert!(err.contains(&format!("`{key}`")), "{text:?}: {err}");
            assert!(err.contains(want), "{text:?}: want {want:?} in: {err}");
            let name = file.path().display().to_string();
            assert!(err.contains(&name), "{text:?}: the file is named: {err}");
            // The file's random name may contain "f64" among its random characters.
            let message = err.replace(&name, "");
            for internal in INTERNAL {
                assert!(
                    !message.contains(internal),
                    "{text:?}: internal {internal:?} in: {err}"
                );
            }
        }
    }

    #[test]
    fn every_key_says_what_it_accepts() {
        let table: BTreeSet<String> = ACCEPTS.iter().map(|(k, _)| (*k).to_owned()).collect();
        assert_eq!(
            table,
            keys(),
            "ACCEPTS must list every configuration key, and only those"
        );
        // Every word of a OneOf deserializes, and the defaults fit (they load).
        for (key, accepts) in ACCEPTS {
            if let Accepts::OneOf(words) | Accepts::Words(words) = accepts {
                for word in *words {
                    match Config::load_from(None, env(&[(&env_var(key), word)])) {
                        // Parsed; refused by a rule spanning keys (bind_client_id = "username"
                        // needs a password file), which names its key.
                        Ok(_) | Err(ConfigError::Invalid { .. }) => {}
                        Err(e) => panic!("{key} = {word}: {e}"),
                    }
                }
            }
        }
        let file = tempfile_with(&Config::default().to_toml());
        Config::load_from(Some(file.path()), env(&[])).expect("the defaults fit");
    }

    #[test]
    fn transport_keys_from_the_environment() {
        let c = Config::load_from(
            None,
            env(&[
                ("BROKER_MQTT__WS__LISTEN", "127.0.0.1:8083"),
                ("BROKER_MQTT__WS__TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7"),
                ("BROKER_MQTT__WSS__PROXY_PROTOCOL", "true"),
                ("BROKER_MQTT__TLS__MIN_VERSION", "1.3"),
            ]),
        )
        .expect("valid transport keys");
        assert_eq!(
            c.mqtt.ws.listen,
            Some("127.0.0.1:8083".parse().expect("addr"))
        );
        let trusted: Vec<String> = c
            .mqtt
            .ws
            .trusted_proxies
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(trusted, ["10.0.0.0/8", "192.0.2.7/32"]);
        assert!(c.mqtt.wss.proxy_protocol);
        assert_eq!(c.mqtt.tls.min_version, TlsVersion::Tls13);

        let cases: [(&[(&str, &str)], &str); 6] = [
            (
                &[("BROKER_MQTT__WS__TRUSTED_PROXIES", "10.0.0.0/8,proxy.local")],
                "mqtt.ws.trusted_proxies",
            ),
            (
                &[("BROKER_MQTT__TLS__REQUIRE_CLIENT_CERT", "yes")],
                "true or false",
            ),
            (
                &[("BROKER_MQTT__TLS__MIN_VERSION", "1.1")],
                "one of 1.2, 1.3",
            ),
            (
                &[("BROKER_MQTT__TLS__LISTEN", "0.0.0.0:8883")],
                "mqtt.tls.cert_file",
            ),
            (
                &[("BROKER_MQTT__TLS__REQUIRE_CLIENT_CERT", "true")],
                "mqtt.tls.client_ca_file",
            ),
            (
                &[("BROKER_MQTT__WS__LISTEN", "127.0.0.1:1883")],
                "also mqtt.listen",
            ),
        ];
        for (vars, expected) in cases {
            let err = Config::load_from(None, env(vars)).expect_err("refused");
            assert!(err.to_string().contains(expected), "{vars:?}: {err}");
        }
    }

    #[test]
    fn a_listener_reachable_from_the_network_needs_authentication() {
        // The defaults: loopback only, no authentication, anonymous clients (local-only mode).
        let c = Config::load_from(None, env(&[])).expect("defaults");
        assert!(c.mqtt.listen.ip().is_loopback() && c.http.listen.ip().is_loopback());
        let err = Config::load_from(None, env(&[("BROKER_MQTT__LISTEN", "0.0.0.0:1883")]))
            .expect_err("open to the network without authentication");
        let message = err.to_string();
        assert!(message.contains("mqtt.listen"), "{message}");
        assert!(message.contains("auth.password_file"), "{message}");
        assert!(message.contains("auth.allow_anonymous"), "{message}");
        let err = Config::load_from(None, env(&[("BROKER_MQTT__WS__LISTEN", "0.0.0.0:8083")]))
            .expect_err("a WebSocket listener open to the network");
        assert!(err.to_string().contains("mqtt.ws.listen"), "{err}");
        for allowed in [
            &[
                ("BROKER_MQTT__LISTEN", "0.0.0.0:1883"),
                ("BROKER_AUTH__ALLOW_ANONYMOUS", "true"),
            ][..],
            &[
                ("BROKER_MQTT__LISTEN", "0.0.0.0:1883"),
                ("BROKER_AUTH__PASSWORD_FILE", "/etc/heartwire/passwords"),
            ][..],
            &[("BROKER_MQTT__LISTEN", "127.0.0.2:1883")][..],
        ] {
            Config::load_from(None, env(allowed)).unwrap_or_else(|e| panic!("{allowed:?}: {e}"));
        }
        let err = Config::load_from(None, env(&[("BROKER_AUTH__BIND_CLIENT_ID", "username")]))
            .expect_err("binding to user names needs a password file");
        assert!(err.to_string().contains("auth.bind_client_id"), "{err}");
    }

    #[test]
    fn an_api_reachable_from_the_network_needs_tokens() {
        let err = Config::load_from(
            None,
            env(&[
                ("BROKER_HTTP__LISTEN", "0.0.0.0:8080"),
                // MQTT's own override does not open the API.
                ("BROKER_AUTH__ALLOW_ANONYMOUS", "true"),
            ]),
        )
        .expect_err("an API open to the network without tokens");
        let message = err.to_string();
        for key in [
            "`http.listen`",
            "http.api_tokens_file",
            "http.allow_anonymous",
            "broker token",
        ] {
            assert!(message.contains(key), "{key} in: {message}");
        }
        for allowed in [
            &[
                ("BROKER_HTTP__LISTEN", "0.0.0.0:8080"),
                ("BROKER_HTTP__ALLOW_ANONYMOUS", "true"),
            ][..],
            &[
                ("BROKER_HTTP__LISTEN", "[::]:8080"),
                ("BROKER_HTTP__API_TOKENS_FILE", "/etc/heartwire/api-tokens"),
            ][..],
            &[("BROKER_HTTP__LISTEN", "[::1]:8080")][..],
        ] {
            Config::load_from(None, env(allowed)).unwrap_or_else(|e| panic!("{allowed:?}: {e}"));
        }
        let err = Config::load_from(None, env(&[("BROKER_HTTP__METRICS_PUBLIC", "yes")]))
            .expect_err("not a boolean");
        assert!(err.to_string().contains("http.metrics_public"), "{err}");
    }

    #[test]
    fn providers_are_listed_once_and_configured() {
        let jwt = ("BROKER_AUTH__JWT__SECRET_FILE", "/etc/heartwire/jwt.secret");
        let file = ("BROKER_AUTH__PASSWORD_FILE", "/etc/heartwire/passwords");
        // The default order of the configured ones.
        let c = Config::load_from(None, env(&[jwt, file, ("BROKER_AUTH__DATABASE", "true")]))
            .expect("three providers");
        assert_eq!(
            c.auth.chain(),
            [
                AuthProvider::PasswordFile,
                AuthProvider::Jwt,
                AuthProvider::Database
            ]
        );
        // An order of one's own; listing the database turns it on.
        let c = Config::load_from(
            None,
            env(&[
                jwt,
                file,
                ("BROKER_AUTH__PROVIDERS", "database, jwt,password_file"),
            ]),
        )
        .expect("listed");
        assert_eq!(
            c.auth.chain(),
            [
                AuthProvider::Database,
                AuthProvider::Jwt,
                AuthProvider::PasswordFile
            ]
        );
        assert!(c.auth.has_provider());
        // Secure by default counts JWT and the database as authentication.
        Config::load_from(
            None,
            env(&[
                ("BROKER_MQTT__LISTEN", "0.0.0.0:1883"),
                ("BROKER_AUTH__DATABASE", "true"),
            ]),
        )
        .expect("database credentials authenticate");
        for (pairs, key, says) in [
            (
                &[("BROKER_AUTH__PROVIDERS", "ldap")][..],
                "auth.providers",
                "password_file, jwt, database",
            ),
            (
                &[("BROKER_AUTH__PROVIDERS", "jwt")][..],
                "auth.providers",
                "auth.jwt.secret_file",
            ),
            (
                &[
                    file,
                    ("BROKER_AUTH__PROVIDERS", "password_file,password_file"),
                ][..],
                "auth.providers",
                "twice",
            ),
            (
                &[jwt, file, ("BROKER_AUTH__PROVIDERS", "jwt")][..],
                "auth.providers",
                "does not list password_file",
            ),
            (
                &[jwt, ("BROKER_AUTH__JWT__ALGORITHM", "RS256")][..],
                "auth.jwt.public_key_file",
                "RS256",
            ),
            (
                &[("BROKER_AUTH__JWT__ALGORITHM", "PS256")][..],
                "auth.jwt.algorithm",
                "HS256, RS256, ES256",
            ),
            (
                &[jwt, ("BROKER_AUTH__JWT__LEEWAY", "1h")][..],
                "auth.jwt.leeway",
                "5m",
            ),
            (
                &[("BROKER_AUTH__DATABASE_CACHE_TTL", "2h")][..],
                "auth.database_cache_ttl",
                "1h",
            ),
        ] {
            let err = Config::load_from(None, env(pairs)).expect_err("refused");
            let message = err.to_string();
            assert!(
                message.contains(key) && message.contains(says),
                "{pairs:?}: {message}"
            );
        }
        let toml = tempfile_with("[auth]\nproviders = [\"jwt\", \"database\"]\n[auth.jwt]\nalgorithm = \"ES256\"\npublic_key_file = \"/k.pem\"\n");
        let c = Config::load_from(Some(toml.path()), env(&[])).expect("from a file");
        assert_eq!(c.auth.chain(), [AuthProvider::Jwt, AuthProvider::Database]);
        assert_eq!(c.auth.jwt.algorithm, JwtAlgorithm::Es256);
    }

    #[test]
    fn unknown_keys_in_file_are_refused() {
        let file = tempfile_with("[mqtt]\nlisten_addr = \"127.0.0.1:1\"\n");
        let err = Config::load_from(Some(file.path()), env(&[])).expect_err("unknown key");
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn renamed_keys_still_work_and_are_reported() {
        let file = tempfile_with("[bridge]\nwrite_timeout = \"3s\"\n");
        let loaded = Config::load_reporting(
            Some(file.path()),
            env(&[("BROKER_MQTT__WRITE_TIMEOUT", "7s")]),
        )
        .expect("old names load");
        assert_eq!(loaded.config.bridge.store_timeout, Duration::from_secs(3));
        assert_eq!(
            loaded.config.mqtt.write_stall_timeout,
            Duration::from_secs(7)
        );
        assert_eq!(
            loaded.renamed,
            ["bridge.write_timeout", "mqtt.write_timeout"]
        );
        assert!(loaded.ignored_env.is_empty());
        let err = Config::load_from(None, env(&[("BROKER_MQTT__WRITE_TIMEOUT", "soon")]))
            .expect_err("a bad value under the old name");
        assert!(
            err.to_string().contains("mqtt.write_stall_timeout"),
            "{err}"
        );
        let clean = Config::load_reporting(None, env(&[])).expect("defaults");
        assert!(clean.renamed.is_empty());
    }

    #[test]
    fn print_config_round_trips() {
        let c = Config::default();
        let file = tempfile_with(&c.to_toml());
        let back = Config::load_from(Some(file.path()), env(&[])).expect("reload");
        assert_eq!(back, c);
    }

    /// A TOML file holding `contents`, removed when dropped.
    fn tempfile_with(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .prefix("heartwire-config-")
            .suffix(".toml")
            .tempfile()
            .expect("create temp file");
        file.write_all(contents.as_bytes()).expect("write");
        file
    }
}
