//! One store test story, run against SQLite always and against a real PostgreSQL
//! (TEST_DATABASE_URL, or a throwaway cluster from the local PostgreSQL binaries).

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use broker::auth::database::CredentialSource;
use broker::auth::password_file::Hash;
use broker::auth::Grants;
use broker::config::BridgeConfig;
use broker::event::{ConnectionEvent, PresenceRecord, SessionId};
use broker::labels::{AuthMethod, DisconnectReason, Listener, Protocol};
use broker::store::{
    Credential, CredentialRecord, PgStore, PresenceStore, SqliteStore, StoreCredentials,
};
use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::SqliteConnectOptions;
use uuid::Uuid;

/// A store on a fresh database; the guard keeps the database alive.
async fn sqlite() -> (SqliteStore, Box<dyn std::any::Any>) {
    let dir = testkit::temp_dir("store");
    let url = format!("sqlite://{}/presence.db", dir.path().display());
    let store = SqliteStore::connect(&url, 4)
        .await
        .expect("open sqlite")
        .coalescing(BridgeConfig::default().coalesce_after);
    store.migrate().await.expect("migrate");
    (store, Box::new(dir))
}

async fn postgres() -> (PgStore, Box<dyn std::any::Any>) {
    let pg = testkit::pg::TestPostgres::start().await;
    let store = PgStore::connect(pg.url(), 4)
        .await
        .expect("open postgres")
        .coalescing(BridgeConfig::default().coalesce_after);
    store.migrate().await.expect("migrate");
    (store, Box::new(pg))
}

/// Whole microseconds, as both backends store them.
fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn ts(secs: u64) -> DateTime<Utc> {
    DateTime::<Utc>::from(t(secs))
}

struct Node {
    node_id: String,
    boot_id: Uuid,
}

impl Node {
    fn new(node_id: &str) -> Self {
        Self {
            node_id: node_id.into(),
            boot_id: Uuid::now_v7(),
        }
    }

    fn connected(&self, device: &str, session: SessionId, at: u64) -> PresenceRecord {
        self.connected_on(device, session, at, Listener::Tcp, None)
    }

    /// A connection that authenticated as `username` with `method`.
    fn connected_as(
        &self,
        device: &str,
        session: SessionId,
        at: u64,
        username: Option<&str>,
        method: AuthMethod,
    ) -> PresenceRecord {
        let mut record = self.connected(device, session, at);
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

    /// A connection on `listener`, with the identity of a verified client certificate.
    fn connected_on(
        &self,
        device: &str,
        session: SessionId,
        at: u64,
        listener: Listener,
        identity: Option<&str>,
    ) -> PresenceRecord {
        PresenceRecord {
            node_id: self.node_id.clone(),
            boot_id: self.boot_id,
            event: ConnectionEvent::Connected {
                protocol: Default::default(),
                client_id: device.into(),
                session_id: session,
                seq: at,
                peer: "127.0.0.1:5000".parse().expect("addr"),
                listener,
                identity: identity.map(str::to_owned),
                username: None,
                auth_method: broker::labels::AuthMethod::Anonymous,
                keep_alive: 30,
                clean_session: true,
                time: t(at),
            },
        }
    }

    /// An MQTT 5 connection.
    fn connected5(&self, device: &str, session: SessionId, at: u64) -> PresenceRecord {
        let mut record = self.connected(device, session, at);
        if let ConnectionEvent::Connected { protocol, .. } = &mut record.event {
            *protocol = Protocol::V5;
        }
        record
    }

    /// The end of an MQTT 5 connection with a DISCONNECT `code` and a reason string, its
    /// session held until `held` (seconds, as `at`).
    fn disconnected5(
        &self,
        device: &str,
        session: SessionId,
        code: u8,
        at: u64,
        held: Option<u64>,
    ) -> PresenceRecord {
        let mut record = self.disconnected(device, session, DisconnectReason::ClientDisconnect, at);
        if let ConnectionEvent::Disconnected {
            reason_code,
            reason_string,
            session_expires_at,
            ..
        } = &mut record.event
        {
            *reason_code = Some(code);
            *reason_string = Some(format!("bye {code}"));
            *session_expires_at = held.map(t);
        }
        record
    }

    fn expired(&self, device: &str, session: SessionId, at: u64) -> PresenceRecord {
        PresenceRecord {
            node_id: self.node_id.clone(),
            boot_id: self.boot_id,
            event: ConnectionEvent::SessionExpired {
                client_id: device.into(),
                session_id: session,
                time: t(at),
            },
        }
    }

    fn disconnected(
        &self,
        device: &str,
        session: SessionId,
        reason: DisconnectReason,
        at: u64,
    ) -> PresenceRecord {
        PresenceRecord {
            node_id: self.node_id.clone(),
            boot_id: self.boot_id,
            event: ConnectionEvent::Disconnected {
                reason_code: None,
                reason_string: None,
                session_expires_at: None,
                client_id: device.into(),
                session_id: session,
                seq: 0,
                reason,
                time: t(at),
            },
        }
    }
}

async fn connect_then_disconnect<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let s1 = SessionId::new();
    store
        .apply(&[node.connected("dev", s1, 10)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(d.online);
    assert_eq!(d.session_id, s1.0);
    assert_eq!(d.connected_at, ts(10));
    assert_eq!((d.node_id.as_str(), d.keep_alive), ("n1", 30));
    assert_eq!(d.peer, "127.0.0.1:5000");

    store
        .apply(&[node.disconnected("dev", s1, DisconnectReason::KeepaliveTimeout, 20)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(!d.online);
    assert_eq!(d.disconnected_at, Some(ts(20)));
    assert_eq!(d.last_reason.as_deref(), Some("keepalive_timeout"));
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].reason.as_deref(), Some("keepalive_timeout"));
    assert_eq!(sessions[0].disconnected_at, Some(ts(20)));
    assert_eq!(sessions[0].boot_id, node.boot_id);
    assert!(store.device("nobody").await.expect("query").is_none());
}

async fn listener_and_identity_are_recorded_on_sessions_and_devices<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let (tls, tcp) = (SessionId::new(), SessionId::new());
    let first = [node.connected_on("dev", tls, 10, Listener::Tls, Some("device-7"))];
    store.apply(&first).await.expect("apply");
    let seen = |d: &broker::store::Device| (d.listener, d.identity.clone());
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(seen(&d), (Listener::Tls, Some("device-7".to_owned())));
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(
        (sessions[0].listener, sessions[0].identity.as_deref()),
        (Listener::Tls, Some("device-7"))
    );

    // Offline, the device keeps its last session's, as it keeps the peer.
    store
        .apply(&[node.disconnected("dev", tls, DisconnectReason::ClientDisconnect, 11)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(!d.online);
    assert_eq!(seen(&d), (Listener::Tls, Some("device-7".to_owned())));

    // Back over plain TCP without a certificate: the identity goes with the TLS session.
    store
        .apply(&[node.connected("dev", tcp, 12)])
        .await
        .expect("apply");
    // A late replay of the TLS session's Connected does not bring its identity back.
    store.apply(&first).await.expect("replay");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!((d.session_id, seen(&d)), (tcp.0, (Listener::Tcp, None)));
    let listed = store.devices(None, None, 10).await.expect("devices");
    assert_eq!(listed.iter().map(seen).collect::<Vec<_>>(), [seen(&d)]);
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.session_id, s.listener, s.identity.as_deref()))
            .collect::<Vec<_>>(),
        [
            (tcp.0, Listener::Tcp, None),
            (tls.0, Listener::Tls, Some("device-7")),
        ]
    );
}

async fn username_and_auth_method_are_recorded_on_sessions_and_devices<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let (password, certificate) = (SessionId::new(), SessionId::new());
    let first = [node.connected_as("dev", password, 10, Some("alice"), AuthMethod::Password)];
    store.apply(&first).await.expect("apply");
    let seen = |d: &broker::store::Device| (d.username.clone(), d.auth_method);
    let alice = (Some("alice".to_owned()), AuthMethod::Password);
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(seen(&d), alice);
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(
        (sessions[0].username.as_deref(), sessions[0].auth_method),
        (Some("alice"), AuthMethod::Password)
    );

    // Offline, the device keeps its last session's, as it keeps the peer.
    store
        .apply(&[node.disconnected("dev", password, DisconnectReason::ClientDisconnect, 11)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(!d.online);
    assert_eq!(seen(&d), alice);

    // Back with a certificate and no password: the user name goes with the password session.
    store
        .apply(&[node.connected_as("dev", certificate, 12, None, AuthMethod::Certificate)])
        .await
        .expect("apply");
    // A late replay of the password session's Connected does not bring its user name back.
    store.apply(&first).await.expect("replay");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(
        (d.session_id, seen(&d)),
        (certificate.0, (None, AuthMethod::Certificate))
    );
    let listed = store.devices(None, None, 10).await.expect("devices");
    assert_eq!(listed.iter().map(seen).collect::<Vec<_>>(), [seen(&d)]);
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.session_id, s.username.as_deref(), s.auth_method))
            .collect::<Vec<_>>(),
        [
            (certificate.0, None, AuthMethod::Certificate),
            (password.0, Some("alice"), AuthMethod::Password),
        ]
    );

    // An anonymous connection records no user name.
    let anonymous = SessionId::new();
    store
        .apply(&[node.connected("dev", anonymous, 13)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(
        (d.session_id, seen(&d)),
        (anonymous.0, (None, AuthMethod::Anonymous))
    );
}

async fn late_events_of_an_old_session_never_win<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let s1 = SessionId::new();
    let s2 = SessionId::new();
    store
        .apply(&[node.connected("dev", s1, 10)])
        .await
        .expect("apply");
    store
        .apply(&[node.connected("dev", s2, 11)])
        .await
        .expect("apply");
    // The old session's disconnect arrives late: the device stays online with s2.
    store
        .apply(&[node.disconnected("dev", s1, DisconnectReason::Takeover, 12)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(d.online);
    assert_eq!(d.session_id, s2.0);
    // A late Connected of the old session does not replace the newer one either.
    store
        .apply(&[node.connected("dev", s1, 10)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(d.session_id, s2.0);
    // Both sessions are in the history, the old one closed as takeover.
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.session_id, s.reason.clone()))
            .collect::<Vec<_>>(),
        [(s2.0, None), (s1.0, Some("takeover".to_owned()))]
    );
}

async fn retried_and_replayed_batches_change_nothing<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let s1 = SessionId::new();
    let first = vec![
        node.connected("a", s1, 1),
        node.connected("b", SessionId::new(), 2),
    ];
    let second = vec![node.disconnected("a", s1, DisconnectReason::ConnectionLost, 3)];
    store.apply(&first).await.expect("apply");
    store.apply(&first).await.expect("retry");
    store.apply(&second).await.expect("apply");
    store.apply(&second).await.expect("retry");
    // An old batch replayed after a newer one (journal replay after a crash) does not revert.
    store.apply(&first).await.expect("replay");
    let a = store.device("a").await.expect("query").expect("a");
    assert!(!a.online, "replayed connect did not bring it back online");
    assert_eq!(a.last_reason.as_deref(), Some("connection_lost"));
    assert_eq!(store.sessions("a", 10).await.expect("sessions").len(), 1);
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.online, stats.known_devices, stats.connects),
        (1, 2, 2)
    );
    assert_eq!(stats.disconnects.get("connection_lost"), Some(&1));
}

async fn whole_session_in_one_batch_and_reconnect_keeps_last_disconnect<S: PresenceStore>(
    store: S,
) {
    let node = Node::new("n1");
    let s1 = SessionId::new();
    let s2 = SessionId::new();
    store
        .apply(&[
            node.connected("dev", s1, 1),
            node.disconnected("dev", s1, DisconnectReason::ClientDisconnect, 2),
        ])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(!d.online);
    assert_eq!(d.disconnected_at, Some(ts(2)));
    store
        .apply(&[node.connected("dev", s2, 3)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert!(d.online);
    assert_eq!(d.connected_at, ts(3));
    assert_eq!(
        (d.disconnected_at, d.last_reason.as_deref()),
        (Some(ts(2)), Some("client_disconnect")),
        "while online again, the last disconnect is kept"
    );
}

async fn crash_recovery_closes_sessions_of_earlier_boots<S: PresenceStore>(store: S) {
    let boot1 = Node::new("node-a");
    let other = Node::new("node-b");
    store
        .begin_boot("node-a", boot1.boot_id, ts(0), &[])
        .await
        .expect("boot");
    store
        .begin_boot("node-b", other.boot_id, ts(0), &[])
        .await
        .expect("boot");
    let (a, b, c) = (SessionId::new(), SessionId::new(), SessionId::new());
    store
        .apply(&[
            boot1.connected("a", a, 1),
            boot1.connected("b", b, 2),
            boot1.disconnected("b", b, DisconnectReason::ClientDisconnect, 3),
            other.connected("c", c, 4),
        ])
        .await
        .expect("apply");
    store
        .heartbeat(boot1.boot_id, ts(50))
        .await
        .expect("heartbeat");

    // node-a restarts after a crash.
    let boot2 = Node::new("node-a");
    let recovery = store
        .begin_boot("node-a", boot2.boot_id, ts(100), &[])
        .await
        .expect("boot");
    assert_eq!(
        (
            recovery.boots,
            recovery.sessions_closed,
            recovery.devices_offline
        ),
        (1, 1, 1)
    );
    let a_dev = store.device("a").await.expect("query").expect("a");
    assert!(!a_dev.online);
    assert_eq!(a_dev.last_reason.as_deref(), Some("broker_restart"));
    assert_eq!(a_dev.disconnected_at, Some(ts(50)), "at the last heartbeat");
    let b_sessions = store.sessions("b", 5).await.expect("sessions");
    assert_eq!(b_sessions[0].reason.as_deref(), Some("client_disconnect"));
    assert!(
        store.device("c").await.expect("query").expect("c").online,
        "another node's devices are untouched"
    );
    // Recovery is done once per boot.
    let boot3 = Node::new("node-a");
    let again = store
        .begin_boot("node-a", boot3.boot_id, ts(200), &[])
        .await
        .expect("boot");
    assert_eq!((again.boots, again.sessions_closed), (1, 0));
}

async fn pagination_filters_and_history_limits<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let mut batch = Vec::new();
    for i in 0..25u64 {
        let s = SessionId::new();
        batch.push(node.connected(&format!("dev-{i:02}"), s, i));
        if i % 2 == 1 {
            batch.push(node.disconnected(
                &format!("dev-{i:02}"),
                s,
                DisconnectReason::ConnectionLost,
                i + 1,
            ));
        }
    }
    store.apply(&batch).await.expect("apply");
    let page1 = store.devices(None, None, 10).await.expect("page");
    assert_eq!(page1.len(), 10);
    assert_eq!(page1[0].device_id, "dev-00");
    let page3 = store.devices(None, Some("dev-19"), 10).await.expect("page");
    assert_eq!(
        page3
            .iter()
            .map(|d| d.device_id.as_str())
            .collect::<Vec<_>>(),
        ["dev-20", "dev-21", "dev-22", "dev-23", "dev-24"]
    );
    let online = store.devices(Some(true), None, 100).await.expect("online");
    assert_eq!(online.len(), 13);
    assert!(online.iter().all(|d| d.online));
    let offline = store
        .devices(Some(false), Some("dev-10"), 100)
        .await
        .expect("offline");
    assert_eq!(offline.len(), 7);

    let mut history = Vec::new();
    for i in 0..5 {
        let s = SessionId::new();
        history.push(node.connected("flappy", s, 100 + i * 2));
        history.push(node.disconnected(
            "flappy",
            s,
            DisconnectReason::KeepaliveTimeout,
            101 + i * 2,
        ));
    }
    store.apply(&history).await.expect("apply");
    let sessions = store.sessions("flappy", 3).await.expect("sessions");
    assert_eq!(sessions.len(), 3);
    assert!(
        sessions[0].connected_at > sessions[1].connected_at,
        "newest first"
    );
}

async fn large_batches_apply_in_one_transaction<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let mut batch = Vec::new();
    for i in 0..3_000u64 {
        let s = SessionId::new();
        batch.push(node.connected(&format!("bulk-{i}"), s, i));
        if i % 3 == 0 {
            batch.push(node.disconnected(&format!("bulk-{i}"), s, DisconnectReason::Takeover, i));
        }
    }
    store.apply(&batch).await.expect("apply");
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.known_devices, stats.online, stats.connects),
        (3_000, 2_000, 3_000)
    );
}

async fn takeover_within_one_batch_keeps_the_last_disconnect<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let (s1, s2) = (SessionId::new(), SessionId::new());
    store
        .apply(&[
            node.connected("dev", s1, 1),
            node.disconnected("dev", s1, DisconnectReason::Takeover, 2),
            node.connected("dev", s2, 2),
        ])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("dev");
    assert!(d.online);
    assert_eq!(d.session_id, s2.0);
    assert_eq!(
        (d.disconnected_at, d.last_reason.as_deref()),
        (Some(ts(2)), Some("takeover"))
    );
}

async fn boots_known_only_from_their_events_are_recovered<S: PresenceStore>(store: S) {
    // A boot that started while the database was down and crashed: its events arrive later
    // (from the journal) without begin_boot ever having recorded it.
    let lost_boot = Node::new("node-j");
    let s = SessionId::new();
    store
        .apply(&[lost_boot.connected("journaled", s, 30)])
        .await
        .expect("apply");
    let next = Node::new("node-j");
    let recovery = store
        .begin_boot("node-j", next.boot_id, ts(100), &[])
        .await
        .expect("boot");
    assert_eq!((recovery.boots, recovery.sessions_closed), (1, 1));
    let d = store
        .device("journaled")
        .await
        .expect("query")
        .expect("device");
    assert!(!d.online);
    assert_eq!(d.last_reason.as_deref(), Some("broker_restart"));
    assert_eq!(
        d.disconnected_at,
        Some(ts(30)),
        "at the boot's last known event"
    );
}

async fn history_is_pruned_by_age_and_per_device_never_open_sessions<S: PresenceStore>(store: S) {
    use DisconnectReason::ClientDisconnect;
    let node = Node::new("n1");
    // One batch per session, as a device that reconnects now and then produces them.
    let session = |device: &'static str, from: u64, to: Option<u64>| {
        let s = SessionId::new();
        let mut batch = vec![node.connected(device, s, from)];
        if let Some(to) = to {
            batch.push(node.disconnected(device, s, ClientDisconnect, to));
        }
        batch
    };
    let mut batches = Vec::new();
    batches.push(session("b", 1, None)); // open since long ago
    batches.push(session("d", 2, None)); // open, then newer sessions (a node that lost it)
    for k in 1..=6 {
        batches.push(session("a", 10 * k, Some(10 * k + 5))); // ended 15, 25, ..., 65
    }
    batches.push(session("a", 70, None));
    for k in 1..=3 {
        batches.push(session("c", 10 * k, Some(10 * k + 2))); // ended 12, 22, 32
    }
    for k in 4..=5 {
        batches.push(session("d", 10 * k, Some(10 * k + 1))); // ended 41, 51
    }
    for batch in &batches {
        store.apply(batch).await.expect("apply");
    }
    let rows = |device: &'static str| {
        let store = store.clone();
        async move { store.sessions(device, 100).await.expect("sessions") }
    };

    // By age, oldest first, at most `limit` per statement: a's first two and all of c's.
    let mut deleted = Vec::new();
    loop {
        let n = store.prune_ended_before(ts(35), 2).await.expect("prune");
        deleted.push(n);
        if n < 2 {
            break;
        }
    }
    assert_eq!(deleted, [2, 2, 1]);
    assert_eq!(
        rows("a").await.len(),
        5,
        "a3 (ended 35) is not older than 35"
    );
    assert!(rows("c").await.is_empty());
    let b = rows("b").await;
    assert_eq!(b.len(), 1, "open since t=1, never deleted");
    assert_eq!(b[0].disconnected_at, None);

    // Per device: a keeps its 2 newest (the open one and a6).
    let mut n = 0;
    while let 1.. = store.prune_device("a", 2, 1).await.expect("prune") {
        n += 1;
    }
    assert_eq!(n, 3);
    let a = rows("a").await;
    assert_eq!(
        a.iter().map(|s| s.connected_at).collect::<Vec<_>>(),
        [ts(70), ts(60)]
    );
    assert_eq!(store.prune_device("b", 1, 10).await.expect("prune"), 0);
    // d keeps its newest; of the older ones only the closed one goes, the open one stays.
    assert_eq!(store.prune_device("d", 1, 10).await.expect("prune"), 1);
    let d = rows("d").await;
    assert_eq!(
        d.iter()
            .map(|s| (s.connected_at, s.disconnected_at.is_some()))
            .collect::<Vec<_>>(),
        [(ts(50), true), (ts(2), false)]
    );
    // The devices themselves are kept, with their state.
    assert!(store.device("c").await.expect("query").is_some());
    assert_eq!(store.stats().await.expect("stats").connects, 2 + 1 + 2);
}

async fn coalesced_sessions_count_in_history_and_totals<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let mut batch = Vec::new();
    for i in 0..10 {
        let s = SessionId::new();
        // The first with a password, the ones that will be folded with a certificate.
        batch.push(match i {
            0 => node.connected_as("fight", s, i, Some("alice"), AuthMethod::Password),
            1 | 2 => node.connected("fight", s, i),
            _ => node.connected_as("fight", s, i, None, AuthMethod::Certificate),
        });
        batch.push(node.disconnected("fight", s, DisconnectReason::Takeover, i));
    }
    let last = SessionId::new();
    batch.push(node.connected_on("fight", last, 10, Listener::Wss, Some("device-7")));
    store.apply(&batch).await.expect("apply");
    // Applying it again changes nothing (a retried batch).
    store.apply(&batch).await.expect("apply again");
    let rows = store.sessions("fight", 100).await.expect("sessions");
    assert_eq!(
        rows.iter().map(|s| s.coalesced).collect::<Vec<_>>(),
        [0, 7, 0, 0],
        "newest first: the open session, then the third kept one with 7 folded into it"
    );
    assert_eq!(rows[0].session_id, last.0);
    assert_eq!(
        rows.iter()
            .map(|s| (s.listener, s.identity.as_deref()))
            .collect::<Vec<_>>(),
        [
            (Listener::Wss, Some("device-7")),
            (Listener::Tcp, None),
            (Listener::Tcp, None),
            (Listener::Tcp, None),
        ],
        "a kept row keeps its own session's listener and identity"
    );
    assert_eq!(
        rows.iter()
            .map(|s| (s.username.as_deref(), s.auth_method))
            .collect::<Vec<_>>(),
        [
            (None, AuthMethod::Anonymous),
            (None, AuthMethod::Anonymous),
            (None, AuthMethod::Anonymous),
            (Some("alice"), AuthMethod::Password),
        ],
        "a kept row keeps its own session's user name and method, not the folded sessions'"
    );
    let d = store.device("fight").await.expect("query").expect("device");
    assert!(d.online);
    assert_eq!(d.session_id, last.0);
    assert_eq!(
        (d.listener, d.identity.as_deref()),
        (Listener::Wss, Some("device-7"))
    );
    assert_eq!(d.last_reason.as_deref(), Some("takeover"));
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.connects, 11);
    assert_eq!(stats.disconnects.get("takeover"), Some(&10));

    // Without coalescing, a row per session.
    let store = store.coalescing(0);
    let node = Node::new("n2");
    let mut batch = Vec::new();
    for i in 0..10 {
        let s = SessionId::new();
        batch.push(node.connected("plain", s, i));
        batch.push(node.disconnected("plain", s, DisconnectReason::Takeover, i));
    }
    store.apply(&batch).await.expect("apply");
    assert_eq!(
        store.sessions("plain", 100).await.expect("sessions").len(),
        10
    );
}

async fn node_boots_are_listed_newest_first<S: PresenceStore>(store: S) {
    let first = Node::new("node-a");
    let other = Node::new("node-b");
    store
        .begin_boot("node-a", first.boot_id, ts(0), &[])
        .await
        .expect("boot");
    store
        .heartbeat(first.boot_id, ts(50))
        .await
        .expect("heartbeat");
    store
        .begin_boot("node-b", other.boot_id, ts(10), &[])
        .await
        .expect("boot");
    // node-a crashed and starts again: its first boot is recovered.
    let second = Node::new("node-a");
    store
        .begin_boot("node-a", second.boot_id, ts(100), &[])
        .await
        .expect("boot");

    let all = store.nodes(None, 10).await.expect("nodes");
    let summary: Vec<_> = all
        .iter()
        .map(|b| {
            (
                b.boot_id,
                b.node_id.as_str(),
                b.started_at,
                b.heartbeat_at,
                b.recovered,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (second.boot_id, "node-a", ts(100), ts(100), false),
            (other.boot_id, "node-b", ts(10), ts(10), false),
            (first.boot_id, "node-a", ts(0), ts(50), true),
        ]
    );
    let a: Vec<_> = store
        .nodes(Some("node-a"), 10)
        .await
        .expect("nodes")
        .iter()
        .map(|b| b.boot_id)
        .collect();
    assert_eq!(a, [second.boot_id, first.boot_id]);
    let newest = store.nodes(None, 1).await.expect("nodes");
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].boot_id, second.boot_id);
    assert!(store
        .nodes(Some("nobody"), 10)
        .await
        .expect("nodes")
        .is_empty());
}

async fn an_expired_persistent_session_is_recorded_on_its_last_connection<S: PresenceStore>(
    store: S,
) {
    let node = Node::new("n1");
    let (s1, s2) = (SessionId::new(), SessionId::new());
    store
        .apply(&[
            node.connected("dev", s1, 10),
            node.disconnected("dev", s1, DisconnectReason::ClientDisconnect, 11),
            node.connected("dev", s2, 12),
            node.disconnected("dev", s2, DisconnectReason::ConnectionLost, 13),
        ])
        .await
        .expect("apply");
    // Expiry in a later batch, applied twice (a retry): the first time stays.
    for _ in 0..2 {
        store
            .apply(&[node.expired("dev", s2, 100)])
            .await
            .expect("apply");
    }
    store
        .apply(&[node.expired("dev", s2, 200)])
        .await
        .expect("apply");
    let sessions = store.sessions("dev", 10).await.expect("sessions");
    assert_eq!(sessions[0].session_id, s2.0);
    assert_eq!(sessions[0].expired_at, Some(ts(100)));
    assert_eq!(sessions[1].expired_at, None);
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(d.last_reason.as_deref(), Some("connection_lost"));
}

async fn mqtt5_codes_protocol_and_held_sessions_are_recorded<S: PresenceStore>(store: S) {
    let node = Node::new("n1");
    let (s1, s2, s3) = (SessionId::new(), SessionId::new(), SessionId::new());
    // A connection, and its end in a later batch (the device is fenced in the database).
    store
        .apply(&[node.connected5("dev", s1, 10)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!((d.protocol, d.session_expires_at), (Protocol::V5, None));
    store
        .apply(&[node.disconnected5("dev", s1, 0x04, 11, Some(1000))])
        .await
        .expect("apply");
    let row = &store.sessions("dev", 10).await.expect("sessions")[0];
    assert_eq!(
        (
            row.protocol,
            row.reason_code,
            row.reason_string.as_deref(),
            row.session_expires_at
        ),
        (Protocol::V5, Some(4), Some("bye 4"), Some(ts(1000)))
    );
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!((d.online, d.session_expires_at), (false, Some(ts(1000))));
    // A late expiry of another (older) session clears nothing; the session's own does, and
    // leaves its row's record of what was planned.
    store
        .apply(&[node.expired("dev", SessionId(Uuid::nil()), 50)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(d.session_expires_at, Some(ts(1000)));
    store
        .apply(&[node.expired("dev", s1, 1000)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(d.session_expires_at, None);
    let row = &store.sessions("dev", 10).await.expect("sessions")[0];
    assert_eq!(
        (row.session_expires_at, row.expired_at),
        (Some(ts(1000)), Some(ts(1000)))
    );
    // Within one batch: a session ends held, and the device comes back (over 3.1.1): nothing
    // is held while it is online, and the new session is its protocol's.
    store
        .apply(&[
            node.connected5("dev", s2, 20),
            node.disconnected5("dev", s2, 0x00, 21, Some(2000)),
        ])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(d.session_expires_at, Some(ts(2000)));
    store
        .apply(&[node.connected("dev", s3, 22)])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(
        (d.online, d.protocol, d.session_expires_at),
        (true, Protocol::V311, None)
    );
    // s3 ends with its session held; a late expiry of s2's never clears it.
    store
        .apply(&[
            node.disconnected5("dev", s3, 0x00, 23, Some(3000)),
            node.expired("dev", s2, 24),
        ])
        .await
        .expect("apply");
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!((d.online, d.session_expires_at), (false, Some(ts(3000))));
    // A 3.1.1 row has no reason code.
    let s4 = SessionId::new();
    store
        .apply(&[
            node.connected("dev", s4, 30),
            node.disconnected("dev", s4, DisconnectReason::ConnectionLost, 31),
        ])
        .await
        .expect("apply");
    let row = &store.sessions("dev", 10).await.expect("sessions")[0];
    assert_eq!(
        (row.protocol, row.reason_code, row.reason_string.as_deref()),
        (Protocol::V311, None, None)
    );
    let d = store.device("dev").await.expect("query").expect("device");
    assert_eq!(d.session_expires_at, None);
}

/// At a new boot, of the persistent sessions the node's earlier boots held for offline
/// devices, the ones the broker state restored are held until their new expiry and the others
/// are marked expired: at their expiry when it passed while the node was down, else at the
/// start (lost with the broker's memory). One transaction.
async fn held_sessions_of_earlier_boots_are_restored_or_ended_at_start<S: PresenceStore>(store: S) {
    let (n1, n2) = (Node::new("n1"), Node::new("n2"));
    let [a, b, c, d, e] = std::array::from_fn(|_| SessionId::new());
    store
        .apply(&[
            n1.connected5("a", a, 10),
            n1.disconnected5("a", a, 0, 11, Some(1000)),
            n2.connected5("b", b, 12),
            n2.disconnected5("b", b, 0, 13, Some(1000)),
            n1.connected5("c", c, 14),
            n1.connected5("d", d, 15),
            n1.disconnected5("d", d, 0, 16, Some(18)),
            n1.connected5("e", e, 17),
            n1.disconnected5("e", e, 0, 18, Some(1000)),
        ])
        .await
        .expect("apply");
    // The broker state restored e's session (and one of a client presence never saw).
    let restored = [("e".to_string(), ts(2000)), ("ghost".to_string(), ts(2000))];
    let recovery = store
        .begin_boot("n1", Uuid::now_v7(), ts(20), &restored)
        .await
        .expect("boot");
    assert_eq!(
        (
            recovery.devices_offline,
            recovery.held_sessions_ended,
            recovery.held_sessions_restored
        ),
        (1, 2, 1)
    );
    let held = |d: Option<broker::store::Device>| d.expect("device").session_expires_at;
    let expired = |mut rows: Vec<broker::store::Session>| rows.remove(0).expired_at;
    // Lost with the broker's memory: expired at the start.
    assert_eq!(held(store.device("a").await.expect("query")), None);
    assert_eq!(
        expired(store.sessions("a", 1).await.expect("rows")),
        Some(ts(20))
    );
    // Expired while the node was down: at its expiry.
    assert_eq!(held(store.device("d").await.expect("query")), None);
    assert_eq!(
        expired(store.sessions("d", 1).await.expect("rows")),
        Some(ts(18))
    );
    // Restored: held until its new expiry.
    assert_eq!(
        held(store.device("e").await.expect("query")),
        Some(ts(2000))
    );
    assert_eq!(expired(store.sessions("e", 1).await.expect("rows")), None);
    assert_eq!(store.device("ghost").await.expect("query"), None);
    // Another node's held session is its own.
    assert_eq!(
        held(store.device("b").await.expect("query")),
        Some(ts(1000))
    );
    assert_eq!(expired(store.sessions("b", 1).await.expect("rows")), None);
    // An open session closed by the recovery held nothing.
    assert_eq!(held(store.device("c").await.expect("query")), None);
    assert_eq!(expired(store.sessions("c", 1).await.expect("rows")), None);
}

/// A migrator of `backend`'s migrations before `before` (the schema an earlier version
/// created), from copies in `dir`.
/// A credential row for `username` at `at`, with `hash` and the filter lists.
fn credential_record(
    username: &str,
    hash: &str,
    publish: Option<&[&str]>,
    subscribe: Option<&[&str]>,
    at: u64,
) -> CredentialRecord {
    let list = |l: Option<&[&str]>| l.map(|l| l.iter().map(|f| (*f).to_owned()).collect());
    CredentialRecord {
        credential: Credential {
            username: username.to_owned(),
            publish: list(publish),
            subscribe: list(subscribe),
            created_at: ts(at),
            updated_at: ts(at),
            revoked_at: None,
        },
        password_hash: hash.to_owned(),
    }
}

async fn credentials_are_created_rotated_revoked_and_listed<S: PresenceStore>(store: S) {
    let first = Hash::new_argon2id(b"one").expect("hash").to_line_field();
    let second = Hash::new_argon2id(b"two").expect("hash").to_line_field();
    let dev_1 = credential_record(
        "dev-1",
        &first,
        Some(&["t/dev-1/#"]),
        Some(&["c/dev-1"]),
        10,
    );
    assert!(store.create_credential(&dev_1).await.expect("create"));
    // A user name holds one credential: creating it again changes nothing.
    let again = credential_record("dev-1", &second, None, None, 11);
    assert!(!store.create_credential(&again).await.expect("create again"));
    assert_eq!(
        store.credential("dev-1").await.expect("read"),
        Some(dev_1.clone())
    );
    assert_eq!(store.credential("dev-9").await.expect("read"), None);

    // What authentication reads: the hash parsed, the lists as grants.
    let source = StoreCredentials(store.clone());
    let stored = source
        .credential("dev-1")
        .await
        .expect("lookup")
        .expect("a row");
    assert!(stored.hash.verify(b"one") && !stored.revoked);
    assert_eq!(
        stored.grants.as_deref(),
        Some(&Grants {
            publish: vec!["t/dev-1/#".into()],
            subscribe: vec!["c/dev-1".into()],
        })
    );
    assert!(source.credential("dev-9").await.expect("lookup").is_none());

    // Rotated: the new hash, updated_at moves, created_at stays.
    assert!(store
        .rotate_credential("dev-1", &second, ts(20))
        .await
        .expect("rotate"));
    assert!(!store
        .rotate_credential("dev-9", &second, ts(20))
        .await
        .expect("rotate"));
    let rotated = store.credential("dev-1").await.expect("read").expect("row");
    assert_eq!(rotated.password_hash, second);
    assert_eq!(
        (rotated.credential.created_at, rotated.credential.updated_at),
        (ts(10), ts(20))
    );

    // Revoked: kept (and listed) with revoked_at, never rotated or revoked again.
    assert!(store
        .revoke_credential("dev-1", ts(30))
        .await
        .expect("revoke"));
    assert!(!store
        .revoke_credential("dev-1", ts(31))
        .await
        .expect("revoke"));
    assert!(!store
        .rotate_credential("dev-1", &first, ts(31))
        .await
        .expect("rotate"));
    let revoked = store.credential("dev-1").await.expect("read").expect("row");
    assert_eq!(revoked.credential.revoked_at, Some(ts(30)));
    assert!(
        source
            .credential("dev-1")
            .await
            .expect("lookup")
            .expect("row")
            .revoked
    );
    // Created again after revocation: a new credential replaces the revoked one.
    assert!(store
        .create_credential(&again)
        .await
        .expect("create after revoke"));
    assert_eq!(
        store.credential("dev-1").await.expect("read"),
        Some(again.clone())
    );
    let source_again = source
        .credential("dev-1")
        .await
        .expect("lookup")
        .expect("row");
    assert_eq!(source_again.grants, None);

    // Listed by user name, in pages, never with a hash.
    for name in ["dev-3", "dev-2", "dev-4"] {
        let record = credential_record(name, &first, None, Some(&[]), 40);
        assert!(store.create_credential(&record).await.expect("create"));
    }
    let page = store.credentials(None, 3).await.expect("list");
    let names: Vec<&str> = page.iter().map(|c| c.username.as_str()).collect();
    assert_eq!(names, ["dev-1", "dev-2", "dev-3"]);
    assert_eq!(page[1].subscribe, Some(vec![]));
    let rest = store.credentials(Some("dev-3"), 3).await.expect("list");
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].username, "dev-4");
}

async fn migrations_before(backend: &str, before: &str, dir: &std::path::Path) -> Migrator {
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(backend);
    for entry in std::fs::read_dir(&all).expect("migrations") {
        let name = entry.expect("entry").file_name();
        if name.to_string_lossy().as_ref() < before {
            std::fs::copy(all.join(&name), dir.join(&name)).expect("copy");
        }
    }
    Migrator::new(dir).await.expect("migrator")
}

/// What a database of the version before 0004 holds once migrated forward: its device and
/// session were TCP without a certificate, and new connections record theirs.
async fn rows_of_version_3_read_as_tcp<S: PresenceStore>(store: S, old: SessionId) {
    store.migrate().await.expect("migrate forward");
    let d = store.device("old").await.expect("query").expect("device");
    assert_eq!((d.session_id, d.peer.as_str()), (old.0, "10.0.0.1:1"));
    assert_eq!((d.listener, d.identity), (Listener::Tcp, None));
    let sessions = store.sessions("old", 10).await.expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.session_id, s.listener, s.identity.as_deref()))
            .collect::<Vec<_>>(),
        [(old.0, Listener::Tcp, None)]
    );
    let node = Node::new("n1");
    let new = SessionId::new();
    store
        .apply(&[node.connected_on("old", new, 10, Listener::Tls, Some("device-7"))])
        .await
        .expect("apply");
    let d = store.device("old").await.expect("query").expect("device");
    assert_eq!(
        (d.session_id, d.listener, d.identity.as_deref()),
        (new.0, Listener::Tls, Some("device-7"))
    );
}

/// What a database of the version before 0005 holds once migrated forward: its device and
/// session were anonymous, without a user name, and new connections record theirs.
async fn rows_of_version_4_read_as_anonymous<S: PresenceStore>(store: S, old: SessionId) {
    store.migrate().await.expect("migrate forward");
    let d = store.device("old").await.expect("query").expect("device");
    assert_eq!((d.session_id, d.peer.as_str()), (old.0, "10.0.0.1:1"));
    assert_eq!((d.username, d.auth_method), (None, AuthMethod::Anonymous));
    let sessions = store.sessions("old", 10).await.expect("sessions");
    assert_eq!(
        sessions
            .iter()
            .map(|s| (s.session_id, s.username.as_deref(), s.auth_method))
            .collect::<Vec<_>>(),
        [(old.0, None, AuthMethod::Anonymous)]
    );
    let node = Node::new("n1");
    let new = SessionId::new();
    store
        .apply(&[node.connected_as("old", new, 10, Some("alice"), AuthMethod::Password)])
        .await
        .expect("apply");
    let d = store.device("old").await.expect("query").expect("device");
    assert_eq!(
        (d.session_id, d.username.as_deref(), d.auth_method),
        (new.0, Some("alice"), AuthMethod::Password)
    );
}

/// What a database of the version before 0007 holds once migrated forward: its device and
/// session were MQTT 3.1.1, without reason codes or held sessions.
async fn rows_of_version_6_read_as_mqtt_3_1_1<S: PresenceStore>(store: S, old: SessionId) {
    store.migrate().await.expect("migrate forward");
    let d = store.device("old").await.expect("query").expect("device");
    assert_eq!(
        (d.session_id, d.protocol, d.session_expires_at),
        (old.0, Protocol::V311, None)
    );
    let s = &store.sessions("old", 10).await.expect("sessions")[0];
    assert_eq!(
        (
            s.protocol,
            s.reason_code,
            s.reason_string.as_deref(),
            s.session_expires_at
        ),
        (Protocol::V311, None, None, None)
    );
}

/// A device and its open session as the versions before 0004 and 0005 wrote them (`$N` binds
/// by number on both backends; version 4's listener and identity take their defaults).
const OLD_SESSION: &str = "INSERT INTO sessions (session_id, device_id, node_id, boot_id, \
     seq, connected_at, peer, keep_alive, clean_session) \
     VALUES ($1, 'old', 'n0', $2, 1, $3, '10.0.0.1:1', 30, TRUE)";
const OLD_DEVICE: &str = "INSERT INTO devices (device_id, online, session_id, node_id, \
     connected_at, peer, keep_alive, updated_at) \
     VALUES ('old', TRUE, $1, 'n0', $2, '10.0.0.1:1', 30, $2)";

/// The URL of a SQLite database migrated up to (not including) migration `before`, holding
/// [`OLD_DEVICE`] with its session `old`; the guard keeps it alive.
async fn sqlite_database_before(before: &str, old: SessionId) -> (String, testkit::TempDir) {
    let dir = testkit::temp_dir("store-old");
    let url = format!("sqlite://{}/presence.db", dir.path().display());
    let migrations = testkit::temp_dir("migrations-old");
    let options = SqliteConnectOptions::from_str(&url)
        .expect("url")
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.expect("open");
    migrations_before("sqlite", before, migrations.path())
        .await
        .run(&pool)
        .await
        .expect("migrate to the old version");
    let at = ts(1).timestamp_micros();
    sqlx::query(OLD_SESSION)
        .bind(old.to_string())
        .bind(Uuid::now_v7().to_string())
        .bind(at)
        .execute(&pool)
        .await
        .expect("session");
    sqlx::query(OLD_DEVICE)
        .bind(old.to_string())
        .bind(at)
        .execute(&pool)
        .await
        .expect("device");
    pool.close().await;
    (url, dir)
}

/// A store on a PostgreSQL database migrated up to (not including) migration `before`,
/// holding [`OLD_DEVICE`] with its session `old`; the guard keeps it alive.
async fn postgres_database_before(
    before: &str,
    old: SessionId,
) -> (PgStore, testkit::pg::TestPostgres) {
    let pg = testkit::pg::TestPostgres::start().await;
    let store = PgStore::connect(pg.url(), 2).await.expect("open postgres");
    let migrations = testkit::temp_dir("migrations-old");
    migrations_before("postgres", before, migrations.path())
        .await
        .run(store.pool())
        .await
        .expect("migrate to the old version");
    sqlx::query(OLD_SESSION)
        .bind(old.0)
        .bind(Uuid::now_v7())
        .bind(ts(1))
        .execute(store.pool())
        .await
        .expect("session");
    sqlx::query(OLD_DEVICE)
        .bind(old.0)
        .bind(ts(1))
        .execute(store.pool())
        .await
        .expect("device");
    (store, pg)
}

#[tokio::test]
async fn sqlite_database_of_version_3_migrates_forward() {
    let old = SessionId::new();
    let (url, _dir) = sqlite_database_before("0004", old).await;
    let store = SqliteStore::connect(&url, 1).await.expect("open sqlite");
    rows_of_version_3_read_as_tcp(store, old).await;
}

#[tokio::test]
async fn postgres_database_of_version_3_migrates_forward() {
    let old = SessionId::new();
    let (store, _pg) = postgres_database_before("0004", old).await;
    rows_of_version_3_read_as_tcp(store, old).await;
}

#[tokio::test]
async fn sqlite_database_of_version_4_migrates_forward() {
    let old = SessionId::new();
    let (url, _dir) = sqlite_database_before("0005", old).await;
    let store = SqliteStore::connect(&url, 1).await.expect("open sqlite");
    rows_of_version_4_read_as_anonymous(store, old).await;
}

#[tokio::test]
async fn postgres_database_of_version_4_migrates_forward() {
    let old = SessionId::new();
    let (store, _pg) = postgres_database_before("0005", old).await;
    rows_of_version_4_read_as_anonymous(store, old).await;
}

#[tokio::test]
async fn sqlite_database_of_version_6_migrates_forward() {
    let old = SessionId::new();
    let (url, _dir) = sqlite_database_before("0007", old).await;
    let store = SqliteStore::connect(&url, 1).await.expect("open sqlite");
    rows_of_version_6_read_as_mqtt_3_1_1(store, old).await;
}

#[tokio::test]
async fn postgres_database_of_version_6_migrates_forward() {
    let old = SessionId::new();
    let (store, _pg) = postgres_database_before("0007", old).await;
    rows_of_version_6_read_as_mqtt_3_1_1(store, old).await;
}

macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _guard) = super::sqlite().await;
                    super::$name(store).await;
                }
            )*
        }
        mod postgres_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let (store, _guard) = super::postgres().await;
                    super::$name(store).await;
                }
            )*
        }
    };
}

store_tests!(
    connect_then_disconnect,
    listener_and_identity_are_recorded_on_sessions_and_devices,
    username_and_auth_method_are_recorded_on_sessions_and_devices,
    an_expired_persistent_session_is_recorded_on_its_last_connection,
    mqtt5_codes_protocol_and_held_sessions_are_recorded,
    held_sessions_of_earlier_boots_are_restored_or_ended_at_start,
    late_events_of_an_old_session_never_win,
    retried_and_replayed_batches_change_nothing,
    whole_session_in_one_batch_and_reconnect_keeps_last_disconnect,
    crash_recovery_closes_sessions_of_earlier_boots,
    pagination_filters_and_history_limits,
    large_batches_apply_in_one_transaction,
    takeover_within_one_batch_keeps_the_last_disconnect,
    boots_known_only_from_their_events_are_recovered,
    history_is_pruned_by_age_and_per_device_never_open_sessions,
    coalesced_sessions_count_in_history_and_totals,
    node_boots_are_listed_newest_first,
    credentials_are_created_rotated_revoked_and_listed,
);
