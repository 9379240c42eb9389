//! Rates and abuse limits (issue 12, item 6): the accept rate per listener, connections per
//! source address, per-client publish rates enforced by pausing reads (nothing lost,
//! keep-alive not charged for the pause), and flapping bans listed and lifted through the
//! admin API. Each refuses or slows down as documented and is counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use broker::labels::{DisconnectReason, Listener, PublishLimit, RefusalReason};
use broker::metrics::metrics;
use http_body_util::BodyExt;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::Value;
use testkit::{ConnectOpts, RawClient, TestBroker};
use tower::ServiceExt;

fn refusals(reason: RefusalReason) -> u64 {
    metrics().connections_refused.get(reason)
}

/// Sends a CONNECT for `id` on `client` and returns the CONNACK's code.
async fn connack<S>(client: &mut RawClient<S>, id: &str) -> ConnectReturnCode
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    client
        .send(&testkit::connect_packet(&ConnectOpts::new(id)))
        .await;
    match client.recv().await {
        Some(Packet::ConnAck(ack)) => ack.code,
        other => panic!("expected a CONNACK for {id}, got {other:?}"),
    }
}

/// `mqtt.max_connection_rate`: the accept loop takes one socket per token; the others wait in
/// the listen backlog and are all served, later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_rate_slows_connecting_down_without_refusing() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_connection_rate = 5;
        c.connection_rate_burst = 1;
    })
    .await;
    let waits = metrics().accept_rate_waits.get(Listener::Tcp);
    let start = Instant::now();
    let mut clients = Vec::new();
    for i in 0..6 {
        let addr = broker.addr;
        clients.push(tokio::spawn(async move {
            let id = format!("rate-{i}");
            RawClient::connect(addr, ConnectOpts::new(&id)).await.0
        }));
    }
    let mut connected = Vec::new();
    for client in clients {
        connected.push(client.await.expect("client"));
    }
    // One at once, then five at 5 a second.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900), "all in after {took:?}");
    assert!(metrics().accept_rate_waits.get(Listener::Tcp) - waits >= 4);
    for _ in 0..6 {
        assert!(matches!(
            broker.next_event().await,
            broker::event::ConnectionEvent::Connected { .. }
        ));
    }
    broker.stop().await;
}

/// `mqtt.max_connections_per_address`, counted by the address the PROXY protocol header gives
/// (all test clients really come from 127.0.0.1): beyond it CONNACK 0x03, another address is
/// not affected, a closed connection makes room, and no address is remembered at zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited_by_the_resolved_address() {
    let mut broker = TestBroker::start_with(|c| {
        c.proxy_protocol = true;
        c.max_connections_per_address = 2;
    })
    .await;
    async fn from(broker: &TestBroker, source: &str) -> RawClient {
        let mut c = RawClient::tcp(broker.addr).await;
        c.send_bytes(format!("PROXY TCP4 {source} 10.0.0.1 51000 1883\r\n").as_bytes())
            .await;
        c
    }
    let refused = refusals(RefusalReason::MaxConnectionsPerAddress);
    let mut a = from(&broker, "198.51.100.7").await;
    assert_eq!(connack(&mut a, "a").await, ConnectReturnCode::Success);
    broker.connected("a").await;
    let mut b = from(&broker, "198.51.100.7").await;
    assert_eq!(connack(&mut b, "b").await, ConnectReturnCode::Success);
    broker.connected("b").await;

    let mut c = from(&broker, "198.51.100.7").await;
    assert_eq!(
        connack(&mut c, "c").await,
        ConnectReturnCode::ServiceUnavailable
    );
    assert_eq!(
        refusals(RefusalReason::MaxConnectionsPerAddress),
        refused + 1
    );
    let mut other = from(&broker, "198.51.100.8").await;
    assert_eq!(connack(&mut other, "d").await, ConnectReturnCode::Success);
    broker.connected("d").await;
    broker.no_event_pending();
    assert_eq!(broker.mqtt.addresses.addresses(), 2);

    a.send(&Packet::Disconnect).await;
    broker
        .disconnected("a", DisconnectReason::ClientDisconnect)
        .await;
    let mut c = from(&broker, "198.51.100.7").await;
    assert_eq!(connack(&mut c, "c").await, ConnectReturnCode::Success);
    broker.connected("c").await;

    for (client, id) in [(b, "b"), (c, "c"), (other, "d")] {
        let mut client = client;
        client.send(&Packet::Disconnect).await;
        broker
            .disconnected(id, DisconnectReason::ClientDisconnect)
            .await;
    }
    assert_eq!(broker.mqtt.addresses.addresses(), 0, "forgotten at zero");
    broker.stop().await;
}

/// Subscribes `id` to `filter` at QoS 0.
async fn subscriber(broker: &mut TestBroker, id: &str, filter: &str) -> RawClient {
    let (mut sub, _) = RawClient::connect(broker.addr, ConnectOpts::new(id)).await;
    broker.connected(id).await;
    sub.subscribe(filter, QoS::AtMostOnce).await;
    sub
}

/// `mqtt.max_publish_rate`: a client publishing QoS 0 far above the rate is slowed down by
/// pausing its reads: every message arrives, in order, later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_above_its_message_rate_is_slowed_down_and_loses_nothing() {
    let mut broker = TestBroker::start_with(|c| {
        c.max_publish_rate = 20;
        c.publish_rate_burst = 5;
    })
    .await;
    let mut sub = subscriber(&mut broker, "sub", "fast/#").await;
    let (mut publisher, _) = RawClient::connect(broker.addr, ConnectOpts::new("fast")).await;
    broker.connected("fast").await;
    let throttled = metrics().publish_throttled.get(PublishLimit::Messages);
    let seconds = metrics().publish_throttled_seconds.get();

    const COUNT: usize = 45;
    let mut burst = Vec::new();
    for i in 0..COUNT {
        burst.extend_from_slice(&testkit::encode(&Packet::Publish(Publish::new(
            format!("fast/{i}"),
            QoS::AtMostOnce,
            vec![0u8; 16],
        ))));
    }
    let start = Instant::now();
    publisher.send_bytes(&burst).await;
    for i in 0..COUNT {
        match sub.recv().await {
            Some(Packet::Publish(p)) => assert_eq!(p.topic, format!("fast/{i}")),
            other => panic!("message {i}: expected a PUBLISH, got {other:?}"),
        }
    }
    // Five at once, then 20 a second: the last one is read after about 2 s.
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(1800), "all in after {took:?}");
    assert!(metrics().publish_throttled.get(PublishLimit::Messages) - throttled >= 30);
    assert!(metrics().publish_throttled_seconds.get() - seconds >= 1.5);
    broker.no_event_pending();
    broker.stop().await;
}

/// `mqtt.max_publish_bytes_rate`: one message of 4 KB at 1,000 bytes a second pauses the
/// client's reads for about 3 s, longer than its keep-alive (1 s x 1.5). The pause is the
/// broker's doing: the client is not closed for it, its PINGREQ waiting in the socket is
/// answered after the pause, and keep-alive applies again from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_does_not_expire_while_the_broker_holds_reads_back() {
    let mut broker = TestBroker::start_with(|c| c.max_publish_bytes_rate = 1000).await;
    let mut sub = subscriber(&mut broker, "watcher", "big/#").await;
    let opts = ConnectOpts {
        keep_alive: 1,
        ..ConnectOpts::new("heavy")
    };
    let (mut heavy, _) = RawClient::connect(broker.addr, opts).await;
    broker.connected("heavy").await;
    let throttled = metrics().publish_throttled.get(PublishLimit::Bytes);

    let start = Instant::now();
    heavy
        .publish("big/1", QoS::AtMostOnce, false, &[7u8; 3995], 0)
        .await;
    heavy.send(&Packet::PingReq).await;
    // The message itself goes through at once; what follows it waits.
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.payload.len(), 3995),
        other => panic!("expected the message, got {other:?}"),
    }
    assert_eq!(
        metrics().publish_throttled.get(PublishLimit::Bytes),
        throttled + 1
    );
    match heavy.recv().await {
        Some(Packet::PingResp) => {}
        other => panic!("expected PINGRESP after the pause, got {other:?}"),
    }
    let answered = start.elapsed();
    assert!(
        answered >= Duration::from_millis(2500),
        "PINGREQ answered after {answered:?}, before the pause was over"
    );
    broker.no_event_pending();
    // Silent from now on: keep-alive closes it 1.5 s after that PINGREQ was read.
    broker
        .disconnected("heavy", DisconnectReason::KeepaliveTimeout)
        .await;
    let closed = start.elapsed() - answered;
    assert!(
        closed >= Duration::from_millis(1300) && closed < Duration::from_secs(4),
        "closed {closed:?} after the pause"
    );
    broker.stop().await;
}

/// The admin API's answer to `request`: status and JSON body (`Null` when empty).
async fn admin(broker: &TestBroker, request: Request<Body>) -> (StatusCode, Value) {
    // Behind the admin guard, which finds who may call in the request (no tokens file here:
    // everyone may).
    let response = broker::http::bans::routes(Arc::clone(&broker.mqtt.flapping))
        .layer(axum::Extension(Arc::new(
            broker::http::tokens::ApiAccess::open(),
        )))
        .oneshot(request)
        .await
        .expect("response");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// `mqtt.flapping`: the fourth connect of one client id within the window gets CONNACK 0x05
/// and a ban, and the device connected under that id is untouched; the ban is listed and
/// lifted through the admin API, after which the id connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_client_id_is_banned_listed_and_lifted() {
    let mut broker = TestBroker::start_with(|c| {
        c.flapping.max_connects = 3;
        c.flapping.window = Duration::from_secs(60);
        c.flapping.ban_time = Duration::from_secs(300);
    })
    .await;
    let refused = refusals(RefusalReason::Banned);
    let bans = metrics().flapping_bans.get();
    for _ in 0..2 {
        let (c, _) = RawClient::connect(broker.addr, ConnectOpts::new("flappy")).await;
        broker.connected("flappy").await;
        c.disconnect().await;
        broker
            .disconnected("flappy", DisconnectReason::ClientDisconnect)
            .await;
    }
    let (mut device, _) = RawClient::connect(broker.addr, ConnectOpts::new("flappy")).await;
    broker.connected("flappy").await;

    for attempt in 0..2 {
        let mut c = RawClient::tcp(broker.addr).await;
        assert_eq!(
            connack(&mut c, "flappy").await,
            ConnectReturnCode::NotAuthorized,
            "attempt {attempt}"
        );
    }
    assert_eq!(refusals(RefusalReason::Banned), refused + 2);
    assert_eq!(metrics().flapping_bans.get(), bans + 1);
    // The device connected under the id is untouched.
    device.send(&Packet::PingReq).await;
    assert!(matches!(device.recv().await, Some(Packet::PingResp)));
    broker.no_event_pending();
    let (mut other, _) = RawClient::connect(broker.addr, ConnectOpts::new("steady")).await;
    broker.connected("steady").await;

    let (status, body) = admin(
        &broker,
        Request::get("/api/v1/admin/bans")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let listed = body["bans"].as_array().expect("a list");
    assert_eq!(listed.len(), 1, "{body}");
    assert_eq!(listed[0]["client_id"], "flappy");
    assert_eq!(listed[0]["reason"], "flapping");
    let since = chrono::DateTime::parse_from_rfc3339(listed[0]["since"].as_str().expect("since"))
        .expect("RFC 3339");
    let until = chrono::DateTime::parse_from_rfc3339(listed[0]["until"].as_str().expect("until"))
        .expect("RFC 3339");
    let ban = (until - since).num_seconds();
    assert!((299..=300).contains(&ban), "banned for {ban} s");

    let lift = |id: &str| {
        Request::delete(format!("/api/v1/admin/bans/{id}"))
            .body(Body::empty())
            .expect("request")
    };
    assert_eq!(
        admin(&broker, lift("flappy")).await.0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        admin(&broker, lift("flappy")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        admin(&broker, lift("steady")).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, body) = admin(
        &broker,
        Request::get("/api/v1/admin/bans")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(body["bans"], Value::Array(Vec::new()));

    // Lifted: the id connects again (taking the session over from the device).
    let (_back, _) = RawClient::connect(broker.addr, ConnectOpts::new("flappy")).await;
    broker
        .disconnected("flappy", DisconnectReason::Takeover)
        .await;
    broker.connected("flappy").await;
    other.send(&Packet::PingReq).await;
    assert!(matches!(other.recv().await, Some(Packet::PingResp)));
    broker.stop().await;
}
