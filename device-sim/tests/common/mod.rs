//! What only device-sim's tests share: the `device-sim` binary under test (Cargo names it to
//! this crate's tests alone) and the bound on waiting for it. Everything else comes from
//! `testkit`.
#![allow(dead_code)]

use std::time::Duration;

use tokio::process::Command;

/// Bound on any wait of these tests: a device-sim run, a broker process or Prometheus, and
/// what a test waits for meanwhile. Longer than `testkit::WAIT`: a run itself takes seconds.
pub const SIM_WAIT: Duration = Duration::from_secs(30);

/// A `device-sim` command, killed if the test drops it.
pub fn sim() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_device-sim"));
    c.kill_on_drop(true);
    c
}
