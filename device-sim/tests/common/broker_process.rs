//! The broker as a process of its own, for tests that kill it (SIGKILL) and start it again on
//! the same data: the crash test of presence and the durable scenario's test.
//!
//! The broker process is the test binary itself, re-run with [`BROKER_CHILD`] set to run one
//! ignored test whose body is [`run_broker_child`]: that runs `broker::run` configured from
//! `BROKER_*` variables as the `broker` binary is. Cargo gives device-sim's tests only
//! device-sim's own binary, and a `target/debug/broker` found on disk could be older than the
//! code under test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::SIM_WAIT;
use testkit::http_get;

/// Set in the environment of the re-run test binary that plays the broker.
pub const BROKER_CHILD: &str = "DEVICE_SIM_TEST_BROKER_CHILD";

/// The body of a test binary's ignored broker test: runs the broker until SIGTERM when
/// [`BROKER_CHILD`] is set, and does nothing otherwise.
pub fn run_broker_child() {
    if std::env::var_os(BROKER_CHILD).is_none() {
        return;
    }
    let loaded =
        broker::config::Config::load_reporting(None, std::env::vars()).expect("configuration");
    broker::telemetry::init(&loaded.config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        let token = shutdown.clone();
        tokio::spawn(async move {
            term.recv().await;
            token.cancel();
        });
        broker::run(loaded.config, shutdown)
            .await
            .expect("broker runs");
    });
}

/// Where a broker process listens and keeps its data: the same across its restarts.
pub struct Setup<'a> {
    /// The ignored test of this binary whose body is [`run_broker_child`].
    pub child_test: &'a str,
    /// Data directory: SQLite presence database, journal, durable state, logs.
    pub dir: &'a Path,
    /// MQTT port.
    pub mqtt: u16,
    /// HTTP port (readiness).
    pub http: u16,
    /// `node.id`.
    pub node: &'a str,
}

/// One broker process.
pub struct BrokerProcess {
    child: Child,
    log: PathBuf,
}

impl BrokerProcess {
    /// Starts the broker of `setup` (`name` names its log file) and waits until it is ready
    /// (migrations applied, crash repair of earlier boots done, durable state loaded).
    pub async fn start(setup: &Setup<'_>, name: &str) -> Self {
        let dir = setup.dir;
        let log = dir.join(format!("broker-{name}.log"));
        let stderr = std::fs::File::create(&log).expect("broker log file");
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args(["--exact", setup.child_test, "--ignored", "--nocapture"])
            .env(BROKER_CHILD, "1")
            .env("BROKER_MQTT__LISTEN", format!("127.0.0.1:{}", setup.mqtt))
            .env("BROKER_HTTP__LISTEN", format!("127.0.0.1:{}", setup.http))
            .env(
                "BROKER_DATABASE__URL",
                format!("sqlite://{}", dir.join("broker.db").display()),
            )
            .env("BROKER_BRIDGE__JOURNAL_PATH", dir.join("presence.journal"))
            .env("BROKER_PERSISTENCE__DIR", dir.join("state"))
            // Small logs: a test broker grows 1 MiB of log ahead, not 64.
            .env("BROKER_PERSISTENCE__SEGMENT_BYTES", "1048576")
            .env("BROKER_BRIDGE__BATCH_INTERVAL", "20ms")
            .env("BROKER_NODE__ID", setup.node)
            .env("BROKER_NODE__HEARTBEAT_INTERVAL", "200ms")
            .env("BROKER_SHUTDOWN__GRACE_PERIOD", "5s")
            .env("BROKER_LOG__FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start the broker process");
        let broker = Self { child, log };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], setup.http));
        let deadline = Instant::now() + SIM_WAIT;
        while http_get(addr, "/readyz").await.is_none() {
            assert!(
                Instant::now() < deadline,
                "broker {name} not ready in time:\n{}",
                broker.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        broker
    }

    /// The broker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no drain; what was not written is lost.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        tokio::time::timeout(SIM_WAIT, self.child.wait())
            .await
            .expect("killed broker exits")
            .expect("wait");
    }

    /// SIGTERM and a graceful exit.
    pub async fn stop(mut self) {
        let pid = self.child.id().expect("pid").to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(kill.success());
        let status = tokio::time::timeout(SIM_WAIT, self.child.wait())
            .await
            .expect("broker stops after SIGTERM")
            .expect("wait");
        assert!(status.success(), "{status:?}:\n{}", self.log_text());
    }
}
