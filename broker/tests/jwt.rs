//! JWT authentication at CONNECT: HS256, RS256 and ES256 tokens with keys made for the test;
//! `exp` and `nbf` checked; the client id claim; a bad signature; a password that is not a JWT
//! going on to the next provider; the topic filters a token grants; reloading the key.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use broker::auth::password_file::Hash;
use broker::auth::{Auth, Authenticated, Grants, Refusal, Request};
use broker::config::{AuthConfig, AuthProvider, JwtAlgorithm, JwtConfig};
use broker::event::ConnectionEvent;
use broker::labels::AuthMethod;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rumqttc::mqttbytes::v4::{ConnectReturnCode, Packet};
use serde_json::{json, Value};
use testkit::{temp_dir, ConnectOpts, RawClient, TempDir, TestBroker};

/// Seconds since the epoch, `offset` from now.
fn at(offset: i64) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    now + offset
}

/// A signing key and the file the broker verifies with.
struct Keys {
    algorithm: JwtAlgorithm,
    signing: EncodingKey,
    /// The secret or public key file.
    file: PathBuf,
    _dir: TempDir,
}

impl Keys {
    /// A random HS256 secret of 32 bytes (64 hex digits), written with a final newline.
    fn hs256() -> Self {
        let dir = temp_dir("jwt-hs");
        let secret = format!("{:032x}{:032x}", rand_u128(), rand_u128());
        let file = dir.path().join("secret");
        std::fs::write(&file, format!("{secret}\n")).expect("write secret");
        Self {
            algorithm: JwtAlgorithm::Hs256,
            signing: EncodingKey::from_secret(secret.as_bytes()).expect("secret"),
            file,
            _dir: dir,
        }
    }

    /// A new ES256 (P-256) key pair.
    fn es256() -> Self {
        let dir = temp_dir("jwt-es");
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let file = dir.path().join("public.pem");
        std::fs::write(&file, pair.public_key_pem()).expect("write public key");
        Self {
            algorithm: JwtAlgorithm::Es256,
            signing: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("ec key"),
            file,
            _dir: dir,
        }
    }

    /// A new 2048-bit RSA key pair, made by `openssl genrsa` (ring cannot make RSA keys).
    fn rs256() -> Self {
        let dir = temp_dir("jwt-rs");
        let private = dir.path().join("private.pem");
        let file = dir.path().join("public.pem");
        openssl(&["genrsa", "-out", path(&private), "2048"]);
        openssl(&["rsa", "-in", path(&private), "-pubout", "-out", path(&file)]);
        let pem = std::fs::read(&private).expect("read private key");
        Self {
            algorithm: JwtAlgorithm::Rs256,
            signing: EncodingKey::from_rsa_pem(&pem).expect("rsa key"),
            file,
            _dir: dir,
        }
    }

    fn jsonwebtoken_algorithm(&self) -> Algorithm {
        match self.algorithm {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        }
    }

    /// A token of `claims`.
    fn token(&self, claims: &Value) -> String {
        jsonwebtoken::encode(
            &Header::new(self.jsonwebtoken_algorithm()),
            claims,
            &self.signing,
        )
        .expect("encode")
    }

    /// `auth` with this key, no refusal delays, and the default claim name.
    fn config(&self) -> AuthConfig {
        let mut jwt = JwtConfig {
            algorithm: self.algorithm,
            leeway: Duration::from_secs(5),
            ..JwtConfig::default()
        };
        match self.algorithm {
            JwtAlgorithm::Hs256 => jwt.secret_file = Some(self.file.clone()),
            _ => jwt.public_key_file = Some(self.file.clone()),
        }
        AuthConfig {
            jwt,
            failure_delay_max: Duration::ZERO,
            ..AuthConfig::default()
        }
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).expect("random");
    u128::from_le_bytes(bytes)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (the RS256 test makes its RSA key with it)");
    assert!(output.status.success(), "openssl {args:?}: {output:?}");
}

/// CONNECT as `client_id` with user name `user` and `password`; the CONNACK's code (the
/// connection is closed on return: see [`connected`] for one that stays).
async fn connack(
    broker: &TestBroker,
    client_id: &str,
    user: &str,
    password: &str,
) -> ConnectReturnCode {
    connected(broker, client_id, user, password).await.1
}

/// As [`connack`], with the connection.
async fn connected(
    broker: &TestBroker,
    client_id: &str,
    user: &str,
    password: &str,
) -> (RawClient, ConnectReturnCode) {
    let opts = ConnectOpts::new(client_id).login(user, password);
    let (c, code) = RawClient::connack(broker.addr, opts).await;
    (c, code.expect("a CONNACK"))
}

fn method(event: ConnectionEvent) -> (Option<String>, AuthMethod) {
    match event {
        ConnectionEvent::Connected {
            username,
            auth_method,
            ..
        } => (username, auth_method),
        other => panic!("expected Connected, got {other:?}"),
    }
}

/// `auth`'s answer for `client_id` presenting `password`, asked directly.
async fn ask(
    auth: &Auth,
    client_id: &str,
    user: &str,
    password: &str,
) -> Result<Authenticated, Refusal> {
    auth.authenticate(Request {
        peer: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client_id,
        username: Some(user),
        password: Some(password.as_bytes()),
        identity: None,
    })
    .await
}

/// The checks every algorithm must pass, over MQTT.
async fn tokens_decide_who_connects(keys: Keys) {
    let mut broker = TestBroker::start_with_auth(|_| {}, keys.config()).await;
    let valid = keys.token(&json!({"clientid": "meter-1", "exp": at(600)}));
    let (_meter, code) = connected(&broker, "meter-1", "any", &valid).await;
    assert_eq!(code, ConnectReturnCode::Success);
    // The user name is not what a token verifies: none is recorded.
    assert_eq!(
        method(broker.connected("meter-1").await),
        (None, AuthMethod::Jwt)
    );

    let refused = [
        // Expired (beyond the 5 s leeway).
        (
            json!({"clientid": "meter-1", "exp": at(-60)}),
            ConnectReturnCode::BadUserNamePassword,
        ),
        // Not valid yet.
        (
            json!({"clientid": "meter-1", "exp": at(600), "nbf": at(60)}),
            ConnectReturnCode::BadUserNamePassword,
        ),
        // No exp at all.
        (
            json!({"clientid": "meter-1"}),
            ConnectReturnCode::BadUserNamePassword,
        ),
        // Another device's token, or none named.
        (
            json!({"clientid": "meter-2", "exp": at(600)}),
            ConnectReturnCode::NotAuthorized,
        ),
        (json!({"exp": at(600)}), ConnectReturnCode::NotAuthorized),
        (
            json!({"clientid": 7, "exp": at(600)}),
            ConnectReturnCode::NotAuthorized,
        ),
        // Grants that are not topic filters.
        (
            json!({"clientid": "meter-1", "exp": at(600), "publish": ["a/#/b"]}),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            json!({"clientid": "meter-1", "exp": at(600), "subscribe": "a/b"}),
            ConnectReturnCode::NotAuthorized,
        ),
    ];
    for (claims, code) in refused {
        let token = keys.token(&claims);
        assert_eq!(
            connack(&broker, "meter-1", "any", &token).await,
            code,
            "{claims}"
        );
    }
    // Signed with another key of the same algorithm: a bad signature.
    let other = match keys.algorithm {
        JwtAlgorithm::Hs256 => Keys::hs256(),
        JwtAlgorithm::Rs256 => Keys::rs256(),
        JwtAlgorithm::Es256 => Keys::es256(),
    };
    let forged = other.token(&json!({"clientid": "meter-1", "exp": at(600)}));
    assert_eq!(
        connack(&broker, "meter-1", "any", &forged).await,
        ConnectReturnCode::BadUserNamePassword
    );
    // The signature tampered with.
    let mut tampered = valid.clone();
    let last = tampered.pop().expect("a token");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(
        connack(&broker, "meter-1", "any", &tampered).await,
        ConnectReturnCode::BadUserNamePassword
    );
    // Not a JWT, and no other provider: bad credentials.
    assert_eq!(
        connack(&broker, "meter-1", "any", "hunter2").await,
        ConnectReturnCode::BadUserNamePassword
    );
    broker.no_event_pending();

    // The filters a token grants.
    let granted = keys.token(&json!({
        "clientid": "meter-1",
        "exp": at(600),
        "publish": ["meters/meter-1/#"],
        "subscribe": ["commands/meter-1", "broadcast/+"],
    }));
    let authenticated = ask(&broker.auth, "meter-1", "any", &granted)
        .await
        .expect("granted");
    assert_eq!(authenticated.method, AuthMethod::Jwt);
    assert_eq!(
        authenticated.grants.as_deref(),
        Some(&Grants {
            publish: vec!["meters/meter-1/#".into()],
            subscribe: vec!["commands/meter-1".into(), "broadcast/+".into()],
        })
    );
    // Without the claims, no grants.
    let plain = ask(&broker.auth, "meter-1", "any", &valid)
        .await
        .expect("valid");
    assert_eq!(plain.grants, None);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_tokens() {
    tokens_decide_who_connects(Keys::hs256()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_tokens() {
    tokens_decide_who_connects(Keys::rs256()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_tokens() {
    tokens_decide_who_connects(Keys::es256()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_another_algorithm_is_refused() {
    // The key is ES256; an HS256 token (say, signed with the public key as a secret) is not
    // accepted whatever its header says.
    let keys = Keys::es256();
    let auth = Auth::new(&keys.config()).expect("auth");
    let public = std::fs::read(&keys.file).expect("public key");
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"clientid": "x", "exp": at(600)}),
        &EncodingKey::from_secret(&public).expect("secret"),
    )
    .expect("encode");
    assert_eq!(
        ask(&auth, "x", "u", &token).await,
        Err(Refusal::BadCredentials)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_that_is_not_a_jwt_goes_to_the_next_provider() {
    let keys = Keys::hs256();
    let dir = temp_dir("jwt-chain");
    let passwords = dir.path().join("passwords");
    let hash = Hash::new_argon2id(b"s3cret").expect("hash");
    std::fs::write(&passwords, format!("pump-1:{}\n", hash.to_line_field())).expect("write");
    let token = keys.token(&json!({"clientid": "pump-2", "exp": at(600)}));
    for order in [
        vec![AuthProvider::Jwt, AuthProvider::PasswordFile],
        vec![AuthProvider::PasswordFile, AuthProvider::Jwt],
    ] {
        let config = AuthConfig {
            password_file: Some(passwords.clone()),
            providers: order.clone(),
            ..keys.config()
        };
        let mut broker = TestBroker::start_with_auth(|_| {}, config).await;
        // A password: not a JWT, so the password file decides.
        let (_pump_1, code) = connected(&broker, "pump-1", "pump-1", "s3cret").await;
        assert_eq!(code, ConnectReturnCode::Success);
        assert_eq!(
            method(broker.connected("pump-1").await),
            (Some("pump-1".to_owned()), AuthMethod::Password),
            "{order:?}"
        );
        // A token under a user name the file does not have: not the file's, so the JWT decides.
        let (_pump_2, code) = connected(&broker, "pump-2", "fleet", &token).await;
        assert_eq!(code, ConnectReturnCode::Success);
        assert_eq!(
            method(broker.connected("pump-2").await),
            (None, AuthMethod::Jwt),
            "{order:?}"
        );
        // A wrong password for a user the file has: denied, whatever comes after.
        assert_eq!(
            connack(&broker, "pump-1", "pump-1", "wrong").await,
            ConnectReturnCode::BadUserNamePassword
        );
        broker.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_is_read_at_start_and_on_reload() {
    let keys = Keys::hs256();
    let auth = Arc::new(Auth::new(&keys.config()).expect("auth"));
    let old = keys.token(&json!({"clientid": "c", "exp": at(600)}));
    assert!(ask(&auth, "c", "u", &old).await.is_ok());

    // A new secret: tokens of the old one stop working, the new one's work.
    let new = Keys::hs256();
    std::fs::copy(&new.file, &keys.file).expect("replace the secret");
    assert!(auth.reload().expect("reload"));
    assert_eq!(
        ask(&auth, "c", "u", &old).await,
        Err(Refusal::BadCredentials)
    );
    let fresh = new.token(&json!({"clientid": "c", "exp": at(600)}));
    assert!(ask(&auth, "c", "u", &fresh).await.is_ok());

    // A key that cannot be used: the reload fails naming the key, the one in force stays.
    std::fs::write(&keys.file, "short\n").expect("write");
    let error = auth.reload().expect_err("a short secret");
    assert!(
        error.to_string().contains("auth.jwt.secret_file"),
        "{error}"
    );
    assert!(ask(&auth, "c", "u", &fresh).await.is_ok());

    // At start, a missing or unusable file stops the broker with the key named.
    let missing = AuthConfig {
        jwt: JwtConfig {
            secret_file: Some(keys.file.with_extension("missing")),
            ..JwtConfig::default()
        },
        ..AuthConfig::default()
    };
    let error = Auth::new(&missing).err().expect("missing file");
    assert!(
        error.to_string().contains("auth.jwt.secret_file"),
        "{error}"
    );
    let mut not_a_key = Keys::es256().config();
    not_a_key.jwt.public_key_file = Some(keys.file.clone());
    let error = Auth::new(&not_a_key).err().expect("not a PEM key");
    let shown = error.to_string();
    assert!(
        shown.contains("auth.jwt.public_key_file") && shown.contains("ES256"),
        "{shown}"
    );
}

/// The filters a token grants are the client's ACL: it subscribes and publishes there only
/// (SUBACK 0x80, PUBLISH acknowledged and dropped elsewhere); a token without them is not
/// restricted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topics_a_token_grants_are_all_it_may_use() {
    use broker::labels::AclDenial;
    use broker::metrics::metrics;
    use rumqttc::mqttbytes::v4::{PubAck, Subscribe, SubscribeFilter, SubscribeReasonCode};
    use rumqttc::mqttbytes::QoS;

    let keys = Keys::hs256();
    let broker = TestBroker::start_with_auth(|_| {}, keys.config()).await;
    let granted = keys.token(&json!({
        "clientid": "meter-1",
        "exp": at(600),
        "publish": ["meters/meter-1/#"],
        "subscribe": ["commands/meter-1"],
    }));
    let (mut meter, code) = connected(&broker, "meter-1", "meter-1", &granted).await;
    assert_eq!(code, ConnectReturnCode::Success);
    let open = keys.token(&json!({"clientid": "console", "exp": at(600)}));
    let (mut console, code) = connected(&broker, "console", "console", &open).await;
    assert_eq!(code, ConnectReturnCode::Success);

    let mut sub = Subscribe::new_many(
        ["commands/meter-1", "commands/meter-2", "meters/#"]
            .map(|f| SubscribeFilter::new(f.into(), QoS::AtLeastOnce)),
    );
    sub.pkid = 1;
    meter.send(&Packet::Subscribe(sub)).await;
    match meter.recv().await {
        Some(Packet::SubAck(ack)) => assert_eq!(
            ack.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Failure
            ]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The console (no claims) reads everything.
    let mut sub = Subscribe::new("#", QoS::AtLeastOnce);
    sub.pkid = 1;
    console.send(&Packet::Subscribe(sub)).await;
    assert!(matches!(console.recv().await, Some(Packet::SubAck(_))));
    for (pkid, topic) in [(1, "meters/meter-2/up"), (2, "meters/meter-1/up")] {
        meter
            .publish(topic, QoS::AtLeastOnce, false, b"21.5", pkid)
            .await;
        assert!(matches!(meter.recv().await, Some(Packet::PubAck(a)) if a.pkid == pkid));
    }
    match console.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(
                p.topic, "meters/meter-1/up",
                "meter-2's topic was not granted"
            );
            console.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    assert_eq!(metrics().acl_denied.get(AclDenial::Publish), 1);
    console
        .publish("commands/meter-1", QoS::AtLeastOnce, false, b"reset", 9)
        .await;
    match meter.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(p.topic, "commands/meter-1"),
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    broker.stop().await;
}
