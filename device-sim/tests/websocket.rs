//! device-sim over `--ws` and `--wss` against the broker's own WebSocket and WebSocket-over-TLS
//! listeners (in-process, with a `localhost` certificate from a throwaway CA): every device of
//! a ws run connects and is recorded on the `ws` listener; a wss churn reconnects again and
//! again and `device-sim verify` agrees with what the broker recorded; a wrong path is
//! answered 404, and without `--tls-server-name` the certificate (for `localhost`, not
//! 127.0.0.1) is refused. The broker counts both refusals.

mod common;

use common::{args, clean_abrupt_churn, run, timing, SecureBroker};
use testkit::temp_dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_ws_and_wss_and_verify_agrees() {
    let broker = SecureBroker::start("websocket", |_, _| {}).await;
    let (ws, wss) = (broker.port("ws"), broker.port("wss"));
    let dir = temp_dir("websocket");
    let truth = dir.path().join("truth.jsonl");
    let base = timing("2");
    let plain_args = [
        base.clone(),
        broker.transport_args("ws"),
        args(["--count", "4", "--prefix", "ws-"]),
    ]
    .concat();
    let wss_args = [
        base.clone(),
        broker.transport_args("wss"),
        args(["--count", "6", "--prefix", "wss-"]),
        clean_abrupt_churn("1200", "0.1"),
        args(["--truth", &truth.display().to_string()]),
    ]
    .concat();
    let path_args = [
        base.clone(),
        args([
            "--ws",
            "--ws-path",
            "/elsewhere",
            "--count",
            "1",
            "--prefix",
            "path-",
        ]),
    ]
    .concat();
    let ca = broker.pki.ca_file().display().to_string();
    let no_name_args = [
        base,
        args([
            "--wss", "--cafile", &ca, "--count", "1", "--prefix", "name-",
        ]),
    ]
    .concat();
    let (plain, secure, wrong_path, no_name) = tokio::join!(
        run(ws, dir.path(), "ws", &plain_args),
        run(wss, dir.path(), "wss", &wss_args),
        run(ws, dir.path(), "path", &path_args),
        run(wss, dir.path(), "name", &no_name_args),
    );

    plain.all_connected(4);
    assert_eq!(plain.errors("total"), 0, "{}", plain.output);

    secure.churned();

    // No device ever connected: exit code 3, and the first error says why.
    assert_eq!(wrong_path.code, Some(3), "{}", wrong_path.output);
    assert!(wrong_path.output.contains("404"), "{}", wrong_path.output);
    assert_eq!(no_name.code, Some(3), "{}", no_name.output);
    assert!(no_name.output.contains("certificate"), "{}", no_name.output);
    let failures = "heartwire_transport_handshake_failures_total";
    assert!(
        broker
            .metric(failures, &["listener=\"ws\"", "reason=\"ws_path\""])
            .await
            > 0
    );
    assert!(
        broker
            .metric(failures, &["listener=\"wss\"", "reason=\"client_alert\""])
            .await
            > 0
    );

    // What the broker recorded for the wss churn matches the truth, and each device's rows
    // name the listener it came in on.
    broker.verify(&truth, "1").await;
    for (id, listener) in (0..4)
        .map(|n| (format!("ws-{n}"), "ws"))
        .chain((0..6).map(|n| (format!("wss-{n}"), "wss")))
    {
        let device = broker
            .api_json(&format!("/api/v1/devices/{id}"))
            .await
            .unwrap_or_else(|| panic!("{id} is known to the API"));
        assert_eq!(device["listener"], listener, "{device}");
        assert_eq!(device["identity"], serde_json::Value::Null, "{device}");
    }
    broker.stop().await;
}
