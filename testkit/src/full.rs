//! The whole broker (MQTT, bridge, store, HTTP) in-process on ephemeral ports, on a runtime of
//! its own: a test can stop it gracefully or kill it where it stands (a crash), and start it
//! again on the same database and journal.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use broker::config::Config;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::{eventually, http_get, temp_dir, TempDir};

/// Bound on a graceful stop: the shutdown grace period of [`FullBroker::config`] (5 s) and the
/// bridge's drain.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// The URL of a SQLite file `broker.db` in `dir` (created by the broker when it starts).
pub fn sqlite_url(dir: impl AsRef<Path>) -> String {
    format!("sqlite://{}/broker.db", dir.as_ref().display())
}

/// A whole broker on ephemeral ports, on its own runtime thread so that a test can also kill
/// it abruptly (a crash: no shutdown, no Disconnected events). Dropping it shuts it down without
/// waiting.
pub struct FullBroker {
    /// The MQTT listener's address.
    pub mqtt: SocketAddr,
    /// The HTTP listener's address: the API, /metrics, /healthz, /readyz.
    pub http: SocketAddr,
    /// The TLS listener's address, when the configuration sets `mqtt.tls.listen` (to any
    /// address: a free loopback port is bound instead).
    pub tls: Option<SocketAddr>,
    /// The WebSocket listener's address, likewise.
    pub ws: Option<SocketAddr>,
    /// The WebSocket-over-TLS listener's address, likewise.
    pub wss: Option<SocketAddr>,
    /// `database.url` of its configuration, for tests that read the store themselves.
    database_url: String,
    /// Cancelled to shut the broker down gracefully.
    shutdown: CancellationToken,
    /// The broker's own runtime; taken by a crash or a drop, which abandon its tasks.
    runtime: Option<tokio::runtime::Runtime>,
    /// Fires when `run_with` has returned (the broker has drained); awaited by [`stop`](Self::stop).
    done: Option<oneshot::Receiver<()>>,
    /// The directory of its SQLite file and journal, when the broker owns it
    /// ([`start_sqlite`](Self::start_sqlite), [`start_on`](Self::start_on)); removed after the
    /// broker, when it is dropped.
    _data: Option<TempDir>,
}

impl FullBroker {
    /// The configuration of a test broker: on `database_url`, its journal in `data`, node id
    /// `node_id`, and quick batches (20 ms), heartbeats (200 ms) and retries (at most 500 ms
    /// apart), with a 5 s shutdown grace period. Tests change what they are about.
    pub fn config(database_url: &str, data: impl AsRef<Path>, node_id: &str) -> Config {
        let mut config = Config::default();
        config.database.url = database_url.to_owned();
        config.bridge.journal_path = data.as_ref().join("presence.journal");
        config.persistence.dir = data.as_ref().join("state");
        // Small logs: a test broker grows 1 MiB of log ahead, not 64.
        config.persistence.segment_bytes = 1 << 20;
        config.bridge.batch_interval = Duration::from_millis(20);
        config.bridge.retry_backoff_max = Duration::from_millis(500);
        config.node.id = node_id.to_owned();
        config.node.heartbeat_interval = Duration::from_millis(200);
        config.shutdown.grace_period = Duration::from_secs(5);
        config
    }

    /// Starts the broker on `config` (its listen addresses are ignored: both listeners bind
    /// 127.0.0.1:0). Returns once it listens, before it is ready: see [`ready`](Self::ready).
    pub async fn start(config: Config) -> Self {
        Self::start_owning(config, None)
    }

    /// A ready broker on a fresh SQLite file, in a temporary directory of its own.
    pub async fn start_sqlite() -> Self {
        let data = temp_dir("broker");
        let config = Self::config(&sqlite_url(&data), &data, "test-node");
        let broker = Self::start_owning(config, Some(data));
        broker.ready().await;
        broker
    }

    /// A ready broker on `database_url`, its journal in a temporary directory of its own.
    pub async fn start_on(database_url: &str) -> Self {
        let data = temp_dir("broker");
        let config = Self::config(database_url, &data, "test-node");
        let broker = Self::start_owning(config, Some(data));
        broker.ready().await;
        broker
    }

    fn start_owning(config: Config, data: Option<TempDir>) -> Self {
        // Logs when asked for (RUST_LOG=broker=debug cargo nextest run ...).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mqtt = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (mqtt_addr, http_addr) = (
            mqtt.local_addr().expect("addr"),
            http.local_addr().expect("addr"),
        );
        let (tls, tls_addr) = bind_if(config.mqtt.tls.listen);
        let (ws, ws_addr) = bind_if(config.mqtt.ws.listen);
        let (wss, wss_addr) = bind_if(config.mqtt.wss.listen);
        mqtt.set_nonblocking(true).expect("nonblocking");
        http.set_nonblocking(true).expect("nonblocking");
        let database_url = config.database.url.clone();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (done_tx, done) = oneshot::channel();
        runtime.spawn(async move {
            let listeners = broker::Listeners {
                mqtt: TcpListener::from_std(mqtt).expect("listener"),
                http: TcpListener::from_std(http).expect("listener"),
                tls: tls.map(|l| TcpListener::from_std(l).expect("listener")),
                ws: ws.map(|l| TcpListener::from_std(l).expect("listener")),
                wss: wss.map(|l| TcpListener::from_std(l).expect("listener")),
            };
            // (from_std registers with this runtime's reactor, so it runs inside the task.)
            broker::run_with(config, listeners, token)
                .await
                .expect("broker runs");
            let _ = done_tx.send(());
        });
        Self {
            mqtt: mqtt_addr,
            http: http_addr,
            tls: tls_addr,
            ws: ws_addr,
            wss: wss_addr,
            database_url,
            shutdown,
            runtime: Some(runtime),
            done: Some(done),
            _data: data,
        }
    }

    /// Waits until /readyz answers 200 (migrations applied, crash repair of earlier boots
    /// done), failing after [`WAIT`](crate::WAIT).
    pub async fn ready(&self) {
        eventually("broker ready", || async {
            http_get(self.http, "/readyz").await
        })
        .await;
    }

    /// `database.url` of its configuration.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The base URL of its HTTP API, `http://127.0.0.1:<port>`.
    pub fn api(&self) -> String {
        format!("http://{}", self.http)
    }

    /// Graceful shutdown; waits until the broker has drained.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(STOP_WAIT, done)
                .await
                .expect("broker stops in time")
                .expect("broker finished");
        }
    }

    /// Kills the broker without any shutdown: its tasks are dropped where they stand.
    pub fn crash(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for FullBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime inside another one's task would panic; this does not block.
            rt.shutdown_background();
        }
    }
}

/// A non-blocking listener on a free loopback port when `configured` is set.
fn bind_if(configured: Option<SocketAddr>) -> (Option<std::net::TcpListener>, Option<SocketAddr>) {
    if configured.is_none() {
        return (None, None);
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    (Some(listener), Some(addr))
}
