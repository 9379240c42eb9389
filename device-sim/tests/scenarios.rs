//! End to end: the broker runs in-process (SQLite store) on 127.0.0.1:0, the `device-sim`
//! binary plays a scenario against it with `--truth`, and `device-sim verify` checks the
//! broker's presence API against that truth.

mod common;

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;

use common::{clean_abrupt_churn, count_events, holding, sim, sim_run, SIM_WAIT};
use testkit::{free_port, http_response, temp_dir, FullBroker};

/// The JSON file at `path` (a summary written by `--json`).
fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("valid JSON")
}

/// Runs `device-sim run` to completion with `args` after the common ones.
async fn run_sim(broker: &FullBroker, truth: &Path, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        SIM_WAIT,
        sim()
            .args(run_args(broker, truth))
            .args(args)
            .stdout(Stdio::piped())
            .output(),
    )
    .await
    .expect("device-sim run ends in time")
    .expect("device-sim runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "device-sim run failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn run_args(broker: &FullBroker, truth: &Path) -> Vec<String> {
    [
        "run",
        "--host",
        "127.0.0.1",
        "--port",
        &broker.mqtt.port().to_string(),
        "--truth",
        &truth.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs `device-sim verify`; returns its exit status and output.
async fn verify(broker: &FullBroker, truth: &Path, settle: &str) -> (ExitStatus, String) {
    verify_with(broker, truth, settle, &[]).await
}

/// Runs `device-sim verify` with extra arguments; returns its exit status and output.
async fn verify_with(
    broker: &FullBroker,
    truth: &Path,
    settle: &str,
    extra: &[&str],
) -> (ExitStatus, String) {
    common::verify_with(&broker.api(), truth, settle, extra).await
}

/// Churn with every way of leaving (silent deaths with keep-alive 1 s); the devices still
/// connected at the end stay connected (`--end-state keep`) while verify checks both online
/// and offline devices, then SIGTERM makes them disconnect and verify passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_with_silent_deaths_then_verify_passes() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let started = Instant::now();
    let mut child = sim()
        .args(run_args(&broker, &truth))
        .args([
            "--count",
            "60",
            "--keepalive",
            "1",
            "--duration",
            "7",
            "--scenario",
            "churn",
            "--churn-percent",
            "600",
            "--churn-pause",
            "0.3",
            "--end-state",
            "keep",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("device-sim starts");
    let (holding, _lines) = holding(&mut child).await;
    assert!(count_events(&truth, "silent_death") > 0, "no silent death");
    assert!(
        count_events(&truth, "disconnect_clean") > 0,
        "no clean leave"
    );
    assert!(count_events(&truth, "close_abrupt") > 0, "no abrupt close");
    assert_eq!(count_events(&truth, "final"), 60);

    let (status, out) = verify(&broker, &truth, "2").await;
    assert!(
        status.success(),
        "verify failed while holding ({holding}):\n{out}"
    );
    assert!(out.contains("silent deaths:"), "{out}");
    assert!(!out.contains("WRONG"), "{out}");

    // SIGTERM: the held devices disconnect and record it.
    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let exit = tokio::time::timeout(SIM_WAIT, child.wait())
        .await
        .expect("device-sim exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    assert_eq!(count_events(&truth, "final"), 120);
    let (status, out) = verify(&broker, &truth, "0.5").await;
    assert!(status.success(), "verify failed after the hold:\n{out}");
    eprintln!("churn test took {:?}", started.elapsed());
    broker.stop().await;
}

/// Takeovers: the replaced connection sees its close, the broker records `takeover`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_then_verify_passes() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    run_sim(
        &broker,
        &truth,
        &[
            "--count",
            "40",
            "--keepalive",
            "5",
            "--duration",
            "4",
            "--scenario",
            "takeover",
            "--churn-percent",
            "900",
        ],
    )
    .await;
    let takeovers = count_events(&truth, "takeover");
    assert!(takeovers > 0, "no takeover");
    assert_eq!(count_events(&truth, "taken_over"), takeovers);
    assert_eq!(count_events(&truth, "takeover_connected"), takeovers);
    let (status, out) = verify(&broker, &truth, "0.5").await;
    assert!(status.success(), "verify failed:\n{out}");
    assert!(out.contains("OK"), "{out}");
    broker.stop().await;
}

/// Flipping one device's final state in the truth makes verify fail with exit code 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_truth_fails_verify() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    run_sim(
        &broker,
        &truth,
        &["--count", "20", "--keepalive", "5", "--duration", "2"],
    )
    .await;
    let (status, out) = verify(&broker, &truth, "0.3").await;
    assert!(status.success(), "verify of the real truth failed:\n{out}");

    let text = std::fs::read_to_string(&truth).expect("truth");
    let flipped = text.replacen("\"state\":\"offline\"", "\"state\":\"online\"", 1);
    assert_ne!(flipped, text, "no final record to flip");
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, flipped).expect("write");
    let (status, out) = verify(&broker, &bad, "0").await;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("WRONG"), "{out}");
    assert!(
        out.contains("truth online but the API says offline"),
        "{out}"
    );

    // Unreachable API: an error, not a verdict.
    let gone = format!("http://{}", broker.http);
    broker.stop().await;
    let out = sim()
        .args(["verify", "--api", &gone, "--settle", "0", "--truth"])
        .arg(&truth)
        .output()
        .await
        .expect("verify runs");
    assert_eq!(out.status.code(), Some(2));
}

/// `--json` writes the summary as parseable JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_summary_is_written() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let json = dir.path().join("summary.json");
    let json_arg = json.display().to_string();
    let out = run_sim(
        &broker,
        &truth,
        &[
            "--count",
            "10",
            "--keepalive",
            "5",
            "--duration",
            "1",
            "--json",
            &json_arg,
        ],
    )
    .await;
    assert!(out.contains("summary connected=10 target=10"), "{out}");
    let v = read_json(&json);
    assert_eq!(v["connected"], 10, "{v}");
    assert_eq!(v["target"], 10, "{v}");
    assert_eq!(v["connack"]["samples"], 10, "{v}");
    assert!(v["connack"]["p99_ms"].as_f64().is_some(), "{v}");
    assert_eq!(v["errors"]["total"], 0, "{v}");
    assert_eq!(v["scenario"], "steady", "{v}");
    assert_eq!(v["workers"], 1, "{v}");
    broker.stop().await;
}

/// `--workers 2` with `--end-state keep`: aggregated status and `/metrics`, the ready file,
/// a merged truth that verify accepts while holding, SIGTERM forwarded to the workers, then
/// the aggregated summary and JSON and verify again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_aggregate_and_verify_passes() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let json = dir.path().join("summary.json");
    let ready = dir.path().join("ready");
    let metrics = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let mut child = sim()
        .args(run_args(&broker, &truth))
        .args([
            "--count",
            "60",
            "--keepalive",
            "5",
            "--duration",
            "3",
            "--workers",
            "2",
            "--end-state",
            "keep",
            "--metrics-listen",
            &metrics,
            "--ready-file",
            &ready.display().to_string(),
            "--json",
        ])
        .arg(&json)
        .stdout(Stdio::piped())
        .spawn()
        .expect("device-sim starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut all = String::new();
    let mut scraped = None;
    tokio::time::timeout(SIM_WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            all.push_str(&line);
            all.push('\n');
            if scraped.is_none() && line.starts_with("t=") && line.contains(" connected=60 ") {
                scraped = http_response(&metrics, "/metrics").await.map(|r| r.body);
            }
            if line.starts_with("holding") {
                return;
            }
        }
        panic!("device-sim ended without holding:\n{all}");
    })
    .await
    .expect("device-sim holds in time");
    assert!(all.contains("holding connected=60 "), "{all}");
    let scraped = scraped.expect("a status line showed all 60 connected");
    assert!(scraped.contains("devicesim_connected 60\n"), "{scraped}");
    assert!(
        scraped.contains("devicesim_connect_latency_seconds_count 60\n"),
        "{scraped}"
    );
    let ready_text = std::fs::read_to_string(&ready).expect("ready file");
    assert!(ready_text.starts_with("connected=60 "), "{ready_text}");
    assert_eq!(count_events(&truth, "final"), 60);
    let (status, out) = verify(&broker, &truth, "0.5").await;
    assert!(status.success(), "verify failed while holding:\n{out}");

    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    tokio::time::timeout(SIM_WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            all.push_str(&line);
            all.push('\n');
        }
    })
    .await
    .expect("device-sim ends in time after SIGTERM");
    let exit = tokio::time::timeout(SIM_WAIT, child.wait())
        .await
        .expect("device-sim exits")
        .expect("wait");
    assert!(exit.success(), "{exit:?}\n{all}");
    assert!(!all.contains("status {"), "worker lines leaked:\n{all}");
    assert!(all.contains("summary connected=60 target=60"), "{all}");
    let v = read_json(&json);
    assert_eq!(v["connected"], 60, "{v}");
    assert_eq!(v["workers"], 2, "{v}");
    assert_eq!(v["connack"]["samples"], 60, "{v}");
    assert!(v.get("connack_hist_us").is_none(), "{v}");
    assert_eq!(count_events(&truth, "final"), 120);
    assert_eq!(count_events(&truth, "connected"), 60);
    let files = std::fs::read_dir(dir.path()).expect("dir").count();
    assert_eq!(files, 3, "worker truth files left behind");
    let (status, out) = verify(&broker, &truth, "0.5").await;
    assert!(
        status.success(),
        "verify failed on the merged truth:\n{out}"
    );
    eprintln!("workers test took {:?}", started.elapsed());
    broker.stop().await;
}

/// Flap: a few devices leave and come back every few hundred ms; verify agrees afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flap_then_verify_passes() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let started = Instant::now();
    let out = run_sim(
        &broker,
        &truth,
        &[
            "--count",
            "40",
            "--keepalive",
            "5",
            "--duration",
            "5",
            "--scenario",
            "flap",
            "--flappers",
            "5",
        ],
    )
    .await;
    assert!(out.contains("summary connected="), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("t=")),
        "no status lines:\n{out}"
    );
    let leaves = count_events(&truth, "disconnect_clean") + count_events(&truth, "close_abrupt");
    assert!(leaves > 5, "only {leaves} flaps:\n{out}");
    assert!(count_events(&truth, "connected") > 40, "no reconnect");
    let (status, out) = verify(&broker, &truth, "0.5").await;
    assert!(status.success(), "verify failed after flapping:\n{out}");
    assert!(out.contains("OK"), "{out}");
    eprintln!("flap test took {:?}", started.elapsed());
    broker.stop().await;
}

/// Storm: once half-way every connected device closes abruptly and reconnects; verify agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_then_verify_passes() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let started = Instant::now();
    let out = run_sim(
        &broker,
        &truth,
        &[
            "--count",
            "60",
            "--keepalive",
            "5",
            "--duration",
            "6",
            "--scenario",
            "storm",
            "--storm-every",
            "30",
        ],
    )
    .await;
    let storms: Vec<&str> = out.lines().filter(|l| l.starts_with("storm t=")).collect();
    assert_eq!(storms.len(), 1, "want one storm half-way:\n{out}");
    assert!(!storms[0].contains("dropping=0"), "{out}");
    assert!(
        out.contains("summary connected=60 target=60"),
        "not all back after the storm:\n{out}"
    );
    assert!(count_events(&truth, "connected") > 60, "no reconnect");
    let (status, out) = verify(&broker, &truth, "0.5").await;
    assert!(status.success(), "verify failed after the storm:\n{out}");
    assert!(out.contains("OK"), "{out}");
    eprintln!("storm test took {:?}", started.elapsed());
    broker.stop().await;
}

/// `verify --database-url` reads the broker's SQLite file directly: it agrees with the real
/// truth (devices both online and offline), and a flipped final state fails with exit code 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_url_verify_passes_and_catches_corruption() {
    let broker = FullBroker::start_sqlite().await;
    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let started = Instant::now();
    let mut child = sim()
        .args(run_args(&broker, &truth))
        .args([
            "--count",
            "30",
            "--keepalive",
            "5",
            "--duration",
            "3",
            "--end-state",
            "keep",
        ])
        .args(clean_abrupt_churn("600", "30"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("device-sim starts");
    let (_, _lines) = holding(&mut child).await;
    let text = std::fs::read_to_string(&truth).expect("truth");
    assert!(text.contains("\"state\":\"online\""), "nobody online");
    assert!(text.contains("\"state\":\"offline\""), "nobody offline");

    let db = ["--database-url", broker.database_url()];
    let (status, out) = verify_with(&broker, &truth, "0.5", &db).await;
    assert!(status.success(), "verify --database-url failed:\n{out}");
    assert!(out.contains("database state: 30 devices"), "{out}");
    assert!(out.contains("known to the database, 0 wrong"), "{out}");

    let bad = dir.path().join("bad.jsonl");
    let flipped = text.replacen("\"state\":\"online\"", "\"state\":\"offline\"", 1);
    std::fs::write(&bad, flipped).expect("write");
    let (status, out) = verify_with(&broker, &bad, "0", &db).await;
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("truth offline but the database says online"),
        "{out}"
    );

    // A database that does not exist is an error, not a verdict.
    let missing = format!("sqlite://{}", dir.path().join("none.db").display());
    let (status, out) = verify_with(&broker, &truth, "0", &["--database-url", &missing]).await;
    assert_eq!(status.code(), Some(2), "{out}");

    let pid = child.id().expect("pid").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    let exit = tokio::time::timeout(SIM_WAIT, child.wait())
        .await
        .expect("device-sim exits after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    eprintln!("database test took {:?}", started.elapsed());
    broker.stop().await;
}

/// Telemetry: every device publishes QoS 1 messages of exactly --payload-size bytes on its own
/// topic; a subscriber receives every one of them, the simulator counts each as written and
/// acknowledged, and the broker counts the same number of publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reaches_a_subscriber() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

    let broker = FullBroker::start_sqlite().await;
    let mut opts = MqttOptions::new("telemetry-sink", "127.0.0.1", broker.mqtt.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    client
        .subscribe("fleet/+/t", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // Drive the sink until SUBACK, then keep collecting in the background.
    let suback = tokio::time::timeout(SIM_WAIT, async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.expect("sink") {
                break;
            }
        }
    });
    suback.await.expect("SUBACK in time");
    let (sink_tx, mut sink_rx) = tokio::sync::mpsc::unbounded_channel();
    let sink = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                if sink_tx.send((p.topic, p.payload.to_vec())).is_err() {
                    break;
                }
            }
        }
    });

    let dir = temp_dir("scenario");
    let truth = dir.path().join("truth.jsonl");
    let json = dir.path().join("summary.json");
    let json_arg = json.display().to_string();
    run_sim(
        &broker,
        &truth,
        &[
            "--count",
            "20",
            "--prefix",
            "tel-",
            "--duration",
            "2",
            "--publish-interval",
            "0.2",
            "--qos",
            "1",
            "--payload-size",
            "200",
            "--topic",
            "fleet/%c/t",
            "--json",
            &json_arg,
        ],
    )
    .await;
    let v = read_json(&json);
    let published = v["telemetry"]["published"].as_u64().expect("published");
    // Every message the simulator wrote reaches the subscriber (QoS 1 both ways).
    let mut got = Vec::new();
    let collected = tokio::time::timeout(SIM_WAIT, async {
        while (got.len() as u64) < published {
            match sink_rx.recv().await {
                Some(m) => got.push(m),
                None => break,
            }
        }
    })
    .await;
    sink.abort();
    // 20 devices × ~10 intervals, the first at a random point of the first interval.
    assert!(published >= 20 * 5, "{v}");
    assert_eq!(v["telemetry"]["acknowledged"], published, "{v}");
    assert_eq!(v["errors"]["total"], 0, "{v}");
    assert!(
        collected.is_ok(),
        "{} of {published} messages arrived",
        got.len()
    );
    assert_eq!(
        got.len() as u64,
        published,
        "every message reaches the subscriber"
    );
    for (topic, payload) in &got {
        assert_eq!(payload.len(), 200, "{topic}");
        let id = topic
            .strip_prefix("fleet/")
            .and_then(|t| t.strip_suffix("/t"))
            .expect("topic from the template");
        let body: serde_json::Value = serde_json::from_slice(payload).expect("JSON payload");
        assert_eq!(body["id"], id, "{topic}");
        assert!(body["seq"].as_u64().is_some() && body["ts"].as_u64().is_some());
    }
    let metrics = http_response(broker.http, "/metrics")
        .await
        .expect("metrics")
        .body;
    let broker_count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("heartwire_messages_published_total "))
        .and_then(|n| n.trim().parse().ok())
        .expect("publish counter");
    assert_eq!(broker_count, published, "the broker counted every message");
    client.disconnect().await.ok();
    broker.stop().await;
}

/// --username and --password (here from the environment) are sent in CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_sent_in_connect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port().to_string();
    let mut child = sim()
        .args([
            "run",
            "--port",
            &port,
            "--count",
            "1",
            "--duration",
            "1",
            "--username",
            "fleet-user",
        ])
        .env("DEVICE_SIM_PASSWORD", "s3cret")
        .stdout(Stdio::null())
        .spawn()
        .expect("device-sim runs");
    let (mut stream, _) = tokio::time::timeout(SIM_WAIT, listener.accept())
        .await
        .expect("device dials in time")
        .expect("accept");
    // CONNECT: type 1, remaining length (one byte here), variable header, payload.
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.expect("fixed header");
    assert_eq!(head[0], 0x10, "CONNECT first");
    assert!(head[1] < 0x80, "short CONNECT");
    let mut body = vec![0u8; usize::from(head[1])];
    stream.read_exact(&mut body).await.expect("CONNECT body");
    assert_eq!(&body[..7], b"\0\x04MQTT\x04", "MQTT 3.1.1");
    assert_eq!(body[7] & 0xC0, 0xC0, "user name and password flags");
    let mut tail = b"\0\x0afleet-user".to_vec();
    tail.extend_from_slice(b"\0\x06s3cret");
    assert!(body.ends_with(&tail), "{body:?}");
    drop(stream);
    let status = tokio::time::timeout(SIM_WAIT, child.wait())
        .await
        .expect("device-sim ends in time")
        .expect("status");
    // This listener never sends a CONNACK: no device ever connected.
    assert_eq!(status.code(), Some(3), "{status:?}");
}

/// Nobody listens on the port: device-sim names the first error of each kind (on stderr and in
/// the JSON summary) and exits with code 3, since no device ever connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_reported_and_exits_3() {
    let port = free_port();
    let dir = temp_dir("scenario");
    let json = dir.path().join("summary.json");
    let out = tokio::time::timeout(
        SIM_WAIT,
        sim_run(port)
            .args(["--count", "5", "--duration", "1", "--json"])
            .arg(&json)
            .output(),
    )
    .await
    .expect("device-sim ends in time")
    .expect("device-sim runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stdout}{stderr}");
    let refused = format!("Connection refused (os error 111) (to 127.0.0.1:{port})");
    assert!(
        stderr.contains("first connect_failed error:") && stderr.contains(&refused),
        "{stderr}"
    );
    assert!(stderr.contains("no device ever connected"), "{stderr}");
    let v = read_json(&json);
    assert_eq!(v["connected"], 0, "{v}");
    let first = v["errors"]["first"]["connect_failed"]
        .as_str()
        .unwrap_or_default();
    assert!(first.contains(&refused), "{v}");
}
