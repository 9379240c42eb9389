//! Shared by the device-sim integration tests: the broker in-process on ephemeral ports, temp
//! directories, the `device-sim` binary and tiny HTTP helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Bound on any child process or wait of these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "device-sim-test-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The whole broker on ephemeral ports.
pub struct Broker {
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub db_url: String,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    _data: TempDir,
}

impl Broker {
    /// The broker on a fresh SQLite file.
    pub async fn start() -> Self {
        Self::start_on(None).await
    }

    /// The broker on `database_url`, or on a fresh SQLite file.
    pub async fn start_on(database_url: Option<String>) -> Self {
        let data = TempDir::new();
        let mut config = broker::config::Config::default();
        let db_url = database_url
            .unwrap_or_else(|| format!("sqlite://{}", data.path().join("b.db").display()));
        config.database.url = db_url.clone();
        config.bridge.journal_path = data.path().join("j");
        config.bridge.batch_interval = Duration::from_millis(20);
        config.node.heartbeat_interval = Duration::from_millis(200);
        config.shutdown.grace_period = Duration::from_secs(5);
        let mqtt = TcpListener::bind("127.0.0.1:0").await.expect("bind mqtt");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let (mqtt_addr, http_addr) = (
            mqtt.local_addr().expect("addr"),
            http.local_addr().expect("addr"),
        );
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let handle = tokio::spawn(async move {
            broker::run_with(config, broker::Listeners { mqtt, http }, token)
                .await
                .expect("broker runs");
        });
        let broker = Self {
            mqtt: mqtt_addr,
            http: http_addr,
            db_url,
            shutdown,
            handle,
            _data: data,
        };
        let deadline = Instant::now() + WAIT;
        while http_status(broker.http, "/readyz").await != Some(200) {
            assert!(Instant::now() < deadline, "broker not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker
    }

    pub fn api(&self) -> String {
        format!("http://{}", self.http)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("broker stops in time")
            .expect("broker task");
    }
}

/// Status code of a GET, if the server answered.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1)?.parse().ok()
}

pub fn sim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-sim"));
    c.kill_on_drop(true);
    c
}

/// Body of a GET, if the server answered.
pub async fn http_body(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8_lossy(&response).into_owned();
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

/// A free local port (bound, then released).
pub async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("valid JSON")
}
