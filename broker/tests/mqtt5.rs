//! MQTT 5 end to end: the server's DISCONNECT reason codes as real clients see them (rumqttc's
//! v5 client, MQTT.js), CONNACK properties, reason codes on acknowledgements, protocol
//! violations answered with a DISCONNECT, message properties forwarded (and left out for a
//! 3.1.1 subscriber), message and session expiry, the will on DISCONNECT 0x04, inbound topic
//! aliases, and the client's maximum packet size and receive maximum honoured on delivery.
//! Through a full broker's REST API: the DISCONNECT reason codes and reason string on the
//! session rows, and a held persistent session on the device row until it expires. With the
//! broker binary: an MQTT 5 persistent session, its options and its queued message's
//! properties survive `kill -9`.
//! Debian's mosquitto_pub/mosquitto_sub and MQTT.js (broker/tests/js/mqttjs5-client.mjs) pass
//! properties through at protocol level 5.
//!
//! Most tests speak raw MQTT 5 through rumqttc's v5 packet codec ([`V5`]), which lets them send
//! any packet and see every packet the broker answers, reason codes and properties included.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use broker::config::AuthConfig;
use broker::event::ConnectionEvent;
use broker::labels::{DisconnectReason, DropReason, TransitionKind};
use broker::metrics::metrics;
use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet, PubAck, PubAckReason,
    PubCompReason, PubRel, Publish, PublishProperties, Subscribe, SubscribeReasonCode,
    UnsubAckReason, Unsubscribe,
};
use rumqttc::v5::mqttbytes::QoS;
use testkit::{temp_dir, ConnectOpts, RawClient, TestBroker, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::sync::mpsc;

/// A client that speaks raw MQTT 5 bytes through rumqttc's v5 packet codec.
struct V5 {
    stream: TcpStream,
    buf: BytesMut,
}

/// A CONNECT at protocol level 5: clean start, keep-alive 60, the given properties.
fn connect(client_id: &str, clean_start: bool, properties: ConnectProperties) -> Connect {
    Connect {
        keep_alive: 60,
        client_id: client_id.to_owned(),
        clean_start,
        properties: Some(properties),
    }
}

/// Connect properties with `session_expiry` and nothing else.
fn expiry(session_expiry: u32) -> ConnectProperties {
    ConnectProperties {
        session_expiry_interval: Some(session_expiry),
        ..ConnectProperties::new()
    }
}

impl V5 {
    /// A TCP connection to `addr`, nothing sent yet.
    async fn tcp(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends `connect` (with `will`) and returns the CONNACK, which must be a success.
    async fn connect_with(
        addr: SocketAddr,
        connect: Connect,
        will: Option<LastWill>,
    ) -> (Self, ConnAck) {
        let mut c = Self::tcp(addr).await;
        c.send(&Packet::Connect(connect, will, None)).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::Success, "{ack:?}");
                (c, ack)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A clean start as `client_id`, no properties.
    async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        Self::connect_with(
            addr,
            connect(client_id, true, ConnectProperties::new()),
            None,
        )
        .await
        .0
    }

    async fn send(&mut self, packet: &Packet) {
        let mut bytes = BytesMut::new();
        packet.write(&mut bytes, None).expect("encode");
        self.send_bytes(&bytes).await;
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next packet, or `None` once the broker closed the connection; fails after [`WAIT`].
    async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, self.recv_untimed())
            .await
            .expect("a packet or a close within the deadline")
    }

    /// The next packet within `within`, `Err` when none came.
    async fn recv_within(&mut self, within: Duration) -> Result<Option<Packet>, ()> {
        tokio::time::timeout(within, self.recv_untimed())
            .await
            .map_err(|_| ())
    }

    async fn recv_untimed(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, None) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a packet rumqttc cannot decode: {e:?}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Expects a server DISCONNECT with `code`, then the close.
    async fn disconnected_with(&mut self, code: DisconnectReasonCode, what: &str) {
        match self.recv().await {
            Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, code, "{what}: {d:?}"),
            other => panic!("{what}: expected DISCONNECT {code:?}, got {other:?}"),
        }
        assert_eq!(
            self.recv().await,
            None,
            "{what}: closed after the DISCONNECT"
        );
    }

    /// Subscribes to `filters` (packet id 1) and returns the SUBACK's reason codes.
    async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let mut sub = Subscribe::new_many(filters.iter().map(|(f, q)| Filter::new(*f, *q)), None);
        sub.pkid = 1;
        self.send(&Packet::Subscribe(sub)).await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) => {
                assert_eq!(ack.pkid, 1);
                ack.return_codes
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Publishes at `qos` with `properties`; waits for the PUBACK of a QoS 1 message and
    /// returns its reason.
    async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        payload: &[u8],
        pkid: u16,
        properties: Option<PublishProperties>,
    ) -> Option<PubAckReason> {
        let mut p = Publish::new(topic, qos, payload.to_vec(), properties);
        p.pkid = pkid;
        self.send(&Packet::Publish(p)).await;
        if qos != QoS::AtLeastOnce {
            return None;
        }
        match self.recv().await {
            Some(Packet::PubAck(ack)) => {
                assert_eq!(ack.pkid, pkid);
                Some(ack.reason)
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// Publishes a retained QoS 1 message and waits for its PUBACK.
    async fn publish_retained(&mut self, topic: &str, payload: &[u8]) {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, payload.to_vec(), None);
        p.pkid = 100;
        p.retain = true;
        self.send(&Packet::Publish(p)).await;
        assert!(matches!(self.recv().await, Some(Packet::PubAck(_))));
    }

    /// The next PUBLISH (skipping nothing: any other packet fails).
    async fn publish_received(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Sends a DISCONNECT with `code` and `properties`, then closes.
    async fn disconnect(
        mut self,
        code: DisconnectReasonCode,
        properties: Option<DisconnectProperties>,
    ) {
        self.send(&Packet::Disconnect(Disconnect {
            reason_code: code,
            properties,
        }))
        .await;
        let _ = self.stream.shutdown().await;
    }
}

/// Waits for the next event that is about `client_id` and satisfies `pred`, skipping the
/// events of other clients.
async fn event_of(
    broker: &mut TestBroker,
    client_id: &str,
    pred: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    loop {
        let event = broker.next_event().await;
        let id = match &event {
            ConnectionEvent::Connected { client_id, .. }
            | ConnectionEvent::Disconnected { client_id, .. }
            | ConnectionEvent::SessionExpired { client_id, .. } => client_id.clone(),
        };
        if id == client_id {
            assert!(pred(&event), "unexpected event for {client_id}: {event:?}");
            return event;
        }
    }
}

/// rumqttc's MQTT 5 client, its event loop's outcomes on a channel (ending with the error
/// that ended it).
struct Rumqttc5 {
    _client: rumqttc::v5::AsyncClient,
    outcomes: mpsc::UnboundedReceiver<Result<rumqttc::v5::Event, String>>,
    errors: mpsc::UnboundedReceiver<rumqttc::v5::ConnectionError>,
}

impl Rumqttc5 {
    /// Connects as `client_id` (keep-alive 30 s) and waits for the CONNACK.
    async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        let mut options =
            rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 10);
        let (tx, outcomes) = mpsc::unbounded_channel();
        let (etx, errors) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(event) => {
                        if tx.send(Ok(event)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        let _ = etx.send(e);
                        return;
                    }
                }
            }
        });
        let mut c = Self {
            _client: client,
            outcomes,
            errors,
        };
        tokio::time::timeout(WAIT, async {
            loop {
                match c.outcomes.recv().await.expect("event loop alive") {
                    Ok(rumqttc::v5::Event::Incoming(Packet::ConnAck(ack))) => {
                        assert_eq!(ack.code, ConnectReturnCode::Success);
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => panic!("rumqttc v5 failed to connect: {e}"),
                }
            }
        })
        .await
        .expect("CONNACK within the deadline");
        c
    }

    /// The error that ended the event loop, which must be a server DISCONNECT: its reason.
    async fn server_disconnect(&mut self) -> DisconnectReasonCode {
        let error = tokio::time::timeout(WAIT, self.errors.recv())
            .await
            .expect("the connection to end within the deadline")
            .expect("an error ends the event loop");
        match error {
            rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
            ) => reason_code,
            other => panic!("expected a server DISCONNECT, the connection ended with {other:?}"),
        }
    }
}

/// A second connection with the same client id takes the session over: rumqttc's v5 client
/// sees DISCONNECT 0x8E (session taken over) and the presence event says takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_sends_disconnect_0x8e_to_rumqttc_v5() {
    let mut broker = TestBroker::start().await;
    let mut first = Rumqttc5::connect(broker.addr, "twin").await;
    broker.connected("twin").await;
    let _second = V5::connect(broker.addr, "twin").await;
    assert_eq!(
        first.server_disconnect().await,
        DisconnectReasonCode::SessionTakenOver
    );
    broker
        .disconnected("twin", DisconnectReason::Takeover)
        .await;
    broker.connected("twin").await;
}

/// A client that stops sending within 1.5 times its keep-alive gets DISCONNECT 0x8D (keep
/// alive timeout) before the close, and the event says keepalive_timeout; so does one whose
/// keep-alive `mqtt.max_keepalive` lowered (the CONNACK's server keep alive is the one in force).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_timeout_sends_disconnect_0x8d() {
    let mut broker = TestBroker::start_with(|c| c.max_keepalive = 1).await;
    let mut asked = connect("silent", true, ConnectProperties::new());
    asked.keep_alive = 1;
    let (mut silent, ack) = V5::connect_with(broker.addr, asked, None).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), None);
    let mut asked = connect("lowered", true, ConnectProperties::new());
    asked.keep_alive = 60;
    let (mut lowered, ack) = V5::connect_with(broker.addr, asked, None).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(1));
    let started = tokio::time::Instant::now();
    silent
        .disconnected_with(DisconnectReasonCode::KeepAliveTimeout, "keep-alive")
        .await;
    lowered
        .disconnected_with(DisconnectReasonCode::KeepAliveTimeout, "lowered keep-alive")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after 1.5 s, not after the 60 s asked for"
    );
    for id in ["silent", "lowered"] {
        event_of(&mut broker, id, |e| {
            matches!(e, ConnectionEvent::Connected { .. })
        })
        .await;
    }
    let mut reasons = Vec::new();
    for _ in 0..2 {
        match broker.next_event().await {
            ConnectionEvent::Disconnected {
                client_id, reason, ..
            } => reasons.push((client_id, reason)),
            other => panic!("expected Disconnected, got {other:?}"),
        }
    }
    reasons.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reasons,
        [
            ("lowered".to_owned(), DisconnectReason::KeepaliveTimeout),
            ("silent".to_owned(), DisconnectReason::KeepaliveTimeout),
        ]
    );
}

/// A broker shutdown sends DISCONNECT 0x8B (server shutting down), seen by rumqttc's v5
/// client, while a 3.1.1 client is just closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_disconnect_0x8b_to_rumqttc_v5() {
    let mut broker = TestBroker::start().await;
    let mut c = Rumqttc5::connect(broker.addr, "leaving").await;
    broker.connected("leaving").await;
    let (mut old, _) = RawClient::connect(broker.addr, ConnectOpts::new("old")).await;
    broker.connected("old").await;
    broker.stop().await;
    assert_eq!(
        c.server_disconnect().await,
        DisconnectReasonCode::ServerShuttingDown
    );
    assert!(old.until_closed().await.is_empty());
}

/// The CONNACK tells an MQTT 5 client what the broker decided: the id it assigned to an empty
/// client id (allowed without clean start), the keep-alive when `mqtt.max_keepalive` lowers
/// it, the session expiry when `mqtt.max_session_expiry` cuts it, and its limits (receive
/// maximum, maximum packet size, topic alias maximum). What it leaves unchanged is not echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connack_properties() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_keepalive = 20;
        c.max_session_expiry = Duration::from_secs(30);
        c.max_inflight = 7;
        c.max_packet_size = 5000;
    })
    .await;
    let mut asked = connect("", false, expiry(3600));
    asked.keep_alive = 60;
    let (_c, ack) = V5::connect_with(broker.addr, asked, None).await;
    let p = ack.properties.expect("CONNACK properties");
    let assigned = p.assigned_client_identifier.expect("an assigned client id");
    assert!(!assigned.is_empty());
    assert!(!ack.session_present);
    assert_eq!(p.server_keep_alive, Some(20));
    assert_eq!(p.session_expiry_interval, Some(30));
    assert_eq!(p.receive_max, Some(7));
    assert_eq!(p.max_packet_size, Some(5000));
    assert_eq!(p.topic_alias_max, Some(16));
    broker.connected(&assigned).await;

    // Within the limits: nothing echoed, no id assigned.
    let mut asked = connect("modest", true, expiry(10));
    asked.keep_alive = 15;
    let (_c, ack) = V5::connect_with(broker.addr, asked, None).await;
    let p = ack.properties.expect("CONNACK properties");
    assert_eq!(p.assigned_client_identifier, None);
    assert_eq!(p.server_keep_alive, None);
    assert_eq!(p.session_expiry_interval, None);
    assert_eq!(p.receive_max, Some(7));
    broker.connected("modest").await;

    // Keep-alive 0 ("none") is above any maximum: the CONNACK sets one.
    let mut asked = connect("timeless", true, ConnectProperties::new());
    asked.keep_alive = 0;
    let (_c, ack) = V5::connect_with(broker.addr, asked, None).await;
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(20));
    broker.connected("timeless").await;
}

/// The ACL of [`acks_carry_reason_codes`]: anonymous clients may read `public/#` only.
const ACL: &str = "topic read public/#\n";

/// Acknowledgements carry MQTT 5 reason codes: PUBACK 0x87 for a PUBLISH the ACL refuses,
/// SUBACK granted QoS / 0x80 for a filter the ACL refuses (the code the Paho conformance
/// client accepts) / 0x8F invalid filter per filter, UNSUBACK 0x11
/// for a filter that was not subscribed, PUBCOMP 0x92 for a PUBREL of an unknown packet id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_carry_reason_codes() {
    let dir = temp_dir("mqtt5-acl");
    let acl_file = dir.path().join("acl");
    std::fs::write(&acl_file, ACL).expect("writing the ACL");
    let auth = AuthConfig {
        allow_anonymous: true,
        acl_file: Some(acl_file),
        ..AuthConfig::default()
    };
    let mut broker = TestBroker::start_with_auth(|_| {}, auth).await;
    let mut c = V5::connect(broker.addr, "acks").await;
    broker.connected("acks").await;

    assert_eq!(
        c.publish("public/x", QoS::AtLeastOnce, b"no", 5, None)
            .await,
        Some(PubAckReason::NotAuthorized)
    );
    assert_eq!(
        c.subscribe(&[
            ("public/#", QoS::AtLeastOnce),
            ("private/#", QoS::AtMostOnce),
            ("a/#/b", QoS::AtMostOnce),
        ])
        .await,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Unspecified,
            SubscribeReasonCode::TopicFilterInvalid,
        ]
    );
    let mut unsub = Unsubscribe::new("public/#", None);
    unsub.filters.push("never/subscribed".to_owned());
    unsub.pkid = 2;
    c.send(&Packet::Unsubscribe(unsub)).await;
    match c.recv().await {
        Some(Packet::UnsubAck(ack)) => assert_eq!(
            ack.reasons,
            [
                UnsubAckReason::Success,
                UnsubAckReason::NoSubscriptionExisted
            ]
        ),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.send(&Packet::PubRel(PubRel::new(77, None))).await;
    match c.recv().await {
        Some(Packet::PubComp(comp)) => {
            assert_eq!(comp.pkid, 77);
            assert_eq!(comp.reason, PubCompReason::PacketIdentifierNotFound);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

/// A QoS 0 PUBLISH to `topic` (empty: none, for an alias) whose property list is `properties`
/// (raw bytes, length prefixed here).
fn publish_raw(topic: &str, properties: &[u8]) -> Vec<u8> {
    let short = |n: usize| u8::try_from(n).expect("a short test packet");
    let mut body = vec![0x00, short(topic.len())];
    body.extend_from_slice(topic.as_bytes());
    body.push(short(properties.len()));
    body.extend_from_slice(properties);
    body.extend_from_slice(b"payload");
    let mut packet = vec![0x30, short(body.len())];
    packet.extend(body);
    packet
}

/// Packets that break the specification get a server DISCONNECT with the reason code that
/// names the fault, then the close: 0x81 malformed (a property list longer than the packet),
/// 0x82 protocol error (a property given twice, MQTT 5 section 2.2.2.2; a second CONNECT,
/// section 3.1), 0x94 topic alias invalid (0, or above the CONNACK's maximum of 16, section
/// 3.3.2.3.4), 0x95 packet too large (over `mqtt.max_packet_size`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_get_disconnect_reason_codes() {
    let mut broker = TestBroker::start_with(|c| c.max_packet_size = 1024).await;
    let big = {
        let mut p = Publish::new("a", QoS::AtMostOnce, vec![0u8; 2000], None);
        p.pkid = 0;
        let mut bytes = BytesMut::new();
        Packet::Publish(p).write(&mut bytes, None).expect("encode");
        bytes.to_vec()
    };
    let mut second_connect = BytesMut::new();
    Packet::Connect(connect("again", true, ConnectProperties::new()), None, None)
        .write(&mut second_connect, None)
        .expect("encode");
    let cases: [(&str, Vec<u8>, DisconnectReasonCode); 7] = [
        (
            "property-list-too-long",
            vec![0x30, 0x05, 0x00, 0x01, b'a', 0x09, 0x01],
            DisconnectReasonCode::MalformedPacket,
        ),
        (
            "property-twice",
            publish_raw("a", &[0x01, 0x00, 0x01, 0x00]),
            DisconnectReasonCode::ProtocolError,
        ),
        (
            "alias-0",
            publish_raw("a", &[0x23, 0x00, 0x00]),
            DisconnectReasonCode::TopicAliasInvalid,
        ),
        (
            "alias-17",
            publish_raw("a", &[0x23, 0x00, 0x11]),
            DisconnectReasonCode::TopicAliasInvalid,
        ),
        (
            "unknown-alias",
            // The alias alone, never set.
            publish_raw("", &[0x23, 0x00, 0x05]),
            DisconnectReasonCode::ProtocolError,
        ),
        ("too-large", big, DisconnectReasonCode::PacketTooLarge),
        (
            "again",
            second_connect.to_vec(),
            DisconnectReasonCode::ProtocolError,
        ),
    ];
    for (id, bytes, code) in cases {
        let mut c = V5::connect(broker.addr, id).await;
        broker.connected(id).await;
        c.send_bytes(&bytes).await;
        c.disconnected_with(code, id).await;
        broker
            .disconnected(id, DisconnectReason::ProtocolError)
            .await;
    }
}

/// User properties of the test messages, a key repeated, out of alphabetical order.
fn user_properties() -> Vec<(String, String)> {
    [("b", "2"), ("a", "1"), ("b", "3")]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec()
}

/// The properties an MQTT 5 publisher sets reach an MQTT 5 subscriber unchanged (user
/// properties in order, content type, response topic, correlation data, payload format
/// indicator) with the message expiry interval; a 3.1.1 subscriber gets the same topic and
/// payload without properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_are_forwarded_to_v5_and_left_out_for_v311() {
    let broker = TestBroker::start().await;
    let mut sub5 = V5::connect(broker.addr, "sub5").await;
    sub5.subscribe(&[("props/#", QoS::AtLeastOnce)]).await;
    let (mut sub4, _) = RawClient::connect(broker.addr, ConnectOpts::new("sub4")).await;
    sub4.subscribe("props/#", rumqttc::mqttbytes::QoS::AtMostOnce)
        .await;
    let mut publisher = V5::connect(broker.addr, "pub5").await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(600),
        content_type: Some("text/plain".to_owned()),
        response_topic: Some("replies/here".to_owned()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: user_properties(),
        ..PublishProperties::default()
    };
    assert_eq!(
        publisher
            .publish("props/1", QoS::AtLeastOnce, b"hello", 1, Some(sent.clone()))
            .await,
        Some(PubAckReason::Success)
    );

    let got = sub5.publish_received().await;
    assert_eq!(&got.topic[..], b"props/1");
    assert_eq!(&got.payload[..], b"hello");
    let props = got.properties.expect("properties");
    let expiry = props.message_expiry_interval.expect("message expiry");
    assert!((598..=600).contains(&expiry), "remaining expiry {expiry}");
    assert_eq!(
        PublishProperties {
            message_expiry_interval: Some(600),
            ..props
        },
        sent
    );

    match sub4.recv().await {
        Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) => {
            assert_eq!(p.topic, "props/1");
            assert_eq!(&p.payload[..], b"hello", "no properties before the payload");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// A queued message whose expiry interval passes while its persistent subscriber is away is
/// not delivered and counts in heartwire_messages_dropped_total{reason="expired"}; one still
/// within its interval is delivered with the remaining interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_queued_messages_are_dropped_and_the_rest_carry_the_remaining_interval() {
    let broker = TestBroker::start().await;
    let (mut sub, _) = V5::connect_with(broker.addr, connect("away", true, expiry(60)), None).await;
    sub.subscribe(&[("exp/#", QoS::AtLeastOnce)]).await;
    sub.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let mut publisher = V5::connect(broker.addr, "expiring-pub").await;
    let with_expiry = |secs| {
        Some(PublishProperties {
            message_expiry_interval: Some(secs),
            ..PublishProperties::default()
        })
    };
    let before = metrics().messages_dropped.get(DropReason::Expired);
    publisher
        .publish("exp/short", QoS::AtLeastOnce, b"short", 1, with_expiry(1))
        .await;
    publisher
        .publish("exp/long", QoS::AtLeastOnce, b"long", 2, with_expiry(100))
        .await;
    // The passing of time is the condition: the short message's interval must run out.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (mut sub, ack) =
        V5::connect_with(broker.addr, connect("away", false, expiry(60)), None).await;
    assert!(ack.session_present);
    let got = sub.publish_received().await;
    assert_eq!(
        &got.payload[..],
        b"long",
        "the expired message is not delivered"
    );
    let remaining = got
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("message expiry");
    assert!((97..=98).contains(&remaining), "remaining {remaining}");
    sub.send(&Packet::PubAck(PubAck::new(got.pkid, None))).await;
    testkit::eventually("the expired message counted", || async {
        (metrics().messages_dropped.get(DropReason::Expired) > before).then_some(())
    })
    .await;
    assert!(
        sub.recv_within(Duration::from_millis(200)).await.is_err(),
        "nothing else is delivered"
    );
}

/// Session expiry 0 with clean start false keeps nothing: the next connection finds no
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_zero_keeps_nothing() {
    let broker = TestBroker::start().await;
    let (mut c, ack) =
        V5::connect_with(broker.addr, connect("brief", false, expiry(0)), None).await;
    assert!(!ack.session_present);
    c.subscribe(&[("brief/#", QoS::AtLeastOnce)]).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let (_c, ack) = V5::connect_with(broker.addr, connect("brief", false, expiry(0)), None).await;
    assert!(
        !ack.session_present,
        "expiry 0: the session ended with its connection"
    );
}

/// With session expiry N > 0 the subscription and a queued QoS 1 message survive a
/// reconnection within N (session present); after N the session is gone (session present 0)
/// and the SessionExpired event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_keeps_the_session_for_its_interval() {
    let mut broker = TestBroker::start().await;
    let (mut c, _) = V5::connect_with(broker.addr, connect("lasting", true, expiry(1)), None).await;
    c.subscribe(&[("last/#", QoS::AtLeastOnce)]).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let mut publisher = V5::connect(broker.addr, "lasting-pub").await;
    publisher
        .publish("last/1", QoS::AtLeastOnce, b"kept", 1, None)
        .await;

    let (mut c, ack) =
        V5::connect_with(broker.addr, connect("lasting", false, expiry(1)), None).await;
    assert!(
        ack.session_present,
        "within its expiry the session is resumed"
    );
    let got = c.publish_received().await;
    assert_eq!(&got.payload[..], b"kept");
    c.send(&Packet::PubAck(PubAck::new(got.pkid, None))).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let left = tokio::time::Instant::now();

    for kind in [
        TransitionKind::Connected,
        TransitionKind::Disconnected,
        TransitionKind::Connected,
        TransitionKind::Disconnected,
        TransitionKind::SessionExpired,
    ] {
        event_of(&mut broker, "lasting", |e| e.kind() == kind).await;
    }
    assert!(
        left.elapsed() >= Duration::from_millis(900),
        "expired early"
    );
    let (_c, ack) = V5::connect_with(broker.addr, connect("lasting", false, expiry(1)), None).await;
    assert!(!ack.session_present, "after its expiry the session is gone");
}

/// A DISCONNECT that sets a session expiry after a CONNECT with expiry 0 is a protocol error
/// (MQTT 5 section 3.14.2.2.2): DISCONNECT 0x82 from the server. The same DISCONNECT after a
/// CONNECT with an expiry is a normal disconnection, and the new expiry keeps the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_on_disconnect_after_zero_is_a_protocol_error() {
    let mut broker = TestBroker::start().await;
    let setting_expiry = || {
        Some(DisconnectProperties {
            session_expiry_interval: Some(10),
            reason_string: None,
            user_properties: Vec::new(),
            server_reference: None,
        })
    };
    let mut c = V5::connect(broker.addr, "late-expiry").await;
    broker.connected("late-expiry").await;
    c.send(&Packet::Disconnect(Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
        properties: setting_expiry(),
    }))
    .await;
    c.disconnected_with(DisconnectReasonCode::ProtocolError, "late expiry")
        .await;
    broker
        .disconnected("late-expiry", DisconnectReason::ProtocolError)
        .await;

    let (c, _) = V5::connect_with(broker.addr, connect("lengthens", true, expiry(1)), None).await;
    broker.connected("lengthens").await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, setting_expiry())
        .await;
    broker
        .disconnected("lengthens", DisconnectReason::ClientDisconnect)
        .await;
    let (_c, ack) =
        V5::connect_with(broker.addr, connect("lengthens", false, expiry(1)), None).await;
    assert!(
        ack.session_present,
        "the session kept by the DISCONNECT's expiry"
    );
}

/// A will with user properties.
fn will(topic: &str) -> LastWill {
    LastWill::new(
        topic,
        b"gone".to_vec(),
        QoS::AtMostOnce,
        false,
        Some(LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".to_owned()),
            response_topic: Some("wills/replies".to_owned()),
            correlation_data: Some(Bytes::from_static(b"corr")),
            user_properties: user_properties(),
        }),
    )
}

/// DISCONNECT 0x04 (disconnect with will message) publishes the will, its properties (user
/// properties in order, content type, response topic, correlation data) included; a normal
/// DISCONNECT does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_with_will_message_publishes_the_will() {
    let broker = TestBroker::start().await;
    let mut watcher = V5::connect(broker.addr, "watcher").await;
    watcher.subscribe(&[("wills/#", QoS::AtMostOnce)]).await;

    let opts = connect("quitter", true, ConnectProperties::new());
    let (c, _) = V5::connect_with(broker.addr, opts, Some(will("wills/quitter"))).await;
    c.disconnect(DisconnectReasonCode::DisconnectWithWillMessage, None)
        .await;
    let got = watcher.publish_received().await;
    assert_eq!(&got.topic[..], b"wills/quitter");
    assert_eq!(&got.payload[..], b"gone");
    let props = got.properties.expect("will properties");
    assert_eq!(props.user_properties, user_properties());
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.response_topic.as_deref(), Some("wills/replies"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr"[..]));

    let opts = connect("polite", true, ConnectProperties::new());
    let (c, _) = V5::connect_with(broker.addr, opts, Some(will("wills/polite"))).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    // A marker published after the polite client left comes first: no will before it.
    let mut publisher = V5::connect(broker.addr, "marker").await;
    publisher
        .publish("wills/marker", QoS::AtLeastOnce, b"marker", 1, None)
        .await;
    assert_eq!(&watcher.publish_received().await.topic[..], b"wills/marker");
}

/// Inbound topic aliases: a PUBLISH with a topic and an alias sets it, one with the alias
/// alone is routed to that topic; two aliases are kept apart, an alias can be set anew, and
/// the subscriber (topic alias maximum 0) gets full topics and no alias. The mappings end with
/// the connection (MQTT 5 section 3.3.2.3.4): the alias alone on a new one is a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_topic_aliases_route_to_their_topics() {
    let mut broker = TestBroker::start().await;
    let mut sub = V5::connect(broker.addr, "alias-sub").await;
    sub.subscribe(&[("alias/#", QoS::AtLeastOnce)]).await;
    let mut publisher = V5::connect(broker.addr, "alias-pub").await;
    let alias = |n| {
        Some(PublishProperties {
            topic_alias: Some(n),
            ..PublishProperties::default()
        })
    };
    let sends = [
        ("alias/one", 1, "1"),
        ("", 1, "2"),
        ("alias/two", 2, "3"),
        ("", 2, "4"),
        ("", 1, "5"),
        ("alias/three", 1, "6"),
        ("", 1, "7"),
        ("", 2, "8"),
    ];
    for (i, (topic, n, payload)) in sends.into_iter().enumerate() {
        let pkid = u16::try_from(i + 1).expect("small");
        assert_eq!(
            publisher
                .publish(topic, QoS::AtLeastOnce, payload.as_bytes(), pkid, alias(n))
                .await,
            Some(PubAckReason::Success)
        );
    }
    let mut got = Vec::new();
    for _ in 0..sends.len() {
        let p = sub.publish_received().await;
        sub.send(&Packet::PubAck(PubAck::new(p.pkid, None))).await;
        assert_eq!(p.properties.and_then(|p| p.topic_alias), None);
        got.push((
            String::from_utf8(p.topic.to_vec()).expect("UTF-8"),
            String::from_utf8(p.payload.to_vec()).expect("UTF-8"),
        ));
    }
    let want: Vec<_> = [
        ("alias/one", "1"),
        ("alias/one", "2"),
        ("alias/two", "3"),
        ("alias/two", "4"),
        ("alias/one", "5"),
        ("alias/three", "6"),
        ("alias/three", "7"),
        ("alias/two", "8"),
    ]
    .map(|(t, p)| (t.to_owned(), p.to_owned()))
    .to_vec();
    assert_eq!(got, want);

    publisher
        .disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let mut again = V5::connect(broker.addr, "alias-pub").await;
    for kind in [
        TransitionKind::Connected,
        TransitionKind::Disconnected,
        TransitionKind::Connected,
    ] {
        event_of(&mut broker, "alias-pub", |e| e.kind() == kind).await;
    }
    again.publish("", QoS::AtMostOnce, b"9", 0, alias(1)).await;
    again
        .disconnected_with(
            DisconnectReasonCode::ProtocolError,
            "alias of an old connection",
        )
        .await;
    broker
        .disconnected("alias-pub", DisconnectReason::ProtocolError)
        .await;
}

/// A message larger than the maximum packet size an MQTT 5 subscriber declared is not sent to
/// it and counts in heartwire_messages_dropped_total{reason="packet_too_large"}; smaller ones
/// are delivered, one exactly at the limit included (the limit counts the whole packet, MQTT 5
/// section 3.1.2.11.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_maximum_packet_size_is_honoured() {
    let broker = TestBroker::start().await;
    let props = ConnectProperties {
        max_packet_size: Some(200),
        ..ConnectProperties::new()
    };
    let (mut sub, _) = V5::connect_with(broker.addr, connect("small", true, props), None).await;
    sub.subscribe(&[("size/#", QoS::AtMostOnce)]).await;
    let mut publisher = V5::connect(broker.addr, "size-pub").await;
    let before = metrics().messages_dropped.get(DropReason::PacketTooLarge);
    // A QoS 0 PUBLISH to "size/x" without properties: 1 byte of header, 2 of remaining
    // length, 8 of topic, 1 of property length, then the payload. 189 bytes make 201.
    let sends: [(&str, usize); 4] = [
        ("size/x", 500),
        ("size/x", 189),
        ("size/x", 188),
        ("size/x", 100),
    ];
    for (i, (topic, len)) in sends.into_iter().enumerate() {
        let pkid = u16::try_from(i + 1).expect("small");
        publisher
            .publish(topic, QoS::AtLeastOnce, &vec![1u8; len], pkid, None)
            .await;
    }
    // What arrives, as sizes on the wire: the one at the limit and the small one.
    let mut sizes = Vec::new();
    for _ in 0..2 {
        let got = sub.publish_received().await;
        let mut bytes = BytesMut::new();
        sizes.push(
            Packet::Publish(got)
                .write(&mut bytes, None)
                .expect("encode"),
        );
    }
    assert_eq!(sizes, [200, 111]);
    assert_eq!(
        metrics().messages_dropped.get(DropReason::PacketTooLarge),
        before + 2
    );
}

/// With receive maximum 2 the broker has at most 2 QoS 1 messages unacknowledged at the
/// client; each PUBACK lets one more through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_receive_maximum_bounds_the_messages_in_flight() {
    let broker = TestBroker::start().await;
    let props = ConnectProperties {
        receive_maximum: Some(2),
        ..ConnectProperties::new()
    };
    let (mut sub, _) = V5::connect_with(broker.addr, connect("slow", true, props), None).await;
    sub.subscribe(&[("flow/#", QoS::AtLeastOnce)]).await;
    let mut publisher = V5::connect(broker.addr, "flow-pub").await;
    for i in 1..=5u16 {
        publisher
            .publish("flow/t", QoS::AtLeastOnce, &i.to_be_bytes(), i, None)
            .await;
    }
    let first = sub.publish_received().await;
    let second = sub.publish_received().await;
    assert!(
        sub.recv_within(Duration::from_millis(300)).await.is_err(),
        "a third message while two are unacknowledged"
    );
    sub.send(&Packet::PubAck(PubAck::new(first.pkid, None)))
        .await;
    let third = sub.publish_received().await;
    assert_eq!(&third.payload[..], &3u16.to_be_bytes());
    assert!(
        sub.recv_within(Duration::from_millis(300)).await.is_err(),
        "a fourth message while two are unacknowledged"
    );
    for p in [second, third] {
        sub.send(&Packet::PubAck(PubAck::new(p.pkid, None))).await;
    }
    for i in 4..=5u16 {
        assert_eq!(&sub.publish_received().await.payload[..], &i.to_be_bytes());
    }
}

/// A retained MQTT 5 message keeps its properties for later subscribers, its expiry interval
/// counting down; once the interval has passed it is no longer sent to new subscribers (MQTT 5
/// section 3.3.2.3.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_keep_their_properties_and_expire() {
    let broker = TestBroker::start().await;
    let mut publisher = V5::connect(broker.addr, "retainer").await;
    let props = |secs| PublishProperties {
        message_expiry_interval: Some(secs),
        content_type: Some("text/plain".to_owned()),
        user_properties: user_properties(),
        ..PublishProperties::default()
    };
    for (topic, secs, pkid) in [("kept/short", 1, 1), ("kept/long", 100, 2)] {
        let mut p = Publish::new(
            topic,
            QoS::AtLeastOnce,
            b"retained".to_vec(),
            Some(props(secs)),
        );
        p.pkid = pkid;
        p.retain = true;
        publisher.send(&Packet::Publish(p)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.pkid == pkid));
    }
    // The passing of time is the condition: the short message's interval must run out.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut late = V5::connect(broker.addr, "late").await;
    late.subscribe(&[("kept/#", QoS::AtMostOnce)]).await;
    let got = late.publish_received().await;
    assert_eq!(
        &got.topic[..],
        b"kept/long",
        "the expired retained message is not sent"
    );
    assert!(got.retain);
    let got = got.properties.expect("properties");
    let remaining = got.message_expiry_interval.expect("message expiry");
    assert!((97..=98).contains(&remaining), "remaining {remaining}");
    assert_eq!(
        PublishProperties {
            message_expiry_interval: Some(100),
            ..got
        },
        props(100)
    );
    assert!(
        late.recv_within(Duration::from_millis(200)).await.is_err(),
        "nothing else is sent"
    );
}

/// A QoS 1 message waiting behind the receive maximum of an online subscriber still expires:
/// once its interval has passed it is not sent when room frees up (MQTT 5 section
/// 3.3.2.3.3), and counts in heartwire_messages_dropped_total{reason="expired"}.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_behind_the_receive_maximum_still_expire() {
    let broker = TestBroker::start().await;
    let props = ConnectProperties {
        receive_maximum: Some(1),
        ..ConnectProperties::new()
    };
    let (mut sub, _) =
        V5::connect_with(broker.addr, connect("one-at-a-time", true, props), None).await;
    sub.subscribe(&[("wait/#", QoS::AtLeastOnce)]).await;
    let mut publisher = V5::connect(broker.addr, "wait-pub").await;
    let before = metrics().messages_dropped.get(DropReason::Expired);
    let short = Some(PublishProperties {
        message_expiry_interval: Some(1),
        ..PublishProperties::default()
    });
    publisher
        .publish("wait/a", QoS::AtLeastOnce, b"a", 1, None)
        .await;
    publisher
        .publish("wait/b", QoS::AtLeastOnce, b"b", 2, short)
        .await;
    publisher
        .publish("wait/c", QoS::AtLeastOnce, b"c", 3, None)
        .await;
    let first = sub.publish_received().await;
    assert_eq!(&first.payload[..], b"a");
    // The passing of time is the condition: "b"'s interval must run out while it waits.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    sub.send(&Packet::PubAck(PubAck::new(first.pkid, None)))
        .await;
    let next = sub.publish_received().await;
    assert_eq!(&next.payload[..], b"c", "the expired message is not sent");
    // More than before (other tests of this binary may expire messages at the same time).
    assert!(metrics().messages_dropped.get(DropReason::Expired) > before);
}

/// A client that sends more unacknowledged QoS 2 PUBLISHes than the receive maximum the
/// CONNACK gave it gets DISCONNECT 0x93 (receive maximum exceeded, MQTT 5 section 3.3.4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_broker_receive_maximum_gets_0x93() {
    let mut broker = TestBroker::start_with(|c| c.max_inflight = 2).await;
    let (mut c, ack) = V5::connect_with(
        broker.addr,
        connect("eager", true, ConnectProperties::new()),
        None,
    )
    .await;
    assert_eq!(ack.properties.and_then(|p| p.receive_max), Some(2));
    broker.connected("eager").await;
    for pkid in 1..=2 {
        c.publish("eager/t", QoS::ExactlyOnce, b"x", pkid, None)
            .await;
        assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == pkid));
    }
    c.publish("eager/t", QoS::ExactlyOnce, b"x", 3, None).await;
    c.disconnected_with(DisconnectReasonCode::ReceiveMaximumExceeded, "third QoS 2")
        .await;
    broker
        .disconnected("eager", DisconnectReason::ProtocolError)
        .await;
}

/// A refused MQTT 5 CONNECT gets an MQTT 5 CONNACK with its reason code: 0x85 (client
/// identifier not valid) for a client id with a control character or over
/// `mqtt.max_client_id_len`; then the close, and no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connect_gets_an_mqtt5_connack_reason_code() {
    let mut broker = TestBroker::start_with(|c| c.max_client_id_len = 8).await;
    for id in ["bad\u{1}id", "far-too-long-an-id"] {
        let mut c = V5::tcp(broker.addr).await;
        c.send(&Packet::Connect(
            connect(id, true, ConnectProperties::new()),
            None,
            None,
        ))
        .await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(
                    ack.code,
                    ConnectReturnCode::ClientIdentifierNotValid,
                    "{id:?}"
                );
            }
            other => panic!("{id:?}: expected CONNACK, got {other:?}"),
        }
        assert_eq!(c.recv().await, None, "{id:?}: closed after the CONNACK");
    }
    broker.no_event_pending();
}

/// A resumed session's queued QoS 1 messages obey the receive maximum of the connection that
/// resumes it: one at a time with receive maximum 1, the next after each PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_obeys_the_new_receive_maximum() {
    let broker = TestBroker::start().await;
    let (mut sub, _) =
        V5::connect_with(broker.addr, connect("resumer", true, expiry(60)), None).await;
    sub.subscribe(&[("resume/#", QoS::AtLeastOnce)]).await;
    sub.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let mut publisher = V5::connect(broker.addr, "resume-pub").await;
    for i in 1..=3u16 {
        publisher
            .publish("resume/t", QoS::AtLeastOnce, &i.to_be_bytes(), i, None)
            .await;
    }
    let props = ConnectProperties {
        receive_maximum: Some(1),
        ..expiry(60)
    };
    let (mut sub, ack) =
        V5::connect_with(broker.addr, connect("resumer", false, props), None).await;
    assert!(ack.session_present);
    for i in 1..=3u16 {
        let p = sub.publish_received().await;
        assert_eq!(&p.payload[..], &i.to_be_bytes());
        assert!(
            sub.recv_within(Duration::from_millis(200)).await.is_err(),
            "a second message in flight with receive maximum 1"
        );
        sub.send(&Packet::PubAck(PubAck::new(p.pkid, None))).await;
    }
}

/// Runs `program` with `args` to its end (bounded); its exit success and output. `None`
/// when the program is not installed.
async fn run(program: &str, args: &[&str]) -> Option<(bool, String, String)> {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} did not finish within {WAIT:?}"));
    match out {
        Ok(out) => Some((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// Debian's mosquitto_pub and mosquitto_sub at MQTT 5: user properties, content type and
/// response topic set with `-D publish ...` reach mosquitto_sub's `-F '%P ...'`. The
/// subscriber keeps a session (`-c -x 60`) so the message waits for it: no race between the
/// two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_v5_pass_properties_through() {
    let broker = TestBroker::start().await;
    let port = broker.addr.port().to_string();
    let base = ["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"];
    let session = ["-i", "msub", "-c", "-x", "60", "-t", "mprops/#"];
    let args: Vec<&str> = base
        .iter()
        .chain(&session)
        .chain(&["-E"])
        .copied()
        .collect();
    let Some((ok, out, err)) = run("mosquitto_sub", &args).await else {
        panic!(
            "mosquitto_sub is not installed: install Debian's mosquitto-clients (./test.sh does)"
        );
    };
    assert!(ok, "mosquitto_sub -E: {out}{err}");
    let publish = [
        "-i",
        "mpub",
        "-t",
        "mprops/1",
        "-m",
        "hi",
        "-D",
        "publish",
        "user-property",
        "k",
        "v",
        "-D",
        "publish",
        "user-property",
        "k2",
        "v2",
        "-D",
        "publish",
        "content-type",
        "text/x",
        "-D",
        "publish",
        "response-topic",
        "mreply",
    ];
    let args: Vec<&str> = base.iter().chain(&publish).copied().collect();
    let (ok, out, err) = run("mosquitto_pub", &args)
        .await
        .expect("mosquitto_pub is installed (Debian's mosquitto-clients, ./test.sh)");
    assert!(ok, "mosquitto_pub: {out}{err}");
    let receive = ["-C", "1", "-W", "9", "-F", "%t|%p|%P|%C|%R"];
    let args: Vec<&str> = base
        .iter()
        .chain(&session)
        .chain(&receive)
        .copied()
        .collect();
    let (ok, out, err) = run("mosquitto_sub", &args)
        .await
        .expect("mosquitto_sub is installed (Debian's mosquitto-clients, ./test.sh)");
    assert!(ok, "mosquitto_sub: {out}{err}");
    assert_eq!(out.trim(), "mprops/1|hi|k:v k2:v2|text/x|mreply");
}

/// The MQTT 5 script of broker/tests/js; fails with what to do when node or MQTT.js is not
/// installed.
async fn mqttjs5() -> &'static str {
    if run("node", &["--version"]).await.is_none() {
        panic!("node is not installed (./test.sh installs it)");
    }
    let modules = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/node_modules/mqtt");
    assert!(
        Path::new(modules).is_dir(),
        "MQTT.js is not installed: run ./test.sh (or npm ci --prefix broker/tests/js)"
    );
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js/mqttjs5-client.mjs")
}

/// MQTT.js at protocol level 5: connects, subscribes, publishes with user properties and
/// receives them back unchanged and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_v5_user_properties_round_trip() {
    let broker = TestBroker::start().await;
    let url = format!("mqtt://127.0.0.1:{}", broker.addr.port());
    let script = mqttjs5().await;
    let (ok, out, err) = run("node", &[script, "echo", &url, "js5-echo"])
        .await
        .expect("node installed");
    assert!(ok, "MQTT.js: {out}{err}");
    assert!(
        out.contains(r#""userProperties":{"b":["2","3"],"a":"1"}"#),
        "user properties back: {out}"
    );
}

/// An MQTT.js client at protocol level 5 that is taken over sees reason code 0x8E (142) on
/// its 'disconnect' event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttjs_v5_sees_takeover_0x8e() {
    let mut broker = TestBroker::start().await;
    let url = format!("mqtt://127.0.0.1:{}", broker.addr.port());
    let script = mqttjs5().await;
    let js =
        tokio::spawn(async move { run("node", &[script, "takeover", &url, "js5-twin"]).await });
    broker.connected("js5-twin").await;
    let _second = V5::connect(broker.addr, "js5-twin").await;
    let (ok, out, err) = js.await.expect("node task").expect("node installed");
    assert!(ok, "MQTT.js: {out}{err}");
    assert!(out.contains(r#""reasonCode":142"#), "{out}");
}

/// A will delayed by `delay` seconds on `topic`.
fn delayed_will(topic: &str, delay: u32) -> LastWill {
    LastWill::new(
        topic,
        b"late".to_vec(),
        QoS::AtMostOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    )
}

/// Will delay (MQTT 5 section 3.1.3.2.2): a client that reconnects within its will delay
/// cancels the will; one that does not has it published once the delay has passed, not
/// before; a session that ends with the connection publishes the will at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_delay_rides_out_a_reconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = V5::connect(broker.addr, "will-watcher").await;
    watcher.subscribe(&[("late/#", QoS::AtMostOnce)]).await;

    // Back within the delay: no will.
    let opts = connect("blip", true, expiry(60));
    let (c, _) = V5::connect_with(broker.addr, opts, Some(delayed_will("late/blip", 1))).await;
    drop(c);
    let opts = connect("blip", false, expiry(60));
    let (_back, ack) = V5::connect_with(broker.addr, opts, None).await;
    assert!(ack.session_present);
    // Gone for good: the will, after its delay.
    let opts = connect("gone", true, expiry(60));
    let (c, _) = V5::connect_with(broker.addr, opts, Some(delayed_will("late/gone", 1))).await;
    let left = tokio::time::Instant::now();
    drop(c);
    let got = watcher.publish_received().await;
    assert_eq!(
        &got.topic[..],
        b"late/gone",
        "only the will of the client that stayed away"
    );
    assert!(
        left.elapsed() >= Duration::from_millis(900),
        "published after its delay, not at once: {:?}",
        left.elapsed()
    );
    // A session that ends with the connection (expiry 0) ends the delay too.
    let opts = connect("brief", true, expiry(0));
    let (c, _) = V5::connect_with(broker.addr, opts, Some(delayed_will("late/brief", 60))).await;
    drop(c);
    assert_eq!(&watcher.publish_received().await.topic[..], b"late/brief");
}

/// Shared subscriptions: a 3.1.1 member and an MQTT 5 member of `$share/g/jobs/#` get the
/// group's messages in turn (round robin), a plain subscriber gets every one, and when a member
/// leaves (its session ends) with QoS 1 messages it never acknowledged, they go to the other
/// member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_subscriptions_take_turns_and_redeliver_what_a_leaving_member_held() {
    let mut broker = TestBroker::start().await;
    let (mut old, _) = RawClient::connect(broker.addr, ConnectOpts::new("member-311")).await;
    broker.connected("member-311").await;
    old.subscribe("$share/g/jobs/#", rumqttc::mqttbytes::QoS::AtLeastOnce)
        .await;
    let mut new = V5::connect(broker.addr, "member-5").await;
    new.subscribe(&[("$share/g/jobs/#", QoS::AtLeastOnce)])
        .await;
    let mut all = V5::connect(broker.addr, "everything").await;
    all.subscribe(&[("jobs/#", QoS::AtMostOnce)]).await;

    let mut producer = V5::connect(broker.addr, "producer").await;
    for i in 0..4u16 {
        producer
            .publish(&format!("jobs/{i}"), QoS::AtLeastOnce, b"job", i + 1, None)
            .await;
    }
    for _ in 0..4 {
        all.publish_received().await;
    }
    // Two each; the 3.1.1 member does not acknowledge its two.
    let mut to_new = Vec::new();
    for _ in 0..2 {
        let p = new.publish_received().await;
        new.send(&Packet::PubAck(PubAck::new(p.pkid, None))).await;
        to_new.push(p.topic);
    }
    let mut to_old = Vec::new();
    for _ in 0..2 {
        match old.recv().await {
            Some(rumqttc::mqttbytes::v4::Packet::Publish(p)) => to_old.push(p.topic),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(
        to_new.len() + to_old.len(),
        4,
        "each message to one member: {to_new:?} {to_old:?}"
    );
    let before = metrics().shared_redeliveries.get();
    // The 3.1.1 member (clean session) leaves: its two go to the MQTT 5 member.
    drop(old);
    event_of(&mut broker, "member-311", |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    let mut again = Vec::new();
    for _ in 0..2 {
        again.push(String::from_utf8(new.publish_received().await.topic.to_vec()).expect("utf-8"));
    }
    again.sort();
    to_old.sort();
    assert_eq!(again, to_old, "redelivered to the remaining member");
    assert!(metrics().shared_redeliveries.get() >= before + 2);
}

/// Subscription options and identifiers: no local keeps a client's own messages from it,
/// retain as published keeps the retain flag on live delivery (it is cleared otherwise),
/// retain handling 2 sends no retained message, and every matching subscription's identifier
/// comes with the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_options_and_identifiers() {
    let broker = TestBroker::start().await;
    let mut c = V5::connect(broker.addr, "options").await;
    let mut other = V5::connect(broker.addr, "options-publisher").await;
    other.publish_retained("opt/retained", b"old").await;
    let mut sub = Subscribe::new_many(
        [
            Filter {
                nolocal: true,
                ..Filter::new("opt/mine", QoS::AtLeastOnce)
            },
            Filter {
                preserve_retain: true,
                ..Filter::new("opt/+", QoS::AtLeastOnce)
            },
        ],
        Some(rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id: Some(7),
            user_properties: Vec::new(),
        }),
    );
    sub.pkid = 1;
    c.send(&Packet::Subscribe(sub)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let mut sub = Subscribe::new_many(
        [Filter {
            retain_forward_rule: rumqttc::v5::mqttbytes::v5::RetainForwardRule::Never,
            ..Filter::new("opt/#", QoS::AtMostOnce)
        }],
        Some(rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id: Some(9),
            user_properties: Vec::new(),
        }),
    );
    sub.pkid = 2;
    c.send(&Packet::Subscribe(sub)).await;
    // opt/+ (retain handling 0) sends the retained message, opt/# (2) does not.
    let mut retained = Vec::new();
    let mut acked = false;
    while !acked || retained.is_empty() {
        match c.recv().await {
            Some(Packet::SubAck(ack)) if ack.pkid == 2 => acked = true,
            Some(Packet::Publish(p)) => {
                c.send(&Packet::PubAck(PubAck::new(p.pkid, None))).await;
                retained.push(p);
            }
            other => panic!("expected SUBACK or PUBLISH, got {other:?}"),
        }
    }
    assert!(
        c.recv_within(Duration::from_millis(200)).await.is_err(),
        "one retained message"
    );
    assert!(retained[0].retain);
    assert_eq!(
        retained[0]
            .properties
            .as_ref()
            .map(|p| p.subscription_identifiers.clone()),
        Some(vec![7])
    );
    // Its own message on opt/mine: through opt/+ and opt/# only (no local on opt/mine), as
    // published (retain flag kept by opt/+), with both identifiers.
    let mut p = Publish::new("opt/mine", QoS::AtMostOnce, b"own".to_vec(), None);
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    let got = c.publish_received().await;
    assert_eq!(&got.payload[..], b"own");
    assert!(got.retain, "retain as published");
    let mut ids = got
        .properties
        .map(|p| p.subscription_identifiers)
        .unwrap_or_default();
    ids.sort_unstable();
    assert_eq!(ids, vec![7, 9]);
    // Another client's retained publish on a topic only opt/# matches: retain cleared.
    other.publish_retained("opt/x/y", b"live").await;
    let got = c.publish_received().await;
    assert_eq!(&got.payload[..], b"live");
    assert!(!got.retain, "retain cleared without retain as published");
    assert!(c.recv_within(Duration::from_millis(200)).await.is_err());
}

/// GET `path` from a full broker's API once `pred` holds for its JSON; fails after [`WAIT`].
async fn api_when(
    broker: &testkit::FullBroker,
    path: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    testkit::eventually(what, || async {
        let body = testkit::http_get(broker.http, path).await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        pred(&v).then_some(v)
    })
    .await
}

/// A time of the API's JSON.
fn api_time(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str()
        .expect("a time")
        .parse()
        .expect("an RFC 3339 time")
}

/// An MQTT 5 client's DISCONNECT 0x04 (with will) and its reason string reach the session's
/// history row, as the API shows it, with the protocol level; a session that ends with its
/// connection is not held for the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_the_disconnect_reason_code_and_string_of_the_session() {
    let broker = testkit::FullBroker::start_sqlite().await;
    let c = V5::connect(broker.mqtt, "leaving").await;
    c.disconnect(
        DisconnectReasonCode::DisconnectWithWillMessage,
        Some(DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some("battery low\n".into()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    )
    .await;
    let body = api_when(
        &broker,
        "/api/v1/devices/leaving/sessions",
        "the session closed",
        |v| v["sessions"][0]["reason"] == "client_disconnect",
    )
    .await;
    let row = &body["sessions"][0];
    assert_eq!(row["reason_code"], 0x04, "{row}");
    assert_eq!(row["reason_string"], "battery low\\n", "escaped: {row}");
    assert_eq!(row["protocol"], "5", "{row}");
    assert_eq!(row["session_expires_at"], serde_json::Value::Null, "{row}");
    let device = api_when(&broker, "/api/v1/devices/leaving", "offline", |v| {
        v["online"] == false
    })
    .await;
    assert_eq!(device["protocol"], "5", "{device}");
    assert_eq!(
        device["session_expires_at"],
        serde_json::Value::Null,
        "{device}"
    );
    broker.stop().await;
}

/// A persistent MQTT 5 session (expiry 2 s) is shown on the device row as held until its
/// expiry after the client leaves, and no more once it has expired (recorded on the session
/// row as well).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_a_held_session_until_it_expires() {
    let broker = testkit::FullBroker::start_sqlite().await;
    let (c, _) = V5::connect_with(broker.mqtt, connect("keeper", true, expiry(2)), None).await;
    c.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let device = api_when(&broker, "/api/v1/devices/keeper", "a held session", |v| {
        v["online"] == false && !v["session_expires_at"].is_null()
    })
    .await;
    let held = api_time(&device["session_expires_at"]) - api_time(&device["disconnected_at"]);
    assert!(
        (1900..=2100).contains(&held.num_milliseconds()),
        "held for the session expiry interval: {device}"
    );
    assert_eq!(device["last_session"]["reason_code"], 0x00, "{device}");
    assert_eq!(
        device["last_session"]["session_expires_at"],
        device["session_expires_at"]
    );
    let device = api_when(
        &broker,
        "/api/v1/devices/keeper",
        "the session expired",
        |v| v["session_expires_at"].is_null(),
    )
    .await;
    assert!(
        !device["last_session"]["expired_at"].is_null(),
        "the expiry is recorded on the session row: {device}"
    );
    broker.stop().await;
}

/// A takeover's DISCONNECT 0x8E is recorded on the old session's row; no session is shown as
/// held (it goes on with the new connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_the_takeover_code_on_the_old_session() {
    let broker = testkit::FullBroker::start_sqlite().await;
    let (mut first, _) =
        V5::connect_with(broker.mqtt, connect("twin5", true, expiry(60)), None).await;
    let _second = V5::connect_with(broker.mqtt, connect("twin5", false, expiry(60)), None).await;
    first
        .disconnected_with(DisconnectReasonCode::SessionTakenOver, "takeover")
        .await;
    let body = api_when(
        &broker,
        "/api/v1/devices/twin5/sessions",
        "two sessions, the old one taken over",
        |v| v["sessions"][1]["reason"] == "takeover",
    )
    .await;
    let old = &body["sessions"][1];
    assert_eq!(old["reason_code"], 0x8E, "{old}");
    assert_eq!(old["reason_string"], serde_json::Value::Null, "{old}");
    assert_eq!(old["session_expires_at"], serde_json::Value::Null, "{old}");
    let device = api_when(&broker, "/api/v1/devices/twin5", "online again", |v| {
        v["online"] == true
    })
    .await;
    assert_eq!(device["session_id"], body["sessions"][0]["session_id"]);
    assert_eq!(
        device["session_expires_at"],
        serde_json::Value::Null,
        "{device}"
    );
    broker.stop().await;
}

/// An MQTT 5 persistent session survives `kill -9` of the broker process with what MQTT 5
/// adds: its session expiry interval, its subscription's options (no local, retain as
/// published) and identifier, and a queued message's properties (user properties in order,
/// content type, response topic, correlation data, payload format indicator), the message
/// expiry counting on from where it was. A delivery not acknowledged before the next kill
/// comes again; the retained message keeps its properties too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_session_survives_kill_9_with_its_options_and_message_properties() {
    const BROKER: &str = env!("CARGO_BIN_EXE_broker");
    let data = temp_dir("mqtt5-durable");
    let start = || testkit::BrokerProcess::start(BROKER, data.path(), &[]);
    let resume = |addr| V5::connect_with(addr, connect("durable5", false, expiry(3600)), None);
    let broker = start().await;
    let (mut sub, _) =
        V5::connect_with(broker.mqtt, connect("durable5", true, expiry(3600)), None).await;
    let mut subscribe = Subscribe::new_many(
        [Filter {
            nolocal: true,
            preserve_retain: true,
            ..Filter::new("dur5/#", QoS::AtLeastOnce)
        }],
        Some(rumqttc::v5::mqttbytes::v5::SubscribeProperties {
            id: Some(42),
            user_properties: Vec::new(),
        }),
    );
    subscribe.pkid = 1;
    sub.send(&Packet::Subscribe(subscribe)).await;
    assert!(matches!(sub.recv().await, Some(Packet::SubAck(_))));
    sub.disconnect(DisconnectReasonCode::NormalDisconnection, None)
        .await;
    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(3600),
        content_type: Some("text/plain".to_owned()),
        response_topic: Some("replies/here".to_owned()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: user_properties(),
        ..PublishProperties::default()
    };
    let mut publisher = V5::connect(broker.mqtt, "durable5-pub").await;
    let mut p = Publish::new(
        "dur5/a",
        QoS::AtLeastOnce,
        b"kept".to_vec(),
        Some(sent.clone()),
    );
    p.pkid = 1;
    p.retain = true;
    publisher.send(&Packet::Publish(p)).await;
    match publisher.recv().await {
        Some(Packet::PubAck(ack)) => assert_eq!(ack.reason, PubAckReason::Success),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    broker.kill().await;

    // What the session sees: the message as queued, with every property and its identifier.
    let check = |got: Publish| {
        assert_eq!(
            (&got.topic[..], &got.payload[..]),
            (&b"dur5/a"[..], &b"kept"[..])
        );
        assert!(got.retain, "retain as published");
        let props = got.properties.expect("properties");
        assert_eq!(props.subscription_identifiers, vec![42]);
        let expiry = props.message_expiry_interval.expect("message expiry");
        assert!((3000..=3600).contains(&expiry), "remaining expiry {expiry}");
        assert_eq!(
            PublishProperties {
                message_expiry_interval: Some(3600),
                subscription_identifiers: Vec::new(),
                ..props
            },
            sent
        );
    };
    let broker = start().await;
    let (mut sub, ack) = resume(broker.mqtt).await;
    assert!(ack.session_present, "the session outlived the kill");
    check(sub.publish_received().await);
    // Not acknowledged: it comes again after the next kill.
    broker.kill().await;
    let broker = start().await;
    let (mut sub, ack) = resume(broker.mqtt).await;
    assert!(ack.session_present);
    let again = sub.publish_received().await;
    let pkid = again.pkid;
    check(again);
    sub.send(&Packet::PubAck(PubAck::new(pkid, None))).await;
    // No local outlived the kills: its own message does not come back.
    assert_eq!(
        sub.publish("dur5/own", QoS::AtLeastOnce, b"own", 9, None)
            .await,
        Some(PubAckReason::Success)
    );
    assert!(
        sub.recv_within(Duration::from_millis(300)).await.is_err(),
        "no local: nothing comes back"
    );
    // The retained message kept its properties.
    let mut reader = V5::connect(broker.mqtt, "durable5-reader").await;
    reader.subscribe(&[("dur5/a", QoS::AtLeastOnce)]).await;
    let retained = reader.publish_received().await;
    assert!(retained.retain);
    let props = retained.properties.expect("properties");
    assert_eq!(
        PublishProperties {
            message_expiry_interval: Some(3600),
            ..props
        },
        sent
    );
    broker.terminate().await;
}
