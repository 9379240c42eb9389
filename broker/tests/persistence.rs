//! Durable broker state with real processes: the broker binary is killed with SIGKILL at a
//! random moment while a publisher sends QoS 1 messages (retained, and queued for an offline
//! persistent session), then started again on the same directory. Every message the publisher
//! got a PUBACK for must reach the persistent session (at least once, in order), and the
//! retained value must be the last acknowledged one or a later one. The same after a clean
//! shutdown (SIGTERM).

use std::time::Duration;

use rumqttc::mqttbytes::v4::{Packet, PubComp, PubRec, PubRel};
use rumqttc::mqttbytes::QoS;
use testkit::{BrokerProcess, ConnectOpts, RawClient, WAIT};

const BROKER: &str = env!("CARGO_BIN_EXE_broker");
/// Kill-and-restart rounds.
const ROUNDS: usize = 20;
/// PUBLISHes in flight at once (sent before their PUBACKs are read).
const WINDOW: usize = 32;
const SUBSCRIBER: &str = "crash-sub";
const TOPIC: &str = "crash/data";

async fn start(data: &testkit::TempDir) -> BrokerProcess {
    BrokerProcess::start(BROKER, data.path(), &[]).await
}

/// A small random number generator, seeded from the clock (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// Publishes QoS 1 retained messages numbered from `*next` in windows of [`WINDOW`], reading
/// the PUBACKs of each window, until the broker goes away or `limit` messages were sent.
/// Returns the numbers acknowledged.
async fn publish_until_gone(addr: std::net::SocketAddr, next: &mut u64, limit: u64) -> Vec<u64> {
    let mut acked = Vec::new();
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return acked;
    };
    let (mut c, _) = RawClient::over(stream)
        .handshake(ConnectOpts::new("crash-pub"))
        .await;
    let end = *next + limit;
    while *next < end {
        let first = *next;
        let mut sent = Vec::new();
        for _ in 0..WINDOW {
            let seq = *next;
            let pkid = (seq % 65_000 + 1) as u16;
            let mut p = rumqttc::mqttbytes::v4::Publish::new(
                TOPIC,
                QoS::AtLeastOnce,
                seq.to_string().into_bytes(),
            );
            p.retain = true;
            p.pkid = pkid;
            let bytes = testkit::encode(&Packet::Publish(p));
            if tokio::io::AsyncWriteExt::write_all(&mut c.stream, &bytes)
                .await
                .is_err()
            {
                return acked;
            }
            sent.push((pkid, seq));
            *next += 1;
        }
        let mut waiting = sent.len();
        while waiting > 0 {
            match tokio::time::timeout(WAIT, c.recv_untimed()).await {
                Ok(Some(Packet::PubAck(ack))) => {
                    let seq = sent
                        .iter()
                        .find(|(pkid, _)| *pkid == ack.pkid)
                        .map(|(_, seq)| *seq)
                        .expect("PUBACK for a packet id in flight");
                    acked.push(seq);
                    waiting -= 1;
                }
                Ok(Some(other)) => panic!("unexpected {other:?}"),
                Ok(None) => return acked,
                Err(_) => panic!("no PUBACK within {WAIT:?} (messages {first}..)"),
            }
        }
    }
    acked
}

/// Connects the persistent subscriber and reads its queued messages (acknowledging each)
/// until every number in `acked` came and nothing more arrives for a moment. Returns the
/// numbers in the order they came.
async fn drain(addr: std::net::SocketAddr, acked: &[u64]) -> Vec<u64> {
    let mut opts = ConnectOpts::new(SUBSCRIBER);
    opts.clean_session = false;
    let (mut c, present) = RawClient::connect(addr, opts).await;
    assert!(present, "the persistent session survived");
    let mut got = Vec::new();
    let mut missing: std::collections::HashSet<u64> = acked.iter().copied().collect();
    loop {
        let quiet = if missing.is_empty() {
            Duration::from_millis(300)
        } else {
            WAIT
        };
        match tokio::time::timeout(quiet, c.recv_untimed()).await {
            Ok(Some(Packet::Publish(p))) => {
                let seq: u64 = std::str::from_utf8(&p.payload)
                    .expect("utf-8")
                    .parse()
                    .expect("a number");
                missing.remove(&seq);
                got.push(seq);
                let ack = rumqttc::mqttbytes::v4::PubAck::new(p.pkid);
                c.send(&Packet::PubAck(ack)).await;
            }
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) if missing.is_empty() => break,
            Err(_) => panic!(
                "acknowledged messages never delivered: {} of them, first {:?}",
                missing.len(),
                missing.iter().min()
            ),
        }
    }
    c.disconnect().await;
    got
}

/// The retained value of [`TOPIC`], read by a new clean subscriber.
async fn retained(addr: std::net::SocketAddr) -> Option<u64> {
    let (mut c, _) = RawClient::connect(addr, ConnectOpts::new("crash-reader")).await;
    c.subscribe(TOPIC, QoS::AtLeastOnce).await;
    let value = match tokio::time::timeout(Duration::from_secs(2), c.recv_untimed()).await {
        Ok(Some(Packet::Publish(p))) => {
            assert!(p.retain);
            Some(
                std::str::from_utf8(&p.payload)
                    .expect("utf-8")
                    .parse()
                    .expect("a number"),
            )
        }
        _ => None,
    };
    c.disconnect().await;
    value
}

/// The presence API shows the restored persistent session of `client_id`, connected when the
/// broker was killed, as held by the device, now offline (the restart's recovery closed its
/// connection and cleared what the killed boot held, then held the restored session again).
async fn held_in_presence(broker: &BrokerProcess, client_id: &str) {
    let path = format!("/api/v1/devices/{client_id}");
    testkit::eventually("the restored session held in presence", || async {
        let body = testkit::http_get(broker.http, &path).await?;
        let device: serde_json::Value = serde_json::from_str(&body).ok()?;
        (device["online"] == false && !device["session_expires_at"].is_null()).then_some(())
    })
    .await;
}

/// A persistent session whose expiry passes while the broker is down ends at the restart:
/// counted as expired, and its presence row is marked expired at its expiry (the device no
/// longer shown as holding it).
#[tokio::test]
async fn a_session_that_expires_while_the_broker_is_down_is_recorded_expired() {
    let data = testkit::temp_dir("persistence-expired-down");
    let env = [("BROKER_MQTT__PERSISTENT_SESSION_EXPIRY", "3s")];
    let broker = BrokerProcess::start(BROKER, data.path(), &env).await;
    subscribe_and_leave(broker.mqtt, "gone-while-down", "gone/#").await;
    // Held in presence (so that the restart has something to end), then killed well before
    // the session expires.
    let expires_at = testkit::eventually("the session held in presence", || async {
        let body = testkit::http_get(broker.http, "/api/v1/devices/gone-while-down").await?;
        let device: serde_json::Value = serde_json::from_str(&body).ok()?;
        let at = device["session_expires_at"].as_str()?;
        chrono::DateTime::parse_from_rfc3339(at).ok()
    })
    .await;
    broker.kill().await;
    let left = (expires_at.to_utc() - chrono::Utc::now()).to_std();
    assert!(
        left.is_ok(),
        "the session expired before the broker was killed"
    );
    // Down until the session's expiry has passed.
    tokio::time::sleep(left.unwrap_or_default() + Duration::from_millis(100)).await;

    let broker = BrokerProcess::start(BROKER, data.path(), &env).await;
    let metrics = testkit::http_get(broker.http, "/metrics")
        .await
        .expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "heartwire_sessions_expired_total 1"),
        "the restart counts the session expired"
    );
    let path = "/api/v1/devices/gone-while-down/sessions";
    let session = testkit::eventually("the session marked expired in presence", || async {
        let body = testkit::http_get(broker.http, path).await?;
        let body: serde_json::Value = serde_json::from_str(&body).ok()?;
        let session = body["sessions"][0].clone();
        (!session["expired_at"].is_null()).then_some(session)
    })
    .await;
    let expired_at = session["expired_at"].as_str().expect("expired_at");
    let expired_at = chrono::DateTime::parse_from_rfc3339(expired_at).expect("a time");
    assert_eq!(expired_at, expires_at, "expired at its expiry");
    let body = testkit::http_get(broker.http, "/api/v1/devices/gone-while-down")
        .await
        .expect("device");
    let device: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(device["session_expires_at"].is_null(), "no longer held");
    // Its client finds no session.
    let mut opts = ConnectOpts::new("gone-while-down");
    opts.clean_session = false;
    let (_c, session_present) = RawClient::connect(broker.mqtt, opts).await;
    assert!(!session_present);
    broker.terminate().await;
}

/// QoS 2 across `kill -9`, exactly once both ways. Inbound: a publisher's PUBLISH answered
/// with PUBREC is not routed again when the publisher, back after the kill, sends it once more
/// (DUP), and its PUBREL is completed. Outbound: a subscriber that sent PUBREC for a delivery
/// gets the broker's PUBREL again after the kill, with the same packet id, and never the
/// message a second time.
#[tokio::test]
async fn qos2_exchanges_survive_kill_9_exactly_once_both_ways() {
    let data = testkit::temp_dir("persistence-qos2");
    let broker = start(&data).await;
    let persistent = |id| {
        let mut opts = ConnectOpts::new(id);
        opts.clean_session = false;
        opts
    };
    let (mut sub, _) = RawClient::connect(broker.mqtt, persistent("q2-sub")).await;
    sub.subscribe("q2/#", QoS::ExactlyOnce).await;
    let (mut publisher, _) = RawClient::connect(broker.mqtt, persistent("q2-pub")).await;
    publisher
        .publish("q2/a", QoS::ExactlyOnce, false, b"once", 5)
        .await;
    match publisher.recv().await {
        Some(Packet::PubRec(rec)) => assert_eq!(rec.pkid, 5),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    let delivered = match sub.recv().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!(
        (delivered.qos, &delivered.payload[..]),
        (QoS::ExactlyOnce, &b"once"[..])
    );
    sub.send(&Packet::PubRec(PubRec::new(delivered.pkid))).await;
    match sub.recv().await {
        Some(Packet::PubRel(rel)) => assert_eq!(rel.pkid, delivered.pkid),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // A SUBACK waits until what came before it is durable: the PUBREL's state included.
    sub.subscribe("q2-flush", QoS::AtMostOnce).await;
    broker.kill().await;

    let broker = start(&data).await;
    // The publisher did not see its PUBREC (as far as the broker knows): it sends the PUBLISH
    // again, which is acknowledged and not routed a second time, then releases it.
    let (mut publisher, present) = RawClient::connect(broker.mqtt, persistent("q2-pub")).await;
    assert!(present, "the publisher's session outlived the kill");
    let mut again =
        rumqttc::mqttbytes::v4::Publish::new("q2/a", QoS::ExactlyOnce, b"once".to_vec());
    again.pkid = 5;
    again.dup = true;
    publisher.send(&Packet::Publish(again)).await;
    match publisher.recv().await {
        Some(Packet::PubRec(rec)) => assert_eq!(rec.pkid, 5),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    publisher.send(&Packet::PubRel(PubRel::new(5))).await;
    match publisher.recv().await {
        Some(Packet::PubComp(comp)) => assert_eq!(comp.pkid, 5),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // The subscriber gets the PUBREL again, not the message.
    let (mut sub, present) = RawClient::connect(broker.mqtt, persistent("q2-sub")).await;
    assert!(present, "the subscriber's session outlived the kill");
    match sub.recv().await {
        Some(Packet::PubRel(rel)) => assert_eq!(rel.pkid, delivered.pkid),
        other => panic!("expected the PUBREL again, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubComp::new(delivered.pkid)))
        .await;
    let more = tokio::time::timeout(Duration::from_millis(300), sub.recv_untimed()).await;
    assert!(more.is_err(), "exactly once: {more:?}");
    broker.terminate().await;
}

/// Checks one round: every acknowledged message came, first deliveries in publish order, and
/// the retained value is the last acknowledged one or later.
fn check(round: &str, acked: &[u64], got: &[u64], retained: Option<u64>) {
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<u64> = got.iter().copied().filter(|s| seen.insert(*s)).collect();
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "{round}: delivered out of order: {firsts:?}"
    );
    if let Some(last) = acked.iter().max() {
        let value = retained.unwrap_or_else(|| panic!("{round}: retained message lost"));
        assert!(
            value >= *last,
            "{round}: retained value {value} is older than the last acknowledged {last}"
        );
    }
}

#[tokio::test]
async fn acknowledged_messages_and_retained_values_survive_kill_9_and_clean_shutdown() {
    let data = testkit::temp_dir("persistence-crash");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    eprintln!("seed {seed}");
    let mut rng = Rng(seed);

    let mut broker = start(&data).await;
    // The persistent subscriber: subscribed, then away while messages are published.
    subscribe_and_leave(broker.mqtt, SUBSCRIBER, "crash/#").await;
    // A persistent client connected when the broker is first killed.
    let mut opts = ConnectOpts::new("crash-online");
    opts.clean_session = false;
    let (mut c, _) = RawClient::connect(broker.mqtt, opts).await;
    c.subscribe("elsewhere", QoS::AtLeastOnce).await;
    let mut online = Some(c);
    // Its connection is in the presence store before the kill (an event the bridge has not
    // written yet would die with the process: that is the presence pipeline's window).
    testkit::eventually("crash-online connected in presence", || async {
        let body = testkit::http_get(broker.http, "/api/v1/devices/crash-online").await?;
        let device: serde_json::Value = serde_json::from_str(&body).ok()?;
        (device["online"] == true).then_some(())
    })
    .await;

    let mut next = 1u64;
    let mut total_acked = 0;
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(10 + rng.next(250));
        let pid = broker.pid();
        let killer = tokio::spawn(async move {
            tokio::time::sleep(kill_after).await;
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        });
        // Below the session's queue limit (mqtt.max_queued_messages, 1000), where a message
        // would be dropped for the subscriber (and counted) rather than queued.
        let acked = publish_until_gone(broker.mqtt, &mut next, 20 * WINDOW as u64).await;
        killer.await.expect("killer");
        let status = broker.exited().await;
        assert!(!status.success(), "round {round}: killed, not exited");
        total_acked += acked.len();

        broker = start(&data).await;
        let got = drain(broker.mqtt, &acked).await;
        eprintln!(
            "round {round}: killed after {kill_after:?}, {} acknowledged, {} delivered",
            acked.len(),
            got.len()
        );
        let value = retained(broker.mqtt).await;
        check(&format!("round {round}"), &acked, &got, value);
        if round == 0 {
            // Connected when the broker was killed: offline now, its session held.
            drop(online.take());
            held_in_presence(&broker, "crash-online").await;
        }
    }
    assert!(
        total_acked > ROUNDS * WINDOW,
        "the rounds acknowledged too little to prove anything ({total_acked})"
    );

    // A clean shutdown keeps everything too.
    let acked = publish_until_gone(broker.mqtt, &mut next, 10 * WINDOW as u64).await;
    assert_eq!(acked.len(), 10 * WINDOW);
    broker.terminate().await;
    let broker = start(&data).await;
    let got = drain(broker.mqtt, &acked).await;
    assert_eq!(
        got.len(),
        acked.len(),
        "nothing unacknowledged was in flight"
    );
    check("clean shutdown", &acked, &got, retained(broker.mqtt).await);
}

/// A backup taken while the broker runs holds what was acknowledged before it and nothing
/// after; `broker restore` makes it the state of an empty directory, and a broker started on
/// that directory serves it.
#[tokio::test]
async fn a_backup_taken_while_running_restores_with_broker_restore() {
    let data = testkit::temp_dir("persistence-backup");
    let broker = start(&data).await;
    subscribe_and_leave(broker.mqtt, SUBSCRIBER, "crash/#").await;
    let mut next = 1;
    let before = publish_until_gone(broker.mqtt, &mut next, 2 * WINDOW as u64).await;
    assert_eq!(before.len(), 2 * WINDOW);

    let answer =
        testkit::http_request(broker.http, "POST", "/api/v1/admin/state/backup", &[], None)
            .await
            .expect("an answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body: serde_json::Value = serde_json::from_str(&answer.body).expect("JSON");
    let backup = body["path"].as_str().expect("path").to_owned();
    assert!(body["bytes"].as_u64().expect("bytes") > 0, "{body}");

    // After the backup: not in it.
    let after = publish_until_gone(broker.mqtt, &mut next, WINDOW as u64).await;
    assert_eq!(after.len(), WINDOW);
    broker.terminate().await;

    // The backup lives under the state directory: keep it aside, start a state anew from it.
    let saved = data.path().join("backup.hwstate");
    std::fs::rename(&backup, &saved).expect("keep the backup");
    std::fs::rename(data.path().join("state"), data.path().join("state-old")).expect("move");
    let out = restore(&saved, data.path().join("state")).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 persistent sessions, 64 queued messages, 1 retained messages"),
        "{stdout}"
    );
    // A second restore into the same directory is refused.
    let again = restore(&saved, data.path().join("state")).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds broker state"));

    let broker = start(&data).await;
    let got = drain(broker.mqtt, &before).await;
    assert_eq!(
        got, before,
        "exactly what was acknowledged before the backup"
    );
    assert_eq!(retained(broker.mqtt).await, before.last().copied());
}

/// Connects `client_id` with a persistent session, subscribes it to `filter` at QoS 1 and
/// leaves: its session queues what comes meanwhile.
async fn subscribe_and_leave(addr: std::net::SocketAddr, client_id: &str, filter: &str) {
    let mut opts = ConnectOpts::new(client_id);
    opts.clean_session = false;
    let (mut c, _) = RawClient::connect(addr, opts).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c.disconnect().await;
}

/// Runs `broker restore BACKUP --dir DIR`.
async fn restore(
    backup: &std::path::Path,
    dir: impl AsRef<std::path::Path>,
) -> std::process::Output {
    tokio::process::Command::new(BROKER)
        .arg("restore")
        .arg(backup)
        .arg("--dir")
        .arg(dir.as_ref())
        .output()
        .await
        .expect("run broker restore")
}

/// The files in `dir` whose names end with `suffix`, sorted (oldest first).
fn backups(dir: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.to_string_lossy().ends_with(suffix));
    files.sort();
    files
}

/// With `persistence.backup_interval`, backups are written on schedule into
/// `persistence.backup_dir` and the scheduled ones are pruned to `persistence.backup_keep`;
/// a backup taken on request is kept; the API lists them and downloads one, which restores
/// what was acknowledged before it.
#[tokio::test]
async fn scheduled_backups_are_written_pruned_listed_downloaded_and_restore() {
    let data = testkit::temp_dir("persistence-scheduled-backup");
    let dir = data.path().join("elsewhere");
    let dir_env = dir.to_string_lossy().into_owned();
    let env = [
        ("BROKER_PERSISTENCE__BACKUP_DIR", dir_env.as_str()),
        ("BROKER_PERSISTENCE__BACKUP_INTERVAL", "1s"),
        ("BROKER_PERSISTENCE__BACKUP_KEEP", "2"),
    ];
    let broker = BrokerProcess::start(BROKER, data.path(), &env).await;
    let mut next = 1;
    let acked = publish_until_gone(broker.mqtt, &mut next, WINDOW as u64).await;
    assert_eq!(acked.len(), WINDOW);
    let answer =
        testkit::http_request(broker.http, "POST", "/api/v1/admin/state/backup", &[], None)
            .await
            .expect("an answer");
    assert_eq!(answer.status, 200, "{}", answer.body);
    // Three scheduled backups written (the counter includes the requested one), two kept.
    testkit::eventually("three scheduled backups, two kept", || async {
        let metrics = testkit::http_get(broker.http, "/metrics").await?;
        let written: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("heartwire_state_backups_total{outcome=\"written\"} "))?
            .parse()
            .ok()?;
        (written >= 4 && backups(&dir, "-scheduled.hwstate").len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        backups(&dir, "Z.hwstate").len(),
        1,
        "the requested one is kept"
    );

    // The API lists them newest first and downloads one, byte for byte.
    let list = testkit::http_get(broker.http, "/api/v1/admin/state/backups")
        .await
        .expect("list");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let listed: Vec<(&str, bool)> = list["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| (b["name"].as_str().expect("name"), b["scheduled"] == true))
        .collect();
    assert!(listed.windows(2).all(|w| w[0].0 > w[1].0), "{list}");
    assert_eq!(
        listed.iter().filter(|(_, scheduled)| !*scheduled).count(),
        1
    );
    // Three only between a new scheduled backup and its pruning.
    let scheduled = listed.iter().filter(|(_, scheduled)| *scheduled).count();
    assert!((2..=3).contains(&scheduled), "{list}");
    let newest = backups(&dir, "-scheduled.hwstate").pop().expect("a backup");
    let name = newest.file_name().and_then(|n| n.to_str()).expect("name");
    let downloaded = testkit::http_download(
        broker.http,
        &format!("/api/v1/admin/state/backups/{name}"),
        &[],
    )
    .await
    .expect("downloaded");
    assert_eq!(downloaded, std::fs::read(&newest).expect("read"));
    for (path, status) in [
        ("state-..%2F..%2Fstate%2FLOCK.hwstate", 400),
        ("state-20000101T000000.000Z.hwstate", 404),
    ] {
        let path = format!("/api/v1/admin/state/backups/{path}");
        let answer = testkit::http_response(broker.http, &path)
            .await
            .expect("answer");
        assert_eq!(answer.status, status, "{path}: {}", answer.body);
    }
    broker.terminate().await;

    // The downloaded backup holds every message acknowledged before it.
    let saved = data.path().join("downloaded.hwstate");
    std::fs::write(&saved, downloaded).expect("save");
    let out = restore(&saved, data.path().join("restored")).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("1 retained messages"), "{stdout}");
}

/// A persistent session restored at start obeys its client's access rules before the client
/// is back: a subscription the ACL lets it read only part of gets only that part queued.
#[tokio::test]
async fn a_restored_session_obeys_its_clients_access_rules_while_it_is_away() {
    let data = testkit::temp_dir("persistence-acl");
    let passwords = data.path().join("passwords");
    for (user, create) in [("alice", true), ("bob", false)] {
        let mut passwd = tokio::process::Command::new(BROKER);
        passwd.arg("passwd");
        if create {
            passwd.arg("-c");
        }
        let status = passwd
            .arg("-b")
            .arg(&passwords)
            .arg(user)
            .arg("secret")
            .status()
            .await
            .expect("broker passwd");
        assert!(status.success());
    }
    let acl = data.path().join("acl");
    std::fs::write(
        &acl,
        "user alice\ntopic read a/#\n\nuser bob\ntopic write #\n",
    )
    .expect("acl");
    let (passwords, acl) = (
        passwords.to_str().expect("utf-8").to_owned(),
        acl.to_str().expect("utf-8").to_owned(),
    );
    let env = [
        ("BROKER_AUTH__PASSWORD_FILE", passwords.as_str()),
        ("BROKER_AUTH__ACL_FILE", acl.as_str()),
    ];
    let broker = BrokerProcess::start(BROKER, data.path(), &env).await;
    // Alice may read a/# only: her subscription to # is checked message by message.
    let mut opts = ConnectOpts::new("alice-device").login("alice", "secret");
    opts.clean_session = false;
    let (mut alice, _) = RawClient::connect(broker.mqtt, opts).await;
    alice.subscribe("#", QoS::AtLeastOnce).await;
    alice.disconnect().await;
    broker.kill().await;

    // Restored before Alice is back; Bob publishes to a topic she may read and one she may not.
    let broker = BrokerProcess::start(BROKER, data.path(), &env).await;
    let (mut bob, _) =
        RawClient::connect(broker.mqtt, ConnectOpts::new("bob").login("bob", "secret")).await;
    for (pkid, topic) in [(1, "b/secret"), (2, "a/ok")] {
        bob.publish(topic, QoS::AtLeastOnce, false, b"x", pkid)
            .await;
        assert!(matches!(bob.recv().await, Some(Packet::PubAck(_))));
    }
    let mut opts = ConnectOpts::new("alice-device").login("alice", "secret");
    opts.clean_session = false;
    let (mut alice, present) = RawClient::connect(broker.mqtt, opts).await;
    assert!(present);
    let mut topics = Vec::new();
    while let Ok(Some(Packet::Publish(p))) =
        tokio::time::timeout(Duration::from_millis(500), alice.recv_untimed()).await
    {
        topics.push(p.topic.clone());
        alice
            .send(&Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid)))
            .await;
    }
    assert_eq!(
        topics,
        ["a/ok"],
        "only what the ACL lets her read was queued"
    );
}

/// Reads one packet's fixed-header byte and body from `stream`.
async fn read_raw(stream: &mut tokio::net::TcpStream) -> Option<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let byte1 = stream.read_u8().await.ok()?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = stream.read_u8().await.ok()?;
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((byte1, body))
}

/// Past `persistence.max_disk`, new state is refused: an MQTT 5 publisher gets PUBACK 0x97,
/// an MQTT 3.1.1 publisher gets no PUBACK until compaction has freed space (here: once the
/// persistent session's client took its queue).
#[tokio::test]
async fn past_the_disk_budget_mqtt5_gets_0x97_and_mqtt311_waits_until_space_is_freed() {
    use tokio::io::AsyncWriteExt;
    let data = testkit::temp_dir("persistence-budget");
    let env = [
        ("BROKER_PERSISTENCE__SEGMENT_BYTES", "1048576"),
        ("BROKER_PERSISTENCE__MAX_DISK", "2097152"),
        // The session's queue holds more than the budget.
        ("BROKER_MQTT__MAX_QUEUED_BYTES", "16777216"),
    ];
    let broker = BrokerProcess::start(BROKER, data.path(), &env).await;
    subscribe_and_leave(broker.mqtt, "budget-sub", "full/#").await;

    // MQTT 5: 16 KiB messages until the budget refuses one.
    let mut v5 = tokio::net::TcpStream::connect(broker.mqtt)
        .await
        .expect("connect");
    v5.write_all(&testkit::fuzz5::connect())
        .await
        .expect("write");
    let (connack, _) = read_raw(&mut v5).await.expect("CONNACK");
    assert_eq!(connack, 0x20);
    let payload = vec![b'x'; 16 * 1024];
    let mut refused = None;
    for pkid in 1..=600u16 {
        let mut body = Vec::new();
        testkit::fuzz5::string(&mut body, b"full/v5");
        body.extend_from_slice(&pkid.to_be_bytes());
        body.push(0); // no properties
        body.extend_from_slice(&payload);
        v5.write_all(&testkit::fuzz5::packet(0x32, &body))
            .await
            .expect("write");
        let (kind, ack) = read_raw(&mut v5).await.expect("PUBACK");
        assert_eq!(kind, 0x40);
        assert_eq!(u16::from_be_bytes([ack[0], ack[1]]), pkid);
        if ack.get(2) == Some(&0x97) {
            refused = Some(pkid);
            break;
        }
    }
    let refused = refused.expect("PUBACK 0x97 once past persistence.max_disk");
    assert!(
        refused > 100,
        "refused only past 2 MiB: at message {refused}"
    );

    // MQTT 3.1.1: held without a PUBACK while over the budget. A compaction that ran since the
    // refusal may have brought the state just under it (the snapshot is a little smaller than
    // the logs it replaces): then the next messages fill it again, and one is held.
    let (mut pub311, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("budget-pub")).await;
    let mut held = None;
    for pkid in 1..=64u16 {
        pub311
            .publish("full/311", QoS::AtLeastOnce, false, &payload, pkid)
            .await;
        match tokio::time::timeout(Duration::from_millis(500), pub311.recv_untimed()).await {
            Ok(Some(Packet::PubAck(ack))) => assert_eq!(ack.pkid, pkid),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {
                held = Some(pkid);
                break;
            }
        }
    }
    let held = held.expect("a PUBLISH held without a PUBACK while over the budget");

    // The session's client takes its queue: compaction frees the space, the held PUBLISH
    // goes through and is acknowledged.
    let mut opts = ConnectOpts::new("budget-sub");
    opts.clean_session = false;
    let (mut sub, present) = RawClient::connect(broker.mqtt, opts).await;
    assert!(present);
    let mut delivered = 0;
    loop {
        tokio::select! {
            packet = sub.recv() => match packet {
                Some(Packet::Publish(p)) => {
                    delivered += 1;
                    sub.send(&Packet::PubAck(rumqttc::mqttbytes::v4::PubAck::new(p.pkid))).await;
                }
                other => panic!("unexpected {other:?}"),
            },
            ack = pub311.recv() => {
                assert!(
                    matches!(&ack, Some(Packet::PubAck(a)) if a.pkid == held),
                    "{ack:?}"
                );
                break;
            }
        }
    }
    assert!(
        delivered >= usize::from(refused) - 1,
        "{delivered} of {refused}"
    );
    let metrics = testkit::http_get(broker.http, "/metrics")
        .await
        .expect("metrics");
    let full = metrics
        .lines()
        .find(|l| l.starts_with("heartwire_state_disk_full_total"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .expect("heartwire_state_disk_full_total");
    assert!(full >= 2.0, "both refusals counted: {full}");
}
