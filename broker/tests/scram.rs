//! MQTT 5 enhanced authentication with SCRAM-SHA-256 (RFC 5802, RFC 7677) against password
//! file entries written by `broker passwd --scram`: the exchange over CONNECT, AUTH and CONNACK
//! from a client's side (which checks the broker's server signature too), a wrong password
//! (CONNACK 0x86), an unknown user (the same answer, after a salt that does not tell it is
//! unknown), a method not offered (0x8C), and the same user logging in with a plain password.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use broker::auth::password_file::{Hash, PasswordFileEditor};
use broker::config::AuthConfig;
use broker::event::ConnectionEvent;
use broker::labels::AuthMethod;
use ring::{digest, hmac, pbkdf2};
use testkit::fuzz5::{packet, string, varint};
use testkit::{temp_dir, ConnectOpts, RawClient, TestBroker, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Authentication method and data properties.
fn auth_properties(method: &str, data: &[u8]) -> Vec<u8> {
    let mut props = vec![0x15];
    string(&mut props, method.as_bytes());
    props.push(0x16);
    string(&mut props, data);
    props
}

/// An MQTT 5 CONNECT with an authentication method and data.
fn connect(client_id: &str, method: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.extend_from_slice(&[5, 0b0000_0010, 0, 30]);
    let props = auth_properties(method, data);
    varint(&mut body, props.len());
    body.extend_from_slice(&props);
    string(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// An AUTH 0x18 (continue authentication).
fn auth(method: &str, data: &[u8]) -> Vec<u8> {
    let mut body = vec![0x18];
    let props = auth_properties(method, data);
    varint(&mut body, props.len());
    body.extend_from_slice(&props);
    packet(0xF0, &body)
}

/// A packet from the broker: its type nibble, reason code and authentication data.
#[derive(Debug)]
struct Answer {
    kind: u8,
    code: u8,
    data: Option<Vec<u8>>,
}

async fn read_answer(stream: &mut TcpStream) -> Option<Answer> {
    let mut header = [0u8; 1];
    tokio::time::timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("an answer in time")
        .ok()?;
    let mut length = 0usize;
    for i in 0..4 {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.ok()?;
        length |= usize::from(byte[0] & 0x7f) << (7 * i);
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.ok()?;
    let kind = header[0] >> 4;
    // CONNACK: flags, reason, properties; AUTH: reason, properties.
    let at = if kind == 2 { 1 } else { 0 };
    let code = body[at];
    let mut i = at + 1;
    let mut props_len = 0usize;
    let mut shift = 0;
    loop {
        let byte = body[i];
        i += 1;
        props_len |= usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    let props = &body[i..i + props_len];
    let mut data = None;
    let mut p = 0;
    while p < props.len() {
        let id = props[p];
        p += 1;
        match id {
            // Two-byte-length strings and binary data.
            0x15 | 0x16 | 0x12 | 0x1F => {
                let len = usize::from(u16::from_be_bytes([props[p], props[p + 1]]));
                if id == 0x16 {
                    data = Some(props[p + 2..p + 2 + len].to_vec());
                }
                p += 2 + len;
            }
            0x21 | 0x22 | 0x13 => p += 2,
            0x27 | 0x11 => p += 4,
            _ => p += 1,
        }
    }
    Some(Answer { kind, code, data })
}

/// A SCRAM-SHA-256 client's proof and the server signature it expects.
fn client_final(password: &str, client_first_bare: &str, server_first: &str) -> (String, String) {
    let field = |name: &str| {
        server_first
            .split(',')
            .find_map(|f| f.strip_prefix(name))
            .expect("server-first field")
            .to_owned()
    };
    let nonce = field("r=");
    let salt = BASE64.decode(field("s=")).expect("salt");
    let iterations: u32 = field("i=").parse().expect("iterations");
    let mut salted = [0u8; 32];
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(iterations).expect("iterations"),
        &salt,
        password.as_bytes(),
        &mut salted,
    );
    let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
    let client_key = hmac::sign(&key, b"Client Key");
    let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
    let without_proof = format!("c=biws,r={nonce}");
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let signature = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref()),
        auth_message.as_bytes(),
    );
    let proof: Vec<u8> = client_key
        .as_ref()
        .iter()
        .zip(signature.as_ref())
        .map(|(k, s)| k ^ s)
        .collect();
    let server_key = hmac::sign(&key, b"Server Key");
    let server_signature = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, server_key.as_ref()),
        auth_message.as_bytes(),
    );
    (
        format!("{without_proof},p={}", BASE64.encode(proof)),
        format!("v={}", BASE64.encode(server_signature.as_ref())),
    )
}

/// Runs the exchange as `user` with `password`; the CONNACK.
async fn scram_login(addr: std::net::SocketAddr, user: &str, password: &str) -> (Answer, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let bare = format!("n={user},r=fyko+d2lbbFgONRv9qkxdawL");
    stream
        .write_all(&connect(
            user,
            "SCRAM-SHA-256",
            format!("n,,{bare}").as_bytes(),
        ))
        .await
        .expect("write CONNECT");
    let first = read_answer(&mut stream).await.expect("AUTH");
    assert_eq!((first.kind, first.code), (15, 0x18), "AUTH 0x18: {first:?}");
    let server_first = String::from_utf8(first.data.expect("server-first")).expect("UTF-8");
    assert!(server_first.starts_with("r=fyko+d2lbbFgONRv9qkxdawL"));
    let (final_message, expected) = client_final(password, &bare, &server_first);
    stream
        .write_all(&auth("SCRAM-SHA-256", final_message.as_bytes()))
        .await
        .expect("write AUTH");
    let connack = read_answer(&mut stream).await.expect("CONNACK");
    assert_eq!(connack.kind, 2, "{connack:?}");
    (connack, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_logs_in_and_refuses_what_it_must() {
    let dir = temp_dir("scram");
    let file = dir.path().join("passwords");
    let mut editor = PasswordFileEditor::new();
    editor
        .set("alice", &Hash::new_scram(b"wonderland").expect("verifier"))
        .expect("set");
    editor
        .set("bob", &Hash::new_argon2id(b"builder").expect("hash"))
        .expect("set");
    editor.save(&file).expect("save");
    let mut broker = TestBroker::start_with_auth(
        |_| {},
        AuthConfig {
            password_file: Some(file),
            failure_delay_max: Duration::ZERO,
            ..AuthConfig::default()
        },
    )
    .await;

    // The right password: CONNACK 0x00 with the server's signature, which the client checks.
    let (connack, expected) = scram_login(broker.addr, "alice", "wonderland").await;
    assert_eq!(connack.code, 0, "{connack:?}");
    assert_eq!(
        connack.data.as_deref(),
        Some(expected.as_bytes()),
        "the server proves it holds the verifier"
    );
    match broker.connected("alice").await {
        ConnectionEvent::Connected {
            auth_method,
            username,
            ..
        } => {
            assert_eq!(auth_method, AuthMethod::Scram);
            assert_eq!(username.as_deref(), Some("alice"));
        }
        other => panic!("{other:?}"),
    }

    // A wrong password, and a user without a SCRAM verifier: 0x86 both.
    let (connack, _) = scram_login(broker.addr, "alice", "looking-glass").await;
    assert_eq!(connack.code, 0x86);
    let (connack, _) = scram_login(broker.addr, "bob", "builder").await;
    assert_eq!(
        connack.code, 0x86,
        "an argon2id entry has no SCRAM verifier"
    );
    let (connack, _) = scram_login(broker.addr, "nobody", "x").await;
    assert_eq!(connack.code, 0x86);

    // A method that is not offered: 0x8C at once.
    let mut stream = TcpStream::connect(broker.addr).await.expect("connect");
    stream
        .write_all(&connect("k", "KERBEROS", b"ticket"))
        .await
        .expect("write");
    let connack = read_answer(&mut stream).await.expect("CONNACK");
    assert_eq!((connack.kind, connack.code), (2, 0x8C));

    // The SCRAM user with a plain password, over 3.1.1.
    let (_, present) = RawClient::connect(
        broker.addr,
        ConnectOpts::new("alice-plain").login("alice", "wonderland"),
    )
    .await;
    assert!(!present);
}
