//! The protected REST API, end to end on a whole broker: bearer tokens from
//! `http.api_tokens_file` with roles read and admin (401, 403, 200), the open probes, /metrics
//! with and without `http.metrics_public`, kicking a client (its socket closes, its session
//! ends with reason `kicked`), and the reload endpoint (a changed password file lets a new user
//! in, a broken one is reported as failed and the one in force stays; the tokens file reloads
//! the same way).

use std::path::Path;
use std::process::Command;

use broker::config::Config;
use broker::http::tokens::{line, new_token, Role};
use broker::labels::{ApiRefusal, DisconnectReason};
use broker::metrics::metrics;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use serde_json::Value;
use testkit::{
    connect_packet, eventually, http_request, mosquitto_passwd, sqlite_url, temp_dir, ConnectOpts,
    FullBroker, RawClient, Response, TempDir,
};

/// A broker whose API needs the tokens of a file, and the tokens.
struct Protected {
    broker: FullBroker,
    read: String,
    admin: String,
    /// The tokens file.
    tokens: std::path::PathBuf,
    dir: TempDir,
}

impl Protected {
    /// A ready broker with a tokens file holding a read and an admin token; `adjust` changes
    /// the rest of its configuration (in `dir`).
    async fn start(adjust: impl FnOnce(&mut Config, &Path)) -> Self {
        let dir = temp_dir("api-tokens");
        let (read, admin) = (new_token().expect("token"), new_token().expect("token"));
        let tokens = dir.path().join("api-tokens");
        std::fs::write(
            &tokens,
            format!(
                "# API tokens\n{}\n\n{}\n",
                line("dashboard", Role::Read, &read),
                line("ops", Role::Admin, &admin)
            ),
        )
        .expect("write tokens");
        let mut config = FullBroker::config(&sqlite_url(dir.path()), dir.path(), "test-node");
        config.http.api_tokens_file = Some(tokens.clone());
        adjust(&mut config, dir.path());
        let broker = FullBroker::start(config).await;
        broker.ready().await;
        Self {
            broker,
            read,
            admin,
            tokens,
            dir,
        }
    }

    /// `method path` with `token` as bearer token (`None`: no Authorization header).
    async fn call(&self, method: &str, path: &str, token: Option<&str>) -> Response {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        http_request(self.broker.http, method, path, &headers, None)
            .await
            .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer"))
    }
}

fn json(response: &Response) -> Value {
    serde_json::from_str(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.body))
}

fn refused(reason: ApiRefusal) -> u64 {
    metrics().http_refused.get(reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_decide_who_uses_which_endpoint() {
    let api = Protected::start(|_, _| {}).await;
    let (read, admin) = (Some(api.read.as_str()), Some(api.admin.as_str()));
    let (unauthorized, forbidden) = (
        refused(ApiRefusal::Unauthorized),
        refused(ApiRefusal::Forbidden),
    );

    // The probes are open.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(api.call("GET", path, None).await.status, 200, "{path}");
    }
    // Without a token, or with one the file does not hold: 401, naming the scheme.
    let mut refusals = 0;
    for token in [None, Some("not-a-token"), Some("")] {
        for path in ["/api/v1/devices", "/api/v1/stats", "/metrics"] {
            let response = api.call("GET", path, token).await;
            assert_eq!(response.status, 401, "{path} with {token:?}");
            let challenge = response.header("www-authenticate").unwrap_or_default();
            assert!(challenge.starts_with("Bearer"), "{challenge:?}");
            assert!(json(&response)["error"].is_string());
            refusals += 1;
        }
    }
    let response = api
        .call("POST", "/api/v1/admin/reload", Some("not-a-token"))
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(
        refused(ApiRefusal::Unauthorized),
        unauthorized + refusals + 1
    );
    // A Basic header is not a bearer token.
    let response = http_request(
        api.broker.http,
        "GET",
        "/api/v1/stats",
        &[("Authorization", "Basic b3BzOnNlY3JldA==")],
        None,
    )
    .await
    .expect("answer");
    assert_eq!(response.status, 401);

    // Read: every endpoint but the admin ones.
    for path in [
        "/api/v1/devices",
        "/api/v1/stats",
        "/api/v1/nodes",
        "/metrics",
    ] {
        assert_eq!(api.call("GET", path, read).await.status, 200, "{path}");
        assert_eq!(api.call("GET", path, admin).await.status, 200, "{path}");
    }
    for (method, path) in [
        ("POST", "/api/v1/admin/reload"),
        ("POST", "/api/v1/admin/clients/x/kick"),
        ("GET", "/api/v1/admin/bans"),
        ("DELETE", "/api/v1/admin/bans/x"),
        ("POST", "/api/v1/admin/state/backup"),
        ("GET", "/api/v1/admin/state/backups"),
        ("GET", "/api/v1/admin/state/backups/x"),
    ] {
        let response = api.call(method, path, read).await;
        assert_eq!(response.status, 403, "{path}");
        let error = json(&response)["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            error.contains("dashboard") && error.contains("admin"),
            "{error}"
        );
    }
    assert_eq!(refused(ApiRefusal::Forbidden), forbidden + 7);
    assert_eq!(
        api.call("POST", "/api/v1/admin/reload", admin).await.status,
        200
    );
    assert_eq!(
        api.call("GET", "/api/v1/admin/bans", admin).await.status,
        200
    );
    assert_eq!(
        api.call("GET", "/api/v1/admin/bans", None).await.status,
        401
    );
    // The token itself is never in the metrics.
    let text = api.call("GET", "/metrics", read).await.body;
    assert!(!text.contains(&api.read) && !text.contains(&api.admin));
    assert!(text.contains("heartwire_http_requests_refused_total{reason=\"forbidden\"}"));
    api.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_public_opens_the_scrape_and_nothing_else() {
    let api = Protected::start(|config, _| config.http.metrics_public = true).await;
    let scrape = api.call("GET", "/metrics", None).await;
    assert_eq!(scrape.status, 200);
    assert!(scrape.body.contains("heartwire_connections_accepted_total"));
    assert_eq!(api.call("GET", "/api/v1/stats", None).await.status, 401);
    assert_eq!(
        api.call("POST", "/api/v1/admin/reload", None).await.status,
        401
    );
    api.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_client_is_disconnected_with_reason_kicked() {
    let api = Protected::start(|_, _| {}).await;
    let (read, admin) = (Some(api.read.as_str()), Some(api.admin.as_str()));
    let kicked = metrics().disconnects.get(DisconnectReason::Kicked);
    let (mut device, _) = RawClient::connect(api.broker.mqtt, ConnectOpts::new("pump-7")).await;
    let (mut bystander, _) = RawClient::connect(api.broker.mqtt, ConnectOpts::new("pump-8")).await;
    eventually("pump-7 online in the API", || async {
        let r = api.call("GET", "/api/v1/devices/pump-7", read).await;
        (r.status == 200 && json(&r)["online"] == true).then_some(())
    })
    .await;

    let response = api
        .call("POST", "/api/v1/admin/clients/pump-7/kick", admin)
        .await;
    assert_eq!(response.status, 202, "{}", response.body);
    let body = json(&response);
    assert_eq!(body["client_id"], "pump-7");
    assert_eq!(body["reason"], "kicked");
    // Its socket closes (no packet first: MQTT 3.1.1 has no server DISCONNECT).
    assert!(device.until_closed().await.is_empty());
    let sessions = eventually("the session ended as kicked", || async {
        let r = api
            .call("GET", "/api/v1/devices/pump-7/sessions", read)
            .await;
        let body = json(&r);
        (body["sessions"][0]["reason"] == "kicked").then_some(body)
    })
    .await;
    assert!(sessions["sessions"][0]["disconnected_at"].is_string());
    let device = json(&api.call("GET", "/api/v1/devices/pump-7", read).await);
    assert_eq!(device["online"], false);
    assert_eq!(device["last_reason"], "kicked", "{device}");
    assert_eq!(
        metrics().disconnects.get(DisconnectReason::Kicked),
        kicked + 1
    );
    // Nobody else was touched.
    bystander.send(&Packet::PingReq).await;
    assert!(matches!(bystander.recv().await, Some(Packet::PingResp)));

    // Not connected (any more, or ever): 404. A client id with a space, percent-encoded.
    for id in ["pump-7", "nobody", "no%20body"] {
        let response = api
            .call("POST", &format!("/api/v1/admin/clients/{id}/kick"), admin)
            .await;
        assert_eq!(response.status, 404, "{id}: {}", response.body);
        assert!(json(&response)["error"]
            .as_str()
            .is_some_and(|e| e.contains("not connected")));
    }
    // The kicked device may come back.
    let (_back, _) = RawClient::connect(api.broker.mqtt, ConnectOpts::new("pump-7")).await;
    // GET is not the way to kick.
    let response = api
        .call("GET", "/api/v1/admin/clients/pump-8/kick", admin)
        .await;
    assert_eq!(response.status, 405);
    api.broker.stop().await;
}

/// CONNECT as `user` with `password`; the CONNACK's return code.
async fn login(broker: &FullBroker, user: &str, password: &str) -> ConnectReturnCode {
    let opts = ConnectOpts::new(user).login(user, password);
    RawClient::connack(broker.mqtt, opts)
        .await
        .1
        .expect("a CONNACK")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_endpoint_rereads_the_password_and_tokens_files() {
    let api = Protected::start(|config, dir| {
        let passwords = dir.join("passwords");
        mosquitto_passwd(&passwords, "meter-1", "one", true);
        config.auth.password_file = Some(passwords);
        let acl = dir.join("acl");
        std::fs::write(&acl, "topic readwrite #\n").expect("write the ACL file");
        config.auth.acl_file = Some(acl);
    })
    .await;
    let admin = Some(api.admin.as_str());
    let passwords = api.dir.path().join("passwords");
    assert_eq!(
        login(&api.broker, "meter-1", "one").await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        login(&api.broker, "meter-2", "two").await,
        ConnectReturnCode::BadUserNamePassword
    );

    // A new user, and a new token: both in force after the reload.
    mosquitto_passwd(&passwords, "meter-2", "two", false);
    let newcomer = new_token().expect("token");
    let mut tokens = std::fs::read_to_string(&api.tokens).expect("read tokens");
    tokens.push_str(&format!("{}\n", line("newcomer", Role::Read, &newcomer)));
    std::fs::write(&api.tokens, tokens).expect("write tokens");
    assert_eq!(
        api.call("GET", "/api/v1/stats", Some(&newcomer))
            .await
            .status,
        401
    );
    let response = api.call("POST", "/api/v1/admin/reload", admin).await;
    assert_eq!(response.status, 200);
    let body = json(&response);
    assert_eq!(body["ok"], true, "{body}");
    assert_eq!(body["files"]["auth.password_file"]["status"], "reloaded");
    assert_eq!(body["files"]["http.api_tokens_file"]["status"], "reloaded");
    assert_eq!(body["files"]["mqtt.tls"]["status"], "not_configured");
    assert_eq!(body["files"]["auth.acl_file"]["status"], "reloaded");
    assert_eq!(
        login(&api.broker, "meter-2", "two").await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        api.call("GET", "/api/v1/stats", Some(&newcomer))
            .await
            .status,
        200
    );

    // Broken files: reported as failed, with the line; the ones in force stay.
    std::fs::write(&passwords, "meter-1:not-a-hash\n").expect("write");
    std::fs::write(&api.tokens, "ops admin\n").expect("write");
    std::fs::write(api.dir.path().join("acl"), "topic read a\nbogus line\n").expect("write");
    let response = api.call("POST", "/api/v1/admin/reload", admin).await;
    assert_eq!(response.status, 200);
    let body = json(&response);
    assert_eq!(body["ok"], false, "{body}");
    let failed = &body["files"]["auth.password_file"];
    assert_eq!(failed["status"], "failed", "{body}");
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(error.contains("line 1"), "{error}");
    assert!(
        !error.contains("not-a-hash"),
        "no secret in the answer: {error}"
    );
    let failed = &body["files"]["auth.acl_file"];
    assert_eq!(failed["status"], "failed", "{body}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 2")),
        "{body}"
    );
    let failed = &body["files"]["http.api_tokens_file"];
    assert_eq!(failed["status"], "failed", "{body}");
    assert!(
        failed["error"]
            .as_str()
            .is_some_and(|e| e.contains("line 1") && e.contains("expected 3 fields")),
        "{body}"
    );
    assert_eq!(
        login(&api.broker, "meter-2", "two").await,
        ConnectReturnCode::Success
    );
    assert_eq!(
        api.call("GET", "/api/v1/stats", Some(&newcomer))
            .await
            .status,
        200
    );
    assert_eq!(
        api.call("POST", "/api/v1/admin/reload", admin).await.status,
        200
    );
    api.broker.stop().await;
}

/// A device whose password the reloaded file no longer accepts (removed, or changed) is
/// disconnected with reason `not_authorized`; the others, and anonymous clients, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_disconnects_the_devices_whose_password_was_revoked() {
    let api = Protected::start(|config, dir| {
        let passwords = dir.join("passwords");
        mosquitto_passwd(&passwords, "meter-1", "one", true);
        mosquitto_passwd(&passwords, "meter-2", "two", false);
        mosquitto_passwd(&passwords, "meter-3", "three", false);
        config.auth.password_file = Some(passwords);
        config.auth.allow_anonymous = true;
    })
    .await;
    let (read, admin) = (Some(api.read.as_str()), Some(api.admin.as_str()));
    let passwords = api.dir.path().join("passwords");
    let revoked = metrics().disconnects.get(DisconnectReason::NotAuthorized);
    let mut meters = Vec::new();
    for (user, password) in [("meter-1", "one"), ("meter-2", "two"), ("meter-3", "three")] {
        let mut c = RawClient::tcp(api.broker.mqtt).await;
        let mut packet = connect_packet(&ConnectOpts::new(user));
        if let Packet::Connect(connect) = &mut packet {
            connect.set_login(user, password);
        }
        c.send(&packet).await;
        assert!(
            matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code == ConnectReturnCode::Success)
        );
        meters.push(c);
    }
    let (mut anonymous, _) = RawClient::connect(api.broker.mqtt, ConnectOpts::new("display")).await;

    // meter-1 removed, meter-2 given a new password, meter-3 unchanged.
    let status = Command::new("mosquitto_passwd")
        .args(["-D"])
        .arg(&passwords)
        .arg("meter-1")
        .status()
        .expect("mosquitto_passwd runs");
    assert!(status.success());
    mosquitto_passwd(&passwords, "meter-2", "two-b", false);
    let response = api.call("POST", "/api/v1/admin/reload", admin).await;
    assert_eq!(response.status, 200, "{}", response.body);

    let mut meters = meters.into_iter();
    for user in ["meter-1", "meter-2"] {
        let mut c = meters.next().expect("a meter");
        assert!(c.until_closed().await.is_empty(), "{user} is closed");
        eventually("the session ended as not_authorized", || async {
            let r = api
                .call("GET", &format!("/api/v1/devices/{user}/sessions"), read)
                .await;
            (json(&r)["sessions"][0]["reason"] == "not_authorized").then_some(())
        })
        .await;
    }
    assert_eq!(
        metrics().disconnects.get(DisconnectReason::NotAuthorized),
        revoked + 2
    );
    for c in [&mut meters.next().expect("meter-3"), &mut anonymous] {
        c.send(&Packet::PingReq).await;
        assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    }
    assert_eq!(
        login(&api.broker, "meter-2", "two-b").await,
        ConnectReturnCode::Success
    );
    api.broker.stop().await;
}
