//! The REST API through `http::app()` without a socket (axum's testing pattern), on a SQLite
//! store filled through the store itself and a live MQTT session table.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use broker::event::{self, ConnectionEvent, PresenceRecord, SessionId};
use broker::http::{app, AppState};
use broker::labels::{AuthMethod, DisconnectReason, Listener};
use broker::mqtt::Broker;
use broker::store::{PresenceStore, SqliteStore};
use http_body_util::BodyExt;
use serde_json::Value;
use testkit::TempDir;
use tower::ServiceExt;

struct Api {
    state: AppState<SqliteStore>,
    _dir: TempDir,
}

impl Api {
    async fn new() -> Self {
        Self::with(&Default::default()).await
    }

    async fn with(config: &broker::config::HttpConfig) -> Self {
        let dir = testkit::temp_dir("api");
        let store = SqliteStore::connect(&format!("sqlite://{}/api.db", dir.path().display()), 2)
            .await
            .expect("store");
        store.migrate().await.expect("migrate");
        let (events, _rx) = event::channel(16);
        let mqtt_broker = Broker::new(Default::default(), events);
        Self {
            state: AppState::new(
                store,
                mqtt_broker.live_sessions(),
                Arc::new(AtomicBool::new(true)),
                config,
            ),
            _dir: dir,
        }
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        let response = app(self.state.clone())
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, json)
    }
}

fn record(event: ConnectionEvent) -> PresenceRecord {
    PresenceRecord {
        node_id: "node-api".into(),
        boot_id: uuid::Uuid::now_v7(),
        event,
    }
}

fn connected(id: &str, session: SessionId) -> PresenceRecord {
    connected_on(id, session, Listener::Tcp, None)
}

/// A connection on `listener`, with the identity of a verified client certificate.
fn connected_on(
    id: &str,
    session: SessionId,
    listener: Listener,
    identity: Option<&str>,
) -> PresenceRecord {
    record(ConnectionEvent::Connected {
        protocol: Default::default(),
        client_id: id.into(),
        session_id: session,
        seq: 1,
        peer: "10.0.0.1:1234".parse().expect("addr"),
        listener,
        identity: identity.map(str::to_owned),
        username: None,
        auth_method: AuthMethod::Anonymous,
        keep_alive: 45,
        clean_session: true,
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    })
}

/// A connection that authenticated as `username` with `method`.
fn connected_as(
    id: &str,
    session: SessionId,
    username: Option<&str>,
    method: AuthMethod,
) -> PresenceRecord {
    let mut record = connected(id, session);
    if let ConnectionEvent::Connected {
        username: u,
        auth_method,
        ..
    } = &mut record.event
    {
        *u = username.map(str::to_owned);
        *auth_method = method;
    }
    record
}

fn disconnected(id: &str, session: SessionId) -> PresenceRecord {
    record(ConnectionEvent::Disconnected {
        reason_code: None,
        reason_string: None,
        session_expires_at: None,
        client_id: id.into(),
        session_id: session,
        seq: 1,
        reason: DisconnectReason::KeepaliveTimeout,
        time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_060),
    })
}

#[tokio::test]
async fn device_sessions_and_stats() {
    let api = Api::new().await;
    let s1 = SessionId::new();
    let s2 = SessionId::new();
    api.state
        .store
        .apply(&[
            connected("sensor-1", s1),
            disconnected("sensor-1", s1),
            connected("sensor-2", s2),
        ])
        .await
        .expect("apply");

    let (status, body) = api.get("/api/v1/devices/sensor-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["online"], false);
    assert_eq!(body["last_reason"], "keepalive_timeout");
    assert_eq!(body["connected_at"], "2023-11-14T22:13:20Z");
    assert_eq!(body["disconnected_at"], "2023-11-14T22:14:20Z");
    assert_eq!(
        body["last_seen"], "2023-11-14T22:14:20Z",
        "offline: when it went offline"
    );
    assert_eq!(body["keep_alive"], 45);
    assert_eq!(body["last_session"]["session_id"], s1.to_string());

    let (status, body) = api.get("/api/v1/devices/sensor-1/sessions?limit=5").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sessions"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["sessions"][0]["reason"], "keepalive_timeout");

    let (status, body) = api.get("/api/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["online"], 1);
    assert_eq!(body["known_devices"], 2);
    assert_eq!(body["connects"], 2);
    assert_eq!(body["disconnects"]["keepalive_timeout"], 1);
}

#[tokio::test]
async fn devices_and_sessions_show_the_listener_and_identity() {
    let api = Api::new().await;
    let (secure, plain) = (SessionId::new(), SessionId::new());
    api.state
        .store
        .apply(&[
            connected_on("secure", secure, Listener::Tls, Some("device-7")),
            connected("plain", plain),
        ])
        .await
        .expect("apply");
    let shown = |v: &Value| {
        let object = v.as_object().expect("object");
        assert!(
            object.contains_key("identity"),
            "identity shown even if null: {v}"
        );
        (v["listener"].clone(), v["identity"].clone())
    };
    let tls = (Value::from("tls"), Value::from("device-7"));
    let tcp = (Value::from("tcp"), Value::Null);

    let (status, body) = api.get("/api/v1/devices/secure").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown(&body), tls);
    assert_eq!(shown(&body["last_session"]), tls);
    let (_, body) = api.get("/api/v1/devices/plain").await;
    assert_eq!(
        (shown(&body), shown(&body["last_session"])),
        (tcp.clone(), tcp.clone())
    );

    let (status, body) = api.get("/api/v1/devices/secure/sessions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown(&body["sessions"][0]), tls);
    let (_, body) = api.get("/api/v1/devices").await;
    let devices: Vec<_> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| (d["device_id"].clone(), shown(d)))
        .collect();
    assert_eq!(
        devices,
        [(Value::from("plain"), tcp), (Value::from("secure"), tls)]
    );
}

#[tokio::test]
async fn devices_and_sessions_show_the_username_and_auth_method() {
    let api = Api::new().await;
    api.state
        .store
        .apply(&[
            connected_as(
                "alice",
                SessionId::new(),
                Some("alice"),
                AuthMethod::Password,
            ),
            connected("anon", SessionId::new()),
            connected_as("cert", SessionId::new(), None, AuthMethod::Certificate),
        ])
        .await
        .expect("apply");
    let shown = |v: &Value| {
        let object = v.as_object().expect("object");
        assert!(
            object.contains_key("username"),
            "username shown even if null: {v}"
        );
        assert!(!object.contains_key("password"), "no password: {v}");
        (v["username"].clone(), v["auth_method"].clone())
    };
    let password = (Value::from("alice"), Value::from("password"));
    let anonymous = (Value::Null, Value::from("anonymous"));
    let certificate = (Value::Null, Value::from("certificate"));

    let (status, body) = api.get("/api/v1/devices/alice").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown(&body), password);
    assert_eq!(shown(&body["last_session"]), password);
    let (_, body) = api.get("/api/v1/devices/anon").await;
    assert_eq!(
        (shown(&body), shown(&body["last_session"])),
        (anonymous.clone(), anonymous.clone())
    );

    let (status, body) = api.get("/api/v1/devices/cert/sessions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown(&body["sessions"][0]), certificate);
    let (_, body) = api.get("/api/v1/devices").await;
    let devices: Vec<_> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| (d["device_id"].clone(), shown(d)))
        .collect();
    assert_eq!(
        devices,
        [
            (Value::from("alice"), password),
            (Value::from("anon"), anonymous),
            (Value::from("cert"), certificate),
        ]
    );
}

#[tokio::test]
async fn pagination_with_cursor_and_online_filter() {
    let api = Api::new().await;
    let mut batch = Vec::new();
    for i in 0..7 {
        let s = SessionId::new();
        batch.push(connected(&format!("d{i}"), s));
        if i % 2 == 0 {
            batch.push(disconnected(&format!("d{i}"), s));
        }
    }
    api.state.store.apply(&batch).await.expect("apply");

    let mut seen = Vec::new();
    let mut uri = "/api/v1/devices?limit=3".to_owned();
    loop {
        let (status, body) = api.get(&uri).await;
        assert_eq!(status, StatusCode::OK);
        for d in body["devices"].as_array().expect("devices") {
            seen.push(d["device_id"].as_str().expect("id").to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(cursor) => uri = format!("/api/v1/devices?limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["d0", "d1", "d2", "d3", "d4", "d5", "d6"]);

    let (_, body) = api.get("/api/v1/devices?online=true").await;
    let online: Vec<_> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["device_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(online, ["d1", "d3", "d5"]);
}

#[tokio::test]
async fn errors_are_clear() {
    let api = Api::new().await;
    let (status, body) = api.get("/api/v1/devices/ghost").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].as_str().expect("message").contains("ghost"));
    let (status, _) = api.get("/api/v1/devices/ghost/sessions").await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    for (uri, needle) in [
        ("/api/v1/devices?online=maybe", "online"),
        ("/api/v1/devices?limit=0", "limit"),
        ("/api/v1/devices?limit=5000", "limit"),
        ("/api/v1/devices?limit=ten", "limit"),
        ("/api/v1/devices?colour=red", "colour"),
        ("/api/v1/devices/x/sessions?limit=-1", "limit"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(
            body["error"].as_str().expect("message").contains(needle),
            "{uri}: {body}"
        );
    }
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let api = Api::new().await;
    let (status, _) = api.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.get("/readyz").await;
    assert_eq!(
        (status, body["ready"].as_bool()),
        (StatusCode::OK, Some(true))
    );

    api.state
        .migrated
        .store(false, std::sync::atomic::Ordering::Release);
    let (status, body) = api.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["reason"]
        .as_str()
        .expect("reason")
        .contains("migrations"));

    let (status, body) = api.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = body.as_str().expect("text");
    assert!(text.contains("heartwire_build_info"));
    assert!(text.contains("heartwire_bridge_queue_depth"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_comes_from_memory_for_connected_devices() {
    let data = testkit::temp_dir("api-live");
    let url = testkit::sqlite_url(&data);
    let broker = testkit::FullBroker::start(testkit::FullBroker::config(&url, &data, "n")).await;
    let (mut dev, _) =
        testkit::RawClient::connect(broker.mqtt, testkit::ConnectOpts::new("live")).await;
    let before_ping = chrono::Utc::now();
    dev.send(&rumqttc::mqttbytes::v4::Packet::PingReq).await;
    assert!(dev.recv().await.is_some());
    // Over real HTTP this time.
    let body: Value = testkit::eventually("device online in the API", || async {
        let body = testkit::http_get(broker.http, "/api/v1/devices/live").await?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (v["online"] == true).then_some(v)
    })
    .await;
    let last_seen: chrono::DateTime<chrono::Utc> = body["last_seen"]
        .as_str()
        .expect("last_seen")
        .parse()
        .expect("RFC 3339");
    assert!(
        last_seen >= before_ping - chrono::Duration::milliseconds(5),
        "last_seen {last_seen} reflects the PINGREQ sent at {before_ping}"
    );
    broker.stop().await;
}

#[tokio::test]
async fn busy_store_slots_answer_503_with_retry_after() {
    let config = broker::config::HttpConfig {
        max_store_queries: 1,
        store_queue_timeout: Duration::from_millis(50),
        ..Default::default()
    };
    let api = Api::with(&config).await;
    let busy_before = broker::metrics::metrics().http_store_busy.get();
    let held = api.state.queries.acquire().await.expect("the only slot");
    for uri in [
        "/api/v1/devices",
        "/api/v1/devices/x",
        "/api/v1/devices/x/sessions",
        "/api/v1/nodes",
    ] {
        let response = app(api.state.clone())
            .oneshot(Request::get(uri).body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{uri}");
        assert_eq!(
            response.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "{uri}"
        );
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body: Value = serde_json::from_slice(&body).expect("JSON");
        assert!(
            body["error"].as_str().expect("error").contains("retry"),
            "{body}"
        );
    }
    assert_eq!(
        broker::metrics::metrics().http_store_busy.get() - busy_before,
        4
    );
    // /stats refreshes on a connection of its own: busy slots do not make it fail.
    let (status, _) = api.get("/api/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    drop(held);
    let (status, _) = api.get("/api/v1/devices").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_come_from_one_shared_query_while_fresh() {
    let config = broker::config::HttpConfig {
        stats_cache_ttl: Duration::from_secs(3600),
        ..Default::default()
    };
    let api = Api::with(&config).await;
    api.state
        .store
        .apply(&[connected("a", SessionId::new())])
        .await
        .expect("apply");
    let refreshes = || broker::metrics::metrics().http_stats_refreshes.get();
    let before = refreshes();
    let requests: Vec<_> = (0..50)
        .map(|_| {
            let state = api.state.clone();
            tokio::spawn(async move {
                app(state)
                    .oneshot(
                        Request::get("/api/v1/stats")
                            .body(Body::empty())
                            .expect("request"),
                    )
                    .await
                    .expect("response")
                    .status()
            })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(refreshes() - before, 1, "50 concurrent requests, one query");
    // Fresh for the TTL: a new session is not counted yet.
    api.state
        .store
        .apply(&[connected("b", SessionId::new())])
        .await
        .expect("apply");
    let (_, body) = api.get("/api/v1/stats").await;
    assert_eq!(body["known_devices"], 1);
    assert_eq!(refreshes() - before, 1);

    // With a TTL of 0, every request queries (still one at a time).
    let api = Api::with(&broker::config::HttpConfig {
        stats_cache_ttl: Duration::ZERO,
        ..Default::default()
    })
    .await;
    for (i, id) in ["a", "b"].into_iter().enumerate() {
        api.state
            .store
            .apply(&[connected(id, SessionId::new())])
            .await
            .expect("apply");
        let (_, body) = api.get("/api/v1/stats").await;
        assert_eq!(body["known_devices"], i + 1);
    }
}

#[tokio::test]
async fn node_boots() {
    let api = Api::new().await;
    let store = &api.state.store;
    let (crashed, other, current) = (
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    );
    let at = |secs: i64| chrono::DateTime::from_timestamp(1_700_000_000 + secs, 0).expect("time");
    store
        .begin_boot("n1", crashed, at(0), &[])
        .await
        .expect("boot");
    store.heartbeat(crashed, at(30)).await.expect("heartbeat");
    store
        .begin_boot("n2", other, at(10), &[])
        .await
        .expect("boot");
    store
        .begin_boot("n1", current, at(60), &[])
        .await
        .expect("boot");

    let (status, body) = api.get("/api/v1/nodes").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let nodes = body["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{body}");
    assert_eq!(nodes[0]["boot_id"], current.to_string(), "newest first");
    assert_eq!(nodes[2]["boot_id"], crashed.to_string());
    assert_eq!(nodes[2]["node_id"], "n1");
    assert_eq!(nodes[2]["started_at"], "2023-11-14T22:13:20Z");
    assert_eq!(nodes[2]["heartbeat_at"], "2023-11-14T22:13:50Z");
    assert_eq!(nodes[2]["recovered"], true);
    assert_eq!(nodes[0]["recovered"], false);

    let (status, body) = api.get("/api/v1/nodes?node_id=n1&limit=1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let ids: Vec<&str> = body["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| n["boot_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [current.to_string()]);
    let (_, body) = api.get("/api/v1/nodes?node_id=n2").await;
    assert_eq!(body["nodes"].as_array().map(Vec::len), Some(1));

    for (uri, needle) in [
        ("/api/v1/nodes?limit=0", "limit"),
        ("/api/v1/nodes?node=n1", "node"),
    ] {
        let (status, body) = api.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(
            body["error"].as_str().expect("message").contains(needle),
            "{uri}: {body}"
        );
    }
}

/// Every request is counted once in `heartwire_http_requests_total`, under its route (a bad
/// parameter included), or as `other` when no route answered; probes and scrapes are not.
#[tokio::test]
async fn every_request_is_counted_once_under_its_route() {
    use broker::labels::{HttpRoute, Label, StatusClass};
    use HttpRoute::{Bans, Device, Devices, Nodes, Other, Readyz, Sessions, Stats};
    use StatusClass::{ClientError, Success};
    let api = Api::new().await;
    let grid = || {
        let m = broker::metrics::metrics();
        HttpRoute::ALL
            .iter()
            .flat_map(|r| StatusClass::ALL.iter().map(|s| m.http_requests.get(*r, *s)))
            .collect::<Vec<u64>>()
    };
    let cell = |route: HttpRoute, status: StatusClass| {
        route.index() * StatusClass::ALL.len() + status.index()
    };
    /// Where a request is counted; `None`: nowhere.
    type Counted = Option<(HttpRoute, StatusClass)>;
    let cases: &[(&str, &str, Counted)] = &[
        ("GET", "/api/v1/devices", Some((Devices, Success))),
        (
            "GET",
            "/api/v1/devices?limit=0",
            Some((Devices, ClientError)),
        ),
        ("GET", "/api/v1/devices/ghost", Some((Device, ClientError))),
        ("GET", "/api/v1/devices/%FF", Some((Device, ClientError))),
        (
            "GET",
            "/api/v1/devices/ghost/sessions?limit=x",
            Some((Sessions, ClientError)),
        ),
        ("GET", "/api/v1/stats", Some((Stats, Success))),
        ("GET", "/api/v1/admin/bans", Some((Bans, Success))),
        (
            "DELETE",
            "/api/v1/admin/bans/ghost",
            Some((Bans, ClientError)),
        ),
        ("POST", "/api/v1/admin/bans", Some((Other, ClientError))),
        ("GET", "/api/v1/nodes?node=x", Some((Nodes, ClientError))),
        ("GET", "/readyz", Some((Readyz, Success))),
        ("GET", "/nope", Some((Other, ClientError))),
        ("POST", "/api/v1/stats", Some((Other, ClientError))),
        ("GET", "/healthz", None),
        ("GET", "/metrics", None),
    ];
    for (method, uri, counted) in cases {
        let before = grid();
        let request = Request::builder()
            .method(*method)
            .uri(*uri)
            .body(Body::empty())
            .expect("request");
        app(api.state.clone())
            .oneshot(request)
            .await
            .expect("response");
        let mut want = before;
        if let Some((route, status)) = counted {
            want[cell(*route, *status)] += 1;
        }
        assert_eq!(grid(), want, "{method} {uri}");
    }
}
