//! Sessions: the state the broker keeps per client id, across connections when
//! clean_session = false (subscriptions, queued and in-flight messages, QoS 2 receipts).
//!
//! A [`Session`] is shared between the connection that currently owns it, the router (which
//! enqueues messages for it) and the registry. Locking rule: a session's state lock is never held
//! while taking the router's subscription lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use atomic_waker::AtomicWaker;
use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;

use super::codec;
use crate::metrics::metrics;
use crate::presence::SessionId;

/// A message as routed: shared by every subscriber it goes to.
#[derive(Debug)]
pub struct Message {
    /// The topic it was published to.
    pub topic: Box<str>,
    /// Its own copy of the payload, so that it never pins a connection's read buffer.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The publisher's retain flag.
    pub retain: bool,
}

/// One message waiting for a client.
#[derive(Debug, Clone)]
struct Outgoing {
    message: Arc<Message>,
    /// min(publish QoS, subscription QoS).
    qos: QoS,
    /// Set only when it is a retained message sent in answer to a SUBSCRIBE.
    retain: bool,
}

/// Where an outgoing QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Inflight {
    pkid: u16,
    out: Outgoing,
    stage: Stage,
}

/// Mutable session state, behind [`Session::state`].
#[derive(Debug, Default)]
pub struct SessionState {
    /// clean_session = false: the state outlives the connection.
    pub persistent: bool,
    /// The connection using the session now, if any.
    pub owner: Option<SessionId>,
    /// Topic filters and their granted QoS (also held by the router, which matches them).
    subscriptions: Vec<(Box<str>, QoS)>,
    /// Messages not yet sent (beyond the in-flight window, or written out soon).
    pending: VecDeque<Outgoing>,
    /// QoS 1/2 messages sent and not yet acknowledged, oldest first.
    inflight: VecDeque<Inflight>,
    /// Last packet id used for an outgoing message.
    last_pkid: u16,
    /// Packet ids of QoS 2 messages received and not yet released (PUBREL).
    incoming_qos2: Vec<u16>,
    /// Messages have been dropped since the queue was last empty (logged once per episode).
    overflowing: bool,
    /// The session was forgotten (its clean-session connection ended): the router may still
    /// hold it for a moment, but nothing is queued any more.
    pub ended: bool,
}

impl SessionState {
    /// Forgets everything but the owner (a clean-session connect, or a session that ends).
    /// Returns the subscriptions the router must drop.
    pub fn clear(&mut self) -> Vec<Box<str>> {
        metrics().messages_queued.sub(self.pending.len() as i64);
        self.pending = VecDeque::new();
        self.inflight = VecDeque::new();
        self.incoming_qos2 = Vec::new();
        self.last_pkid = 0;
        std::mem::take(&mut self.subscriptions)
            .into_iter()
            .map(|(filter, _)| filter)
            .collect()
    }

    /// Records a subscription (replacing the QoS of an existing one).
    pub fn add_subscription(&mut self, filter: &str, qos: QoS) {
        match self.subscriptions.iter_mut().find(|(f, _)| &**f == filter) {
            Some(existing) => existing.1 = qos,
            None => self.subscriptions.push((filter.into(), qos)),
        }
    }

    /// Forgets a subscription.
    pub fn remove_subscription(&mut self, filter: &str) {
        self.subscriptions.retain(|(f, _)| &**f != filter);
    }

    /// Whether a message was queued or sent since the session started.
    pub fn has_messages(&self) -> bool {
        !self.pending.is_empty() || !self.inflight.is_empty()
    }

    /// Records a received QoS 2 packet id; false when it was already recorded (a redelivery that
    /// must not be routed again).
    pub fn receive_qos2(&mut self, pkid: u16) -> bool {
        if self.incoming_qos2.contains(&pkid) {
            return false;
        }
        self.incoming_qos2.push(pkid);
        true
    }

    /// Forgets a received QoS 2 packet id (PUBREL).
    pub fn release_qos2(&mut self, pkid: u16) {
        self.incoming_qos2.retain(|p| *p != pkid);
    }

    /// PUBACK: the QoS 1 message is delivered.
    pub fn puback(&mut self, pkid: u16) -> bool {
        self.remove_inflight(pkid, Stage::Published, QoS::AtLeastOnce)
    }

    /// PUBREC: the QoS 2 message is received; the caller sends PUBREL.
    pub fn pubrec(&mut self, pkid: u16) -> bool {
        match self
            .inflight
            .iter_mut()
            .find(|f| f.pkid == pkid && f.out.qos == QoS::ExactlyOnce)
        {
            Some(f) => {
                f.stage = Stage::Released;
                true
            }
            None => false,
        }
    }

    /// PUBCOMP: the QoS 2 exchange is complete.
    pub fn pubcomp(&mut self, pkid: u16) -> bool {
        self.remove_inflight(pkid, Stage::Released, QoS::ExactlyOnce)
    }

    fn remove_inflight(&mut self, pkid: u16, stage: Stage, qos: QoS) -> bool {
        match self
            .inflight
            .iter()
            .position(|f| f.pkid == pkid && f.stage == stage && f.out.qos == qos)
        {
            Some(i) => {
                self.inflight.remove(i);
                true
            }
            None => false,
        }
    }

    /// Writes every in-flight message again (PUBLISH with DUP, or PUBREL), as a reconnecting
    /// persistent session requires.
    pub fn write_inflight(&self, buf: &mut BytesMut) -> usize {
        for f in &self.inflight {
            let before = buf.len();
            let kind = match f.stage {
                Stage::Published => "publish",
                Stage::Released => "pubrel",
            };
            match f.stage {
                Stage::Published => codec::write_publish(
                    buf,
                    &f.out.message.topic,
                    &f.out.message.payload,
                    f.out.qos,
                    f.pkid,
                    f.out.retain,
                    true,
                ),
                Stage::Released => codec::write_packet(
                    buf,
                    &rumqttc::mqttbytes::v4::Packet::PubRel(rumqttc::mqttbytes::v4::PubRel::new(
                        f.pkid,
                    )),
                ),
            }
            metrics().sent.count(kind, 1, buf.len() - before);
        }
        self.inflight.len()
    }

    /// Moves pending messages into `buf` until it holds `limit` bytes or the in-flight window is
    /// full. Returns how many PUBLISH packets were written.
    pub fn write_pending(
        &mut self,
        buf: &mut BytesMut,
        limit: usize,
        max_inflight: usize,
    ) -> usize {
        let mut written = 0;
        while buf.len() < limit {
            let Some(front) = self.pending.front() else {
                break;
            };
            let pkid = if front.qos == QoS::AtMostOnce {
                0
            } else {
                if self.inflight.len() >= max_inflight {
                    break;
                }
                self.next_pkid()
            };
            let Some(out) = self.pending.pop_front() else {
                break;
            };
            metrics().messages_queued.dec();
            codec::write_publish(
                buf,
                &out.message.topic,
                &out.message.payload,
                out.qos,
                pkid,
                out.retain,
                false,
            );
            if out.qos != QoS::AtMostOnce {
                self.inflight.push_back(Inflight {
                    pkid,
                    out,
                    stage: Stage::Published,
                });
            }
            written += 1;
        }
        if self.pending.is_empty() {
            self.overflowing = false;
            if self.pending.capacity() > 16 {
                self.pending = VecDeque::new();
            }
        }
        written
    }

    fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid == 0 {
                continue;
            }
            let pkid = self.last_pkid;
            if !self.inflight.iter().any(|f| f.pkid == pkid) {
                return pkid;
            }
        }
    }
}

/// Why a message was not queued for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The session's queue is at `mqtt.max_queued_messages`.
    QueueFull,
    /// QoS 0 messages are not kept for a persistent session while its client is away.
    Qos0Offline,
    /// The subscriber's session ended while the message was being routed.
    SessionEnded,
}

impl DropReason {
    /// Every reason (the closed set of the metric label).
    pub const ALL: [DropReason; 3] = [Self::QueueFull, Self::Qos0Offline, Self::SessionEnded];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Qos0Offline => "qos0_offline",
            Self::SessionEnded => "session_ended",
        }
    }
}

/// Flag in [`Session::signals`]: messages were queued.
const QUEUED: u8 = 1;
/// Flag in [`Session::signals`]: a newer connection wants the session; the owner must close.
const KICKED: u8 = 2;
/// Flag in [`Session::signals`]: the broker is shutting down; the owner must close.
const SHUTDOWN: u8 = 4;

/// What the owning connection is asked to do, read by [`Session::take_signals`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signals(u8);

impl Signals {
    /// A newer connection with the same client id is waiting: close with reason takeover.
    pub fn kicked(self) -> bool {
        self.0 & KICKED != 0
    }

    /// The broker is shutting down: close with reason broker_shutdown.
    pub fn shutdown(self) -> bool {
        self.0 & SHUTDOWN != 0
    }
}

/// The state of one client id.
///
/// Kept small: one exists per connected device. The owning connection is woken through an
/// [`AtomicWaker`] plus flag bits rather than per-connection channels, tokens or futures; a
/// connection waiting to take a session over waits on [`super::Shared::released`].
#[derive(Debug)]
pub struct Session {
    /// The MQTT client id.
    pub client_id: Arc<str>,
    /// Unique per `Session` object, so that the router can tell two incarnations of a client id
    /// apart.
    pub key: u64,
    state: Mutex<SessionState>,
    /// Flags for the owner ([`QUEUED`], [`KICKED`]).
    signals: AtomicU8,
    /// The owning connection's task.
    waker: AtomicWaker,
    /// When the owner last received a packet, in milliseconds since the Unix epoch. Kept in
    /// memory only: every PINGREQ updates it, the database never sees it.
    last_seen_ms: AtomicU64,
}

impl Session {
    /// A new, empty session.
    pub fn new(client_id: Arc<str>, key: u64) -> Self {
        Self {
            client_id,
            key,
            state: Mutex::new(SessionState::default()),
            signals: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    /// Records that the owner received a packet now.
    pub fn touch(&self) {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_seen_ms.store(ms, Ordering::Relaxed);
    }

    /// When the owner last received a packet.
    pub fn last_seen(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + std::time::Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed))
    }

    /// Locks the state. A poisoned lock (a panic elsewhere) still yields the state: every
    /// mutation leaves it consistent.
    pub fn state(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal(&self, flag: u8) {
        self.signals.fetch_or(flag, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Asks the owning connection to close with reason takeover.
    pub fn kick(&self) {
        self.signal(KICKED);
    }

    /// Asks the owning connection to close with reason broker_shutdown.
    pub fn shut_down(&self) {
        self.signal(SHUTDOWN);
    }

    /// Registers the owner's waker and returns (and clears) the pending signals. Register first,
    /// then read: a signal raised in between still wakes the task.
    pub fn take_signals(&self, waker: &Waker) -> Signals {
        self.waker.register(waker);
        Signals(self.signals.swap(0, Ordering::AcqRel))
    }

    /// Clears signals meant for a previous owner (called with the state locked, on attach).
    pub fn reset_signals(&self) {
        self.signals.store(0, Ordering::Release);
    }

    /// Queues a message for the client and wakes its connection.
    pub fn enqueue(
        &self,
        message: Arc<Message>,
        qos: QoS,
        retain: bool,
        max_queued: usize,
    ) -> Result<(), DropReason> {
        {
            let mut st = self.state();
            if st.ended {
                return Err(DropReason::SessionEnded);
            }
            if st.owner.is_none() && qos == QoS::AtMostOnce {
                return Err(DropReason::Qos0Offline);
            }
            if st.pending.len() >= max_queued {
                if !st.overflowing {
                    st.overflowing = true;
                    tracing::warn!(
                        client_id = &*self.client_id,
                        online = st.owner.is_some(),
                        max_queued,
                        "Session queue full: dropping its messages until the client catches up \
                         (counted in heartwire_messages_dropped_total, reason queue_full)."
                    );
                }
                return Err(DropReason::QueueFull);
            }
            st.pending.push_back(Outgoing {
                message,
                qos,
                retain,
            });
        }
        metrics().messages_queued.inc();
        self.signal(QUEUED);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: "t".into(),
            payload: Bytes::from_static(b"x"),
            qos,
            retain: false,
        })
    }

    #[test]
    fn inflight_window_and_acks() {
        let mut st = SessionState::default();
        for _ in 0..5 {
            st.pending.push_back(Outgoing {
                message: msg(QoS::AtLeastOnce),
                qos: QoS::AtLeastOnce,
                retain: false,
            });
        }
        let mut buf = BytesMut::new();
        assert_eq!(st.write_pending(&mut buf, 1 << 20, 2), 2);
        assert_eq!(st.inflight.len(), 2);
        assert!(st.puback(1));
        assert!(!st.puback(1), "a second PUBACK for the same id is ignored");
        assert_eq!(st.write_pending(&mut buf, 1 << 20, 2), 1);
        assert_eq!(
            st.inflight.iter().map(|f| f.pkid).collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[test]
    fn qos2_stages() {
        let mut st = SessionState::default();
        st.pending.push_back(Outgoing {
            message: msg(QoS::ExactlyOnce),
            qos: QoS::ExactlyOnce,
            retain: false,
        });
        let mut buf = BytesMut::new();
        st.write_pending(&mut buf, 1 << 20, 10);
        assert!(!st.pubcomp(1), "PUBCOMP before PUBREC does not complete");
        assert!(st.pubrec(1));
        assert!(st.pubcomp(1));
        assert!(!st.has_messages());
    }

    #[test]
    fn offline_qos0_is_not_queued_and_queue_is_bounded() {
        let s = Session::new("c".into(), 1);
        assert_eq!(
            s.enqueue(msg(QoS::AtMostOnce), QoS::AtMostOnce, false, 10),
            Err(DropReason::Qos0Offline)
        );
        for _ in 0..3 {
            s.enqueue(msg(QoS::AtLeastOnce), QoS::AtLeastOnce, false, 3)
                .expect("room");
        }
        assert_eq!(
            s.enqueue(msg(QoS::AtLeastOnce), QoS::AtLeastOnce, false, 3),
            Err(DropReason::QueueFull)
        );
    }
}
