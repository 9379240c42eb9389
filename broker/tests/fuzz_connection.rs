//! A fuzz harness for the connection state machine, on the stable toolchain (proptest): random
//! sequences of client packets — valid ones in any order (acknowledgements of nothing, PUBREL
//! before PUBLISH, a second CONNECT, SUBSCRIBE and UNSUBSCRIBE of anything, server-only
//! packets; for MQTT 5 with properties, topic aliases, subscription options and AUTH) mixed
//! with mutated bytes — sent after a CONNECT of either protocol level, each on a connection of
//! its own, to one broker. Properties: the broker answers or closes every connection (none hangs), its
//! task never ends (no panic), and a bystander connected throughout keeps being served.
//!
//! `FUZZ_CASES` sets the sequences (default 300); the long run:
//! `FUZZ_CASES=100000 cargo test --release -p broker --test fuzz_connection`.

use std::time::Duration;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    Subscribe, SubscribeFilter, SubscribeReasonCode, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use testkit::{encode, ConnectOpts, RawClient, TestBroker};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// One packet a client might send, valid on the wire or not.
fn step() -> impl Strategy<Value = Vec<u8>> {
    let topic = "[ab/+#$]{0,8}";
    let packet = prop_oneof![
        (
            topic,
            qos(),
            any::<bool>(),
            1..8u16,
            proptest::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(t, q, retain, pkid, payload)| {
                let mut p = Publish::new(t, q, payload);
                p.retain = retain;
                p.pkid = if q == QoS::AtMostOnce { 0 } else { pkid };
                Packet::Publish(p)
            }),
        (proptest::collection::vec((topic, qos()), 1..4), 1..8u16).prop_map(|(f, pkid)| {
            let mut s = Subscribe::new_many(f.into_iter().map(|(f, q)| SubscribeFilter::new(f, q)));
            s.pkid = pkid;
            Packet::Subscribe(s)
        }),
        (topic, 1..8u16).prop_map(|(t, pkid)| {
            let mut u = Unsubscribe::new(t);
            u.pkid = pkid;
            Packet::Unsubscribe(u)
        }),
        (0..8u16).prop_map(|p| Packet::PubAck(PubAck::new(p))),
        (0..8u16).prop_map(|p| Packet::PubRec(PubRec::new(p))),
        (0..8u16).prop_map(|p| Packet::PubRel(PubRel::new(p))),
        (0..8u16).prop_map(|p| Packet::PubComp(PubComp::new(p))),
        Just(Packet::PingReq),
        Just(Packet::Disconnect),
        Just(Packet::PingResp),
        Just(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false
        ))),
        Just(Packet::SubAck(SubAck::new(
            1,
            vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]
        ))),
        "[a-z]{0,4}".prop_map(|id| testkit::connect_packet(&ConnectOpts::new(&id))),
    ]
    .prop_map(|packet| {
        let mut buf = BytesMut::new();
        packet.write(&mut buf, usize::MAX).expect("encodes");
        buf.to_vec()
    });
    prop_oneof![
        8 => packet,
        1 => (packet_bytes(), any::<usize>(), 1..=u8::MAX).prop_map(|(mut b, i, x)| {
            if !b.is_empty() {
                let at = i % b.len();
                b[at] ^= x;
            }
            b
        }),
        1 => proptest::collection::vec(any::<u8>(), 1..16),
    ]
}

/// A valid PUBLISH's bytes, for mutation.
fn packet_bytes() -> impl Strategy<Value = Vec<u8>> {
    ("[ab/]{1,6}", proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(t, payload)| {
        let mut p = Publish::new(t, QoS::AtLeastOnce, payload);
        p.pkid = 1;
        encode(&Packet::Publish(p)).to_vec()
    })
}

/// MQTT 5 packets a client might send, valid or mutated.
fn step5() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => testkit::fuzz5::packet_bytes(),
        1 => (testkit::fuzz5::packet_bytes(), any::<usize>(), 1..=u8::MAX).prop_map(|(mut b, i, x)| {
            let at = i % b.len();
            b[at] ^= x;
            b
        }),
        1 => proptest::collection::vec(any::<u8>(), 1..16),
    ]
}

/// Reads whole packets from `stream` until a PINGRESP (true) or the close (false), whatever
/// their protocol level.
async fn until_pingresp(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    loop {
        let mut byte1 = [0u8; 1];
        if stream.read_exact(&mut byte1).await.is_err() {
            return false;
        }
        let mut length = 0usize;
        for i in 0..4 {
            let mut b = [0u8; 1];
            if stream.read_exact(&mut b).await.is_err() {
                return false;
            }
            length |= usize::from(b[0] & 0x7f) << (7 * i);
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; length];
        if stream.read_exact(&mut body).await.is_err() {
            return false;
        }
        if byte1[0] == 0xD0 {
            return true;
        }
    }
}

#[test]
fn random_v5_packet_sequences_never_break_the_broker() {
    use tokio::io::AsyncWriteExt;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // The test reads no events: one connection per case (two events) keeps within the
    // channel's capacity, and the probe stays connected throughout.
    let (broker, probe) = runtime.block_on(async {
        let broker = TestBroker::start_with(|c| {
            c.connect_timeout = Duration::from_secs(2);
            c.packet_read_timeout = Duration::from_secs(1);
        })
        .await;
        let (probe, _) = RawClient::connect(broker.addr, ConnectOpts::new("probe")).await;
        (broker, probe)
    });
    let probe = tokio::sync::Mutex::new(probe);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let addr = broker.addr;
    let result = runner.run(&proptest::collection::vec(step5(), 1..12), |steps| {
        runtime.block_on(async {
            let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let input = [testkit::fuzz5::connect(), steps.concat(), vec![0xC0, 0x00]].concat();
            // The broker may close before reading it all.
            let _ = c.write_all(&input).await;
            // Answered (PINGRESP after whatever else), or closed: never silent.
            let answered = tokio::time::timeout(testkit::WAIT, until_pingresp(&mut c)).await;
            prop_assert!(answered.is_ok(), "the broker neither answered nor closed");
            prop_assert!(!broker.handle.is_finished(), "the broker task ended");
            // Another client is still served.
            let mut probe = probe.lock().await;
            probe.send(&Packet::PingReq).await;
            prop_assert_eq!(probe.recv().await, Some(Packet::PingResp));
            Ok(())
        })
    });
    result.expect("the broker keeps its properties under random MQTT 5 packet sequences");
    runtime.block_on(broker.stop());
}

#[test]
fn random_packet_sequences_never_break_the_broker() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (broker, bystander) = runtime.block_on(async {
        let broker = TestBroker::start_with(|c| {
            c.connect_timeout = Duration::from_secs(2);
            c.packet_read_timeout = Duration::from_secs(1);
        })
        .await;
        let (mut bystander, _) =
            RawClient::connect(broker.addr, ConnectOpts::new("bystander")).await;
        bystander.subscribe("#", QoS::AtLeastOnce).await;
        (broker, bystander)
    });
    let bystander = tokio::sync::Mutex::new(bystander);
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let addr = broker.addr;
    let result = runner.run(&proptest::collection::vec(step(), 1..12), |steps| {
        runtime.block_on(async {
            let (mut c, _) = RawClient::connect(addr, ConnectOpts::new("fuzzed")).await;
            for bytes in &steps {
                c.send_bytes(bytes).await;
            }
            c.send(&Packet::PingReq).await;
            // Answered (PINGRESP after whatever else), or closed: never silent.
            let answered = tokio::time::timeout(testkit::WAIT, async {
                loop {
                    match c.recv_untimed().await {
                        None | Some(Packet::PingResp) => return,
                        Some(_) => {}
                    }
                }
            })
            .await;
            prop_assert!(answered.is_ok(), "the broker neither answered nor closed");
            prop_assert!(!broker.handle.is_finished(), "the broker task ended");
            // The bystander is still served (its queue drained meanwhile).
            let mut b = bystander.lock().await;
            b.send(&Packet::PingReq).await;
            let served = tokio::time::timeout(testkit::WAIT, async {
                loop {
                    match b.recv_untimed().await {
                        Some(Packet::PingResp) => return true,
                        Some(Packet::Publish(p)) if p.qos != QoS::AtMostOnce => {
                            b.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                        }
                        Some(Packet::PubRel(r)) => {
                            b.send(&Packet::PubComp(PubComp::new(r.pkid))).await;
                        }
                        Some(_) => {}
                        None => return false,
                    }
                }
            })
            .await;
            prop_assert_eq!(served, Ok(true), "the bystander is served");
            Ok(())
        })
    });
    result.expect("the broker keeps its properties under random packet sequences");
    runtime.block_on(broker.stop());
}
