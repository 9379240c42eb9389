//! The broker binary as a process of its own: for tests that stop it with a signal (SIGTERM
//! for a clean shutdown, SIGKILL for a crash) and start it again on the same files.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::WAIT;

/// A broker process on ports 0, with JSON logs read from its stderr.
pub struct BrokerProcess {
    /// The process.
    pub child: Child,
    /// Its MQTT listener's address.
    pub mqtt: SocketAddr,
    /// Its HTTP listener's address.
    pub http: SocketAddr,
    /// Its log lines after the listeners came up (read so that the pipe never fills).
    pub lines: mpsc::UnboundedReceiver<String>,
}

impl BrokerProcess {
    /// Starts the broker binary `bin` with its files in `data`: the SQLite presence store
    /// `broker.db`, the journal `presence.journal`, the broker state in `state/`; `env` adds
    /// or overrides `BROKER_*` variables. Returns once both listeners are up.
    pub async fn start(bin: &str, data: &Path, env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(bin)
            .env("BROKER_MQTT__LISTEN", "127.0.0.1:0")
            .env("BROKER_HTTP__LISTEN", "127.0.0.1:0")
            .env("BROKER_DATABASE__URL", crate::sqlite_url(data))
            .env("BROKER_PERSISTENCE__DIR", data.join("state"))
            // Small logs: a test broker grows 1 MiB of log ahead, not 64.
            .env("BROKER_PERSISTENCE__SEGMENT_BYTES", "1048576")
            .env("BROKER_BRIDGE__JOURNAL_PATH", data.join("presence.journal"))
            .env("BROKER_LOG__FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn broker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let http = listen(&mut lines, "HTTP listener ready").await;
        let mqtt = listen(&mut lines, "MQTT listener ready").await;
        Self {
            child,
            mqtt,
            http,
            lines,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("broker is running")
    }

    /// Sends `signal` (such as `-TERM` or `-KILL`) to it.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(signal)
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal}");
    }

    /// Waits (within the tests' deadline) until it has exited.
    pub async fn exited(&mut self) -> ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("broker exits within the deadline")
            .expect("waiting for the broker")
    }

    /// A clean shutdown: SIGTERM, then its exit, which must be a success.
    pub async fn terminate(mut self) {
        self.signal("-TERM");
        let status = self.exited().await;
        assert!(status.success(), "clean shutdown: {status}");
    }

    /// A crash: SIGKILL, then its end.
    pub async fn kill(mut self) {
        self.signal("-KILL");
        let status = self.exited().await;
        assert!(!status.success(), "killed, not exited: {status}");
    }
}

/// The address of the first log line containing `needle` ("... listener ready").
async fn listen(lines: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> SocketAddr {
    let line = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.recv().await.expect("broker still logging");
            if line.contains(needle) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line containing {needle:?}"));
    let value: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
    value["listen"]
        .as_str()
        .expect("listen field")
        .parse()
        .expect("address")
}
