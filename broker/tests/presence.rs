//! End to end: MQTT devices -> connection events -> bridge -> store, on SQLite and on
//! PostgreSQL: each way a session ends is recorded with its reason, takeover keeps the device
//! online, a crashed broker's sessions are closed at its next start, and (PostgreSQL) nothing is
//! lost while the database is down.

use std::time::Duration;

use broker::store::{Device, PgStore, PresenceStore, SqliteStore};
use rumqttc::mqttbytes::v4::Packet;
use testkit::{eventually, ConnectOpts, FullBroker, RawClient, TempDir};

/// A database for one test: (url, guard keeping it alive, the PostgreSQL handle if any).
async fn sqlite_db(data: &TempDir) -> (String, Option<testkit::pg::TestPostgres>) {
    (testkit::sqlite_url(data), None)
}

async fn postgres_db(_data: &TempDir) -> (String, Option<testkit::pg::TestPostgres>) {
    let pg = testkit::pg::TestPostgres::start().await;
    (pg.url().to_owned(), Some(pg))
}

async fn device_where<S: PresenceStore>(
    store: &S,
    id: &str,
    what: &str,
    pred: impl Fn(&Device) -> bool,
) -> Device {
    eventually(&format!("{id}: {what}"), || async {
        store.device(id).await.ok().flatten().filter(|d| pred(d))
    })
    .await
}

async fn each_end_is_recorded_with_its_reason<S: PresenceStore>(url: String, data: TempDir) {
    let broker = FullBroker::start(FullBroker::config(&url, &data, "node-1")).await;
    let store = S::connect(&url, 2).await.expect("store");

    // Connect, then a clean DISCONNECT.
    let (polite, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("polite")).await;
    let online = device_where(&store, "polite", "online", |d| d.online).await;
    assert_eq!(online.node_id, "node-1");
    polite.disconnect().await;
    device_where(&store, "polite", "offline, client_disconnect", |d| {
        !d.online && d.last_reason.as_deref() == Some("client_disconnect")
    })
    .await;

    // Keep-alive timeout.
    let mut opts = ConnectOpts::new("silent");
    opts.keep_alive = 1;
    let (_silent, _) = RawClient::connect(broker.mqtt, opts).await;
    device_where(&store, "silent", "offline, keepalive_timeout", |d| {
        !d.online && d.last_reason.as_deref() == Some("keepalive_timeout")
    })
    .await;

    // Connection lost.
    let (lost, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("lost")).await;
    device_where(&store, "lost", "online", |d| d.online).await;
    drop(lost);
    device_where(&store, "lost", "offline, connection_lost", |d| {
        !d.online && d.last_reason.as_deref() == Some("connection_lost")
    })
    .await;

    // Takeover: the old session ends as takeover, the device stays online on the new one.
    let (_first, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("twin")).await;
    let first = device_where(&store, "twin", "online", |d| d.online).await;
    let (mut second, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("twin")).await;
    let now = device_where(&store, "twin", "online on a newer session", |d| {
        d.online && d.session_id > first.session_id
    })
    .await;
    let sessions = eventually("twin's first session closed", || async {
        let s = store.sessions("twin", 10).await.ok()?;
        (s.len() == 2 && s[1].reason.is_some()).then_some(s)
    })
    .await;
    assert_eq!(sessions[0].session_id, now.session_id);
    assert_eq!(sessions[1].reason.as_deref(), Some("takeover"));
    assert!(now.online);
    second.send(&Packet::PingReq).await;
    assert!(matches!(second.recv().await, Some(Packet::PingResp)));

    // Graceful shutdown: what is still connected goes offline as broker_shutdown.
    broker.stop().await;
    let twin = store.device("twin").await.expect("query").expect("twin");
    assert!(!twin.online);
    assert_eq!(twin.last_reason.as_deref(), Some("broker_shutdown"));
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.online, 0);
}

async fn crashed_broker_sessions_are_closed_at_restart<S: PresenceStore>(
    url: String,
    data: TempDir,
) {
    let config = FullBroker::config(&url, &data, "node-crash");
    let broker = FullBroker::start(config.clone()).await;
    let store = S::connect(&url, 2).await.expect("store");
    let mut clients = Vec::new();
    for i in 0..5 {
        let id = format!("orphan-{i}");
        clients.push(
            RawClient::connect(broker.mqtt, ConnectOpts::new(&id))
                .await
                .0,
        );
        device_where(&store, &id, "online", |d| d.online).await;
    }
    // Let at least one heartbeat land after the connects.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let crashed_at = chrono::Utc::now();
    broker.crash();
    drop(clients);
    // Nothing was recorded by the dead broker.
    assert_eq!(store.stats().await.expect("stats").online, 5);

    let restarted = FullBroker::start(config).await;
    for i in 0..5 {
        let d = device_where(
            &store,
            &format!("orphan-{i}"),
            "closed as broker_restart",
            |d| !d.online && d.last_reason.as_deref() == Some("broker_restart"),
        )
        .await;
        let at = d.disconnected_at.expect("disconnected_at");
        assert!(
            at <= crashed_at,
            "closed at the last heartbeat ({at}), before the crash ({crashed_at})"
        );
        assert!(at > d.connected_at - chrono::Duration::milliseconds(1));
    }
    let sessions = store.sessions("orphan-0", 5).await.expect("sessions");
    assert_eq!(sessions[0].reason.as_deref(), Some("broker_restart"));
    // The restarted broker records new sessions normally.
    let (_back, _) = RawClient::connect(restarted.mqtt, ConnectOpts::new("orphan-0")).await;
    device_where(&store, "orphan-0", "online again", |d| d.online).await;
    restarted.stop().await;
}

/// A Connected event of `id` for session `s`, now.
fn connected(id: &str, s: broker::event::SessionId) -> broker::event::ConnectionEvent {
    broker::event::ConnectionEvent::Connected {
        protocol: Default::default(),
        client_id: id.into(),
        session_id: s,
        seq: 0,
        peer: "127.0.0.1:1".parse().expect("addr"),
        listener: broker::labels::Listener::Tcp,
        identity: None,
        username: None,
        auth_method: broker::labels::AuthMethod::Anonymous,
        keep_alive: 30,
        clean_session: true,
        time: std::time::SystemTime::now(),
    }
}

async fn delayed_disconnect_of_an_old_session_never_wins<S: PresenceStore>(
    url: String,
    data: TempDir,
) {
    use broker::event::{ConnectionEvent, SessionId};
    use broker::labels::DisconnectReason;
    let config = FullBroker::config(&url, &data, "node-late").bridge;
    let store = S::connect(&url, 2)
        .await
        .expect("store")
        .coalescing(config.coalesce_after);
    let (tx, rx) = broker::event::channel(16);
    let bridge = broker::presence::bridge::Bridge::new(
        store.clone(),
        rx,
        config,
        "node-late",
        uuid::Uuid::now_v7(),
    )
    .await
    .expect("bridge");
    let task = tokio::spawn(bridge.run(tokio_util::sync::CancellationToken::new()));
    let (s1, s2) = (SessionId::new(), SessionId::new());
    tx.send(connected("dev", s1)).await.expect("send");
    device_where(&store, "dev", "online on s1", |d| d.session_id == s1.0).await;
    tx.send(connected("dev", s2)).await.expect("send");
    device_where(&store, "dev", "online on s2", |d| d.session_id == s2.0).await;
    // The old session's Disconnected arrives late, in a batch of its own.
    tx.send(ConnectionEvent::Disconnected {
        reason_code: None,
        reason_string: None,
        session_expires_at: None,
        client_id: "dev".into(),
        session_id: s1,
        seq: 0,
        reason: DisconnectReason::ConnectionLost,
        time: std::time::SystemTime::now(),
    })
    .await
    .expect("send");
    tx.send(connected("marker", SessionId::new()))
        .await
        .expect("send");
    device_where(
        &store,
        "marker",
        "online (the late event was processed)",
        |d| d.online,
    )
    .await;
    let dev = store.device("dev").await.expect("query").expect("dev");
    assert!(dev.online, "still online");
    assert_eq!(dev.session_id, s2.0);
    let sessions = store.sessions("dev", 5).await.expect("sessions");
    assert_eq!(sessions[1].reason.as_deref(), Some("connection_lost"));
    drop(tx);
    task.await.expect("bridge");
}

macro_rules! presence_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let data = testkit::temp_dir("presence");
                    let (url, _pg) = super::sqlite_db(&data).await;
                    super::$name::<super::SqliteStore>(url, data).await;
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let data = testkit::temp_dir("presence");
                    let (url, _pg) = super::postgres_db(&data).await;
                    super::$name::<super::PgStore>(url, data).await;
                }
            )*
        }
    };
}

presence_tests!(
    each_end_is_recorded_with_its_reason,
    crashed_broker_sessions_are_closed_at_restart,
    delayed_disconnect_of_an_old_session_never_wins,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_database_is_down_keeps_events_for_the_next_start() {
    let data = testkit::temp_dir("down-at-exit");
    let pg = testkit::pg::TestPostgres::start().await;
    assert!(
        pg.controls_server(),
        "this test stops PostgreSQL: unset TEST_DATABASE_URL to run it"
    );
    let mut config = FullBroker::config(pg.url(), &data, "node-exit");
    config.bridge.drain_timeout = Duration::from_millis(500);
    let broker = FullBroker::start(config.clone()).await;
    let store = PgStore::connect(pg.url(), 2).await.expect("store");
    let (_a, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("exit-a")).await;
    device_where(&store, "exit-a", "online", |d| d.online).await;

    pg.stop_server().await.expect("stop PostgreSQL");
    let (mut b, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("exit-b")).await;
    b.send(&Packet::Disconnect).await;
    // The broker closes the socket once it has handled the DISCONNECT (reason fixed).
    assert!(b.until_closed().await.is_empty());
    // Stop while the database is down: the events (exit-b's session, both shutdowns) go to
    // the journal.
    broker.stop().await;
    let journal = std::fs::metadata(data.path().join("presence.journal")).expect("journal");
    assert!(journal.len() > 0, "events kept in the journal");

    pg.start_server().await.expect("start PostgreSQL");
    let restarted = FullBroker::start(config).await;
    let a = device_where(&store, "exit-a", "offline after replay", |d| !d.online).await;
    assert_eq!(
        a.last_reason.as_deref(),
        Some("broker_shutdown"),
        "true reason, not broker_restart"
    );
    let b = device_where(&store, "exit-b", "recorded from the journal", |d| !d.online).await;
    assert_eq!(b.last_reason.as_deref(), Some("client_disconnect"));
    eventually("journal emptied", || async {
        let len = std::fs::metadata(data.path().join("presence.journal"))
            .ok()?
            .len();
        (len == 0).then_some(())
    })
    .await;
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_loses_nothing() {
    let data = testkit::temp_dir("outage");
    let pg = testkit::pg::TestPostgres::start().await;
    assert!(
        pg.controls_server(),
        "this test stops and restarts PostgreSQL: it needs the throwaway cluster, \
         not TEST_DATABASE_URL (unset it to run this test)"
    );
    let mut config = FullBroker::config(pg.url(), &data, "node-outage");
    // Small memory so that the outage also goes through the journal.
    config.bridge.batch_size = 50;
    config.bridge.memory_capacity = 60;
    let broker = FullBroker::start(config).await;
    let store = PgStore::connect(pg.url(), 2).await.expect("store");
    let (_steady, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("steady")).await;
    device_where(&store, "steady", "online", |d| d.online).await;

    pg.stop_server().await.expect("stop PostgreSQL");
    let mut staying = Vec::new();
    for i in 0..200 {
        let id = format!("outage-{i:03}");
        let (c, _) = RawClient::connect(broker.mqtt, ConnectOpts::new(&id)).await;
        match i % 4 {
            0 | 2 => staying.push(c),
            1 => c.disconnect().await,
            _ => drop(c),
        }
    }
    let m = broker::metrics::metrics();
    eventually("events spilled to the journal", || async {
        (m.bridge_journaled.get() > 0).then_some(())
    })
    .await;
    // The broker keeps serving during the outage.
    let (mut probe, _) = RawClient::connect(broker.mqtt, ConnectOpts::new("probe")).await;
    probe.send(&Packet::PingReq).await;
    assert!(matches!(probe.recv().await, Some(Packet::PingResp)));

    pg.start_server().await.expect("start PostgreSQL");
    let devices = eventually("all 200 devices recorded", || async {
        let mut devices = store.devices(None, Some("outage-"), 1000).await.ok()?;
        devices.retain(|d| d.device_id.starts_with("outage-"));
        let all_closed = devices.iter().filter(|d| !d.online).count() == 100;
        (devices.len() == 200 && all_closed).then_some(devices)
    })
    .await;
    for (i, d) in devices.iter().enumerate() {
        let expected = match i % 4 {
            0 | 2 => None,
            1 => Some("client_disconnect"),
            _ => Some("connection_lost"),
        };
        assert_eq!(d.online, expected.is_none(), "{}", d.device_id);
        assert_eq!(d.last_reason.as_deref(), expected, "{}", d.device_id);
        let sessions = store.sessions(&d.device_id, 10).await.expect("sessions");
        assert_eq!(sessions.len(), 1, "{}: one history row", d.device_id);
        assert_eq!(sessions[0].reason.as_deref(), expected);
    }
    assert_eq!(m.bridge_lost_events.get(), 0, "no event lost");
    eventually("journal emptied", || async {
        (m.bridge_queue_depth.get() == 0 && m.bridge_journal_bytes.get() == 0).then_some(())
    })
    .await;
    drop(staying);
    broker.stop().await;
}

/// A store whose second `apply` hangs (a database that stalls mid-write).
#[derive(Clone)]
struct StallFirstWrite {
    inner: SqliteStore,
    applies: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl broker::store::PresenceStore for StallFirstWrite {
    async fn open(
        url: &str,
        max_connections: u32,
        access: broker::store::Access,
    ) -> Result<Self, broker::store::StoreError> {
        Ok(Self {
            inner: SqliteStore::open(url, max_connections, access).await?,
            applies: Default::default(),
        })
    }
    fn coalescing(self, coalesce_after: usize) -> Self {
        Self {
            inner: self.inner.coalescing(coalesce_after),
            ..self
        }
    }
    async fn migrate(&self) -> Result<(), broker::store::StoreError> {
        self.inner.migrate().await
    }
    async fn ping(&self) -> Result<(), broker::store::StoreError> {
        self.inner.ping().await
    }
    async fn begin_boot(
        &self,
        node_id: &str,
        boot_id: uuid::Uuid,
        now: chrono::DateTime<chrono::Utc>,
        held: &[(String, chrono::DateTime<chrono::Utc>)],
    ) -> Result<broker::store::Recovery, broker::store::StoreError> {
        self.inner.begin_boot(node_id, boot_id, now, held).await
    }
    async fn heartbeat(
        &self,
        boot_id: uuid::Uuid,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), broker::store::StoreError> {
        self.inner.heartbeat(boot_id, now).await
    }
    async fn apply(
        &self,
        batch: &[broker::event::PresenceRecord],
    ) -> Result<(), broker::store::StoreError> {
        if self
            .applies
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        self.inner.apply(batch).await
    }
    async fn device(&self, device_id: &str) -> Result<Option<Device>, broker::store::StoreError> {
        self.inner.device(device_id).await
    }
    async fn devices(
        &self,
        online: Option<bool>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, broker::store::StoreError> {
        self.inner.devices(online, after, limit).await
    }
    async fn sessions(
        &self,
        device_id: &str,
        limit: u32,
    ) -> Result<Vec<broker::store::Session>, broker::store::StoreError> {
        self.inner.sessions(device_id, limit).await
    }
    async fn stats(&self) -> Result<broker::store::Stats, broker::store::StoreError> {
        self.inner.stats().await
    }
    async fn prune_ended_before(
        &self,
        before: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> Result<u64, broker::store::StoreError> {
        self.inner.prune_ended_before(before, limit).await
    }
    async fn prune_device(
        &self,
        device_id: &str,
        keep: u32,
        limit: u32,
    ) -> Result<u64, broker::store::StoreError> {
        self.inner.prune_device(device_id, keep, limit).await
    }
    async fn nodes(
        &self,
        node_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<broker::store::Boot>, broker::store::StoreError> {
        self.inner.nodes(node_id, limit).await
    }
    async fn credential(
        &self,
        username: &str,
    ) -> Result<Option<broker::store::CredentialRecord>, broker::store::StoreError> {
        self.inner.credential(username).await
    }
    async fn create_credential(
        &self,
        record: &broker::store::CredentialRecord,
    ) -> Result<bool, broker::store::StoreError> {
        self.inner.create_credential(record).await
    }
    async fn rotate_credential(
        &self,
        username: &str,
        password_hash: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, broker::store::StoreError> {
        self.inner
            .rotate_credential(username, password_hash, now)
            .await
    }
    async fn revoke_credential(
        &self,
        username: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool, broker::store::StoreError> {
        self.inner.revoke_credential(username, now).await
    }
    async fn credentials(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<broker::store::Credential>, broker::store::StoreError> {
        self.inner.credentials(after, limit).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_spilled_during_a_stalled_write_keep_their_order() {
    use broker::event::{ConnectionEvent, SessionId};
    use broker::labels::DisconnectReason;
    let data = testkit::temp_dir("stall");
    let url = testkit::sqlite_url(&data);
    let mut config = FullBroker::config(&url, &data, "node-stall").bridge;
    let store = SqliteStore::connect(&url, 2)
        .await
        .expect("store")
        .coalescing(config.coalesce_after);
    let stalling = StallFirstWrite {
        inner: store.clone(),
        applies: Default::default(),
    };
    config.batch_size = 1;
    config.memory_capacity = 2;
    config.store_timeout = Duration::from_millis(300);
    let (tx, rx) = broker::event::channel(16);
    let bridge = broker::presence::bridge::Bridge::new(
        stalling,
        rx,
        config,
        "node-stall",
        uuid::Uuid::now_v7(),
    )
    .await
    .expect("bridge");
    let task = tokio::spawn(bridge.run(tokio_util::sync::CancellationToken::new()));
    // A first event, written normally: the bridge is now past start-up.
    tx.send(connected("warm-up", SessionId::new()))
        .await
        .expect("send");
    device_where(&store, "warm-up", "online", |d| d.online).await;
    let s = SessionId::new();
    // The next write (d's Connected) stalls; d's Disconnected and e's Connected fill memory
    // and go to the journal while it does.
    tx.send(connected("d", s)).await.expect("send");
    tx.send(ConnectionEvent::Disconnected {
        reason_code: None,
        reason_string: None,
        session_expires_at: None,
        client_id: "d".into(),
        session_id: s,
        seq: 0,
        reason: DisconnectReason::ConnectionLost,
        time: std::time::SystemTime::now(),
    })
    .await
    .expect("send");
    tx.send(connected("e", SessionId::new()))
        .await
        .expect("send");
    device_where(&store, "e", "online", |d| d.online).await;
    let d = device_where(&store, "d", "recorded", |_| true).await;
    assert!(
        !d.online,
        "d's Disconnected was applied after its Connected"
    );
    assert_eq!(d.last_reason.as_deref(), Some("connection_lost"));
    drop(tx);
    task.await.expect("bridge");
}
