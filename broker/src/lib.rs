//! Heartwire: an MQTT 3.1.1 broker that knows, at every moment, which devices are online, since
//! when, and why each one went offline.
//!
//! Modules, in the order data flows through them (each imports only modules listed before it,
//! or the ground floor):
//! - [`transport`]: the byte streams under MQTT: PROXY protocol header, TLS (rustls, its
//!   reload and the client certificate's identity), WebSocket framing. Knows nothing of MQTT.
//! - [`auth`]: who may connect: a CONNECT's credentials offered to a chain of providers
//!   (Mosquitto-format password files, also written by `broker passwd`; JWTs; credentials in
//!   the presence store, reached through a trait the store implements), checked off the
//!   runtime, with a cache; what the credentials grant.
//! - [`state`]: durable broker state (retained messages, persistent sessions and their
//!   queues) behind a trait, and its embedded engine: an append-only log with group commit
//!   and background snapshots.
//! - [`mqtt`]: the listeners (one accept loop each; transport handshakes in tasks of their
//!   own), one task per connection (keep-alive, takeover), sessions, routing, the limits on
//!   clients (accept and publish rates, connections per address, flapping bans); emits a
//!   connection event for every connect and disconnect.
//! - [`presence`]: the bridge that batches the connection events into the store (memory
//!   buffer, and a journal whose file I/O runs off the async runtime, while the database is
//!   away; crash recovery at start), and the retention that keeps the session history bounded.
//! - [`store`]: the presence store trait and its PostgreSQL and SQLite backends, with the
//!   models they return and the batch planner they share. The backend is picked once at start
//!   from `database.url` ([`run_with`]); the bridge, the retention and the API are generic
//!   over it.
//! - [`http`]: the REST API (typed parameters, one request-counting layer, bearer tokens with
//!   roles, the admin endpoints), /metrics, /healthz, /readyz, and the HTTP listener that serves
//!   them (connection limit, timeouts).
//! - [`reload`]: re-reading the TLS certificate, password, ACL and API tokens files without a
//!   restart, on SIGHUP and on the admin API's request, through one reloader.
//!
//! And the ground floor they all point down at, importing nothing above it:
//! - [`event`]: the connection events and the presence record the pipeline stores.
//! - [`labels`]: the closed sets of metric label values (and stored disconnect reasons).
//! - [`database_url`]: which backend `database.url` names, and its redacted form.
//! - [`config`]: typed configuration (defaults < TOML file < `BROKER_` environment).
//! - [`metrics`]: every Prometheus metric, defined in one place.
//! - [`telemetry`]: tracing setup and rate-limited log lines.
//!
//! Words used throughout:
//! - *device*: a client id, as the presence store knows it (`devices` table, one row each).
//! - *connection*: one MQTT connection from CONNECT to its end, identified by a UUIDv7 called
//!   its session id (`event::SessionId`, the `session_id` of the API and the database): one
//!   `Connected` and one `Disconnected` event, one history row (`store` calls that row a
//!   `Session`, the API lists them under `/sessions`).
//! - *session* (MQTT): the state the broker keeps per client id across connections when
//!   clean_session = false — subscriptions, queued and in-flight messages (`mqtt::session`);
//!   a connection uses at most one session, a session is used by at most one connection at a
//!   time (a newer one takes it over).
//! - *node* and *boot*: a broker process by its configured `node.id`, and one start of it.

#![forbid(unsafe_code)]

pub mod auth;
pub mod config;
pub mod database_url;
pub mod event;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod mqtt;
pub mod presence;
pub mod reload;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod transport;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use config::Config;
use database_url::Backend;
use presence::bridge::Bridge;
use store::{Access, PgStore, PresenceStore, SqliteStore};
use transport::tls::Tls;

/// Why the broker could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not bind its address.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The configuration key of the address.
        key: &'static str,
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The presence store could not be opened.
    #[error("presence store (database.url): {0}")]
    Store(#[from] store::StoreError),
    /// The TLS certificate or key could not be used.
    #[error("TLS: {0}")]
    Tls(#[from] transport::tls::TlsError),
    /// The authentication configuration could not be used.
    #[error("{0}")]
    Auth(#[from] auth::AuthError),
    /// The API tokens file could not be used.
    #[error("{0}")]
    ApiTokens(#[from] http::tokens::TokensError),
    /// The ACL file could not be used.
    #[error("auth.acl_file: {0}")]
    Acl(#[from] auth::acl::AclError),
    /// The presence journal could not be opened.
    #[error("presence journal (bridge.journal_path): {0}")]
    Journal(#[from] presence::journal::JournalError),
    /// The broker state could not be opened or read.
    #[error("broker state (persistence.dir): {0}")]
    State(#[from] state::StateError),
}

/// Binds `addr` (the value of `key`) with a listen queue of `backlog` connections: what a
/// reconnect storm can have waiting for the accept loop before the kernel drops SYNs (each drop
/// costs its client a 1 s retransmission). The kernel caps it at `net.core.somaxconn`.
async fn bind_with_backlog(
    key: &'static str,
    addr: std::net::SocketAddr,
    backlog: u32,
) -> Result<TcpListener, Error> {
    let error = |source| Error::Bind { key, addr, source };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(error)?;
    // As TcpListener::bind does: a restarted broker rebinds at once.
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    socket.listen(backlog).map_err(error)
}

async fn bind(key: &'static str, addr: std::net::SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { key, addr, source })
}

/// The listeners, bound before anything starts (so that tests can bind port 0).
pub struct Listeners {
    /// MQTT over TCP.
    pub mqtt: TcpListener,
    /// HTTP API, /metrics, health.
    pub http: TcpListener,
    /// MQTT over TLS, when `mqtt.tls.listen` is set.
    pub tls: Option<TcpListener>,
    /// MQTT over WebSocket, when `mqtt.ws.listen` is set.
    pub ws: Option<TcpListener>,
    /// MQTT over WebSocket over TLS, when `mqtt.wss.listen` is set.
    pub wss: Option<TcpListener>,
}

impl Listeners {
    /// Binds `mqtt.listen`, `http.listen` and the optional MQTT listeners that are set.
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        let m = &config.mqtt;
        Ok(Self {
            mqtt: bind_with_backlog("mqtt.listen", m.listen, m.listen_backlog).await?,
            http: bind("http.listen", config.http.listen).await?,
            tls: bind_optional("mqtt.tls.listen", m.tls.listen, m.listen_backlog).await?,
            ws: bind_optional("mqtt.ws.listen", m.ws.listen, m.listen_backlog).await?,
            wss: bind_optional("mqtt.wss.listen", m.wss.listen, m.listen_backlog).await?,
        })
    }

    /// What serving needs from these listeners and `config`, read before anything starts so
    /// that a bad certificate or password file stops the broker at once.
    fn prepare(self, config: &Config) -> Result<Prepared, Error> {
        let sockets = mqtt::listener::Sockets {
            tcp: self.mqtt,
            tls: self.tls,
            ws: self.ws,
            wss: self.wss,
        };
        let (endpoints, tls) = sockets.endpoints(&config.mqtt)?;
        Ok(Prepared {
            endpoints,
            tls,
            http: self.http,
            auth: Arc::new(auth::Auth::new(&config.auth)?),
            access: Arc::new(http::tokens::ApiAccess::new(&config.http)?),
            acl: Arc::new(auth::acl::Acl::new(config.auth.acl_file.as_deref())?),
        })
    }
}

/// The listeners ready to serve, and the files they needed.
struct Prepared {
    /// The MQTT endpoints.
    endpoints: Vec<mqtt::listener::Endpoint>,
    /// The TLS configuration the TLS and WSS endpoints share (reloaded on SIGHUP).
    tls: Option<Arc<Tls>>,
    /// The HTTP listener.
    http: TcpListener,
    /// Who may connect (its password file and JWT key reloaded on SIGHUP).
    auth: Arc<auth::Auth>,
    /// Who may use the API (its tokens file reloaded on SIGHUP).
    access: Arc<http::tokens::ApiAccess>,
    /// What clients may read and write (its file reloaded on SIGHUP).
    acl: Arc<auth::acl::Acl>,
}

async fn bind_optional(
    key: &'static str,
    addr: Option<std::net::SocketAddr>,
    backlog: u32,
) -> Result<Option<TcpListener>, Error> {
    match addr {
        Some(addr) => bind_with_backlog(key, addr, backlog).await.map(Some),
        None => Ok(None),
    }
}

/// Runs the broker until `shutdown` is cancelled: MQTT listener, presence bridge, node
/// heartbeat and HTTP API. Then closes every connection (reason broker_shutdown), drains the
/// presence events into the store (or the journal), and returns, within
/// `shutdown.grace_period` plus `bridge.drain_timeout`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let listeners = Listeners::bind(&config).await?;
    run_with(config, listeners, shutdown).await
}

/// As [`run`], on listeners bound by the caller. The presence store's backend is picked here,
/// once, from the scheme of `database.url`; everything after runs generic over it
/// (`serve::<PgStore>` or `serve::<SqliteStore>`, as atuin's server does).
pub async fn run_with(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let prepared = listeners.prepare(&config)?;
    match Backend::of_url(&config.database.url) {
        Some(backend @ Backend::Postgres) => {
            serve::<PgStore>(backend, config, prepared, shutdown).await
        }
        Some(backend @ Backend::Sqlite) => {
            serve::<SqliteStore>(backend, config, prepared, shutdown).await
        }
        None => Err(store::StoreError::Scheme(database_url::redact(&config.database.url)).into()),
    }
}

/// As [`run_with`], on the presence store `S` of `backend`.
async fn serve<S: PresenceStore>(
    backend: Backend,
    config: Config,
    prepared: Prepared,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Prepared {
        endpoints,
        tls,
        http: http_listener,
        auth,
        access,
        acl,
    } = prepared;
    let store = S::open(
        &config.database.url,
        config.database.max_connections,
        Access::ReadWrite,
    )
    .await?
    .coalescing(config.bridge.coalesce_after);
    let boot_id = Uuid::now_v7();
    tracing::info!(
        backend = backend.as_str(),
        url = %database_url::redact(&config.database.url),
        node_id = %config.node.id,
        %boot_id,
        "Presence store configured."
    );

    let (events, receiver) = event::channel(config.events.channel_capacity);
    let mut bridge = Bridge::new(
        store.clone(),
        receiver,
        config.bridge.clone(),
        &config.node.id,
        boot_id,
    )
    .await?;
    let migrated = bridge.migrated();
    let new_sessions = (config.database.history_max_sessions_per_device > 0).then(|| {
        Arc::new(presence::retention::NewSessions::new(
            config.database.history_max_sessions_per_device,
        ))
    });
    if let Some(counts) = &new_sessions {
        bridge.count_new_sessions(Arc::clone(counts));
    }
    // The broker state is read back before anything is served; the persistent sessions it
    // restores are held again in the presence store at the bridge's recovery.
    let mut mqtt_broker = mqtt::Broker::new(config.mqtt.clone(), events)
        .with_auth(Arc::clone(&auth))
        .with_acl(Arc::clone(&acl));
    let (state_store, held) = open_state(&config, &mut mqtt_broker).await?;
    bridge.hold_sessions(held);
    let mqtt_broker = Arc::new(mqtt_broker);
    let tracker = TaskTracker::new();
    let bridge_stop = CancellationToken::new();
    let bridge_done = tracker.spawn(bridge.run(bridge_stop.clone()));
    tracker.spawn(presence::retention::run(
        store.clone(),
        config.database.clone(),
        new_sessions,
        Arc::clone(&migrated),
        shutdown.child_token(),
    ));
    tracker.spawn(heartbeat(
        store.clone(),
        boot_id,
        config.node.heartbeat_interval,
        Arc::clone(&migrated),
        shutdown.child_token(),
    ));

    // The API reads through a pool of its own, so that its reads never make the bridge wait
    // for a connection: one connection per query slot, one for the /stats refresh, one for
    // /readyz.
    let api_store = S::open(
        &config.database.url,
        config.http.max_store_queries + 2,
        Access::ReadOnly,
    )
    .await?;
    // Database credentials are read through a read-only pool of their own, so that a storm
    // of CONNECTs past the credential cache never takes the bridge's or the API's connections.
    if config.auth.configures(config::AuthProvider::Database) {
        let credentials = S::open(
            &config.database.url,
            config.auth.max_concurrent_verifications as u32 + 1,
            Access::ReadOnly,
        )
        .await?;
        auth.attach_credentials(Arc::new(store::StoreCredentials(credentials)));
    }
    let reloader = Arc::new(reloader(&config, tls, &auth, &mqtt_broker, &access));
    let mut state = http::AppState::new(
        api_store,
        mqtt_broker.live_sessions(),
        migrated,
        &config.http,
    )
    .with_access(access)
    .with_reloader(Arc::clone(&reloader))
    .with_bans(Arc::clone(&mqtt_broker.flapping))
    .with_credentials(store.clone(), Arc::clone(&auth));
    if let Some(store) = &state_store {
        let backups = config.persistence.backup_dir();
        state = state.with_state(Arc::clone(store), backups.clone());
        if !config.persistence.backup_interval.is_zero() {
            tracker.spawn(state::backup::schedule(
                Arc::clone(store),
                backups,
                config.persistence.backup_interval,
                config.persistence.backup_keep as usize,
                shutdown.child_token(),
            ));
        }
    }
    tracing::info!(
        listen = %http_listener.local_addr().unwrap_or(config.http.listen),
        "HTTP listener ready."
    );
    let http_config = config.http.clone();
    let http_shutdown = shutdown.clone();
    let grace = config.shutdown.grace_period;
    tracker.spawn(async move {
        http::server::serve(
            http_listener,
            http::app(state),
            &http_config,
            http_shutdown,
            grace,
        )
        .await;
    });

    for endpoint in &endpoints {
        if let Ok(listen) = endpoint.local_addr() {
            tracing::info!(%listen, listener = endpoint.kind().as_str(), "MQTT listener ready.");
        }
    }
    tracker.spawn(reload_on_hangup(reloader, shutdown.child_token()));
    let grace = config.shutdown.grace_period;
    mqtt::serve(endpoints, mqtt_broker, shutdown, grace).await;
    // The connections are closed and their sessions left: what they left is made durable.
    if let Some(store) = state_store {
        let closed = tokio::task::spawn_blocking(move || store.close()).await;
        if let Err(error) = closed {
            tracing::error!(%error, "Closing the broker state failed.");
        }
    }

    // The connections have closed (or the grace period is over): the bridge drains what it
    // has, bounded by bridge.drain_timeout, and journals the rest. It bounds itself.
    bridge_stop.cancel();
    tracker.close();
    if let Err(error) = bridge_done.await {
        tracing::error!(%error, "Presence bridge task failed.");
    }
    if tokio::time::timeout(Duration::from_secs(2), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("Background tasks still running at exit.");
    }
    tracing::info!("Broker stopped.");
    Ok(())
}

/// What [`open_state`] gives: the store (`None` when persistence is off), and the persistent
/// sessions it restored (client id, when each expires unless its client connects).
type OpenedState = (
    Option<Arc<dyn state::StateStore>>,
    Vec<(String, chrono::DateTime<chrono::Utc>)>,
);

/// Opens the broker state (`persistence`), off the async runtime, and rebuilds the retained
/// messages and persistent sessions it holds in `broker`.
async fn open_state(config: &Config, broker: &mut mqtt::Broker) -> Result<OpenedState, Error> {
    let persistence = config.persistence.clone();
    let opened = tokio::task::spawn_blocking(move || state::open(&persistence))
        .await
        .map_err(|e| state::StateError::Io {
            path: config.persistence.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    let Some((store, loaded)) = opened else {
        tracing::info!(
            "Persistence is off: retained messages and persistent sessions live in memory only."
        );
        return Ok((None, Vec::new()));
    };
    let started = std::time::Instant::now();
    broker.set_state(Arc::clone(&store));
    let restored = broker.restore(loaded.image);
    let elapsed = loaded.elapsed + started.elapsed();
    let m = metrics::metrics();
    m.state_load_seconds.set(elapsed.as_secs_f64());
    m.state_sessions_loaded.set(restored.sessions as i64);
    m.state_messages_loaded.set(restored.messages as i64);
    // Expired while the broker was down; the presence recovery marks their rows expired.
    m.sessions_expired.inc_by(restored.expired as u64);
    if loaded.truncated_bytes > 0 {
        tracing::warn!(
            bytes = loaded.truncated_bytes,
            "The broker state's newest log ended in a torn write (a crash during a write that \
             was never acknowledged); it was cut off."
        );
    }
    tracing::info!(
        dir = %config.persistence.dir.display(),
        mode = ?config.persistence.mode,
        sessions = restored.sessions,
        queued_messages = restored.messages,
        retained_messages = restored.retained,
        expired_sessions = restored.expired,
        read_bytes = loaded.read_bytes,
        load_ms = elapsed.as_millis() as u64,
        "Broker state loaded."
    );
    let held = restored
        .held
        .into_iter()
        .map(|(client_id, at)| (client_id, chrono::DateTime::<chrono::Utc>::from(at)))
        .collect();
    Ok((Some(store), held))
}

/// The files that SIGHUP and `POST /api/v1/admin/reload` re-read, in this order: the TLS
/// certificate files, the password file, the ACL file, the API tokens file.
fn reloader(
    config: &Config,
    tls: Option<Arc<Tls>>,
    auth: &Arc<auth::Auth>,
    broker: &Arc<mqtt::Broker>,
    access: &Arc<http::tokens::ApiAccess>,
) -> reload::Reloader {
    let m = metrics::metrics();
    let auth = Arc::clone(auth);
    let access = Arc::clone(access);
    // Weak: the reloader lives in the API's state, which must not keep the MQTT layer (and its
    // event stream) alive after shutdown.
    let broker = Arc::downgrade(broker);
    reload::Reloader::new()
        .file(
            "mqtt.tls",
            "TLS certificate files",
            &m.tls_reloads,
            tls.map(|tls| move || tls.reload()),
        )
        .file(
            "auth.password_file",
            "Password file",
            &m.password_file_reloads,
            config.auth.password_file.is_some().then_some({
                let auth = Arc::clone(&auth);
                let broker = broker.clone();
                move || {
                    let revoked = auth.reload_password_file()?.unwrap_or_default();
                    if let Some(broker) = broker.upgrade() {
                        let users = revoked.iter().map(String::as_str).collect();
                        let closed = broker.disconnect_logins(labels::AuthMethod::Password, &users);
                        if closed > 0 {
                            tracing::info!(
                                closed,
                                "Connections of users the password file no longer lets in (or \
                                 whose password changed) closed (reason not_authorized)."
                            );
                        }
                    }
                    Ok::<(), auth::AuthError>(())
                }
            }),
        )
        .file(
            "auth.jwt",
            "JWT key file",
            &m.jwt_key_reloads,
            auth.has_jwt().then_some({
                let auth = Arc::clone(&auth);
                move || auth.reload_jwt_key().map(drop)
            }),
        )
        .file(
            "auth.acl_file",
            "ACL file",
            &m.acl_file_reloads,
            config.auth.acl_file.is_some().then_some(move || {
                let Some(broker) = broker.upgrade() else {
                    return Ok(());
                };
                if let Some(reload) = broker.reload_acl()? {
                    tracing::info!(
                        rules = reload.rules,
                        sessions = reload.sessions,
                        revoked = reload.revoked,
                        "ACL file in force; subscriptions it no longer allows were removed."
                    );
                }
                Ok::<(), auth::acl::AclError>(())
            }),
        )
        .file(
            "http.api_tokens_file",
            "API tokens file",
            &m.api_tokens_file_reloads,
            access
                .is_protected()
                .then_some(move || access.reload().map(drop)),
        )
}

/// Reloads the files of `reloader` on every SIGHUP until `shutdown` (new handshakes, CONNECTs
/// and API requests use them; open connections keep going; a file that cannot be used leaves
/// the one in force). Without any, a SIGHUP is logged and otherwise ignored (it no longer ends
/// the process).
async fn reload_on_hangup(reloader: Arc<reload::Reloader>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "Cannot listen for SIGHUP; files cannot be reloaded.");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            received = hangups.recv() => if received.is_none() { return },
        }
        reloader.reload("SIGHUP").await;
    }
}

/// Records every `interval` that this boot is alive, until `shutdown`; it starts once the bridge
/// has migrated the schema (before that there is no table to write to).
async fn heartbeat<S: PresenceStore>(
    store: S,
    boot_id: Uuid,
    interval: Duration,
    migrated: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !migrated.load(Ordering::Acquire) {
            continue;
        }
        match store.heartbeat(boot_id, Utc::now()).await {
            Ok(()) => {
                if failing {
                    tracing::info!("Node heartbeat recorded again.");
                }
                failing = false;
            }
            Err(error) => {
                metrics::metrics()
                    .store_errors
                    .inc(labels::StoreOperation::Heartbeat);
                if failing {
                    tracing::debug!(%error, "Node heartbeat still not recorded.");
                } else {
                    tracing::warn!(%error, "Node heartbeat not recorded.");
                }
                failing = true;
            }
        }
    }
}
