//! JWT authentication (`auth.jwt`): a token in the CONNECT's password field, signed with
//! HS256 (a shared secret from `auth.jwt.secret_file`) or RS256 / ES256 (a PEM public key
//! from `auth.jwt.public_key_file`).
//!
//! A password that is not a JWT (no header that decodes) is not this provider's: the next
//! provider of `auth.providers` is asked. A token that is one is checked as a whole: its
//! signature with the configured algorithm only (the header's `alg` never picks the key),
//! `exp` required and checked, `nbf` checked when present, both with `auth.jwt.leeway`; a
//! bad signature, an expired or not yet valid token, or a missing `exp` is a bad credential
//! (CONNACK 0x04). The claim `auth.jwt.client_id_claim` (default `clientid`) must be a string
//! equal to the client id, and the optional `publish` and `subscribe` claims must be lists of
//! valid topic filters: else CONNACK 0x05. Those lists are the topic filters the token grants
//! ([`Grants`]).
//!
//! The key is read at start and again on reload (SIGHUP); a key that cannot be read or parsed
//! leaves the one in force. Tokens never reach a log: errors name the file and the key, never
//! a token or a claim's value.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::{Grants, Refusal};
use crate::config::{JwtAlgorithm, JwtConfig};

/// Why the JWT key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The key file could not be read.
    #[error("{key}: {}: cannot read: {source}", path.display())]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The file holds no key of the kind the algorithm needs.
    #[error("{key}: {}: {message}", path.display())]
    Key {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key's bytes).
        message: String,
    },
}

/// The configured JWT verification: the key (replaced on reload) and the checks.
pub struct Jwt {
    /// The configuration key of the key file, for errors.
    key_name: &'static str,
    /// The key file, re-read on reload.
    path: PathBuf,
    /// The algorithm every token must be signed with.
    algorithm: JwtAlgorithm,
    /// The key in force.
    key: RwLock<Arc<DecodingKey>>,
    /// What is checked besides the signature (exp required, nbf, leeway, the algorithm).
    validation: Arc<Validation>,
    /// The claim that must equal the client id.
    client_id_claim: Arc<str>,
}

impl Jwt {
    /// The verification `config` describes, with its key read (blocking: at start).
    pub fn new(config: &JwtConfig) -> Result<Self, JwtError> {
        // (An unset file reads as an unreadable one, named by its key: the configuration's
        // validation refuses it first.)
        let (key_name, path) = match config.algorithm {
            JwtAlgorithm::Hs256 => ("auth.jwt.secret_file", &config.secret_file),
            JwtAlgorithm::Rs256 | JwtAlgorithm::Es256 => {
                ("auth.jwt.public_key_file", &config.public_key_file)
            }
        };
        let path = path.clone().unwrap_or_default();
        let key = load_key(config.algorithm, key_name, &path)?;
        let mut validation = Validation::new(algorithm(config.algorithm));
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // No audience is configured: a token naming one is not refused for it.
        validation.validate_aud = false;
        validation.leeway = config.leeway.as_secs();
        Ok(Self {
            key_name,
            path,
            algorithm: config.algorithm,
            key: RwLock::new(Arc::new(key)),
            validation: Arc::new(validation),
            client_id_claim: config.client_id_claim.as_str().into(),
        })
    }

    /// Reads the key file again; on failure the key in force stays. Blocking.
    pub fn reload(&self) -> Result<(), JwtError> {
        let key = load_key(self.algorithm, self.key_name, &self.path)?;
        *self.key.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(())
    }

    /// What a verification needs, owned, to run on the blocking pool.
    pub(super) fn verifier(&self) -> Verifier {
        Verifier {
            key: Arc::clone(&self.key.read().unwrap_or_else(|e| e.into_inner())),
            validation: Arc::clone(&self.validation),
            client_id_claim: Arc::clone(&self.client_id_claim),
        }
    }
}

/// Whether `password` is a JWT at all (three parts, a header that decodes and names an
/// algorithm): if not, the next provider is asked.
pub fn is_jwt(password: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(password) else {
        return false;
    };
    text.split('.').count() == 3 && jsonwebtoken::decode_header(text).is_ok()
}

/// A verification's key and checks, owned by the blocking task that runs it.
pub(super) struct Verifier {
    key: Arc<DecodingKey>,
    validation: Arc<Validation>,
    client_id_claim: Arc<str>,
}

impl Verifier {
    /// Checks `token` for `client_id` (module doc); the grants its claims carry.
    pub(super) fn verify(&self, token: &[u8], client_id: &str) -> Result<Option<Grants>, Refusal> {
        let claims =
            match jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation) {
                Ok(data) => data.claims,
                Err(error) => {
                    return Err(match error.kind() {
                        // Signed, valid, but its claims are not an object: not authorised.
                        ErrorKind::Json(_) => Refusal::NotAuthorized,
                        _ => Refusal::BadCredentials,
                    });
                }
            };
        match claims.get(&*self.client_id_claim) {
            Some(Value::String(id)) if id == client_id => {}
            _ => return Err(Refusal::NotAuthorized),
        }
        let filters = |name: &str| -> Result<Option<Vec<Box<str>>>, Refusal> {
            match claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| match item {
                        Value::String(filter) => Ok(filter.as_str().into()),
                        _ => Err(Refusal::NotAuthorized),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(_) => Err(Refusal::NotAuthorized),
            }
        };
        let (publish, subscribe) = (filters("publish")?, filters("subscribe")?);
        if publish.is_none() && subscribe.is_none() {
            return Ok(None);
        }
        Grants::new(publish.unwrap_or_default(), subscribe.unwrap_or_default())
            .map(Some)
            .map_err(|_| Refusal::NotAuthorized)
    }
}

fn algorithm(algorithm: JwtAlgorithm) -> Algorithm {
    match algorithm {
        JwtAlgorithm::Hs256 => Algorithm::HS256,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Es256 => Algorithm::ES256,
    }
}

/// Reads the key of `algorithm` from `path`. An HS256 secret is the file's bytes without a
/// final line break (so that `echo SECRET > FILE` works).
fn load_key(
    algorithm: JwtAlgorithm,
    key_name: &'static str,
    path: &Path,
) -> Result<DecodingKey, JwtError> {
    let bytes = std::fs::read(path).map_err(|source| JwtError::Read {
        key: key_name,
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: &str| JwtError::Key {
        key: key_name,
        path: path.to_owned(),
        message: message.to_owned(),
    };
    match algorithm {
        JwtAlgorithm::Hs256 => {
            let secret = bytes
                .strip_suffix(b"\n")
                .map(|s| s.strip_suffix(b"\r").unwrap_or(s))
                .unwrap_or(&bytes);
            if secret.len() < 32 {
                return Err(bad(
                    "the HS256 secret is shorter than 32 bytes: use a random secret of at \
                     least 32 bytes",
                ));
            }
            DecodingKey::from_secret(secret).map_err(|_| bad("not a usable HS256 secret"))
        }
        JwtAlgorithm::Rs256 => {
            DecodingKey::from_rsa_pem(&bytes).map_err(|_| bad("not a PEM RSA public key (RS256)"))
        }
        JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(&bytes)
            .map_err(|_| bad("not a PEM EC P-256 public key (ES256)")),
    }
}
