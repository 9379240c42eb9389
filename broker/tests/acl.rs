//! The ACL (`auth.acl_file`, Mosquitto's syntax) enforced: SUBACK 0x80 for what may not be
//! read, PUBLISH to what may not be written acknowledged and dropped, the will checked at
//! CONNECT, retained messages delivered only where readable, `$` topics only by explicit
//! rules, and a reload that removes what is no longer allowed without dropping connections.
//! Named after the Mosquitto CVEs they guard against (../shared/research/security.md).

use std::path::PathBuf;

use broker::config::AuthConfig;
use broker::labels::{AclDenial, RefusalReason};
use broker::metrics::metrics;
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use testkit::{mosquitto_passwd, temp_dir, ConnectOpts, RawClient, TestBroker};

/// Users of every test, made with Debian's mosquitto_passwd (./test.sh installs it).
const USERS: [(&str, &str); 3] = [
    ("admin", "admin-pw"),
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
];

/// The ACL most tests use.
const ACL: &str = "\
# anonymous clients
topic read public/#

user admin
topic readwrite #
topic readwrite $internal/#

user alice
topic readwrite alice/#
topic deny alice/secret
topic read shared/+/status

pattern readwrite devices/%c/#
";

struct Setup {
    broker: TestBroker,
    acl_file: PathBuf,
    _dir: tempfile::TempDir,
}

/// A broker with the users above and the ACL `acl`, anonymous clients allowed.
async fn start(acl: &str) -> Setup {
    let dir = temp_dir("acl");
    let passwords = dir.path().join("passwords");
    for (i, (user, password)) in USERS.iter().enumerate() {
        mosquitto_passwd(&passwords, user, password, i == 0);
    }
    let acl_file = dir.path().join("acl");
    std::fs::write(&acl_file, acl).expect("writing a test file");
    let auth = AuthConfig {
        allow_anonymous: true,
        password_file: Some(passwords),
        acl_file: Some(acl_file.clone()),
        ..AuthConfig::default()
    };
    let broker = TestBroker::start_with_auth(|_| {}, auth).await;
    Setup {
        broker,
        acl_file,
        _dir: dir,
    }
}

/// Connects as `client_id`, logged in as `user` (its password from [`USERS`]) or anonymous.
async fn client(setup: &Setup, client_id: &str, user: Option<&str>) -> RawClient {
    let (c, code) = connect_as(setup, client_id, user, None).await;
    assert_eq!(code, Some(ConnectReturnCode::Success), "{client_id}");
    c
}

async fn connect_as(
    setup: &Setup,
    client_id: &str,
    user: Option<&str>,
    will: Option<&str>,
) -> (RawClient, Option<ConnectReturnCode>) {
    let mut opts = ConnectOpts::new(client_id);
    if let Some(topic) = will {
        opts.will = Some((topic, b"gone", QoS::AtLeastOnce, false));
    }
    if let Some(user) = user {
        opts = opts.login(user, password_of(user));
    }
    RawClient::connack(setup.broker.addr, opts).await
}

fn password_of(user: &str) -> &'static str {
    USERS
        .iter()
        .find(|(u, _)| *u == user)
        .expect("a known user")
        .1
}

/// Subscribes to each filter at QoS 1 in one SUBSCRIBE; the SUBACK's codes.
async fn subscribe(c: &mut RawClient, filters: &[&str]) -> Vec<SubscribeReasonCode> {
    let mut sub =
        Subscribe::new_many(filters.iter().map(|f| {
            rumqttc::mqttbytes::v4::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)
        }));
    sub.pkid = 7;
    c.send(&Packet::Subscribe(sub)).await;
    loop {
        match c.recv().await {
            Some(Packet::SubAck(ack)) => return ack.return_codes,
            // Retained messages of an earlier subscription may still be coming.
            Some(Packet::Publish(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

const GRANTED: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtLeastOnce);

/// Publishes at QoS 1 and waits for the PUBACK.
async fn publish(c: &mut RawClient, topic: &str, payload: &[u8], retain: bool, pkid: u16) {
    c.publish(topic, QoS::AtLeastOnce, retain, payload, pkid)
        .await;
    match c.recv().await {
        Some(Packet::PubAck(ack)) => assert_eq!(ack.pkid, pkid),
        other => panic!("expected PUBACK for {topic}, got {other:?}"),
    }
}

/// The topics `c` receives (acknowledging each) until the message on `marker` arrives.
async fn topics_until(c: &mut RawClient, marker: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match c.recv().await {
            Some(Packet::Publish(p)) => {
                if p.qos == QoS::AtLeastOnce {
                    c.send(&Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid)))
                        .await;
                }
                if p.topic == marker {
                    return seen;
                }
                seen.push(p.topic);
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_get_0x80_or_only_the_readable_messages() {
    let setup = start(ACL).await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    let mut alice = client(&setup, "alice-1", Some("alice")).await;
    let codes = subscribe(
        &mut alice,
        &["alice/#", "bob/#", "#", "shared/+/status", "alice/secret"],
    )
    .await;
    assert_eq!(
        codes,
        [
            GRANTED,
            SubscribeReasonCode::Failure,
            GRANTED,
            GRANTED,
            SubscribeReasonCode::Failure
        ],
        "bob/# and alice/secret may not be read; # only partly"
    );
    let before = metrics().acl_denied.get(AclDenial::Delivery);
    for (i, topic) in [
        "alice/x",
        "alice/secret",
        "bob/y",
        "shared/1/status",
        "shared/1/other",
        "devices/alice-1/up",
        "alice/end",
    ]
    .iter()
    .enumerate()
    {
        publish(&mut admin, topic, b"m", false, i as u16 + 1).await;
    }
    assert_eq!(
        topics_until(&mut alice, "alice/end").await,
        ["alice/x", "shared/1/status", "devices/alice-1/up"],
        "once each, only what alice may read"
    );
    assert!(metrics().acl_denied.get(AclDenial::Delivery) > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_acl_refuses_is_acknowledged_and_dropped() {
    let setup = start(ACL).await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    assert_eq!(subscribe(&mut admin, &["#"]).await, [GRANTED]);
    let mut alice = client(&setup, "alice-1", Some("alice")).await;
    publish(&mut alice, "bob/x", b"forged", false, 1).await;
    publish(&mut alice, "alice/secret", b"no", false, 2).await;
    // QoS 2: PUBREC, as for an accepted one.
    alice
        .publish("shared/1/status", QoS::ExactlyOnce, false, b"read only", 3)
        .await;
    assert!(matches!(alice.recv().await, Some(Packet::PubRec(r)) if r.pkid == 3));
    publish(&mut alice, "alice/ok", b"yes", false, 4).await;
    publish(&mut alice, "devices/alice-1/end", b"", false, 5).await;
    assert_eq!(
        topics_until(&mut admin, "devices/alice-1/end").await,
        ["alice/ok"]
    );
    assert_eq!(metrics().acl_denied.get(AclDenial::Publish), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_the_client_may_not_write_refuses_the_connect() {
    let setup = start(ACL).await;
    let (_c, code) = connect_as(&setup, "alice-1", Some("alice"), Some("bob/will")).await;
    assert_eq!(code, Some(ConnectReturnCode::NotAuthorized));
    assert_eq!(
        metrics()
            .connections_refused
            .get(RefusalReason::WillNotAuthorized),
        1
    );
    let (_c, code) = connect_as(&setup, "alice-1", Some("alice"), Some("alice/will")).await;
    assert_eq!(code, Some(ConnectReturnCode::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_need_rules_of_their_own() {
    let setup = start(ACL).await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    assert_eq!(
        subscribe(&mut admin, &["$internal/#", "$SYS/#"]).await,
        [GRANTED, SubscribeReasonCode::Failure],
        "`#` does not cover $SYS; $internal/# is a rule of its own"
    );
}

/// CVE-2017-7650: a client id (or user name) with `+` or `#` turned `pattern` rules into
/// wildcards and read every device's topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cve_2017_7650_wildcard_client_ids_match_no_pattern() {
    let setup = start(ACL).await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    for id in ["+", "#"] {
        let mut thief = client(&setup, id, None).await;
        assert_eq!(
            subscribe(&mut thief, &["devices/+/up", "devices/#", "public/#"]).await,
            [
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure,
                GRANTED
            ],
            "client id {id}"
        );
        publish(&mut admin, "devices/victim/up", b"secret", false, 1).await;
        publish(&mut admin, "public/end", b"", false, 2).await;
        assert!(topics_until(&mut thief, "public/end").await.is_empty());
        // Nor may it write there.
        publish(&mut thief, "devices/victim/up", b"forged", false, 3).await;
    }
    assert_eq!(metrics().acl_denied.get(AclDenial::Publish), 2);
    // The same pattern still serves an ordinary id.
    let mut device = client(&setup, "victim", None).await;
    assert_eq!(
        subscribe(&mut device, &["devices/victim/#"]).await,
        [GRANTED]
    );
}

/// CVE-2018-12550: an ACL file without rules allowed everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cve_2018_12550_an_empty_acl_denies_everything() {
    let setup = start("# nothing is allowed\n\n").await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    let mut anonymous = client(&setup, "anon", None).await;
    for c in [&mut admin, &mut anonymous] {
        assert_eq!(
            subscribe(c, &["#", "a/b"]).await,
            [SubscribeReasonCode::Failure, SubscribeReasonCode::Failure]
        );
        publish(c, "a/b", b"x", false, 1).await;
    }
    assert_eq!(metrics().acl_denied.get(AclDenial::Publish), 2);
}

/// Retained messages reach a subscriber only where it may read (CVE-2018-12546: they were
/// delivered after read access was revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cve_2018_12546_retained_messages_only_where_readable() {
    let setup = start(ACL).await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    for (i, topic) in ["alice/a", "alice/secret", "bob/b", "public/p"]
        .iter()
        .enumerate()
    {
        publish(&mut admin, topic, b"kept", true, i as u16 + 1).await;
    }
    let mut alice = client(&setup, "alice-1", Some("alice")).await;
    assert_eq!(subscribe(&mut alice, &["#"]).await, [GRANTED]);
    publish(&mut admin, "alice/end", b"", false, 9).await;
    assert_eq!(topics_until(&mut alice, "alice/end").await, ["alice/a"]);
    assert_eq!(metrics().acl_denied.get(AclDenial::Retained), 3);

    // Alice loses alice/#: a new subscription gets SUBACK 0x80 and no retained message.
    std::fs::write(
        &setup.acl_file,
        ACL.replace("topic readwrite alice/#\n", ""),
    )
    .expect("writing the ACL file");
    reload(&setup);
    let mut alice = client(&setup, "alice-2", Some("alice")).await;
    assert_eq!(
        subscribe(&mut alice, &["alice/a", "alice/#"]).await,
        [SubscribeReasonCode::Failure, SubscribeReasonCode::Failure]
    );
    assert_eq!(subscribe(&mut alice, &["shared/+/status"]).await, [GRANTED]);
    publish(&mut admin, "shared/x/status", b"", false, 10).await;
    assert!(topics_until(&mut alice, "shared/x/status").await.is_empty());
}

/// CVE-2021-34434: subscriptions stayed in force after the ACL stopped allowing them. A
/// reload removes them from connected and offline sessions alike; nothing else is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cve_2021_34434_a_reload_removes_subscriptions_no_longer_allowed() {
    let mut setup = start(ACL).await;
    let mut admin = client(&setup, "admin-1", Some("admin")).await;
    let mut alice = client(&setup, "alice-1", Some("alice")).await;
    assert_eq!(
        subscribe(&mut alice, &["alice/#", "shared/+/status"]).await,
        [GRANTED, GRANTED]
    );
    std::fs::write(
        &setup.acl_file,
        ACL.replace("topic readwrite alice/#\n", ""),
    )
    .expect("writing the ACL file");
    let reloaded = reload(&setup);
    assert_eq!((reloaded.sessions, reloaded.revoked), (1, 1));
    assert_eq!(metrics().acl_denied.get(AclDenial::Revoked), 1);
    publish(&mut admin, "alice/x", b"no longer", false, 1).await;
    publish(&mut admin, "shared/1/status", b"still", false, 2).await;
    assert!(
        topics_until(&mut alice, "shared/1/status").await.is_empty(),
        "alice/# is gone, shared/+/status stays, the connection is up"
    );
    // Writing is re-decided too.
    publish(&mut alice, "alice/x", b"", false, 3).await;
    assert_eq!(metrics().acl_denied.get(AclDenial::Publish), 1);
    setup.broker.connected("admin-1").await;
    setup.broker.connected("alice-1").await;
    setup.broker.no_event_pending();
}

/// A bad file on reload keeps the rules in force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_on_reload_keeps_the_rules_in_force() {
    let setup = start(ACL).await;
    std::fs::write(&setup.acl_file, "topic read a\nbogus line\n").expect("writing a test file");
    let error = setup
        .broker
        .mqtt
        .reload_acl()
        .expect_err("a broken file does not load")
        .to_string();
    assert!(error.contains("line 2"), "{error}");
    let mut alice = client(&setup, "alice-1", Some("alice")).await;
    assert_eq!(subscribe(&mut alice, &["alice/#"]).await, [GRANTED]);
}

/// Reloads the ACL file; what the reload did.
fn reload(setup: &Setup) -> broker::mqtt::AclReload {
    setup
        .broker
        .mqtt
        .reload_acl()
        .expect("the ACL file reloads")
        .expect("an ACL file is configured")
}
