//! Batch planning, shared by both backends and pure (no SQL, no I/O): a batch of presence
//! records becomes the set-based operations that apply it in one transaction ([`BatchPlan`]).
//!
//! - history rows are idempotent on the session id (a retried batch never duplicates a row, and
//!   a close never overwrites an earlier close);
//! - a Disconnected changes a device's current state only if its session is still the device's
//!   current session, and a Connected never replaces a newer session (session ids are UUIDv7, so
//!   their order is their creation order); the backends' statements hold the fencing, the plan
//!   says what to fence;
//! - a device's sessions that begin and end within one batch beyond the first few (a reconnect
//!   loop, two clients fighting over one client id) are folded into a kept row's `coalesced`
//!   count instead of a row each, so that such a loop cannot multiply writes.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{ConnectionEvent, PresenceRecord};
use crate::labels::{AuthMethod, Listener, Protocol};

/// A Connected event, as a history row to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSession {
    pub session_id: Uuid,
    pub device_id: String,
    pub node_id: String,
    pub boot_id: Uuid,
    pub seq: i64,
    pub connected_at: DateTime<Utc>,
    pub peer: String,
    /// The listener (transport) the connection came in on.
    pub listener: Listener,
    /// The identity of the client's verified TLS certificate, if it presented one.
    pub identity: Option<String>,
    /// The user name it authenticated as (never the password), if a password was checked.
    pub username: Option<String>,
    /// How it was authenticated.
    pub auth_method: AuthMethod,
    pub keep_alive: i32,
    pub clean_session: bool,
    /// The protocol level the client speaks.
    pub protocol: Protocol,
    /// Sessions folded into this one (see [`BatchPlan`]); the row keeps its own session's
    /// peer, listener, identity, user name and authentication method.
    pub coalesced: i32,
}

/// A Disconnected event: closes a history row, and the device if it is still current.
#[derive(Debug, Clone, PartialEq)]
pub struct Close {
    pub device_id: String,
    pub session_id: Uuid,
    pub at: DateTime<Utc>,
    pub reason: &'static str,
    /// The MQTT 5 DISCONNECT's reason code (the client's, else the broker's).
    pub reason_code: Option<i32>,
    /// The client's MQTT 5 DISCONNECT reason string (escaped and bounded).
    pub reason_string: Option<String>,
    /// Until when the persistent session is held after this connection.
    pub expires_at: Option<DateTime<Utc>>,
}

/// The newest session of a device within a batch, with its state at the end of the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceUpsert {
    pub session: NewSession,
    /// Set when the batch also closed this session.
    pub closed: Option<(DateTime<Utc>, &'static str)>,
    /// The latest close of an older session of the device within the batch (a takeover or a
    /// quick reconnect): the device's last disconnect while this session is online.
    pub previous_close: Option<(DateTime<Utc>, &'static str)>,
    /// Until when the device's persistent session is held: set when the batch closed this
    /// session and the session outlives it; `None` while it is online.
    pub held_until: Option<DateTime<Utc>>,
}

impl DeviceUpsert {
    /// The device's last disconnect as of the end of the batch, if the batch saw one.
    pub fn last_close(&self) -> Option<(DateTime<Utc>, &'static str)> {
        self.closed.or(self.previous_close)
    }
}

/// A SessionExpired event: marks the history row of the session's last connection, and clears
/// the device's held session if that connection is still its current one.
#[derive(Debug, Clone, PartialEq)]
pub struct Expiry {
    pub device_id: String,
    pub session_id: Uuid,
    pub at: DateTime<Utc>,
}

/// A broker boot seen in a batch, registered so that crash recovery also finds boots that
/// never reached `begin_boot` (their events came from the journal).
#[derive(Debug, Clone, PartialEq)]
pub struct BootSeen {
    pub boot_id: Uuid,
    pub node_id: String,
    /// Earliest event time of the boot in the batch.
    pub first: DateTime<Utc>,
    /// Latest event time: the boot was alive then.
    pub last: DateTime<Utc>,
}

fn later(
    a: Option<(DateTime<Utc>, &'static str)>,
    b: Option<(DateTime<Utc>, &'static str)>,
) -> Option<(DateTime<Utc>, &'static str)> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.0 >= x.0 { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

/// A batch of events turned into set-based operations, in the order they must run.
///
/// Coalescing: a device's sessions that begin and end within the batch ("transient": a
/// reconnect loop, two clients taking one client id from each other) are recorded as history
/// rows up to `coalesce_after` of them; each later one is folded into the last kept row of the
/// device with the same reason (its `coalesced` count grows by one; the row stays that of its
/// own session, peer, listener, identity and authentication included) and gets no row, no close and no device
/// update, or is kept when no kept row has its reason (so at most
/// `coalesce_after` + 6 transient rows per device and batch). The device's newest session in the
/// batch is never folded, so its current state and `last_session` stay exact, and the totals
/// by reason count folded sessions under their own reason.
#[derive(Debug, Default, PartialEq)]
pub struct BatchPlan {
    /// History rows to insert (ignored when the session id exists).
    pub inserts: Vec<NewSession>,
    /// History rows to close (only if still open).
    pub closes: Vec<Close>,
    /// Devices to turn offline if the closed session is still their current one (sessions
    /// that did not start in this batch).
    pub offline: Vec<Close>,
    /// Devices whose newest session started in this batch; applied only if that session is
    /// newer than the stored one (or the same one, going offline). Sorted by device id, as is
    /// `offline`, so that concurrent writers lock rows in the same order.
    pub upserts: Vec<DeviceUpsert>,
    /// Boots whose events are in the batch.
    pub boots: Vec<BootSeen>,
    /// Persistent sessions discarded, after the rows above are written (sorted by device id).
    pub expiries: Vec<Expiry>,
    /// Sessions folded into kept rows instead of getting their own.
    pub coalesced: u64,
}

pub fn timestamp(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

impl BatchPlan {
    pub fn new(batch: &[PresenceRecord], coalesce_after: usize) -> Self {
        let mut plan = BatchPlan::default();
        let mut newest: HashMap<&str, usize> = HashMap::new();
        let mut boots: HashMap<Uuid, BootSeen> = HashMap::new();
        for record in batch {
            let at = timestamp(record.event.time());
            boots
                .entry(record.boot_id)
                .and_modify(|b| {
                    b.first = b.first.min(at);
                    b.last = b.last.max(at);
                })
                .or_insert_with(|| BootSeen {
                    boot_id: record.boot_id,
                    node_id: record.node_id.clone(),
                    first: at,
                    last: at,
                });
            match &record.event {
                ConnectionEvent::Connected {
                    client_id,
                    session_id,
                    seq,
                    peer,
                    listener,
                    identity,
                    keep_alive,
                    clean_session,
                    time,
                    username,
                    auth_method,
                    protocol,
                } => {
                    let session = NewSession {
                        session_id: session_id.0,
                        device_id: client_id.clone(),
                        node_id: record.node_id.clone(),
                        boot_id: record.boot_id,
                        seq: i64::try_from(*seq).unwrap_or(i64::MAX),
                        connected_at: timestamp(*time),
                        peer: peer.to_string(),
                        listener: *listener,
                        identity: identity.clone(),
                        username: username.clone(),
                        auth_method: *auth_method,
                        keep_alive: i32::from(*keep_alive),
                        clean_session: *clean_session,
                        protocol: *protocol,
                        coalesced: 0,
                    };
                    match newest.get(client_id.as_str()) {
                        Some(&i) if plan.upserts[i].session.session_id >= session.session_id => {}
                        Some(&i) => {
                            let previous_close = plan.upserts[i].last_close();
                            plan.upserts[i] = DeviceUpsert {
                                session: session.clone(),
                                closed: None,
                                previous_close,
                                held_until: None,
                            }
                        }
                        None => {
                            newest.insert(client_id, plan.upserts.len());
                            plan.upserts.push(DeviceUpsert {
                                session: session.clone(),
                                closed: None,
                                previous_close: None,
                                held_until: None,
                            });
                        }
                    }
                    plan.inserts.push(session);
                }
                ConnectionEvent::Disconnected {
                    client_id,
                    session_id,
                    reason,
                    reason_code,
                    reason_string,
                    session_expires_at,
                    time,
                    ..
                } => {
                    let close = Close {
                        device_id: client_id.clone(),
                        session_id: session_id.0,
                        at: timestamp(*time),
                        reason: reason.as_str(),
                        reason_code: reason_code.map(i32::from),
                        reason_string: reason_string.clone(),
                        expires_at: session_expires_at.map(timestamp),
                    };
                    match newest.get(client_id.as_str()) {
                        Some(&i) if plan.upserts[i].session.session_id == session_id.0 => {
                            plan.upserts[i].closed = Some((close.at, close.reason));
                            plan.upserts[i].held_until = close.expires_at;
                        }
                        Some(&i) => {
                            let u = &mut plan.upserts[i];
                            if session_id.0 < u.session.session_id {
                                u.previous_close =
                                    later(u.previous_close, Some((close.at, close.reason)));
                            }
                            plan.offline.push(close.clone());
                        }
                        None => plan.offline.push(close.clone()),
                    }
                    plan.closes.push(close);
                }
                ConnectionEvent::SessionExpired {
                    client_id,
                    session_id,
                    ..
                } => {
                    plan.expiries.push(Expiry {
                        device_id: client_id.clone(),
                        session_id: session_id.0,
                        at,
                    });
                }
            }
        }
        plan.upserts
            .sort_by(|a, b| a.session.device_id.cmp(&b.session.device_id));
        plan.offline.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        plan.expiries.sort_by(|a, b| a.device_id.cmp(&b.device_id));
        plan.boots = boots.into_values().collect();
        plan.boots.sort_by_key(|b| b.boot_id);
        if coalesce_after > 0 {
            plan.coalesce(coalesce_after);
        }
        plan
    }

    /// Folds each device's transient sessions beyond the first `keep` (see [`BatchPlan`]).
    fn coalesce(&mut self, keep: usize) {
        let newest: HashSet<Uuid> = self.upserts.iter().map(|u| u.session.session_id).collect();
        let reasons: HashMap<Uuid, &'static str> = self
            .closes
            .iter()
            .map(|c| (c.session_id, c.reason))
            .collect();
        /// A device's transient rows kept so far.
        #[derive(Default)]
        struct Kept {
            count: usize,
            /// Reason -> the insert index of the last kept row with it.
            by_reason: HashMap<&'static str, usize>,
        }
        let mut kept: HashMap<&str, Kept> = HashMap::new();
        let mut into: Vec<(usize, Uuid)> = Vec::new();
        for (i, session) in self.inserts.iter().enumerate() {
            let Some(&reason) = reasons.get(&session.session_id) else {
                continue; // still open at the end of the batch
            };
            if newest.contains(&session.session_id) {
                continue;
            }
            let device = kept.entry(session.device_id.as_str()).or_default();
            match device.by_reason.get(reason) {
                Some(&row) if device.count >= keep => into.push((row, session.session_id)),
                _ => {
                    device.count += 1;
                    device.by_reason.insert(reason, i);
                }
            }
        }
        if into.is_empty() {
            return;
        }
        let folded: HashSet<Uuid> = into.iter().map(|(_, id)| *id).collect();
        for (row, _) in &into {
            self.inserts[*row].coalesced += 1;
        }
        self.inserts.retain(|s| !folded.contains(&s.session_id));
        self.closes.retain(|c| !folded.contains(&c.session_id));
        self.offline.retain(|c| !folded.contains(&c.session_id));
        self.coalesced = folded.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SessionId;
    use crate::labels::DisconnectReason;
    use std::time::Duration;

    /// Kept rows per device before folding (`bridge.coalesce_after`'s default).
    const KEEP: usize = 3;

    fn connected(id: &str, session: SessionId, seq: u64) -> PresenceRecord {
        connected_on(id, session, seq, Listener::Tcp, None)
    }

    fn connected_on(
        id: &str,
        session: SessionId,
        seq: u64,
        listener: Listener,
        identity: Option<&str>,
    ) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: Uuid::nil(),
            event: ConnectionEvent::Connected {
                client_id: id.into(),
                session_id: session,
                seq,
                peer: "127.0.0.1:1".parse().expect("addr"),
                listener,
                identity: identity.map(str::to_owned),
                username: None,
                auth_method: AuthMethod::Anonymous,
                keep_alive: 30,
                clean_session: true,
                protocol: Protocol::V311,
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(seq),
            },
        }
    }

    /// A Connected of a client that authenticated as `username` (with a password) or, with
    /// `None`, with its certificate.
    fn authenticated(mut record: PresenceRecord, username: Option<&str>) -> PresenceRecord {
        if let ConnectionEvent::Connected {
            username: u,
            auth_method,
            ..
        } = &mut record.event
        {
            *u = username.map(str::to_owned);
            *auth_method = match username {
                Some(_) => AuthMethod::Password,
                None => AuthMethod::Certificate,
            };
        }
        record
    }

    fn disconnected(id: &str, session: SessionId) -> PresenceRecord {
        disconnected_as(id, session, DisconnectReason::Takeover)
    }

    fn disconnected_as(id: &str, session: SessionId, reason: DisconnectReason) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: Uuid::nil(),
            event: ConnectionEvent::Disconnected {
                client_id: id.into(),
                session_id: session,
                seq: 0,
                reason,
                reason_code: None,
                reason_string: None,
                session_expires_at: None,
                time: SystemTime::UNIX_EPOCH,
            },
        }
    }

    /// `n` sessions of `id` that begin and end (with `reason`) one after the other.
    fn transient(id: &str, n: usize, reason: DisconnectReason) -> Vec<PresenceRecord> {
        (0..n)
            .flat_map(|_| {
                let s = SessionId::new();
                [connected(id, s, 1), disconnected_as(id, s, reason)]
            })
            .collect()
    }

    fn coalesced_of(plan: &BatchPlan, id: &str) -> Vec<i32> {
        plan.inserts
            .iter()
            .filter(|s| s.device_id == id)
            .map(|s| s.coalesced)
            .collect()
    }

    #[test]
    fn plan_folds_a_takeover_fight_beyond_the_first_sessions() {
        let mut batch = transient("a", 10, DisconnectReason::Takeover);
        batch.extend(transient("b", 2, DisconnectReason::Takeover));
        let last = SessionId::new();
        batch.push(connected("a", last, 2));
        let plan = BatchPlan::new(&batch, 3);
        assert_eq!(coalesced_of(&plan, "a"), [0, 0, 7, 0]);
        assert_eq!(coalesced_of(&plan, "b"), [0, 0]);
        assert_eq!(plan.coalesced, 7);
        // Only kept rows are closed; the folded ones leave no trace but their count.
        assert_eq!(plan.closes.len(), 3 + 2);
        assert!(plan.offline.is_empty());
        // The device's state is exact: online on its newest session, last closed by takeover.
        let a = &plan.upserts[0];
        assert_eq!(a.session.session_id, last.0);
        assert_eq!(a.closed, None);
        assert_eq!(a.last_close().map(|c| c.1), Some("takeover"));
        // Without coalescing, a row per session.
        let plan = BatchPlan::new(&batch, 0);
        assert_eq!(plan.inserts.len(), 13);
        assert_eq!(plan.coalesced, 0);
    }

    #[test]
    fn plan_folds_sessions_only_into_a_row_with_their_reason() {
        use DisconnectReason::{ClientDisconnect, Takeover};
        let mut batch = transient("a", 5, Takeover);
        batch.extend(transient("a", 2, ClientDisconnect));
        batch.extend(transient("a", 2, Takeover));
        // The newest session also ends in the batch: it stays a row, and the device offline.
        batch.extend(transient("a", 1, ClientDisconnect));
        let plan = BatchPlan::new(&batch, 2);
        let rows: Vec<(i32, &str)> = plan
            .inserts
            .iter()
            .map(|s| {
                let reason = plan
                    .closes
                    .iter()
                    .find(|c| c.session_id == s.session_id)
                    .map_or("open", |c| c.reason);
                (s.coalesced, reason)
            })
            .collect();
        assert_eq!(
            rows,
            [
                (0, "takeover"),
                (5, "takeover"),
                (1, "client_disconnect"),
                (0, "client_disconnect"),
            ]
        );
        // Totals by reason stay exact: 7 takeovers, 3 clean disconnects.
        let total =
            |reason: &str| -> i32 { rows.iter().filter(|r| r.1 == reason).map(|r| 1 + r.0).sum() };
        assert_eq!((total("takeover"), total("client_disconnect")), (7, 3));
        assert_eq!(
            plan.upserts[0].closed.map(|c| c.1),
            Some("client_disconnect")
        );
    }

    #[test]
    fn rows_and_devices_keep_the_listener_and_identity_of_their_own_session() {
        use DisconnectReason::Takeover;
        // Two clients fight over one client id: one with a certificate over TLS, one over TCP.
        let mut batch = Vec::new();
        for i in 0..6 {
            let s = SessionId::new();
            batch.push(if i % 2 == 0 {
                connected_on("a", s, i, Listener::Tls, Some("device-7"))
            } else {
                connected_on("a", s, i, Listener::Tcp, None)
            });
            batch.push(disconnected_as("a", s, Takeover));
        }
        let last = SessionId::new();
        batch.push(connected_on("a", last, 9, Listener::Wss, Some("device-8")));
        let plan = BatchPlan::new(&batch, 2);
        let rows: Vec<(Listener, Option<&str>, i32)> = plan
            .inserts
            .iter()
            .map(|s| (s.listener, s.identity.as_deref(), s.coalesced))
            .collect();
        // The folded sessions leave their count in the second kept row, which stays its own.
        assert_eq!(
            rows,
            [
                (Listener::Tls, Some("device-7"), 0),
                (Listener::Tcp, None, 4),
                (Listener::Wss, Some("device-8"), 0),
            ]
        );
        let device = &plan.upserts[0].session;
        assert_eq!(
            (device.listener, device.identity.as_deref()),
            (Listener::Wss, Some("device-8"))
        );
    }

    #[test]
    fn rows_and_devices_keep_the_user_name_and_method_of_their_own_session() {
        use DisconnectReason::Takeover;
        // A password client and a certificate client fight over one client id; a third one
        // comes in anonymously and stays.
        let mut batch = Vec::new();
        for i in 0..6 {
            let s = SessionId::new();
            let c = connected("a", s, i);
            batch.push(if i % 2 == 0 {
                authenticated(c, Some("alice"))
            } else {
                authenticated(c, None)
            });
            batch.push(disconnected_as("a", s, Takeover));
        }
        batch.push(connected("a", SessionId::new(), 9));
        let plan = BatchPlan::new(&batch, 2);
        let rows: Vec<(Option<&str>, AuthMethod, i32)> = plan
            .inserts
            .iter()
            .map(|s| (s.username.as_deref(), s.auth_method, s.coalesced))
            .collect();
        assert_eq!(
            rows,
            [
                (Some("alice"), AuthMethod::Password, 0),
                (None, AuthMethod::Certificate, 4),
                (None, AuthMethod::Anonymous, 0),
            ]
        );
        let device = &plan.upserts[0].session;
        assert_eq!(
            (device.username.as_deref(), device.auth_method),
            (None, AuthMethod::Anonymous)
        );
        // And the other way round: the device takes the authenticated newest session's.
        let s = SessionId::new();
        let plan = BatchPlan::new(&[authenticated(connected("b", s, 1), Some("bob"))], KEEP);
        let device = &plan.upserts[0].session;
        assert_eq!(
            (device.username.as_deref(), device.auth_method),
            (Some("bob"), AuthMethod::Password)
        );
    }

    #[test]
    fn plan_keeps_the_newest_session_per_device() {
        let old = SessionId::new();
        let s1 = SessionId::new();
        let s2 = SessionId::new();
        let plan = BatchPlan::new(
            &[
                disconnected("a", old),
                connected("a", s1, 1),
                disconnected("a", s1),
                connected("a", s2, 2),
                connected("b", SessionId::new(), 3),
            ],
            KEEP,
        );
        assert_eq!(plan.inserts.len(), 3);
        assert_eq!(plan.closes.len(), 2);
        assert_eq!(plan.upserts.len(), 2);
        assert_eq!(plan.upserts[0].session.session_id, s2.0);
        assert_eq!(plan.upserts[0].closed, None);
        // The close of `old` is fenced in the database; s1 is superseded by s2 in the batch.
        assert_eq!(
            plan.offline
                .iter()
                .map(|c| c.session_id)
                .collect::<Vec<_>>(),
            [old.0]
        );
    }

    #[test]
    fn plan_keeps_the_takeover_close_for_the_new_session() {
        let s1 = SessionId::new();
        let s2 = SessionId::new();
        let plan = BatchPlan::new(
            &[
                connected("a", s1, 1),
                disconnected("a", s1),
                connected("a", s2, 2),
            ],
            KEEP,
        );
        assert_eq!(plan.upserts.len(), 1);
        assert_eq!(plan.upserts[0].closed, None);
        assert_eq!(plan.upserts[0].last_close().map(|c| c.1), Some("takeover"));
        assert_eq!(plan.boots.len(), 1);
    }

    /// A Disconnected of an MQTT 5 client with `code`, whose session is held for an hour.
    fn disconnected_held(id: &str, session: SessionId, code: u8) -> PresenceRecord {
        let mut record = disconnected_as(id, session, DisconnectReason::ClientDisconnect);
        if let ConnectionEvent::Disconnected {
            reason_code,
            reason_string,
            session_expires_at,
            ..
        } = &mut record.event
        {
            *reason_code = Some(code);
            *reason_string = Some("bye".into());
            *session_expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(3600));
        }
        record
    }

    #[test]
    fn plan_carries_reason_codes_and_held_sessions_to_rows_and_devices() {
        let held = Some(timestamp(
            SystemTime::UNIX_EPOCH + Duration::from_secs(3600),
        ));
        let (old, s1, s2) = (SessionId::new(), SessionId::new(), SessionId::new());
        let plan = BatchPlan::new(
            &[
                disconnected_held("a", old, 0x04),
                connected("b", s1, 1),
                disconnected_held("b", s1, 0x00),
                connected("c", s2, 2),
                disconnected_held("c", s2, 0x00),
                connected("c", SessionId::new(), 3),
            ],
            KEEP,
        );
        // The history rows get the code, the string and the held-until of their connection.
        let a = &plan.closes[0];
        assert_eq!(
            (a.reason_code, a.reason_string.as_deref(), a.expires_at),
            (Some(4), Some("bye"), held)
        );
        // A device whose session did not start in the batch is fenced in the database.
        assert_eq!(plan.offline[0].expires_at, held);
        // A device that went offline in the batch holds its session; one that came back, none.
        let by_device = |id: &str| {
            plan.upserts
                .iter()
                .find(|u| u.session.device_id == id)
                .expect("upsert")
                .held_until
        };
        assert_eq!((by_device("b"), by_device("c")), (held, None));
        let plan = BatchPlan::new(
            &[PresenceRecord {
                node_id: "n".into(),
                boot_id: Uuid::nil(),
                event: ConnectionEvent::SessionExpired {
                    client_id: "a".into(),
                    session_id: old,
                    time: SystemTime::UNIX_EPOCH,
                },
            }],
            KEEP,
        );
        assert_eq!(plan.expiries[0].device_id, "a");
    }

    #[test]
    fn plan_closes_a_session_opened_in_the_same_batch() {
        let s = SessionId::new();
        let plan = BatchPlan::new(&[connected("a", s, 1), disconnected("a", s)], KEEP);
        assert!(plan.offline.is_empty());
        assert_eq!(plan.upserts[0].closed.map(|c| c.1), Some("takeover"));
    }
}
