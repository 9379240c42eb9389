//! `--protocol 5`: scenarios run by MQTT 5 devices (rumqttc's v5 client), at once against one
//! broker with all four listeners: takeover over TCP, churn with silent deaths over TLS, storm
//! over WebSocket and flap over WebSocket over TLS. The devices record every DISCONNECT the
//! broker sends them (0x8E on a takeover, 0x8D after a silent death) and `device-sim verify`
//! checks each against the reason the broker recorded for that session; a truth whose code
//! disagrees with the broker fails. About 13 s: the runs at once (the churn one 10 s, as a silent
//! death's keep-alive deadline is 7.5 s away at the shortest keep-alive rumqttc's MQTT 5 client
//! allows), then the verifies.

mod common;

use tokio::task::JoinSet;

use common::{args, count_events, run, verify, verify_with, SecureBroker};
use testkit::temp_dir;

/// One run of the round.
struct Case {
    scenario: &'static str,
    transport: &'static str,
    /// Options of the scenario.
    options: &'static [&'static str],
    /// --duration.
    duration: &'static str,
}

/// Devices of each run.
const DEVICES: usize = 20;

static ROUND: [Case; 4] = [
    Case {
        scenario: "takeover",
        transport: "tcp",
        options: &["--keepalive", "5", "--churn-percent", "900"],
        duration: "4",
    },
    // Keep-alive 5 s, the shortest rumqttc's MQTT 5 client allows: a silently dead device's
    // session ends 7.5 s after its last packet and the device reads the broker's DISCONNECT
    // when it comes back 8.5 s after its death; so silent deaths only in the first 1.5 s (the
    // scheduler starts none whose comeback would fall after the end), then abrupt closes.
    Case {
        scenario: "churn",
        transport: "tls",
        options: &[
            "--keepalive",
            "5",
            "--churn-percent",
            "1800",
            "--churn-mix",
            "silent",
            "--churn-pause",
            "0.3",
        ],
        duration: "10",
    },
    Case {
        scenario: "storm",
        transport: "ws",
        options: &["--keepalive", "5", "--storm-every", "30"],
        duration: "4",
    },
    Case {
        scenario: "flap",
        transport: "wss",
        options: &["--keepalive", "5", "--flappers", "5"],
        duration: "4",
    },
];

/// The `server_disconnect` records of a truth file: their reason codes.
fn codes(truth: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(truth)
        .expect("truth file")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "server_disconnect")
        .map(|r| r["reason_code"].as_u64().expect("a reason code"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_scenarios_record_the_brokers_disconnects_and_verify_passes() {
    let started = std::time::Instant::now();
    let broker = SecureBroker::start("mqtt5", |_, _| {}).await;
    let dir = temp_dir("mqtt5");
    let truth = |case: &Case| dir.path().join(format!("{}.jsonl", case.scenario));
    let mut runs = JoinSet::new();
    for (i, case) in ROUND.iter().enumerate() {
        let options = [
            broker.transport_args(case.transport),
            args([
                "--protocol",
                "5",
                "--count",
                &DEVICES.to_string(),
                "--prefix",
                &format!("v5{}-", case.scenario),
                "--duration",
                case.duration,
                "--connect-timeout",
                "3",
                "--scenario",
                case.scenario,
                "--truth",
                &truth(case).display().to_string(),
            ]),
            args(case.options),
        ]
        .concat();
        let (port, dir) = (broker.port(case.transport), dir.path().to_owned());
        runs.spawn(async move { (i, run(port, &dir, case.scenario, &options).await) });
    }
    let mut runs = all(runs).await;
    runs.sort_by_key(|(i, _)| *i);

    for (case, (_, run)) in ROUND.iter().zip(&runs) {
        let what = format!("{} over {}:\n{}", case.scenario, case.transport, run.output);
        assert_eq!(run.code, Some(0), "{what}");
        assert_eq!(run.errors("connect_failed"), 0, "{what}");
        assert_eq!(run.summary["protocol"], "5", "{what}");
        let truth = truth(case);
        let codes = codes(&truth);
        match case.scenario {
            "takeover" => {
                // Every replaced connection was told why.
                let taken_over = count_events(&truth, "taken_over");
                assert!(taken_over > 0, "{what}");
                assert_eq!(codes, vec![0x8E; taken_over], "{what}");
                assert_eq!(
                    run.summary["server_disconnects"]["0x8E"], taken_over,
                    "{what}"
                );
                assert!(run.output.contains("server_disconnects=0x8E:"), "{what}");
            }
            "churn" => {
                assert!(count_events(&truth, "silent_death") > 0, "{what}");
                assert!(codes.contains(&0x8D), "no 0x8D read: {codes:?}\n{what}");
                assert!(codes.iter().all(|&c| c == 0x8D), "{codes:?}\n{what}");
            }
            _ => {
                assert!(count_events(&truth, "connected") > DEVICES, "{what}");
                assert!(codes.is_empty(), "{codes:?}\n{what}");
            }
        }
    }

    // The silently dead devices came back after their keep-alive deadlines.
    let mut verdicts = JoinSet::new();
    for case in &ROUND {
        let (api, truth) = (broker.broker.api(), truth(case));
        verdicts.spawn(async move { verify(&api, &truth, "2").await });
    }
    for out in all(verdicts).await {
        eprintln!("{out}");
        assert!(out.contains("OK"), "{out}");
        if out.contains("MQTT 5 DISCONNECTs") {
            assert!(
                out.contains(" 0 wrong, 0 with a reason code not checked"),
                "{out}"
            );
        }
    }

    // A truth that says the broker kicked a device it took over fails verify.
    let takeovers = truth(&ROUND[0]);
    let text = std::fs::read_to_string(&takeovers).expect("truth");
    let lie = text.replacen("\"reason_code\":142", "\"reason_code\":152", 1);
    assert_ne!(lie, text);
    let lied = dir.path().join("lie.jsonl");
    std::fs::write(&lied, lie).expect("write truth");
    let (status, out) = verify_with(&broker.broker.api(), &lied, "0", &[]).await;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("DISCONNECT 0x98") && out.contains("(want kicked)"),
        "{out}"
    );
    assert!(out.contains("FAIL"), "{out}");
    eprintln!("MQTT 5 round took {:?}", started.elapsed());
    broker.stop().await;
}

/// The outputs of every task of `set`, in the order they end; a task's panic is the test's.
async fn all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(done) = set.join_next().await {
        match done {
            Ok(value) => out.push(value),
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    out
}
