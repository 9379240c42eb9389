//! loadgen: a neutral MQTT 3.1.1 and 5 load generator for the side-by-side broker benchmarks in
//! `bench/` (Heartwire next to Mosquitto, same generator for both).
//!
//! Modules, from the wire up:
//! - `mqtt`: the packets, encoded and framed by hand (no client library, so the generator
//!   costs the same against any broker);
//! - `client`: one connection (TCP, CONNECT/CONNACK, SUBSCRIBE/SUBACK) and the broker
//!   addresses connections are spread over;
//! - `dedicated`: a measuring client on its own thread, out of reach of the load it measures;
//! - `procfs` and `window`: the broker's and the generator's CPU and RSS over a window;
//!   `sockets`: the bytes queued in the kernel between publishers and broker;
//! - `tls`: the TLS client of `--tls` (rustls, ring) and a stream that is TCP or TLS;
//! - `credentials`: per-device user names and seeded passwords (device-sim's scheme);
//! - `fan_in` and `retained` (with `filters`), `idle`, `connect_rate` and `persistent`: the
//!   scenarios (only `idle` and `connect_rate` speak TLS); `provision` prints the
//!   `user:password` lines of a fleet;
//! - `report`: the results, as a key=value summary line and as JSON;
//! - `cli`: the command line.

mod cli;
mod client;
mod connect_rate;
mod credentials;
mod dedicated;
mod fan_in;
mod filters;
mod idle;
mod mqtt;
mod persistent;
mod procfs;
mod report;
mod retained;
mod sockets;
mod tls;
mod window;

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;

use cli::{Cli, Scenario};

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&cli));
    // A thread that did not stop (a broker that froze it) must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn run(cli: &Cli) -> Result<()> {
    let common = &cli.common;
    if common.tls
        && matches!(
            cli.scenario,
            Scenario::FanIn(_)
                | Scenario::RetainedSubscribe(_)
                | Scenario::PersistentPublish(_)
                | Scenario::PersistentFill(_)
                | Scenario::PersistentResume(_)
        )
    {
        bail!("--tls works with the idle and connect-rate scenarios only");
    }
    if common.protocol() != mqtt::Protocol::V311
        && matches!(
            cli.scenario,
            Scenario::PersistentPublish(_)
                | Scenario::PersistentFill(_)
                | Scenario::PersistentResume(_)
        )
    {
        bail!("the persistent scenarios speak MQTT 3.1.1 only (clean session 0)");
    }
    if common.protocol() != mqtt::Protocol::V311
        && matches!(cli.scenario, Scenario::RetainedSubscribe(_))
    {
        bail!("--protocol 5 works with the idle, connect-rate and fan-in scenarios only");
    }
    match &cli.scenario {
        Scenario::Idle(args) => {
            let report = idle::run(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
        Scenario::ConnectRate(args) => {
            let report = connect_rate::run(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
        Scenario::FanIn(args) => {
            let report = fan_in::run(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
        Scenario::PersistentPublish(args) => {
            let report = persistent::publish(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
        Scenario::PersistentFill(args) => {
            let report = persistent::fill(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
        Scenario::PersistentResume(args) => {
            let report = persistent::resume(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
        Scenario::Provision(args) => provision(args)?,
        Scenario::RetainedSubscribe(args) => {
            let report = retained::run(common, args).await?;
            println!("{}", report.summary());
            if let Some(path) = &common.json {
                report::write_json(path, &report)?;
            }
        }
    }
    Ok(())
}

/// `loadgen provision`: one `user:password` line per device on standard output.
fn provision(args: &cli::Provision) -> Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for n in args.start_number..args.start_number.saturating_add(args.count) {
        let user = format!("{}{n}", args.client_prefix);
        if user.contains(':') || user.chars().any(char::is_control) {
            bail!("user name {user:?} cannot go into a password file (':' or a control character)");
        }
        let password = credentials::seeded_password(&args.password_seed, &user);
        writeln!(out, "{user}:{password}")?;
    }
    out.flush()?;
    Ok(())
}
