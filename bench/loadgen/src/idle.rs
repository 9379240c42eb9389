//! Idle: many connections that only ping, and what they cost the broker in memory.
//!
//! Opens `--connections` connections (`--connect-concurrency` at a time, plain or TLS), reads
//! the broker's RSS before the first and `--settle` seconds after the last, and reports the
//! difference per connection. The connections then stay open for `--hold` seconds (a PINGREQ
//! every half keep-alive) and disconnect.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, Idle};
use crate::client::{self, Hello, Sources, Targets};
use crate::procfs::{clock_ticks_per_second, Proc};
use crate::report::IdleReport;
use crate::tls::Tls;
use crate::window::Meter;

/// How long stopped connections get to disconnect before the report is printed anyway.
const WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(10);

pub async fn run(common: &Common, args: &Idle) -> Result<IdleReport> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let tls = Tls::from_common(common)?;
    let targets = Targets::resolve(&common.host, common.port).await?;
    let sources = Sources::parse(common.source.as_deref())?;
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let rss_before = meter.broker_rss_kib();
    let stop = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::channel(1024);
    let mut tasks = JoinSet::new();
    let run_id = std::process::id();
    let start = Instant::now();
    for i in 0..args.connections {
        let (addr, host, source) = (targets.get(i), targets.host(i).to_owned(), sources.get(i));
        let (tls, slots, done, stop) = (tls.clone(), slots.clone(), done_tx.clone(), stop.clone());
        let (keep_alive_s, step, protocol) =
            (common.keepalive, common.step_timeout, common.protocol());
        tasks.spawn(async move {
            let opened = {
                let _slot = slots.acquire().await;
                let id = format!("lg{run_id}-idle-{i}");
                let hello = Hello {
                    addr,
                    host: &host,
                    source,
                    client_id: &id,
                    login: None,
                    keep_alive_s,
                    protocol,
                };
                client::open(hello, tls.as_ref(), step).await
            };
            match opened {
                Ok(conn) => {
                    let _ = done.send(Ok(())).await;
                    drop(done);
                    client::hold(conn, keep_alive_s, &stop).await
                }
                Err(e) => {
                    let _ = done.send(Err(e)).await;
                    false
                }
            }
        });
    }
    drop(done_tx);
    let (mut connected, mut failed, mut first_error) = (0usize, 0usize, None);
    while let Some(result) = done_rx.recv().await {
        match result {
            Ok(()) => connected += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let connect_s = start.elapsed().as_secs_f64();
    if connected == 0 {
        stop.cancel();
        bail!(
            "no connection succeeded: {}",
            first_error.unwrap_or_default()
        );
    }
    eprintln!(
        "loadgen: {connected} connected ({failed} failed) in {connect_s:.1} s; settling {:?}",
        args.settle
    );
    tokio::time::sleep(args.settle).await;
    let rss_after = meter.broker_rss_kib();
    let loadgen_rss = Proc::Myself.rss_kib().ok();
    if !args.hold.is_zero() {
        eprintln!("loadgen: holding the connections for {:?}", args.hold);
        tokio::time::sleep(args.hold).await;
    }
    stop.cancel();
    let mut closed_by_broker = 0;
    let wound_down = timeout(WIND_DOWN, async {
        while let Some(joined) = tasks.join_next().await {
            if joined.unwrap_or(false) {
                closed_by_broker += 1;
            }
        }
    })
    .await;
    if wound_down.is_err() {
        tasks.abort_all();
    }
    Ok(IdleReport {
        connections: args.connections,
        tls: tls.is_some(),
        protocol: common.protocol().level(),
        connected,
        failed,
        first_error,
        connect_s,
        settle_s: args.settle.as_secs_f64(),
        broker_rss_before_kib: rss_before,
        broker_rss_after_kib: rss_after,
        broker_kib_per_connection: rss_before
            .zip(rss_after)
            .map(|(b, a)| (a as f64 - b as f64) / connected as f64),
        loadgen_rss_kib: loadgen_rss,
        closed_by_broker,
    })
}
