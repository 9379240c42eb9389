//! Fan-in: many publishers, one subscriber.
//!
//! Publisher i publishes QoS 0 messages to `in/<i>`, as fast as its socket takes (a buffer of
//! identical packets written again and again) or at its share of `--rate`; or QoS 1 messages
//! at its share of `--rate`, at most [`QOS1_WINDOW`] of them unacknowledged. One subscriber on
//! `in/#` (at the same QoS, acknowledging each message) counts every PUBLISH it reads. After
//! the window the publishers stop and the subscriber reads what is still on its way, so that
//! the run's totals of written and delivered messages can be compared. The subscriber runs on its own thread with its own
//! runtime, so that a thousand busy publisher tasks cannot starve it: what it counts is what
//! the broker delivered, not what the generator found time to read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, FanIn};
use crate::client::{self, Client, Targets};
use crate::dedicated::{self, Dedicated};
use crate::mqtt::{self, FrameReader, Protocol};
use crate::procfs::clock_ticks_per_second;
use crate::report::FanInReport;
use crate::sockets::Queues;
use crate::window::{self, Meter};

/// Bytes per write of an unthrottled publisher: enough packets to keep syscalls few.
const BATCH_BYTES: usize = 16 * 1024;
/// A rate-limited publisher writes what it owes on this tick.
const RATE_TICK: Duration = Duration::from_millis(10);
/// How long stopped clients get to wind down before the report is printed anyway.
const WIND_DOWN: Duration = Duration::from_secs(10);
/// QoS 1 messages a publisher leaves unacknowledged at most (below any broker's receive
/// maximum); a publisher whose window is full skips its turn.
const QOS1_WINDOW: u64 = 16;
/// After the publishers stop: how long the subscriber may take to receive what is on its way,
/// and how long without a message ends that wait early.
const DRAIN: Duration = Duration::from_secs(5);
const DRAIN_QUIET: Duration = Duration::from_secs(1);

/// Counters shared by every connection of the run.
#[derive(Default)]
struct Counters {
    /// Messages written by all publishers: whole packets the kernel accepted.
    written: AtomicU64,
    /// PUBACKs the publishers received (QoS 1).
    acked: AtomicU64,
    /// PUBLISH packets the subscriber received (topic under in/, payload of the sent size).
    delivered: AtomicU64,
    /// PUBLISH packets with another topic or payload size (a framing bug would show here).
    unexpected: AtomicU64,
    publishers_closed: AtomicU64,
    subscriber_closed: AtomicBool,
}

pub async fn run(common: &Common, args: &FanIn) -> Result<FanInReport> {
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0, "--rate must be positive");
    }
    anyhow::ensure!(
        args.qos == 0 || args.rate.is_some(),
        "--qos 1 needs --rate (publishers wait for their PUBACKs)"
    );
    let protocol = common.protocol();
    let targets = Targets::resolve(&common.host, common.port).await?;
    let meter = Meter::new(common.broker_pid, clock_ticks_per_second());
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    // Cancelled at the end of the window: the publishers stop writing, the subscriber reads on.
    let publishing = stop.child_token();
    let run_id = std::process::id();

    let subscriber = start_subscriber(
        targets.get(0),
        common,
        args.payload_size,
        args.qos,
        run_id,
        &counters,
        &stop,
    )
    .await?;
    eprintln!(
        "loadgen: subscriber on in/# ready; connecting {} publishers",
        args.publishers
    );

    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let mut publishers = JoinSet::new();
    let (ready_tx, mut ready_rx) = mpsc::channel(args.publishers);
    let connect_slots = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let payload = vec![b'x'; args.payload_size];
    let mut packet_bytes = 0usize;
    for i in 0..args.publishers {
        let packet_id = (args.qos > 0).then_some(1);
        let packet = mqtt::publish(protocol, &format!("in/{i}"), &payload, packet_id, false);
        packet_bytes += packet.len();
        let publisher = Publisher {
            index: i,
            addr: targets.get(i + 1),
            client_id: format!("lg{run_id}-pub-{i}"),
            protocol,
            packet_id_at: packet_id.and_then(|_| mqtt::publish_packet_id_at(&packet)),
            packet,
            rate: args.rate.map(|r| r / args.publishers as f64),
            offset: RATE_TICK.mul_f64(i as f64 / args.publishers as f64),
            keep_alive_s: common.keepalive,
            step_timeout: common.step_timeout,
            send_buffer: (args.send_buffer > 0).then_some(args.send_buffer),
        };
        let (slots, ready, go, stop, counters) = (
            connect_slots.clone(),
            ready_tx.clone(),
            go_rx.clone(),
            (stop.clone(), publishing.clone()),
            counters.clone(),
        );
        publishers.spawn(async move { publisher.run(slots, ready, go, stop, counters).await });
    }
    drop(ready_tx);
    let mut connected = 0;
    while connected < args.publishers {
        match ready_rx.recv().await {
            Some(Ok(())) => connected += 1,
            Some(Err(e)) => {
                stop.cancel();
                return Err(e.context(format!("only {connected} publishers connected")));
            }
            None => {
                stop.cancel();
                return Err(anyhow!(
                    "publishers ended before connecting ({connected} connected)"
                ));
            }
        }
    }

    let rss_start = meter.broker_rss_kib();
    let peak = meter.sample_peak_rss(rss_start);
    let go = Instant::now();
    let _ = go_tx.send(Some(go));
    eprintln!(
        "loadgen: {} publishers connected; warm-up {:?}, then a {:?} window",
        args.publishers, args.warmup, args.duration
    );
    sleep_until((go + args.warmup).into()).await;

    let queues_start = queues(common.port);
    let start = meter.mark();
    let written0 = counters.written.load(Ordering::Relaxed);
    let delivered0 = counters.delivered.load(Ordering::Relaxed);
    let mut each_second = Vec::new();
    let (mut last, mut next) = (delivered0, start.at + Duration::from_secs(1));
    let window_end = start.at + args.duration;
    while next <= window_end {
        sleep_until(next.into()).await;
        let now = counters.delivered.load(Ordering::Relaxed);
        each_second.push(now - last);
        last = now;
        next += Duration::from_secs(1);
    }
    sleep_until(window_end.into()).await;
    let end = meter.mark();
    let queues_end = queues(common.port);
    let written = counters.written.load(Ordering::Relaxed) - written0;
    // What the broker read: written, less what piled up in the socket queues meanwhile.
    let mean_packet = packet_bytes as f64 / args.publishers as f64;
    let read = queues_start.zip(queues_end).map(|(q0, q1)| {
        let piled_up = q1.total() as f64 - q0.total() as f64;
        (written as f64 - piled_up / mean_packet).max(0.0)
    });
    let delivered = counters.delivered.load(Ordering::Relaxed) - delivered0;
    let rss_end = meter.broker_rss_kib();
    let rss_peak = peak.finish().await;

    // The drain: no more publishing; wait for what is on its way to the subscriber.
    publishing.cancel();
    let drain_start = Instant::now();
    let (mut seen, mut seen_at) = (counters.delivered.load(Ordering::Relaxed), drain_start);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let delivered = counters.delivered.load(Ordering::Relaxed);
        if delivered >= counters.written.load(Ordering::Relaxed)
            || drain_start.elapsed() >= DRAIN
            || (delivered == seen && seen_at.elapsed() >= DRAIN_QUIET)
        {
            break;
        }
        if delivered != seen {
            (seen, seen_at) = (delivered, Instant::now());
        }
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let written_total = counters.written.load(Ordering::Relaxed);
    let delivered_total = counters.delivered.load(Ordering::Relaxed);

    stop.cancel();
    if timeout(WIND_DOWN, async {
        while publishers.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        publishers.abort_all();
    }
    if let Err(e) = subscriber.join(WIND_DOWN).await {
        eprintln!("loadgen: subscriber: {e:#}");
    }

    let window_s = window::seconds_between(&start, &end);
    let broker = meter.usage(&start, &end, (rss_start, rss_peak, rss_end));
    Ok(FanInReport {
        publishers: args.publishers,
        payload_size: args.payload_size,
        protocol: protocol.level(),
        qos: args.qos,
        rate: args.rate,
        warmup_s: args.warmup.as_secs_f64(),
        window_s,
        written_per_s: written as f64 / window_s,
        delivered_per_s: delivered as f64 / window_s,
        delivered_min_per_s: each_second.iter().copied().min().unwrap_or(0),
        delivered_max_per_s: each_second.iter().copied().max().unwrap_or(0),
        delivered_each_second: each_second,
        read_by_broker_per_s: read.map(|r| r / window_s),
        dropped_share: match read {
            Some(r) if r > 0.0 => (1.0 - delivered as f64 / r).max(0.0),
            _ => 0.0,
        },
        queued_bytes_start: queues_start,
        queued_bytes_end: queues_end,
        broker_cpu_us_per_delivered: broker
            .as_ref()
            .filter(|_| delivered > 0)
            .map(|b| b.cpu_s * 1e6 / delivered as f64),
        broker,
        loadgen_cpu_percent: window::own_cpu_percent(&start, &end),
        publishers_closed_by_broker: counters.publishers_closed.load(Ordering::Relaxed),
        subscriber_closed_by_broker: counters.subscriber_closed.load(Ordering::Relaxed),
        unexpected_messages: counters.unexpected.load(Ordering::Relaxed),
        written_total,
        acked_total: counters.acked.load(Ordering::Relaxed),
        delivered_total,
        undelivered_total: written_total as i64 - delivered_total as i64,
        drain_s,
    })
}

/// The socket queues to the broker's port, or `None` (with a warning) if unreadable.
fn queues(port: u16) -> Option<Queues> {
    Queues::read(port)
        .map_err(|e| eprintln!("loadgen: socket queues unreadable: {e:#}"))
        .ok()
}

/// One publisher connection.
struct Publisher {
    index: usize,
    addr: SocketAddr,
    client_id: String,
    protocol: Protocol,
    /// The encoded PUBLISH, identical for every message of this publisher but for the packet
    /// id of a QoS 1 message.
    packet: Vec<u8>,
    /// Where the packet id lies in `packet` (QoS 1), `None` at QoS 0.
    packet_id_at: Option<usize>,
    /// Messages per second of this publisher, `None` for unthrottled.
    rate: Option<f64>,
    /// Start offset within a rate tick, so that publishers do not all write at once.
    offset: Duration,
    keep_alive_s: u16,
    step_timeout: Duration,
    /// SO_SNDBUF of the socket: see `--send-buffer`.
    send_buffer: Option<u32>,
}

impl Publisher {
    async fn run(
        self,
        connect_slots: Arc<Semaphore>,
        ready: mpsc::Sender<Result<()>>,
        mut go: watch::Receiver<Option<Instant>>,
        (stop, publishing): (CancellationToken, CancellationToken),
        counters: Arc<Counters>,
    ) {
        let connected = {
            let _slot = connect_slots.acquire().await;
            client::connect(
                self.protocol,
                self.addr,
                &self.client_id,
                self.keep_alive_s,
                self.step_timeout,
                64,
                self.send_buffer,
            )
            .await
            .with_context(|| format!("publisher {}", self.index))
        };
        let Client {
            mut reader,
            mut writer,
            ..
        } = match connected {
            Ok(client) => {
                let _ = ready.send(Ok(())).await;
                client
            }
            Err(e) => {
                let _ = ready.send(Err(e)).await;
                return;
            }
        };
        drop(ready);
        let started = tokio::select! {
            _ = stop.cancelled() => return,
            started = go.wait_for(Option::is_some) => started.ok().and_then(|s| *s),
        };
        let Some(started) = started else { return };
        // PUBACKs this publisher received: its QoS 1 window.
        let acked = AtomicU64::new(0);
        let write = async {
            let result = tokio::select! {
                _ = publishing.cancelled() => Ok(()),
                result = self.write_loop(&mut writer, started, &counters, &acked) => result,
            };
            // Stopped writing: the connection stays open (its messages on their way) until
            // the end of the run.
            if result.is_ok() {
                std::future::pending::<()>().await;
            }
            result
        };
        let closed = tokio::select! {
            _ = stop.cancelled() => false,
            _ = drain(&mut reader, &acked, &counters) => true,
            result = write => result.is_err(),
        };
        if closed && !stop.is_cancelled() {
            counters.publishers_closed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes until an error (the caller stops it by dropping the future, which only ever
    /// happens when the connection is being abandoned).
    async fn write_loop(
        &self,
        writer: &mut OwnedWriteHalf,
        started: Instant,
        counters: &Counters,
        acked: &AtomicU64,
    ) -> std::io::Result<()> {
        let per_batch = (BATCH_BYTES / self.packet.len()).max(1);
        let mut batch = self.packet.repeat(per_batch);
        let Some(rate) = self.rate else {
            // The stream is the same packet over and over, and the batch holds whole packets,
            // so after a partial write the rest of the batch, then the batch again, continues
            // it exactly. Messages count as written once the kernel took their last byte: a
            // broker that reads slowly shows up at once, not one 16 KiB batch later.
            let (mut offset, mut bytes, mut counted) = (0usize, 0u64, 0u64);
            let packet_len = self.packet.len() as u64;
            loop {
                let n = writer.write(&batch[offset..]).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                offset = (offset + n) % batch.len();
                bytes += n as u64;
                let complete = bytes / packet_len;
                counters
                    .written
                    .fetch_add(complete - counted, Ordering::Relaxed);
                counted = complete;
            }
        };
        // Open loop at `rate`: on each tick, write what is owed since `started`. What could
        // not be written for more than a second (a broker that stopped reading) is skipped
        // rather than sent as one burst later.
        let mut tick = tokio::time::interval_at((started + self.offset).into(), RATE_TICK);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let max_owed = (rate as u64).max(1);
        let ping_every = Duration::from_secs(u64::from(self.keep_alive_s) / 2);
        let (mut sent, mut last_write) = (0u64, Instant::now());
        // QoS 1: messages written (their packet ids are 1 + this, modulo 65,535).
        let mut published = 0u64;
        loop {
            tick.tick().await;
            let due = (started.elapsed().as_secs_f64() * rate) as u64;
            let mut owed = due.saturating_sub(sent);
            if owed > max_owed {
                sent += owed - max_owed;
                owed = max_owed;
            }
            while owed > 0 {
                let mut n = owed.min(per_batch as u64);
                if let Some(at) = self.packet_id_at {
                    let in_flight = published - acked.load(Ordering::Relaxed);
                    n = n.min(QOS1_WINDOW.saturating_sub(in_flight));
                    if n == 0 {
                        break; // the window is full: owed until a later tick
                    }
                    for (k, packet) in batch
                        .chunks_mut(self.packet.len())
                        .take(n as usize)
                        .enumerate()
                    {
                        let id = ((published + k as u64) % 65_535 + 1) as u16;
                        packet[at..at + 2].copy_from_slice(&id.to_be_bytes());
                    }
                    published += n;
                }
                writer
                    .write_all(&batch[..n as usize * self.packet.len()])
                    .await?;
                counters.written.fetch_add(n, Ordering::Relaxed);
                sent += n;
                owed -= n;
                last_write = Instant::now();
            }
            if self.keep_alive_s > 0 && last_write.elapsed() >= ping_every {
                writer.write_all(&mqtt::PINGREQ).await?;
                last_write = Instant::now();
            }
        }
    }
}

/// Reads until the broker closes the connection: counts PUBACKs, discards the rest (PINGRESPs).
async fn drain(reader: &mut FrameReader<OwnedReadHalf>, acked: &AtomicU64, counters: &Counters) {
    while let Ok(Some(frame)) = reader.next().await {
        if frame.puback().is_some() {
            acked.fetch_add(1, Ordering::Relaxed);
            counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Connects the subscriber on its own thread and returns once its SUBACK arrived; the thread
/// runs until the run's token is cancelled.
async fn start_subscriber(
    addr: SocketAddr,
    common: &Common,
    payload_size: usize,
    qos: u8,
    run_id: u32,
    counters: &Arc<Counters>,
    stop: &CancellationToken,
) -> Result<Dedicated<()>> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (counters, stop) = (counters.clone(), stop.clone());
    let (keep_alive_s, step, protocol) = (common.keepalive, common.step_timeout, common.protocol());
    let thread = dedicated::spawn("subscriber", move || async move {
        let setup = async {
            let client_id = format!("lg{run_id}-sub");
            let mut client = client::connect(
                protocol,
                addr,
                &client_id,
                keep_alive_s,
                step,
                256 * 1024,
                None,
            )
            .await?;
            client.subscribe(&["in/#"], qos, step).await?;
            anyhow::Ok(client)
        };
        match setup.await {
            Ok(client) => {
                let _ = ready_tx.send(Ok(()));
                subscribe_loop(client, keep_alive_s, payload_size, &counters, &stop).await;
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.context("subscriber")));
            }
        }
    })?;
    timeout(step * 3, ready_rx)
        .await
        .context("subscriber not ready in time")?
        .context("subscriber thread ended")??;
    Ok(thread)
}

/// Counts PUBLISH packets until stopped or closed, acknowledging those of QoS 1 (a batch of
/// PUBACKs once no further packet is buffered); pings to keep the connection alive.
async fn subscribe_loop(
    client: Client,
    keep_alive_s: u16,
    payload_size: usize,
    counters: &Counters,
    stop: &CancellationToken,
) {
    let Client {
        mut reader,
        mut writer,
        ..
    } = client;
    let every = Duration::from_secs(u64::from(keep_alive_s.max(2))) / 2;
    let mut tick = tokio::time::interval_at((Instant::now() + every).into(), every);
    let mut acks = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick(), if keep_alive_s > 0 => {
                if writer.write_all(&mqtt::PINGREQ).await.is_err() {
                    return;
                }
            }
            frame = reader.next() => {
                let mut frame = frame;
                loop {
                    let Ok(Some(f)) = frame else {
                        if !stop.is_cancelled() {
                            counters.subscriber_closed.store(true, Ordering::Relaxed);
                        }
                        return;
                    };
                    count(&f, payload_size, counters, &mut acks);
                    if !reader.has_frame() {
                        break;
                    }
                    frame = reader.next().await;
                }
                if !acks.is_empty() {
                    if writer.write_all(&acks).await.is_err() {
                        return;
                    }
                    acks.clear();
                }
            }
        }
    }
}

/// Counts one received packet; a QoS 1 PUBLISH adds its PUBACK to `acks`. Only well-formed
/// messages of this run count as delivered: a topic under in/ and the payload size that was
/// sent.
fn count(frame: &mqtt::Frame<'_>, payload_size: usize, counters: &Counters, acks: &mut Vec<u8>) {
    if let Some(p) = frame.publish() {
        let counter = if p.topic.starts_with(b"in/") && p.payload.len() == payload_size {
            &counters.delivered
        } else {
            &counters.unexpected
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(id) = p.packet_id {
            acks.extend_from_slice(&mqtt::puback(id));
        }
    }
}
