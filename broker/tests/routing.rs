//! Publish/subscribe through the broker: QoS 0/1/2, wildcards, retained messages, wills and
//! persistent-session redelivery.

use broker::labels::DisconnectReason;
use broker::labels::DropReason;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use rumqttc::mqttbytes::QoS;
use testkit::{Client, ConnectOpts, RawClient, TestBroker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_at_each_qos() {
    let mut broker = TestBroker::start().await;
    let mut sub = Client::connect(broker.addr, "sub").await;
    broker.connected("sub").await;
    sub.subscribe("sensors/#", QoS::ExactlyOnce).await;
    let publisher = Client::connect(broker.addr, "pub").await;
    broker.connected("pub").await;

    for (i, qos) in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        let payload = format!("reading {i}");
        publisher
            .client
            .publish(format!("sensors/t{i}"), qos, false, payload.clone())
            .await
            .expect("publish");
        let p = sub.publish_received().await;
        assert_eq!(p.topic, format!("sensors/t{i}"));
        assert_eq!(p.qos, qos, "delivered at min(publish, granted) QoS");
        assert_eq!(&p.payload[..], payload.as_bytes());
        assert!(!p.retain);
    }

    // Granted QoS caps the delivery QoS.
    sub.subscribe("capped", QoS::AtMostOnce).await;
    publisher
        .client
        .publish("capped", QoS::ExactlyOnce, false, "x")
        .await
        .expect("publish");
    assert_eq!(sub.publish_received().await.qos, QoS::AtMostOnce);

    sub.client.disconnect().await.expect("disconnect");
    broker
        .disconnected("sub", DisconnectReason::ClientDisconnect)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_and_dollar_topics() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect(broker.addr, "sub").await;
    sub.subscribe("home/+/temp", QoS::AtMostOnce).await;
    sub.subscribe("#", QoS::AtMostOnce).await;
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;

    publisher
        .publish("$internal/x", QoS::AtMostOnce, false, b"hidden", 0)
        .await;
    publisher
        .publish("home/kitchen/temp", QoS::AtMostOnce, false, b"21", 0)
        .await;
    // One copy despite two matching filters, and the '$' topic never arrived first.
    let p = sub.publish_received().await;
    assert_eq!(p.topic, "home/kitchen/temp");
    publisher
        .publish("other", QoS::AtMostOnce, false, b"marker", 0)
        .await;
    assert_eq!(sub.publish_received().await.topic, "other");
    let _ = broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_set_replace_clear() {
    let broker = TestBroker::start().await;
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;
    publisher
        .publish("status/a", QoS::AtLeastOnce, true, b"one", 1)
        .await;
    publisher
        .publish("status/a", QoS::AtLeastOnce, true, b"two", 2)
        .await;
    publisher
        .publish("status/b", QoS::AtLeastOnce, true, b"gone", 3)
        .await;
    publisher
        .publish("status/b", QoS::AtLeastOnce, true, b"", 4)
        .await;
    for _ in 0..4 {
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }

    let mut sub = Client::connect(broker.addr, "sub").await;
    sub.subscribe("status/+", QoS::AtLeastOnce).await;
    let p = sub.publish_received().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("status/a", &b"two"[..])
    );
    assert!(p.retain, "retained messages carry the retain flag");
    // Live messages on the same topic do not carry it, and status/b stays cleared.
    publisher
        .publish("status/b", QoS::AtMostOnce, false, b"live", 0)
        .await;
    let p = sub.publish_received().await;
    assert_eq!((p.topic.as_str(), p.retain), ("status/b", false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_abnormal_close_only() {
    let mut broker = TestBroker::start().await;
    let mut sub = Client::connect(broker.addr, "watcher").await;
    broker.connected("watcher").await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;

    let mut opts = ConnectOpts::new("dies");
    opts.will = Some(("wills/dies", b"gone", QoS::AtLeastOnce, false));
    let (dies, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("dies").await;
    drop(dies);
    broker
        .disconnected("dies", DisconnectReason::ConnectionLost)
        .await;
    let p = sub.publish_received().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("wills/dies", &b"gone"[..])
    );
    assert_eq!(p.qos, QoS::AtLeastOnce);

    let mut opts = ConnectOpts::new("polite");
    opts.will = Some(("wills/polite", b"never", QoS::AtMostOnce, false));
    let (polite, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("polite").await;
    polite.disconnect().await;
    broker
        .disconnected("polite", DisconnectReason::ClientDisconnect)
        .await;
    // A marker proves nothing was delivered in between.
    let (mut marker, _) = RawClient::connect(broker.addr, ConnectOpts::new("marker")).await;
    marker
        .publish("wills/marker", QoS::AtMostOnce, false, b"m", 0)
        .await;
    assert_eq!(sub.publish_received().await.topic, "wills/marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_will_is_kept() {
    let mut broker = TestBroker::start().await;
    let mut opts = ConnectOpts::new("dev");
    opts.will = Some(("state/dev", b"offline", QoS::AtMostOnce, true));
    let (dev, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("dev").await;
    drop(dev);
    // The will is published before the Disconnected event is emitted.
    broker
        .disconnected("dev", DisconnectReason::ConnectionLost)
        .await;
    let mut sub = Client::connect(broker.addr, "late").await;
    sub.subscribe("state/dev", QoS::AtMostOnce).await;
    let p = sub.publish_received().await;
    assert!(p.retain);
    assert_eq!(&p.payload[..], b"offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_gets_queued_and_inflight_messages_on_reconnect() {
    let mut broker = TestBroker::start().await;
    let mut opts = ConnectOpts::new("persist");
    opts.clean_session = false;
    let (mut dev, present) = RawClient::connect(broker.addr, opts).await;
    assert!(!present, "new session");
    broker.connected("persist").await;
    dev.subscribe("cmd/persist", QoS::AtLeastOnce).await;

    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;
    broker.connected("pub").await;
    publisher
        .publish("cmd/persist", QoS::AtLeastOnce, false, b"first", 1)
        .await;
    // Received but never acknowledged: stays in flight.
    match dev.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"first"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    drop(dev);
    broker
        .disconnected("persist", DisconnectReason::ConnectionLost)
        .await;

    // While away: QoS 1 is queued, QoS 0 is not.
    publisher
        .publish("cmd/persist", QoS::AtLeastOnce, false, b"second", 2)
        .await;
    publisher
        .publish("cmd/persist", QoS::AtMostOnce, false, b"dropped", 0)
        .await;
    publisher
        .publish("cmd/persist", QoS::AtLeastOnce, false, b"third", 3)
        .await;
    for _ in 0..3 {
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }

    let mut opts = ConnectOpts::new("persist");
    opts.clean_session = false;
    let (mut dev, present) = RawClient::connect(broker.addr, opts).await;
    assert!(present, "session present on reconnect");
    broker.connected("persist").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        match dev.recv().await {
            Some(Packet::Publish(p)) => {
                dev.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                got.push((String::from_utf8_lossy(&p.payload).into_owned(), p.dup));
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert_eq!(
        got,
        [
            ("first".to_owned(), true),
            ("second".to_owned(), false),
            ("third".to_owned(), false)
        ]
    );

    // A clean-session connect discards the session.
    dev.disconnect().await;
    broker
        .disconnected("persist", DisconnectReason::ClientDisconnect)
        .await;
    let (_dev, present) = RawClient::connect(broker.addr, ConnectOpts::new("persist")).await;
    assert!(!present);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_from_client_is_routed_once() {
    let broker = TestBroker::start().await;
    let mut sub = Client::connect(broker.addr, "sub").await;
    sub.subscribe("q2", QoS::ExactlyOnce).await;
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;
    publisher
        .publish("q2", QoS::ExactlyOnce, false, b"once", 7)
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    // A redelivery before PUBREL must not be routed again.
    publisher
        .publish("q2", QoS::ExactlyOnce, false, b"once", 7)
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubRec(r)) if r.pkid == 7));
    publisher
        .send(&Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(7)))
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubComp(c)) if c.pkid == 7));
    publisher
        .publish("q2", QoS::AtMostOnce, false, b"marker", 0)
        .await;
    assert_eq!(&sub.publish_received().await.payload[..], b"once");
    assert_eq!(&sub.publish_received().await.payload[..], b"marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_pipelined_with_connect_are_handled() {
    let mut broker = TestBroker::start().await;
    let mut c = RawClient::tcp(broker.addr).await;
    let mut bytes = testkit::encode(&testkit::connect_packet(&ConnectOpts::new("eager")));
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new("eager/#", QoS::AtMostOnce);
    sub.pkid = 1;
    bytes.extend_from_slice(&testkit::encode(&Packet::Subscribe(sub)));
    bytes.extend_from_slice(&testkit::encode(&Packet::PingReq));
    c.send_bytes(&bytes).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    broker.connected("eager").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_of_an_absent_persistent_session_is_bounded_and_counted() {
    let mut broker = TestBroker::start_with(|c| c.max_queued_messages = 3).await;
    let mut opts = ConnectOpts::new("away");
    opts.clean_session = false;
    let (mut dev, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("away").await;
    dev.subscribe("q/away", QoS::AtLeastOnce).await;
    dev.disconnect().await;
    broker
        .disconnected("away", DisconnectReason::ClientDisconnect)
        .await;

    let dropped = || {
        broker::metrics::metrics()
            .messages_dropped
            .get(DropReason::QueueFull)
    };
    let before = dropped();
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;
    for i in 1..=5u16 {
        publisher
            .publish("q/away", QoS::AtLeastOnce, false, &i.to_be_bytes(), i)
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(
        dropped() - before,
        2,
        "two messages over the bound were counted"
    );

    let mut opts = ConnectOpts::new("away");
    opts.clean_session = false;
    let (mut dev, present) = RawClient::connect(broker.addr, opts).await;
    assert!(present);
    for i in 1..=3u16 {
        match dev.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(
                    &p.payload[..],
                    &i.to_be_bytes(),
                    "oldest kept, newest dropped"
                );
                dev.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            }
            other => panic!("{other:?}"),
        }
    }
    dev.send(&Packet::PingReq).await;
    assert!(matches!(dev.recv().await, Some(Packet::PingResp)));
}
