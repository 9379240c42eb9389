//! Database credentials: managed through the admin API (create, rotate, revoke, list), used at
//! CONNECT by the `database` provider, and what a credential grants; a rotation or revocation
//! on this node takes effect at once, one on another node within `auth.database_cache_ttl`;
//! credentials that cannot be read are CONNACK 0x03.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use broker::auth::password_file::Hash;
use broker::auth::{Auth, Authenticated, Grants, Refusal, Request};
use broker::config::AuthConfig;
use broker::labels::{AuthMethod, RefusalReason, VerifyOutcome};
use broker::metrics::metrics;
use broker::store::{Credential, CredentialRecord, PresenceStore, SqliteStore, StoreCredentials};
use chrono::Utc;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use serde_json::Value;
use testkit::{
    connect_packet, eventually, http_request, sqlite_url, temp_dir, ConnectOpts, FullBroker,
    RawClient, TestBroker,
};

/// CONNECT as `client_id` with `user` and `password`; the connection and the CONNACK's code.
async fn connect(
    broker: &FullBroker,
    client_id: &str,
    user: &str,
    password: &str,
) -> (RawClient, ConnectReturnCode) {
    let opts = ConnectOpts::new(client_id).login(user, password);
    let (c, code) = RawClient::connack(broker.mqtt, opts).await;
    (c, code.expect("a CONNACK"))
}

/// `method` `path` with `body`; the status and the JSON answer (`Null` without one).
async fn call(broker: &FullBroker, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let response = http_request(broker.http, method, path, &[], body)
        .await
        .expect("an HTTP answer");
    let json = serde_json::from_str(&response.body).unwrap_or(Value::Null);
    (response.status, json)
}

/// A whole broker on SQLite with database credentials and no refusal delays.
async fn broker_with_database_credentials() -> (FullBroker, testkit::TempDir) {
    let data = temp_dir("credentials");
    let mut config = FullBroker::config(&sqlite_url(&data), &data, "node-1");
    config.auth.database = true;
    config.auth.failure_delay_max = Duration::ZERO;
    let broker = FullBroker::start(config).await;
    broker.ready().await;
    (broker, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_made_through_the_api_decide_who_connects() {
    let (broker, _data) = broker_with_database_credentials().await;
    const BASE: &str = "/api/v1/admin/credentials";

    // Created with a generated password, shown once.
    let (status, created) = call(
        &broker,
        "POST",
        BASE,
        Some(r#"{"username": "dev-1", "publish": ["t/dev-1/#"]}"#),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let password = created["password"].as_str().expect("a password").to_owned();
    assert_eq!(password.len(), 43);
    assert_eq!(created["username"], "dev-1");
    assert_eq!(created["publish"], serde_json::json!(["t/dev-1/#"]));
    assert_eq!(created["revoked_at"], Value::Null);

    let (_dev_1, code) = connect(&broker, "dev-1", "dev-1", &password).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (_, code) = connect(&broker, "dev-1b", "dev-1", "wrong password").await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    // No provider has this user name: bad credentials.
    let (_, code) = connect(&broker, "dev-9", "dev-9", &password).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);

    // Listed, without a hash or a password.
    let (status, list) = call(&broker, "GET", BASE, None).await;
    assert_eq!(status, 200);
    assert_eq!(list["credentials"][0]["username"], "dev-1");
    assert_eq!(list["next_cursor"], Value::Null);
    let text = list.to_string();
    assert!(
        !text.contains("argon2") && !text.contains(&password),
        "{text}"
    );

    // Rotated: the old password stops working at once, the new one works.
    let (status, rotated) = call(&broker, "POST", &format!("{BASE}/dev-1/rotate"), None).await;
    assert_eq!(status, 200, "{rotated}");
    let new_password = rotated["password"].as_str().expect("a password").to_owned();
    assert_ne!(new_password, password);
    let (_, code) = connect(&broker, "dev-1c", "dev-1", &password).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let (mut dev_1d, code) = connect(&broker, "dev-1d", "dev-1", &new_password).await;
    assert_eq!(code, ConnectReturnCode::Success);

    // Rotated to a password of one's own (what repeated provisioning does).
    let (status, own) = call(
        &broker,
        "POST",
        &format!("{BASE}/dev-1/rotate"),
        Some(r#"{"password": "my own password"}"#),
    )
    .await;
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["password"], "my own password");
    // A rotation closes the connections that logged in with the old password
    // (not_authorized).
    assert!(dev_1d.until_closed().await.is_empty());
    let (_, code) = connect(&broker, "dev-1g", "dev-1", &new_password).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let new_password = "my own password".to_owned();
    let (mut dev_1h, code) = connect(&broker, "dev-1h", "dev-1", &new_password).await;
    assert_eq!(code, ConnectReturnCode::Success);

    // Revoked: refused at once; revoking or rotating again finds nothing.
    let (status, _) = call(&broker, "DELETE", &format!("{BASE}/dev-1"), None).await;
    assert_eq!(status, 204);
    assert!(dev_1h.until_closed().await.is_empty(), "revoked: closed");
    let (_, code) = connect(&broker, "dev-1e", "dev-1", &new_password).await;
    assert_eq!(code, ConnectReturnCode::BadUserNamePassword);
    let (status, _) = call(&broker, "DELETE", &format!("{BASE}/dev-1"), None).await;
    assert_eq!(status, 404);
    let (status, _) = call(&broker, "POST", &format!("{BASE}/dev-1/rotate"), None).await;
    assert_eq!(status, 404);
    let (_, list) = call(&broker, "GET", BASE, None).await;
    assert!(list["credentials"][0]["revoked_at"].is_string(), "{list}");

    // Created again with a password of one's own; a second creation conflicts.
    let body = r#"{"username": "dev-1", "password": "correct horse"}"#;
    let (status, again) = call(&broker, "POST", BASE, Some(body)).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["password"], "correct horse");
    let (_dev_1f, code) = connect(&broker, "dev-1f", "dev-1", "correct horse").await;
    assert_eq!(code, ConnectReturnCode::Success);
    let (status, _) = call(&broker, "POST", BASE, Some(body)).await;
    assert_eq!(status, 409);

    // Bad requests name what is wrong.
    for (body, says) in [
        (
            r#"{"username": "dev-2", "subscribe": ["a/#/b"]}"#,
            "subscribe",
        ),
        (r#"{"username": ""}"#, "username"),
        (r#"{"username": "dev-2", "password": "short"}"#, "password"),
        (r#"{"username": "dev-2", "role": "admin"}"#, "role"),
        ("not json", "JSON"),
    ] {
        let (status, error) = call(&broker, "POST", BASE, Some(body)).await;
        assert_eq!(status, 400, "{body}: {error}");
        let message = error["error"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    }

    // Pages by user name.
    for name in ["dev-3", "dev-2"] {
        let body = format!(r#"{{"username": "{name}"}}"#);
        assert_eq!(call(&broker, "POST", BASE, Some(&body)).await.0, 201);
    }
    let (_, page) = call(&broker, "GET", &format!("{BASE}?limit=2"), None).await;
    assert_eq!(page["credentials"][1]["username"], "dev-2");
    assert_eq!(page["next_cursor"], "dev-2");
    let (_, rest) = call(
        &broker,
        "GET",
        &format!("{BASE}?limit=2&cursor=dev-2"),
        None,
    )
    .await;
    assert_eq!(rest["credentials"][0]["username"], "dev-3");
    assert_eq!(rest["credentials"].as_array().map(Vec::len), Some(1));
    broker.stop().await;
}

/// A store on a fresh SQLite file, migrated.
async fn store() -> (SqliteStore, testkit::TempDir) {
    let dir = temp_dir("credentials-store");
    let store = SqliteStore::connect(&sqlite_url(&dir), 2)
        .await
        .expect("open");
    store.migrate().await.expect("migrate");
    (store, dir)
}

fn record(username: &str, password: &str, publish: Option<Vec<String>>) -> CredentialRecord {
    let now = Utc::now();
    CredentialRecord {
        credential: Credential {
            username: username.to_owned(),
            publish,
            subscribe: None,
            created_at: now,
            updated_at: now,
            revoked_at: None,
        },
        password_hash: Hash::new_argon2id(password.as_bytes())
            .expect("hash")
            .to_line_field(),
    }
}

async fn ask(auth: &Auth, user: &str, password: &str) -> Result<Authenticated, Refusal> {
    auth.authenticate(Request {
        peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client_id: user,
        username: Some(user),
        password: Some(password.as_bytes()),
        identity: None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_elsewhere_takes_effect_within_the_cache_ttl() {
    let (store, _dir) = store().await;
    let ttl = Duration::from_millis(300);
    let auth = Auth::new(&AuthConfig {
        database: true,
        database_cache_ttl: ttl,
        ..AuthConfig::default()
    })
    .expect("auth");
    // Before the store is attached, a credential cannot be checked: CONNACK 0x03.
    assert_eq!(
        ask(&auth, "dev-1", "pw-one-1").await,
        Err(Refusal::Unavailable)
    );
    auth.attach_credentials(Arc::new(StoreCredentials(store.clone())));
    let grants = Some(vec!["t/dev-1/#".to_owned()]);
    assert!(store
        .create_credential(&record("dev-1", "pw-one-1", grants))
        .await
        .expect("create"));

    // What the row grants comes with the authentication.
    let authenticated = ask(&auth, "dev-1", "pw-one-1").await.expect("accepted");
    assert_eq!(authenticated.method, AuthMethod::Database);
    assert_eq!(
        authenticated.grants.as_deref(),
        Some(&Grants {
            publish: vec!["t/dev-1/#".into()],
            subscribe: vec![],
        })
    );

    // Asked again: from the cache, without a query or a hash.
    let hits = metrics().auth_verifications.get(VerifyOutcome::CacheHit);
    assert!(ask(&auth, "dev-1", "pw-one-1").await.is_ok());
    assert_eq!(
        metrics().auth_verifications.get(VerifyOutcome::CacheHit),
        hits + 1
    );

    // Rotated by another node (straight in the store): the cached row still answers for up
    // to the TTL, then the new password is the only one.
    let rotated = record("dev-1", "pw-two-2", None).password_hash;
    let changed_at = std::time::Instant::now();
    assert!(store
        .rotate_credential("dev-1", &rotated, Utc::now())
        .await
        .expect("rotate"));
    eventually("the old password refused", || async {
        ask(&auth, "dev-1", "pw-one-1").await.is_err().then_some(())
    })
    .await;
    assert!(changed_at.elapsed() < ttl + Duration::from_secs(5));
    assert!(ask(&auth, "dev-1", "pw-two-2").await.is_ok());

    // Revoked elsewhere: refused within the TTL.
    assert!(store
        .revoke_credential("dev-1", Utc::now())
        .await
        .expect("revoke"));
    eventually("the revoked credential refused", || async {
        (ask(&auth, "dev-1", "pw-two-2").await == Err(Refusal::BadCredentials)).then_some(())
    })
    .await;
    // A user name without a row is not the database's: with no other provider, refused.
    assert_eq!(
        ask(&auth, "dev-9", "pw-two-2").await,
        Err(Refusal::BadCredentials)
    );
}

/// Database credentials that cannot be read (here: no store attached, as while the database
/// is away): CONNACK 0x03, counted as `auth_unavailable`, and not delayed however many come in
/// a row (the client did nothing wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_credentials_are_server_unavailable_without_delay() {
    let auth = AuthConfig {
        database: true,
        ..AuthConfig::default()
    };
    let mut broker = TestBroker::start_with_auth(|_| {}, auth).await;
    for attempt in 0..3 {
        let mut c = RawClient::tcp(broker.addr).await;
        let mut packet = connect_packet(&ConnectOpts::new("dev-1"));
        if let Packet::Connect(connect) = &mut packet {
            connect.set_login("dev-1", "password");
        }
        c.send(&packet).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, ConnectReturnCode::ServiceUnavailable, "{attempt}")
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
    assert_eq!(
        metrics()
            .connections_refused
            .get(RefusalReason::AuthUnavailable),
        3
    );
    assert_eq!(metrics().auth_refusals_delayed.get(), 0);
    broker.no_event_pending();
    broker.stop().await;
}
