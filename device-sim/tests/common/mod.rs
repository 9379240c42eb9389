//! What only device-sim's tests share: the `device-sim` binary under test (Cargo names it to
//! this crate's tests alone) and the bound on waiting for it; the whole broker with its TLS,
//! WebSocket and WSS listeners ([`SecureBroker`]); one `device-sim run` or `verify` as a
//! process, with its outcome; the options and truth files those runs share. Everything else
//! comes from `testkit`.
#![allow(dead_code)]

pub mod broker_process;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use broker::config::Config;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use testkit::{http_get, sqlite_url, temp_dir, FullBroker, TempDir, TestPki};

/// Bound on any wait of these tests: a device-sim run, a broker process or Prometheus, and
/// what a test waits for meanwhile. Longer than `testkit::WAIT`: a run itself takes seconds.
pub const SIM_WAIT: Duration = Duration::from_secs(30);

/// Reads what is left of `lines` on a task of its own (so that the process never blocks on a
/// full pipe); its result is that text, a line each.
pub fn rest_of<R>(mut lines: Lines<R>) -> tokio::task::JoinHandle<String>
where
    R: tokio::io::AsyncBufRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut rest = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    })
}

/// A `device-sim` command, killed if the test drops it.
pub fn sim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-sim"));
    c.kill_on_drop(true);
    c
}

/// `device-sim run --host 127.0.0.1 --port PORT`, killed if the test drops it.
pub fn sim_run(port: u16) -> Command {
    let mut c = sim();
    c.args(["run", "--host", "127.0.0.1", "--port", &port.to_string()]);
    c
}

/// The whole broker in-process on a fresh SQLite file, with its plain TCP, TLS, WebSocket and
/// WebSocket-over-TLS listeners on free loopback ports, and the CA that signed its
/// certificate. The certificate names only `localhost`, so TLS devices connecting to
/// 127.0.0.1 need `--tls-server-name localhost` ([`SecureBroker::tls_args`]).
pub struct SecureBroker {
    /// The broker (declared first, so dropped before the files it uses).
    pub broker: FullBroker,
    /// The throwaway CA of the server certificate, and of client certificates if the test
    /// asks for them.
    pub pki: TestPki,
    /// The SQLite file and journal.
    _data: TempDir,
}

impl SecureBroker {
    /// Starts the broker with every listener, its configuration changed by `adjust` (the
    /// client-certificate keys, say); returns once it is ready.
    pub async fn start(label: &str, adjust: impl FnOnce(&mut Config, &TestPki)) -> Self {
        let pki = TestPki::new(label);
        let server = pki.server(&["localhost"]);
        let data = temp_dir("broker");
        let mut config = FullBroker::config(&sqlite_url(&data), &data, "test-node");
        // Any address: FullBroker binds a free loopback port for each listener that is set.
        let any = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.mqtt.tls.listen = any;
        config.mqtt.ws.listen = any;
        config.mqtt.wss.listen = any;
        config.mqtt.tls.cert_file = Some(server.cert);
        config.mqtt.tls.key_file = Some(server.key);
        adjust(&mut config, &pki);
        let broker = FullBroker::start(config).await;
        broker.ready().await;
        Self {
            broker,
            pki,
            _data: data,
        }
    }

    /// Graceful shutdown; waits until the broker has drained.
    pub async fn stop(self) {
        self.broker.stop().await;
    }

    /// The port of the listener of `transport` (`tcp`, `tls`, `ws` or `wss`).
    pub fn port(&self, transport: &str) -> u16 {
        let addr = match transport {
            "tcp" => Some(self.broker.mqtt),
            "tls" => self.broker.tls,
            "ws" => self.broker.ws,
            "wss" => self.broker.wss,
            other => panic!("no transport {other}"),
        };
        addr.expect("the listener is open").port()
    }

    /// The device-sim options of `transport`: its flag, and for TLS the CA and server name.
    pub fn transport_args(&self, transport: &str) -> Vec<String> {
        match transport {
            "tcp" => Vec::new(),
            "ws" => args(["--ws"]),
            "tls" | "wss" => [args([format!("--{transport}")]), self.tls_args()].concat(),
            other => panic!("no transport {other}"),
        }
    }

    /// `--cafile CA --tls-server-name localhost`.
    pub fn tls_args(&self) -> Vec<String> {
        [
            "--cafile",
            &self.pki.ca_file().display().to_string(),
            "--tls-server-name",
            "localhost",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `GET path` on the API, parsed; `None` unless it answered 200 with JSON.
    pub async fn api_json(&self, path: &str) -> Option<serde_json::Value> {
        let body = http_get(self.broker.http, path).await?;
        serde_json::from_str(&body).ok()
    }

    /// The value of the sample of `name` whose labels include every one of `labels`
    /// (`listener="tls"`, say) on the broker's /metrics; 0 if there is none.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> u64 {
        let text = http_get(self.broker.http, "/metrics")
            .await
            .expect("/metrics answers");
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
            .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
            .unwrap_or(0)
    }

    /// Runs `device-sim verify` against the broker's API; panics with its output unless it
    /// agrees with `truth`.
    pub async fn verify(&self, truth: &Path, settle: &str) -> String {
        verify(&self.broker.api(), truth, settle).await
    }
}

/// Runs `device-sim verify` against the API at `api`; panics with its output unless it agrees
/// with `truth`, which it returns otherwise.
pub async fn verify(api: &str, truth: &Path, settle: &str) -> String {
    let (status, text) = verify_with(api, truth, settle, &[]).await;
    assert!(
        status.success(),
        "verify disagrees with {}:\n{text}",
        truth.display()
    );
    text
}

/// Runs `device-sim verify` against the API at `api` with `extra` arguments; returns its exit
/// status and output, whatever the verdict.
pub async fn verify_with(
    api: &str,
    truth: &Path,
    settle: &str,
    extra: &[&str],
) -> (ExitStatus, String) {
    let out = tokio::time::timeout(
        SIM_WAIT,
        sim()
            .args(["verify", "--api", api, "--settle", settle])
            .arg("--truth")
            .arg(truth)
            .args(extra)
            .output(),
    )
    .await
    .expect("verify ends in time")
    .expect("verify runs");
    (out.status, output_text(&out))
}

/// A finished process's stdout, then its stderr.
fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One `device-sim run`: exit code, `--json` summary, and output (stdout, then stderr).
pub struct Run {
    pub code: Option<i32>,
    pub summary: serde_json::Value,
    pub output: String,
}

impl Run {
    /// The number of errors of `kind` (`connect_failed`, `total`, ...) in the summary.
    pub fn errors(&self, kind: &str) -> u64 {
        self.summary["errors"][kind]
            .as_u64()
            .unwrap_or_else(|| panic!("no errors.{kind} in the summary:\n{}", self.output))
    }

    /// The run ended normally (exit code 0) and no connect ever failed.
    pub fn no_connect_failed(&self) {
        assert_eq!(self.code, Some(0), "{}", self.output);
        assert_eq!(self.errors("connect_failed"), 0, "{}", self.output);
    }

    /// Every one of `count` devices connected, and none ever failed to.
    pub fn all_connected(&self, count: u64) {
        self.no_connect_failed();
        assert_eq!(self.summary["connected"], count, "{}", self.output);
    }

    /// Devices reconnected at least once in the run, and none ever failed to connect.
    pub fn churned(&self) {
        self.no_connect_failed();
        assert!(
            self.summary["reconnects"].as_u64() > Some(0),
            "{}",
            self.output
        );
    }
}

/// Runs `device-sim run --host 127.0.0.1 --port PORT` with `args`, its summary written to
/// `dir/NAME.json`.
pub async fn run(port: u16, dir: &Path, name: &str, args: &[String]) -> Run {
    let json = dir.join(format!("{name}.json"));
    let mut command = sim_run(port);
    command.arg("--json").arg(&json).args(args);
    finish(command, &json).await
}

/// Runs `command` (a `device-sim run` that writes its summary to `json`) to completion.
pub async fn finish(mut command: Command, json: &Path) -> Run {
    let out = tokio::time::timeout(
        SIM_WAIT,
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("device-sim ends in time")
    .expect("device-sim runs");
    Run {
        code: out.status.code(),
        summary: std::fs::read_to_string(json)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null),
        output: output_text(&out),
    }
}

/// Reads a device-sim run's stdout until it holds its devices (bounded): the `holding` line,
/// and the rest of its output, to keep open while it runs.
pub async fn holding(child: &mut Child) -> (String, Lines<BufReader<ChildStdout>>) {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(SIM_WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read device-sim") {
            if line.starts_with("holding") {
                return line;
            }
        }
        panic!("device-sim ended without holding");
    })
    .await
    .expect("device-sim holds in time");
    (line, lines)
}

/// `--duration SECONDS --keepalive 5 --connect-timeout 3`.
pub fn timing(seconds: &str) -> Vec<String> {
    args([
        "--duration",
        seconds,
        "--keepalive",
        "5",
        "--connect-timeout",
        "3",
    ])
}

/// `--scenario churn --churn-mix clean,abrupt`: `percent` of the devices leave per minute,
/// cleanly or abruptly, and come back after `pause` seconds on average.
pub fn clean_abrupt_churn(percent: &str, pause: &str) -> Vec<String> {
    args([
        "--scenario",
        "churn",
        "--churn-mix",
        "clean,abrupt",
        "--churn-percent",
        percent,
        "--churn-pause",
        pause,
    ])
}

/// Number of truth lines with this event.
pub fn count_events(truth: &Path, event: &str) -> usize {
    let needle = format!("\"event\":\"{event}\"");
    std::fs::read_to_string(truth)
        .expect("truth file")
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

/// `args` as owned strings, for [`run`].
pub fn args<S: AsRef<str>>(args: impl IntoIterator<Item = S>) -> Vec<String> {
    args.into_iter().map(|a| a.as_ref().to_owned()).collect()
}
