//! A broker crash in the middle of a soak: the broker runs as its own process on a SQLite file,
//! device-sim plays a churn of silent deaths against it, the broker is killed with SIGKILL while
//! some devices are silent (their keep-alive deadlines not reached) and started again with the
//! same node id and database. The crash repair closes the sessions of the killed boot as
//! `broker_restart` at its last heartbeat, and `device-sim verify` must accept exactly those.
//!
//! The broker process is this test binary itself, re-run with [`BROKER_CHILD`] set so that
//! [`broker_process_for_crash_test`] runs `broker::run` configured from `BROKER_*` variables as
//! the `broker` binary is: Cargo gives device-sim's tests only device-sim's own binary, and a
//! `target/debug/broker` found on disk could be older than the code under test.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use common::{sim, SIM_WAIT};
use testkit::{free_port, http_get, temp_dir};

/// Set in the environment of the re-run test binary that plays the broker.
const BROKER_CHILD: &str = "DEVICE_SIM_TEST_BROKER_CHILD";
/// The broker's node id, the same across the crash.
const NODE: &str = "crash-node";

/// Not a test: the broker process of [`verify_accepts_sessions_ended_by_a_broker_crash`]. Runs
/// the broker until SIGTERM when [`BROKER_CHILD`] is set, and does nothing otherwise.
#[test]
#[ignore = "the broker process of the crash test, started by it"]
fn broker_process_for_crash_test() {
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

/// One broker process.
struct BrokerProcess {
    child: Child,
    log: std::path::PathBuf,
}

impl BrokerProcess {
    /// Starts the broker on `mqtt` and `http` with its data in `dir`, and waits until it is
    /// ready (migrations applied, crash repair of earlier boots done).
    async fn start(dir: &Path, mqtt: u16, http: u16, name: &str) -> Self {
        let log = dir.join(format!("broker-{name}.log"));
        let stderr = std::fs::File::create(&log).expect("broker log file");
        let exe = std::env::current_exe().expect("test binary");
        let child = Command::new(exe)
            .args([
                "--exact",
                "broker_process_for_crash_test",
                "--ignored",
                "--nocapture",
            ])
            .env(BROKER_CHILD, "1")
            .env("BROKER_MQTT__LISTEN", format!("127.0.0.1:{mqtt}"))
            .env("BROKER_HTTP__LISTEN", format!("127.0.0.1:{http}"))
            .env(
                "BROKER_DATABASE__URL",
                format!("sqlite://{}", dir.join("broker.db").display()),
            )
            .env("BROKER_BRIDGE__JOURNAL_PATH", dir.join("presence.journal"))
            .env("BROKER_PERSISTENCE__DIR", dir.join("state"))
            .env("BROKER_BRIDGE__BATCH_INTERVAL", "20ms")
            .env("BROKER_NODE__ID", NODE)
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
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
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

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no drain; events not yet written are lost.
    async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        tokio::time::timeout(SIM_WAIT, self.child.wait())
            .await
            .expect("killed broker exits")
            .expect("wait");
    }

    /// SIGTERM and a graceful exit.
    async fn stop(mut self) {
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

/// The `away=N` of a device-sim status line (`t=3 connected=.. connecting=.. away=N ...`).
fn away(line: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("away="))?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_sessions_ended_by_a_broker_crash() {
    let started = Instant::now();
    let dir = temp_dir("crash");
    let (mqtt, http) = (free_port(), free_port());
    let first = BrokerProcess::start(dir.path(), mqtt, http, "first").await;
    let truth = dir.path().join("truth.jsonl");

    // Silent deaths only, 3 per second among 30 devices; a silent device stays away at least
    // 1.5 × 2 s + 1 s, so the broker closes it 3 s after its last ping at the earliest.
    let mut run = sim()
        .args([
            "run",
            "--host",
            "127.0.0.1",
            "--port",
            &mqtt.to_string(),
            "--count",
            "30",
            "--keepalive",
            "2",
            "--duration",
            "9",
            "--scenario",
            "churn",
            "--churn-mix",
            "silent",
            "--churn-percent",
            "600",
            "--churn-pause",
            "0.3",
            "--truth",
        ])
        .arg(&truth)
        .stdout(Stdio::piped())
        .spawn()
        .expect("device-sim starts");
    let mut lines = BufReader::new(run.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    let at_kill = tokio::time::timeout(SIM_WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            seen.push_str(&line);
            seen.push('\n');
            if away(&line).is_some_and(|n| n >= 4) {
                return line;
            }
        }
        panic!("device-sim ended before 4 devices were silent:\n{seen}");
    })
    .await
    .expect("devices go silent in time");

    // Crash while those devices are silent and not yet timed out, then start again.
    first.kill().await;
    let second = BrokerProcess::start(dir.path(), mqtt, http, "second").await;
    let drained = tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let status = tokio::time::timeout(SIM_WAIT, run.wait())
        .await
        .expect("device-sim ends in time")
        .expect("wait");
    let rest = drained.await.unwrap_or_default();
    assert!(status.success(), "{status:?}\n{seen}{rest}");
    assert!(rest.contains("summary connected="), "{rest}");

    let out = tokio::time::timeout(
        SIM_WAIT,
        sim()
            .args([
                "verify",
                "--api",
                &format!("http://127.0.0.1:{http}"),
                "--settle",
                "0.5",
                "--truth",
            ])
            .arg(&truth)
            .output(),
    )
    .await
    .expect("verify ends in time")
    .expect("verify runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "verify failed after a broker crash (killed at {at_kill:?}):\n{report}"
    );
    assert!(
        report.contains(&format!("broker crash: node {NODE} boot ")),
        "{report}"
    );
    let by_crash: u64 = report
        .split(" ended by a broker crash")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        by_crash > 0,
        "no silent session was open at the crash:\n{report}"
    );
    second.stop().await;
    eprintln!("{report}");
    eprintln!(
        "crash test took {:?}; verify accepted {by_crash} sessions ended by the crash",
        started.elapsed()
    );
}
