//! Device credentials: the MQTT user name and password each device sends in CONNECT, from the
//! `run` options (`--username` or `--username-from-client-id`, `--password` or
//! `--password-seed`), and the `user:password` lines `device-sim provision` prints for them.
//!
//! A seeded password is the first [`SEEDED_LEN`] hex digits of SHA-256(seed || client id): the
//! parent, its workers and `provision` derive the same passwords from the seed alone, so no
//! password list has to be written, kept or passed around.

use sha2::{Digest, Sha256};

/// Length of a seeded password, in hex digits (96 bits).
pub const SEEDED_LEN: usize = 24;

/// The user name a device sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// None (and then no password either: MQTT 3.1.1 sends a password only with a user name).
    None,
    /// The same for every device (`--username NAME`).
    Shared(String),
    /// The device's client id (`--username-from-client-id`).
    ClientId,
}

/// The password a device sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    /// None: the user name goes alone.
    None,
    /// The same for every device (`--password`).
    Shared(String),
    /// Derived from this seed and the device's client id (`--password-seed`).
    Seeded(String),
}

/// How every device of a run finds its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Where the user name comes from.
    pub user: User,
    /// Where the password comes from.
    pub password: Password,
}

impl Credentials {
    /// No credentials at all.
    #[cfg(test)]
    pub fn none() -> Self {
        Self {
            user: User::None,
            password: Password::None,
        }
    }

    /// The user name and password of the device `client_id`, if it sends any (an empty
    /// password when only a user name is configured).
    pub fn for_device(&self, client_id: &str) -> Option<(String, String)> {
        let user = match &self.user {
            User::None => return None,
            User::Shared(name) => name.clone(),
            User::ClientId => client_id.to_owned(),
        };
        Some((user, self.password_of(client_id).unwrap_or_default()))
    }

    /// The password of the device `client_id`, if there is one.
    pub fn password_of(&self, client_id: &str) -> Option<String> {
        match &self.password {
            Password::None => None,
            Password::Shared(password) => Some(password.clone()),
            Password::Seeded(seed) => Some(seeded_password(seed, client_id)),
        }
    }
}

/// The password of `client_id` derived from `seed`: the first [`SEEDED_LEN`] hex digits of
/// SHA-256(seed || client id).
pub fn seeded_password(seed: &str, client_id: &str) -> String {
    let digest = Sha256::new()
        .chain_update(seed.as_bytes())
        .chain_update(client_id.as_bytes())
        .finalize();
    let mut hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    hex.truncate(SEEDED_LEN);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_passwords_are_sha256_hex_prefixes() {
        // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.
        assert_eq!(seeded_password("a", "bc"), "ba7816bf8f01cfea414140de");
        assert_eq!(seeded_password("ab", "c"), seeded_password("a", "bc"));
        assert_ne!(seeded_password("s", "dev-0"), seeded_password("s", "dev-1"));
        assert_eq!(seeded_password("s", "dev-0").len(), SEEDED_LEN);
    }

    #[test]
    fn credentials_per_device() {
        let seeded = Credentials {
            user: User::ClientId,
            password: Password::Seeded("s".into()),
        };
        assert_eq!(
            seeded.for_device("dev-7"),
            Some(("dev-7".into(), seeded_password("s", "dev-7")))
        );
        let shared = Credentials {
            user: User::Shared("fleet".into()),
            password: Password::None,
        };
        assert_eq!(
            shared.for_device("dev-7"),
            Some(("fleet".into(), String::new()))
        );
        assert_eq!(Credentials::none().for_device("dev-7"), None);
    }
}
