//! Misbehaving clients: each one gets a protocol-level answer (CONNACK code or close), the right
//! event when a session had started, and never disturbs a well-behaved client.

use broker::labels::DisconnectReason;
use rumqttc::mqttbytes::v4::{Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use testkit::{Client, ConnectOpts, RawClient, TestBroker};

/// A subscriber and a publisher that must keep working while others misbehave.
async fn bystander(broker: &mut TestBroker) -> (Client, RawClient) {
    let mut sub = Client::connect(broker.addr, "bystander-sub").await;
    broker.connected("bystander-sub").await;
    sub.subscribe("ok/#", QoS::AtLeastOnce).await;
    let (publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("bystander-pub")).await;
    broker.connected("bystander-pub").await;
    (sub, publisher)
}

async fn still_works(sub: &mut Client, publisher: &mut RawClient, n: u16) {
    publisher
        .publish("ok/still", QoS::AtLeastOnce, false, &n.to_be_bytes(), n)
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.pkid == n));
    assert_eq!(&sub.publish_received().await.payload[..], &n.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connect_is_a_protocol_error() {
    let mut broker = TestBroker::start().await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("twice")).await;
    broker.connected("twice").await;
    c.send(&testkit::connect_packet(&ConnectOpts::new("twice")))
        .await;
    assert!(c.until_closed().await.is_empty());
    broker
        .disconnected("twice", DisconnectReason::ProtocolError)
        .await;
    still_works(&mut sub, &mut publisher, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_before_and_after_connect() {
    let mut broker = TestBroker::start().await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;

    // Before CONNECT: closed, no session, no event.
    let mut c = RawClient::tcp(broker.addr).await;
    c.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(c.until_closed().await.is_empty());
    // A valid packet that is not CONNECT first.
    let mut c = RawClient::tcp(broker.addr).await;
    c.send(&Packet::PingReq).await;
    assert!(c.until_closed().await.is_empty());
    broker.no_event_pending();

    // After CONNECT: protocol_error.
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("noisy")).await;
    broker.connected("noisy").await;
    c.send_bytes(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x00]).await;
    assert!(c.until_closed().await.is_empty());
    broker
        .disconnected("noisy", DisconnectReason::ProtocolError)
        .await;
    still_works(&mut sub, &mut publisher, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_flag_bits_and_server_packets_close_the_connection() {
    let mut broker = TestBroker::start().await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;
    let cases: [(&str, &[u8]); 4] = [
        ("pingreq-flags", &[0xC1, 0x00]),
        (
            "subscribe-flags",
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ),
        ("publish-qos3", &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
        ("connack-from-client", &[0x20, 0x02, 0x00, 0x00]),
    ];
    for (id, bytes) in cases {
        let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new(id)).await;
        broker.connected(id).await;
        c.send_bytes(bytes).await;
        assert!(c.until_closed().await.is_empty(), "{id}");
        broker
            .disconnected(id, DisconnectReason::ProtocolError)
            .await;
    }
    // CONNECT with the reserved flag bit set.
    let mut bytes = testkit::encode(&testkit::connect_packet(&ConnectOpts::new("reserved")));
    bytes[9] |= 1;
    let mut c = RawClient::tcp(broker.addr).await;
    c.send_bytes(&bytes).await;
    assert!(c.until_closed().await.is_empty());
    broker.no_event_pending();
    still_works(&mut sub, &mut publisher, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_size_packet_closes_the_connection() {
    let mut broker = TestBroker::start_with(|c| c.max_packet_size = 1024).await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("big")).await;
    broker.connected("big").await;
    c.publish("ok/big", QoS::AtMostOnce, false, &[0u8; 2000], 0)
        .await;
    assert!(c.until_closed().await.is_empty());
    broker
        .disconnected("big", DisconnectReason::ProtocolError)
        .await;
    // Just under the limit passes.
    publisher
        .publish("ok/fits", QoS::AtMostOnce, false, &[1u8; 1000], 0)
        .await;
    assert_eq!(sub.publish_received().await.payload.len(), 1000);
    still_works(&mut sub, &mut publisher, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_levels_get_connack_1() {
    let mut broker = TestBroker::start().await;
    for level in [3u8, 6] {
        let mut bytes = testkit::encode(&testkit::connect_packet(&ConnectOpts::new("old")));
        bytes[8] = level;
        let mut c = RawClient::tcp(broker.addr).await;
        c.send_bytes(&bytes).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => assert_eq!(ack.code as u8, 1, "level {level}"),
            other => panic!("level {level}: {other:?}"),
        }
        assert!(c.recv().await.is_none());
    }
    broker.no_event_pending();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_filters_and_topics() {
    let mut broker = TestBroker::start().await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("filters")).await;
    broker.connected("filters").await;
    let mut s = rumqttc::mqttbytes::v4::Subscribe::new("a/#/b", QoS::AtMostOnce);
    s.add("ok/fine".into(), QoS::AtLeastOnce);
    s.pkid = 9;
    c.send(&Packet::Subscribe(s)).await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 9);
            assert_eq!(
                ack.return_codes,
                [
                    SubscribeReasonCode::Failure,
                    SubscribeReasonCode::Success(QoS::AtLeastOnce)
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    // Publishing to a wildcard topic is a protocol error.
    c.publish("ok/+", QoS::AtMostOnce, false, b"x", 0).await;
    assert!(c.until_closed().await.is_empty());
    broker
        .disconnected("filters", DisconnectReason::ProtocolError)
        .await;
    still_works(&mut sub, &mut publisher, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_half_open_sockets_do_not_block_accepting() {
    let mut broker = TestBroker::start().await;
    // Sockets that connect and never send anything.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(RawClient::tcp(broker.addr).await);
    }
    // One that sends half a CONNECT.
    let mut half = RawClient::tcp(broker.addr).await;
    half.send_bytes(&[0x10, 0x20, 0x00]).await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;
    still_works(&mut sub, &mut publisher, 6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_closed_after_write_stall_timeout() {
    let mut broker = TestBroker::start_with(|c| {
        c.write_stall_timeout = std::time::Duration::from_secs(1);
        c.max_packet_size = 256 * 1024;
    })
    .await;
    let (mut stuck, _) = RawClient::connect(broker.addr, ConnectOpts::new("stuck")).await;
    broker.connected("stuck").await;
    stuck.subscribe("flood", QoS::AtMostOnce).await;
    // From here on "stuck" never reads: the kernel buffers fill, then the broker's writes stall.
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("flooder")).await;
    broker.connected("flooder").await;
    let payload = vec![0u8; 100 * 1024];
    let flood = tokio::spawn(async move {
        // ~30 MB: more than loopback socket buffers can hold.
        for _ in 0..300 {
            publisher
                .publish("flood", QoS::AtMostOnce, false, &payload, 0)
                .await;
        }
        publisher
    });
    broker
        .disconnected("stuck", DisconnectReason::ConnectionLost)
        .await;
    let mut publisher = flood.await.expect("flooder");
    publisher.send(&Packet::PingReq).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PingResp)));
    drop(stuck);
}

/// MQTT 3.1.1 conformance: packets that a lenient decoder would accept but the specification
/// forbids. Each closes the connection as a protocol error, and the will is published (a
/// DISCONNECT with a body is not a clean disconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_the_specification_forbids_are_protocol_errors() {
    let mut broker = TestBroker::start().await;
    let (mut sub, mut publisher) = bystander(&mut broker).await;
    sub.subscribe("wills/#", QoS::AtMostOnce).await;
    let cases: [(&str, &[u8]); 7] = [
        // SUBSCRIBE with packet id 0.
        (
            "subscribe-pkid-0",
            &[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00],
        ),
        // UNSUBSCRIBE with packet id 0.
        (
            "unsubscribe-pkid-0",
            &[0xA2, 0x05, 0x00, 0x00, 0x00, 0x01, b'a'],
        ),
        // PINGREQ and DISCONNECT with a body.
        ("pingreq-body", &[0xC0, 0x01, 0x00]),
        ("disconnect-body", &[0xE0, 0x01, 0x00]),
        // PUBACK, PUBREC, PUBCOMP with more than a packet id.
        ("puback-long", &[0x40, 0x03, 0x00, 0x01, 0x00]),
        ("pubrec-long", &[0x50, 0x04, 0x00, 0x01, 0x00, 0x00]),
        // PUBREL shorter than a packet id.
        ("pubrel-short", &[0x62, 0x01, 0x00]),
    ];
    for (id, bytes) in cases {
        let will_topic = format!("wills/{id}");
        let opts = ConnectOpts {
            will: Some((&will_topic, b"gone", QoS::AtMostOnce, false)),
            ..ConnectOpts::new(id)
        };
        let (mut c, _) = RawClient::connect(broker.addr, opts).await;
        broker.connected(id).await;
        c.send_bytes(bytes).await;
        assert!(c.until_closed().await.is_empty(), "{id}");
        broker
            .disconnected(id, DisconnectReason::ProtocolError)
            .await;
        assert_eq!(sub.publish_received().await.topic, will_topic, "{id}");
    }

    // A CONNECT with bytes after its last field, inside its remaining length.
    let mut bytes = testkit::encode(&testkit::connect_packet(&ConnectOpts::new("trailing")));
    bytes[1] += 3;
    bytes.extend_from_slice(&[0, 1, 2]);
    let mut c = RawClient::tcp(broker.addr).await;
    c.send_bytes(&bytes).await;
    assert!(c.until_closed().await.is_empty());
    broker.no_event_pending();
    still_works(&mut sub, &mut publisher, 7).await;
}
