//! `device-sim run --scenario durable` against a broker process killed with SIGKILL in the
//! middle of the publish phase and started again on the same data directory: 500 persistent
//! sessions, 10 QoS 1 commands and 10 retained states each, published at a bounded rate so
//! that the kill falls between the first and the last PUBLISH. The run must ride out the crash
//! (reconnect, go on) and its check must pass: every acknowledged message delivered, in order,
//! and every retained state the last acknowledged one or newer.
//!
//! The broker process is this test binary itself, re-run to run
//! [`broker_process_for_durable_test`] (see `common::broker_process`).

mod common;

use std::process::Stdio;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};

use common::broker_process::{run_broker_child, BrokerProcess, Setup};
use common::{sim_run, SIM_WAIT};
use testkit::{free_port, temp_dir};

/// Devices, and command messages per device.
const DEVICES: u64 = 500;
const MESSAGES: u64 = 10;
/// PUBLISHes per second: 2 × 500 × 10 of them take 5 s at least, so the kill lands in the
/// publish phase.
const RATE: u64 = 2000;

/// Not a test: the broker process of [`durable_scenario_survives_kill_9`]. Runs the broker
/// until SIGTERM when started by it, and does nothing otherwise.
#[test]
#[ignore = "the broker process of the durable test, started by it"]
fn broker_process_for_durable_test() {
    run_broker_child();
}

/// A field `name=N` of a device-sim status line.
fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_scenario_survives_kill_9() {
    let started = Instant::now();
    let dir = temp_dir("durable");
    let setup = Setup {
        child_test: "broker_process_for_durable_test",
        dir: dir.path(),
        mqtt: free_port(),
        http: free_port(),
        node: "durable-node",
    };
    let first = BrokerProcess::start(&setup, "first").await;
    let json = dir.path().join("run.json");
    let truth = dir.path().join("truth.jsonl");
    let mut run = sim_run(setup.mqtt)
        .args([
            "--scenario",
            "durable",
            "--count",
            &DEVICES.to_string(),
            "--messages",
            &MESSAGES.to_string(),
            "--publish-rate",
            &RATE.to_string(),
            "--broker-wait",
            "30",
            "--json",
        ])
        .arg(&json)
        .arg("--truth")
        .arg(&truth)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("device-sim starts");
    let mut lines = BufReader::new(run.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    // Kill once a tenth of the command messages is acknowledged, the publish phase under way.
    let at_kill = tokio::time::timeout(SIM_WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains("phase=publish")
                && field(&line, "acknowledged").is_some_and(|n| n >= DEVICES * MESSAGES / 10)
            {
                return line;
            }
            assert!(
                !line.contains("phase=drain") && !line.starts_with("summary"),
                "the publish phase ended before the kill:\n{seen}"
            );
        }
        panic!("device-sim ended before the publish phase was under way:\n{seen}");
    })
    .await
    .expect("the publish phase gets under way in time");
    first.kill().await;
    let second = BrokerProcess::start(&setup, "second").await;

    let rest = common::rest_of(lines);
    let out = tokio::time::timeout(SIM_WAIT, run.wait_with_output())
        .await
        .expect("device-sim ends in time")
        .expect("wait");
    let rest = rest.await.unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{:?} (killed at {at_kill:?})\n{seen}{rest}{stderr}",
        out.status
    );
    assert!(rest.contains("durable: OK"), "{rest}");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("--json written"))
            .expect("JSON summary");
    let count = |key: &str| {
        summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key}: {summary}"))
    };
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(count("missing"), 0, "{summary}");
    assert_eq!(count("out_of_order"), 0, "{summary}");
    assert_eq!(count("retained_stale"), 0, "{summary}");
    assert_eq!(count("sessions_lost"), 0, "{summary}");
    assert_eq!(count("devices"), DEVICES);
    assert_eq!(count("retained_checked"), DEVICES, "{summary}");
    assert!(
        count("connection_losses") > 0,
        "no connection saw the crash: {summary}"
    );
    // Acknowledged before the kill, and the rest after the restart (a few may be lost in flight).
    let acknowledged = count("acknowledged");
    assert!(
        acknowledged > DEVICES * MESSAGES * 9 / 10 && acknowledged <= DEVICES * MESSAGES,
        "{summary}"
    );
    assert!(count("delivered") >= acknowledged, "{summary}");
    let truth_lines = std::fs::read_to_string(&truth).expect("--truth written");
    assert_eq!(truth_lines.lines().count() as u64, DEVICES);

    second.stop().await;
    eprintln!("{rest}");
    eprintln!(
        "durable test took {:?}; killed at {at_kill:?}",
        started.elapsed()
    );
}
