//! Retained-subscribe: one SUBSCRIBE of many filters while many retained messages are stored,
//! and what a bystander client sees meanwhile.
//!
//! 1. Load: `--loaders` connections publish the retained messages (each a share of the
//!    topics, written in large batches), each ending with a retained sentinel on its own
//!    topic. A checker subscribed to the sentinels beforehand receives each one only after the
//!    broker has handled every PUBLISH before it on that connection, so once all sentinels are
//!    in, every retained message is stored.
//! 2. Bystander: on its own thread, publishes QoS 0 to `bystander/<run>`, which it is
//!    subscribed to, waits for the message to come back, pauses, and again; one outstanding
//!    at a time. `--baseline` of this before the SUBSCRIBE.
//! 3. Subscribe: one client writes ONE SUBSCRIBE with all the filters and reads until every
//!    expected retained message arrived, or nothing arrived for `--idle-timeout` after the
//!    SUBACK, or `--timeout` passed, or the broker closed the connection.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::time::{sleep, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, RetainedSubscribe};
use crate::client::{self, Client, Targets};
use crate::dedicated;
use crate::filters::{self, FilterPlan};
use crate::mqtt::{self, Protocol};
use crate::procfs::clock_ticks_per_second;
use crate::report::{Latency, RetainedReport, SubscribeEnd};
use crate::window::{self, Meter};

/// Bytes per write while loading retained messages.
const LOAD_BATCH_BYTES: usize = 64 * 1024;
/// How long the bystander thread gets to stop.
const WIND_DOWN: Duration = Duration::from_secs(10);

pub async fn run(common: &Common, args: &RetainedSubscribe) -> Result<RetainedReport> {
    anyhow::ensure!(args.retained > 0, "--retained must be at least 1");
    anyhow::ensure!(args.loaders > 0, "--loaders must be at least 1");
    anyhow::ensure!(args.filters > 0, "--filters must be at least 1");
    let targets = Targets::resolve(&common.host, common.port).await?;
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let run_id = std::process::id();
    let plan = filters::plan(args.retained, args.filters, args.wildcard_share);
    let subscribe_packet = mqtt::subscribe(
        Protocol::V311,
        1,
        plan.filters.iter().map(String::as_str),
        0,
    );

    let rss_before_load = meter.broker_rss_kib();
    let load_s = load(common, args, &targets, run_id).await?;
    eprintln!(
        "loadgen: {} retained messages stored in {load_s:.2} s; broker RSS {} -> {} KiB",
        args.retained,
        rss_before_load.map_or("?".into(), |v| v.to_string()),
        meter.broker_rss_kib().map_or("?".into(), |v| v.to_string()),
    );

    let subscriber = client::connect(
        Protocol::V311,
        targets.get(0),
        &format!("lg{run_id}-big-subscriber"),
        common.keepalive,
        common.step_timeout,
        1024 * 1024,
        None,
    )
    .await
    .context("the subscribing client")?;

    let stop_bystander = CancellationToken::new();
    let bystander = start_bystander(common, args, &targets, run_id, &stop_bystander).await?;
    sleep(args.baseline).await;

    eprintln!(
        "loadgen: SUBSCRIBE of {} filters ({} with wildcards, {} bytes); {} retained messages expected",
        plan.filters.len(),
        plan.wildcard,
        subscribe_packet.len(),
        plan.expected
    );
    let rss_start = meter.broker_rss_kib();
    let peak = meter.sample_peak_rss(rss_start);
    let start = meter.mark();
    let outcome =
        subscribe_phase(subscriber, &subscribe_packet, &plan, args, common, start.at).await;
    let end = meter.mark();
    let rss_end = meter.broker_rss_kib();
    let rss_peak = peak.finish().await;

    stop_bystander.cancel();
    let log = bystander.join(WIND_DOWN).await.context("bystander")?;

    // The period the bystander is judged over: until the broker finished answering.
    let work_end = outcome
        .suback
        .into_iter()
        .chain(outcome.last_retained)
        .max()
        .unwrap_or(outcome.ended);
    let ms_since_start = |t: Instant| t.duration_since(start.at).as_secs_f64() * 1000.0;
    let mut during: Vec<u64> = log
        .round_trips
        .iter()
        .filter(|rt| rt.sent <= work_end && rt.received >= start.at)
        .map(|rt| rt.received.duration_since(rt.sent).as_micros() as u64)
        .collect();
    // A message still unanswered at the stop counts if it was sent within the period (one
    // sent after it is merely the round trip in flight when the phase ended).
    let unanswered = log
        .unanswered
        .filter(|&sent| sent <= work_end)
        .map(|sent| log.stopped.duration_since(sent));
    if let Some(waited) = unanswered {
        during.push(waited.as_micros() as u64);
    }
    let baseline: Vec<u64> = log
        .round_trips
        .iter()
        .filter(|rt| rt.received < start.at)
        .map(|rt| rt.received.duration_since(rt.sent).as_micros() as u64)
        .collect();

    Ok(RetainedReport {
        retained: args.retained,
        load_s,
        filters: plan.filters.len(),
        wildcard_filters: plan.wildcard,
        expected_retained: plan.expected,
        suback_ms: outcome.suback.map(ms_since_start),
        granted: outcome.granted,
        refused: outcome.refused,
        retained_received: outcome.retained,
        other_received: outcome.other,
        last_retained_ms: outcome.last_retained.map(ms_since_start),
        end: outcome.end,
        phase_ms: ms_since_start(outcome.ended),
        bystander_baseline: Latency::from_micros(baseline),
        bystander_during: Latency::from_micros(during),
        bystander_unanswered_ms: unanswered.map(|waited| waited.as_secs_f64() * 1000.0),
        broker_rss_before_load_kib: rss_before_load,
        broker: meter.usage(&start, &end, (rss_start, rss_peak, rss_end)),
        loadgen_cpu_percent: window::own_cpu_percent(&start, &end),
    })
}

/// Publishes the retained messages and waits until the broker confirms it has them all.
/// Returns the seconds that took.
async fn load(
    common: &Common,
    args: &RetainedSubscribe,
    targets: &Targets,
    run_id: u32,
) -> Result<f64> {
    let sentinel_prefix = format!("loadgen/{run_id}/sentinel");
    let mut checker = client::connect(
        Protocol::V311,
        targets.get(0),
        &format!("lg{run_id}-checker"),
        common.keepalive,
        common.step_timeout,
        64 * 1024,
        None,
    )
    .await
    .context("the sentinel checker")?;
    // Four levels: no filter of the big SUBSCRIBE (three levels) can match a sentinel.
    checker
        .subscribe(&[&format!("{sentinel_prefix}/+")], 0, common.step_timeout)
        .await?;

    let started = Instant::now();
    let deadline = started + args.load_timeout;
    let payload = vec![b'r'; args.payload_size];
    let mut loaders = tokio::task::JoinSet::new();
    for c in 0..args.loaders {
        let addr = targets.get(c);
        let (client_id, sentinel) = (
            format!("lg{run_id}-loader-{c}"),
            format!("{sentinel_prefix}/{c}"),
        );
        let (payload, step, keep_alive_s) =
            (payload.clone(), common.step_timeout, common.keepalive);
        let (retained, loaders_n) = (args.retained, args.loaders);
        loaders.spawn(async move {
            let mut client = client::connect(
                Protocol::V311,
                addr,
                &client_id,
                keep_alive_s,
                step,
                64,
                None,
            )
            .await?;
            let mut batch = Vec::with_capacity(LOAD_BATCH_BYTES + 256);
            for i in (c..retained).step_by(loaders_n) {
                batch.extend(mqtt::publish(
                    Protocol::V311,
                    &filters::retained_topic(i),
                    &payload,
                    None,
                    true,
                ));
                if batch.len() >= LOAD_BATCH_BYTES {
                    client.writer.write_all(&batch).await?;
                    batch.clear();
                }
            }
            batch.extend(mqtt::publish(
                Protocol::V311,
                &sentinel,
                b"done",
                None,
                true,
            ));
            client.writer.write_all(&batch).await?;
            anyhow::Ok(client)
        });
    }

    // A loader that fails ends the wait at once (rather than at the deadline); the loaders
    // that finished are kept to leave cleanly.
    let mut finished = Vec::new();
    let wait_sentinels = async {
        let mut seen = HashSet::new();
        while seen.len() < args.loaders {
            tokio::select! {
                frame = checker.reader.next() => {
                    let frame = frame?.context("the broker closed the checker's connection")?;
                    if let Some(p) = frame.publish() {
                        seen.insert(p.topic.to_vec());
                    }
                }
                Some(joined) = loaders.join_next() => {
                    finished.push(joined.context("loader task")?.context("loader")?);
                }
            }
        }
        anyhow::Ok(())
    };
    timeout_at(deadline.into(), wait_sentinels)
        .await
        .with_context(|| {
            format!(
                "the broker did not confirm the {} retained messages within {:?}",
                args.retained, args.load_timeout
            )
        })??;
    let load_s = started.elapsed().as_secs_f64();

    // Every sentinel is in, so every loader has written everything: leave cleanly.
    while let Some(joined) = timeout_at(deadline.into(), loaders.join_next())
        .await
        .context("loaders did not finish")?
    {
        finished.push(joined.context("loader task")??);
    }
    for mut client in finished {
        let _ = client.writer.write_all(&mqtt::DISCONNECT).await;
    }
    let _ = checker.writer.write_all(&mqtt::DISCONNECT).await;
    Ok(load_s)
}

/// What the big subscriber saw.
struct Outcome {
    suback: Option<Instant>,
    granted: usize,
    refused: usize,
    retained: u64,
    other: u64,
    last_retained: Option<Instant>,
    end: SubscribeEnd,
    ended: Instant,
}

async fn subscribe_phase(
    client: Client,
    packet: &[u8],
    plan: &FilterPlan,
    args: &RetainedSubscribe,
    common: &Common,
    started: Instant,
) -> Outcome {
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let deadline = started + args.timeout;
    let mut out = Outcome {
        suback: None,
        granted: 0,
        refused: 0,
        retained: 0,
        other: 0,
        last_retained: None,
        end: SubscribeEnd::Timeout,
        ended: started,
    };
    // The packet may be larger than the socket buffer: a broker that stops reading can block
    // this write too.
    match timeout_at(deadline.into(), writer.write_all(packet)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            out.end = SubscribeEnd::Closed;
            out.ended = Instant::now();
            return out;
        }
        Err(_) => {
            out.ended = Instant::now();
            return out;
        }
    }
    // A PINGREQ every half keep-alive: this client sends nothing else during the phase.
    let ping_every = Duration::from_secs(u64::from(common.keepalive.max(2)) / 2);
    let mut ping = tokio::time::interval_at((started + ping_every).into(), ping_every);
    let mut last_activity = started;
    out.end = loop {
        if out.suback.is_some() && out.retained >= plan.expected {
            break SubscribeEnd::Complete;
        }
        let wait_until = match out.suback {
            Some(_) => deadline.min(last_activity + args.idle_timeout),
            None => deadline,
        };
        let frame = tokio::select! {
            frame = timeout_at(wait_until.into(), reader.next()) => frame,
            _ = ping.tick() => {
                if common.keepalive > 0 {
                    let _ = writer.write_all(&mqtt::PINGREQ).await;
                }
                continue;
            }
        };
        let frame = match frame {
            Err(_) if Instant::now() >= deadline => break SubscribeEnd::Timeout,
            Err(_) => break SubscribeEnd::Idle,
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None) | Err(_)) => break SubscribeEnd::Closed,
        };
        let now = Instant::now();
        if let Some(p) = frame.publish() {
            if p.retain {
                out.retained += 1;
                out.last_retained = Some(now);
            } else {
                out.other += 1;
            }
            last_activity = now;
        } else if let Some((_, codes)) = frame.suback() {
            out.suback = Some(now);
            out.granted = codes.iter().filter(|&&c| c <= 2).count();
            out.refused = codes.len() - out.granted;
            last_activity = now;
        }
    };
    out.ended = Instant::now();
    out
}

/// One answered bystander round trip.
struct RoundTrip {
    sent: Instant,
    received: Instant,
}

/// Everything the bystander measured.
struct BystanderLog {
    round_trips: Vec<RoundTrip>,
    /// When the still-unanswered message was sent, if one was outstanding at the stop.
    unanswered: Option<Instant>,
    stopped: Instant,
}

/// Connects the bystander on its own thread; returns once it is subscribed and running.
async fn start_bystander(
    common: &Common,
    args: &RetainedSubscribe,
    targets: &Targets,
    run_id: u32,
    stop: &CancellationToken,
) -> Result<dedicated::Dedicated<BystanderLog>> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let addr = targets.get(1);
    let (keep_alive_s, step, stop) = (common.keepalive, common.step_timeout, stop.clone());
    let pause = Duration::from_secs_f64(args.bystander_interval_ms.max(0.0) / 1000.0);
    let thread = dedicated::spawn("bystander", move || async move {
        let topic = format!("bystander/{run_id}");
        let setup = async {
            let mut c = client::connect(
                Protocol::V311,
                addr,
                &format!("lg{run_id}-bystander"),
                keep_alive_s,
                step,
                64 * 1024,
                None,
            )
            .await?;
            c.subscribe(&[&topic], 0, step).await?;
            anyhow::Ok(c)
        };
        let mut log = BystanderLog {
            round_trips: Vec::new(),
            unanswered: None,
            stopped: Instant::now(),
        };
        match setup.await {
            Ok(c) => {
                let _ = ready_tx.send(Ok(()));
                round_trips(c, &topic, pause, &stop, &mut log).await;
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.context("bystander")));
            }
        }
        log.stopped = Instant::now();
        log
    })?;
    timeout(step * 3, ready_rx)
        .await
        .context("bystander not ready in time")?
        .context("bystander thread ended")??;
    Ok(thread)
}

/// Round trips until stopped (or the connection fails), recording each into `log`.
async fn round_trips(
    client: Client,
    topic: &str,
    pause: Duration,
    stop: &CancellationToken,
    log: &mut BystanderLog,
) {
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    for seq in 0u64.. {
        let payload = seq.to_be_bytes();
        let sent = Instant::now();
        if writer
            .write_all(&mqtt::publish(Protocol::V311, topic, &payload, None, false))
            .await
            .is_err()
        {
            return;
        }
        log.unanswered = Some(sent);
        let answer = async {
            loop {
                match reader.next().await {
                    Ok(Some(frame)) => {
                        if frame.publish().is_some_and(|p| p.payload == payload) {
                            return true;
                        }
                    }
                    _ => return false,
                }
            }
        };
        let answered = tokio::select! {
            _ = stop.cancelled() => return,
            answered = answer => answered,
        };
        if !answered {
            return;
        }
        log.unanswered = None;
        log.round_trips.push(RoundTrip {
            sent,
            received: Instant::now(),
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = sleep(pause) => {}
        }
    }
}
