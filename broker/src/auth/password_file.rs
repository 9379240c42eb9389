//! Password files in Mosquitto's format: one `user:hash` line per user, read by the broker
//! and written by `broker passwd`.
//!
//! Hash formats (the field after the first `:`):
//! - `$7$<iterations>$<salt>$<hash>`: PBKDF2-HMAC-SHA512, what `mosquitto_passwd` writes since
//!   Mosquitto 2.0 (101 iterations, 12-byte salt, 64-byte hash).
//! - `$6$<salt>$<hash>`: SHA-512 of the password followed by the salt, one round; what
//!   Mosquitto 1.6 and earlier wrote (`mosquitto_passwd -H sha512`), still read by Mosquitto 2.
//! - `$argon2id$v=19$m=...,t=...,p=...$<salt>$<hash>`: a PHC string, what `broker passwd`
//!   writes for every user it adds or changes ([`Hash::new_argon2id`]).
//!
//! Salts and hashes of `$6$` and `$7$` are standard base64 with padding.
//!
//! Compatibility: Heartwire reads every file that `mosquitto_passwd` writes, so operators move
//! over without re-issuing credentials. The reverse is not true: Mosquitto cannot read
//! argon2id lines (it skips them with a warning, so those users cannot log in), so a file that
//! `broker passwd` has touched is Heartwire-only. To keep a file usable by both brokers, add
//! and change users with `mosquitto_passwd` only; `broker passwd -D` is safe either way.
//!
//! Stricter than Mosquitto, which skips any line it cannot read (CVE-2018-12551 was such a line
//! letting anyone in): here a line that cannot be parsed fails the whole load, naming its line
//! number. Ignored, as by Mosquitto: empty or blank lines and lines whose first character is
//! `#`. Blanks around the user name and the hash are trimmed, as Mosquitto does. A user name
//! cannot contain `:` (the separator). A user name on two lines is an error: Mosquitto 2 keeps
//! the first with a warning and older versions were unspecified, so neither choice can be
//! relied on. Errors never contain a hash, a password or the text of a line.
//!
//! Loading and writing are blocking file I/O, and [`Hash::verify`] costs milliseconds of CPU
//! for `$7$` and argon2id: callers on the async runtime run them on a blocking pool.

use super::scram;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha2::{Digest, Sha512};
use subtle::ConstantTimeEq;

/// Length of a SHA-512 digest, the hash length of `$6$` and `$7$` lines.
const SHA512_LEN: usize = 64;

/// Why a password file could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    /// The file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A line could not be parsed (its text, hash or password is never shown).
    #[error("{}: line {line}: {message}", path.display())]
    Line {
        /// The file (or `<stdin>` for `broker passwd --bulk`).
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The file could not be written.
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A user name cannot be stored in a password file.
    #[error("invalid user name: {0}")]
    User(&'static str),
    /// Hashing a new password failed.
    #[error("cannot hash the password: {0}")]
    Hashing(argon2::password_hash::Error),
    /// The operating system's random generator failed (a salt).
    #[error("cannot draw a random salt")]
    Random,
}

/// A stored password hash: one of the formats this module reads (see the module doc).
#[derive(Clone, PartialEq, Eq)]
pub enum Hash {
    /// `$6$`: SHA-512(password || salt), one round.
    Sha512 {
        /// The salt, as decoded from base64.
        salt: Vec<u8>,
        /// The digest.
        hash: [u8; SHA512_LEN],
    },
    /// `$7$`: PBKDF2-HMAC-SHA512.
    Pbkdf2Sha512 {
        /// PBKDF2 rounds (at least 1).
        iterations: u32,
        /// The salt, as decoded from base64.
        salt: Vec<u8>,
        /// The derived key.
        hash: [u8; SHA512_LEN],
    },
    /// Argon2id, as a PHC string (it carries its own parameters and salt), checked at parse.
    Argon2id(String),
    /// A SCRAM-SHA-256 verifier (PostgreSQL's format): the user may log in with MQTT 5
    /// enhanced authentication (`SCRAM-SHA-256`) as well as with a password.
    Scram(scram::Verifier),
}

/// Shows the kind only: a hash must not reach a log through `{:?}`.
impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hash::Sha512 { .. } => f.write_str("Hash::Sha512(..)"),
            Hash::Pbkdf2Sha512 { iterations, .. } => {
                write!(f, "Hash::Pbkdf2Sha512(iterations: {iterations}, ..)")
            }
            Hash::Argon2id(_) => f.write_str("Hash::Argon2id(..)"),
            Hash::Scram(v) => write!(f, "Hash::Scram({v:?})"),
        }
    }
}

impl Hash {
    /// Parses the field after `user:`. The error message names what is wrong, never the field.
    pub fn parse(field: &str) -> Result<Hash, String> {
        if let Some(rest) = field.strip_prefix("$7$") {
            let mut parts = rest.split('$');
            let (Some(iterations), Some(salt), Some(hash), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err("a $7$ hash must be $7$<iterations>$<salt>$<hash>".into());
            };
            let iterations: u32 = iterations
                .parse()
                .map_err(|_| "the iteration count of a $7$ hash is not a number")?;
            if iterations == 0 {
                return Err("the iteration count of a $7$ hash is 0".into());
            }
            Ok(Hash::Pbkdf2Sha512 {
                iterations,
                salt: decode_salt(salt)?,
                hash: decode_hash(hash)?,
            })
        } else if let Some(rest) = field.strip_prefix("$6$") {
            let mut parts = rest.split('$');
            let (Some(salt), Some(hash), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err("a $6$ hash must be $6$<salt>$<hash>".into());
            };
            Ok(Hash::Sha512 {
                salt: decode_salt(salt)?,
                hash: decode_hash(hash)?,
            })
        } else if field.starts_with("$argon2id$") {
            let phc = PasswordHash::new(field)
                .map_err(|_| "the argon2id hash is not a valid PHC string")?;
            if phc.hash.is_none() || phc.salt.is_none() {
                return Err("the argon2id hash has no salt or no hash".into());
            }
            argon2::Params::try_from(&phc)
                .map_err(|_| "the argon2id hash has invalid parameters")?;
            Ok(Hash::Argon2id(field.to_owned()))
        } else if field.starts_with("SCRAM-SHA-256$") {
            scram::Verifier::parse(field).map(Hash::Scram)
        } else if field.is_empty() {
            Err("no hash after the ':'".into())
        } else {
            Err("unknown hash type (expected $6$, $7$, $argon2id$ or SCRAM-SHA-256$)".into())
        }
    }

    /// Whether `password` matches. Comparisons are constant-time. CPU-heavy for `$7$` (under
    /// a millisecond at 101 iterations, more with more) and argon2id (about 20 ms with the
    /// default parameters): run it on a bounded blocking pool, not on the async runtime.
    pub fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Sha512 { salt, hash } => {
                let digest = Sha512::new()
                    .chain_update(password)
                    .chain_update(salt)
                    .finalize();
                bool::from(digest.as_slice().ct_eq(hash))
            }
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => {
                let mut derived = [0u8; SHA512_LEN];
                pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, *iterations, &mut derived);
                bool::from(derived.ct_eq(hash))
            }
            // password-hash compares the outputs in constant time.
            Hash::Argon2id(phc) => match PasswordHash::new(phc) {
                Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
                Err(_) => false,
            },
            Hash::Scram(verifier) => verifier.verify(password),
        }
    }

    /// A SCRAM-SHA-256 verifier of `password` with a random 16-byte salt and
    /// [`scram::ITERATIONS`] iterations (`broker passwd --scram`).
    pub fn new_scram(password: &[u8]) -> Result<Hash, PasswordFileError> {
        let mut salt = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| PasswordFileError::Random)?;
        Ok(Hash::Scram(scram::Verifier::new(
            password,
            &salt,
            scram::ITERATIONS,
        )))
    }

    /// Hashes `password` with argon2id and a random 16-byte salt from the OS, with the argon2
    /// crate's defaults, which are OWASP's first recommended setting: version 19, m = 19456 KiB
    /// (19 MiB), t = 2 passes, p = 1 lane.
    pub fn new_argon2id(password: &[u8]) -> Result<Hash, PasswordFileError> {
        let salt = SaltString::generate(&mut OsRng);
        let phc = Argon2::default()
            .hash_password(password, &salt)
            .map_err(PasswordFileError::Hashing)?;
        Ok(Hash::Argon2id(phc.to_string()))
    }

    /// The field as written after `user:` (the format it was read in).
    pub fn to_line_field(&self) -> String {
        match self {
            Hash::Sha512 { salt, hash } => {
                format!("$6${}${}", BASE64.encode(salt), BASE64.encode(hash))
            }
            Hash::Pbkdf2Sha512 {
                iterations,
                salt,
                hash,
            } => format!(
                "$7${iterations}${}${}",
                BASE64.encode(salt),
                BASE64.encode(hash)
            ),
            Hash::Argon2id(phc) => phc.clone(),
            Hash::Scram(verifier) => verifier.to_line_field(),
        }
    }
}

fn decode_salt(text: &str) -> Result<Vec<u8>, String> {
    let salt = BASE64
        .decode(text)
        .map_err(|_| "the salt is not valid base64")?;
    if salt.is_empty() {
        return Err("the salt is empty".into());
    }
    Ok(salt)
}

fn decode_hash(text: &str) -> Result<[u8; SHA512_LEN], String> {
    let hash = BASE64
        .decode(text)
        .map_err(|_| "the hash is not valid base64")?;
    <[u8; SHA512_LEN]>::try_from(hash.as_slice())
        .map_err(|_| format!("the hash is {} bytes, not {SHA512_LEN}", hash.len()))
}

/// Checks that `user` can be written to (and read back from) a password file: not empty, no
/// `:`, no line break, no blanks at either end (they would be trimmed on reading), not
/// starting with `#` (a comment).
pub fn check_user(user: &str) -> Result<(), PasswordFileError> {
    let problem = if user.is_empty() {
        "it is empty"
    } else if user.contains(':') {
        "it contains ':'"
    } else if user.contains(['\n', '\r']) {
        "it contains a line break"
    } else if user.trim_matches(is_blank) != user {
        "it starts or ends with a blank"
    } else if user.starts_with('#') {
        "it starts with '#'"
    } else {
        return Ok(());
    };
    Err(PasswordFileError::User(problem))
}

/// Mosquitto's blanks (`mosquitto_trimblanks`): space and tab.
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// One line of a password file, as parsed.
enum Line<'a> {
    /// Blank or comment.
    Ignored,
    /// `user:hash`, trimmed.
    Entry { user: &'a str, hash: Hash },
}

/// Parses one line (without its `\n`). `Err` is the message, never containing the line.
fn parse_line(text: &str) -> Result<Line<'_>, String> {
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.starts_with('#') || text.trim_matches(is_blank).is_empty() {
        return Ok(Line::Ignored);
    }
    let Some((user, field)) = text.split_once(':') else {
        return Err("no ':' between user name and hash".into());
    };
    let user = user.trim_matches(is_blank);
    if user.is_empty() {
        return Err("empty user name".into());
    }
    let field = field.trim_matches(is_blank);
    if field.contains(':') {
        return Err("more than one ':' (user names cannot contain ':')".into());
    }
    Ok(Line::Entry {
        user,
        hash: Hash::parse(field)?,
    })
}

/// The users of a password file and their hashes.
#[derive(Debug, Default)]
pub struct PasswordFile {
    /// User name -> hash; each user appears once (a duplicate fails the load).
    entries: HashMap<String, Hash>,
}

impl PasswordFile {
    /// Reads and parses the file at `path`. Blocking: call it off the async runtime.
    pub fn load(path: &Path) -> Result<Self, PasswordFileError> {
        let text = read(path)?;
        Self::parse(&text, path)
    }

    /// Parses the text of a password file; `path` is used in errors only.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PasswordFileError> {
        let mut entries = HashMap::new();
        let mut first_line: HashMap<&str, usize> = HashMap::new();
        for (index, text) in text.split('\n').enumerate() {
            let line = index + 1;
            let error = |message| PasswordFileError::Line {
                path: path.to_owned(),
                line,
                message,
            };
            match parse_line(text).map_err(error)? {
                Line::Ignored => {}
                Line::Entry { user, hash } => {
                    if let Some(first) = first_line.insert(user, line) {
                        return Err(error(format!("user name already on line {first}")));
                    }
                    entries.insert(user.to_owned(), hash);
                }
            }
        }
        Ok(Self { entries })
    }

    /// The hash of `user`, if the file has that user.
    pub fn lookup(&self, user: &str) -> Option<&Hash> {
        self.entries.get(user)
    }

    /// The users of this file that `newer` no longer lets in with the same password (removed,
    /// or given another hash).
    pub fn revoked_in<'a>(&'a self, newer: &PasswordFile) -> Vec<&'a str> {
        self.entries
            .iter()
            .filter(|(user, hash)| newer.entries.get(*user) != Some(*hash))
            .map(|(user, _)| user.as_str())
            .collect()
    }

    /// The number of users.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the file has no users.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn read(path: &Path) -> Result<String, PasswordFileError> {
    fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// A password file being changed by `broker passwd`: lines of users that are not changed, and
/// comments and blank lines, are written back byte for byte.
#[derive(Debug, Default)]
pub struct PasswordFileEditor {
    /// The file's lines, without their `\n`, in order.
    lines: Vec<EditLine>,
}

/// One line of a file being edited.
#[derive(Debug)]
enum EditLine {
    /// A user's line, as read or as written by [`PasswordFileEditor::set`].
    Entry {
        /// The trimmed user name.
        user: String,
        /// The whole line.
        text: String,
    },
    /// A blank line or a comment.
    Other(String),
}

impl PasswordFileEditor {
    /// An empty file (`broker passwd -c`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the file at `path` for editing; it must parse as a whole ([`PasswordFile::parse`]).
    pub fn open(path: &Path) -> Result<Self, PasswordFileError> {
        let text = read(path)?;
        Self::from_text(&text, path)
    }

    /// As [`Self::open`], from the file's text.
    pub fn from_text(text: &str, path: &Path) -> Result<Self, PasswordFileError> {
        PasswordFile::parse(text, path)?;
        let body = text.strip_suffix('\n').unwrap_or(text);
        let lines = if body.is_empty() {
            Vec::new()
        } else {
            body.split('\n')
                .map(|line| match parse_line(line) {
                    Ok(Line::Entry { user, .. }) => EditLine::Entry {
                        user: user.to_owned(),
                        text: line.to_owned(),
                    },
                    _ => EditLine::Other(line.to_owned()),
                })
                .collect()
        };
        Ok(Self { lines })
    }

    /// Sets the hash of `user`: its line is replaced in place, or a line is added at the end.
    pub fn set(&mut self, user: &str, hash: &Hash) -> Result<(), PasswordFileError> {
        check_user(user)?;
        let text = format!("{user}:{}", hash.to_line_field());
        for line in &mut self.lines {
            if let EditLine::Entry { user: u, text: t } = line {
                if u == user {
                    *t = text;
                    return Ok(());
                }
            }
        }
        self.lines.push(EditLine::Entry {
            user: user.to_owned(),
            text,
        });
        Ok(())
    }

    /// Removes the line of `user`; whether there was one.
    pub fn remove(&mut self, user: &str) -> bool {
        let before = self.lines.len();
        self.lines
            .retain(|line| !matches!(line, EditLine::Entry { user: u, .. } if u == user));
        self.lines.len() != before
    }

    /// Whether the file has a line for `user`.
    pub fn contains(&self, user: &str) -> bool {
        self.lines
            .iter()
            .any(|line| matches!(line, EditLine::Entry { user: u, .. } if u == user))
    }

    /// The file's text, every line ended by `\n`.
    pub fn to_text(&self) -> String {
        let mut text = String::new();
        for line in &self.lines {
            let (EditLine::Entry { text: line, .. } | EditLine::Other(line)) = line;
            text.push_str(line);
            text.push('\n');
        }
        text
    }

    /// Writes the file to `path` atomically (see [`write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), PasswordFileError> {
        write_atomic(path, self.to_text().as_bytes())
    }
}

/// Writes `contents` to `path` so that a reader sees the old file or the new one, never a
/// part: a temporary file in the same directory, created with mode 0600, synced, then renamed
/// over `path`, and the directory synced. Blocking.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), PasswordFileError> {
    let error = |source| PasswordFileError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| error(io::Error::other("not a file name")))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = dir.join(temp_name);
    let written = (|| {
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temp);
        return Err(error(source));
    }
    // The rename is durable once the directory is synced.
    fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(error)
}

/// Parses the input of `broker passwd --bulk`: `user:password` lines (the password is
/// everything after the first `:`, kept as is but for a trailing `\r`); blank lines and lines
/// starting with `#` are skipped. The first bad line fails the whole input; `source` names it
/// in errors, and no error contains a password.
pub fn parse_bulk(text: &str, source: &Path) -> Result<Vec<(String, String)>, PasswordFileError> {
    let mut users = Vec::new();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (index, line_text) in text.split('\n').enumerate() {
        let line = index + 1;
        let error = |message: String| PasswordFileError::Line {
            path: source.to_owned(),
            line,
            message,
        };
        let line_text = line_text.strip_suffix('\r').unwrap_or(line_text);
        if line_text.starts_with('#') || line_text.trim_matches(is_blank).is_empty() {
            continue;
        }
        let Some((user, password)) = line_text.split_once(':') else {
            return Err(error("no ':' between user name and password".into()));
        };
        if let Err(PasswordFileError::User(problem)) = check_user(user) {
            return Err(error(format!("invalid user name: {problem}")));
        }
        if password.is_empty() {
            return Err(error("empty password".into()));
        }
        if let Some(first) = seen.insert(user, line) {
            return Err(error(format!("user name already on line {first}")));
        }
        users.push((user.to_owned(), password.to_owned()));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Made by `mosquitto_passwd -c -b FILE alice secret` (Mosquitto 2.0).
    const ALICE_7: &str = "alice:$7$101$vYUcnz1NB1mjc/gu$LQvNRW7owBfODfvmyeF0+fTWvntVZ35kp1ssZGFfX7+UeG0JPli93oYc1xaIHNqCaOviL1lK7dqE9BovYmFRgA==";
    /// Made by `mosquitto_passwd -H sha512 -c -b FILE carol s3cret`.
    const CAROL_6: &str = "carol:$6$ODapeC0gLxMi25iT$yTShxNwkIZNN0BfHgxZoO0iOY7ZLU1kUIbT0Rt/hiHUVxkYOG0NrUBgSQiuOQ6WedW84dN5TGzDJiBP9U6JThw==";

    fn parse(text: &str) -> Result<PasswordFile, PasswordFileError> {
        PasswordFile::parse(text, Path::new("pw"))
    }

    /// The line number and message of a parse error.
    fn line_error(text: &str) -> (usize, String) {
        match parse(text) {
            Err(PasswordFileError::Line { line, message, .. }) => (line, message),
            other => panic!("expected a line error, got {other:?}"),
        }
    }

    #[test]
    fn mosquitto_vectors_verify() {
        let file = parse(&format!("{ALICE_7}\n{CAROL_6}\n")).unwrap();
        assert_eq!(file.len(), 2);
        let alice = file.lookup("alice").unwrap();
        assert!(
            matches!(alice, Hash::Pbkdf2Sha512 { iterations: 101, salt, .. } if salt.len() == 12)
        );
        assert!(alice.verify(b"secret"));
        assert!(!alice.verify(b"Secret"));
        assert!(!alice.verify(b""));
        let carol = file.lookup("carol").unwrap();
        assert!(matches!(carol, Hash::Sha512 { salt, .. } if salt.len() == 12));
        assert!(carol.verify(b"s3cret"));
        assert!(!carol.verify(b"secret"));
        assert!(file.lookup("bob").is_none());
        assert!(file.lookup("Alice").is_none());
    }

    #[test]
    fn fields_are_written_back_as_read() {
        for line in [ALICE_7, CAROL_6] {
            let field = line.split_once(':').unwrap().1;
            assert_eq!(Hash::parse(field).unwrap().to_line_field(), field);
        }
    }

    #[test]
    fn argon2id_round_trip() {
        let hash = Hash::new_argon2id(b"correct horse").unwrap();
        let field = hash.to_line_field();
        assert!(
            field.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{field}"
        );
        let file = parse(&format!("dave:{field}\n")).unwrap();
        let read = file.lookup("dave").unwrap();
        assert_eq!(read, &hash);
        assert!(read.verify(b"correct horse"));
        assert!(!read.verify(b"correct horse "));
        // Two hashes of one password differ (random salt).
        assert_ne!(Hash::new_argon2id(b"correct horse").unwrap(), hash);
    }

    #[test]
    fn comments_blank_lines_blanks_and_crlf() {
        let text = format!("# users\n\n   \n\t\n {ALICE_7}\t\r\n#bob:nothing\n");
        let file = parse(&text).unwrap();
        assert_eq!(file.len(), 1);
        assert!(file.lookup("alice").unwrap().verify(b"secret"));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("\n# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn malformed_lines_fail_with_their_line_number() {
        let field = ALICE_7.split_once(':').unwrap().1;
        let salt_and_hash = field.strip_prefix("$7$101$").unwrap();
        let (salt, hash) = salt_and_hash.split_once('$').unwrap();
        let cases: Vec<(String, &str)> = vec![
            ("alice".into(), "no ':'"),
            (format!(":{field}"), "empty user name"),
            (format!("  \t:{field}"), "empty user name"),
            ("alice:".into(), "no hash"),
            ("alice:plaintext".into(), "unknown hash type"),
            (format!("alice:$5${salt}${hash}"), "unknown hash type"),
            (format!("us:er:{field}"), "more than one ':'"),
            (
                format!("alice:$7$0${salt}${hash}"),
                "iteration count of a $7$ hash is 0",
            ),
            (format!("alice:$7$-1${salt}${hash}"), "not a number"),
            (format!("alice:$7$x${salt}${hash}"), "not a number"),
            (format!("alice:$7$101${hash}"), "must be $7$"),
            (format!("alice:$7$101${salt}${hash}$"), "must be $7$"),
            (
                format!("alice:$7$101$!!${hash}"),
                "salt is not valid base64",
            ),
            (format!("alice:$7$101$${hash}"), "salt is empty"),
            (format!("alice:$7$101${salt}$AAAA"), "3 bytes, not 64"),
            (
                format!("alice:$7$101${salt}${}", &hash[..hash.len() - 2]),
                "not valid base64",
            ),
            (format!("alice:$6${salt}"), "must be $6$"),
            (format!("alice:$6${salt}$AAAA"), "3 bytes, not 64"),
            (
                "alice:$argon2id$v=19$m=19456,t=2,p=1$bad".into(),
                "argon2id",
            ),
            (
                "alice:$argon2id$v=19$m=1,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA".into(),
                "invalid parameters",
            ),
        ];
        for (bad, expected) in cases {
            let text = format!("# header\n{CAROL_6}\n{bad}\n{ALICE_7}\n");
            let (line, message) = line_error(&text);
            assert_eq!(line, 3, "{bad}: {message}");
            assert!(message.contains(expected), "{bad}: {message}");
            // Never the hash (or what could be a password).
            assert!(
                !message.contains(salt) && !message.contains(hash),
                "{message}"
            );
            let shown = parse(&text).unwrap_err().to_string();
            assert!(shown.starts_with("pw: line 3: "), "{shown}");
            assert!(
                !shown.contains(hash) && !shown.contains("plaintext"),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_user_twice_fails() {
        let (line, message) = line_error(&format!("{ALICE_7}\n{CAROL_6}\n{ALICE_7}\n"));
        assert_eq!(line, 3);
        assert_eq!(message, "user name already on line 1");
        // Blanks around the name do not make it another user.
        let (line, _) = line_error(&format!("{ALICE_7}\n alice {}\n", &CAROL_6[5..]));
        assert_eq!(line, 2);
    }

    #[test]
    fn debug_never_shows_a_hash() {
        let file = parse(&format!("{ALICE_7}\n{CAROL_6}\n")).unwrap();
        let shown = format!("{file:?} {:?}", Hash::new_argon2id(b"pw").unwrap());
        assert!(
            !shown.contains("LQvNRW7")
                && !shown.contains("yTShxNw")
                && !shown.contains("$argon2id$"),
            "{shown}"
        );
    }

    #[test]
    fn user_names_that_cannot_be_stored() {
        for user in ["", "a:b", "a\nb", " a", "a\t", "#a"] {
            assert!(check_user(user).is_err(), "{user:?}");
        }
        for user in ["a", "device-17", "a b", "ü", "a#"] {
            assert!(check_user(user).is_ok(), "{user:?}");
        }
    }

    #[test]
    fn editor_keeps_other_lines_byte_for_byte() {
        let original = format!("# fleet\n{CAROL_6}\n\n {ALICE_7}\t\n");
        let mut editor = PasswordFileEditor::from_text(&original, Path::new("pw")).unwrap();
        assert_eq!(editor.to_text(), original);
        let hash = Hash::new_argon2id(b"pw").unwrap();
        editor.set("erin", &hash).unwrap();
        assert_eq!(
            editor.to_text(),
            format!("{original}erin:{}\n", hash.to_line_field())
        );
        // Replacing keeps the line's place.
        editor.set("carol", &hash).unwrap();
        assert!(editor.to_text().starts_with("# fleet\ncarol:$argon2id$"));
        assert!(editor.remove("alice"));
        assert!(!editor.remove("alice"));
        assert!(!editor.contains("alice"));
        let file = parse(&editor.to_text()).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.lookup("erin").unwrap().verify(b"pw"));
        assert!(editor.set("a:b", &hash).is_err());
        // A malformed file is not edited.
        assert!(PasswordFileEditor::from_text("alice\n", Path::new("pw")).is_err());
        // No final newline: one is added.
        let editor = PasswordFileEditor::from_text(CAROL_6, Path::new("pw")).unwrap();
        assert_eq!(editor.to_text(), format!("{CAROL_6}\n"));
    }

    #[test]
    fn bulk_lines() {
        let users = parse_bulk(
            "# fleet\n\ndev-1:pa:ss\r\ndev-2: spaced \n",
            Path::new("<stdin>"),
        )
        .unwrap();
        assert_eq!(
            users,
            vec![
                ("dev-1".to_owned(), "pa:ss".to_owned()),
                ("dev-2".to_owned(), " spaced ".to_owned())
            ]
        );
        for (bad, expected) in [
            ("dev-3", "no ':'"),
            (":pw", "invalid user name"),
            (" dev-3:pw", "invalid user name"),
            ("dev-3:", "empty password"),
            ("dev-1:again", "already on line 1"),
        ] {
            let text = format!("dev-1:pw\n{bad}\n");
            match parse_bulk(&text, Path::new("<stdin>")) {
                Err(PasswordFileError::Line {
                    line: 2, message, ..
                }) => {
                    assert!(message.contains(expected), "{bad}: {message}");
                    assert!(!message.contains("again"), "{message}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn atomic_write_is_private_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        write_atomic(&path, b"one\n").unwrap();
        write_atomic(&path, b"two\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "two\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/dir/passwd");
        assert!(matches!(
            write_atomic(&missing, b""),
            Err(PasswordFileError::Write { .. })
        ));
    }
}
