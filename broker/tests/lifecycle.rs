//! Connection lifecycle: keep-alive, takeover, connect timeout, shutdown, a disconnect asked
//! for by the broker (kicked, not_authorized), and exactly one Connected and one Disconnected
//! event with the right reason for each.
//!
//! Time-based tests run on tokio's paused clock: time only advances when every task is idle, so
//! "closed at 1.5 x keep-alive" is checked exactly, without waiting for real seconds.

use std::time::Duration;

use broker::event::ConnectionEvent;
use broker::labels::DisconnectReason;
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::QoS;
use testkit::{Client, ConnectOpts, RawClient, TestBroker};
use tokio::time::Instant;

// Real time: the broker relays between two sockets here, and the paused clock may jump ahead
// while bytes are in flight between them.
#[tokio::test]
async fn silent_client_is_closed_at_one_and_a_half_keepalive_while_receiving() {
    let mut broker = TestBroker::start().await;
    let mut opts = ConnectOpts::new("silent");
    opts.keep_alive = 2;
    let (mut silent, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("silent").await;
    silent.subscribe("feed", QoS::AtMostOnce).await;
    // The last packet the broker receives from it is the SUBSCRIBE above.
    let last_sent = Instant::now();

    // The broker keeps sending to the silent client every 500 ms; that must not keep it alive.
    let (mut feeder, _) = RawClient::connect(broker.addr, ConnectOpts::new("feeder")).await;
    broker.connected("feeder").await;
    let feeding = tokio::spawn(async move {
        loop {
            feeder
                .publish("feed", QoS::AtMostOnce, false, b"tick", 0)
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    let received = silent.until_closed().await;
    let closed_after = last_sent.elapsed();
    feeding.abort();
    assert!(
        received.len() >= 4,
        "the broker published to it meanwhile ({} packets)",
        received.len()
    );
    // Never early; late only by scheduling delay on a loaded CI machine.
    assert!(
        closed_after >= Duration::from_secs(3) && closed_after < Duration::from_secs(4),
        "closed after {closed_after:?}, expected 3 s (1.5 x 2 s)"
    );
    broker
        .disconnected("silent", DisconnectReason::KeepaliveTimeout)
        .await;
}

#[tokio::test(start_paused = true)]
async fn keepalive_multiplier_is_configurable() {
    let mut broker = TestBroker::start_with(|c| c.keepalive_multiplier = 2.0).await;
    let mut opts = ConnectOpts::new("slow");
    opts.keep_alive = 3;
    let start = Instant::now();
    let (mut c, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("slow").await;
    assert!(c.until_closed().await.is_empty());
    let closed_after = start.elapsed();
    assert!(
        closed_after >= Duration::from_secs(6) && closed_after < Duration::from_millis(6100),
        "closed after {closed_after:?}"
    );
    broker
        .disconnected("slow", DisconnectReason::KeepaliveTimeout)
        .await;
}

#[tokio::test(start_paused = true)]
async fn pinging_client_is_never_closed() {
    let mut broker = TestBroker::start().await;
    let mut opts = ConnectOpts::new("pinger");
    opts.keep_alive = 2;
    let (mut c, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("pinger").await;
    // 60 s of pings, each just inside the keep-alive period.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(1990)).await;
        c.send(&Packet::PingReq).await;
        assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    }
    broker.no_event_pending();
    c.disconnect().await;
    broker
        .disconnected("pinger", DisconnectReason::ClientDisconnect)
        .await;
}

#[tokio::test(start_paused = true)]
async fn keepalive_zero_never_times_out_unless_bounded() {
    let mut broker = TestBroker::start().await;
    let mut opts = ConnectOpts::new("forever");
    opts.keep_alive = 0;
    let (mut c, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("forever").await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    c.send(&Packet::PingReq).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    broker.no_event_pending();

    // With max_keepalive, 0 is clamped to it...
    let mut bounded = TestBroker::start_with(|c| c.max_keepalive = 10).await;
    let mut opts = ConnectOpts::new("clamped");
    opts.keep_alive = 0;
    let start = Instant::now();
    let (mut c, _) = RawClient::connect(bounded.addr, opts).await;
    match bounded.next_event().await {
        ConnectionEvent::Connected { keep_alive, .. } => assert_eq!(keep_alive, 10),
        other => panic!("{other:?}"),
    }
    assert!(c.recv_untimed().await.is_none());
    assert!(start.elapsed() >= Duration::from_secs(15));
    bounded
        .disconnected("clamped", DisconnectReason::KeepaliveTimeout)
        .await;

    // ...or refused with CONNACK 0x02 when the policy says so.
    let mut strict = TestBroker::start_with(|c| {
        c.max_keepalive = 10;
        c.keepalive_policy = broker::config::KeepAlivePolicy::Reject;
    })
    .await;
    let mut c = RawClient::tcp(strict.addr).await;
    let mut opts = ConnectOpts::new("refused");
    opts.keep_alive = 0;
    c.send(&testkit::connect_packet(&opts)).await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code as u8, 2),
        other => panic!("{other:?}"),
    }
    assert!(c.recv().await.is_none());
    strict.no_event_pending();
}

#[tokio::test(start_paused = true)]
async fn connect_must_arrive_within_connect_timeout() {
    let mut broker = TestBroker::start_with(|c| c.connect_timeout = Duration::from_secs(3)).await;
    let start = Instant::now();
    let mut idle = RawClient::tcp(broker.addr).await;
    assert!(idle.recv().await.is_none(), "closed without a CONNACK");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3100),
        "{waited:?}"
    );
    // No session started, so no event.
    broker.no_event_pending();
    let (_ok, _) = RawClient::connect(broker.addr, ConnectOpts::new("after")).await;
    broker.connected("after").await;
}

#[tokio::test]
async fn takeover_publishes_the_old_sessions_will_not_the_new_one() {
    let mut broker = TestBroker::start().await;
    let mut watcher = Client::connect(broker.addr, "watcher").await;
    broker.connected("watcher").await;
    watcher.subscribe("will/#", QoS::AtMostOnce).await;

    let mut first = ConnectOpts::new("device-1");
    first.will = Some(("will/device-1", b"old", QoS::AtMostOnce, false));
    let (mut old, _) = RawClient::connect(broker.addr, first).await;
    let old_session = broker.connected("device-1").await.session_id();

    let mut second = ConnectOpts::new("device-1");
    second.will = Some(("will/device-1", b"new", QoS::AtMostOnce, false));
    let (new, _) = RawClient::connect(broker.addr, second).await;

    // Old connection closed first, with reason takeover; then the new one is announced.
    match broker.next_event().await {
        ConnectionEvent::Disconnected {
            session_id, reason, ..
        } => {
            assert_eq!(session_id, old_session);
            assert_eq!(reason, DisconnectReason::Takeover);
        }
        other => panic!("{other:?}"),
    }
    let new_session = broker.connected("device-1").await.session_id();
    assert!(new_session > old_session, "session ids sort by time");
    assert!(old.until_closed().await.is_empty(), "old socket closed");

    let p = watcher.publish_received().await;
    assert_eq!(&p.payload[..], b"old");

    new.disconnect().await;
    broker
        .disconnected("device-1", DisconnectReason::ClientDisconnect)
        .await;
    let (mut marker, _) = RawClient::connect(broker.addr, ConnectOpts::new("m")).await;
    marker
        .publish("will/marker", QoS::AtMostOnce, false, b"m", 0)
        .await;
    assert_eq!(
        &watcher.publish_received().await.payload[..],
        b"m",
        "the new session's will was not published"
    );
}

/// `Broker::disconnect` closes one connection with the reason given (the admin API's kick,
/// a revocation's not_authorized): its will goes out, its event carries the reason, the others
/// are untouched; a client id not connected is answered false.
#[tokio::test]
async fn a_disconnect_asked_for_closes_with_its_reason_and_publishes_the_will() {
    let mut broker = TestBroker::start().await;
    let mut watcher = Client::connect(broker.addr, "watcher").await;
    broker.connected("watcher").await;
    watcher.subscribe("will/#", QoS::AtMostOnce).await;

    for (id, reason) in [
        ("valve-1", DisconnectReason::NotAuthorized),
        ("valve-2", DisconnectReason::Kicked),
    ] {
        let mut opts = ConnectOpts::new(id);
        let topic = format!("will/{id}");
        opts.will = Some((topic.as_str(), b"gone", QoS::AtMostOnce, false));
        let (mut client, _) = RawClient::connect(broker.addr, opts).await;
        broker.connected(id).await;

        assert!(broker.mqtt.disconnect(id, reason));
        broker.disconnected(id, reason).await;
        assert!(
            client.until_closed().await.is_empty(),
            "{id}: socket closed"
        );
        let will = watcher.publish_received().await;
        assert_eq!(will.topic, topic);
        assert!(!broker.mqtt.disconnect(id, reason), "{id} is gone");
    }
    assert!(!broker.mqtt.disconnect("nobody", DisconnectReason::Kicked));
    // A persistent session outlives the disconnect; its client comes back to it.
    let mut opts = ConnectOpts::new("valve-3");
    opts.clean_session = false;
    let (mut client, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("valve-3").await;
    client.subscribe("cmd/valve-3", QoS::AtLeastOnce).await;
    assert!(broker.mqtt.disconnect("valve-3", DisconnectReason::Kicked));
    broker
        .disconnected("valve-3", DisconnectReason::Kicked)
        .await;
    let mut opts = ConnectOpts::new("valve-3");
    opts.clean_session = false;
    let (_back, session_present) = RawClient::connect(broker.addr, opts).await;
    assert!(session_present, "the persistent session was kept");
    broker.connected("valve-3").await;
    // Nobody else was disconnected.
    broker.no_event_pending();
    broker.stop().await;
}

#[tokio::test]
async fn odd_client_ids_and_generated_ids() {
    let mut broker = TestBroker::start().await;
    let (a, _) = RawClient::connect(broker.addr, ConnectOpts::new("bad/id")).await;
    broker.connected("bad/id").await;
    let (_b, _) = RawClient::connect(broker.addr, ConnectOpts::new("bad/id")).await;
    broker
        .disconnected("bad/id", DisconnectReason::Takeover)
        .await;
    broker.connected("bad/id").await;
    drop(a);
    // Anyone else still connects.
    let (_n, _) = RawClient::connect(broker.addr, ConnectOpts::new("normal")).await;
    broker.connected("normal").await;

    // Empty id + clean session: the broker makes one up.
    let (_e, _) = RawClient::connect(broker.addr, ConnectOpts::new("")).await;
    match broker.next_event().await {
        ConnectionEvent::Connected { client_id, .. } => assert!(client_id.starts_with("hw-")),
        other => panic!("{other:?}"),
    }
    // Empty id without clean session: identifier rejected.
    let mut c = RawClient::tcp(broker.addr).await;
    let mut opts = ConnectOpts::new("");
    opts.clean_session = false;
    c.send(&testkit::connect_packet(&opts)).await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.code as u8, 2),
        other => panic!("{other:?}"),
    }
    assert!(c.recv().await.is_none());
    broker.no_event_pending();
}

#[tokio::test]
async fn shutdown_closes_every_connection_with_an_event() {
    let mut broker = TestBroker::start().await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let id = format!("c{i}");
        clients.push(
            RawClient::connect(broker.addr, ConnectOpts::new(&id))
                .await
                .0,
        );
        broker.connected(&id).await;
    }
    let events = broker.stop().await;
    assert_eq!(events.len(), 5);
    for event in events {
        match event {
            ConnectionEvent::Disconnected { reason, .. } => {
                assert_eq!(reason, DisconnectReason::BrokerShutdown)
            }
            other => panic!("{other:?}"),
        }
    }
    for mut c in clients {
        assert!(c.until_closed().await.is_empty());
    }
}

#[tokio::test]
async fn events_carry_increasing_seq_and_connection_details() {
    let mut broker = TestBroker::start().await;
    let mut opts = ConnectOpts::new("detail");
    opts.keep_alive = 42;
    opts.clean_session = false;
    let (c, _) = RawClient::connect(broker.addr, opts).await;
    let local = c.stream.local_addr().expect("local addr");
    let first = broker.connected("detail").await;
    let ConnectionEvent::Connected {
        seq: seq1,
        peer,
        keep_alive,
        clean_session,
        ..
    } = first
    else {
        unreachable!()
    };
    assert_eq!((peer, keep_alive, clean_session), (local, 42, false));
    c.disconnect().await;
    match broker.next_event().await {
        ConnectionEvent::Disconnected { seq, reason, .. } => {
            assert_eq!(seq, seq1, "Disconnected names its connection's seq");
            assert_eq!(reason, DisconnectReason::ClientDisconnect);
        }
        other => panic!("{other:?}"),
    }
    let (_c2, present) = RawClient::connect(broker.addr, {
        let mut o = ConnectOpts::new("detail");
        o.clean_session = false;
        o
    })
    .await;
    assert!(present);
    match broker.connected("detail").await {
        ConnectionEvent::Connected { seq, .. } => assert!(seq > seq1),
        _ => unreachable!(),
    }
}
