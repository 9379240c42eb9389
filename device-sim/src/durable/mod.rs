//! The `durable` scenario: does the broker keep what it acknowledged, across restarts and
//! crashes? Unlike the other scenarios it does not hold a fleet connected; it runs four phases
//! and checks the broker's answers against its own ground truth ([`ledger`]):
//!
//! 1. subscribe: every device connects with clean_session=false, subscribes QoS 1 to
//!    `devices/{client id}/cmd` and leaves (its session stays, offline);
//! 2. publish: `--publishers` connections send, round after round, to every device one QoS 1
//!    command message `{"run","id","seq"}` numbered 1..=`--messages` and one retained QoS 1
//!    state message `devices/{client id}/state` with the same number; up to `--window`
//!    PUBLISHes in flight each, `--publish-rate` per second in all (0: as fast as
//!    acknowledged). Only messages whose PUBACK arrived enter the ground truth;
//! 3. drain: every device comes back with clean_session=false and reads its queue
//!    (acknowledging each message) until every acknowledged message has come and nothing later
//!    can;
//! 4. retained: one clean connection subscribes to `devices/+/state` and reads every device's
//!    retained value.
//!
//! The broker may go away at any moment (restarted by the operator or a test, with SIGKILL or
//! SIGTERM): every connection retries for up to `--broker-wait` seconds and goes on where it
//! was; messages in flight when a connection died are not counted and not sent again. The
//! payload carries a run id, so sessions left over from earlier runs with the same client ids
//! do not confuse the check (their messages are counted as `foreign`).
//!
//! [`wire`] is the MQTT 3.1.1 connection the phases use.

mod ledger;
mod wire;

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::cli::RunArgs;
use crate::credentials::Credentials;
use crate::device::random_u64;
use ledger::{DeviceSeen, DeviceTruth, Verdict};
use wire::{Conn, Dial, WireError};

/// Devices connected at once in the subscribe and drain phases (besides `--rate`).
const CONCURRENCY: usize = 512;
/// Drain: how long a device waits for an acknowledged message still missing.
const MISSING_WAIT: Duration = Duration::from_secs(5);
/// Drain: how long a device that has every acknowledged message waits for later,
/// unacknowledged ones that may have been made durable.
const QUIET: Duration = Duration::from_millis(300);
/// Retained phase: silence after which no more retained values are expected.
const RETAINED_WAIT: Duration = Duration::from_secs(5);
/// First and longest pause between attempts to reach an absent broker.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));
/// The wildcard filter over every device's state topic.
const STATE_FILTER: &str = "devices/+/state";

/// The phases, as the status line names them.
const PHASES: [&str; 5] = ["subscribe", "publish", "drain", "retained", "done"];

/// The payload of every message of the scenario.
#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    /// The run that sent it.
    run: String,
    /// The device it is for.
    id: String,
    /// Its number (per device, from 1).
    seq: u32,
}

/// Live counters, for the status line and the summary.
#[derive(Debug, Default)]
struct Counters {
    /// Index into [`PHASES`].
    phase: AtomicU8,
    subscribed: AtomicU64,
    published: AtomicU64,
    acknowledged: AtomicU64,
    state_acknowledged: AtomicU64,
    drained: AtomicU64,
    /// Connections that failed or were lost and had to be made again.
    connection_losses: AtomicU64,
    /// Messages of other runs found in the devices' sessions.
    foreign: AtomicU64,
}

/// What every phase needs: the options, the run id and the counters.
struct Ctx {
    /// `host:port` pairs; device `i` uses pair `i % len`.
    addresses: Vec<String>,
    prefix: String,
    start_number: u64,
    count: usize,
    messages: u32,
    publishers: usize,
    window: usize,
    /// PUBLISHes per second over all publishers (0: unlimited).
    publish_rate: f64,
    /// Connects per second in the subscribe and drain phases.
    rate: u32,
    credentials: Credentials,
    timeout: Duration,
    broker_wait: Duration,
    /// Random per run, in every payload.
    run_id: String,
    counters: Counters,
    /// The first connection error, for the report.
    first_error: Mutex<Option<String>>,
}

impl Ctx {
    fn client_id(&self, i: usize) -> String {
        format!("{}{}", self.prefix, self.start_number + i as u64)
    }

    fn dial(&self, i: usize, client_id: String, clean: bool) -> Dial {
        Dial {
            address: self.addresses[i % self.addresses.len()].clone(),
            login: self.credentials.for_device(&client_id),
            client_id,
            clean,
            timeout: self.timeout,
        }
    }

    fn lost(&self, what: &str, error: &WireError) {
        self.counters
            .connection_losses
            .fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert_with(|| format!("{what}: {error}"));
    }

    /// Connects, retrying while the broker is away, for up to `--broker-wait`.
    async fn open(&self, dial: &Dial) -> Result<(Conn, bool)> {
        let since = Instant::now();
        let mut pause = BACKOFF.0;
        loop {
            match Conn::open(dial).await {
                Ok(open) => return Ok(open),
                Err(WireError::Refused(code))
                    if code != rumqttc::mqttbytes::v4::ConnectReturnCode::ServiceUnavailable =>
                {
                    bail!(
                        "{}: the broker refused the connection ({code:?}); check the credentials",
                        dial.client_id
                    )
                }
                Err(e) if since.elapsed() >= self.broker_wait => bail!(
                    "{}: broker at {} unreachable for {:?} (--broker-wait): {e}",
                    dial.client_id,
                    dial.address,
                    self.broker_wait
                ),
                Err(e) => {
                    self.lost(&dial.address, &e);
                    // Jittered, so that a fleet does not come back in lockstep.
                    let jitter = pause.mul_f64((random_u64() % 1000) as f64 / 1000.0);
                    tokio::time::sleep(pause / 2 + jitter / 2).await;
                    pause = (pause * 2).min(BACKOFF.1);
                }
            }
        }
    }

    fn payload(&self, id: &str, seq: u32) -> Vec<u8> {
        serde_json::to_vec(&Payload {
            run: self.run_id.clone(),
            id: id.to_owned(),
            seq,
        })
        .unwrap_or_default()
    }

    /// The sequence number of a message of this run for `id`, if it is one.
    fn seq_of(&self, id: &str, payload: &[u8]) -> Option<u32> {
        serde_json::from_slice::<Payload>(payload)
            .ok()
            .filter(|p| p.run == self.run_id && p.id == id)
            .map(|p| p.seq)
    }
}

/// Durations of the phases, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Every device subscribed and offline.
    pub subscribe_s: f64,
    /// Every message published.
    pub publish_s: f64,
    /// Every device's queue read.
    pub drain_s: f64,
    /// Every retained value read.
    pub retained_s: f64,
}

/// The summary of a `durable` run (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Always `durable`.
    pub scenario: String,
    /// The run id in every payload.
    pub run_id: String,
    /// --count.
    pub target: u64,
    /// --messages: command messages per device.
    pub messages_per_device: u32,
    /// --publishers.
    pub publishers: usize,
    /// PUBLISH packets written (command and state messages, acknowledged or not).
    pub published: u64,
    /// Retained state messages acknowledged (the command messages are `acknowledged`).
    pub state_acknowledged: u64,
    /// Connections lost or refused and made again (a broker restart costs one per connection
    /// open at the time, and one per failed attempt while it is away).
    pub connection_losses: u64,
    /// The first connection error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Messages of earlier runs found in the devices' sessions.
    pub foreign: u64,
    /// Acknowledged command messages per second of the publish phase.
    pub acknowledged_per_s: f64,
    /// How long each phase took.
    pub phases: Phases,
    /// Wall time of the whole run, in seconds.
    pub elapsed_s: f64,
    /// The broker kept every promise (nothing missing, out of order or stale).
    pub ok: bool,
    /// The counts of the check.
    #[serde(flatten)]
    pub verdict: Verdict,
}

impl Summary {
    /// The human summary line.
    pub fn line(&self) -> String {
        let v = &self.verdict;
        format!(
            "summary scenario=durable devices={} messages_per_device={} published={} \
             acknowledged={} state_acknowledged={} delivered={} duplicates={} missing={} \
             out_of_order={} unacknowledged_delivered={} retained_checked={} retained_stale={} \
             sessions_lost={} connection_losses={} foreign={} subscribe_s={:.1} publish_s={:.1} \
             drain_s={:.1} retained_s={:.1} elapsed_s={:.1}",
            v.devices,
            self.messages_per_device,
            self.published,
            v.acknowledged,
            self.state_acknowledged,
            v.delivered,
            v.duplicates,
            v.missing,
            v.out_of_order,
            v.unacknowledged_delivered,
            v.retained_checked,
            v.retained_stale,
            v.sessions_lost,
            self.connection_losses,
            self.foreign,
            self.phases.subscribe_s,
            self.phases.publish_s,
            self.phases.drain_s,
            self.phases.retained_s,
            self.elapsed_s,
        )
    }
}

/// Runs the scenario and prints its status lines; returns the summary (its `ok` says whether
/// the check passed). `shutdown` ends it early with an error.
pub async fn run(args: &RunArgs, shutdown: &CancellationToken) -> Result<Summary> {
    let started = Instant::now();
    let addresses = args
        .host
        .iter()
        .flat_map(|h| args.port.iter().map(move |p| format!("{h}:{p}")))
        .collect();
    let ctx = Arc::new(Ctx {
        addresses,
        prefix: args.prefix.clone(),
        start_number: args.start_number,
        count: usize::try_from(args.count).context("--count")?,
        messages: args.messages,
        publishers: usize::try_from(args.publishers).context("--publishers")?,
        window: usize::try_from(args.window).context("--window")?,
        publish_rate: args.publish_rate,
        rate: args.rate,
        credentials: args.credentials()?,
        timeout: Duration::from_secs(args.connect_timeout),
        broker_wait: Duration::from_secs_f64(args.broker_wait),
        run_id: format!("{:016x}", random_u64()),
        counters: Counters::default(),
        first_error: Mutex::new(None),
    });
    let status_stop = CancellationToken::new();
    let status = tokio::spawn(status_lines(ctx.clone(), started, status_stop.clone()));
    let result = tokio::select! {
        r = phases(&ctx, args.truth.as_deref(), started) => r,
        () = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted")),
    };
    status_stop.cancel();
    let _ = status.await;
    result
}

async fn phases(ctx: &Arc<Ctx>, truth_file: Option<&Path>, started: Instant) -> Result<Summary> {
    let c = &ctx.counters;
    let mut phases = Phases::default();

    let t = Instant::now();
    for_each_device(ctx, |ctx, i| async move { subscribe(&ctx, i).await }).await?;
    phases.subscribe_s = t.elapsed().as_secs_f64();

    c.phase.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let mut publishers = JoinSet::new();
    for p in 0..ctx.publishers.min(ctx.count) {
        let ctx = ctx.clone();
        publishers.spawn(async move { (p, publish(&ctx, p).await) });
    }
    let mut truth = vec![DeviceTruth::default(); ctx.count];
    while let Some(done) = publishers.join_next().await {
        let (p, result) = done.context("a publisher panicked")?;
        for (j, t) in result?.into_iter().enumerate() {
            truth[p + j * ctx.publishers] = t;
        }
    }
    phases.publish_s = t.elapsed().as_secs_f64();
    let truth = Arc::new(truth);

    c.phase.store(2, Ordering::Relaxed);
    let t = Instant::now();
    let shared = truth.clone();
    let mut seen = for_each_device(ctx, move |ctx, i| {
        let truth = shared.clone();
        async move { drain(&ctx, i, &truth[i]).await }
    })
    .await?;
    phases.drain_s = t.elapsed().as_secs_f64();

    c.phase.store(3, Ordering::Relaxed);
    let t = Instant::now();
    let wanted: Vec<bool> = truth.iter().map(|t| t.state_acked > 0).collect();
    for (i, value) in retained(ctx, &wanted).await?.into_iter().enumerate() {
        seen[i].retained = value;
    }
    phases.retained_s = t.elapsed().as_secs_f64();
    c.phase.store(4, Ordering::Relaxed);

    let mut verdict = Verdict::default();
    for (i, (t, s)) in truth.iter().zip(&seen).enumerate() {
        verdict.add(&ctx.client_id(i), t, s);
    }
    if let Some(path) = truth_file {
        write_truth(ctx, path, &truth, &seen)?;
    }
    Ok(Summary {
        scenario: "durable".to_owned(),
        run_id: ctx.run_id.clone(),
        target: ctx.count as u64,
        messages_per_device: ctx.messages,
        publishers: ctx.publishers,
        published: c.published.load(Ordering::Relaxed),
        state_acknowledged: c.state_acknowledged.load(Ordering::Relaxed),
        connection_losses: c.connection_losses.load(Ordering::Relaxed),
        first_error: ctx
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        foreign: c.foreign.load(Ordering::Relaxed),
        acknowledged_per_s: verdict.acknowledged as f64 / phases.publish_s.max(1e-9),
        phases,
        elapsed_s: started.elapsed().as_secs_f64(),
        ok: verdict.ok(),
        verdict,
    })
}

/// One status line per second until `stop`.
async fn status_lines(ctx: Arc<Ctx>, started: Instant, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = &ctx.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        println!(
            "t={:.0} phase={} subscribed={} published={} acknowledged={} state_acknowledged={} \
             drained={} connection_losses={}",
            started.elapsed().as_secs_f64(),
            PHASES[usize::from(c.phase.load(Ordering::Relaxed)).min(PHASES.len() - 1)],
            load(&c.subscribed),
            load(&c.published),
            load(&c.acknowledged),
            load(&c.state_acknowledged),
            load(&c.drained),
            load(&c.connection_losses),
        );
    }
}

/// Runs `f` for every device, `--rate` starts per second and at most [`CONCURRENCY`] at once;
/// returns the results in device order, or the first error.
async fn for_each_device<F, Fut, T>(ctx: &Arc<Ctx>, f: F) -> Result<Vec<T>>
where
    F: Fn(Arc<Ctx>, usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(ctx.rate)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut results: Vec<Option<T>> = (0..ctx.count).map(|_| None).collect();
    let mut keep = |done: Result<(usize, Result<T>), tokio::task::JoinError>| -> Result<()> {
        let (i, result) = done.context("a device task panicked")?;
        results[i] = Some(result?);
        Ok(())
    };
    for i in 0..ctx.count {
        tick.tick().await;
        let slot = slots.clone().acquire_owned().await?;
        let work = f(ctx.clone(), i);
        tasks.spawn(async move {
            let result = work.await;
            drop(slot);
            (i, result)
        });
        while let Some(done) = tasks.try_join_next() {
            keep(done)?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        keep(done)?;
    }
    Ok(results.into_iter().flatten().collect())
}

/// Phase 1 for device `i`: a persistent session subscribed to its command topic, then offline.
async fn subscribe(ctx: &Ctx, i: usize) -> Result<()> {
    let id = ctx.client_id(i);
    let filter = format!("devices/{id}/cmd");
    let dial = ctx.dial(i, id, false);
    loop {
        let (mut conn, _) = ctx.open(&dial).await?;
        let mut sub = Subscribe::new(filter.as_str(), QoS::AtLeastOnce);
        sub.pkid = 1;
        let answer = match conn.send(&Packet::Subscribe(sub)).await {
            Ok(()) => tokio::time::timeout(ctx.timeout, conn.recv())
                .await
                .unwrap_or(Err(WireError::Timeout(ctx.timeout))),
            Err(e) => Err(e),
        };
        match answer {
            Ok(Packet::SubAck(ack)) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    bail!(
                        "{}: the broker refused the subscription to {filter}",
                        dial.client_id
                    );
                }
                conn.close().await;
                ctx.counters.subscribed.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Ok(other) => bail!("{}: expected SUBACK, got {other:?}", dial.client_id),
            Err(e) => ctx.lost(&dial.address, &e),
        }
    }
}

/// Phase 2 for publisher `p`: the messages of devices `p`, `p + P`, `p + 2P`, ... Returns
/// their ground truth, in that order.
async fn publish(ctx: &Ctx, p: usize) -> Result<Vec<DeviceTruth>> {
    let devices: Vec<(usize, String)> = (p..ctx.count)
        .step_by(ctx.publishers)
        .map(|i| (i, ctx.client_id(i)))
        .collect();
    let mut truth = vec![DeviceTruth::default(); devices.len()];
    // Message k: round k / 2n + 1 of device (k / 2) % n, its command (k even) or state.
    let total = 2 * u64::from(ctx.messages) * devices.len() as u64;
    let gap = (ctx.publish_rate > 0.0)
        .then(|| Duration::from_secs_f64(ctx.publishers as f64 / ctx.publish_rate));
    let dial = ctx.dial(
        p,
        format!("{}durable-pub-{p}-{}", ctx.prefix, ctx.run_id),
        true,
    );
    let c = &ctx.counters;
    let mut next = 0u64;
    let mut next_at = tokio::time::Instant::now();
    let mut pkid = 0u16;
    'connection: loop {
        let (mut conn, _) = ctx.open(&dial).await?;
        // Packet id -> message number, for the PUBLISHes awaiting their PUBACK.
        let mut in_flight: HashMap<u16, u64> = HashMap::new();
        loop {
            while in_flight.len() < ctx.window
                && next < total
                && gap.is_none_or(|_| tokio::time::Instant::now() >= next_at)
            {
                let pair = usize::try_from(next / 2)?;
                let (j, seq) = (pair % devices.len(), (pair / devices.len()) as u32 + 1);
                let id = &devices[j].1;
                let state = next % 2 == 1;
                let topic = format!("devices/{id}/{}", if state { "state" } else { "cmd" });
                let mut publish = Publish::new(topic, QoS::AtLeastOnce, ctx.payload(id, seq));
                publish.retain = state;
                pkid = pkid % u16::MAX + 1;
                publish.pkid = pkid;
                if let Err(e) = conn.send(&Packet::Publish(publish)).await {
                    ctx.lost(&dial.address, &e);
                    continue 'connection;
                }
                if !state {
                    truth[j].sent_max = seq;
                }
                in_flight.insert(pkid, next);
                next += 1;
                c.published.fetch_add(1, Ordering::Relaxed);
                if let Some(gap) = gap {
                    next_at = next_at.max(tokio::time::Instant::now() - gap) + gap;
                }
            }
            if next == total && in_flight.is_empty() {
                conn.close().await;
                return Ok(truth);
            }
            let wake =
                (in_flight.len() < ctx.window && next < total && gap.is_some()).then_some(next_at);
            let answer = tokio::select! {
                answer = tokio::time::timeout(ctx.timeout, conn.recv()) => answer,
                () = tokio::time::sleep_until(wake.unwrap_or(next_at)), if wake.is_some() => continue,
            };
            match answer {
                Ok(Ok(Packet::PubAck(ack))) => {
                    let Some(k) = in_flight.remove(&ack.pkid) else {
                        continue;
                    };
                    let pair = usize::try_from(k / 2)?;
                    let (j, seq) = (pair % devices.len(), (pair / devices.len()) as u32 + 1);
                    if k % 2 == 1 {
                        truth[j].state_acked = truth[j].state_acked.max(seq);
                        c.state_acknowledged.fetch_add(1, Ordering::Relaxed);
                    } else {
                        truth[j].acked.push(seq);
                        c.acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Ok(_)) => {}
                Err(_) if in_flight.is_empty() => {}
                Ok(Err(e)) => {
                    ctx.lost(&dial.address, &e);
                    continue 'connection;
                }
                Err(_) => {
                    ctx.lost(&dial.address, &WireError::Timeout(ctx.timeout));
                    continue 'connection;
                }
            }
        }
    }
}

/// Phase 3 for device `i`: back with clean_session=false, reads its queue.
async fn drain(ctx: &Ctx, i: usize, truth: &DeviceTruth) -> Result<DeviceSeen> {
    let id = ctx.client_id(i);
    let dial = ctx.dial(i, id.clone(), false);
    let mut seen = DeviceSeen::default();
    let mut got = std::collections::HashSet::new();
    let mut first = true;
    loop {
        let (mut conn, present) = ctx.open(&dial).await?;
        if std::mem::take(&mut first) {
            seen.session_present = present;
        }
        let ended = loop {
            let wait = if !truth.acked.iter().all(|s| got.contains(s)) {
                MISSING_WAIT
            } else if truth.sent_max == 0 || got.contains(&truth.sent_max) {
                // Nothing later than the last message sent can come.
                break Ok(());
            } else {
                QUIET
            };
            let publish = match tokio::time::timeout(wait, conn.recv()).await {
                Err(_) => break Ok(()),
                Ok(Err(e)) => break Err(e),
                Ok(Ok(Packet::Publish(publish))) => publish,
                Ok(Ok(_)) => continue,
            };
            if publish.qos != QoS::AtMostOnce {
                if let Err(e) = conn.send(&Packet::PubAck(PubAck::new(publish.pkid))).await {
                    break Err(e);
                }
            }
            match ctx.seq_of(&id, &publish.payload) {
                Some(seq) => {
                    seen.delivered.push(seq);
                    got.insert(seq);
                }
                None => {
                    ctx.counters.foreign.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        match ended {
            Ok(()) => {
                conn.close().await;
                ctx.counters.drained.fetch_add(1, Ordering::Relaxed);
                return Ok(seen);
            }
            Err(e) => ctx.lost(&dial.address, &e),
        }
    }
}

/// Phase 4: every device's retained state value of this run, read by one clean subscriber to
/// [`STATE_FILTER`], until every `wanted` device (one with an acknowledged state) has one or
/// nothing more comes.
async fn retained(ctx: &Ctx, wanted: &[bool]) -> Result<Vec<Option<u32>>> {
    let expected = wanted.iter().filter(|w| **w).count();
    let index: HashMap<String, usize> = (0..ctx.count).map(|i| (ctx.client_id(i), i)).collect();
    let mut values = vec![None; ctx.count];
    let dial = ctx.dial(
        0,
        format!("{}durable-check-{}", ctx.prefix, ctx.run_id),
        true,
    );
    'connection: loop {
        let (mut conn, _) = ctx.open(&dial).await?;
        let mut sub = Subscribe::new(STATE_FILTER, QoS::AtLeastOnce);
        sub.pkid = 1;
        if let Err(e) = conn.send(&Packet::Subscribe(sub)).await {
            ctx.lost(&dial.address, &e);
            continue;
        }
        let mut have = values
            .iter()
            .zip(wanted)
            .filter(|(v, w)| v.is_some() && **w)
            .count();
        while have < expected {
            let publish = match tokio::time::timeout(RETAINED_WAIT, conn.recv()).await {
                Err(_) => break,
                Ok(Err(e)) => {
                    ctx.lost(&dial.address, &e);
                    continue 'connection;
                }
                Ok(Ok(Packet::Publish(publish))) => publish,
                Ok(Ok(_)) => continue,
            };
            if publish.qos != QoS::AtMostOnce {
                if let Err(e) = conn.send(&Packet::PubAck(PubAck::new(publish.pkid))).await {
                    ctx.lost(&dial.address, &e);
                    continue 'connection;
                }
            }
            let Some(i) = publish
                .topic
                .strip_prefix("devices/")
                .and_then(|t| t.strip_suffix("/state"))
                .and_then(|id| index.get(id).copied())
            else {
                continue;
            };
            if let Some(seq) = ctx.seq_of(&ctx.client_id(i), &publish.payload) {
                if values[i].is_none() && wanted[i] {
                    have += 1;
                }
                values[i] = values[i].max(Some(seq));
            }
        }
        conn.close().await;
        return Ok(values);
    }
}

/// One device per line of the file: what was acknowledged and what came.
fn write_truth(ctx: &Ctx, path: &Path, truth: &[DeviceTruth], seen: &[DeviceSeen]) -> Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (i, (t, s)) in truth.iter().zip(seen).enumerate() {
        let line = serde_json::json!({
            "scenario": "durable",
            "run": ctx.run_id,
            "client_id": ctx.client_id(i),
            "acknowledged": t.acked,
            "sent_max": t.sent_max,
            "state_acknowledged": t.state_acked,
            "session_present": s.session_present,
            "delivered": s.delivered,
            "retained": s.retained,
        });
        writeln!(out, "{line}")?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}
