//! `device-sim`: a fleet of simulated MQTT devices for soak and storm tests of
//! Heartwire (or any MQTT 3.1.1 broker).
//!
//! The only mode so far is "steady": connect `--count` devices at `--rate`
//! connects per second, keep them connected (with keep-alive pings) for
//! `--duration` seconds, print one status line per second and a summary with
//! CONNACK latency percentiles at the end.

mod device;
mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Parser};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::{Device, Profile};
use crate::report::Stats;

/// File descriptors kept in reserve beyond one socket per device.
const FD_RESERVE: u64 = 64;
/// Upper bound on waiting for devices to disconnect at the end of the run.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Command-line options of the steady mode.
#[derive(Debug, Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated MQTT device fleet for Heartwire"
)]
struct Cli {
    /// Broker hosts, comma separated; devices are spread round-robin over every host × port pair.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    host: Vec<String>,
    /// Broker ports, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1883")]
    port: Vec<u16>,
    /// Number of devices.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Number of the first device; client ids are PREFIX + number.
    #[arg(long, default_value_t = 0)]
    start_number: u64,
    /// Client id prefix.
    #[arg(long, default_value = "dev-")]
    prefix: String,
    /// New devices started per second.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    rate: u32,
    /// MQTT keep-alive in seconds (0 disables pings).
    #[arg(long, default_value_t = 30)]
    keepalive: u16,
    /// MQTT clean-session flag (`--clean false` for persistent sessions).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    clean: bool,
    /// Length of the run in seconds; the devices disconnect afterwards.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Timeout for TCP connect plus CONNACK, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
    /// File written once all devices are connected for the first time.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// The (host, port) pairs devices are spread over, hosts varying slowest.
fn endpoints(hosts: &[String], ports: &[u16]) -> Result<Vec<(String, u16)>> {
    let hosts: Vec<&str> = hosts
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() || ports.is_empty() {
        bail!("--host and --port need at least one value each");
    }
    Ok(hosts
        .iter()
        .flat_map(|h| ports.iter().map(move |p| (h.to_string(), *p)))
        .collect())
}

/// Device number `index` (0-based within this run) with its round-robin endpoint.
fn device_for(cli: &Cli, endpoints: &[(String, u16)], index: u64) -> Device {
    let len = endpoints.len() as u64;
    let (host, port) = &endpoints[usize::try_from(index % len).unwrap_or(0)];
    Device {
        client_id: format!("{}{}", cli.prefix, cli.start_number + index),
        host: host.clone(),
        port: *port,
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and checks that `count`
/// sockets fit. Returns the new soft limit.
fn raise_nofile(count: u64) -> Result<u64> {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).context("reading RLIMIT_NOFILE")?;
    let want = if hard == rlimit::INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    } else {
        hard
    };
    let soft = if soft < want {
        rlimit::setrlimit(Resource::NOFILE, want, hard)
            .with_context(|| format!("raising RLIMIT_NOFILE soft limit to {want}"))?;
        want
    } else {
        soft
    };
    let need = count.saturating_add(FD_RESERVE);
    if need > soft {
        bail!(
            "--count {count} needs {need} open files ({FD_RESERVE} spare) but RLIMIT_NOFILE allows \
             only {soft} (hard limit {hard}); lower --count or raise the hard limit (ulimit -Hn)"
        );
    }
    Ok(soft)
}

/// Writes the ready file atomically (temp file + rename) so readers never see it half written.
async fn write_ready_file(path: &Path, connected: u64, elapsed: Duration) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let body = format!("connected={connected} elapsed_ms={}\n", elapsed.as_millis());
    tokio::fs::write(&tmp, body)
        .await
        .with_context(|| format!("writing {}", path.display()))?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_nofile(cli.count)?;
    let endpoints = endpoints(&cli.host, &cli.port)?;

    let stats = Arc::new(Stats::new(cli.count)?);
    let profile = Arc::new(Profile {
        keepalive: Duration::from_secs(cli.keepalive.into()),
        clean_session: cli.clean,
        connect_timeout_s: cli.connect_timeout,
    });
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(cli.duration);

    if let Some(path) = cli.ready_file.clone() {
        let stats = Arc::clone(&stats);
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = stats.wait_all_connected() => {
                    let connected = stats.snapshot().connected;
                    if let Err(e) = write_ready_file(&path, connected, start.elapsed()).await {
                        eprintln!("device-sim: {e:#}");
                    }
                }
            }
        });
    }

    // Spawner: starts devices at --rate per second until --count or the end of the run.
    let spawner = {
        let stats = Arc::clone(&stats);
        let stop = stop.clone();
        let tracker = tracker.clone();
        let rate = f64::from(cli.rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            let mut spawned = 0u64;
            while spawned < cli.count {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(cli.count);
                while spawned < due {
                    let device = device_for(&cli, &endpoints, spawned);
                    tracker.spawn(device::run(
                        device,
                        Arc::clone(&profile),
                        Arc::clone(&stats),
                        stop.clone(),
                    ));
                    spawned += 1;
                }
            }
            cli.count
        })
    };

    let mut status = tokio::time::interval_at(
        tokio::time::Instant::from_std(start + Duration::from_secs(1)),
        Duration::from_secs(1),
    );
    status.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            res = &mut signal => {
                res?;
                eprintln!("device-sim: signal received, stopping early");
                break;
            }
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = status.tick() => {
                println!("{}", report::status_line(start.elapsed().as_secs(), &stats.snapshot()));
            }
        }
    }

    let at_end = stats.snapshot();
    stop.cancel();
    let target = spawner.await.context("spawner task failed")?;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        eprintln!("device-sim: some devices did not disconnect within {SHUTDOWN_GRACE:?}");
    }
    println!(
        "{}",
        report::summary_line(
            at_end.connected,
            target,
            &stats.latency(),
            &stats.snapshot()
        )
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_lists_spread_round_robin() -> Result<()> {
        let cli = Cli::try_parse_from([
            "device-sim",
            "--host",
            "127.0.0.1,127.0.0.2",
            "--port",
            "1883,1884",
            "--prefix",
            "d",
            "--start-number",
            "10",
        ])?;
        let eps = endpoints(&cli.host, &cli.port)?;
        assert_eq!(eps.len(), 4);
        let got: Vec<(String, String, u16)> = (0..5)
            .map(|i| {
                let d = device_for(&cli, &eps, i);
                (d.client_id, d.host, d.port)
            })
            .collect();
        let want = [
            ("d10", "127.0.0.1", 1883),
            ("d11", "127.0.0.1", 1884),
            ("d12", "127.0.0.2", 1883),
            ("d13", "127.0.0.2", 1884),
            ("d14", "127.0.0.1", 1883),
        ];
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.0.as_str(), g.1.as_str(), g.2), w);
        }
        Ok(())
    }

    #[test]
    fn defaults_and_bad_lists() -> Result<()> {
        let cli = Cli::try_parse_from(["device-sim"])?;
        assert_eq!(cli.host, ["127.0.0.1"]);
        assert_eq!(cli.port, [1883]);
        assert!(cli.clean);
        assert!(Cli::try_parse_from(["device-sim", "--port", "1883,x"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--count", "0"]).is_err());
        assert!(endpoints(&[" ".to_string()], &[1883]).is_err());
        let cli = Cli::try_parse_from(["device-sim", "--clean", "false"])?;
        assert!(!cli.clean);
        Ok(())
    }
}
