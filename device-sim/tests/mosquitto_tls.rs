//! device-sim over `--tls` against a real TLS server: Debian's Mosquitto (installed by
//! ./test.sh), on a free port of 127.0.0.1 with certificates from a throwaway CA
//! ([`testkit::TestPki`]). Heartwire's own TLS listener is tested by the broker's tests; this
//! checks the client side against an independent implementation (OpenSSL's).
//!
//! The server certificate names only `localhost`, so every run also needs
//! `--tls-server-name localhost` to reach 127.0.0.1. One Mosquitto asks for no client
//! certificate, the other requires one signed by the CA: devices connect to the first with
//! none, to the second with one certificate for all (`--cert`/`--key`, over two workers) or
//! each with its own (`--cert-dir`, reconnecting in a churn), and fail without.

mod common;

use common::{args, clean_abrupt_churn, finish, sim_run, timing, Run};
use testkit::{temp_dir, Mosquitto, TestPki};

/// A Mosquitto with one TLS listener on 127.0.0.1 with the PKI's CA and `localhost` server
/// certificate; with `require_certificate` clients must present a certificate signed by the CA.
async fn mosquitto(pki: &TestPki, require_certificate: bool) -> Mosquitto {
    let server = pki.server(&["localhost"]);
    Mosquitto::start(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {require_certificate}\n\
         allow_anonymous true\n",
        pki.ca_file().display(),
        server.cert.display(),
        server.key.display(),
    ))
    .await
}

/// Runs device-sim over TLS to `broker` for 2 s with `args` after the common ones; its output
/// ends with Mosquitto's log.
async fn run(broker: &Mosquitto, pki: &TestPki, name: &str, args: &[String]) -> Run {
    let dir = temp_dir(name);
    let json = dir.path().join("summary.json");
    let mut command = sim_run(broker.port);
    command
        .args(["--tls", "--cafile"])
        .arg(pki.ca_file())
        .args(["--tls-server-name", "localhost"])
        .args(timing("2"))
        .arg("--json")
        .arg(&json)
        .args(args)
        .current_dir(pki.dir());
    let mut run = finish(command, &json).await;
    run.output = format!("{}\nmosquitto log:\n{}", run.output, broker.log());
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_tls_with_and_without_client_certificates() {
    let pki = TestPki::new("mosquitto");
    let (open, mutual) = tokio::join!(mosquitto(&pki, false), mosquitto(&pki, true));
    let shared = pki.client("shared");
    let devices = temp_dir("device-certs");
    for n in 0..4 {
        pki.client_in(devices.path(), &format!("tls-dir-{n}"));
    }
    let (cert, key) = (
        shared.cert.display().to_string(),
        shared.key.display().to_string(),
    );
    let cert_dir = devices.path().display().to_string();

    let shared_args = args([
        "--count",
        "4",
        "--prefix",
        "tls-shared-",
        "--cert",
        &cert,
        "--key",
        &key,
        "--workers",
        "2",
    ]);
    let churn_args = [
        args([
            "--count",
            "4",
            "--prefix",
            "tls-dir-",
            "--cert-dir",
            &cert_dir,
        ]),
        clean_abrupt_churn("3000", "0.1"),
    ]
    .concat();
    let anonymous_args = args(["--count", "3", "--prefix", "tls-anon-"]);
    let refused_args = args(["--count", "2", "--prefix", "tls-none-"]);
    let (anonymous, shared_cert, own_certs, refused) = tokio::join!(
        run(&open, &pki, "anonymous", &anonymous_args),
        run(&mutual, &pki, "shared", &shared_args),
        run(&mutual, &pki, "cert-dir", &churn_args),
        run(&mutual, &pki, "refused", &refused_args),
    );

    anonymous.all_connected(3);
    shared_cert.all_connected(4);
    assert_eq!(shared_cert.summary["workers"], 2);
    // In a churn some devices are away at the end; none ever failed to connect, and the
    // reconnections used each device's certificate again.
    own_certs.churned();
    // Without a client certificate the handshake fails: no device connects (exit code 3),
    // and the first error is the server's TLS alert (TLS 1.3 reports it at the first read,
    // after the client considered the handshake done).
    assert_eq!(refused.code, Some(3), "{}", refused.output);
    assert!(
        refused.output.contains("CertificateRequired"),
        "{}",
        refused.output
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_its_certificate_file_fails_alone_and_says_which_file() {
    let pki = TestPki::new("missing");
    let broker = mosquitto(&pki, true).await;
    let devices = temp_dir("device-certs");
    pki.client_in(devices.path(), "tls-miss-0");
    let cert_dir = devices.path().display().to_string();
    let run = run(
        &broker,
        &pki,
        "missing",
        &args([
            "--count",
            "2",
            "--prefix",
            "tls-miss-",
            "--cert-dir",
            &cert_dir,
        ]),
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.output);
    assert_eq!(run.summary["connected"], 1, "{}", run.output);
    assert_eq!(run.errors("connect_failed"), 1, "{}", run.output);
    assert!(run.output.contains("tls-miss-1.crt"), "{}", run.output);
}
