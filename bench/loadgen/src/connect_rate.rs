//! Connect rate: `--connections` connections started at `--rate` per second, open loop (each
//! at its scheduled time, whatever the earlier ones are doing), and how long each waits for
//! its CONNACK, measured from the start of its TCP connect (with `--tls` the handshake is
//! included). Connections stay open (pinging) until every one is answered, so the broker ends
//! the run holding them all; then they disconnect.
//!
//! With `--password-seed` every connection logs in as its client id with its own password
//! ([`crate::credentials`]); with `--wrong-password` each should be refused. `--flood` runs a
//! second wave at the same time, of connects with wrong passwords from `--flood-source`: what
//! a password-guessing attacker does to legitimate devices connecting meanwhile.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, ConnectRate};
use crate::client::{self, Hello, Refused, Sources, Targets};
use crate::credentials::Login;
use crate::mqtt::Protocol;
use crate::procfs::clock_ticks_per_second;
use crate::report::{ConnectRateReport, FloodReport, Latency};
use crate::sockets;
use crate::tls::Tls;
use crate::window::{self, Meter};

/// How long stopped connections get to disconnect before the report is printed anyway.
const WIND_DOWN: Duration = Duration::from_secs(10);

/// One series of connects at a steady rate.
#[derive(Debug, Clone)]
struct Wave {
    /// Which wave the outcomes belong to: 0 the measured one, 1 the flood.
    index: usize,
    connections: usize,
    rate: f64,
    prefix: String,
    start_number: u64,
    login: Login,
    sources: Sources,
}

/// How one connect ended.
enum Outcome {
    /// CONNACK 0 after this long.
    Accepted(Duration),
    /// A non-zero CONNACK.
    Refused(Refused),
    /// No CONNACK: timeout, connection reset or closed, ...
    Failed(anyhow::Error),
}

/// The outcomes of one wave, tallied.
#[derive(Default)]
struct Tally {
    accepted_us: Vec<u64>,
    refused_us: Vec<u64>,
    /// Refusals with return code 4 (bad user name or password).
    refused_bad_credentials: usize,
    failed: usize,
    first_error: Option<String>,
    /// When the last outcome arrived.
    last: Option<Instant>,
}

impl Tally {
    fn add(&mut self, outcome: Outcome) {
        self.last = Some(Instant::now());
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        match outcome {
            Outcome::Accepted(latency) => self.accepted_us.push(micros(latency)),
            Outcome::Refused(refused) => {
                self.refused_us.push(micros(refused.after));
                if refused.code == 4 {
                    self.refused_bad_credentials += 1;
                }
                self.first_error.get_or_insert_with(|| refused.to_string());
            }
            Outcome::Failed(e) => {
                self.failed += 1;
                self.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
}

pub async fn run(common: &Common, args: &ConnectRate) -> Result<ConnectRateReport> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number of connects per second"
    );
    let flood_rate = args.flood_rate.unwrap_or(args.rate);
    anyhow::ensure!(
        flood_rate.is_finite() && flood_rate > 0.0,
        "--flood-rate must be a positive number of connects per second"
    );
    let tls = Tls::from_common(common)?;
    let targets = Targets::resolve(&common.host, common.port).await?;
    let sources = Sources::parse(common.source.as_deref())?;
    let prefix = args
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("lg{}-rate-", std::process::id()));
    let login = match (&args.password_seed, args.wrong_password) {
        (None, _) => Login::None,
        (Some(seed), false) => Login::Seeded(seed.clone()),
        (Some(seed), true) => Login::Wrong(seed.clone()),
    };
    let mut waves = vec![Wave {
        index: 0,
        connections: args.connections,
        rate: args.rate,
        prefix: prefix.clone(),
        start_number: args.start_number,
        login,
        sources: sources.clone(),
    }];
    if let (true, Some(seed)) = (args.flood > 0, &args.password_seed) {
        let flood_sources = match &args.flood_source {
            Some(list) => Sources::parse(Some(list))?,
            None => sources,
        };
        waves.push(Wave {
            index: 1,
            connections: args.flood,
            rate: flood_rate,
            prefix,
            start_number: args
                .flood_start_number
                .unwrap_or(args.start_number + args.connections as u64),
            login: Login::Wrong(seed.clone()),
            sources: flood_sources,
        });
    }

    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let stop = CancellationToken::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let rss_start = meter.broker_rss_kib();
    let overflows_start = sockets::listen_overflows();
    let start_mark = meter.mark();
    let start = start_mark.at;
    // Each wave is scheduled by a task of its own, so that the waves run side by side.
    let mut launchers = JoinSet::new();
    for wave in &waves {
        launchers.spawn(launch(
            wave.clone(),
            start,
            targets.clone(),
            tls.clone(),
            (common.keepalive, common.step_timeout, common.protocol()),
            done_tx.clone(),
            stop.clone(),
        ));
    }
    drop(done_tx);
    let mut tallies: Vec<Tally> = waves.iter().map(|_| Tally::default()).collect();
    while let Some((index, outcome)) = done_rx.recv().await {
        tallies[index].add(outcome);
    }
    let end_mark = meter.mark();
    let overflows_end = sockets::listen_overflows();
    let rss_end = meter.broker_rss_kib();
    // Every launcher has finished scheduling: the channel closes only after its last sender.
    let mut tasks = Vec::new();
    let mut lag_max = Duration::ZERO;
    while let Some(joined) = launchers.join_next().await {
        let (held, lag) = joined?;
        tasks.push(held);
        lag_max = lag_max.max(lag);
    }
    stop.cancel();
    if timeout(WIND_DOWN, async {
        for held in &mut tasks {
            while held.join_next().await.is_some() {}
        }
    })
    .await
    .is_err()
    {
        tasks.iter_mut().for_each(JoinSet::abort_all);
    }
    let mut tallies = tallies.into_iter();
    let main = tallies.next().unwrap_or_default();
    let flood = tallies.next();
    let connected = main.accepted_us.len();
    let refused = main.refused_us.len();
    if connected == 0 && refused == 0 {
        bail!(
            "no connection was answered: {}",
            main.first_error.unwrap_or_default()
        );
    }
    let answered_all = connected
        + refused
        + flood
            .as_ref()
            .map_or(0, |f| f.accepted_us.len() + f.refused_us.len());
    let elapsed_s = main
        .last
        .map_or(0.0, |last| last.duration_since(start).as_secs_f64())
        .max(f64::EPSILON);
    let broker = meter.usage(&start_mark, &end_mark, (rss_start, 0, rss_end));
    let flood = flood.zip(waves.get(1)).map(|(f, wave)| FloodReport {
        connections: wave.connections,
        rate: wave.rate,
        accepted: f.accepted_us.len(),
        refused: f.refused_us.len(),
        refused_bad_credentials: f.refused_bad_credentials,
        failed: f.failed,
        first_error: f.first_error,
        refusal: Latency::from_micros(f.refused_us),
    });
    Ok(ConnectRateReport {
        connections: args.connections,
        rate: args.rate,
        tls: tls.is_some(),
        login: waves[0].login.kind(),
        connected,
        refused,
        refused_bad_credentials: main.refused_bad_credentials,
        failed: main.failed,
        first_error: main.first_error,
        elapsed_s,
        achieved_per_s: (connected + refused) as f64 / elapsed_s,
        start_lag_max_ms: lag_max.as_secs_f64() * 1000.0,
        listen_overflows: overflows_start
            .zip(overflows_end)
            .map(|(a, b)| b.saturating_sub(a)),
        connack: Latency::from_micros(main.accepted_us),
        refusal: Latency::from_micros(main.refused_us),
        broker_cpu_ms_per_connect: broker
            .as_ref()
            .map(|b| b.cpu_s * 1000.0 / answered_all.max(1) as f64),
        broker,
        loadgen_cpu_percent: window::own_cpu_percent(&start_mark, &end_mark),
        flood,
    })
}

/// Starts the connects of `wave` at their times from `start` (each as a task of its own, so
/// that a slow answer delays no later connect), sending each outcome tagged with the wave's
/// index. Returns the tasks of the connections (held until `stop`) and the worst start lag.
async fn launch(
    wave: Wave,
    start: Instant,
    targets: Targets,
    tls: Option<Tls>,
    (keep_alive_s, step, protocol): (u16, Duration, Protocol),
    done: mpsc::UnboundedSender<(usize, Outcome)>,
    stop: CancellationToken,
) -> (JoinSet<()>, Duration) {
    let mut held = JoinSet::new();
    let mut lag_max = Duration::ZERO;
    for i in 0..wave.connections {
        let due = start + Duration::from_secs_f64(i as f64 / wave.rate);
        sleep_until(due.into()).await;
        lag_max = lag_max.max(due.elapsed());
        let (addr, host, source) = (
            targets.get(i),
            targets.host(i).to_owned(),
            wave.sources.get(i),
        );
        let (tls, done, stop, index) = (tls.clone(), done.clone(), stop.clone(), wave.index);
        let client_id = format!("{}{}", wave.prefix, wave.start_number + i as u64);
        let login = wave.login.for_client(&client_id);
        held.spawn(async move {
            let began = Instant::now();
            let hello = Hello {
                addr,
                host: &host,
                source,
                client_id: &client_id,
                login: login.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
                keep_alive_s,
                protocol,
            };
            match client::open(hello, tls.as_ref(), step).await {
                Ok(conn) => {
                    let _ = done.send((index, Outcome::Accepted(began.elapsed())));
                    drop(done);
                    client::hold(conn, keep_alive_s, &stop).await;
                }
                Err(e) => {
                    let outcome = match e.downcast::<Refused>() {
                        Ok(refused) => Outcome::Refused(refused),
                        Err(e) => Outcome::Failed(e),
                    };
                    let _ = done.send((index, outcome));
                }
            }
        });
    }
    (held, lag_max)
}
