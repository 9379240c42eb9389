//! `device-sim`: a fleet of simulated MQTT devices for soak and storm tests of
//! Heartwire (or any MQTT 3.1.1 broker), and a checker of what the broker reports.
//!
//! `device-sim run` (the default when no subcommand is given) connects `--count` devices at
//! `--rate` connects per second and plays a `--scenario` for `--duration` seconds: `steady`
//! (stay connected), `churn`, `flap`, `storm` or `takeover` (see [`scenario`]). It prints one
//! status line per second (a progress bar instead when stdout is a terminal, see [`progress`])
//! and a summary with CONNACK latency percentiles at the end, then on stderr the first error of
//! each kind (`connect_failed`, `connection_lost`) with the broker's address; it exits with code
//! 3 when no device ever connected. With
//! `--truth FILE` it writes the ground truth, one JSON line per intended or observed state
//! change (see [`truth`]), ending with every device's final state. `--json FILE` writes the
//! summary as JSON (see [`report::Summary`]); `--metrics-listen ADDR` serves Prometheus
//! metrics at `GET /metrics` (see [`metrics`]); `--workers N` splits the fleet over N child
//! processes and aggregates them (see [`workers`]). `--tls`, `--ws` and `--wss` (with
//! `--cafile`, `--cert`/`--key` or `--cert-dir`, `--tls-server-name`, `--ws-path`) choose the
//! transport of every scenario (see [`transport`]).
//!
//! `--scenario durable` is different (see [`durable`]): persistent sessions subscribed and
//! offline, QoS 1 command messages and retained states published to them while the broker may
//! be restarted or killed, then every session drained and checked against the PUBACKs received:
//! exit code 1 when an acknowledged message is missing or out of order, or a retained value is
//! older than the last acknowledged one.
//!
//! Devices log in with `--username NAME` or `--username-from-client-id`, and `--password` or
//! `--password-seed SEED` (a password per device, derived from the seed and its client id; see
//! [`credentials`]). `device-sim provision` prints the `user:password` lines of a run's
//! devices for `broker passwd --bulk FILE`, or stores them through the broker's admin API as
//! database credentials (`--api`; see [`provision`]).
//!
//! `device-sim verify --truth FILE --api http://HOST:PORT` waits `--settle` seconds and compares
//! the truth with the broker's presence API (see [`verify`]; sessions ended by a broker crash
//! are recognised from the boots of `GET /api/v1/nodes`), and with `--database-url URL` with
//! the presence database too (see [`db`]); exit code 1 on any disagreement.
//! `--keepalive-multiplier` (default 1.5) is the broker's `mqtt.keepalive_multiplier`, from
//! which verify derives every silent death's deadline.
//!
//! The modules (their imports form no cycle: the worker line prefixes, say, live in
//! `worker_protocol`, which `fleet`, `run` and `workers` point down at):
//! - [`cli`]: the options of the subcommands and their checks.
//! - [`run`]: `device-sim run`: this process's [`fleet`] or the [`workers`] parent, then the
//!   summary; owns the run's task tracker. [`worker_protocol`]: the lines a worker prints.
//! - [`fleet`]: one process's devices; [`scenario`]: what happens to them; [`device`]: one
//!   simulated device; [`client`]: its MQTT client, 3.1.1 or 5 (rumqttc); [`transport`]: how devices reach the broker (TCP, TLS,
//!   WebSocket, WebSocket over TLS); [`credentials`]: what they log in with; [`truth`]: the
//!   ground truth they write. [`provision`]: `device-sim provision`, their accounts.
//! - [`report`]: counters, CONNACK histogram and summary; [`progress`]: the per-second output;
//!   [`metrics`]: the Prometheus endpoint.
//! - [`durable`]: the `durable` scenario, its own phases, connections and check.
//! - [`verify`]: `device-sim verify`; [`http`]: its API client; [`db`]: its database reads;
//!   [`presence`]: a device's state as either reports it.

mod cli;
mod client;
mod credentials;
mod db;
mod device;
mod durable;
mod fleet;
mod http;
mod metrics;
mod presence;
mod progress;
mod provision;
mod report;
mod run;
mod scenario;
mod transport;
mod truth;
mod verify;
mod worker_protocol;
mod workers;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::run::Outcome;

// The exit codes, as `--help` lists them (`cli`'s EXIT_CODES).
/// `verify`, or a `durable` run: the broker disagrees with the truth.
const DISAGREES: u8 = 1;
/// Any error: bad options, unreachable API or database, I/O.
const ERROR: u8 = 2;
/// `run`: no device ever connected (the broker is unreachable or refuses everyone).
const NONE_CONNECTED: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Verify(args)) => verify::verify(&args).await.map(|agrees| {
            if agrees {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(DISAGREES)
            }
        }),
        Some(Command::Provision(args)) => provision::provision(&args)
            .await
            .map(|()| ExitCode::SUCCESS),
        Some(Command::Run(args)) => run::run(&args).await.map(exit_code),
        None => run::run(&cli.run).await.map(exit_code),
    };
    result.unwrap_or_else(|e| {
        eprintln!("device-sim: {e:#}");
        ExitCode::from(ERROR)
    })
}

/// The exit code of a run that ended without error.
fn exit_code(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Completed => ExitCode::SUCCESS,
        Outcome::NoneConnected => ExitCode::from(NONE_CONNECTED),
        Outcome::Disagrees => ExitCode::from(DISAGREES),
    }
}
