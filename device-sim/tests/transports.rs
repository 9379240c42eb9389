//! Every scenario over a transport of its own, at once against one broker with all four
//! listeners: steady over TCP, churn (clean, abrupt and silent leaves) over TLS, flap over
//! WebSocket, storm and takeover over WebSocket over TLS. Each run has its own client ids and
//! truth; `device-sim verify` must agree with each, and every device's row names the listener
//! of its last session. About 7 s in all: five 5 s runs at once, then five verifies.

mod common;

use tokio::task::JoinSet;

use common::{args, count_events, run, verify, SecureBroker};
use testkit::temp_dir;

/// One run of the round.
struct Case {
    scenario: &'static str,
    transport: &'static str,
    /// Options of the scenario.
    options: &'static [&'static str],
}

/// Devices of each run.
const DEVICES: usize = 20;

/// Each scenario once, every transport at least once.
static ROUND: [Case; 5] = [
    Case {
        scenario: "steady",
        transport: "tcp",
        options: &["--keepalive", "5"],
    },
    // Keep-alive 1 s: a silently dead device's session ends 1.5 s later, well within the run.
    Case {
        scenario: "churn",
        transport: "tls",
        options: &[
            "--keepalive",
            "1",
            "--churn-percent",
            "900",
            "--churn-pause",
            "0.3",
        ],
    },
    Case {
        scenario: "flap",
        transport: "ws",
        options: &["--keepalive", "5", "--flappers", "5"],
    },
    // One storm, half-way.
    Case {
        scenario: "storm",
        transport: "wss",
        options: &["--keepalive", "5", "--storm-every", "30"],
    },
    Case {
        scenario: "takeover",
        transport: "wss",
        options: &["--keepalive", "5", "--churn-percent", "900"],
    },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_over_its_own_transport_then_verify_passes() {
    let started = std::time::Instant::now();
    let broker = SecureBroker::start("transports", |_, _| {}).await;
    let dir = temp_dir("transports");
    let truth = |case: &Case| dir.path().join(format!("{}.jsonl", case.scenario));
    let mut runs = JoinSet::new();
    for (i, case) in ROUND.iter().enumerate() {
        let options = [
            broker.transport_args(case.transport),
            args([
                "--count",
                &DEVICES.to_string(),
                "--prefix",
                &format!("{}-", case.scenario),
                "--duration",
                "5",
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
        let truth = truth(case);
        let connects = count_events(&truth, "connected");
        match case.scenario {
            "steady" => assert_eq!(connects, DEVICES, "{what}"),
            "takeover" => assert!(count_events(&truth, "taken_over") > 0, "{what}"),
            "storm" => {
                assert!(run.output.contains("storm t="), "{what}");
                assert_eq!(run.summary["connected"], DEVICES, "{what}");
                assert!(connects > DEVICES, "{what}");
            }
            _ => assert!(connects > DEVICES, "{what}"),
        }
    }

    // Settled past the last silent death's keep-alive deadline (1.5 × 1 s).
    let mut verdicts = JoinSet::new();
    for case in &ROUND {
        let (api, truth) = (broker.broker.api(), truth(case));
        verdicts.spawn(async move { verify(&api, &truth, "2").await });
    }
    all(verdicts).await;
    for case in &ROUND {
        for n in 0..DEVICES {
            let id = format!("{}-{n}", case.scenario);
            let device = broker
                .api_json(&format!("/api/v1/devices/{id}"))
                .await
                .unwrap_or_else(|| panic!("{id} is known to the API"));
            assert_eq!(device["listener"], case.transport, "{device}");
        }
    }
    eprintln!("round of scenarios took {:?}", started.elapsed());
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
