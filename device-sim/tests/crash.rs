//! A broker crash in the middle of a soak: the broker runs as its own process on a SQLite file,
//! device-sim plays a churn of silent deaths against it, the broker is killed with SIGKILL while
//! some devices are silent (their keep-alive deadlines not reached) and started again with the
//! same node id and database. The crash repair closes the sessions of the killed boot as
//! `broker_restart` at its last heartbeat, and `device-sim verify` must accept exactly those.
//!
//! The broker process is this test binary itself, re-run to run [`broker_process_for_crash_test`]
//! (see `common::broker_process`).

mod common;

use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};

use common::broker_process::{run_broker_child, BrokerProcess, Setup};
use common::{sim, SIM_WAIT};
use testkit::{free_port, temp_dir};

/// The broker's node id, the same across the crash.
const NODE: &str = "crash-node";

/// Not a test: the broker process of [`verify_accepts_sessions_ended_by_a_broker_crash`]. Runs
/// the broker until SIGTERM when started by it, and does nothing otherwise.
#[test]
#[ignore = "the broker process of the crash test, started by it"]
fn broker_process_for_crash_test() {
    run_broker_child();
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
    let setup = Setup {
        child_test: "broker_process_for_crash_test",
        dir: dir.path(),
        mqtt,
        http,
        node: NODE,
    };
    let first = BrokerProcess::start(&setup, "first").await;
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
    let second = BrokerProcess::start(&setup, "second").await;
    let drained = common::rest_of(lines);
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
