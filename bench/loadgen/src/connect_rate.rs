//! Connect rate: `--connections` connections started at `--rate` per second, open loop (each
//! at its scheduled time, whatever the earlier ones are doing), and how long each waits for
//! its CONNACK, measured from the start of its TCP connect (with `--tls` the handshake is
//! included). Connections stay open (pinging) until every one is answered, so the broker ends
//! the run holding them all; then they disconnect.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, ConnectRate};
use crate::client::{self, Targets};
use crate::procfs::clock_ticks_per_second;
use crate::report::{ConnectRateReport, Latency};
use crate::sockets;
use crate::tls::Tls;
use crate::window::{self, Meter};

/// How long stopped connections get to disconnect before the report is printed anyway.
const WIND_DOWN: Duration = Duration::from_secs(10);

pub async fn run(common: &Common, args: &ConnectRate) -> Result<ConnectRateReport> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of connects per second"
    );
    let tls = Tls::from_common(common)?;
    let targets = Targets::resolve(&common.host, common.port).await?;
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let stop = CancellationToken::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let run_id = std::process::id();
    let rss_start = meter.broker_rss_kib();
    let overflows_start = sockets::listen_overflows();
    let start_mark = meter.mark();
    let start = start_mark.at;
    let mut lag_max = Duration::ZERO;
    for i in 0..args.connections {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate);
        sleep_until(due.into()).await;
        lag_max = lag_max.max(due.elapsed());
        let (addr, host) = (targets.get(i), targets.host(i).to_owned());
        let (tls, done, stop) = (tls.clone(), done_tx.clone(), stop.clone());
        let (keep_alive_s, step) = (common.keepalive, common.step_timeout);
        tasks.spawn(async move {
            let began = Instant::now();
            let id = format!("lg{run_id}-rate-{i}");
            match client::open(addr, &host, tls.as_ref(), &id, keep_alive_s, step).await {
                Ok(conn) => {
                    let _ = done.send(Ok(began.elapsed()));
                    drop(done);
                    client::hold(conn, keep_alive_s, &stop).await;
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            }
        });
    }
    drop(done_tx);
    let mut samples_us = Vec::with_capacity(args.connections);
    let (mut failed, mut first_error) = (0usize, None);
    while let Some(result) = done_rx.recv().await {
        match result {
            Ok(latency) => samples_us.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let end_mark = meter.mark();
    let overflows_end = sockets::listen_overflows();
    let rss_end = meter.broker_rss_kib();
    stop.cancel();
    if timeout(WIND_DOWN, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tasks.abort_all();
    }
    let connected = samples_us.len();
    if connected == 0 {
        bail!(
            "no connection succeeded: {}",
            first_error.unwrap_or_default()
        );
    }
    let elapsed_s = window::seconds_between(&start_mark, &end_mark);
    let broker = meter.usage(&start_mark, &end_mark, (rss_start, 0, rss_end));
    Ok(ConnectRateReport {
        connections: args.connections,
        rate: args.rate,
        tls: tls.is_some(),
        connected,
        failed,
        first_error,
        elapsed_s,
        achieved_per_s: connected as f64 / elapsed_s,
        start_lag_max_ms: lag_max.as_secs_f64() * 1000.0,
        listen_overflows: overflows_start
            .zip(overflows_end)
            .map(|(a, b)| b.saturating_sub(a)),
        connack: Latency::from_micros(samples_us),
        broker_cpu_ms_per_connect: broker.as_ref().map(|b| b.cpu_s * 1000.0 / connected as f64),
        broker,
        loadgen_cpu_percent: window::own_cpu_percent(&start_mark, &end_mark),
    })
}
