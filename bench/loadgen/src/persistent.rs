//! Persistent sessions (MQTT 3.1.1, clean session 0): QoS 1 publishing to sessions the broker
//! must keep, and a broker's restart with such sessions full of queued messages.
//!
//! - `persistent-publish`: subscriber j (of M) holds a persistent session subscribed to
//!   `p/<j>/#` at QoS 1, online (acknowledging every message) or, with `--offline`, gone after
//!   its SUBACK so that its session queues. Publisher i (of N) publishes to `p/<i % M>/<i>`,
//!   keeping `--window` QoS 1 messages unacknowledged: a new one for each PUBACK (closed loop,
//!   so the rate is what the broker acknowledges). After the warm-up a window measures PUBACKs
//!   per second and the broker's CPU per 1,000 acknowledged messages.
//! - `persistent-fill`: S sessions `<prefix><n>`, each subscribed to `f/<n>` at QoS 1 and then
//!   gone (DISCONNECT); then Q messages to each topic from a few windowed publishers, every one
//!   acknowledged: the broker holds S x Q queued messages.
//! - `persistent-resume`: run right after the broker was started again on the filled state.
//!   Connects every few milliseconds until the broker accepts, then resumes one session and
//!   waits for its queued messages; both times count from `--since` (the caller's clock when
//!   it started the broker), so that the broker's whole start is in them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, PersistentFill, PersistentPublish, PersistentResume};
use crate::client::{self, Client, Targets};
use crate::mqtt::{self, Protocol};
use crate::procfs::clock_ticks_per_second;
use crate::report::{FillReport, PersistentPublishReport, ResumeReport};
use crate::window::{self, Meter};

/// How long stopped clients get to wind down before the report is printed anyway.
const WIND_DOWN: Duration = Duration::from_secs(10);
/// How often `persistent-resume` tries to connect while the broker is starting.
const ACCEPT_POLL: Duration = Duration::from_millis(2);
/// After the first queued message: how long without another ends the wait for the rest.
const RESUME_QUIET: Duration = Duration::from_secs(2);

/// Counters shared by every connection of a run.
#[derive(Default)]
struct Counters {
    /// PUBACKs the publishers received.
    acked: AtomicU64,
    /// QoS 1 messages the online subscribers received (and acknowledged).
    delivered: AtomicU64,
    /// Connections the broker closed before the end.
    closed: AtomicU64,
}

pub async fn publish(common: &Common, args: &PersistentPublish) -> Result<PersistentPublishReport> {
    anyhow::ensure!(
        args.publishers > 0 && args.subscribers > 0 && args.window > 0,
        "--publishers, --subscribers and --window must be at least 1"
    );
    let targets = Targets::resolve(&common.host, common.port).await?;
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let run_id = std::process::id();
    let mut tasks = JoinSet::new();

    for j in 0..args.subscribers {
        let client_id = format!("lg{run_id}-psub-{j}");
        let (mut client, _) = client::connect_persistent(
            targets.get(j),
            &client_id,
            common.keepalive,
            common.step_timeout,
            64 * 1024,
        )
        .await?;
        client
            .subscribe(&[&format!("p/{j}/#")], 1, common.step_timeout)
            .await?;
        if args.offline {
            disconnect(client).await;
        } else {
            let (counters, stop) = (counters.clone(), stop.clone());
            let keep_alive_s = common.keepalive;
            tasks.spawn(async move { receive(client, keep_alive_s, &counters, &stop).await });
        }
    }
    eprintln!(
        "loadgen: {} persistent subscribers {}; connecting {} publishers",
        args.subscribers,
        if args.offline { "gone" } else { "online" },
        args.publishers
    );

    let payload = vec![b'x'; args.payload_size];
    let mut publishers = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        let client_id = format!("lg{run_id}-ppub-{i}");
        let client = client::connect(
            Protocol::V311,
            targets.get(i),
            &client_id,
            common.keepalive,
            common.step_timeout,
            4096,
            None,
        )
        .await?;
        publishers.push(client);
    }
    for (i, client) in publishers.into_iter().enumerate() {
        let topic = format!("p/{}/{i}", i % args.subscribers);
        let (counters, stop, payload) = (counters.clone(), stop.clone(), payload.clone());
        let window = args.window;
        tasks.spawn(async move {
            let topics = std::iter::repeat_with(|| topic.clone());
            if publish_windowed(client, window, &payload, topics, &counters, &stop)
                .await
                .is_err()
                && !stop.is_cancelled()
            {
                counters.closed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    eprintln!("loadgen: publishing; warm-up {:?}", args.warmup);

    tokio::time::sleep(args.warmup).await;
    let acked_start = counters.acked.load(Ordering::Relaxed);
    let rss_start = meter.broker_rss_kib();
    let peak = meter.sample_peak_rss(rss_start);
    let start = meter.mark();
    tokio::time::sleep(args.duration).await;
    let end = meter.mark();
    let acked_window = counters.acked.load(Ordering::Relaxed) - acked_start;
    let rss_peak = peak.finish().await;
    let rss_end = meter.broker_rss_kib();
    stop.cancel();
    let _ = timeout(WIND_DOWN, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;

    let window_s = window::seconds_between(&start, &end);
    let broker = meter.usage(&start, &end, (rss_start, rss_peak, rss_end));
    let broker_cpu_s_per_1000 = broker
        .as_ref()
        .filter(|_| acked_window > 0)
        .map(|b| b.cpu_s * 1000.0 / acked_window as f64);
    Ok(PersistentPublishReport {
        publishers: args.publishers,
        subscribers: args.subscribers,
        offline: args.offline,
        window: args.window,
        payload_size: args.payload_size,
        warmup_s: args.warmup.as_secs_f64(),
        window_s,
        acked_per_s: acked_window as f64 / window_s,
        broker_cpu_s_per_1000,
        broker,
        loadgen_cpu_percent: window::own_cpu_percent(&start, &end),
        acked_total: counters.acked.load(Ordering::Relaxed),
        delivered_total: counters.delivered.load(Ordering::Relaxed),
        closed_by_broker: counters.closed.load(Ordering::Relaxed),
    })
}

pub async fn fill(common: &Common, args: &PersistentFill) -> Result<FillReport> {
    anyhow::ensure!(
        args.sessions > 0 && args.publishers > 0 && args.window > 0,
        "--sessions, --publishers and --window must be at least 1"
    );
    let targets = Targets::resolve(&common.host, common.port).await?;
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let began = Instant::now();

    // The sessions: `connect_concurrency` workers take the next session number in turn.
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut workers = JoinSet::new();
    for _ in 0..common.connect_concurrency.clamp(1, args.sessions) {
        let (next, failed, targets) = (next.clone(), failed.clone(), targets.clone());
        let (prefix, sessions) = (args.client_prefix.clone(), args.sessions);
        let (keep_alive_s, step) = (common.keepalive, common.step_timeout);
        workers.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= sessions || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let result = async {
                    let client_id = format!("{prefix}{n}");
                    let (mut client, _) = client::connect_persistent(
                        targets.get(n),
                        &client_id,
                        keep_alive_s,
                        step,
                        256,
                    )
                    .await?;
                    client.subscribe(&[&format!("f/{n}")], 1, step).await?;
                    disconnect(client).await;
                    anyhow::Ok(())
                }
                .await;
                if let Err(e) = result {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e.context(format!("session {prefix}{n}")));
                }
            }
        });
    }
    while let Some(result) = workers.join_next().await {
        result.context("a session worker panicked")??;
    }
    let sessions_s = began.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {} sessions in {sessions_s:.1}s; queueing {} messages in each",
        args.sessions, args.queued
    );

    // The messages: publisher k takes the sessions n = k (mod P), Q rounds over its share.
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let payload = vec![b'x'; args.payload_size];
    let publishers = args.publishers.min(args.sessions);
    let queued_began = Instant::now();
    let mut tasks = JoinSet::new();
    for k in 0..publishers {
        let client_id = format!("lg{}-fill-{k}", std::process::id());
        let client = client::connect(
            Protocol::V311,
            targets.get(k),
            &client_id,
            common.keepalive,
            common.step_timeout,
            4096,
            None,
        )
        .await?;
        let (counters, stop, payload) = (counters.clone(), stop.clone(), payload.clone());
        let (sessions, queued, window) = (args.sessions, args.queued, args.window);
        tasks.spawn(async move {
            let topics = (0..queued)
                .flat_map(move |_| (k..sessions).step_by(publishers))
                .map(|n| format!("f/{n}"));
            publish_windowed(client, window, &payload, topics, &counters, &stop).await
        });
    }
    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result.context("a publisher panicked").and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e.context("queueing the messages"));
    }
    let queue_s = queued_began.elapsed().as_secs_f64();
    let acked = counters.acked.load(Ordering::Relaxed);
    Ok(FillReport {
        sessions: args.sessions,
        queued_per_session: args.queued,
        payload_size: args.payload_size,
        sessions_s,
        messages_acked: acked,
        queue_s,
        acked_per_s: acked as f64 / queue_s.max(1e-9),
        broker_rss_kib: meter.broker_rss_kib(),
    })
}

pub async fn resume(common: &Common, args: &PersistentResume) -> Result<ResumeReport> {
    let targets = Targets::resolve(&common.host, common.port).await?;
    let addr = targets.get(0);
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let since = UNIX_EPOCH + Duration::from_nanos(args.since_ns);
    let elapsed = || {
        SystemTime::now()
            .duration_since(since)
            .unwrap_or_default()
            .as_secs_f64()
    };
    let deadline = Instant::now() + args.timeout;

    // Until the broker accepts: a refused connect is retried after ACCEPT_POLL.
    let accepted_s = loop {
        if let Ok(Ok(probe)) = timeout(ACCEPT_POLL * 50, TcpStream::connect(addr)).await {
            let at = elapsed();
            drop(probe);
            break at;
        }
        if Instant::now() >= deadline {
            bail!(
                "the broker did not accept a connection within {:?}",
                args.timeout
            );
        }
        tokio::time::sleep(ACCEPT_POLL).await;
    };

    let client_id = format!("{}{}", args.client_prefix, args.session);
    let step = common
        .step_timeout
        .max(args.timeout.saturating_sub(deadline.elapsed()));
    let (client, session_present) =
        client::connect_persistent(addr, &client_id, common.keepalive, step, 64 * 1024)
            .await
            .context("resuming the session")?;
    let connack_s = elapsed();
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let (mut received, mut first_message_s, mut acks) = (0u64, None, Vec::new());
    loop {
        let wait = match first_message_s {
            None => deadline.saturating_duration_since(Instant::now()),
            Some(_) => RESUME_QUIET,
        };
        let Ok(frame) = timeout(wait, reader.next()).await else {
            break;
        };
        let Some(frame) = frame? else { break };
        if let Some(p) = frame.publish() {
            first_message_s.get_or_insert_with(&elapsed);
            received += 1;
            if let Some(id) = p.packet_id {
                acks.extend_from_slice(&mqtt::puback(id));
            }
        }
        if !reader.has_frame() && !acks.is_empty() {
            writer.write_all(&acks).await?;
            acks.clear();
        }
        if received >= args.expect {
            break;
        }
    }
    let all_s = elapsed();
    let _ = writer.write_all(&mqtt::DISCONNECT).await;
    Ok(ResumeReport {
        session: client_id,
        accepted_s,
        connack_s,
        session_present,
        first_message_s,
        received,
        all_received_s: (received >= args.expect).then_some(all_s),
        broker_rss_kib: meter.broker_rss_kib(),
    })
}

/// Publishes a QoS 1 message to each topic of `topics` in turn, keeping at most `window`
/// unacknowledged. Returns once every one is acknowledged, or when `stop` is cancelled; an
/// error if the connection fails or the broker closes it.
async fn publish_windowed(
    client: Client,
    window: usize,
    payload: &[u8],
    mut topics: impl Iterator<Item = String>,
    counters: &Counters,
    stop: &CancellationToken,
) -> Result<()> {
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let (mut in_flight, mut published, mut done) = (0usize, 0u64, false);
    let mut out = Vec::new();
    loop {
        while !done && in_flight < window {
            match topics.next() {
                Some(topic) => {
                    let id = (published % 65_535 + 1) as u16;
                    out.extend_from_slice(&mqtt::publish(
                        Protocol::V311,
                        &topic,
                        payload,
                        Some(id),
                        false,
                    ));
                    published += 1;
                    in_flight += 1;
                }
                None => done = true,
            }
        }
        if !out.is_empty() {
            writer.write_all(&out).await?;
            out.clear();
        }
        if done && in_flight == 0 {
            let _ = writer.write_all(&mqtt::DISCONNECT).await;
            return Ok(());
        }
        // Every PUBACK already buffered, then the window is topped up in one write.
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                frame = reader.next() => frame?,
            };
            let Some(frame) = frame else {
                bail!("the broker closed the connection")
            };
            if frame.puback().is_some() {
                in_flight = in_flight.saturating_sub(1);
                counters.acked.fetch_add(1, Ordering::Relaxed);
            }
            if !reader.has_frame() {
                break;
            }
        }
    }
}

/// An online persistent subscriber: acknowledges and counts every QoS 1 message until `stop`;
/// pings to keep the connection alive.
async fn receive(client: Client, keep_alive_s: u16, counters: &Counters, stop: &CancellationToken) {
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let every = Duration::from_secs(u64::from(keep_alive_s.max(2))) / 2;
    let mut tick = tokio::time::interval_at((Instant::now() + every).into(), every);
    let mut acks = Vec::new();
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick(), if keep_alive_s > 0 => {
                if writer.write_all(&mqtt::PINGREQ).await.is_err() {
                    break;
                }
                continue;
            }
            frame = reader.next() => frame,
        };
        let Ok(Some(frame)) = frame else {
            counters.closed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(p) = frame.publish() {
            counters.delivered.fetch_add(1, Ordering::Relaxed);
            if let Some(id) = p.packet_id {
                acks.extend_from_slice(&mqtt::puback(id));
            }
        }
        if !reader.has_frame() && !acks.is_empty() {
            if writer.write_all(&acks).await.is_err() {
                break;
            }
            acks.clear();
        }
    }
    let _ = writer.write_all(&mqtt::DISCONNECT).await;
}

/// Leaves a session: DISCONNECT, then waits (briefly) for the broker to close the connection,
/// so that the TIME_WAIT stays on the broker's side and a fill of 100,000 sessions does not
/// use up the generator's ephemeral ports.
async fn disconnect(client: Client) {
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    if writer.write_all(&mqtt::DISCONNECT).await.is_err() {
        return;
    }
    let _ = timeout(Duration::from_secs(1), async {
        while let Ok(Some(_)) = reader.next().await {}
    })
    .await;
}
