//! Durable broker state beside Mosquitto 2's: the same scenario run against the broker binary
//! (`persistence.mode` sync, the default) and against a real mosquitto process with
//! `persistence true` and its default `autosave_interval` (1800 s), each a process of its own.
//!
//! A persistent subscriber (`clean_session = false`, QoS 1 on `diff/#`) subscribes and goes
//! away; a publisher sends [`MESSAGES`] QoS 1 retained messages to `diff/data` and records every
//! PUBACK; the broker is stopped, started again on the same state, and the subscriber comes
//! back for its queue.
//!
//! - Clean shutdown (SIGTERM): both brokers deliver every acknowledged message and keep the
//!   last retained value.
//! - Crash (SIGKILL once every PUBACK is in): Heartwire still delivers every acknowledged
//!   message and keeps the last retained value; Mosquitto, which saves its state only on a
//!   clean stop and every autosave interval, loses acknowledged messages (with its defaults,
//!   all of them and the session too). The test asserts that it loses at least one, so that it
//!   fails if the comparison stops showing a difference, and prints both counts.
//!
//! Mosquitto must be installed (`./test.sh` and CI install Debian's package), as for the
//! other tests that run it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;
use testkit::{temp_dir, BrokerProcess, ConnectOpts, Mosquitto, RawClient};

const BROKER: &str = env!("CARGO_BIN_EXE_broker");
/// QoS 1 retained messages published in each run (below both brokers' default limit of
/// queued messages per session, 1000, past which a message would be dropped by design).
const MESSAGES: u64 = 500;
/// PUBLISHes in flight at once (sent before their PUBACKs are read).
const WINDOW: u64 = 32;
const SUBSCRIBER: &str = "diff-sub";
const FILTER: &str = "diff/#";
const TOPIC: &str = "diff/data";
/// How long a reader waits for something that may have been lost: absence cannot be awaited,
/// only a quiet period can end the wait for it.
const QUIET: Duration = Duration::from_secs(3);

/// Which broker a run is about.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Heartwire,
    Mosquitto,
}

/// How a broker is stopped before its restart.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGTERM, waiting for the exit.
    Clean,
    /// SIGKILL.
    Crash,
}

/// One broker process with its state in a directory it is given.
enum Server {
    Heartwire(BrokerProcess),
    Mosquitto(Mosquitto),
}

impl Server {
    /// Starts `kind` on the state in `state` and waits until it accepts MQTT connections.
    async fn start(kind: Kind, state: &Path) -> Self {
        match kind {
            Kind::Heartwire => {
                let data = state.parent().expect("state has a parent directory");
                let dir = state.to_str().expect("a UTF-8 path");
                Server::Heartwire(
                    BrokerProcess::start(BROKER, data, &[("BROKER_PERSISTENCE__DIR", dir)]).await,
                )
            }
            Kind::Mosquitto => {
                Server::Mosquitto(Mosquitto::start_persistent("allow_anonymous true", state).await)
            }
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Server::Heartwire(b) => b.mqtt,
            Server::Mosquitto(m) => m.addr(),
        }
    }

    /// Stops it as `how` says and waits until it is gone.
    async fn stop(self, how: Stop) {
        match (self, how) {
            (Server::Mosquitto(m), Stop::Clean) => m.terminate().await,
            (Server::Mosquitto(m), Stop::Crash) => m.kill().await,
            (Server::Heartwire(b), Stop::Clean) => b.terminate().await,
            (Server::Heartwire(b), Stop::Crash) => b.kill().await,
        }
    }
}

/// What one run found after the restart.
#[derive(Debug)]
struct Outcome {
    /// Messages the publisher got a PUBACK for (all of them, checked by [`run`]).
    acked: u64,
    /// Whether the subscriber's session was still there.
    session: bool,
    /// Acknowledged messages that reached the subscriber (each counted once).
    delivered: u64,
    /// The retained value of [`TOPIC`].
    retained: Option<u64>,
}

/// The scenario against `kind`, stopped as `how` says: a persistent subscriber, [`MESSAGES`]
/// acknowledged publishes while it is away, a stop, a restart on the same state, the
/// subscriber back.
async fn run(kind: Kind, how: Stop) -> Outcome {
    let dir = temp_dir("persistence-diff");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("creating the state directory");

    let server = Server::start(kind, &state).await;
    let mut opts = ConnectOpts::new(SUBSCRIBER);
    opts.clean_session = false;
    let (mut sub, _) = RawClient::connect(server.addr(), opts).await;
    sub.subscribe(FILTER, QoS::AtLeastOnce).await;
    sub.disconnect().await;

    let acked = publish(server.addr()).await;
    assert_eq!(
        acked.len() as u64,
        MESSAGES,
        "{kind:?}: every PUBLISH acknowledged"
    );
    server.stop(how).await;

    let server = Server::start(kind, &state).await;
    let (session, got) = drain(server.addr(), &acked).await;
    let retained = retained(server.addr()).await;
    server.stop(Stop::Clean).await;

    let mut delivered: Vec<u64> = got.into_iter().filter(|s| acked.contains(s)).collect();
    delivered.sort_unstable();
    delivered.dedup();
    Outcome {
        acked: acked.len() as u64,
        session,
        delivered: delivered.len() as u64,
        retained,
    }
}

/// Publishes messages 1 to [`MESSAGES`] to [`TOPIC`] at QoS 1, retained, [`WINDOW`] at a
/// time, and returns the numbers acknowledged.
async fn publish(addr: SocketAddr) -> Vec<u64> {
    let (mut c, _) = RawClient::connect(addr, ConnectOpts::new("diff-pub")).await;
    let mut acked = Vec::new();
    let mut next = 1;
    while next <= MESSAGES {
        let end = (next + WINDOW).min(MESSAGES + 1);
        for seq in next..end {
            let pkid = u16::try_from(seq).expect("packet ids cover the messages");
            c.publish(
                TOPIC,
                QoS::AtLeastOnce,
                true,
                seq.to_string().as_bytes(),
                pkid,
            )
            .await;
        }
        for _ in next..end {
            match c.recv().await {
                Some(Packet::PubAck(ack)) => acked.push(u64::from(ack.pkid)),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
        next = end;
    }
    c.disconnect().await;
    acked
}

/// Connects the persistent subscriber and reads its queue (acknowledging each message) until
/// every number in `acked` came or nothing came for [`QUIET`]. Returns whether its session
/// was there and the numbers in the order they came.
async fn drain(addr: SocketAddr, acked: &[u64]) -> (bool, Vec<u64>) {
    let mut opts = ConnectOpts::new(SUBSCRIBER);
    opts.clean_session = false;
    let (mut c, present) = RawClient::connect(addr, opts).await;
    let mut got = Vec::new();
    // A new session has no subscription: nothing can come to it.
    if present {
        let mut missing: std::collections::HashSet<u64> = acked.iter().copied().collect();
        while !missing.is_empty() {
            match tokio::time::timeout(QUIET, c.recv_untimed()).await {
                Ok(Some(Packet::Publish(p))) => {
                    let seq = number(&p);
                    missing.remove(&seq);
                    got.push(seq);
                    c.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                }
                Ok(other) => panic!("subscriber: expected PUBLISH, got {other:?}"),
                Err(_) => break,
            }
        }
    }
    c.disconnect().await;
    (present, got)
}

/// The retained value of [`TOPIC`], read by a new clean subscriber (`None` if none came
/// within [`QUIET`]).
async fn retained(addr: SocketAddr) -> Option<u64> {
    let (mut c, _) = RawClient::connect(addr, ConnectOpts::new("diff-reader")).await;
    c.subscribe(TOPIC, QoS::AtLeastOnce).await;
    let value = match tokio::time::timeout(QUIET, c.recv_untimed()).await {
        Ok(Some(Packet::Publish(p))) => {
            assert!(p.retain, "a retained message");
            c.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
            Some(number(&p))
        }
        Ok(other) => panic!("reader: expected PUBLISH, got {other:?}"),
        Err(_) => None,
    };
    c.disconnect().await;
    value
}

/// The message number a payload carries.
fn number(p: &Publish) -> u64 {
    std::str::from_utf8(&p.payload)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("payload is not a message number: {:?}", p.payload))
}

/// Checks that `kind` kept everything: the session, every acknowledged message, the last
/// retained value.
fn assert_kept_everything(kind: Kind, how: Stop, o: &Outcome) {
    assert!(o.session, "{kind:?} after {how:?}: the session survived");
    assert_eq!(
        o.delivered, o.acked,
        "{kind:?} after {how:?}: every acknowledged message delivered"
    );
    assert_eq!(
        o.retained,
        Some(MESSAGES),
        "{kind:?} after {how:?}: the last retained value kept"
    );
}

fn report(how: Stop, ours: &Outcome, theirs: &Outcome) {
    eprintln!(
        "{how:?}: heartwire: delivered {} of {} acknowledged; mosquitto: delivered {} of {} \
         (session kept: heartwire {}, mosquitto {}; retained value: heartwire {:?}, \
         mosquitto {:?}, last acknowledged {MESSAGES})",
        ours.delivered,
        ours.acked,
        theirs.delivered,
        theirs.acked,
        ours.session,
        theirs.session,
        ours.retained,
        theirs.retained,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_clean_shutdown_both_deliver_every_acknowledged_message() {
    let ours = run(Kind::Heartwire, Stop::Clean).await;
    let theirs = run(Kind::Mosquitto, Stop::Clean).await;
    report(Stop::Clean, &ours, &theirs);
    assert_kept_everything(Kind::Heartwire, Stop::Clean, &ours);
    assert_kept_everything(Kind::Mosquitto, Stop::Clean, &theirs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_heartwire_delivers_every_acknowledged_message_and_mosquitto_loses_some() {
    let ours = run(Kind::Heartwire, Stop::Crash).await;
    let theirs = run(Kind::Mosquitto, Stop::Crash).await;
    report(Stop::Crash, &ours, &theirs);
    assert_kept_everything(Kind::Heartwire, Stop::Crash, &ours);
    assert!(
        theirs.delivered < theirs.acked,
        "Mosquitto (autosave_interval 1800 s) lost no acknowledged message to SIGKILL: the \
         comparison no longer shows a difference ({theirs:?})"
    );
}
