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
//! processes and aggregates them (see [`workers`]).
//!
//! `device-sim verify --truth FILE --api http://HOST:PORT` waits `--settle` seconds and compares
//! the truth with the broker's presence API (see [`verify`]; sessions ended by a broker crash
//! are recognised from the boots of `GET /api/v1/nodes`), and with `--database-url URL` with
//! the presence database too (see [`db`]); exit code 1 on any disagreement.

mod db;
mod device;
mod http;
mod metrics;
mod presence;
mod progress;
mod report;
mod scenario;
mod truth;
mod verify;
mod workers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::device::{Control, Device, EndState, Profile};
use crate::progress::Progress;
use crate::report::Stats;
use crate::scenario::{Fleet, Handle, MixKind, Plan, Scenario};
use crate::truth::TruthWriter;
use crate::verify::VerifyArgs;

/// File descriptors kept in reserve beyond one socket per device.
const FD_RESERVE: u64 = 64;
/// Largest PUBLISH remaining length device-sim sends (1 MiB, the default `mqtt.max_packet_size`
/// of Heartwire), so also the bound of `--payload-size`.
const MAX_PAYLOAD: u64 = 1024 * 1024;
/// Exit code of `run` when no device ever connected (the broker is unreachable or refuses
/// everyone).
const NONE_CONNECTED: u8 = 3;
/// Exit codes, for `--help`.
const EXIT_CODES: &str = "Exit codes: 0 success; 1 verify: the broker disagrees with the truth; \
                          2 error (bad options, unreachable API or database, I/O); \
                          3 run: no device ever connected (the first error of each kind is \
                          printed on stderr and in --json).";
/// Upper bound on waiting for devices to disconnect at the end of the run (plus the
/// keep-alive deadline of silently dead devices).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Command line: `run` options are accepted without the subcommand too.
#[derive(Debug, Parser)]
#[command(
    name = "device-sim",
    version,
    about = "Simulated MQTT device fleet for Heartwire",
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a fleet of simulated devices (the default).
    #[command(after_help = EXIT_CODES)]
    Run(Box<RunArgs>),
    /// Compare a run's ground truth with the broker's presence API.
    ///
    /// Checks every device's final state and the reason recorded for every session end the
    /// simulator caused. A session recorded as broker_restart is accepted when it was open at a
    /// broker crash: its boot (from GET /api/v1/nodes) was recovered by a later boot, it was
    /// closed at that boot's last heartbeat, and the truth had it open then (for a silent death:
    /// its keep-alive deadline was not yet due); their number is printed.
    #[command(after_help = EXIT_CODES)]
    Verify(VerifyArgs),
}

/// Options of `device-sim run`.
#[derive(Debug, Clone, Args)]
struct RunArgs {
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
    /// MQTT keep-alive in seconds (0 disables pings, and silent deaths become abrupt closes).
    #[arg(long, default_value_t = 30)]
    keepalive: u16,
    /// MQTT clean-session flag (`--clean false` for persistent sessions).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    clean: bool,
    /// Length of the run in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// MQTT user name sent in CONNECT (Heartwire does not check credentials yet; other brokers
    /// may).
    #[arg(long)]
    username: Option<String>,
    /// MQTT password sent in CONNECT; needs --username. Prefer the environment variable, which
    /// other users cannot read from the process list.
    #[arg(
        long,
        env = "DEVICE_SIM_PASSWORD",
        hide_env_values = true,
        requires = "username"
    )]
    password: Option<String>,
    /// Telemetry: seconds between two messages of one device while it is connected (decimals
    /// allowed); without it devices only ping.
    #[arg(long)]
    publish_interval: Option<f64>,
    /// Telemetry: quality of service of the messages (0, 1 or 2).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Telemetry: payload size in bytes (a JSON object padded or cut to exactly this size); a
    /// PUBLISH (payload, topic and 4 bytes) must fit in 1 MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=MAX_PAYLOAD))]
    payload_size: u64,
    /// Telemetry: topic; `%c` becomes the client id, `%i` the device number.
    #[arg(long, default_value = "devices/%c/telemetry")]
    topic: String,
    /// Timeout for TCP connect plus CONNACK, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    connect_timeout: u64,
    /// File written once all devices are connected for the first time.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// What happens during the run.
    #[arg(long, value_enum, default_value_t = Scenario::Steady)]
    scenario: Scenario,
    /// churn and takeover: devices per minute that leave (churn) or are taken over, in percent
    /// of --count (may exceed 100).
    #[arg(long, default_value_t = 10.0)]
    churn_percent: f64,
    /// churn: ways of leaving to pick from at random, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "clean,abrupt,silent"
    )]
    churn_mix: Vec<MixKind>,
    /// churn: mean seconds away before coming back (a silent death stays away at least
    /// 1.5 × keep-alive + 1 s).
    #[arg(long, default_value_t = 1.0)]
    churn_pause: f64,
    /// flap: number of devices (the first ones) that reconnect rapidly.
    #[arg(long, default_value_t = 5)]
    flappers: u64,
    /// storm: seconds between storms (one storm half-way when the run is shorter).
    #[arg(long, default_value_t = 30)]
    storm_every: u64,
    /// Ground truth output: one JSON line per state change, then each device's final state.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// At the end of --duration: `disconnect` every device cleanly, or `keep` the connected
    /// ones connected (final state recorded, file flushed) until SIGINT/SIGTERM.
    #[arg(long, value_enum, default_value_t = EndState::Disconnect)]
    end_state: EndState,
    /// Write the final summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Split --count into N contiguous ranges of device numbers, each run by a child process
    /// (--rate and --flappers are split too; --truth FILE is merged from FILE.worker-K).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// Serve Prometheus metrics on ADDR (host:port) at GET /metrics; with --workers the
    /// parent serves the sum of all workers.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Internal: this process is worker K of a --workers parent (machine-readable output).
    #[arg(long, hide = true)]
    worker_id: Option<u32>,
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
fn device_for(cli: &RunArgs, endpoints: &[(String, u16)], index: u64) -> Device {
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
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Verify(args)) => verify::verify(&args).await.map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }),
        Some(Command::Run(args)) => run_main(*args).await,
        None => run_main(cli.run).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("device-sim: {e:#}");
        ExitCode::from(2)
    })
}

/// Checks options that clap cannot.
fn check(args: &RunArgs) -> Result<()> {
    if args.churn_mix.is_empty() {
        bail!("--churn-mix needs at least one kind");
    }
    if !(args.churn_percent.is_finite() && args.churn_percent >= 0.0) {
        bail!("--churn-percent must be a non-negative number");
    }
    if !(args.churn_pause.is_finite() && args.churn_pause >= 0.0) {
        bail!("--churn-pause must be a non-negative number of seconds");
    }
    if let Some(i) = args.publish_interval {
        if !(i.is_finite() && i >= 0.001) {
            bail!("--publish-interval must be a number of seconds, at least 0.001");
        }
        // The expanded topic of the device with the longest number (the prefix is in it too).
        let last = args.start_number.saturating_add(args.count - 1);
        let topic = telemetry(args)
            .map(|t| t.topic_for(&format!("{}{last}", args.prefix), last))
            .unwrap_or_default();
        if topic.is_empty()
            || topic.contains(['+', '#', '\0'])
            || topic.len() > usize::from(u16::MAX)
        {
            bail!(
                "--topic (with --prefix) must expand to a topic name without wildcards (+, #), \
                 1 to 65535 bytes; got {topic:?}"
            );
        }
        // PUBLISH remaining length: topic length field + topic + packet id + payload.
        let publish = 2 + topic.len() as u64 + 2 + args.payload_size;
        if publish > MAX_PAYLOAD {
            bail!(
                "--payload-size {} with topic {topic:?} makes PUBLISH packets of {publish} bytes, \
                 over 1 MiB (Heartwire's default mqtt.max_packet_size)",
                args.payload_size
            );
        }
    }
    if args.username.as_deref() == Some("") {
        bail!("--username must not be empty (MQTT 3.1.1 sends a password only with a user name)");
    }
    Ok(())
}

/// The telemetry settings, if `--publish-interval` asks for any.
fn telemetry(args: &RunArgs) -> Option<device::Telemetry> {
    let interval = Duration::from_secs_f64(args.publish_interval?);
    Some(device::Telemetry {
        interval,
        qos: match args.qos {
            0 => rumqttc::QoS::AtMostOnce,
            1 => rumqttc::QoS::AtLeastOnce,
            _ => rumqttc::QoS::ExactlyOnce,
        },
        payload_size: usize::try_from(args.payload_size).unwrap_or(usize::MAX),
        topic: args.topic.clone(),
    })
}

/// `device-sim run`: one process, a worker, or the parent of `--workers`. Exit code 3 when no
/// device ever connected.
async fn run_main(cli: RunArgs) -> Result<ExitCode> {
    check(&cli)?;
    let summary = if cli.worker_id.is_none() && cli.workers > 1 {
        workers::run(&cli).await?
    } else {
        run(cli.clone()).await?
    };
    if cli.worker_id.is_some() {
        // The parent judges the merged result.
        println!("{}{}", workers::RESULT, serde_json::to_string(&summary)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{}", summary.line());
    for line in summary.errors.lines() {
        eprintln!("device-sim: {line}");
    }
    if let Some(path) = &cli.json {
        let body = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, body + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if summary.connack.samples == 0 {
        eprintln!(
            "device-sim: no device ever connected (is the broker running at --host {} --port {}?)",
            cli.host.join(","),
            cli.port
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        return Ok(ExitCode::from(NONE_CONNECTED));
    }
    Ok(ExitCode::SUCCESS)
}

/// One process running devices (without --workers, or as a worker).
async fn run(cli: RunArgs) -> Result<report::Summary> {
    raise_nofile(cli.count)?;
    let endpoints = endpoints(&cli.host, &cli.port)?;
    let truth = Arc::new(match &cli.truth {
        Some(path) => TruthWriter::create(path)?,
        None => TruthWriter::disabled(),
    });

    let stats = Arc::new(Stats::new(cli.count)?);
    if let (Some(addr), None) = (&cli.metrics_listen, cli.worker_id) {
        let stats = Arc::clone(&stats);
        metrics::serve(addr, Arc::new(move || stats.live())).await?;
    }
    let profile = Arc::new(Profile {
        keepalive: Duration::from_secs(cli.keepalive.into()),
        clean_session: cli.clean,
        connect_timeout_s: cli.connect_timeout,
        end_state: cli.end_state,
        credentials: cli
            .username
            .clone()
            .map(|u| (u, cli.password.clone().unwrap_or_default())),
        telemetry: telemetry(&cli),
    });
    let end = CancellationToken::new();
    let stop = CancellationToken::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let tracker = TaskTracker::new();
    let fleet: Fleet = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(cli.duration);

    if cli.ready_file.is_some() || cli.worker_id.is_some() {
        let path = cli.ready_file.clone();
        let worker = cli.worker_id.is_some();
        let stats = Arc::clone(&stats);
        let end = end.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = end.cancelled() => {}
                _ = stats.wait_all_connected() => {
                    let connected = stats.snapshot().connected;
                    if worker {
                        println!("{}connected={connected}", workers::READY);
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
    let scheduler = tokio::spawn(scenario::drive(plan, Arc::clone(&fleet), end.clone()));

    // Spawner: starts devices at --rate per second until --count or the end of the run.
    let spawner = {
        let stats = Arc::clone(&stats);
        let truth = Arc::clone(&truth);
        let (end, stop) = (end.clone(), stop.clone());
        let tracker = tracker.clone();
        let fleet = Arc::clone(&fleet);
        let rate = f64::from(cli.rate);
        let profile = Arc::clone(&profile);
        let cli = cli.clone();
        tokio::spawn(async move {
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
                    tracker.spawn(device::run(
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
                    println!("{}{}", workers::STATUS, serde_json::to_string(&stats.live())?);
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
    tracker.close();

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
            "holding connected={} until SIGINT/SIGTERM",
            stats.snapshot().connected
        );
        let held = shutdown_signal();
        tokio::select! {
            res = held => res?,
            _ = tracker.wait() => {}
        }
        stop.cancel();
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        eprintln!("device-sim: some devices did not disconnect within {grace:?}");
    }
    truth.flush()?;
    let s = stats.snapshot();
    Ok(report::Summary {
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
        scenario: workers::value_name(&cli.scenario),
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
    use super::*;

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
        let cli = Cli::try_parse_from(["device-sim"])?.run;
        assert_eq!(cli.host, ["127.0.0.1"]);
        assert_eq!(cli.scenario, Scenario::Steady);
        assert_eq!(cli.end_state, EndState::Disconnect);
        assert_eq!(cli.churn_mix.len(), 3);
        assert_eq!(cli.port, [1883]);
        assert!(cli.clean);
        assert!(Cli::try_parse_from(["device-sim", "--port", "1883,x"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--count", "0"]).is_err());
        assert!(endpoints(&[" ".to_string()], &[1883]).is_err());
        let cli = Cli::try_parse_from(["device-sim", "--clean", "false"])?.run;
        assert!(!cli.clean);
        let cli = Cli::try_parse_from([
            "device-sim",
            "verify",
            "--truth",
            "t.jsonl",
            "--api",
            "http://127.0.0.1:8080",
        ])?;
        match cli.command {
            Some(Command::Verify(v)) => assert_eq!(v.settle, 5.0),
            other => bail!("expected verify, got {other:?}"),
        }
        assert!(Cli::try_parse_from(["device-sim", "verify", "--api", "http://x:1"]).is_err());
        let cli = Cli::try_parse_from([
            "device-sim",
            "run",
            "--scenario",
            "churn",
            "--churn-mix",
            "silent",
            "--end-state",
            "keep",
        ])?;
        let Some(Command::Run(run)) = cli.command else {
            bail!("expected run");
        };
        assert_eq!(run.churn_mix, [MixKind::Silent]);
        assert_eq!(run.end_state, EndState::Keep);
        assert!(
            telemetry(&run).is_none(),
            "no telemetry without --publish-interval"
        );

        assert!(Cli::try_parse_from(["device-sim", "--qos", "3"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--payload-size", "0"]).is_err());
        assert!(Cli::try_parse_from(["device-sim", "--password", "p"]).is_err());
        let run = Cli::try_parse_from(["device-sim", "--publish-interval", "0"])?.run;
        assert!(check(&run).is_err(), "interval 0");
        let telemetry_with = |extra: [&str; 2]| {
            Cli::try_parse_from(["device-sim", "--publish-interval", "1", extra[0], extra[1]])
                .map(|c| c.run)
        };
        assert!(
            check(&telemetry_with(["--topic", "a/+/b"])?).is_err(),
            "wildcard topic"
        );
        let prefixed = telemetry_with(["--prefix", "a#"])?;
        assert!(check(&prefixed).is_err(), "wildcard in the expanded topic");
        let run = Cli::try_parse_from(["device-sim", "--prefix", "a#"])?.run;
        check(&run)?; // no telemetry, no topic
        let run = Cli::try_parse_from([
            "device-sim",
            "--publish-interval",
            "1",
            "--payload-size",
            "1048576",
        ])?
        .run;
        assert!(check(&run).is_err(), "PUBLISH over 1 MiB");
        let run = Cli::try_parse_from(["device-sim", "--username", ""])?.run;
        assert!(check(&run).is_err(), "empty user name");
        let run = Cli::try_parse_from([
            "device-sim",
            "--publish-interval",
            "0.5",
            "--qos",
            "2",
            "--payload-size",
            "10",
        ])?
        .run;
        check(&run)?;
        let t = telemetry(&run).context("telemetry")?;
        assert_eq!(
            (t.interval, t.qos, t.payload_size),
            (Duration::from_millis(500), rumqttc::QoS::ExactlyOnce, 10)
        );
        Ok(())
    }
}
