//! Per-device credentials, the scheme of `device-sim` (`--username-from-client-id
//! --password-seed SEED`): a device's user name is its client id and its password the first
//! [`SEEDED_LEN`] hex digits of SHA-256(seed || client id). The generator, `loadgen provision`
//! (the `user:password` lines a password file is made from) and device-sim all derive the same
//! passwords from the seed alone, so no password list has to be kept or passed around.

use ring::digest;

/// Length of a seeded password, in hex digits (96 bits), as in device-sim.
pub const SEEDED_LEN: usize = 24;

/// The password of `client_id` derived from `seed`.
pub fn seeded_password(seed: &str, client_id: &str) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(seed.as_bytes());
    context.update(client_id.as_bytes());
    let mut hex: String = context
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex.truncate(SEEDED_LEN);
    hex
}

/// A password `client_id` does not have: the seeded password of another seed, of the same
/// length, so that a broker spends the same work refusing it as accepting the right one.
pub fn wrong_password(seed: &str, client_id: &str) -> String {
    let wrong = seeded_password(&format!("wrong:{seed}"), client_id);
    debug_assert_ne!(wrong, seeded_password(seed, client_id));
    wrong
}

/// What the connections of one wave send as credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// No user name, no password.
    None,
    /// User name = client id, password seeded from this seed.
    Seeded(String),
    /// User name = client id, a wrong password (see [`wrong_password`]) for this seed.
    Wrong(String),
}

impl Login {
    /// How the report names this kind of login.
    pub fn kind(&self) -> &'static str {
        match self {
            Login::None => "none",
            Login::Seeded(_) => "password",
            Login::Wrong(_) => "wrong_password",
        }
    }

    /// The user name and password `client_id` sends, if any.
    pub fn for_client(&self, client_id: &str) -> Option<(String, String)> {
        match self {
            Login::None => None,
            Login::Seeded(seed) => Some((client_id.to_owned(), seeded_password(seed, client_id))),
            Login::Wrong(seed) => Some((client_id.to_owned(), wrong_password(seed, client_id))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_passwords_match_device_sim() {
        // device-sim's own test vector: SHA-256("abc") = ba7816bf8f01cfea414140de5dae...
        assert_eq!(seeded_password("a", "bc"), "ba7816bf8f01cfea414140de");
        assert_eq!(seeded_password("s", "dev-0").len(), SEEDED_LEN);
        assert_ne!(seeded_password("s", "dev-0"), seeded_password("s", "dev-1"));
    }

    #[test]
    fn wrong_passwords_differ_from_the_right_ones() {
        for id in ["dev-0", "dev-1", "dev-14999"] {
            let wrong = wrong_password("s", id);
            assert_ne!(wrong, seeded_password("s", id));
            assert_eq!(wrong.len(), SEEDED_LEN);
        }
        assert_eq!(
            Login::Seeded("s".into()).for_client("dev-3"),
            Some(("dev-3".into(), seeded_password("s", "dev-3")))
        );
        assert_eq!(Login::None.for_client("dev-3"), None);
    }
}
