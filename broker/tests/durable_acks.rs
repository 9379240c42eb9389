//! Acknowledgements wait for the durable state (`persistence.mode = "sync"`): against a state
//! store that makes nothing durable until the test says so, no CONNACK of a persistent
//! session, SUBACK, PUBACK or PUBCOMP that promises something stored goes out before it is
//! durable, acknowledgements keep their order, and one that promises nothing stored does not
//! wait. (A crash test with `kill -9` cannot see an acknowledgement sent before its fsync: the
//! killed process's writes survive in the page cache.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::Duration;

use broker::state::{Record, StateError, StateStore, Ticket};
use rumqttc::mqttbytes::v4::{Packet, PubAck, PubRel};
use rumqttc::mqttbytes::QoS;
use testkit::{ConnectOpts, RawClient, TestBroker};

/// A state store whose records become durable only when [`Held::release`] says so.
#[derive(Default)]
struct Held {
    records: Mutex<Vec<Record>>,
    appended: AtomicU64,
    durable: AtomicU64,
    waiters: Mutex<Vec<Waker>>,
    ids: AtomicU64,
}

impl Held {
    /// Makes everything appended so far durable.
    fn release(&self) {
        self.durable
            .store(self.appended.load(Ordering::SeqCst), Ordering::SeqCst);
        for waker in std::mem::take(&mut *self.waiters.lock().expect("lock")) {
            waker.wake();
        }
    }

    fn kinds(&self) -> Vec<&'static str> {
        let records = self.records.lock().expect("lock");
        records
            .iter()
            .map(|r| match r {
                Record::Session { .. } => "session",
                Record::Subscribe { .. } => "subscribe",
                Record::Message { .. } => "message",
                Record::Enqueue { .. } => "enqueue",
                Record::Routed { .. } => "routed",
                Record::Received { .. } => "received",
                Record::Completed { .. } => "completed",
                Record::Left { .. } => "left",
                _ => "other",
            })
            .collect()
    }
}

impl StateStore for Held {
    fn append(&self, record: Record) -> Ticket {
        self.records.lock().expect("lock").push(record);
        self.appended.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn poll_durable(&self, ticket: Ticket, waker: &Waker) -> Poll<()> {
        let mut waiters = self.waiters.lock().expect("lock");
        if self.durable.load(Ordering::SeqCst) >= ticket {
            return Poll::Ready(());
        }
        waiters.push(waker.clone());
        Poll::Pending
    }

    fn acks_wait(&self) -> bool {
        true
    }

    fn over_budget(&self) -> bool {
        false
    }

    fn next_message_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn export(&self, _: &mut dyn std::io::Write) -> Result<u64, StateError> {
        Err(StateError::Closed)
    }

    fn close(&self) {}
}

/// Nothing arrives on `c` for a while.
async fn silent(c: &mut RawClient) {
    let got = tokio::time::timeout(Duration::from_millis(300), c.recv_untimed()).await;
    assert!(got.is_err(), "nothing before the state is durable: {got:?}");
}

#[tokio::test]
async fn acknowledgements_wait_until_what_they_promise_is_durable() {
    let held = Arc::new(Held::default());
    let broker = TestBroker::start_with_state(Arc::clone(&held) as Arc<dyn StateStore>).await;

    // A persistent session: its CONNACK waits for its record.
    let mut c = RawClient::tcp(broker.addr).await;
    let mut opts = ConnectOpts::new("keeper");
    opts.clean_session = false;
    c.send(&testkit::connect_packet(&opts)).await;
    silent(&mut c).await;
    held.release();
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));

    // Its SUBACK waits for the subscription's record.
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new("keep/#", QoS::AtLeastOnce);
    sub.pkid = 1;
    c.send(&Packet::Subscribe(sub)).await;
    silent(&mut c).await;
    held.release();
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    c.disconnect().await;

    // A publisher: a QoS 1 message for the persistent session waits for its queue entry; the
    // next one, for nobody stored, waits behind it (PUBACKs keep their order); a clean
    // session's CONNACK waits for nothing.
    let (mut p, _) = RawClient::connect(broker.addr, ConnectOpts::new("publisher")).await;
    p.publish("keep/1", QoS::AtLeastOnce, false, b"stored", 10)
        .await;
    p.publish("other", QoS::AtLeastOnce, false, b"not stored", 11)
        .await;
    silent(&mut p).await;
    held.release();
    let acks: Vec<u16> = [p.recv().await, p.recv().await]
        .into_iter()
        .map(|a| match a {
            Some(Packet::PubAck(PubAck { pkid, .. })) => pkid,
            other => panic!("expected PUBACK, got {other:?}"),
        })
        .collect();
    assert_eq!(acks, [10, 11], "in the order of the PUBLISHes");

    // With nothing waiting, a message nobody stores is acknowledged at once.
    p.publish("other", QoS::AtLeastOnce, false, b"x", 12).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));

    // QoS 2 for the persistent session: the PUBREC waits for the queue entry; the PUBCOMP
    // waits for nothing (the publisher's session is clean: its receipts are not stored).
    p.publish("keep/2", QoS::ExactlyOnce, false, b"two", 13)
        .await;
    silent(&mut p).await;
    held.release();
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));
    p.send(&Packet::PubRel(PubRel::new(13))).await;
    assert!(
        matches!(p.recv().await, Some(Packet::PubComp(_))),
        "a clean session's receipt is not stored"
    );

    assert_eq!(
        held.kinds(),
        [
            "session",
            "subscribe",
            "left",
            "message",
            "enqueue",
            "routed",
            "message",
            "enqueue",
            "routed"
        ],
        "what was stored"
    );
}
