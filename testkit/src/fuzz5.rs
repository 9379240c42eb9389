//! MQTT 5 client packets for the fuzz harnesses (broker/tests/fuzz_codec.rs and
//! fuzz_connection.rs), as proptest strategies: valid packets of every type a client sends,
//! properties included, encoded by hand (rumqttc's v5 encoder gets some of them wrong).

use proptest::prelude::*;

/// Appends a variable byte integer.
pub fn varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// Appends a two-byte length and `s`.
pub fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet: fixed header byte, then the body with its remaining length.
pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![byte1];
    varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A property section: its length, then the properties.
fn section(out: &mut Vec<u8>, props: &[u8]) {
    varint(out, props.len());
    out.extend_from_slice(props);
}

fn user_properties(props: &mut Vec<u8>, pairs: &[(String, String)]) {
    for (k, v) in pairs {
        props.push(0x26);
        string(props, k.as_bytes());
        string(props, v.as_bytes());
    }
}

/// The CONNECT every MQTT 5 input starts with (it sets the connection's level).
pub fn connect() -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0b0000_0010, 0, 60]);
    let mut props = Vec::new();
    props.extend_from_slice(&[0x11, 0, 0, 0, 30, 0x21, 0, 10]);
    section(&mut body, &props);
    string(&mut body, b"fuzz5");
    packet(0x10, &body)
}

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec(("[a-z]{0,4}", "[ -~]{0,6}"), 0..3)
}

fn qos() -> impl Strategy<Value = u8> {
    0u8..3
}

/// Valid MQTT 5 client packets after the CONNECT.
pub fn packet_bytes() -> impl Strategy<Value = Vec<u8>> {
    let topic = "[a-z/+#$]{0,12}";
    let payload = proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        (
            topic,
            payload,
            qos(),
            any::<bool>(),
            1..u16::MAX,
            proptest::option::of(any::<u32>()),
            proptest::option::of("[ -~]{0,8}"),
            pairs(),
            proptest::option::of(1u16..20),
        )
            .prop_map(|(t, p, q, retain, pkid, expiry, ctype, users, alias)| {
                // An empty topic needs an alias.
                let alias = alias.or(t.is_empty().then_some(1));
                let mut body = Vec::new();
                string(&mut body, t.as_bytes());
                if q > 0 {
                    body.extend_from_slice(&pkid.to_be_bytes());
                }
                let mut props = Vec::new();
                if let Some(e) = expiry {
                    props.push(0x02);
                    props.extend_from_slice(&e.to_be_bytes());
                }
                if let Some(c) = ctype {
                    props.push(0x03);
                    string(&mut props, c.as_bytes());
                }
                if let Some(a) = alias {
                    props.push(0x23);
                    props.extend_from_slice(&a.to_be_bytes());
                }
                user_properties(&mut props, &users);
                section(&mut body, &props);
                body.extend_from_slice(&p);
                packet(0x30 | (q << 1) | u8::from(retain), &body)
            }),
        (
            proptest::collection::vec((topic, qos(), 0u8..3, any::<bool>(), any::<bool>()), 1..4),
            1..u16::MAX,
            proptest::option::of(1u32..268_435_455),
        )
            .prop_map(|(filters, pkid, id)| {
                let mut body = pkid.to_be_bytes().to_vec();
                let mut props = Vec::new();
                if let Some(id) = id {
                    props.push(0x0B);
                    varint(&mut props, id as usize);
                }
                section(&mut body, &props);
                for (f, q, rh, nl, rap) in filters {
                    string(&mut body, f.as_bytes());
                    body.push(q | (u8::from(nl) << 2) | (u8::from(rap) << 3) | (rh << 4));
                }
                packet(0x82, &body)
            }),
        (proptest::collection::vec(topic, 1..4), 1..u16::MAX).prop_map(|(topics, pkid)| {
            let mut body = pkid.to_be_bytes().to_vec();
            section(&mut body, &[]);
            for t in topics {
                string(&mut body, t.as_bytes());
            }
            packet(0xA2, &body)
        }),
        (
            prop_oneof![Just(0x40u8), Just(0x50), Just(0x62), Just(0x70)],
            1..u16::MAX,
            prop_oneof![Just(0u8), Just(0x10), Just(0x80), Just(0x92)],
            proptest::option::of("[ -~]{0,8}"),
        )
            .prop_map(|(byte1, pkid, reason, text)| {
                let mut body = pkid.to_be_bytes().to_vec();
                // PUBACK and PUBREC take 0x00, 0x10, 0x80 (...); PUBREL and PUBCOMP 0x00
                // and 0x92 only.
                let reason = match (byte1 >= 0x62, reason) {
                    (true, 0x92) | (false, 0 | 0x10 | 0x80) => reason,
                    _ => 0,
                };
                if reason != 0 || text.is_some() {
                    body.push(reason);
                    let mut props = Vec::new();
                    if let Some(t) = text {
                        props.push(0x1F);
                        string(&mut props, t.as_bytes());
                    }
                    section(&mut body, &props);
                }
                packet(byte1, &body)
            }),
        Just(vec![0xC0, 0x00]),
        (
            prop_oneof![Just(0u8), Just(0x04), Just(0x80), Just(0x8E)],
            proptest::option::of(any::<u32>()),
            proptest::option::of("[ -~]{0,8}"),
            pairs(),
        )
            .prop_map(|(reason, expiry, text, users)| {
                let mut body = vec![reason];
                let mut props = Vec::new();
                if let Some(e) = expiry {
                    props.push(0x11);
                    props.extend_from_slice(&e.to_be_bytes());
                }
                if let Some(t) = text {
                    props.push(0x1F);
                    string(&mut props, t.as_bytes());
                }
                user_properties(&mut props, &users);
                section(&mut body, &props);
                packet(0xE0, &body)
            }),
        (
            prop_oneof![Just(0u8), Just(0x18), Just(0x19)],
            "[A-Z-]{1,12}",
            proptest::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(reason, method, data)| {
                let mut body = vec![reason];
                let mut props = vec![0x15];
                string(&mut props, method.as_bytes());
                props.push(0x16);
                string(&mut props, &data);
                section(&mut body, &props);
                packet(0xF0, &body)
            }),
    ]
}
