//! `run --workers N`: the parent splits `--count` into N contiguous ranges of device numbers
//! and runs each in a child process of this executable (`run --worker-id K ...`).
//!
//! Children print machine-readable lines: `status {json}` once per second (their
//! [`Live`] numbers) and `result {json}` at the end (their [`Summary`] with the CONNACK
//! histogram). The parent prints one aggregated status line per second, relays every other
//! child line prefixed with `wK `, forwards SIGINT/SIGTERM to the children, and prints a
//! summary whose CONNACK percentiles come from the merged histograms (exact). `--rate` and
//! `--flappers` are split over the workers; `--truth FILE` is written by each child to
//! `FILE.worker-K` and concatenated into FILE (when all children hold with
//! `--end-state keep`, and at the end; left as parts if a worker fails); `--ready-file` is
//! written by the parent once every worker has had all its devices connected at once (each
//! worker at its own moment). `--metrics-listen` is served by the parent only (the sum of the
//! workers' latest per-second reports). Signals are forwarded with kill(1), as the crate
//! forbids unsafe code.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{value_name, RunArgs, PASSWORD_ENV, PASSWORD_SEED_ENV};
use crate::fleet::{raise_nofile, write_ready_file};
use crate::metrics;
use crate::progress::Progress;
use crate::report::{self, Live, Summary};
use crate::transport::Transport;
use crate::worker_protocol::{HOLDING, READY, RESULT, STATUS};

/// Devices of worker `k` of `n`: (first number offset, count); contiguous, sizes differ by ≤ 1.
pub fn split(count: u64, n: u64, k: u64) -> (u64, u64) {
    let (base, rem) = (count / n, count % n);
    (k * base + k.min(rem), base + u64::from(k < rem))
}

fn worker_truth(truth: &Path, k: u32) -> PathBuf {
    let mut p = truth.as_os_str().to_owned();
    p.push(format!(".worker-{k}"));
    PathBuf::from(p)
}

/// Arguments of worker `k`.
fn child_args(cli: &RunArgs, k: u32) -> Vec<String> {
    let n = u64::from(cli.workers);
    let (offset, count) = split(cli.count, n, u64::from(k));
    let flappers = cli.flappers.saturating_sub(offset).min(count);
    let rate = (u64::from(cli.rate) * count).div_ceil(cli.count).max(1);
    let mut a: Vec<String> = vec![
        "run".into(),
        format!("--worker-id={k}"),
        format!("--host={}", cli.host.join(",")),
        format!(
            "--port={}",
            cli.port
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        format!("--count={count}"),
        format!("--start-number={}", cli.start_number + offset),
        format!("--prefix={}", cli.prefix),
        format!("--rate={rate}"),
        format!("--keepalive={}", cli.keepalive),
        format!("--keepalive-multiplier={}", cli.keepalive_multiplier),
        format!("--clean={}", cli.clean),
        format!("--duration={}", cli.duration),
        format!("--connect-timeout={}", cli.connect_timeout),
        format!("--scenario={}", value_name(&cli.scenario)),
        format!("--protocol={}", value_name(&cli.protocol)),
        format!("--churn-percent={}", cli.churn_percent),
        format!(
            "--churn-mix={}",
            cli.churn_mix
                .iter()
                .map(value_name)
                .collect::<Vec<_>>()
                .join(",")
        ),
        format!("--churn-pause={}", cli.churn_pause),
        format!("--flappers={flappers}"),
        format!("--storm-every={}", cli.storm_every),
        format!("--end-state={}", value_name(&cli.end_state)),
        format!("--qos={}", cli.qos),
        format!("--payload-size={}", cli.payload_size),
        format!("--topic={}", cli.topic),
    ];
    if let Some(i) = cli.publish_interval {
        a.push(format!("--publish-interval={i}"));
    }
    // The password and the seed reach the workers through their environment, not their
    // command line.
    if let Some(u) = &cli.username {
        a.push(format!("--username={u}"));
    }
    if cli.username_from_client_id {
        a.push("--username-from-client-id".into());
    }
    if let Some(t) = &cli.truth {
        a.push(format!("--truth={}", worker_truth(t, k).display()));
    }
    a.extend(transport_args(cli));
    a
}

/// The transport options, as given (each worker builds its own TLS configuration from them;
/// relative paths work as the workers share the parent's working directory).
fn transport_args(cli: &RunArgs) -> Vec<String> {
    let mut a = Vec::new();
    for (flag, on) in [("--tls", cli.tls), ("--ws", cli.ws), ("--wss", cli.wss)] {
        if on {
            a.push(flag.to_owned());
        }
    }
    if let Some(p) = &cli.ws_path {
        a.push(format!("--ws-path={p}"));
    }
    let paths = [
        ("--cafile", &cli.cafile),
        ("--cert", &cli.cert),
        ("--key", &cli.key),
        ("--cert-dir", &cli.cert_dir),
    ];
    for (flag, path) in paths {
        if let Some(p) = path {
            a.push(format!("{flag}={}", p.display()));
        }
    }
    if let Some(name) = &cli.tls_server_name {
        a.push(format!("--tls-server-name={name}"));
    }
    a
}

/// Concatenates the workers' truth files into `truth` (atomically, via a temp file).
fn merge_truth(truth: &Path, n: u32) -> Result<()> {
    let mut tmp = truth.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut out =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    for k in 0..n {
        let part = worker_truth(truth, k);
        if let Ok(mut f) = std::fs::File::open(&part) {
            std::io::copy(&mut f, &mut out)
                .with_context(|| format!("copying {}", part.display()))?;
        }
    }
    drop(out);
    std::fs::rename(&tmp, truth).with_context(|| format!("renaming into {}", truth.display()))
}

/// Sends `sig` (`TERM` or `INT`) to the children via kill(1) (no unsafe code in this crate).
fn forward(children: &[Child], sig: &str) {
    for pid in children.iter().filter_map(Child::id) {
        let _ = std::process::Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status();
    }
}

enum Msg {
    Line(u32, String),
    Eof(u32),
}

/// Runs the workers; returns the aggregated summary. The readers of their output and the
/// metrics endpoint go on `tasks`, the run's tracker; the endpoint stops when `shutdown` is
/// cancelled.
pub async fn run(
    cli: &RunArgs,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<Summary> {
    let n = cli.workers;
    if u64::from(n) > cli.count {
        bail!("--workers {n} exceeds --count {}", cli.count);
    }
    // Each worker needs only its own share of descriptors.
    raise_nofile(split(cli.count, u64::from(n), 0).1)?;
    // A bad CA or client certificate fails here once rather than in every worker.
    Transport::new(&cli.transport()?)?;
    let exe = std::env::current_exe().context("locating the device-sim executable")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut children = Vec::new();
    for k in 0..n {
        let mut command = Command::new(&exe);
        if let Some(password) = &cli.password {
            command.env(PASSWORD_ENV, password);
        }
        if let Some(seed) = &cli.password_seed {
            command.env(PASSWORD_SEED_ENV, seed);
        }
        let mut child = command
            .args(child_args(cli, k))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {k}"))?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let tx = tx.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let line = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    line = lines.next_line() => line,
                };
                let Ok(Some(line)) = line else { break };
                let _ = tx.send(Msg::Line(k, line));
            }
            let _ = tx.send(Msg::Eof(k));
        });
        children.push(child);
    }
    drop(tx);

    let len = usize::try_from(n).unwrap_or(usize::MAX);
    let live: Arc<Mutex<Vec<Live>>> = Arc::new(Mutex::new(vec![Live::default(); len]));
    let sum = {
        let live = Arc::clone(&live);
        move || {
            let mut total = Live::default();
            for l in live.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                total.add(l);
            }
            total
        }
    };
    if let Some(addr) = &cli.metrics_listen {
        metrics::serve(addr, Arc::new(sum.clone()), tasks, shutdown.clone()).await?;
    }
    let start = Instant::now();
    let mut results: Vec<Option<Summary>> = vec![None; len];
    let mut holding = 0u32;
    let mut held = 0u64;
    let mut open = n;
    let mut ready = 0u32;
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let progress = Progress::new(cli.count);
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    while open > 0 {
        tokio::select! {
            _ = term.recv() => forward(&children, "TERM"),
            _ = int.recv() => forward(&children, "INT"),
            _ = tick.tick(), if holding < n => {
                let total = sum();
                progress.update(start.elapsed().as_secs(), &total.snapshot);
            }
            msg = rx.recv() => match msg {
                None => open = 0,
                Some(Msg::Eof(k)) => {
                    open -= 1;
                    if results[usize::try_from(k).unwrap_or(0)].is_none() {
                        // A worker died: stop the others early rather than run on without it.
                        eprintln!("device-sim: worker {k} ended without a result, stopping");
                        forward(&children, "TERM");
                    }
                }
                Some(Msg::Line(k, line)) => {
                    let i = usize::try_from(k).unwrap_or(0);
                    if let Some(json) = line.strip_prefix(STATUS) {
                        if let Ok(l) = serde_json::from_str::<Live>(json) {
                            live.lock().unwrap_or_else(|p| p.into_inner())[i] = l;
                        }
                    } else if let Some(json) = line.strip_prefix(RESULT) {
                        match serde_json::from_str(json) {
                            Ok(r) => results[i] = Some(r),
                            Err(e) => eprintln!("device-sim: worker {k}: bad result line: {e}"),
                        }
                    } else if line.starts_with(READY) {
                        ready += 1;
                        if let (true, Some(path)) = (ready == n, &cli.ready_file) {
                            let res = write_ready_file(path, cli.count, start.elapsed());
                            if let Err(e) = res.await {
                                eprintln!("device-sim: {e:#}");
                            }
                        }
                    } else if let Some(rest) = line.strip_prefix(HOLDING) {
                        holding += 1;
                        held += rest
                            .split_whitespace()
                            .next()
                            .and_then(|c| c.parse::<u64>().ok())
                            .unwrap_or(0);
                        if holding == n {
                            if let Err(e) = cli.truth.as_deref().map_or(Ok(()), |t| merge_truth(t, n)) {
                                eprintln!("device-sim: {e:#}");
                            }
                            progress.finish();
                            println!("{HOLDING}{held} until SIGINT/SIGTERM");
                        }
                    } else {
                        progress.println(&format!("w{k} {line}"));
                    }
                }
            },
        }
    }
    progress.finish();
    let mut failed = Vec::new();
    for (k, child) in children.iter_mut().enumerate() {
        let status = child.wait().await.context("waiting for a worker")?;
        if !status.success() {
            failed.push(format!("worker {k}: {status}"));
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    if let Some(t) = &cli.truth {
        merge_truth(t, n)?;
        for k in 0..n {
            let _ = std::fs::remove_file(worker_truth(t, k));
        }
    }
    let results: Vec<Summary> = results
        .into_iter()
        .enumerate()
        .map(|(k, r)| r.with_context(|| format!("worker {k} printed no result")))
        .collect::<Result<_>>()?;
    let mut errors = report::Errors::default();
    for r in &results {
        errors.add(&r.errors);
    }
    Ok(Summary {
        connected: results.iter().map(|r| r.connected).sum(),
        target: cli.count,
        connack: report::merge_recorded(results.iter().map(|r| r.connack_hist_us.as_slice()))?,
        connack_method: "exact (merged worker histograms)".to_owned(),
        errors,
        reconnects: results.iter().map(|r| r.reconnects).sum(),
        takeovers: results.iter().map(|r| r.takeovers).sum(),
        telemetry: report::Telemetry {
            published: results.iter().map(|r| r.telemetry.published).sum(),
            acknowledged: results.iter().map(|r| r.telemetry.acknowledged).sum(),
            skipped: results.iter().map(|r| r.telemetry.skipped).sum(),
        },
        duration_s: cli.duration,
        elapsed_s: start.elapsed().as_secs_f64(),
        scenario: value_name(&cli.scenario),
        protocol: value_name(&cli.protocol),
        server_disconnects: {
            let mut all = std::collections::BTreeMap::new();
            for (code, n) in results.iter().flat_map(|r| &r.server_disconnects) {
                *all.entry(code.clone()).or_default() += n;
            }
            all
        },
        workers: n,
        connack_hist_us: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_contiguous_and_covers_count() {
        let parts: Vec<_> = (0..3).map(|k| split(50_000, 3, k)).collect();
        assert_eq!(parts, [(0, 16_667), (16_667, 16_667), (33_334, 16_666)]);
        assert_eq!(split(60, 2, 1), (30, 30));
    }

    #[test]
    fn workers_get_the_transport_options_and_the_protocol() -> anyhow::Result<()> {
        use clap::Parser;

        let argv = [
            "device-sim",
            "--workers",
            "2",
            "--wss",
            "--ws-path",
            "/ws",
            "--cafile",
            "ca.pem",
            "--cert-dir",
            "certs",
            "--tls-server-name",
            "localhost",
            "--protocol",
            "5",
        ];
        let parent = crate::cli::Cli::try_parse_from(argv)?.run;
        let args = child_args(&parent, 1);
        let child =
            crate::cli::Cli::try_parse_from(std::iter::once("device-sim".to_owned()).chain(args))?;
        let Some(crate::cli::Command::Run(child)) = child.command else {
            anyhow::bail!("workers run the run subcommand");
        };
        assert_eq!(child.transport()?, parent.transport()?);
        assert_eq!(child.protocol, crate::client::Protocol::V5);
        let tls = crate::cli::Cli::try_parse_from(["device-sim", "--tls", "--cafile", "c"])?.run;
        assert!(transport_args(&tls).contains(&"--tls".to_owned()));
        Ok(())
    }

    #[test]
    fn workers_get_the_credentials_options_but_not_the_secrets() -> anyhow::Result<()> {
        use clap::Parser;

        for (flags, secret) in [
            (["--username-from-client-id", "--password-seed"], "seed-1"),
            (["--username=fleet", "--password"], "s3cret"),
        ] {
            let argv = ["device-sim", "--workers", "2", flags[0], flags[1], secret];
            let parent = crate::cli::Cli::try_parse_from(argv)?.run;
            let args = child_args(&parent, 1);
            assert!(!args.iter().any(|a| a.contains(secret)), "{args:?}");
            // The secret comes from the environment that `run` gives each worker.
            let argv = std::iter::once("device-sim".to_owned())
                .chain(args)
                .chain([flags[1].to_owned(), secret.to_owned()]);
            let Some(crate::cli::Command::Run(child)) =
                crate::cli::Cli::try_parse_from(argv)?.command
            else {
                anyhow::bail!("workers run the run subcommand");
            };
            assert_eq!(child.credentials()?, parent.credentials()?);
        }
        Ok(())
    }
}
