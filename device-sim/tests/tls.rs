//! device-sim over `--tls` against the broker's own TLS listener (in-process, with a
//! `localhost` certificate from a throwaway CA): a churn that `device-sim verify` agrees with;
//! mutual TLS with a certificate per device (`--cert-dir`, common name = client id), after
//! which every session of every device is recorded on the `tls` listener with its client id
//! as identity; and devices without a usable certificate (its files missing, or signed by
//! another CA), which fail alone and are counted.

mod common;

use common::{args, clean_abrupt_churn, run, timing, SecureBroker};
use testkit::{temp_dir, TestPki};

/// The broker's rows for device `id`: the device and every one of its sessions came in on the
/// TLS listener, with `identity`.
async fn recorded_over_tls(broker: &SecureBroker, id: &str, identity: Option<&str>) {
    let identity = serde_json::json!(identity);
    let device = broker
        .api_json(&format!("/api/v1/devices/{id}"))
        .await
        .unwrap_or_else(|| panic!("{id} is known to the API"));
    assert_eq!(device["listener"], "tls", "{device}");
    assert_eq!(device["identity"], identity, "{device}");
    let history = broker
        .api_json(&format!("/api/v1/devices/{id}/sessions?limit=1000"))
        .await
        .unwrap_or_else(|| panic!("the sessions of {id}"));
    let sessions = history["sessions"].as_array().expect("a list of sessions");
    assert!(!sessions.is_empty(), "{history}");
    for session in sessions {
        assert_eq!(session["listener"], "tls", "{session}");
        assert_eq!(session["identity"], identity, "{session}");
    }
}

/// The broker with client certificates required, signed by its own CA.
async fn start_mutual(label: &str) -> SecureBroker {
    SecureBroker::start(label, |config, pki| {
        config.mqtt.tls.client_ca_file = Some(pki.ca_file());
        config.mqtt.tls.require_client_cert = true;
    })
    .await
}

/// `--count COUNT --prefix PREFIX` in a 3 s churn of clean and abrupt leaves, recorded in
/// `truth`.
fn churn(count: u64, prefix: &str, truth: &std::path::Path) -> Vec<String> {
    [
        args(["--count", &count.to_string(), "--prefix", prefix]),
        timing("3"),
        clean_abrupt_churn("1200", "0.1"),
        args(["--truth", &truth.display().to_string()]),
    ]
    .concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_over_tls_then_verify_passes() {
    let broker = SecureBroker::start("tls", |_, _| {}).await;
    let dir = temp_dir("tls");
    let truth = dir.path().join("truth.jsonl");
    let run = run(
        broker.port("tls"),
        dir.path(),
        "tls",
        &[broker.transport_args("tls"), churn(20, "tls-", &truth)].concat(),
    )
    .await;
    run.churned();
    broker.verify(&truth, "1").await;
    for n in 0..20 {
        recorded_over_tls(&broker, &format!("tls-{n}"), None).await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_records_each_devices_certificate_as_its_identity() {
    let broker = start_mutual("mtls").await;
    let dir = temp_dir("mtls");
    let certs = temp_dir("device-certs");
    let ids: Vec<String> = (0..20).map(|n| format!("mtls-{n}")).collect();
    for id in &ids {
        broker.pki.client_in(certs.path(), id);
    }
    let truth = dir.path().join("truth.jsonl");
    let run = run(
        broker.port("tls"),
        dir.path(),
        "mtls",
        &[
            broker.transport_args("tls"),
            args(["--cert-dir", &certs.path().display().to_string()]),
            churn(20, "mtls-", &truth),
        ]
        .concat(),
    )
    .await;
    run.churned();
    broker.verify(&truth, "1").await;
    for id in &ids {
        recorded_over_tls(&broker, id, Some(id)).await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_without_a_usable_certificate_fail_alone() {
    let broker = start_mutual("mtls-missing").await;
    let dir = temp_dir("mtls-missing");
    // miss-1 has no files; foreign-1's certificate is signed by a CA the broker does not know.
    let certs = temp_dir("device-certs");
    let other = TestPki::new("foreign");
    for id in ["miss-0", "miss-2", "foreign-0"] {
        broker.pki.client_in(certs.path(), id);
    }
    other.client_in(certs.path(), "foreign-1");
    let cert_dir = certs.path().display().to_string();
    let with = |count: &str, prefix: &str, truth: &str| {
        [
            broker.transport_args("tls"),
            args([
                "--cert-dir",
                &cert_dir,
                "--count",
                count,
                "--prefix",
                prefix,
            ]),
            timing("2"),
            args(["--truth", &dir.path().join(truth).display().to_string()]),
        ]
        .concat()
    };
    let port = broker.port("tls");
    let (missing_args, foreign_args) = (
        with("3", "miss-", "missing.jsonl"),
        with("2", "foreign-", "foreign.jsonl"),
    );
    let (missing, foreign) = tokio::join!(
        run(port, dir.path(), "missing", &missing_args),
        run(port, dir.path(), "foreign", &foreign_args),
    );

    // A device without its files never dials: one failed connect that names the file.
    assert_eq!(missing.code, Some(0), "{}", missing.output);
    assert_eq!(missing.summary["connected"], 2, "{}", missing.output);
    assert_eq!(missing.errors("connect_failed"), 1, "{}", missing.output);
    assert!(missing.output.contains("miss-1.crt"), "{}", missing.output);
    // The broker refuses a certificate it cannot verify, at every attempt.
    assert_eq!(foreign.code, Some(0), "{}", foreign.output);
    assert_eq!(foreign.summary["connected"], 1, "{}", foreign.output);
    let refused = foreign.errors("connect_failed");
    assert!(refused > 0, "{}", foreign.output);
    let bad = broker
        .metric(
            "heartwire_transport_handshake_failures_total",
            &["listener=\"tls\"", "reason=\"bad_certificate\""],
        )
        .await;
    assert!(bad > 0, "{}", foreign.output);

    // Neither ever reached MQTT: unknown to the broker, offline in the truth.
    for id in ["miss-1", "foreign-1"] {
        assert!(broker
            .api_json(&format!("/api/v1/devices/{id}"))
            .await
            .is_none());
    }
    for truth in ["missing.jsonl", "foreign.jsonl"] {
        broker.verify(&dir.path().join(truth), "0.5").await;
    }
    recorded_over_tls(&broker, "miss-0", Some("miss-0")).await;
    recorded_over_tls(&broker, "foreign-0", Some("foreign-0")).await;
    broker.stop().await;
}
