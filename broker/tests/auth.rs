//! Authentication at CONNECT: Mosquitto password files made by Debian's `mosquitto_passwd`,
//! CONNACK 0x04 and 0x05 counted by reason, the credential cache, client ids bound to user
//! names, and reloading the password file; a refused client never disturbs the device connected
//! under the id it claims.

use std::path::Path;

use broker::config::{AuthConfig, ClientIdBinding};
use broker::event::ConnectionEvent;
use broker::labels::{AuthMethod, RefusalReason, VerifyOutcome};
use broker::metrics::metrics;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use testkit::{mosquitto_passwd, temp_dir, ConnectOpts, RawClient, TestBroker};

/// The MQTT layer checking credentials against the password file at `file`.
async fn with_password_file(file: &Path, bind_client_id: ClientIdBinding) -> TestBroker {
    let auth = AuthConfig {
        password_file: Some(file.to_owned()),
        bind_client_id,
        ..AuthConfig::default()
    };
    TestBroker::start_with_auth(|_| {}, auth).await
}

/// CONNECT as `client_id` with `login`; the CONNACK's return code (`None`: closed without one).
async fn connack(
    broker: &TestBroker,
    client_id: &str,
    login: Option<(&str, &str)>,
) -> (RawClient, Option<ConnectReturnCode>) {
    let mut opts = ConnectOpts::new(client_id);
    opts.login = login;
    RawClient::connack(broker.addr, opts).await
}

/// The user name and method a Connected event records.
fn authenticated(event: ConnectionEvent) -> (Option<String>, AuthMethod) {
    match event {
        ConnectionEvent::Connected {
            username,
            auth_method,
            ..
        } => (username, auth_method),
        other => panic!("expected Connected, got {other:?}"),
    }
}

fn refusals(reason: RefusalReason) -> u64 {
    metrics().connections_refused.get(reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_password_files_decide_who_connects() {
    let dir = temp_dir("auth");
    let file = dir.path().join("passwords");
    mosquitto_passwd(&file, "sensor-1", "s3cret", true);
    mosquitto_passwd(&file, "sensor-2", "other", false);
    let mut broker = with_password_file(&file, ClientIdBinding::None).await;

    let (_ok, code) = connack(&broker, "sensor-1", Some(("sensor-1", "s3cret"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    assert_eq!(
        authenticated(broker.connected("sensor-1").await),
        (Some("sensor-1".to_owned()), AuthMethod::Password)
    );
    assert_eq!(metrics().auth_verifications.get(VerifyOutcome::Verified), 1);

    // Wrong password, unknown user: 0x04; no credentials: 0x05. No session, no event.
    let bad = refusals(RefusalReason::BadCredentials);
    let (_, code) = connack(&broker, "intruder", Some(("sensor-2", "guess"))).await;
    assert_eq!(code, Some(ConnectReturnCode::BadUserNamePassword));
    let (_, code) = connack(&broker, "intruder", Some(("nobody", "x"))).await;
    assert_eq!(code, Some(ConnectReturnCode::BadUserNamePassword));
    assert_eq!(refusals(RefusalReason::BadCredentials), bad + 2);
    let unauthorized = refusals(RefusalReason::NotAuthorized);
    let (_, code) = connack(&broker, "anonymous", None).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    assert_eq!(refusals(RefusalReason::NotAuthorized), unauthorized + 1);
    broker.no_event_pending();

    // A known device reconnecting: from the credential cache, no hashing.
    let (_again, code) = connack(&broker, "sensor-1b", Some(("sensor-1", "s3cret"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    broker.connected("sensor-1b").await;
    assert_eq!(metrics().auth_verifications.get(VerifyOutcome::CacheHit), 1);

    // A user added and the file reloaded: the new user connects; a broken file keeps the old.
    mosquitto_passwd(&file, "sensor-3", "new", false);
    assert!(broker.auth.reload().expect("reload"));
    let (_new, code) = connack(&broker, "sensor-3", Some(("sensor-3", "new"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    broker.connected("sensor-3").await;
    std::fs::write(&file, "sensor-1:not-a-hash\n").expect("write");
    let error = broker.auth.reload().expect_err("a malformed line");
    assert!(error.to_string().contains("line 1"), "{error}");
    assert!(!error.to_string().contains("not-a-hash"), "{error}");
    let (_still, code) = connack(&broker, "sensor-3b", Some(("sensor-3", "new"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_by_a_foreign_client_id_is_refused_and_the_device_untouched() {
    let dir = temp_dir("auth-bind");
    let file = dir.path().join("passwords");
    mosquitto_passwd(&file, "valve-1", "one", true);
    mosquitto_passwd(&file, "valve-2", "two", false);
    let mut broker = with_password_file(&file, ClientIdBinding::Username).await;
    let (mut valve_2, code) = connack(&broker, "valve-2", Some(("valve-2", "two"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    broker.connected("valve-2").await;

    // valve-1's valid credentials do not let it take valve-2's id: 0x05, valve-2 untouched.
    let (_, code) = connack(&broker, "valve-2", Some(("valve-1", "one"))).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    broker.no_event_pending();
    valve_2.send(&Packet::PingReq).await;
    assert!(matches!(valve_2.recv().await, Some(Packet::PingResp)));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_authentication_on_loopback_anyone_connects() {
    let mut broker = TestBroker::start().await;
    let (_c, code) = connack(&broker, "local", Some(("whoever", "whatever"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    // No password was checked: the user name it gave is not recorded as authenticated.
    assert_eq!(
        authenticated(broker.connected("local").await),
        (None, AuthMethod::Anonymous)
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_in_a_row_are_answered_later_and_later() {
    let dir = temp_dir("auth-delay");
    let file = dir.path().join("passwords");
    mosquitto_passwd(&file, "pump-1", "right", true);
    let mut broker = with_password_file(&file, ClientIdBinding::None).await;
    // The first refusal at once, then 200 ms, 400 ms: the n-th waits at least 200 ms x 2^(n-2).
    for (attempt, at_least_ms) in [(1u32, 0u64), (2, 200), (3, 400)] {
        let started = std::time::Instant::now();
        let (_, code) = connack(&broker, "pump-1", Some(("pump-1", "wrong"))).await;
        assert_eq!(code, Some(ConnectReturnCode::BadUserNamePassword));
        let waited = started.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(at_least_ms),
            "attempt {attempt} answered after {waited:?}"
        );
    }
    assert_eq!(metrics().auth_refusals_delayed.get(), 2);
    // The right password is accepted (and not delayed: delays apply to refusals only).
    let (_c, code) = connack(&broker, "pump-1", Some(("pump-1", "right"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    broker.connected("pump-1").await;
    broker.stop().await;
}

/// CVE-2018-12551: Mosquitto skipped a password-file line it could not read, and a malformed
/// line let anyone in. Here such a file stops the start naming the line, and a reload to it
/// keeps the file in force: the malformed user never gets in, the others still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cve_2018_12551_a_malformed_password_line_lets_nobody_in() {
    let dir = temp_dir("auth-malformed");
    let file = dir.path().join("passwords");
    mosquitto_passwd(&file, "good", "pw", true);
    let valid = std::fs::read_to_string(&file).expect("reading a test file");
    let broken = format!("{valid}mallory\nmallory:\n");
    let broken_file = dir.path().join("broken");
    std::fs::write(&broken_file, &broken).expect("writing a test file");
    let error = broker::auth::Auth::new(&AuthConfig {
        password_file: Some(broken_file),
        ..AuthConfig::default()
    })
    .err()
    .expect("a malformed line fails the load")
    .to_string();
    assert!(error.contains("line 2"), "{error}");
    assert!(
        !error.contains("mallory"),
        "the line's contents stay out: {error}"
    );

    let broker = with_password_file(&file, ClientIdBinding::None).await;
    std::fs::write(&file, &broken).expect("writing a test file");
    assert!(broker.auth.reload().is_err(), "the reload fails");
    for password in ["", "x"] {
        let (_, code) = connack(&broker, "m", Some(("mallory", password))).await;
        assert_eq!(code, Some(ConnectReturnCode::BadUserNamePassword));
    }
    let (_, code) = connack(&broker, "g", Some(("good", "pw"))).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
    broker.stop().await;
}
