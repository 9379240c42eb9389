//! One process's devices: `device-sim run` without `--workers`, or worker K of a `--workers`
//! parent. Starts `--count` devices at `--rate` per second, each a [`device::run`] task spread
//! round-robin over the `--host` × `--port` pairs, drives the `--scenario`
//! ([`scenario::drive`]), shows the status once per second (a worker prints it as a
//! [`STATUS`] line for its parent instead) and at the end of `--duration` (or on
//! SIGINT/SIGTERM) stops the devices, waits for them to disconnect and returns the
//! [`Summary`]. With `--end-state keep` the connected devices stay connected, after a
//! [`HOLDING`] line, until SIGINT/SIGTERM.

use std::path::Path;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{value_name, RunArgs};
use crate::device::{self, Control, Device, EndState, Profile};
use crate::metrics;
use crate::progress::Progress;
use crate::report::{self, Stats, Summary};
use crate::scenario::{self, Fleet, Handle, Plan};
use crate::transport::Transport;
use crate::truth::TruthWriter;
use crate::worker_protocol::{HOLDING, READY, STATUS};

/// File descriptors kept in reserve beyond one socket per device.
const FD_RESERVE: u64 = 64;
/// Upper bound on waiting for devices to disconnect at the end of the run (plus the
/// keep-alive deadline of silently dead devices).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The (host, port) pairs devices are spread over, hosts varying slowest.
pub fn endpoints(hosts: &[String], ports: &[u16]) -> Result<Vec<(String, u16)>> {
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
pub fn device_for(cli: &RunArgs, endpoints: &[(String, u16)], index: u64) -> Device {
    let len = endpoints.len() as u64;
    let (host, port) = &endpoints[usize::try_from(index % len).unwrap_or(0)];
    Device {
        client_id: format!("{}{}", cli.prefix, cli.start_number + index),
        host: host.clone(),
        port: *port,
        number: cli.start_number + index,
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and checks that `count`
/// sockets fit. Returns the new soft limit.
pub fn raise_nofile(count: u64) -> Result<u64> {
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
pub async fn write_ready_file(path: &Path, connected: u64, elapsed: Duration) -> Result<()> {
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

/// Runs this process's devices (without --workers, or as worker K) and returns the summary.
/// Its helper tasks (scheduler, spawner, ready file, metrics endpoint) go on `tasks`, the run's
/// tracker, and stop when `shutdown` is cancelled, if not before: the metrics endpoint
/// outlives the devices, to be scraped until the summary is out.
pub async fn run(
    cli: &RunArgs,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Summary> {
    raise_nofile(cli.count)?;
    let endpoints = endpoints(&cli.host, &cli.port)?;
    let truth = Arc::new(match &cli.truth {
        Some(path) => TruthWriter::create(path)?,
        None => TruthWriter::disabled(),
    });

    let stats = Arc::new(Stats::new(cli.count)?);
    if let (Some(addr), None) = (&cli.metrics_listen, cli.worker_id) {
        let stats = Arc::clone(&stats);
        metrics::serve(
            addr,
            Arc::new(move || stats.live()),
            tasks,
            shutdown.clone(),
        )
        .await?;
    }
    let profile = Arc::new(Profile {
        keepalive: Duration::from_secs(cli.keepalive.into()),
        keepalive_multiplier: cli.keepalive_multiplier,
        clean_session: cli.clean,
        connect_timeout_s: cli.connect_timeout,
        end_state: cli.end_state,
        credentials: cli.credentials()?,
        telemetry: cli.telemetry(),
        // Once per process: the TLS configuration (CA, shared client certificate) is shared.
        transport: Arc::new(Transport::new(&cli.transport()?)?),
        protocol: cli.protocol,
    });
    // Children of `shutdown`, so that a run left early (an error) stops its tasks too.
    let end = shutdown.child_token();
    let stop = shutdown.child_token();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    // The devices, apart from the run's other tasks: waiting for them is waiting for every
    // device to have disconnected.
    let devices = TaskTracker::new();
    let fleet: Fleet = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(cli.duration);

    if cli.ready_file.is_some() || cli.worker_id.is_some() {
        let path = cli.ready_file.clone();
        let worker = cli.worker_id.is_some();
        let stats = Arc::clone(&stats);
        let end = end.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = end.cancelled() => {}
                _ = stats.wait_all_connected() => {
                    let connected = stats.snapshot().connected;
                    if worker {
                        println!("{READY}connected={connected}");
                    } else if let Some(path) = path {
                        if let Err(e) = write_ready_file(&path, connected, start.elapsed()).await {
                            eprintln!("device-sim: {e:#}");
                        }
                    }
                }
            }
        });
    }

    // Workers always print machine-readable lines; the parent shows the progress.
    let progress = if cli.worker_id.is_some() {
        Progress::Plain
    } else {
        Progress::new(cli.count)
    };
    let plan = Plan {
        progress: progress.clone(),
        scenario: cli.scenario,
        count: cli.count,
        churn_percent: cli.churn_percent,
        mix: cli.churn_mix.iter().map(|&k| k.into()).collect(),
        churn_pause: Duration::from_secs_f64(cli.churn_pause),
        flappers: cli.flappers,
        storm_every: Duration::from_secs(cli.storm_every),
        silent_pause: profile.silent_pause(),
        start,
        deadline,
    };
    let scheduler = tasks.spawn(scenario::drive(plan, Arc::clone(&fleet), end.clone()));

    // Spawner: starts devices at --rate per second until --count or the end of the run.
    let spawner = {
        let stats = Arc::clone(&stats);
        let truth = Arc::clone(&truth);
        let (end, stop) = (end.clone(), stop.clone());
        let devices = devices.clone();
        let fleet = Arc::clone(&fleet);
        let rate = f64::from(cli.rate);
        let profile = Arc::clone(&profile);
        let cli = cli.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            let mut spawned = 0u64;
            while spawned < cli.count {
                tokio::select! {
                    _ = end.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let due = ((start.elapsed().as_secs_f64() * rate) as u64 + 1).min(cli.count);
                while spawned < due {
                    let device = device_for(&cli, &endpoints, spawned);
                    let (tx, commands) = mpsc::channel(1);
                    let phase = Arc::new(AtomicU8::new(device::phase::CONNECTING));
                    let ctl = Control {
                        commands,
                        phase: Arc::clone(&phase),
                        end: end.clone(),
                        stop: stop.clone(),
                        ended: ended_tx.clone(),
                    };
                    match fleet.lock() {
                        Ok(mut f) => f.push(Handle {
                            commands: tx,
                            phase,
                        }),
                        Err(poisoned) => poisoned.into_inner().push(Handle {
                            commands: tx,
                            phase,
                        }),
                    }
                    devices.spawn(device::run(
                        device,
                        Arc::clone(&profile),
                        Arc::clone(&stats),
                        Arc::clone(&truth),
                        ctl,
                    ));
                    spawned += 1;
                }
            }
            spawned
        })
    };

    let mut status = tokio::time::interval_at(
        tokio::time::Instant::from_std(start + Duration::from_secs(1)),
        Duration::from_secs(1),
    );
    status.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut signalled = false;
    loop {
        tokio::select! {
            res = &mut signal => {
                res?;
                eprintln!("device-sim: signal received, stopping early");
                signalled = true;
                break;
            }
            _ = tokio::time::sleep_until(deadline.into()) => break,
            _ = status.tick() => {
                if cli.worker_id.is_some() {
                    println!("{STATUS}{}", serde_json::to_string(&stats.live())?);
                } else {
                    progress.update(start.elapsed().as_secs(), &stats.snapshot());
                }
            }
        }
    }

    let at_end = stats.snapshot();
    progress.finish();
    if signalled {
        stop.cancel(); // no hold after an early signal
    }
    end.cancel();
    let spawned = spawner.await.context("spawner task failed")?;
    scheduler.await.context("scheduler task failed")?;
    devices.close();

    let grace = SHUTDOWN_GRACE + profile.silent_pause();
    if cli.end_state == EndState::Keep && !signalled {
        // Wait until every device has recorded its state at the end, then hold.
        let recorded = tokio::time::timeout(grace, async {
            for _ in 0..spawned {
                if ended_rx.recv().await.is_none() {
                    break;
                }
            }
        })
        .await;
        if recorded.is_err() {
            eprintln!("device-sim: some devices did not record their final state in time");
        }
        truth.flush()?;
        println!(
            "{HOLDING}{} until SIGINT/SIGTERM",
            stats.snapshot().connected
        );
        let held = shutdown_signal();
        tokio::select! {
            res = held => res?,
            _ = devices.wait() => {}
        }
        stop.cancel();
    }
    if tokio::time::timeout(grace, devices.wait()).await.is_err() {
        eprintln!("device-sim: some devices did not disconnect within {grace:?}");
    }
    truth.flush()?;
    let s = stats.snapshot();
    Ok(Summary {
        connected: at_end.connected,
        target: cli.count,
        connack: stats.latency(),
        connack_method: "exact".to_owned(),
        errors: report::Errors {
            total: s.errors,
            connect_failed: s.connect_failed,
            connection_lost: s.connection_lost,
            first: stats.first_errors(),
        },
        reconnects: s.reconnects,
        takeovers: s.takeovers,
        telemetry: report::Telemetry::from(&s),
        duration_s: cli.duration,
        elapsed_s: start.elapsed().as_secs_f64(),
        scenario: value_name(&cli.scenario),
        protocol: value_name(&cli.protocol),
        server_disconnects: stats.server_disconnects(),
        workers: 1,
        connack_hist_us: if cli.worker_id.is_some() {
            stats.recorded()
        } else {
            Vec::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn host_and_port_lists_spread_round_robin() -> Result<()> {
        let cli = Cli::try_parse_from([
            "device-sim",
            "run",
            "--host",
            "127.0.0.1,127.0.0.2",
            "--port",
            "1883,1884",
            "--prefix",
            "d",
            "--start-number",
            "10",
        ])?;
        let Some(Command::Run(cli)) = cli.command else {
            bail!("expected the run subcommand");
        };
        let eps = endpoints(&cli.host, &cli.port)?;
        assert_eq!(eps.len(), 4);
        assert!(endpoints(&[" ".to_string()], &[1883]).is_err());
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
}
