//! The established connection's loop: one wake-up handles signals (takeover, shutdown), a
//! SUBSCRIBE in progress, a message held back by a congested subscriber, reads, writes and the
//! deadlines, each with a bounded amount of work; a part that stops with work left makes the
//! task wake itself and yield.
//!
//! Keep-alive is exact: the deadline is the last complete packet *received* plus keep-alive x
//! multiplier; nothing the broker sends moves it, and neither do the bytes of a packet that is
//! never finished (a started packet must be complete within `mqtt.packet_read_timeout`). One
//! timer serves every deadline and is re-armed lazily (when it fires early it is pushed to the
//! current deadline), so an active connection costs about one timer operation per keep-alive
//! period.
//!
//! Publish rates (`mqtt.max_publish_rate`, `mqtt.max_publish_bytes_rate`) pause reading: after
//! a PUBLISH that puts the client in debt, nothing more is read or handled until the debt is
//! paid off (the same timer wakes the connection then). The pause is the broker's doing, so it
//! moves the keep-alive and packet-read deadlines later by its length.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rumqttc::mqttbytes::QoS;
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::handshake::Established;
use super::io::{Io, Transport};
use super::packets::{self, acknowledge, Handled, Held, Job};
use crate::auth::acl::Access;
use crate::labels::{AclDenial, DisconnectReason, PacketType};
use crate::metrics::metrics;
use crate::mqtt::packet::{reason, Packet};
use crate::mqtt::router::NotRouted;
use crate::mqtt::session::{Backlog, Session, CLIENT_GRACE};
use crate::mqtt::Broker;
use crate::telemetry::LogLimiter;

/// Most bytes read in one turn.
const READ_BUDGET: usize = 64 * 1024;
/// Most packets handled in one turn.
const PACKET_BUDGET: usize = 64;
/// Queued messages are moved into the write buffer until it holds this many bytes.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Most bytes written in one turn.
const WRITE_BUDGET: usize = 1024 * 1024;
/// Most rounds of filling and flushing in one turn (a round may write nothing, e.g. a retained
/// delivery walking past topics that do not match).
const WRITE_ROUNDS: usize = 32;
/// Most acknowledgements of one connection waiting for the durable state; beyond, the client
/// is not read until some go out.
const MAX_WAITING_ACKS: usize = 256;
/// Most retained messages taken in one step of a retained delivery.
const RETAINED_BATCH: usize = 64;
/// Longest a publisher waits for a congested subscriber queue to drain before trying again
/// (by then a subscriber whose client was behind counts as a slow consumer and no longer holds
/// it back) and, after twice that, before routing its message regardless (what does not fit is
/// dropped and counted).
const PARK_MAX: Duration = CLIENT_GRACE;

/// Timers of the serve loop.
struct Deadlines {
    /// When a complete packet was last received: the keep-alive deadline counts from here only.
    last_received: Instant,
    /// Since when the first byte of the packet still arriving is here.
    partial_since: Option<Instant>,
    /// Since when the write buffer has been waiting for the stream.
    stalled_since: Option<Instant>,
    /// The instant the timer is set to, if it is armed.
    armed: Option<Instant>,
}

/// A PUBLISH held back by a congested subscriber ([`Handled::Held`]), waiting for a drain.
struct Parked<'a> {
    held: Held,
    /// When it was parked.
    since: Instant,
    /// When to try again even if no drain was signalled.
    retry_at: Instant,
    /// Becomes ready when some session stops holding publishers back.
    drained: Pin<Box<Notified<'a>>>,
}

/// What one established connection keeps between wake-ups, besides its stream.
struct ServeState<'a> {
    deadlines: Deadlines,
    /// A SUBSCRIBE or UNSUBSCRIBE still being applied; no other packet is handled until it is
    /// done.
    job: Option<Box<Job>>,
    /// Waiting for read budget to be released (only while `mqtt.max_buffered_read_bytes` is
    /// exhausted).
    budget_wait: Option<Pin<Box<Notified<'a>>>>,
    /// A message waiting for congested subscribers to drain.
    parked: Option<Box<Parked<'a>>>,
}

/// Serves the established connection until it ends, and says why.
pub async fn serve<S: Transport>(
    io: &mut Io<S>,
    broker: &Broker,
    conn: &mut Established,
    shutdown: &CancellationToken,
) -> DisconnectReason {
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut state = ServeState {
        deadlines: Deadlines {
            last_received: Instant::now(),
            partial_since: None,
            stalled_since: None,
            armed: None,
        },
        job: None,
        budget_wait: None,
        parked: None,
    };
    // The CONNACK goes out before anything else, even a takeover that is already waiting: one
    // attempt now (what does not fit is written by the loop, which registers for writability).
    if let Err(error) = write_now(io) {
        tracing::debug!(%error, "Write failed.");
        return DisconnectReason::ConnectionLost;
    }
    // Shutdown reaches an established connection as a session signal
    // (SessionTable::close_all); a connection that attached after that sweep sees the token
    // here.
    if shutdown.is_cancelled() {
        return DisconnectReason::BrokerShutdown;
    }
    let reason = poll_fn(|cx| poll_serve(cx, io, broker, conn, timer.as_mut(), &mut state)).await;
    if let Some(parked) = state.parked.take() {
        // Received whole, so routed (or dropped and counted), not lost with the connection.
        broker.router.publish(parked.held.message);
    }
    reason
}

/// One attempt to write what is buffered, without waiting for the stream.
pub fn write_now<S: Transport>(io: &mut Io<S>) -> std::io::Result<()> {
    let mut now = Context::from_waker(std::task::Waker::noop());
    match io.poll_write_out(&mut now, &mut 0) {
        Poll::Ready(Err(error)) => Err(error),
        Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
    }
}

/// One wake-up of an established connection: signals, a SUBSCRIBE in progress, a held
/// message, reads, writes, deadlines.
///
/// Readiness is polled directly (the stream's `poll_read`/`poll_write`, the session's waker) so
/// that waiting costs no per-wait future inside the task.
fn poll_serve<'a, S: Transport>(
    cx: &mut Context<'_>,
    io: &mut Io<S>,
    broker: &'a Broker,
    conn: &mut Established,
    mut timer: Pin<&mut tokio::time::Sleep>,
    state: &mut ServeState<'a>,
) -> Poll<DisconnectReason> {
    loop {
        let signals = conn.session.take_signals(cx.waker());
        if signals.shutdown() {
            return Poll::Ready(DisconnectReason::BrokerShutdown);
        }
        if signals.kicked() {
            return Poll::Ready(DisconnectReason::Takeover);
        }
        if let Some(reason) = signals.close_requested() {
            return Poll::Ready(reason);
        }

        let mut yield_now = false;
        // Acknowledgements whose promises are durable now go out first, in order.
        let acks_waiting = packets::release_acks(cx, io, broker, conn);
        if let Some(job) = &mut state.job {
            if job.run(io, broker, conn) {
                state.job = None;
            } else {
                yield_now = true;
            }
        }
        if state.parked.is_some() {
            yield_now |= retry_parked(cx, io, broker, conn, state);
        }
        if let Some(throttle) = conn.extras.as_mut().and_then(|e| e.throttle.as_mut()) {
            if throttle.paused_until().is_some() {
                if let Some(paused_for) = throttle.resume(Instant::now()) {
                    // The broker held the client's reads back: that time is not the client's
                    // silence.
                    let d = &mut state.deadlines;
                    d.last_received += paused_for;
                    if let Some(since) = &mut d.partial_since {
                        *since += paused_for;
                    }
                }
            }
        }
        // A client whose acknowledgements wait for the disk is not read further until some go
        // out: what it has in flight stays bounded.
        if state.job.is_none() && state.parked.is_none() && acks_waiting < MAX_WAITING_ACKS {
            match read_side(cx, io, broker, conn, state) {
                Ok(more) => yield_now |= more,
                Err(reason) => return Poll::Ready(reason),
            }
            if let Some(parked) = &mut state.parked {
                // Register for the drain that will let it go (and go on at once if it came).
                yield_now |= parked.drained.as_mut().poll(cx).is_ready();
            }
        }
        // Again: those this turn deferred are registered for (or go out with this write).
        packets::release_acks(cx, io, broker, conn);
        match write_side(cx, io, broker, &conn.session, &mut state.deadlines) {
            Ok(more) => yield_now |= more,
            Err(reason) => return Poll::Ready(reason),
        }

        let retry_parked_at = state.parked.as_ref().map(|p| p.retry_at);
        match deadlines(
            cx,
            broker,
            conn,
            io,
            timer.as_mut(),
            &mut state.deadlines,
            retry_parked_at,
        ) {
            Poll::Ready(Some(reason)) => return Poll::Ready(reason),
            // Fired early (the deadline moved): re-armed, look again.
            Poll::Ready(None) => continue,
            Poll::Pending => {}
        }
        if yield_now {
            cx.waker().wake_by_ref();
        }
        return Poll::Pending;
    }
}

/// Handles buffered packets and reads more, within the turn's budgets. Returns true when it
/// stopped with work left (the caller yields and comes back).
fn read_side<'a, S: Transport>(
    cx: &mut Context<'_>,
    io: &mut Io<S>,
    broker: &'a Broker,
    conn: &mut Established,
    state: &mut ServeState<'a>,
) -> Result<bool, DisconnectReason> {
    let mut packets = 0;
    let mut bytes = 0;
    let result = loop {
        // Complete packets first (some may have come with the CONNECT, or in the last read).
        let mut stop = None;
        while stop.is_none() {
            if state.job.is_some() {
                // A SUBSCRIBE left work for later turns; the next packets wait for it.
                stop = Some(Ok(true));
            } else if state.parked.is_some() {
                // A message waits for a congested subscriber: read nothing more until then.
                stop = Some(Ok(false));
            } else if conn.paused_until().is_some() {
                // Over its publish rate: read nothing more until the pause is over.
                stop = Some(Ok(false));
            } else if packets >= PACKET_BUDGET {
                stop = Some(Ok(true));
            } else {
                match io.next_packet() {
                    Ok(Some(packet)) => {
                        packets += 1;
                        let published = match &packet {
                            Packet::Publish(p) => Some(p.topic.len() + p.payload.len()),
                            _ => None,
                        };
                        match packets::handle(io, broker, conn, packet) {
                            Ok(Handled::Done) => {}
                            Ok(Handled::Started(job)) => state.job = Some(job),
                            Ok(Handled::Held(held)) => park(io, broker, conn, state, held),
                            Err(reason) => stop = Some(Err(reason)),
                        }
                        let throttle = conn.extras.as_mut().and_then(|e| e.throttle.as_mut());
                        if let (Some(size), Some(throttle)) = (published, throttle) {
                            throttle.publish(size, Instant::now());
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::info!(client_id = &*conn.session.client_id, %error, "Protocol error; closing.");
                        io.disconnect(error.reason_code(), None);
                        stop = Some(Err(DisconnectReason::ProtocolError));
                    }
                }
            }
        }
        if let Some(result) = stop {
            break result;
        }
        if !io.settle_budget(&broker.read_budget, &broker.read_budget_freed) {
            // Wait for a release, registered before looking once more (none is missed).
            let wait = state.budget_wait.get_or_insert_with(|| {
                metrics().read_budget_waits.inc();
                Box::pin(broker.read_budget_freed.notified())
            });
            wait.as_mut().enable();
            if !io.settle_budget(&broker.read_budget, &broker.read_budget_freed)
                && wait.as_mut().poll(cx).is_pending()
            {
                break Ok(false);
            }
            state.budget_wait = None;
            continue;
        }
        state.budget_wait = None;
        if bytes >= READ_BUDGET {
            break Ok(true);
        }
        match io.poll_read_once(cx) {
            Poll::Pending => break Ok(false),
            Poll::Ready(Ok(0)) => {
                tracing::debug!("Connection closed by peer without DISCONNECT.");
                break Err(DisconnectReason::ConnectionLost);
            }
            Poll::Ready(Ok(n)) => bytes += n,
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "Read failed.");
                break Err(DisconnectReason::ConnectionLost);
            }
        }
    };
    let d = &mut state.deadlines;
    let now = Instant::now();
    if packets > 0 {
        // Only complete packets are activity (MQTT 3.1.1 section 3.1.2.10).
        d.last_received = now;
        conn.session.touch();
    }
    d.partial_since = match (io.rbuf.is_empty(), d.partial_since) {
        (true, _) => None,
        (false, Some(since)) if packets == 0 => Some(since),
        (false, _) => Some(now),
    };
    result
}

/// Holds a PUBLISH that a congested subscriber holds back (or that the durable state's disk
/// budget refuses, for an MQTT 3.1.1 client, which cannot be told): nothing more is read from
/// this client until it is routed (the kernel's buffers then slow the client down).
fn park<'a, S: Transport>(
    io: &mut Io<S>,
    broker: &'a Broker,
    conn: &mut Established,
    state: &mut ServeState<'a>,
    mut held: Held,
) {
    if held.disk_full {
        packets::disk_full();
    } else {
        metrics().publish_backpressure.inc();
    }
    let mut drained = Box::pin(broker.drained.notified());
    drained.as_mut().enable();
    // Registered before trying once more, so that a drain just before is not missed.
    match broker.router.try_publish(Arc::clone(&held.message)) {
        Ok(ticket) => acknowledge(
            io,
            conn,
            ticket.max(held.ticket),
            held.qos,
            held.pkid,
            reason::SUCCESS,
        ),
        Err(not_routed) => {
            held.disk_full = matches!(not_routed, NotRouted::DiskFull(_));
            let now = Instant::now();
            state.parked = Some(Box::new(Parked {
                held,
                since: now,
                retry_at: now + PARK_MAX,
                drained,
            }));
        }
    }
}

/// Tries again to route the parked message, once some session drained (or it waited
/// [`PARK_MAX`]). Returns true when the caller should come back soon (a drain came meanwhile).
fn retry_parked<'a, S: Transport>(
    cx: &mut Context<'_>,
    io: &mut Io<S>,
    broker: &'a Broker,
    conn: &mut Established,
    state: &mut ServeState<'a>,
) -> bool {
    let Some(parked) = &mut state.parked else {
        return false;
    };
    let now = Instant::now();
    let timer_fired = now >= parked.retry_at;
    if !timer_fired && parked.drained.as_mut().poll(cx).is_pending() {
        return false;
    }
    let waited_enough = now >= parked.since + 2 * PARK_MAX;
    // Registered before trying, so that a drain in between is not missed.
    parked.drained.set(broker.drained.notified());
    parked.drained.as_mut().enable();
    let message = Arc::clone(&parked.held.message);
    // Only congestion gives way after a while; the disk budget never does.
    let routed = if waited_enough && !parked.held.disk_full {
        broker.router.force_publish(message)
    } else {
        broker.router.try_publish(message)
    };
    match routed {
        Ok(ticket) => {
            let held = &parked.held;
            let ticket = ticket.max(held.ticket);
            acknowledge(io, conn, ticket, held.qos, held.pkid, reason::SUCCESS);
            state.parked = None;
            return false;
        }
        Err(not_routed) => {
            parked.held.disk_full = matches!(not_routed, NotRouted::DiskFull(_));
        }
    }
    if timer_fired {
        parked.retry_at = now + PARK_MAX;
    }
    parked.drained.as_mut().poll(cx).is_ready()
}

/// Fills the write buffer from the session (retained deliveries, then the queue) and writes
/// it, for as long as the stream takes bytes and the turn's budget lasts. Returns true when it
/// stopped with messages ready to go (the caller yields and comes back).
fn write_side<S: Transport>(
    cx: &mut Context<'_>,
    io: &mut Io<S>,
    broker: &Broker,
    session: &Arc<Session>,
    d: &mut Deadlines,
) -> Result<bool, DisconnectReason> {
    let mut total = 0;
    // Whether the writer stops because of the client (stream or in-flight window full) rather
    // than for lack of messages or of its turn.
    let mut client_behind = false;
    let mut more = true;
    for _ in 0..WRITE_ROUNDS {
        let backlog = if io.wbuf.len() >= WRITE_HIGH_WATER {
            Backlog::More
        } else {
            fill(io, broker, session)
        };
        let mut written = 0;
        let out = io.poll_write_out(cx, &mut written);
        total += written;
        match out {
            Poll::Ready(Ok(())) => {
                d.stalled_since = None;
                if backlog != Backlog::More {
                    client_behind = backlog == Backlog::Blocked;
                    more = false;
                    break;
                }
            }
            Poll::Pending => {
                // The write deadline counts from the last progress: a slow reader that keeps
                // taking bytes is not a stalled one.
                if written > 0 || d.stalled_since.is_none() {
                    d.stalled_since = Some(Instant::now());
                }
                client_behind = true;
                more = false;
                break;
            }
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "Write failed.");
                return Err(DisconnectReason::ConnectionLost);
            }
        }
        if total >= WRITE_BUDGET {
            break;
        }
    }
    if client_behind {
        session.client_behind();
    }
    Ok(more)
}

/// Moves messages into the write buffer up to [`WRITE_HIGH_WATER`]: first retained messages of
/// new subscriptions (a step at a time, walked without the session lock), then queued ones.
fn fill<S: Transport>(io: &mut Io<S>, broker: &Broker, session: &Arc<Session>) -> Backlog {
    let limits = broker.router.limits();
    let max_inflight = broker.config.max_inflight;
    let mut st = session.state();
    if let Some(mut cursor) = st.next_retained() {
        let room = match cursor.qos {
            QoS::AtMostOnce => RETAINED_BATCH,
            _ => st.inflight_room(max_inflight).min(RETAINED_BATCH),
        };
        if room == 0 {
            // Waits for acknowledgements; queued messages may still go below.
            st.resume_retained(cursor);
        } else {
            let acl = st.acl.clone();
            drop(st);
            let mut batch = Vec::new();
            let done = broker.router.retained_step(&mut cursor, room, &mut batch);
            // Delivered only where reading is allowed (CVE-2018-12546).
            if let Some(acl) = acl {
                let before = batch.len();
                batch.retain(|m| acl.allows(Access::Read, &m.topic));
                let withheld = before - batch.len();
                if withheld > 0 {
                    metrics()
                        .acl_denied
                        .inc_by(AclDenial::Retained, withheld as u64);
                }
            }
            st = session.state();
            let (count, before) = (batch.len(), io.wbuf.len());
            st.write_retained(&mut io.wbuf, batch, &cursor, limits);
            if count > 0 {
                metrics()
                    .sent
                    .count(PacketType::Publish, count as u64, io.wbuf.len() - before);
            }
            if !done {
                st.resume_retained(cursor);
            }
            // One step per fill: the caller flushes and comes back.
            return Backlog::More;
        }
    }
    let before = io.wbuf.len();
    let (written, backlog) = st.write_pending(&mut io.wbuf, WRITE_HIGH_WATER, max_inflight, limits);
    let relieved = written > 0 && session.relieve(&st, limits);
    drop(st);
    if written > 0 {
        metrics()
            .sent
            .count(PacketType::Publish, written as u64, io.wbuf.len() - before);
    }
    if relieved {
        broker.drained.notify_waiters();
    }
    backlog
}

/// Sets the connection's one timer to its earliest deadline. `Ready(Some)` when a deadline has
/// passed (the connection ends), `Ready(None)` when the timer fired early and was re-armed.
fn deadlines<S: Transport>(
    cx: &mut Context<'_>,
    broker: &Broker,
    conn: &Established,
    io: &Io<S>,
    mut timer: Pin<&mut tokio::time::Sleep>,
    d: &mut Deadlines,
    retry_parked_at: Option<Instant>,
) -> Poll<Option<DisconnectReason>> {
    let config = &broker.config;
    let paused_until = conn.paused_until();
    // While the broker holds the client's reads back, the client cannot be silent or slow.
    let reading = paused_until.is_none();
    // Moved earlier when needed and otherwise left to fire and be pushed to the current
    // deadline (keep-alive deadlines only ever move later).
    let deadline = [
        conn.keep_alive()
            .filter(|_| reading)
            .map(|ka| d.last_received + ka),
        d.partial_since
            .filter(|_| reading)
            .map(|s| s + config.packet_read_timeout),
        d.stalled_since.map(|s| s + config.write_stall_timeout),
        retry_parked_at,
        paused_until,
    ]
    .into_iter()
    .flatten()
    .min();
    match (deadline, d.armed) {
        (None, _) => d.armed = None,
        (Some(next), Some(armed)) if armed <= next => {}
        (Some(next), _) => {
            timer.as_mut().reset(next);
            d.armed = Some(next);
        }
    }
    if d.armed.is_none() || timer.as_mut().poll(cx).is_pending() {
        return Poll::Pending;
    }
    d.armed = None;
    let now = Instant::now();
    let session = &conn.session;
    if let Some(ka) = conn.keep_alive().filter(|_| reading) {
        if now >= d.last_received + ka {
            tracing::info!(
                client_id = &*session.client_id,
                silent_for = ?now.duration_since(d.last_received),
                "Keep-alive timeout: no packet received; closing."
            );
            return Poll::Ready(Some(DisconnectReason::KeepaliveTimeout));
        }
    }
    if let Some(since) = d.partial_since.filter(|_| reading) {
        if now >= since + config.packet_read_timeout {
            metrics().packet_read_timeouts.inc();
            if let Some(suppressed) = PACKET_TIMEOUT_LOG.check() {
                tracing::info!(
                    client_id = &*session.client_id,
                    buffered = io.rbuf.len(),
                    packet_size = io.frame_len(),
                    suppressed,
                    "Packet not completed within mqtt.packet_read_timeout; closing."
                );
            }
            return Poll::Ready(Some(DisconnectReason::ConnectionLost));
        }
    }
    if let Some(since) = d.stalled_since {
        if now >= since + config.write_stall_timeout {
            tracing::info!(
                client_id = &*session.client_id,
                pending_bytes = io.wbuf.len(),
                "Writes made no progress within mqtt.write_stall_timeout; closing."
            );
            return Poll::Ready(Some(DisconnectReason::ConnectionLost));
        }
    }
    Poll::Ready(None)
}

/// Connections closed for an unfinished packet: one line per interval for the whole broker.
static PACKET_TIMEOUT_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));
