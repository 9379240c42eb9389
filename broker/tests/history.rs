//! Session history stays bounded: a takeover fight over one client id is coalesced instead of
//! writing one history row per session, and the background retention prunes history by age and
//! by rows per device.

use std::time::Duration;

use broker::labels::RetentionPolicy;
use broker::metrics::metrics;
use broker::store::{PresenceStore, SqliteStore};
use rumqttc::mqttbytes::v4::Packet;
use testkit::{sqlite_url, temp_dir, ConnectOpts, FullBroker, RawClient};
use tokio::time::Instant;

/// Connects as `id` again and again until `until`, each connection taken over by the other
/// fighter; returns how many sessions (CONNACKs) it got.
async fn fight(addr: std::net::SocketAddr, id: &'static str, until: Instant) -> usize {
    let mut sessions = 0;
    while Instant::now() < until {
        let mut client = RawClient::tcp(addr).await;
        client
            .send(&testkit::connect_packet(&ConnectOpts::new(id)))
            .await;
        match tokio::time::timeout_at(until, client.recv_untimed()).await {
            Ok(Some(Packet::ConnAck(_))) => sessions += 1,
            Ok(_) => continue,
            Err(_) => break,
        }
        // Held until taken over (the broker closes it) or the fight is over.
        if tokio::time::timeout_at(until, client.recv_untimed())
            .await
            .is_err()
        {
            client.disconnect().await;
            break;
        }
    }
    sessions
}

/// Two clients fighting over one client id for 1.5 s: the history keeps a few rows per batch
/// and folds the rest into the kept rows' `coalesced` count; every session is accounted for and
/// the device's state is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_fight_is_coalesced_in_the_history() {
    let data = temp_dir("fight");
    let url = sqlite_url(&data);
    let mut config = FullBroker::config(&url, &data, "fight");
    config.bridge.batch_interval = Duration::from_millis(250);
    let broker = FullBroker::start(config).await;
    let store = SqliteStore::connect(&url, 2).await.expect("store");
    let batches_before = metrics().bridge_batch_size.get_sample_count();
    let accepted_before = metrics().connections_accepted.get();
    let coalesced_before = metrics().presence_coalesced.get();

    let until = Instant::now() + Duration::from_millis(1500);
    let a = tokio::spawn(fight(broker.mqtt, "contested", until));
    let b = tokio::spawn(fight(broker.mqtt, "contested", until));
    let acked = a.await.expect("fighter a") + b.await.expect("fighter b");

    let rows = testkit::eventually("every session of the fight in the history", || {
        let store = store.clone();
        async move {
            // Sessions as the broker counts them (a CONNACK in flight at the end of the fight
            // is a session the fighters did not see).
            let total = (metrics().connections_accepted.get() - accepted_before) as usize;
            let device = store.device("contested").await.ok()??;
            let rows = store.sessions("contested", 100_000).await.ok()?;
            let accounted: usize = rows.iter().map(|s| 1 + s.coalesced as usize).sum();
            // The metric is counted just after the batch's commit, which the store shows first.
            let folded: u64 = rows.iter().map(|s| s.coalesced as u64).sum();
            let counted = metrics().presence_coalesced.get() - coalesced_before;
            (!device.online && accounted == total && counted == folded).then_some(rows)
        }
    })
    .await;
    let batches = metrics().bridge_batch_size.get_sample_count() - batches_before;
    let total = (metrics().connections_accepted.get() - accepted_before) as usize;
    assert!(total >= acked);
    let folded: usize = rows.iter().map(|s| s.coalesced as usize).sum();
    eprintln!(
        "{total} sessions in {batches} batches -> {} history rows, {folded} coalesced",
        rows.len()
    );
    assert!(total > 50, "a real fight: {total} sessions");
    // At most coalesce_after (3) kept + one per other reason + the newest, per batch.
    assert!(
        rows.len() as u64 <= 10 * batches,
        "{} rows for {total} sessions in {batches} batches",
        rows.len()
    );
    assert_eq!(
        metrics().presence_coalesced.get() - coalesced_before,
        folded as u64
    );
    // The device's state is exact: offline on its newest session, with that session's reason.
    let device = store
        .device("contested")
        .await
        .expect("query")
        .expect("device");
    assert!(!device.online);
    assert_eq!(device.session_id, rows[0].session_id);
    assert_eq!(device.last_reason, rows[0].reason);
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.connects as usize, total);
    broker.stop().await;
}

/// Connects as `id` `n` times, each session closed by a clean DISCONNECT, then once more and
/// holds that connection; returns once the store has all of them (a marker client connected
/// after them is stored, and events are stored in order).
async fn flap(broker: &FullBroker, store: &SqliteStore, id: &str, n: usize) -> RawClient {
    for _ in 0..n {
        let (client, _) = RawClient::connect(broker.mqtt, ConnectOpts::new(id)).await;
        client.disconnect().await;
    }
    let (online, _) = RawClient::connect(broker.mqtt, ConnectOpts::new(id)).await;
    let marker = format!("{id}-marker");
    let (_marker, _) = RawClient::connect(broker.mqtt, ConnectOpts::new(&marker)).await;
    testkit::eventually("marker stored", || async {
        store.device(&marker).await.ok().flatten()
    })
    .await;
    online
}

/// The broker prunes a device's history down to `database.history_max_sessions_per_device` in
/// the background, keeping the open session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_retention_caps_history_per_device() {
    let data = temp_dir("retention-cap");
    let url = sqlite_url(&data);
    let mut config = FullBroker::config(&url, &data, "retention");
    config.database.history_max_sessions_per_device = 5;
    config.database.prune_interval = Duration::from_secs(1);
    // A row per session: this is about retention, not coalescing.
    config.bridge.coalesce_after = 0;
    let broker = FullBroker::start(config).await;
    let store = SqliteStore::connect(&url, 2).await.expect("store");
    let pruned_before = metrics()
        .history_pruned
        .get(RetentionPolicy::MaxSessionsPerDevice);

    let _online = flap(&broker, &store, "flapper", 30).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rows = Vec::new();
    while Instant::now() < deadline {
        rows = store.sessions("flapper", 1000).await.expect("sessions");
        if rows.len() <= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("31 sessions, cap 5: {} rows after pruning", rows.len());
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].disconnected_at, None, "the open session is kept");
    let pruned = metrics()
        .history_pruned
        .get(RetentionPolicy::MaxSessionsPerDevice)
        - pruned_before;
    assert_eq!(pruned, 26);
    broker.stop().await;
}

/// Closed sessions older than `database.history_max_age` are deleted in the background; the
/// open session stays however old it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_retention_deletes_closed_sessions_older_than_the_max_age() {
    let data = temp_dir("retention-age");
    let url = sqlite_url(&data);
    let mut config = FullBroker::config(&url, &data, "retention");
    config.database.history_max_age = Duration::from_secs(1);
    config.database.prune_interval = Duration::from_secs(1);
    config.bridge.coalesce_after = 0;
    let broker = FullBroker::start(config).await;
    let store = SqliteStore::connect(&url, 2).await.expect("store");

    let _online = flap(&broker, &store, "ager", 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rows = Vec::new();
    while Instant::now() < deadline {
        rows = store.sessions("ager", 1000).await.expect("sessions");
        if rows.len() <= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "11 sessions, max age 1 s: {} rows after pruning",
        rows.len()
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].disconnected_at, None, "the open session is kept");
    broker.stop().await;
}
