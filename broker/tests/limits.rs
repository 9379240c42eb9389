//! Every per-client resource is bounded in bytes: session queues (per session and in total),
//! partly received packets (keep-alive counts complete packets only, a started packet must be
//! finished in time, one budget for all of them), keep-alive 0, and the retained store.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::event::ConnectionEvent;
use broker::labels::{
    DisconnectReason, DropReason, RefusalReason, RetainRefusal, SubscriptionRefusal,
};
use broker::metrics::metrics;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use testkit::{ConnectOpts, RawClient, TestBroker};

const MIB: usize = 1024 * 1024;

fn dropped(reason: DropReason) -> u64 {
    metrics().messages_dropped.get(reason)
}

/// Connects a persistent session subscribed to `topic` at QoS 1, then leaves: messages for it
/// are queued while it is away.
async fn away_subscriber(broker: &mut TestBroker, id: &str, topic: &str) {
    let opts = ConnectOpts {
        clean_session: false,
        ..ConnectOpts::new(id)
    };
    let (mut c, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected(id).await;
    c.subscribe(topic, QoS::AtLeastOnce).await;
    c.disconnect().await;
    broker
        .disconnected(id, DisconnectReason::ClientDisconnect)
        .await;
}

/// Reconnects the persistent sessions `ids` at once and has each read (and acknowledge) what was
/// queued for it, until `total` messages have arrived over all of them. Returns the payload
/// bytes each received.
async fn drain_queues(broker: &mut TestBroker, ids: &[&str], total: usize) -> Vec<usize> {
    let received = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let mut readers = Vec::new();
    for id in ids {
        let opts = ConnectOpts {
            clean_session: false,
            ..ConnectOpts::new(id)
        };
        let (mut c, present) = RawClient::connect(broker.addr, opts).await;
        assert!(present);
        broker.connected(id).await;
        let (received, all_in) = (Arc::clone(&received), Arc::clone(&all_in));
        readers.push(tokio::spawn(async move {
            let mut bytes = 0;
            let done = all_in.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            while received.load(Ordering::SeqCst) < total {
                tokio::select! {
                    _ = &mut done => break,
                    packet = c.recv() => match packet {
                        Some(Packet::Publish(p)) => {
                            bytes += p.payload.len();
                            c.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                            if received.fetch_add(1, Ordering::SeqCst) + 1 == total {
                                all_in.notify_waiters();
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    },
                }
            }
            bytes
        }));
    }
    let mut bytes = Vec::new();
    for reader in readers {
        bytes.push(reader.await.expect("reader"));
    }
    bytes
}

/// Issue: a queue of 1,000 messages of up to 1 MiB is 1 GiB per session; four abandoned
/// persistent sessions pinned 330 MB for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_queues_are_bounded_in_bytes() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_queued_bytes = MIB;
        c.max_queued_bytes_total = 3 * MIB;
    })
    .await;
    let ids = ["away-1", "away-2", "away-3", "away-4"];
    for id in ids {
        away_subscriber(&mut broker, id, "big/#").await;
    }
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;
    broker.connected("pub").await;
    const SIZE: usize = 300 * 1024;
    let payload = vec![0u8; SIZE];
    for pkid in 1..=20u16 {
        publisher
            .publish("big/x", QoS::AtLeastOnce, false, &payload, pkid)
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    // 20 x 300 KiB for each of four sessions: each may hold 1 MiB (the message that would pass
    // it is dropped), all together 3 MiB.
    let held = metrics().queued_bytes.get() as usize;
    assert!(held <= 3 * MIB, "{held} bytes queued");
    let kept =
        4 * 20 - (dropped(DropReason::QueueBytes) + dropped(DropReason::MemoryLimit)) as usize;
    assert_eq!(held, kept * SIZE + kept * "big/x".len());
    assert!(dropped(DropReason::QueueBytes) > 0 && dropped(DropReason::MemoryLimit) > 0);
    let bytes = drain_queues(&mut broker, &ids, kept).await;
    for (id, bytes) in ids.iter().zip(&bytes) {
        assert!(*bytes <= MIB, "{id} got {bytes} bytes");
    }
    assert_eq!(bytes.iter().sum::<usize>(), kept * SIZE);
    testkit::eventually("every delivered message to be released", || async {
        (metrics().queued_bytes.get() == 0).then_some(())
    })
    .await;
}

/// Issue: any byte, even of an unfinished packet, moved the keep-alive deadline, so a client
/// trickling one packet's bytes was never timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_counts_complete_packets_only() {
    let mut broker = TestBroker::start().await;
    let opts = ConnectOpts {
        keep_alive: 1,
        ..ConnectOpts::new("trickler")
    };
    let (mut c, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("trickler").await;
    let start = Instant::now();
    // A PUBLISH announcing 100 bytes, sent one byte every 100 ms: never complete in time.
    let trickle = tokio::spawn(async move {
        c.send_bytes(&[0x30, 100]).await;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if c.stream.try_write(b"x").is_err() {
                return;
            }
        }
    });
    broker
        .disconnected("trickler", DisconnectReason::KeepaliveTimeout)
        .await;
    let after = start.elapsed();
    assert!(
        after >= Duration::from_millis(1400) && after < Duration::from_secs(4),
        "closed after {after:?}, expected 1.5 s"
    );
    trickle.abort();
}

/// Issue: with keep-alive 0 a client holding all but the last byte of a large packet kept its
/// buffer for ever. Now a started packet must be finished within mqtt.packet_read_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_packet_times_out() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_keepalive = 0;
        c.packet_read_timeout = Duration::from_secs(1);
    })
    .await;
    let opts = ConnectOpts {
        keep_alive: 0,
        ..ConnectOpts::new("holder")
    };
    let (mut c, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("holder").await;
    let start = Instant::now();
    let mut bytes = testkit::encode(&Packet::Publish(Publish::new(
        "held",
        QoS::AtMostOnce,
        vec![0u8; 500_000],
    )));
    bytes.truncate(bytes.len() - 1);
    c.send_bytes(&bytes).await;
    broker
        .disconnected("holder", DisconnectReason::ConnectionLost)
        .await;
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(metrics().packet_read_timeouts.get(), 1);
    assert_eq!(
        metrics().buffered_read_bytes.get(),
        0,
        "its buffer budget was released"
    );
}

/// Issue: 100 connections each holding all but the last byte of a 1 MiB PUBLISH added 100 MiB.
/// Now all of them together hold at most mqtt.max_buffered_read_bytes; a connection that would
/// need more waits (unread bytes stay in the kernel) and goes on once others finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_received_packets_share_one_budget() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_packet_size = MIB;
        c.max_buffered_read_bytes = 2 * MIB;
    })
    .await;
    let (mut sub, _) = RawClient::connect(broker.addr, ConnectOpts::new("sub")).await;
    broker.connected("sub").await;
    sub.subscribe("large/#", QoS::AtMostOnce).await;
    let packet = |n: u8| {
        testkit::encode(&Packet::Publish(Publish::new(
            format!("large/{n}"),
            QoS::AtMostOnce,
            vec![n; 900 * 1024],
        )))
    };
    let mut holders = Vec::new();
    for n in 0..3u8 {
        let id = format!("holder-{n}");
        let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new(&id)).await;
        broker.connected(&id).await;
        let bytes = packet(n);
        c.send_bytes(&bytes[..bytes.len() - 1]).await;
        holders.push((c, bytes));
    }
    // Two fit; the third waits for budget.
    testkit::eventually("the third holder to wait for read budget", || async {
        (metrics().read_budget_waits.get() >= 1).then_some(())
    })
    .await;
    let held = metrics().buffered_read_bytes.get() as usize;
    assert!(held <= 2 * MIB, "{held} bytes buffered");
    // Finishing the packets releases budget: all three messages arrive.
    for (c, bytes) in &mut holders {
        c.send_bytes(&bytes[bytes.len() - 1..]).await;
    }
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 3 {
        match sub.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(p.payload.len(), 900 * 1024);
                seen.insert(p.topic);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(metrics().buffered_read_bytes.get(), 0);
}

/// Issue: keep-alive 0 meant "never time out" unless the operator configured a bound. Now the
/// default `mqtt.max_keepalive` (65535 s) applies to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_is_bounded_by_default() {
    let mut broker = TestBroker::start().await;
    let opts = ConnectOpts {
        keep_alive: 0,
        ..ConnectOpts::new("forever")
    };
    let (_c, _) = RawClient::connect(broker.addr, opts).await;
    match broker.next_event().await {
        ConnectionEvent::Connected { keep_alive, .. } => assert_eq!(keep_alive, 65_535),
        other => panic!("{other:?}"),
    }
}

/// Issue: 10,000 x 10 KB retained messages added 103 MiB with no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retained_store_is_bounded() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_retained_messages = 50;
        c.max_retained_bytes = 40 * 1024;
    })
    .await;
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("retainer")).await;
    broker.connected("retainer").await;
    // 100 small ones: 50 stored, 50 refused for the count.
    for i in 0..100u16 {
        publisher
            .publish(&format!("small/{i}"), QoS::AtLeastOnce, true, b"v", i + 1)
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    assert_eq!(metrics().retained_messages.get(), 50);
    // Make room, then 1 KiB ones until the bytes run out.
    for i in 0..50u16 {
        publisher
            .publish(&format!("small/{i}"), QoS::AtLeastOnce, true, b"", 200 + i)
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    for i in 0..50u16 {
        publisher
            .publish(
                &format!("big/{i}"),
                QoS::AtLeastOnce,
                true,
                &[1u8; 1024],
                300 + i,
            )
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    let bytes = metrics().retained_bytes.get() as usize;
    assert!(bytes <= 40 * 1024, "{bytes} retained bytes");
    let refused = |reason| metrics().retained_refused.get(reason);
    assert_eq!(refused(RetainRefusal::Count), 50);
    assert!(refused(RetainRefusal::Bytes) > 0);
    // A new subscriber gets exactly what is held.
    let (mut sub, _) = RawClient::connect(broker.addr, ConnectOpts::new("late")).await;
    broker.connected("late").await;
    sub.subscribe("#", QoS::AtMostOnce).await;
    let held = metrics().retained_messages.get() as usize;
    let mut bytes = 0;
    for _ in 0..held {
        match sub.recv().await {
            Some(Packet::Publish(p)) => bytes += p.topic.len() + p.payload.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(bytes, metrics().retained_bytes.get() as usize);
}

/// Issue: four abandoned persistent sessions pinned their queues for ever. Now a persistent
/// session outlives its client by `mqtt.persistent_session_expiry`, then its subscriptions and
/// queue are discarded, counted, and the expiry is an event for presence. A client that came
/// back in time keeps its session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_persistent_sessions_expire() {
    let expiry = Duration::from_millis(800);
    let mut broker = TestBroker::start_with(|c| c.persistent_session_expiry = expiry).await;
    let opts = |id| ConnectOpts {
        clean_session: false,
        ..ConnectOpts::new(id)
    };
    away_subscriber(&mut broker, "returns", "q/#").await;
    away_subscriber(&mut broker, "abandoned", "q/#").await;
    let left = Instant::now();
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("pub")).await;
    broker.connected("pub").await;
    publisher
        .publish("q/1", QoS::AtLeastOnce, false, b"queued", 1)
        .await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    assert!(metrics().queued_bytes.get() > 0);

    // "returns" comes back before its expiry and stays past it.
    let (mut back, present) = RawClient::connect(broker.addr, opts("returns")).await;
    assert!(present);
    match back.recv().await {
        Some(Packet::Publish(p)) => back.send(&Packet::PubAck(PubAck::new(p.pkid))).await,
        other => panic!("{other:?}"),
    }
    let last_connection = match broker.next_event().await {
        ConnectionEvent::Connected {
            client_id,
            session_id,
            ..
        } if client_id == "returns" => session_id,
        other => panic!("{other:?}"),
    };
    let abandoned_at = match broker.next_event().await {
        ConnectionEvent::SessionExpired {
            client_id,
            session_id,
            ..
        } => {
            assert_eq!(client_id, "abandoned");
            assert_ne!(session_id, last_connection);
            left.elapsed()
        }
        other => panic!("{other:?}"),
    };
    assert!(abandoned_at >= expiry, "expired after {abandoned_at:?}");
    assert_eq!(metrics().sessions_expired.get(), 1);
    // Its queued message went with it; "returns" acknowledged its own.
    testkit::eventually("the expired queue to be released", || async {
        (metrics().queued_bytes.get() == 0).then_some(())
    })
    .await;
    let (_again, present) = RawClient::connect(broker.addr, opts("abandoned")).await;
    assert!(!present, "an expired session is gone");
    broker.connected("abandoned").await;

    // "returns" leaves again: its expiry counts from this leave.
    back.disconnect().await;
    broker
        .disconnected("returns", DisconnectReason::ClientDisconnect)
        .await;
    match broker.next_event().await {
        ConnectionEvent::SessionExpired {
            client_id,
            session_id,
            ..
        } => {
            assert_eq!(client_id, "returns");
            assert_eq!(session_id, last_connection);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(metrics().sessions_expired.get(), 2);
    assert_eq!(
        metrics().persistent_sessions.get(),
        1,
        "only the new one of abandoned"
    );
}

/// Limits on topic filters: per SUBSCRIBE and per session, each refused filter answered with
/// SUBACK 0x80 and counted by reason; re-subscribing a held filter is never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_limits_answer_0x80_and_are_counted() {
    use rumqttc::mqttbytes::v4::{Subscribe, SubscribeReasonCode as Code};
    let mut broker = TestBroker::start_with(|c| {
        c.max_filters_per_subscribe = 3;
        c.max_subscriptions_per_session = 5;
        c.max_topic_levels = 4;
    })
    .await;
    let (mut c, _) = RawClient::connect(broker.addr, ConnectOpts::new("many")).await;
    broker.connected("many").await;
    async fn suback(c: &mut RawClient, filters: &[&str], pkid: u16) -> Vec<Code> {
        let mut s = Subscribe::new(filters[0], QoS::AtLeastOnce);
        for f in &filters[1..] {
            s.add((*f).to_owned(), QoS::AtLeastOnce);
        }
        s.pkid = pkid;
        c.send(&Packet::Subscribe(s)).await;
        match c.recv().await {
            Some(Packet::SubAck(ack)) => ack.return_codes,
            other => panic!("{other:?}"),
        }
    }
    let ok = Code::Success(QoS::AtLeastOnce);
    assert_eq!(
        suback(&mut c, &["a", "b", "c", "d"], 1).await,
        [ok, ok, ok, Code::Failure],
        "three per SUBSCRIBE"
    );
    assert_eq!(
        suback(&mut c, &["e", "a/b/c/d/e", "f"], 2).await,
        [ok, Code::Failure, ok],
        "five levels are too many; five subscriptions reached"
    );
    assert_eq!(
        suback(&mut c, &["g", "a"], 3).await,
        [Code::Failure, ok],
        "a held filter can be subscribed again at the limit"
    );
    let refused = |reason| metrics().subscriptions_refused.get(reason);
    assert_eq!(refused(SubscriptionRefusal::FiltersPerSubscribe), 1);
    assert_eq!(refused(SubscriptionRefusal::InvalidFilter), 1);
    assert_eq!(refused(SubscriptionRefusal::SubscriptionsPerSession), 1);
    assert_eq!(metrics().subscriptions.get(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_with_0x03_until_one_closes() {
    let mut broker = TestBroker::start_with(|c| c.max_connections = 2).await;
    let (a, _) = RawClient::connect(broker.addr, ConnectOpts::new("a")).await;
    broker.connected("a").await;
    let (_b, _) = RawClient::connect(broker.addr, ConnectOpts::new("b")).await;
    broker.connected("b").await;
    let refused = metrics()
        .connections_refused
        .get(RefusalReason::MaxConnections);

    let mut c = RawClient::tcp(broker.addr).await;
    c.send(&testkit::connect_packet(&ConnectOpts::new("c")))
        .await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable),
        other => panic!("expected CONNACK 0x03, got {other:?}"),
    }
    assert_eq!(
        metrics()
            .connections_refused
            .get(RefusalReason::MaxConnections),
        refused + 1
    );
    broker.no_event_pending();

    a.disconnect().await;
    broker
        .disconnected("a", DisconnectReason::ClientDisconnect)
        .await;
    let (_c, _) = RawClient::connect(broker.addr, ConnectOpts::new("c")).await;
    broker.connected("c").await;
    broker.stop().await;
}
