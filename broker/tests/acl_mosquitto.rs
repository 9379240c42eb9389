//! Heartwire's ACL decisions equal Mosquitto 2's on the same files: one password file made
//! by Debian's `mosquitto_passwd` and one ACL file (users, deny rules, patterns with `%c` and
//! `%u`, `$` topics), a table of (user, client id, action, topic) cases, each case tried
//! against a real mosquitto process and against Heartwire over MQTT.
//!
//! Write: each identity publishes to every topic at QoS 1; an observer subscribed to
//! everything sees what got through, up to a marker it publishes itself after the last one
//! (both brokers deliver an observer's messages in the order they were routed). Read: each
//! identity subscribes to every topic, the observer publishes to each, and what each
//! identity receives within a quiet period is what it may read (Mosquitto grants every
//! SUBSCRIBE and filters on delivery; Heartwire answers 0x80 to what cannot be read).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use broker::config::AuthConfig;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use rumqttc::mqttbytes::QoS;
use testkit::{mosquitto_passwd, temp_dir, ConnectOpts, Mosquitto, RawClient, TestBroker};

const ACL: &str = "\
# anonymous clients
topic read public/#
topic write anon/in

user alice
topic readwrite alice/#
topic deny alice/secret/#
topic read shared/+/status
topic write shared/alice/cmd

user bob
topic read alice/public
topic readwrite bob/#
topic deny bob/+/private
topic write #

user observer
topic readwrite #
topic readwrite $internal/#

pattern readwrite devices/%c/#
pattern read users/%u/inbox
pattern deny devices/%c/locked
pattern write $internal/%c/#
";

/// Users in the password file (carol has no block of her own in the ACL).
const USERS: [(&str, &str); 4] = [
    ("observer", "observer-pw"),
    ("alice", "alice-pw"),
    ("bob", "bob-pw"),
    ("carol", "carol-pw"),
];

/// Who tries: user name (logged in with its password) or anonymous, and client id.
const IDENTITIES: [(Option<&str>, &str); 9] = [
    (None, "anon1"),
    (Some("alice"), "alice1"),
    (Some("alice"), "dev1"),
    (Some("bob"), "bob1"),
    (Some("carol"), "carol1"),
    (Some("carol"), "dev/2"),
    (None, "+"),
    (Some("alice"), "#"),
    (None, "dev3"),
];

const TOPICS: [&str; 22] = [
    "public/news",
    "anon/in",
    "alice/x",
    "alice/secret/y",
    "shared/1/status",
    "shared/alice/cmd",
    "alice/public",
    "bob/x",
    "bob/a/private",
    "bob/a/open",
    "devices/alice1/up",
    "devices/dev1/up",
    "devices/dev1/locked",
    "devices/dev3/up",
    "devices/carol1/up",
    "devices/dev/2/up",
    "users/alice/inbox",
    "users/carol/inbox",
    "$internal/alice1/x",
    "$internal/dev1/x",
    "$internal/other",
    "other/topic",
];

/// A case: identity index, action, topic.
type Case = (usize, &'static str, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_decisions_equal_mosquittos_on_the_same_files() {
    let dir = temp_dir("acl-diff");
    let passwords = dir.path().join("passwords");
    for (i, (user, password)) in USERS.iter().enumerate() {
        mosquitto_passwd(&passwords, user, password, i == 0);
    }
    let acl_file = dir.path().join("acl");
    std::fs::write(&acl_file, ACL).expect("writing a test file");

    let mosquitto = Mosquitto::start(&format!(
        "allow_anonymous true\npassword_file {}\nacl_file {}\n",
        passwords.display(),
        acl_file.display()
    ))
    .await;
    let theirs = decisions(mosquitto.addr()).await;

    let heartwire = TestBroker::start_with_auth(
        |_| {},
        AuthConfig {
            allow_anonymous: true,
            password_file: Some(passwords.clone()),
            acl_file: Some(acl_file.clone()),
            ..AuthConfig::default()
        },
    )
    .await;
    let ours = decisions(heartwire.addr).await;

    let only_theirs: Vec<_> = theirs.difference(&ours).map(describe).collect();
    let only_ours: Vec<_> = ours.difference(&theirs).map(describe).collect();
    assert!(
        only_theirs.is_empty() && only_ours.is_empty(),
        "allowed by Mosquitto only: {only_theirs:#?}\nallowed by Heartwire only: {only_ours:#?}\n\
         mosquitto log: {}",
        mosquitto.log()
    );
    // The table is not trivial: both answers occur for both actions.
    let total = IDENTITIES.len() * TOPICS.len();
    for action in ["read", "write"] {
        let allowed = ours.iter().filter(|c| c.1 == action).count();
        assert!(
            allowed > 5 && allowed < total - 5,
            "{action}: {allowed} of {total}"
        );
    }
}

fn describe(case: &Case) -> String {
    let (user, id) = IDENTITIES[case.0];
    format!("{} as {:?} (user {:?}): {}", case.1, id, user, case.2)
}

/// Connects to `addr` as `client_id`, logged in as `user`.
async fn connect(addr: SocketAddr, user: Option<&str>, client_id: &str) -> RawClient {
    let mut opts = ConnectOpts::new(client_id);
    if let Some(user) = user {
        let password = USERS
            .iter()
            .find(|(u, _)| *u == user)
            .expect("a known user")
            .1;
        opts = opts.login(user, password);
    }
    let (c, code) = RawClient::connack(addr, opts).await;
    assert_eq!(
        code,
        Some(rumqttc::mqttbytes::v4::ConnectReturnCode::Success),
        "{client_id}"
    );
    c
}

/// Publishes at QoS 1 and waits for the PUBACK (an ACL-refused PUBLISH is acknowledged too);
/// returns the PUBLISHes that arrived meanwhile (acknowledged).
async fn publish(c: &mut RawClient, topic: &str, payload: &[u8], pkid: u16) -> Vec<Publish> {
    c.publish(topic, QoS::AtLeastOnce, false, payload, pkid)
        .await;
    let mut received = Vec::new();
    loop {
        match c.recv().await {
            Some(Packet::PubAck(ack)) if ack.pkid == pkid => return received,
            Some(Packet::Publish(p)) => {
                c.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                received.push(p);
            }
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }
}

/// Every allowed case on the broker at `addr`.
async fn decisions(addr: SocketAddr) -> BTreeSet<Case> {
    let mut allowed = BTreeSet::new();
    let mut observer = connect(addr, Some("observer"), "observer").await;
    subscribe(&mut observer, &["#", "$internal/#"]).await;

    // Write: what reaches the observer.
    for (i, (user, id)) in IDENTITIES.iter().enumerate() {
        let mut c = connect(addr, *user, id).await;
        for (t, topic) in TOPICS.iter().enumerate() {
            let echoed = publish(&mut c, topic, format!("{i}").as_bytes(), t as u16 + 1).await;
            assert!(echoed.is_empty(), "a writer subscribes to nothing");
        }
        c.disconnect().await;
    }
    let mut seen = publish(&mut observer, "zz/marker", b"end", 999)
        .await
        .into_iter();
    loop {
        let p = match seen.next() {
            Some(p) => p,
            None => match observer.recv().await {
                Some(Packet::Publish(p)) => {
                    observer.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                    p
                }
                other => panic!("observer: expected PUBLISH, got {other:?}"),
            },
        };
        if p.topic == "zz/marker" {
            break;
        }
        let i: usize = std::str::from_utf8(&p.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("a writer index as payload");
        let topic = TOPICS
            .iter()
            .find(|t| **t == p.topic)
            .expect("a case topic");
        allowed.insert((i, "write", *topic));
    }

    // Read: what each identity receives of one message per topic.
    let mut readers = Vec::new();
    for (user, id) in IDENTITIES.iter() {
        let mut c = connect(addr, *user, id).await;
        subscribe(&mut c, &TOPICS).await;
        readers.push(c);
    }
    for (t, topic) in TOPICS.iter().enumerate() {
        publish(&mut observer, topic, b"r", t as u16 + 1).await;
    }
    // Nothing marks the end of what a reader may not read: a quiet period does, waited
    // for by all readers at once.
    let tasks: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let mut read = Vec::new();
                while let Ok(packet) =
                    tokio::time::timeout(Duration::from_millis(300), c.recv_untimed()).await
                {
                    match packet {
                        Some(Packet::Publish(p)) => {
                            c.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                            read.push(p.topic);
                        }
                        other => panic!("reader {i}: expected PUBLISH, got {other:?}"),
                    }
                }
                (i, read)
            })
        })
        .collect();
    for task in tasks {
        let (i, read) = task.await.expect("reader task");
        for topic in read {
            let topic = TOPICS.iter().find(|t| **t == topic).expect("a case topic");
            allowed.insert((i, "read", *topic));
        }
    }
    allowed
}

/// Subscribes to `filters` at QoS 1 and waits for the SUBACK.
async fn subscribe(c: &mut RawClient, filters: &[&str]) {
    let mut sub = Subscribe::new_many(
        filters
            .iter()
            .map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
    );
    sub.pkid = 1;
    c.send(&Packet::Subscribe(sub)).await;
    match c.recv().await {
        Some(Packet::SubAck(_)) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
}
