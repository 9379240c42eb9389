//! Real clients on the secure transports: Debian's `mosquitto_pub`/`mosquitto_sub` over TLS with
//! `--cafile` and with `--cert/--key` (mutual TLS), the MQTT.js client from npm over `ws://` and
//! `wss://` (broker/tests/js, installed by ./test.sh), and rumqttc over TLS. Each connection is
//! checked on the broker's side too: its listener and, with a client certificate, its identity.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use broker::event::ConnectionEvent;
use broker::labels::{DisconnectReason, Listener};
use testkit::tls::{client_config, Ca, Validity};
use testkit::{temp_dir, TempDir, TestBroker, WAIT};
use tokio::process::Command;

/// A CA, the broker's certificate for localhost and the device CA, as files.
struct Files {
    dir: TempDir,
    ca: Ca,
    devices: Ca,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    devices_file: PathBuf,
}

impl Files {
    fn new() -> Self {
        let dir = temp_dir("clients");
        let ca = Ca::new("Heartwire test CA");
        let devices = Ca::new("Heartwire test device CA");
        let (cert, key) = ca
            .server(&["localhost", "127.0.0.1"], Validity::Now)
            .write(dir.path(), "server");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        let devices_file = dir.path().join("devices.crt");
        std::fs::write(&devices_file, devices.pem()).expect("write device CA");
        Self {
            dir,
            ca,
            devices,
            ca_file,
            cert,
            key,
            devices_file,
        }
    }

    fn tls(&self, c: &mut broker::config::MqttConfig) {
        c.tls.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.tls.cert_file = Some(self.cert.clone());
        c.tls.key_file = Some(self.key.clone());
    }
}

/// Runs `program` with `args` to its end (bounded); its exit success and output.
async fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} did not finish within {WAIT:?}"))
    .unwrap_or_else(|e| panic!("cannot run {program} (./test.sh installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn connected(event: ConnectionEvent) -> (Listener, Option<String>) {
    match event {
        ConnectionEvent::Connected {
            listener, identity, ..
        } => (listener, identity),
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs Debian's `program` (mosquitto_pub or mosquitto_sub) against the TLS listener at
/// `port` as `client_id`, trusting `cafile`, with `extra` arguments.
async fn mosquitto(
    program: &str,
    port: &str,
    cafile: &Path,
    client_id: &str,
    extra: &[&str],
) -> (bool, String) {
    let mut args = vec!["-h", "localhost", "-p", port, "--cafile", path(cafile)];
    args.extend(["-i", client_id]);
    args.extend(extra);
    run(program, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_over_tls() {
    let files = Files::new();
    let mut broker = TestBroker::start_with(|c| files.tls(c)).await;
    let port = broker.tls.expect("TLS").port().to_string();

    // mosquitto_sub waits for one message while mosquitto_pub sends it, both over TLS.
    let sub = tokio::spawn({
        let (port, ca) = (port.clone(), files.ca_file.clone());
        async move {
            let args = ["-t", "tls/#", "-q", "1", "-C", "1", "-W", "9"];
            mosquitto("mosquitto_sub", &port, &ca, "tls-sub", &args).await
        }
    });
    assert_eq!(
        connected(broker.connected("tls-sub").await),
        (Listener::Tls, None)
    );
    let args = ["-t", "tls/t", "-q", "1", "-m", "over TLS"];
    let (ok, out) = mosquitto("mosquitto_pub", &port, &files.ca_file, "tls-pub", &args).await;
    assert!(ok, "mosquitto_pub: {out}");
    let (ok, out) = sub.await.expect("mosquitto_sub task");
    assert!(ok, "mosquitto_sub: {out}");
    assert_eq!(out.trim(), "over TLS");

    // A CA that did not sign the broker's certificate: mosquitto_pub fails.
    let other = files.dir.path().join("other-ca.crt");
    std::fs::write(&other, Ca::new("Other CA").pem()).expect("write");
    let args = ["-t", "tls/t", "-m", "x"];
    let (ok, out) = mosquitto("mosquitto_pub", &port, &other, "untrusting", &args).await;
    assert!(!ok, "a client with another CA must fail: {out}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_with_client_certificates() {
    let files = Files::new();
    let mut broker = TestBroker::start_with(|c| {
        files.tls(c);
        c.tls.client_ca_file = Some(files.devices_file.clone());
        c.tls.require_client_cert = true;
    })
    .await;
    let port = broker.tls.expect("TLS").port().to_string();
    let certificate = |cn: &str, validity| {
        files
            .devices
            .client(cn, &[], validity)
            .write(files.dir.path(), cn)
    };
    let (cert, key) = certificate("sensor-42", Validity::Now);
    let args = [
        "-t",
        "mtls/t",
        "-m",
        "signed",
        "--cert",
        path(&cert),
        "--key",
        path(&key),
    ];
    let (ok, out) = mosquitto("mosquitto_pub", &port, &files.ca_file, "sensor-42", &args).await;
    assert!(ok, "mosquitto_pub with a client certificate: {out}");
    assert_eq!(
        connected(broker.connected("sensor-42").await),
        (Listener::Tls, Some("sensor-42".to_owned()))
    );
    broker
        .disconnected("sensor-42", DisconnectReason::ClientDisconnect)
        .await;

    // Without a certificate, and with an expired one: refused, no session.
    let (expired_cert, expired_key) = certificate("sensor-43", Validity::Expired);
    let expired = ["--cert", path(&expired_cert), "--key", path(&expired_key)];
    for extra in [&[][..], &expired[..]] {
        let mut args = vec!["-t", "mtls/t", "-m", "x"];
        args.extend(extra);
        let (ok, out) = mosquitto("mosquitto_pub", &port, &files.ca_file, "refused", &args).await;
        assert!(!ok, "refused without a valid certificate: {out}");
    }
    broker.no_event_pending();
    broker.stop().await;
}

/// Runs the MQTT.js client of broker/tests/js against `url`.
async fn mqttjs(url: &str, client_id: &str, ca: Option<&Path>) -> (bool, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/mqttjs-client.mjs");
    let modules = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/node_modules/mqtt");
    assert!(
        Path::new(modules).is_dir(),
        "MQTT.js is not installed: run ./test.sh (or npm ci --prefix broker/tests/js)"
    );
    let mut args = vec![script, url, client_id, "browser/echo"];
    if let Some(ca) = ca {
        args.push(path(ca));
    }
    run("node", &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_over_ws_and_wss() {
    let files = Files::new();
    let mut broker = TestBroker::start_with(|c| {
        c.ws.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.wss.listen = Some("127.0.0.1:0".parse().expect("addr"));
        c.tls.cert_file = Some(files.cert.clone());
        c.tls.key_file = Some(files.key.clone());
    })
    .await;
    let ws = format!("ws://127.0.0.1:{}/mqtt", broker.ws.expect("ws").port());
    let (ok, out) = mqttjs(&ws, "mqttjs-ws", None).await;
    assert!(ok, "MQTT.js over ws: {out}");
    assert!(out.contains("\"ok\":true"), "{out}");
    assert_eq!(
        connected(broker.connected("mqttjs-ws").await),
        (Listener::Ws, None)
    );
    broker
        .disconnected("mqttjs-ws", DisconnectReason::ClientDisconnect)
        .await;

    let wss = format!("wss://127.0.0.1:{}/mqtt", broker.wss.expect("wss").port());
    let (ok, out) = mqttjs(&wss, "mqttjs-wss", Some(&files.ca_file)).await;
    assert!(ok, "MQTT.js over wss: {out}");
    assert_eq!(
        connected(broker.connected("mqttjs-wss").await),
        (Listener::Wss, None)
    );
    broker
        .disconnected("mqttjs-wss", DisconnectReason::ClientDisconnect)
        .await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rumqttc_over_tls() {
    let files = Files::new();
    let mut broker = TestBroker::start_with(|c| files.tls(c)).await;
    let tls = broker.tls.expect("TLS");
    let mut options = rumqttc::MqttOptions::new("rumqttc-tls", "127.0.0.1", tls.port());
    options.set_transport(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::clone(&client_config(&files.ca.pem(), None))),
    ));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe("r/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .publish("r/1", rumqttc::QoS::AtLeastOnce, false, b"rumqttc".to_vec())
        .await
        .expect("publish");
    let received = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await.expect("event loop") {
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => return p,
                _ => continue,
            }
        }
    })
    .await
    .expect("the message back within the deadline");
    assert_eq!(&received.payload[..], b"rumqttc");
    assert_eq!(
        connected(broker.connected("rumqttc-tls").await),
        (Listener::Tls, None)
    );
    broker.stop().await;
}
