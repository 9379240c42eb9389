//! Waiting with a deadline: tests never sleep to "wait for" something, they wait on the
//! condition, and never longer than [`WAIT`].

use std::future::Future;
use std::time::Duration;

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
