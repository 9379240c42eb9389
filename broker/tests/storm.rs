//! A takeover and churn storm: many connections over a few client ids, ending every way a
//! connection can end, concurrently. The event stream must keep its invariants: one Connected
//! and then one Disconnected per session id, and per client id never two live sessions.

use std::collections::HashMap;

use broker::event::{ConnectionEvent, SessionId};
use rumqttc::mqttbytes::v4::Packet;
use testkit::{ConnectOpts, RawClient, TestBroker};
use tokio::io::AsyncWriteExt;

/// Deterministic pseudo-random numbers (xorshift), so a failure replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_invariants_hold_under_takeover_and_churn() {
    let mut broker = TestBroker::start().await;
    let addr = broker.addr;
    // Consume events while the storm runs, as the presence pipeline would.
    let (_, placeholder) = broker::event::channel(1);
    let mut receiver = std::mem::replace(&mut broker.events, placeholder);
    let collector = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(event) = receiver.recv().await {
            all.push(event);
        }
        all
    });
    let mut tasks = Vec::new();
    for worker in 0..40u64 {
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (worker + 1));
            for _ in 0..25 {
                let id = format!("storm-{}", rng.next(4));
                let mut c = RawClient::tcp(addr).await;
                c.send(&testkit::connect_packet(&ConnectOpts::new(&id)))
                    .await;
                match rng.next(5) {
                    0 => {
                        c.send(&Packet::Disconnect).await;
                        let _ = c.stream.shutdown().await;
                    }
                    1 => drop(c),
                    2 => {
                        c.send_bytes(&[0xF0, 0x00]).await;
                    }
                    3 => {
                        // Hold a while, usually until taken over.
                        let hold = std::time::Duration::from_millis(rng.next(300));
                        let _ = tokio::time::timeout(hold, async {
                            while c.recv_untimed().await.is_some() {}
                        })
                        .await;
                    }
                    _ => {
                        let _ = c.recv_untimed().await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("worker");
    }
    assert!(broker.stop().await.is_empty());
    let events = tokio::time::timeout(testkit::WAIT, collector)
        .await
        .expect("event stream ends after shutdown")
        .expect("collector");
    assert!(events.len() > 100, "{} events", events.len());

    let mut state: HashMap<SessionId, bool> = HashMap::new();
    let mut live: HashMap<String, SessionId> = HashMap::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut last_session: HashMap<String, SessionId> = HashMap::new();
    for event in &events {
        match event {
            ConnectionEvent::Connected {
                client_id,
                session_id,
                seq,
                ..
            } => {
                assert!(
                    state.insert(*session_id, true).is_none(),
                    "second Connected for {session_id}"
                );
                if let Some(other) = live.insert(client_id.clone(), *session_id) {
                    panic!("{client_id}: {session_id} connected while {other} was live");
                }
                let prev = last_seq.insert(client_id.clone(), *seq).unwrap_or(0);
                assert!(*seq > prev, "seq must increase per client id");
                if let Some(prev) = last_session.insert(client_id.clone(), *session_id) {
                    assert!(
                        *session_id > prev,
                        "session ids must increase per client id"
                    );
                }
            }
            ConnectionEvent::Disconnected {
                client_id,
                session_id,
                ..
            } => {
                assert_eq!(
                    state.insert(*session_id, false),
                    Some(true),
                    "Disconnected without a preceding Connected for {session_id}"
                );
                assert_eq!(live.remove(client_id), Some(*session_id));
            }
            ConnectionEvent::SessionExpired { session_id, .. } => {
                panic!("no persistent session expires in a storm of seconds ({session_id})")
            }
        }
    }
    assert!(
        state.values().all(|connected| !connected),
        "every session ended with exactly one Disconnected"
    );
}
