//! API tokens: the `http.api_tokens_file` format, the roles, and who a request's bearer token
//! is ([`ApiAccess`]).
//!
//! The file holds one line per token, `NAME ROLE SHA256HEX`: a name for logs, the role (`read`
//! or `admin`) and the lowercase hex SHA-256 of the token, so that the file never holds a usable
//! secret. Blank lines and lines starting with `#` are skipped; any other line that does not
//! parse fails the whole load with its line number (as a malformed password line does:
//! CVE-2018-12551). `broker token NAME ROLE` makes a token and its line ([`new_token`],
//! [`line`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use ring::digest;
use subtle::ConstantTimeEq;

use crate::config::HttpConfig;

/// Random bytes in a token made by [`new_token`].
pub const TOKEN_BYTES: usize = 32;
/// Longest token name.
pub const NAME_MAX: usize = 64;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Every endpoint except the admin ones.
    Read,
    /// Every endpoint.
    Admin,
}

impl Role {
    /// Every role's name, for messages.
    pub const NAMES: &'static str = "read, admin";

    /// The role named `name` (`read`, `admin`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "read" => Some(Self::Read),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The role's name, as the file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a tokens file could not be used, or a token made.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read.
    #[error("http.api_tokens_file: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("http.api_tokens_file: {path} line {line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line's number, from 1.
        line: usize,
        /// What is wrong, and what would be valid.
        message: String,
    },
    /// No secure random source for a new token.
    #[error("no secure random source for a new token")]
    Random,
}

/// One token of the file.
#[derive(Debug, Clone)]
struct Entry {
    name: Arc<str>,
    role: Role,
    digest: [u8; 32],
}

/// The tokens of one file.
#[derive(Debug, Clone, Default)]
pub struct TokenFile {
    entries: Vec<Entry>,
}

impl TokenFile {
    /// Reads and parses the file at `path` (blocking).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses `text`, the contents of `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, TokensError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let error = |message: String| TokensError::Line {
                path: path.to_owned(),
                line,
                message,
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let [name, role, hex] = fields[..] else {
                return Err(error(format!(
                    "expected 3 fields, NAME ROLE SHA256HEX (role {}), got {}",
                    Role::NAMES,
                    fields.len()
                )));
            };
            check_name(name).map_err(|why| error(format!("token name {why}")))?;
            let role = Role::from_name(role).ok_or_else(|| {
                error(format!(
                    "unknown role {:?}: expected one of {}",
                    escape(role),
                    Role::NAMES
                ))
            })?;
            let digest = parse_hex(hex).ok_or_else(|| {
                error(
                    "the third field must be the token's SHA-256 as 64 lowercase hex digits \
                     (`broker token NAME ROLE` prints the line)"
                        .to_owned(),
                )
            })?;
            if let Some(other) = entries.iter().find(|e| *e.name == *name) {
                return Err(error(format!(
                    "duplicate token name {} (each name once)",
                    other.name
                )));
            }
            if let Some(other) = entries.iter().find(|e| e.digest == digest) {
                return Err(error(format!(
                    "the same token as {} (each token once)",
                    other.name
                )));
            }
            entries.push(Entry {
                name: name.into(),
                role,
                digest,
            });
        }
        Ok(Self { entries })
    }

    /// Tokens in the file.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file holds no token (then every request is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name and role of `token`, if the file holds it. Its digest is compared with every
    /// entry's in constant time.
    fn find(&self, token: &str) -> Option<(Arc<str>, Role)> {
        let presented = sha256(token);
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.digest.ct_eq(&presented)) {
                found = Some((Arc::clone(&entry.name), entry.role));
            }
        }
        found
    }
}

/// Whether `name` may name a token: 1 to [`NAME_MAX`] letters, digits, `.`, `_`, `-` or `@`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(format!("must be 1 to {NAME_MAX} characters long"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(format!(
            "{:?} contains {:?}: use letters, digits, '.', '_', '-' or '@'",
            escape(name),
            c
        ));
    }
    Ok(())
}

/// `text` with control characters escaped, for messages.
fn escape(text: &str) -> String {
    text.chars().flat_map(char::escape_debug).collect()
}

/// The SHA-256 of `token`.
fn sha256(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

/// 64 lowercase hex digits.
fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// The lowercase hex SHA-256 of `token`, as the file holds it.
pub fn digest_hex(token: &str) -> String {
    sha256(token).iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token: [`TOKEN_BYTES`] bytes from the system's secure random source, in
/// URL-safe base64 without padding (43 characters).
pub fn new_token() -> Result<String, TokensError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| TokensError::Random)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The file line of `token` named `name` with `role`.
pub fn line(name: &str, role: Role, token: &str) -> String {
    format!("{name} {role} {}", digest_hex(token))
}

/// Who a request's bearer token is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name in the file (`None` without a tokens file: anyone).
    pub name: Option<Arc<str>>,
    /// What it may do.
    pub role: Role,
}

/// Why a request's token does not let it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization: Bearer` header, or a token the file does not hold: 401.
    Unauthorized(&'static str),
    /// A valid token whose role is below the endpoint's: 403.
    Forbidden {
        /// The token's name.
        name: Arc<str>,
        /// Its role.
        role: Role,
    },
}

/// Who may use the API: the tokens of `http.api_tokens_file` (reloaded on SIGHUP and by the
/// reload endpoint), and whether /metrics is open without one.
pub struct ApiAccess {
    /// The file and its tokens in force; `None`: no file, every request is let in.
    tokens: Option<(PathBuf, RwLock<Arc<TokenFile>>)>,
    /// `http.metrics_public`.
    metrics_public: bool,
}

impl ApiAccess {
    /// The access `config` describes; reads the tokens file (blocking: at start).
    pub fn new(config: &HttpConfig) -> Result<Self, TokensError> {
        let tokens = match &config.api_tokens_file {
            Some(path) => Some((path.clone(), RwLock::new(Arc::new(TokenFile::load(path)?)))),
            None => None,
        };
        Ok(Self {
            tokens,
            metrics_public: config.metrics_public,
        })
    }

    /// No tokens file: every request is let in.
    pub fn open() -> Self {
        Self {
            tokens: None,
            metrics_public: false,
        }
    }

    /// Whether a tokens file is configured.
    pub fn is_protected(&self) -> bool {
        self.tokens.is_some()
    }

    /// Whether /metrics is open without a token.
    pub fn metrics_public(&self) -> bool {
        self.metrics_public || self.tokens.is_none()
    }

    /// Reads the tokens file again; on failure the tokens in force stay. Blocking. `Ok(false)`
    /// when there is no tokens file.
    pub fn reload(&self) -> Result<bool, TokensError> {
        let Some((path, current)) = &self.tokens else {
            return Ok(false);
        };
        let file = TokenFile::load(path)?;
        *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(file);
        Ok(true)
    }

    /// Who the `Authorization` header `authorization` is, if they may do what `needed` allows.
    pub fn check(&self, authorization: Option<&[u8]>, needed: Role) -> Result<Caller, Denied> {
        let Some((_, current)) = &self.tokens else {
            return Ok(Caller {
                name: None,
                role: Role::Admin,
            });
        };
        let Some(value) = authorization else {
            return Err(Denied::Unauthorized("no Authorization: Bearer token"));
        };
        let token = std::str::from_utf8(value)
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Unauthorized(
                "the Authorization header is not `Bearer TOKEN`",
            ))?;
        let file = Arc::clone(&current.read().unwrap_or_else(|e| e.into_inner()));
        let (name, role) = file
            .find(token)
            .ok_or(Denied::Unauthorized("unknown token"))?;
        if role < needed {
            return Err(Denied::Forbidden { name, role });
        }
        Ok(Caller {
            name: Some(name),
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TokenFile, TokensError> {
        TokenFile::parse(text, Path::new("tokens"))
    }

    #[test]
    fn lines_parse_and_malformed_ones_name_their_number() {
        let a = new_token().expect("token");
        let b = new_token().expect("token");
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        let text = format!(
            "# API tokens\n\n{}\n  {}  \n",
            line("grafana", Role::Read, &a),
            line("ops@example", Role::Admin, &b)
        );
        let file = parse(&text).expect("valid");
        assert_eq!(file.len(), 2);
        assert_eq!(file.find(&a), Some(("grafana".into(), Role::Read)));
        assert_eq!(file.find(&b), Some(("ops@example".into(), Role::Admin)));
        assert_eq!(file.find("other"), None);

        let hex = digest_hex(&a);
        let cases = [
            ("x read".to_owned(), "expected 3 fields"),
            (format!("x read {hex} extra"), "expected 3 fields"),
            (format!("x write {hex}"), "expected one of read, admin"),
            (format!("x read {}", hex.to_uppercase()), "64 lowercase hex"),
            (format!("x read {}", &hex[..62]), "64 lowercase hex"),
            (format!("x read {}zz", &hex[..62]), "64 lowercase hex"),
            (format!("a/b read {hex}"), "token name"),
        ];
        for (bad, want) in cases {
            let text = format!("# comment\n{}\n{bad}\n", line("ok", Role::Read, &b));
            let error = parse(&text).expect_err(&bad).to_string();
            assert!(error.contains("tokens line 3"), "{bad}: {error}");
            assert!(error.contains(want), "{bad}: want {want:?} in {error}");
            assert!(error.contains("http.api_tokens_file"), "{error}");
        }
        let duplicate = format!(
            "{}\n{}\n",
            line("x", Role::Read, &a),
            line("x", Role::Admin, &b)
        );
        let error = parse(&duplicate).expect_err("duplicate").to_string();
        assert!(
            error.contains("line 2") && error.contains("duplicate token name x"),
            "{error}"
        );
    }

    #[test]
    fn roles_and_bearer_headers() {
        let (read, admin) = (new_token().expect("t"), new_token().expect("t"));
        let file = parse(&format!(
            "{}\n{}\n",
            line("r", Role::Read, &read),
            line("a", Role::Admin, &admin)
        ))
        .expect("valid");
        let access = ApiAccess {
            tokens: Some((PathBuf::from("tokens"), RwLock::new(Arc::new(file)))),
            metrics_public: false,
        };
        let header = |t: &str| format!("Bearer {t}").into_bytes();
        assert!(access.check(Some(&header(&read)), Role::Read).is_ok());
        assert!(matches!(
            access.check(Some(&header(&read)), Role::Admin),
            Err(Denied::Forbidden {
                role: Role::Read,
                ..
            })
        ));
        assert_eq!(
            access
                .check(Some(format!("bearer  {admin} ").as_bytes()), Role::Admin)
                .map(|c| c.role),
            Ok(Role::Admin)
        );
        for bad in [
            None,
            Some(&b"Basic abc"[..]),
            Some(b"Bearer "),
            Some(b"Bearer nope"),
        ] {
            assert!(
                matches!(access.check(bad, Role::Read), Err(Denied::Unauthorized(_))),
                "{bad:?}"
            );
        }
        assert!(!access.metrics_public());
        let open = ApiAccess::open();
        assert_eq!(
            open.check(None, Role::Admin).map(|c| c.role),
            Ok(Role::Admin)
        );
        assert!(open.metrics_public());
    }
}
