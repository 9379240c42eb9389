//! The closed sets of values that label metrics (and, for disconnect reasons, are stored): one
//! enum each, with every value and its name. Imports nothing of the broker, so that every other
//! module can point down at it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A closed set of label values.
pub trait Label: Copy + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// The value's name (metric label, log field, stored value).
    fn as_str(self) -> &'static str;
    /// The value's position in [`Label::ALL`].
    fn index(self) -> usize;
}

/// Declares a label enum: its variants with their names, [`Label`] and `Display`.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// The value's name (metric label, log field).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl Label for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            fn as_str(self) -> &'static str {
                $name::as_str(self)
            }
            fn index(self) -> usize {
                self as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label_enum! {
    /// Why a connection ended. Also a database value (`sessions.reason`, `devices.last_reason`).
    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    DisconnectReason {
        /// The client sent DISCONNECT.
        ClientDisconnect => "client_disconnect",
        /// Nothing was received within keep-alive x multiplier.
        KeepaliveTimeout => "keepalive_timeout",
        /// The socket closed or failed without DISCONNECT, writes stopped making progress, or a
        /// started packet was not finished in time.
        ConnectionLost => "connection_lost",
        /// The client broke the protocol (malformed, over-size or unexpected packet).
        ProtocolError => "protocol_error",
        /// A newer connection with the same client id replaced this one.
        Takeover => "takeover",
        /// The broker is shutting down.
        BrokerShutdown => "broker_shutdown",
        /// The broker node stopped without a shutdown (crash, kill); recorded at its next start,
        /// with the time of the node's last heartbeat. Never emitted by the MQTT layer.
        BrokerRestart => "broker_restart",
        /// An operator closed the connection (`POST /api/v1/admin/clients/{client_id}/kick`).
        Kicked => "kicked",
        /// The client's credentials or rights no longer allow the connection (revoked on a
        /// reload).
        NotAuthorized => "not_authorized",
    }
}

impl DisconnectReason {
    /// The reason named `name` (as stored), if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|r| r.as_str() == name)
    }
}

label_enum! {
    /// What a connection event says happened (`kind` of `heartwire_presence_transitions_total`).
    TransitionKind {
        /// A CONNECT was accepted.
        Connected => "connected",
        /// A connection ended.
        Disconnected => "disconnected",
        /// A persistent session expired without a connection.
        SessionExpired => "session_expired",
    }
}

label_enum! {
    /// MQTT 3.1.1 packet types (`type` of the packet and byte counters).
    PacketType {
        /// CONNECT.
        Connect => "connect",
        /// CONNACK.
        ConnAck => "connack",
        /// PUBLISH.
        Publish => "publish",
        /// PUBACK.
        PubAck => "puback",
        /// PUBREC.
        PubRec => "pubrec",
        /// PUBREL.
        PubRel => "pubrel",
        /// PUBCOMP.
        PubComp => "pubcomp",
        /// SUBSCRIBE.
        Subscribe => "subscribe",
        /// SUBACK.
        SubAck => "suback",
        /// UNSUBSCRIBE.
        Unsubscribe => "unsubscribe",
        /// UNSUBACK.
        UnsubAck => "unsuback",
        /// PINGREQ.
        PingReq => "pingreq",
        /// PINGRESP.
        PingResp => "pingresp",
        /// DISCONNECT.
        Disconnect => "disconnect",
        /// AUTH (MQTT 5).
        Auth => "auth",
    }
}

label_enum! {
    /// Why a connection was refused or closed before its session started (`reason` of
    /// `heartwire_connections_refused_total`).
    RefusalReason {
        /// The broker was shutting down.
        BrokerShutdown => "broker_shutdown",
        /// Garbage, or a first packet other than CONNECT, or an invalid will topic.
        ProtocolError => "protocol_error",
        /// A protocol level other than 4 (CONNACK 0x01).
        UnsupportedProtocolVersion => "unsupported_protocol_version",
        /// The socket closed before the CONNECT.
        ConnectionLost => "connection_lost",
        /// No CONNECT within `mqtt.connect_timeout`.
        ConnectTimeout => "connect_timeout",
        /// A client id that is not allowed (CONNACK 0x02).
        IdentifierRejected => "identifier_rejected",
        /// A keep-alive outside the bounds with `mqtt.keepalive_policy = "reject"`.
        KeepaliveRejected => "keepalive_rejected",
        /// The process had no file descriptor left to accept it.
        FdExhausted => "fd_exhausted",
        /// Unknown user name or wrong password (CONNACK 0x04).
        BadCredentials => "bad_credentials",
        /// No credentials where they are required, or a client id the credentials do not
        /// allow (CONNACK 0x05).
        NotAuthorized => "not_authorized",
        /// `mqtt.max_connections` connections were open (CONNACK 0x03).
        MaxConnections => "max_connections",
        /// A will on a topic the client may not write (CONNACK 0x05).
        WillNotAuthorized => "will_not_authorized",
        /// `mqtt.max_connections_per_address` connections were open from the client's address
        /// (CONNACK 0x03).
        MaxConnectionsPerAddress => "max_connections_per_address",
        /// The client id is banned for connecting too often (`mqtt.flapping`; CONNACK 0x05).
        Banned => "banned",
        /// A credential could not be looked up (the presence store did not answer): CONNACK
        /// 0x03.
        AuthUnavailable => "auth_unavailable",
    }
}

label_enum! {
    /// The listener, and so the transport, a connection came in on (`listener` of the listener
    /// metrics; also a database value, `sessions.listener`).
    #[derive(Serialize, Deserialize, Default)]
    #[serde(rename_all = "snake_case")]
    Listener {
        /// MQTT over TCP (`mqtt.listen`); the default, as every connection was before there
        /// were other listeners.
        #[default]
        Tcp => "tcp",
        /// MQTT over TLS (`mqtt.tls.listen`).
        Tls => "tls",
        /// MQTT over WebSocket (`mqtt.ws.listen`).
        Ws => "ws",
        /// MQTT over WebSocket over TLS (`mqtt.wss.listen`).
        Wss => "wss",
    }
}

impl Listener {
    /// The listener of a stored name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|l| l.as_str() == name)
    }
}

label_enum! {
    /// Why a transport handshake (PROXY header, TLS, WebSocket upgrade) failed before MQTT began
    /// (`reason` of `heartwire_transport_handshake_failures_total`).
    HandshakeFailure {
        /// Not completed within `mqtt.connect_timeout`.
        Timeout => "timeout",
        /// The peer closed or reset the connection during the handshake.
        Closed => "closed",
        /// The bytes are not a PROXY protocol header although the listener expects one.
        ProxyHeader => "proxy_header",
        /// The bytes are not TLS (for example plain MQTT on the TLS port).
        NotTls => "not_tls",
        /// No TLS version both sides accept (`mqtt.tls.min_version`).
        TlsVersion => "tls_version",
        /// The client's certificate was refused (unknown issuer, expired, not yet valid, revoked,
        /// wrong usage).
        BadCertificate => "bad_certificate",
        /// `mqtt.tls.require_client_cert` and the client sent no certificate.
        NoCertificate => "no_certificate",
        /// The client's certificate was verified but names no usable identity.
        NoIdentity => "no_identity",
        /// The client refused the server with a TLS alert (it does not trust the broker's
        /// certificate, or the name does not match what it dialled).
        ClientAlert => "client_alert",
        /// Any other TLS failure (no common cipher suite, malformed handshake, ...).
        Tls => "tls",
        /// Not a valid WebSocket upgrade request (method, headers, version, oversized head).
        WsRequest => "ws_request",
        /// A WebSocket upgrade for a path other than `mqtt.ws.path`.
        WsPath => "ws_path",
        /// A WebSocket upgrade that offers neither `mqtt` nor `mqttv3.1` as subprotocol.
        WsSubprotocol => "ws_subprotocol",
    }
}

label_enum! {
    /// How a connection was authenticated (also a database value: `sessions.auth_method`).
    #[derive(Serialize, Deserialize, Default)]
    #[serde(rename_all = "snake_case")]
    AuthMethod {
        /// No credentials were checked (the default, and what connections were before there
        /// was authentication).
        #[default]
        Anonymous => "anonymous",
        /// User name and password, against the password file.
        Password => "password",
        /// A verified TLS client certificate.
        Certificate => "certificate",
        /// A JWT in the password field (`auth.jwt`).
        Jwt => "jwt",
        /// User name and password, against the presence store's credentials (`auth.database`).
        Database => "database",
        /// MQTT 5 enhanced authentication, SCRAM-SHA-256, against the password file.
        Scram => "scram",
    }
}

impl AuthMethod {
    /// The method of a stored name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|m| m.as_str() == name)
    }
}

label_enum! {
    /// The MQTT protocol level of a connection, chosen by its CONNECT (also a database value:
    /// `sessions.protocol`, `devices.protocol`).
    #[derive(Serialize, Deserialize, Default)]
    Protocol {
        /// MQTT 3.1.1 (protocol level 4); also what rows and journals written before the level
        /// was recorded read.
        #[default]
        #[serde(rename = "3.1.1")]
        V311 => "3.1.1",
        /// MQTT 5.0 (protocol level 5).
        #[serde(rename = "5")]
        V5 => "5",
    }
}

impl Protocol {
    /// The protocol level of a stored name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.as_str() == name)
    }
}

label_enum! {
    /// How a password was checked (`outcome` of `heartwire_auth_verifications_total`).
    VerifyOutcome {
        /// The same user and password were verified recently (no hashing).
        CacheHit => "cache_hit",
        /// Hashed and found right.
        Verified => "verified",
        /// Hashed and found wrong, or the user is unknown.
        Rejected => "rejected",
    }
}

label_enum! {
    /// How a reload of a file went (`outcome` of `heartwire_tls_reloads_total`,
    /// `heartwire_password_file_reloads_total`, `heartwire_api_tokens_file_reloads_total`).
    ReloadOutcome {
        /// The new files are in use for new connections.
        Ok => "ok",
        /// A file could not be read or used; the previous one stays in use.
        Failed => "failed",
    }
}

label_enum! {
    /// How a backup of the broker state ended (`outcome` of `heartwire_state_backups_total`).
    BackupOutcome {
        /// The file is whole in the backup directory.
        Written => "written",
        /// Exporting, writing or syncing failed; no file was left.
        Failed => "failed",
    }
}

label_enum! {
    /// Why a message was not queued for a subscriber (`reason` of
    /// `heartwire_messages_dropped_total`).
    DropReason {
        /// The session's queue is at `mqtt.max_queued_messages`.
        QueueFull => "queue_full",
        /// The session's queue would pass `mqtt.max_queued_bytes`.
        QueueBytes => "queue_bytes",
        /// All queues together would pass `mqtt.max_queued_bytes_total`.
        MemoryLimit => "memory_limit",
        /// QoS 0 messages are not kept for a persistent session while its client is away.
        Qos0Offline => "qos0_offline",
        /// The subscriber's session ended while the message was being routed.
        SessionEnded => "session_ended",
        /// Its MQTT 5 message expiry interval passed before it could be sent.
        Expired => "expired",
        /// Larger than the maximum packet size the MQTT 5 subscriber accepts.
        PacketTooLarge => "packet_too_large",
    }
}

label_enum! {
    /// Why a topic filter got SUBACK 0x80 (`reason` of `heartwire_subscriptions_refused_total`).
    SubscriptionRefusal {
        /// Not a valid filter, or more than `mqtt.max_topic_levels` levels.
        InvalidFilter => "invalid_filter",
        /// Beyond `mqtt.max_filters_per_subscribe` in one SUBSCRIBE.
        FiltersPerSubscribe => "filters_per_subscribe",
        /// A new filter beyond `mqtt.max_subscriptions_per_session`.
        SubscriptionsPerSession => "subscriptions_per_session",
        /// The ACL lets the client read no topic of the filter (`auth.acl_file`, grants).
        NotAuthorized => "not_authorized",
    }
}

label_enum! {
    /// What the ACL refused (`action` of `heartwire_acl_denied_total`).
    AclDenial {
        /// A PUBLISH to a topic the client may not write: acknowledged and dropped.
        Publish => "publish",
        /// A message for a subscription the client may read only part of, on a topic it may
        /// not read: not delivered.
        Delivery => "delivery",
        /// A retained message on a topic the subscriber may not read: not delivered.
        Retained => "retained",
        /// A subscription removed because a reloaded ACL (or the client's new rules) no longer
        /// lets it read anything of the filter.
        Revoked => "revoked",
    }
}

label_enum! {
    /// Which publish rate held a client's reads back (`limit` of
    /// `heartwire_publish_throttled_total`).
    PublishLimit {
        /// `mqtt.max_publish_rate`: PUBLISH packets a second.
        Messages => "messages",
        /// `mqtt.max_publish_bytes_rate`: topic and payload bytes a second.
        Bytes => "bytes",
    }
}

label_enum! {
    /// Why a retained message was not stored (`reason` of `heartwire_retained_refused_total`).
    RetainRefusal {
        /// The store holds `mqtt.max_retained_messages` already.
        Count => "count",
        /// Storing it would pass `mqtt.max_retained_bytes`.
        Bytes => "bytes",
    }
}

label_enum! {
    /// Presence store operations (`operation` of `heartwire_store_errors_total`).
    StoreOperation {
        /// Applying the schema migrations.
        Migrate => "migrate",
        /// Recording a boot and closing the sessions earlier boots left open.
        BeginBoot => "begin_boot",
        /// Applying a batch of connection events.
        Apply => "apply",
        /// Recording that the node is alive.
        Heartbeat => "heartbeat",
        /// Deleting history rows by retention.
        Prune => "prune",
    }
}

label_enum! {
    /// History retention policies (`policy` of `heartwire_history_pruned_sessions_total`).
    RetentionPolicy {
        /// `database.history_max_age`.
        MaxAge => "max_age",
        /// `database.history_max_sessions_per_device`.
        MaxSessionsPerDevice => "max_sessions_per_device",
    }
}

label_enum! {
    /// Why an HTTP connection was closed by a timeout (`kind` of
    /// `heartwire_http_connection_timeouts_total`).
    HttpTimeout {
        /// A request head did not arrive within `http.header_read_timeout`.
        HeaderRead => "header_read",
        /// A keep-alive connection sent no request within `http.idle_timeout`.
        Idle => "idle",
    }
}

label_enum! {
    /// What an HTTP request asked for (`route` of `heartwire_http_requests_total`).
    HttpRoute {
        /// `GET /api/v1/devices/{id}`.
        Device => "device",
        /// `GET /api/v1/devices`.
        Devices => "devices",
        /// `GET /api/v1/devices/{id}/sessions`.
        Sessions => "sessions",
        /// `GET /api/v1/stats`.
        Stats => "stats",
        /// `GET /api/v1/nodes`.
        Nodes => "nodes",
        /// `GET /readyz`.
        Readyz => "readyz",
        /// `POST /api/v1/admin/clients/{client_id}/kick`.
        Kick => "kick",
        /// `POST /api/v1/admin/reload`.
        Reload => "reload",
        /// `GET /api/v1/admin/bans` and `DELETE /api/v1/admin/bans/{client_id}`.
        Bans => "bans",
        /// `POST /api/v1/admin/state/backup`.
        StateBackup => "state_backup",
        /// `GET /api/v1/admin/state/backups` and `GET /api/v1/admin/state/backups/{name}`.
        StateBackups => "state_backups",
        /// `/api/v1/admin/credentials` and below: managing database credentials.
        AdminCredentials => "admin_credentials",
        /// A request head refused before routing (too long, too many fields, malformed).
        Rejected => "rejected",
        /// An unknown route or a wrong method: answered by the router, not a route (a bad
        /// parameter counts under its route, as a 4xx).
        Other => "other",
    }
}

label_enum! {
    /// Why an API request was refused before its handler (`reason` of
    /// `heartwire_http_requests_refused_total`).
    ApiRefusal {
        /// No bearer token, or one that is not in `http.api_tokens_file` (401).
        Unauthorized => "unauthorized",
        /// A valid token whose role may not use the endpoint (403).
        Forbidden => "forbidden",
    }
}

label_enum! {
    /// Class of an HTTP status (`status` of `heartwire_http_requests_total`).
    StatusClass {
        /// 200-299.
        Success => "2xx",
        /// 400-499.
        ClientError => "4xx",
        /// Everything else.
        ServerError => "5xx",
    }
}

impl StatusClass {
    /// The class of status code `code`.
    pub fn of(code: u16) -> Self {
        match code {
            200..=299 => Self::Success,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed<L: Label + PartialEq + std::fmt::Debug>() {
        for (i, value) in L::ALL.iter().enumerate() {
            assert_eq!(value.index(), i);
            assert!(!value.as_str().is_empty());
        }
        let mut names: Vec<&str> = L::ALL.iter().map(|v| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), L::ALL.len(), "names are unique");
    }

    #[test]
    fn every_set_is_indexed_and_named_once() {
        closed::<DisconnectReason>();
        closed::<TransitionKind>();
        closed::<PacketType>();
        closed::<RefusalReason>();
        closed::<Listener>();
        closed::<HandshakeFailure>();
        closed::<ReloadOutcome>();
        closed::<VerifyOutcome>();
        closed::<AuthMethod>();
        closed::<DropReason>();
        closed::<PublishLimit>();
        closed::<SubscriptionRefusal>();
        closed::<AclDenial>();
        closed::<RetainRefusal>();
        closed::<StoreOperation>();
        closed::<RetentionPolicy>();
        closed::<HttpTimeout>();
        closed::<HttpRoute>();
        closed::<ApiRefusal>();
        closed::<StatusClass>();
    }

    #[test]
    fn disconnect_reasons_round_trip_as_stored() {
        for reason in DisconnectReason::ALL {
            assert_eq!(DisconnectReason::from_name(reason.as_str()), Some(*reason));
            let json = serde_json::to_string(reason).expect("serialize");
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
        }
    }
}
