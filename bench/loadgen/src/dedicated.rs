//! A measuring client on a thread of its own, with its own single-threaded runtime.
//!
//! The clients whose timing is the result (the fan-in subscriber, the bystander) must not wait
//! behind a thousand busy tasks of the main runtime: as an OS thread, each gets its fair share
//! of the CPU from the kernel whatever the rest of the generator does.

use std::future::Future;
use std::io;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::time::timeout;

/// A running dedicated thread whose future yields `T`.
pub struct Dedicated<T> {
    thread: std::thread::JoinHandle<io::Result<T>>,
}

/// Runs the future made by `make` on a new thread named `name`.
pub fn spawn<Fut, T>(
    name: &str,
    make: impl FnOnce() -> Fut + Send + 'static,
) -> Result<Dedicated<T>>
where
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(runtime.block_on(make()))
        })?;
    Ok(Dedicated { thread })
}

impl<T: Send + 'static> Dedicated<T> {
    /// Waits at most `bound` for the thread's future to finish (the caller has told it to stop).
    pub async fn join(self, bound: Duration) -> Result<T> {
        let thread = self.thread;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        match timeout(bound, joined).await {
            Err(_) => Err(anyhow!("thread did not stop within {bound:?}")),
            Ok(Err(e)) => Err(anyhow!("joining the thread failed: {e}")),
            Ok(Ok(Err(_panic))) => Err(anyhow!("thread panicked")),
            Ok(Ok(Ok(result))) => Ok(result?),
        }
    }
}
