//! Heartwire's test kit: what the broker's integration tests and benchmark and device-sim's
//! tests share. Each test file imports it like any crate (`use testkit::...`); nothing is
//! included by path.
//!
//! Modules:
//! - `net`: [`free_port`], for a server that must be told its port before it starts.
//! - [`pg`]: a throwaway PostgreSQL ([`pg::TestPostgres`]).

mod net;
pub mod pg;

pub use net::free_port;

/// A number for unique names (databases, directories) and random picks (ports): different on
/// every call, in every process.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
