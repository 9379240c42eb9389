//! SCRAM-SHA-256 (RFC 5802, RFC 7677), the MQTT 5 enhanced authentication method the broker
//! offers: the client proves it knows the password without sending it, and the broker proves
//! it holds the user's verifier.
//!
//! The exchange rides on CONNECT and AUTH packets (authentication method `SCRAM-SHA-256`):
//! CONNECT carries the client-first message, the broker answers AUTH 0x18 with the
//! server-first message, the client sends AUTH 0x18 with the client-final message, and the
//! CONNACK carries the server-final message. Channel binding is not offered (gs2 header `n,,`
//! or `y,,`). The verifier is a password file entry,
//! `SCRAM-SHA-256$<iterations>$<salt>$<StoredKey>$<ServerKey>` ([`Verifier`]: PostgreSQL's
//! fields, with `$` where PostgreSQL has `:`, which ends a password file's user name); an unknown user
//! gets a made-up salt, the same at every attempt, so that the exchange does not tell which
//! users exist.

use std::fmt;
use std::num::NonZeroU32;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};
use subtle::ConstantTimeEq;

/// The method name in CONNECT's and AUTH's authentication method property.
pub const METHOD: &str = "SCRAM-SHA-256";
/// Iterations of a verifier `broker passwd --scram` writes (RFC 7677's minimum).
pub const ITERATIONS: u32 = 4096;
/// Length of the random nonce the broker adds, in bytes before base64.
const NONCE_LEN: usize = 18;
/// Longest client message read (user names are short; this bounds the work per attempt).
const MAX_MESSAGE: usize = 1024;

/// What the broker stores for a user: enough to check a proof, not the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// The salt.
    pub salt: Vec<u8>,
    /// SHA-256(ClientKey).
    pub stored_key: [u8; 32],
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: [u8; 32],
}

/// Shows the parameters only: keys must not reach a log.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verifier(iterations: {}, ..)", self.iterations)
    }
}

impl Verifier {
    /// The verifier of `password` with `salt` and `iterations` (PBKDF2-HMAC-SHA-256: CPU-heavy,
    /// about a millisecond per thousand iterations).
    pub fn new(password: &[u8], salt: &[u8], iterations: u32) -> Self {
        let mut salted = [0u8; 32];
        let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            salt,
            password,
            &mut salted,
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&key, b"Client Key");
        let server_key = hmac::sign(&key, b"Server Key");
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(client_key.as_ref()),
            server_key: to_32(server_key.as_ref()),
        }
    }

    /// Whether `password` is the one this verifier was made of (for a plain CONNECT with a
    /// password by a user whose entry is a SCRAM verifier). Constant-time comparison.
    pub fn verify(&self, password: &[u8]) -> bool {
        let again = Self::new(password, &self.salt, self.iterations);
        bool::from(again.stored_key.ct_eq(&self.stored_key))
            & bool::from(again.server_key.ct_eq(&self.server_key))
    }

    /// Parses `SCRAM-SHA-256$<iterations>$<salt>$<StoredKey>$<ServerKey>` (standard base64).
    /// The error names what is wrong, never the field.
    pub fn parse(field: &str) -> Result<Self, String> {
        let rest = field
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or("a SCRAM entry starts with SCRAM-SHA-256$")?;
        let mut parts = rest.split('$');
        let (Some(iterations), Some(salt), Some(stored), Some(server), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(
                "a SCRAM entry must be SCRAM-SHA-256$<iterations>$<salt>$<StoredKey>$<ServerKey>"
                    .into(),
            );
        };
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| "the iteration count of a SCRAM entry is not a number")?;
        if iterations == 0 {
            return Err("the iteration count of a SCRAM entry is 0".into());
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| "the salt of a SCRAM entry is not valid base64")?;
        if salt.is_empty() {
            return Err("the salt of a SCRAM entry is empty".into());
        }
        let key = |text: &str| -> Result<[u8; 32], String> {
            let bytes = BASE64
                .decode(text)
                .map_err(|_| "a key of a SCRAM entry is not valid base64")?;
            <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| "a key of a SCRAM entry is not 32 bytes".to_owned())
        };
        Ok(Self {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// The entry as written after `user:`.
    pub fn to_line_field(&self) -> String {
        format!(
            "SCRAM-SHA-256${}${}${}${}",
            self.iterations,
            BASE64.encode(&self.salt),
            BASE64.encode(self.stored_key),
            BASE64.encode(self.server_key)
        )
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    to_32(digest::digest(&digest::SHA256, data).as_ref())
}

fn to_32(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&bytes[..32]);
    out
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A client message does not follow RFC 5802 (the broker answers CONNACK 0x87).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for something not offered (channel binding, an authorization id,
    /// a mandatory extension): CONNACK 0x87.
    #[error("not offered: {0}")]
    Unsupported(&'static str),
    /// The proof is wrong, or the user unknown: CONNACK 0x86.
    #[error("the proof does not match")]
    BadProof,
}

/// The broker's side after the server-first message.
#[derive(Debug)]
pub struct Exchange {
    /// The user name the client gave (unescaped).
    pub user: String,
    gs2_header: String,
    nonce: String,
    client_first_bare: String,
    server_first: String,
    verifier: Verifier,
    known: bool,
}

impl Exchange {
    /// Reads the client-first message and makes the server-first message, adding
    /// `server_nonce` (printable, no comma) to the client's nonce. `verifier` is the user's,
    /// `None` when there is none (a made-up one from `unknown_salt` is used, and the exchange
    /// will fail at the proof).
    pub fn start(
        client_first: &[u8],
        server_nonce: &str,
        lookup: impl FnOnce(&str) -> Option<Verifier>,
        unknown_salt: impl FnOnce(&str) -> Vec<u8>,
    ) -> Result<(Self, String), ScramError> {
        if client_first.len() > MAX_MESSAGE {
            return Err(ScramError::Malformed("client-first message too long"));
        }
        let text = std::str::from_utf8(client_first)
            .map_err(|_| ScramError::Malformed("client-first message is not UTF-8"))?;
        let mut parts = text.splitn(3, ',');
        let (Some(binding), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(ScramError::Malformed("no gs2 header"));
        };
        match binding {
            "n" | "y" => {}
            b if b.starts_with("p=") => return Err(ScramError::Unsupported("channel binding")),
            _ => return Err(ScramError::Malformed("bad gs2 channel binding flag")),
        }
        if !authzid.is_empty() {
            return Err(ScramError::Unsupported("an authorization identity"));
        }
        let mut fields = bare.split(',');
        let user = fields
            .next()
            .and_then(|f| f.strip_prefix("n="))
            .ok_or(ScramError::Malformed("no user name"))?;
        let user = unescape(user)?;
        let client_nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("no client nonce"))?;
        if fields.any(|f| f.starts_with("m=")) {
            return Err(ScramError::Unsupported("a mandatory extension"));
        }
        let nonce = format!("{client_nonce}{server_nonce}");
        let (verifier, known) = match lookup(&user) {
            Some(v) => (v, true),
            None => (
                Verifier {
                    iterations: ITERATIONS,
                    salt: unknown_salt(&user),
                    stored_key: [0; 32],
                    server_key: [0; 32],
                },
                false,
            ),
        };
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = Self {
            user,
            gs2_header: format!("{binding},{authzid},"),
            nonce,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            verifier,
            known,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final message; the server-final message when the proof is right.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        if client_final.len() > MAX_MESSAGE {
            return Err(ScramError::Malformed("client-final message too long"));
        }
        let text = std::str::from_utf8(client_final)
            .map_err(|_| ScramError::Malformed("client-final message is not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut fields = without_proof.split(',');
        let binding = fields
            .next()
            .and_then(|f| f.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding"))?;
        if binding != BASE64.encode(self.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed(
                "channel binding differs from the gs2 header",
            ));
        }
        let nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed("the nonce is not the server's"));
        }
        let proof = BASE64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("the proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("the proof is not 32 bytes"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let stored = hmac::Key::new(hmac::HMAC_SHA256, &self.verifier.stored_key);
        let signature = hmac::sign(&stored, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(signature.as_ref())
            .map(|(p, s)| p ^ s)
            .collect();
        let right = bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key));
        if !(right && self.known) {
            return Err(ScramError::BadProof);
        }
        let server = hmac::Key::new(hmac::HMAC_SHA256, &self.verifier.server_key);
        let server_signature = hmac::sign(&server, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature.as_ref())))
    }
}

/// A user name as SCRAM escapes it: `=2C` for `,` and `=3D` for `=`.
fn unescape(name: &str) -> Result<String, ScramError> {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(ScramError::Malformed("bad escape in the user name")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    if out.is_empty() {
        return Err(ScramError::Malformed("empty user name"));
    }
    Ok(out)
}

/// A random nonce for the server-first message (base64 of [`NONCE_LEN`] random bytes).
pub fn server_nonce() -> Option<String> {
    let mut bytes = [0u8; NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).ok()?;
    Some(BASE64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: user "user", password "pencil".
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn pencil() -> Verifier {
        let salt = BASE64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("salt");
        Verifier::new(b"pencil", &salt, 4096)
    }

    #[test]
    fn rfc_7677_exchange() {
        let (exchange, server_first) = Exchange::start(
            CLIENT_FIRST.as_bytes(),
            SERVER_NONCE,
            |user| (user == "user").then(pencil),
            |_| unreachable!(),
        )
        .expect("client-first accepted");
        assert_eq!(server_first, SERVER_FIRST);
        assert_eq!(exchange.user, "user");
        assert_eq!(
            exchange.finish(CLIENT_FINAL.as_bytes()).as_deref(),
            Ok(SERVER_FINAL)
        );
    }

    #[test]
    fn wrong_proofs_unknown_users_and_tampering_fail() {
        let start = |first: &str| {
            Exchange::start(
                first.as_bytes(),
                SERVER_NONCE,
                |user| (user == "user").then(pencil),
                |_| b"made-up salt".to_vec(),
            )
        };
        let (exchange, _) = start(CLIENT_FIRST).expect("start");
        let wrong = CLIENT_FINAL.replace("p=dHzb", "p=dHzc");
        assert_eq!(exchange.finish(wrong.as_bytes()), Err(ScramError::BadProof));
        // Another nonce than the server's.
        let (exchange, _) = start(CLIENT_FIRST).expect("start");
        let other = CLIENT_FINAL.replace("$k0,", "$k1,");
        assert!(matches!(
            exchange.finish(other.as_bytes()),
            Err(ScramError::Malformed(_))
        ));
        // An unknown user gets a salt and fails at the proof.
        let (exchange, first) = start("n,,n=nobody,r=abc").expect("start");
        assert!(first.contains(&BASE64.encode(b"made-up salt")));
        let final_ = format!("c=biws,r=abc{SERVER_NONCE},p={}", BASE64.encode([0u8; 32]));
        assert_eq!(
            exchange.finish(final_.as_bytes()),
            Err(ScramError::BadProof)
        );
        // Channel binding and authorization ids are not offered.
        assert!(matches!(
            start("p=tls-unique,,n=user,r=abc"),
            Err(ScramError::Unsupported(_))
        ));
        assert!(matches!(
            start("n,a=admin,n=user,r=abc"),
            Err(ScramError::Unsupported(_))
        ));
        assert!(matches!(start("garbage"), Err(ScramError::Malformed(_))));
    }

    #[test]
    fn verifiers_round_trip_and_check_passwords() {
        let v = pencil();
        let line = v.to_line_field();
        assert!(line.starts_with("SCRAM-SHA-256$4096$W22ZaJ0SNY7soEsUEjb6gQ==$"));
        assert_eq!(Verifier::parse(&line), Ok(v.clone()));
        assert!(v.verify(b"pencil"));
        assert!(!v.verify(b"pen"));
        assert!(Verifier::parse("SCRAM-SHA-256$0$AAAA$AAAA$AAAA").is_err());
        assert!(Verifier::parse("SCRAM-SHA-256$4096$AAAA$AAAA").is_err());
        assert_eq!(unescape("a=2Cb=3Dc").as_deref(), Ok("a,b=c"));
        assert!(unescape("a=2").is_err());
    }
}
