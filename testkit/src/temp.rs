//! Temporary directories, removed with their contents when dropped (the `tempfile` crate),
//! under `std::env::temp_dir()` (`TMPDIR`), each named after what it is for.

pub use tempfile::TempDir;

/// A fresh directory `heartwire-<label>-<random>`, removed with its contents when dropped.
pub fn temp_dir(label: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("heartwire-{label}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory for {label}: {e}"))
}
