//! MQTT over TLS: certificates made in the test (valid, expired, not yet valid, wrong CA, wrong
//! name), each with its expected outcome on both sides; mutual TLS and the identity it records;
//! reloading the certificate; and bad transport input, counted by reason without disturbing
//! other clients.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use broker::config::{IdentitySource, MqttConfig, TlsVersion};
use broker::event::ConnectionEvent;
use broker::labels::{DisconnectReason, HandshakeFailure, Listener, RefusalReason};
use broker::metrics::metrics;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use testkit::tls::{client_config, tls_connect, Ca, Leaf, Validity};
use testkit::{eventually, temp_dir, ConnectOpts, RawClient, TempDir, TestBroker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The certificates of a test, written where the broker reads them.
struct Pki {
    dir: TempDir,
    /// Signs the broker's certificate.
    server_ca: Ca,
    /// Signs the devices' certificates.
    device_ca: Ca,
    cert: PathBuf,
    key: PathBuf,
    device_ca_file: PathBuf,
}

impl Pki {
    fn new() -> Self {
        Self::with_server(Validity::Now)
    }

    fn with_server(validity: Validity) -> Self {
        let dir = temp_dir("tls");
        let server_ca = Ca::new("Heartwire test server CA");
        let device_ca = Ca::new("Heartwire test device CA");
        let (cert, key) = server_ca
            .server(&["localhost", "127.0.0.1"], validity)
            .write(dir.path(), "server");
        let device_ca_file = dir.path().join("devices-ca.crt");
        std::fs::write(&device_ca_file, device_ca.pem()).expect("write CA");
        Self {
            dir,
            server_ca,
            device_ca,
            cert,
            key,
            device_ca_file,
        }
    }

    /// The broker's `mqtt` section with a TLS listener on these certificates.
    fn config(&self, config: &mut MqttConfig) {
        config.tls.listen = Some("127.0.0.1:0".parse().expect("addr"));
        config.tls.cert_file = Some(self.cert.clone());
        config.tls.key_file = Some(self.key.clone());
    }

    /// As [`config`](Self::config), asking clients for a certificate of the device CA.
    fn mutual(&self, config: &mut MqttConfig, required: bool) {
        self.config(config);
        config.tls.client_ca_file = Some(self.device_ca_file.clone());
        config.tls.require_client_cert = required;
    }

    /// A client configuration trusting the server CA, with `client` as its certificate.
    fn client(&self, client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
        client_config(&self.server_ca.pem(), client)
    }
}

fn failures(listener: Listener, reason: HandshakeFailure) -> u64 {
    metrics().handshake_failures.get(listener, reason)
}

/// Waits until the failure count of `reason` is `before + 1`.
async fn counted(reason: HandshakeFailure, before: u64) {
    eventually(&format!("a {reason} handshake failure counted"), || async {
        (failures(Listener::Tls, reason) > before).then_some(())
    })
    .await;
}

/// CONNECT over an established TLS stream; the CONNACK.
async fn mqtt_over(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    client_id: &str,
) -> RawClient<tokio_rustls::client::TlsStream<TcpStream>> {
    RawClient::over(stream)
        .handshake(ConnectOpts::new(client_id))
        .await
        .0
}

/// Sends CONNECT over a TLS stream the broker is expected to close before any CONNACK (the
/// server refuses a client certificate only after the client's handshake has ended, in TLS 1.3).
async fn closed_before_connack(mut stream: tokio_rustls::client::TlsStream<TcpStream>) {
    let connect = testkit::encode(&testkit::connect_packet(&ConnectOpts::new("refused")));
    let _ = stream.write_all(&connect).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(testkit::WAIT, stream.read(&mut buf))
        .await
        .expect("closed within the deadline");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection closed, read {read:?}"
    );
}

/// Reads (whatever the broker answers, a TLS alert for instance) until the broker closes.
async fn until_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 512];
    tokio::time::timeout(testkit::WAIT, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("closed by the broker within the deadline");
}

async fn connected_event(broker: &mut TestBroker, client_id: &str) -> (Listener, Option<String>) {
    match broker.connected(client_id).await {
        ConnectionEvent::Connected {
            listener, identity, ..
        } => (listener, identity),
        other => panic!("expected Connected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_tcp_clients_share_one_broker() {
    let pki = Pki::new();
    let mut broker = TestBroker::start_with(|c| pki.config(c)).await;
    let tls = broker.tls.expect("TLS listener");

    let stream = tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("TLS handshake with a certificate for localhost");
    let mut sub = mqtt_over(stream, "sub-tls").await;
    assert_eq!(
        connected_event(&mut broker, "sub-tls").await,
        (Listener::Tls, None)
    );
    assert_eq!(metrics().listener_connections.get(Listener::Tls), 1);
    sub.subscribe("t/#", QoS::AtLeastOnce).await;

    // The same certificate names 127.0.0.1 too.
    let stream = tls_connect(tls, "127.0.0.1", pki.client(None))
        .await
        .expect("TLS handshake by IP address");
    mqtt_over(stream, "by-ip").await.disconnect().await;
    broker.connected("by-ip").await;
    broker
        .disconnected("by-ip", DisconnectReason::ClientDisconnect)
        .await;

    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub-tcp")).await;
    assert_eq!(
        connected_event(&mut broker, "pub-tcp").await,
        (Listener::Tcp, None)
    );
    publisher
        .publish("t/1", QoS::AtLeastOnce, false, b"over tcp", 1)
        .await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"over tcp"),
        other => panic!("expected the PUBLISH over TLS, got {other:?}"),
    }
    sub.disconnect().await;
    eventually("the TLS connection counted closed", || async {
        (metrics().listener_connections.get(Listener::Tls) == 0).then_some(())
    })
    .await;
    assert_eq!(metrics().listener_accepted.get(Listener::Tls), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_refuse_a_broker_certificate_they_cannot_trust() {
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| pki.config(c)).await;
    let tls = broker.tls.expect("TLS listener");

    // A client that trusts another CA.
    let before = failures(Listener::Tls, HandshakeFailure::ClientAlert);
    let other = Ca::new("Some other CA");
    let error = tls_connect(tls, "localhost", client_config(&other.pem(), None))
        .await
        .expect_err("unknown issuer");
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");
    counted(HandshakeFailure::ClientAlert, before).await;

    // A client that dialled a name the certificate does not carry.
    let error = tls_connect(tls, "broker.example.com", pki.client(None))
        .await
        .expect_err("wrong name");
    assert!(
        format!("{error:?}").contains("NotValidForName"),
        "{error:?}"
    );

    // An expired and a not yet valid broker certificate.
    for (validity, expected) in [
        (Validity::Expired, "Expired"),
        (Validity::NotYet, "NotValidYet"),
    ] {
        let pki = Pki::with_server(validity);
        let broker = TestBroker::start_with(|c| pki.config(c)).await;
        let error = tls_connect(broker.tls.expect("TLS"), "localhost", pki.client(None))
            .await
            .expect_err("expired or not yet valid");
        assert!(
            format!("{error:?}").contains(expected),
            "{expected}: {error:?}"
        );
        broker.stop().await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_records_the_certificate_identity() {
    let pki = Pki::new();
    let mut broker = TestBroker::start_with(|c| pki.mutual(c, true)).await;
    let tls = broker.tls.expect("TLS listener");

    let device = pki
        .device_ca
        .client("device-7", &["device-7.fleet.example"], Validity::Now);
    let stream = tls_connect(tls, "localhost", pki.client(Some(&device)))
        .await
        .expect("handshake with a valid client certificate");
    let c = mqtt_over(stream, "device-7").await;
    assert_eq!(
        connected_event(&mut broker, "device-7").await,
        (Listener::Tls, Some("device-7".to_owned()))
    );
    c.disconnect().await;
    broker
        .disconnected("device-7", DisconnectReason::ClientDisconnect)
        .await;

    // Refused: no certificate, an expired one, one not yet valid, one of another CA.
    let cases: [(Option<Leaf>, HandshakeFailure); 4] = [
        (None, HandshakeFailure::NoCertificate),
        (
            Some(pki.device_ca.client("device-8", &[], Validity::Expired)),
            HandshakeFailure::BadCertificate,
        ),
        (
            Some(pki.device_ca.client("device-9", &[], Validity::NotYet)),
            HandshakeFailure::BadCertificate,
        ),
        (
            Some(Ca::new("Rogue CA").client("device-7", &[], Validity::Now)),
            HandshakeFailure::BadCertificate,
        ),
    ];
    for (leaf, reason) in cases {
        let before = failures(Listener::Tls, reason);
        // TLS 1.3: the client's side of the handshake completes before the server has checked
        // its certificate; the server then closes.
        if let Ok(stream) = tls_connect(tls, "localhost", pki.client(leaf.as_ref())).await {
            closed_before_connack(stream).await;
        }
        counted(reason, before).await;
    }
    broker.no_event_pending();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_client_certificates_and_the_san_identity() {
    let pki = Pki::new();
    let mut broker = TestBroker::start_with(|c| {
        pki.mutual(c, false);
        c.tls.identity = IdentitySource::San;
    })
    .await;
    let tls = broker.tls.expect("TLS listener");

    // Without a certificate: allowed, no identity.
    let stream = tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("handshake without a client certificate");
    mqtt_over(stream, "anonymous").await.disconnect().await;
    assert_eq!(
        connected_event(&mut broker, "anonymous").await,
        (Listener::Tls, None)
    );
    broker
        .disconnected("anonymous", DisconnectReason::ClientDisconnect)
        .await;

    // With one: its first subject alternative name.
    let device = pki
        .device_ca
        .client("device-7", &["device-7.fleet.example"], Validity::Now);
    let stream = tls_connect(tls, "localhost", pki.client(Some(&device)))
        .await
        .expect("handshake with a client certificate");
    drop(mqtt_over(stream, "device-7").await);
    assert_eq!(
        connected_event(&mut broker, "device-7").await,
        (Listener::Tls, Some("device-7.fleet.example".to_owned()))
    );

    // A certificate that is presented must still verify.
    let before = failures(Listener::Tls, HandshakeFailure::BadCertificate);
    let rogue = Ca::new("Rogue CA").client("device-7", &[], Validity::Now);
    if let Ok(stream) = tls_connect(tls, "localhost", pki.client(Some(&rogue))).await {
        closed_before_connack(stream).await;
    }
    counted(HandshakeFailure::BadCertificate, before).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_certificate_serves_new_connections_and_keeps_old_ones() {
    let pki = Pki::new();
    let mut broker = TestBroker::start_with(|c| pki.config(c)).await;
    let tls = broker.tls.expect("TLS listener");
    let reloader = broker.tls_config.clone().expect("TLS configuration");

    let stream = tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("handshake");
    let (mut old, _) = RawClient::over(stream)
        .handshake(ConnectOpts::new("old"))
        .await;
    broker.connected("old").await;

    // A certificate of a new CA replaces the files.
    let new_ca = Ca::new("Heartwire renewed CA");
    new_ca
        .server(&["localhost"], Validity::Now)
        .write(pki.dir.path(), "server");
    reloader.reload().expect("the new files load");
    tls_connect(tls, "localhost", client_config(&new_ca.pem(), None))
        .await
        .expect("new handshakes present the new certificate");
    tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect_err("the old certificate is no longer presented");

    // A bad file: the reload fails and the certificate in force stays.
    std::fs::write(&pki.key, "not a key").expect("write");
    let error = reloader.reload().expect_err("a bad key file");
    assert!(error.to_string().contains("mqtt.tls.key_file"), "{error}");
    tls_connect(tls, "localhost", client_config(&new_ca.pem(), None))
        .await
        .expect("still the new certificate");

    // The connection made before the reloads still works.
    old.send(&Packet::PingReq).await;
    assert!(matches!(old.recv().await, Some(Packet::PingResp)));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transport_input_is_closed_counted_and_harms_nobody() {
    let pki = Pki::new();
    let mut broker = TestBroker::start_with(|c| {
        pki.config(c);
        c.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let tls = broker.tls.expect("TLS listener");
    let stream = tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("handshake");
    let mut bystander = mqtt_over(stream, "bystander").await;
    broker.connected("bystander").await;

    // A half-finished handshake held open: closed at the connect timeout.
    let before = failures(Listener::Tls, HandshakeFailure::Timeout);
    let mut idle = TcpStream::connect(tls).await.expect("connect");
    idle.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .expect("part of a ClientHello");

    // Plain MQTT on the TLS port.
    let before_plain = failures(Listener::Tls, HandshakeFailure::NotTls);
    let mut plain = TcpStream::connect(tls).await.expect("connect");
    plain
        .write_all(&testkit::encode(&testkit::connect_packet(
            &ConnectOpts::new("plain"),
        )))
        .await
        .expect("CONNECT");
    until_closed(&mut plain).await;
    counted(HandshakeFailure::NotTls, before_plain).await;

    // A TLS record of garbage.
    let before_garbage = failures(Listener::Tls, HandshakeFailure::Tls)
        + failures(Listener::Tls, HandshakeFailure::NotTls);
    let mut garbage = TcpStream::connect(tls).await.expect("connect");
    garbage
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x08, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3,
        ])
        .await
        .expect("garbage");
    until_closed(&mut garbage).await;
    eventually("the garbage ClientHello counted", || async {
        (failures(Listener::Tls, HandshakeFailure::Tls)
            + failures(Listener::Tls, HandshakeFailure::NotTls)
            > before_garbage)
            .then_some(())
    })
    .await;

    // A TLS client on the plain TCP port: not MQTT, refused as a protocol error.
    let refused = metrics()
        .connections_refused
        .get(RefusalReason::ProtocolError);
    tls_connect(broker.addr, "localhost", pki.client(None))
        .await
        .expect_err("the TCP listener speaks no TLS");
    eventually("the ClientHello refused on the TCP port", || async {
        (metrics()
            .connections_refused
            .get(RefusalReason::ProtocolError)
            > refused)
            .then_some(())
    })
    .await;

    // Meanwhile the bystander is served.
    bystander.send(&Packet::PingReq).await;
    assert!(matches!(bystander.recv().await, Some(Packet::PingResp)));

    until_closed(&mut idle).await;
    counted(HandshakeFailure::Timeout, before).await;
    broker.no_event_pending();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_refuses_older_clients() {
    let pki = Pki::new();
    let broker = TestBroker::start_with(|c| {
        pki.config(c);
        c.tls.min_version = TlsVersion::Tls13;
    })
    .await;
    let tls = broker.tls.expect("TLS listener");
    let before = failures(Listener::Tls, HandshakeFailure::TlsVersion);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pki.server_ca.pem().as_bytes()) {
        let cert: rustls::pki_types::CertificateDer<'static> = cert.expect("PEM");
        roots.add(cert).expect("CA");
    }
    let tls12_only = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .expect("TLS 1.2")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls_connect(tls, "localhost", Arc::new(tls12_only))
        .await
        .expect_err("TLS 1.2 refused");
    counted(HandshakeFailure::TlsVersion, before).await;
    tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("TLS 1.3 accepted");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_and_shutdown_work_across_transports() {
    let pki = Pki::new();
    let mut broker = TestBroker::start_with(|c| pki.config(c)).await;
    let tls = broker.tls.expect("TLS listener");
    let stream = tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("handshake");
    let mut over_tls = mqtt_over(stream, "roaming").await;
    assert_eq!(
        connected_event(&mut broker, "roaming").await,
        (Listener::Tls, None)
    );

    // The same client id over TCP takes the session over from the TLS connection.
    let (_over_tcp, _) = RawClient::connect(broker.addr, ConnectOpts::new("roaming")).await;
    broker
        .disconnected("roaming", DisconnectReason::Takeover)
        .await;
    assert_eq!(
        connected_event(&mut broker, "roaming").await,
        (Listener::Tcp, None)
    );
    assert!(over_tls.until_closed().await.is_empty());

    // A TLS connection open at shutdown ends with broker_shutdown, like a TCP one.
    let stream = tls_connect(tls, "localhost", pki.client(None))
        .await
        .expect("handshake");
    let _staying = mqtt_over(stream, "staying").await;
    broker.connected("staying").await;
    let rest = broker.stop().await;
    let reasons: Vec<(String, DisconnectReason)> = rest
        .into_iter()
        .filter_map(|e| match e {
            ConnectionEvent::Disconnected {
                client_id, reason, ..
            } => Some((client_id, reason)),
            _ => None,
        })
        .collect();
    assert!(
        reasons.contains(&("staying".to_owned(), DisconnectReason::BrokerShutdown)),
        "{reasons:?}"
    );
}

/// The ACL's `user` blocks apply to a verified client certificate's identity (as Mosquitto's
/// use_identity_as_username): device-7 may subscribe to its own commands and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_identity_gets_its_user_rules() {
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeFilter, SubscribeReasonCode};

    let pki = Pki::new();
    let dir = temp_dir("tls-acl");
    let acl = dir.path().join("acl");
    std::fs::write(&acl, "user device-7\ntopic read commands/device-7\n")
        .expect("write the ACL file");
    let auth = broker::config::AuthConfig {
        acl_file: Some(acl),
        ..broker::config::AuthConfig::default()
    };
    let broker = TestBroker::start_with_auth(|c| pki.mutual(c, true), auth).await;
    let device = pki.device_ca.client("device-7", &[], Validity::Now);
    let stream = tls_connect(
        broker.tls.expect("TLS listener"),
        "localhost",
        pki.client(Some(&device)),
    )
    .await
    .expect("handshake");
    let mut c = mqtt_over(stream, "device-7").await;
    let mut sub = Subscribe::new_many(
        ["commands/device-7", "commands/device-8"]
            .map(|f| SubscribeFilter::new(f.into(), QoS::AtMostOnce)),
    );
    sub.pkid = 1;
    c.send(&Packet::Subscribe(sub)).await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    broker.stop().await;
}
