//! A fuzz harness for the decoders of both protocol levels (`mqtt::codec::read_packet`), on the
//! stable toolchain: property-based with proptest (random inputs, shrunk to a minimal one on
//! failure).
//!
//! Inputs: arbitrary bytes, and valid packets of every type a client sends (CONNECT with will
//! and login, PUBLISH at each QoS, SUBSCRIBE, UNSUBSCRIBE, the acknowledgements, PINGREQ,
//! DISCONNECT; for MQTT 5 also AUTH, and properties on all of them, after an MQTT 5 CONNECT
//! that sets the connection's level) with bytes flipped, inserted, removed or cut. Properties:
//! - the decoder never panics, and never consumes bytes it does not decode;
//! - fed a byte at a time it answers as it does fed the whole input at once (same packets,
//!   same error), so nothing depends on how TCP splits the stream;
//! - a 3.1.1 packet it accepts is re-encoded by rumqttc and decoded again to the same packet;
//! - a declared remaining length above the maximum is refused before its bytes arrive.
//!
//! `FUZZ_CASES` sets the inputs per property (default 20,000, a few seconds in a debug build).
//! The long run, ten million inputs per property in a release build:
//! `FUZZ_CASES=10000000 cargo test --release -p broker --test fuzz_codec`.

use broker::mqtt::codec::{read_packet, CodecError};
use broker::mqtt::packet::{self, Protocol};
use bytes::BytesMut;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rumqttc::mqttbytes::v4::{
    Connect, LastWill, Packet, PubAck, PubComp, PubRec, PubRel, Publish, Subscribe,
    SubscribeFilter, Unsubscribe,
};
use rumqttc::mqttbytes::QoS;
use testkit::fuzz5 as v5;

/// The maximum packet size the harness decodes with (small, so that the limit is hit often).
const MAX: usize = 4096;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    })
}

/// What decoding `input` gives: the packets, and the error that stopped it (if any).
type Outcome = (Vec<packet::Packet>, Option<String>);

/// Decodes `input` fed in pieces of `chunk` bytes (0: all at once), as a connection reads it.
fn decode(input: &[u8], chunk: usize) -> Outcome {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut protocol = None;
    let pieces: Vec<&[u8]> = if chunk == 0 {
        vec![input]
    } else {
        input.chunks(chunk).collect()
    };
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match read_packet(&mut buf, MAX, &mut protocol) {
                Ok(Some(packet)) => {
                    assert!(buf.len() < before, "a decoded packet consumed no bytes");
                    packets.push(packet);
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "bytes consumed without a packet");
                    break;
                }
                Err(error) => return (packets, Some(kind(&error))),
            }
        }
    }
    (packets, None)
}

/// The error's kind, without details that may differ with the bytes available (rumqttc's
/// `InsufficientBytes` counts, for one).
fn kind(error: &CodecError) -> String {
    match error {
        CodecError::Malformed(e) => format!("malformed: {e:?}"),
        other => format!("{other}"),
    }
}

/// The properties every input must keep.
fn check(input: &[u8]) -> Result<(), TestCaseError> {
    let whole = decode(input, 0);
    for chunk in [1, 7] {
        prop_assert_eq!(
            &decode(input, chunk),
            &whole,
            "fed {} bytes at a time",
            chunk
        );
    }
    for packet in &whole.0 {
        // Re-encoded by rumqttc's 3.1.1 client encoder.
        let Some(v4) = to_v4(packet) else {
            continue;
        };
        let mut encoded = BytesMut::new();
        v4.write(&mut encoded, usize::MAX)
            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let again = decode(&encoded, 0);
        prop_assert_eq!(&again.0, &vec![packet.clone()], "re-encoded {:?}", packet);
        prop_assert_eq!(again.1, None);
    }
    Ok(())
}

/// A decoded client packet as rumqttc's 3.1.1 one (`None` for server-only packets and for
/// packets with MQTT 5 fields, which a 3.1.1 packet cannot carry).
fn to_v4(p: &packet::Packet) -> Option<Packet> {
    use packet::Packet as P;
    Some(match p {
        P::Connect(c) if c.protocol == Protocol::V311 => {
            let mut connect = Connect::new(c.client_id.clone());
            connect.keep_alive = c.keep_alive;
            connect.clean_session = c.clean_start;
            if let Some(user) = &c.username {
                let password = c.password.as_deref().unwrap_or_default();
                connect.set_login(user.clone(), String::from_utf8(password.to_vec()).ok()?);
            }
            connect.last_will = c
                .will
                .as_ref()
                .map(|w| LastWill::new(w.topic.clone(), w.payload.to_vec(), w.qos, w.retain));
            Packet::Connect(connect)
        }
        P::Publish(p) if p.properties.is_none() && p.topic_alias.is_none() => {
            let mut publish = Publish::new(p.topic.clone(), p.qos, p.payload.to_vec());
            publish.pkid = p.pkid;
            publish.retain = p.retain;
            publish.dup = p.dup;
            Packet::Publish(publish)
        }
        P::PubAck(a) if a.reason == 0 => Packet::PubAck(PubAck::new(a.pkid)),
        P::PubRec(a) if a.reason == 0 => Packet::PubRec(PubRec::new(a.pkid)),
        P::PubRel(a) if a.reason == 0 => Packet::PubRel(PubRel::new(a.pkid)),
        P::PubComp(a) if a.reason == 0 => Packet::PubComp(PubComp::new(a.pkid)),
        P::Subscribe(s)
            if s.id.is_none()
                && s.filters
                    .iter()
                    .all(|f| *f == packet::Filter::new(f.path.clone(), f.qos)) =>
        {
            Packet::Subscribe(Subscribe::new_many(
                s.filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.path.clone(), f.qos)),
            ))
            .with_pkid(s.pkid)
        }
        P::Unsubscribe(u) => {
            let mut unsubscribe = Unsubscribe::new(u.filters.first()?.clone());
            unsubscribe.topics = u.filters.clone();
            unsubscribe.pkid = u.pkid;
            Packet::Unsubscribe(unsubscribe)
        }
        P::PingReq => Packet::PingReq,
        P::Disconnect(d) if *d == packet::Disconnect::default() => Packet::Disconnect,
        _ => return None,
    })
}

/// Sets a rumqttc SUBSCRIBE's packet id.
trait WithPkid {
    fn with_pkid(self, pkid: u16) -> Self;
}

impl WithPkid for Packet {
    fn with_pkid(mut self, pkid: u16) -> Self {
        if let Packet::Subscribe(s) = &mut self {
            s.pkid = pkid;
        }
        self
    }
}

/// The bytes of valid client packets, as a strategy.
fn valid_packet() -> impl Strategy<Value = Vec<u8>> {
    let topic = "[a-z/+#$]{0,12}";
    let payload = proptest::collection::vec(any::<u8>(), 0..64);
    let qos = prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ];
    prop_oneof![
        (
            "[ -~]{0,23}",
            any::<u16>(),
            any::<bool>(),
            proptest::option::of((topic, payload.clone(), qos.clone(), any::<bool>())),
            // rumqttc leaves out an empty user name but not its password, which 3.1.1 forbids.
            proptest::option::of(("[ -~]{1,12}", "[ -~]{0,12}")),
        )
            .prop_map(|(id, keep_alive, clean, will, login)| {
                let mut c = Connect::new(id);
                c.keep_alive = keep_alive;
                c.clean_session = clean;
                c.last_will = will.map(|(t, p, q, r)| LastWill::new(t, p, q, r));
                if let Some((user, password)) = login {
                    c.set_login(user, password);
                }
                Packet::Connect(c)
            }),
        (topic, payload, qos.clone(), any::<bool>(), 1..u16::MAX).prop_map(
            |(t, p, q, retain, pkid)| {
                let mut publish = Publish::new(t, q, p);
                publish.retain = retain;
                publish.pkid = if q == QoS::AtMostOnce { 0 } else { pkid };
                Packet::Publish(publish)
            }
        ),
        (proptest::collection::vec((topic, qos), 1..4), 1..u16::MAX).prop_map(|(filters, pkid)| {
            let mut s =
                Subscribe::new_many(filters.into_iter().map(|(f, q)| SubscribeFilter::new(f, q)));
            s.pkid = pkid;
            Packet::Subscribe(s)
        }),
        (proptest::collection::vec(topic, 1..4), 1..u16::MAX).prop_map(|(topics, pkid)| {
            let mut u = Unsubscribe::new(topics.first().cloned().unwrap_or_default());
            u.topics = topics;
            u.pkid = pkid;
            Packet::Unsubscribe(u)
        }),
        any::<u16>().prop_map(|p| Packet::PubAck(PubAck::new(p))),
        any::<u16>().prop_map(|p| Packet::PubRec(PubRec::new(p))),
        any::<u16>().prop_map(|p| Packet::PubRel(PubRel::new(p))),
        any::<u16>().prop_map(|p| Packet::PubComp(PubComp::new(p))),
        Just(Packet::PingReq),
        Just(Packet::Disconnect),
    ]
    .prop_map(|packet| {
        let mut buf = BytesMut::new();
        packet
            .write(&mut buf, usize::MAX)
            .expect("a generated packet encodes");
        buf.to_vec()
    })
}

/// A change to a valid input.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Cut(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=u8::MAX).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Cut),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(i, x) if !bytes.is_empty() => bytes[i % len] ^= x,
            Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Mutation::Remove(i) if !bytes.is_empty() => {
                bytes.remove(i % len);
            }
            Mutation::Cut(i) => bytes.truncate(i % len),
            _ => {}
        }
    }
    bytes
}

#[test]
fn arbitrary_bytes_never_break_the_decoder() {
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 0..256), |input| {
            check(&input)
        })
        .expect("the decoder keeps its properties on arbitrary bytes");
}

#[test]
fn mutated_packets_never_break_the_decoder() {
    let inputs = (
        proptest::collection::vec(valid_packet(), 1..4),
        proptest::collection::vec(mutation(), 0..4),
    );
    runner()
        .run(&inputs, |(packets, mutations)| {
            check(&mutate(packets.concat(), &mutations))
        })
        .expect("the decoder keeps its properties on mutated packets");
}

#[test]
fn valid_packets_decode_as_encoded() {
    runner()
        .run(
            &proptest::collection::vec(valid_packet(), 1..4),
            |packets| {
                let (decoded, error) = decode(&packets.concat(), 3);
                // A generated filter or topic may break the rules the broker checks later (a
                // wildcard in a PUBLISH topic), not the decoder's: every packet decodes.
                prop_assert_eq!(error, None);
                prop_assert_eq!(decoded.len(), packets.len());
                Ok(())
            },
        )
        .expect("valid packets decode");
}

/// A remaining length above the maximum is refused as soon as the fixed header is complete:
/// nothing waits for (or buffers) the body.
#[test]
fn an_oversized_declaration_is_refused_before_its_body() {
    runner()
        .run(&((MAX + 1)..268_435_455usize, 0u8..16), |(length, kind)| {
            // Flags 0b0010 where MQTT 3.1.1 requires them (PUBREL, SUBSCRIBE, UNSUBSCRIBE).
            let flags = if matches!(kind, 6 | 8 | 10) { 2 } else { 0 };
            let mut header = vec![(kind << 4) | flags];
            v5::varint(&mut header, length);
            let mut buf = BytesMut::from(&header[..]);
            prop_assert!(read_packet(&mut buf, MAX, &mut None).is_err());
            Ok(())
        })
        .expect("oversized packets are refused from their header");
}

#[test]
fn v5_valid_packets_decode_as_encoded() {
    runner()
        .run(
            &proptest::collection::vec(v5::packet_bytes(), 1..4),
            |packets| {
                let input = [v5::connect(), packets.concat()].concat();
                let (decoded, error) = decode(&input, 3);
                prop_assert_eq!(error, None);
                prop_assert_eq!(decoded.len(), packets.len() + 1);
                Ok(())
            },
        )
        .expect("valid MQTT 5 packets decode");
}

#[test]
fn v5_mutated_packets_never_break_the_decoder() {
    let inputs = (
        proptest::collection::vec(v5::packet_bytes(), 1..4),
        proptest::collection::vec(mutation(), 0..4),
    );
    runner()
        .run(&inputs, |(packets, mutations)| {
            // The CONNECT is left whole, so the mutated packets are read as MQTT 5.
            check(&[v5::connect(), mutate(packets.concat(), &mutations)].concat())
        })
        .expect("the MQTT 5 decoder keeps its properties on mutated packets");
}

#[test]
fn v5_arbitrary_bytes_never_break_the_decoder() {
    runner()
        .run(&proptest::collection::vec(any::<u8>(), 0..256), |input| {
            check(&[v5::connect(), input].concat())
        })
        .expect("the MQTT 5 decoder keeps its properties on arbitrary bytes");
}
