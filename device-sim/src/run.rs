//! `device-sim run`: checks the options, runs the devices in this process ([`fleet`]) or over
//! `--workers` child processes ([`workers`]), or the phases of `--scenario durable`
//! ([`durable`]), and reports: the summary line, the first error of
//! each kind on stderr, `--json FILE`; a worker prints its summary as a [`RESULT`] line for its
//! parent instead. The run's [`TaskTracker`] holds every task spawned besides the devices
//! (scheduler, spawner, ready file, metrics endpoint, worker output readers); the run cancels
//! and waits for them before it returns.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::RunArgs;
use crate::report::Summary;
use crate::scenario::Scenario;
use crate::worker_protocol::RESULT;
use crate::{durable, fleet, workers};

/// Upper bound on waiting for the run's tasks once it is over (they all stop on `shutdown`).
const TASKS_GRACE: Duration = Duration::from_secs(1);

/// How a run ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The run completed (a worker always says so: its parent judges the merged result).
    Completed,
    /// No device ever connected: the broker is unreachable or refuses everyone.
    NoneConnected,
    /// `durable`: the broker lost, reordered or outdated something it had acknowledged.
    Disagrees,
}

/// Runs `device-sim run`: one process, a worker, or the parent of `--workers`.
pub async fn run(args: &RunArgs) -> Result<Outcome> {
    args.check()?;
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let outcome = run_and_report(args, &tasks, &shutdown).await;
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(TASKS_GRACE, tasks.wait())
        .await
        .is_err()
    {
        eprintln!("device-sim: some tasks did not stop within {TASKS_GRACE:?}");
    }
    outcome
}

async fn run_and_report(
    args: &RunArgs,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Outcome> {
    if args.scenario == Scenario::Durable {
        return run_durable(args, shutdown).await;
    }
    let summary = if args.worker_id.is_none() && args.workers > 1 {
        workers::run(args, tasks, shutdown).await?
    } else {
        fleet::run(args, tasks, shutdown).await?
    };
    if args.worker_id.is_some() {
        // The parent judges the merged result.
        println!("{RESULT}{}", serde_json::to_string(&summary)?);
        return Ok(Outcome::Completed);
    }
    report(args, &summary)?;
    if summary.connack.samples == 0 {
        eprintln!(
            "device-sim: no device ever connected (is the broker running at --host {} --port {}?)",
            args.host.join(","),
            args.port
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        return Ok(Outcome::NoneConnected);
    }
    Ok(Outcome::Completed)
}

/// The `durable` scenario: its status lines, then its summary line, its first problems and
/// its first connection error on stderr, `--json`.
async fn run_durable(args: &RunArgs, shutdown: &CancellationToken) -> Result<Outcome> {
    let summary = durable::run(args, shutdown).await?;
    println!("{}", summary.line());
    for line in &summary.verdict.examples {
        eprintln!("device-sim: {line}");
    }
    if let Some(error) = &summary.first_error {
        eprintln!("device-sim: first connection error: {error}");
    }
    if let Some(path) = &args.json {
        let body = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, body + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if summary.ok {
        println!("durable: OK, every acknowledged message delivered in order and every retained state current");
        Ok(Outcome::Completed)
    } else {
        println!("durable: FAILED (missing, out of order or stale retained state; see above)");
        Ok(Outcome::Disagrees)
    }
}

/// Prints the summary line and the first errors, and writes `--json`.
fn report(args: &RunArgs, summary: &Summary) -> Result<()> {
    println!("{}", summary.line());
    for line in summary.errors.lines() {
        eprintln!("device-sim: {line}");
    }
    if let Some(path) = &args.json {
        let body = serde_json::to_string_pretty(summary)?;
        std::fs::write(path, body + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
