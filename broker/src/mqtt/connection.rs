//! One task per TCP connection: CONNECT within `connect_timeout`, session attach (with takeover),
//! then a loop that reads packets, writes queued messages and enforces keep-alive and the write
//! deadline, until the connection ends with exactly one [`DisconnectReason`].
//!
//! Keep-alive is exact: the deadline is the last complete packet *received* plus keep-alive x
//! multiplier; nothing the broker sends moves it, and neither do the bytes of a packet that is
//! never finished (a started packet must be complete within `mqtt.packet_read_timeout`). One
//! timer per connection serves every deadline and is re-armed lazily (when it fires early it is
//! pushed to the current deadline), so an active connection costs about one timer operation per
//! keep-alive period.
//!
//! Fairness: one wake-up handles a bounded number of packets, bytes and SUBSCRIBE filters, and
//! writes a bounded number of bytes, then yields; what is left continues at the next turn (the
//! task wakes itself), so a client that sends or receives without pause, or subscribes to
//! thousands of filters at once, never holds a runtime thread for long.
//!
//! Memory: an idle connection holds no read or write buffer: both are allocated when bytes arrive
//! or leave and released once empty. A packet larger than one read chunk is buffered only as its
//! bytes arrive, and only while the broker-wide `mqtt.max_buffered_read_bytes` allows.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, PubRel, SubAck,
    SubscribeFilter, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::sync::futures::Notified;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::budget::ByteBudget;
use super::codec::{self, CodecError, ConnackCode};
use super::retained::Cursor;
use super::message::Message;
use super::session::{Backlog, Session};
use super::{topic, Attach, Shared};
use crate::config::{KeepAlivePolicy, MqttConfig};
use crate::event::{ConnectionEvent, SessionId};
use crate::labels::{DisconnectReason, PacketType, RefusalReason, SubscriptionRefusal};
use crate::metrics::metrics;
use crate::telemetry::LogLimiter;

/// Bytes asked of the socket per read call while no large packet is arriving.
const READ_CHUNK: usize = 4096;
/// Largest single read while a large packet arrives.
const READ_MAX: usize = 64 * 1024;
/// Most bytes read in one wake-up.
const READ_BUDGET: usize = 64 * 1024;
/// Most packets handled in one wake-up.
const PACKET_BUDGET: usize = 64;
/// Queued messages are moved into the write buffer until it holds this many bytes.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Most bytes written in one wake-up.
const WRITE_BUDGET: usize = 1024 * 1024;
/// Most rounds of filling and flushing in one wake-up (a round may write nothing, e.g. a
/// retained delivery walking past topics that do not match).
const WRITE_ROUNDS: usize = 32;
/// Most filters of a SUBSCRIBE or UNSUBSCRIBE handled in one wake-up.
const FILTER_BUDGET: usize = 256;
/// Most retained messages taken in one step of a retained delivery.
const RETAINED_BATCH: usize = 64;
/// Longest a publisher waits for a congested subscriber queue to drain before trying again
/// (by then a subscriber whose client was behind counts as a slow consumer and no longer holds
/// it back) and, after twice that, before routing its message regardless (what does not fit is
/// dropped and counted).
const PARK_MAX: Duration = super::session::CLIENT_GRACE;

/// Why reading a packet failed.
#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("connection closed by peer")]
    Closed,
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The socket with its on-demand buffers.
struct Io {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_packet_size: usize,
    /// Bytes of `mqtt.max_buffered_read_bytes` held for the large packet now arriving.
    reserved: usize,
}

impl Io {
    /// Total size of the packet at the start of the read buffer, once its fixed header is in.
    fn frame_len(&self) -> Option<usize> {
        codec::frame_length(&self.rbuf)
    }

    /// Holds read budget for the packet now arriving when it is larger than one read chunk, and
    /// gives back what a completed packet no longer needs. False when the budget is exhausted:
    /// the connection must not read until some is released.
    fn settle_budget(&mut self, budget: &ByteBudget, freed: &tokio::sync::Notify) -> bool {
        let need = self
            .frame_len()
            .filter(|f| *f > READ_CHUNK && *f <= self.max_packet_size + 5)
            .unwrap_or(0);
        if need > self.reserved {
            if !budget.try_reserve(need - self.reserved) {
                return false;
            }
        } else if need < self.reserved {
            budget.release(self.reserved - need);
            freed.notify_waiters();
        }
        self.reserved = need;
        true
    }

    /// One read call. Ok(0) is the end of the stream.
    fn read_once(&mut self) -> io::Result<usize> {
        let missing = self
            .frame_len()
            .map_or(0, |frame| frame.saturating_sub(self.rbuf.len()));
        let want = missing.clamp(READ_CHUNK, READ_MAX);
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        self.stream.try_read_buf(&mut self.rbuf)
    }

    /// The next complete packet in the read buffer, if any.
    fn next_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        let before = self.rbuf.len();
        let packet = codec::read_packet(&mut self.rbuf, self.max_packet_size)?;
        if let Some(p) = &packet {
            let size = before - self.rbuf.len();
            metrics().received.count(codec::packet_type(p), 1, size);
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            // Give the buffer back while the connection is idle.
            self.rbuf = BytesMut::new();
        }
        Ok(packet)
    }

    /// Reads until one packet is complete (used for CONNECT), within the read budget.
    async fn read_packet(
        &mut self,
        budget: &ByteBudget,
        freed: &tokio::sync::Notify,
    ) -> Result<Packet, ReadError> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(packet);
            }
            while !self.settle_budget(budget, freed) {
                let released = freed.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if self.settle_budget(budget, freed) {
                    break;
                }
                metrics().read_budget_waits.inc();
                released.await;
            }
            self.stream.readable().await?;
            match self.read_once() {
                Ok(0) => {
                    return match self.next_packet()? {
                        Some(packet) => Ok(packet),
                        None => Err(ReadError::Closed),
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Gives back the read budget held (the connection is closing).
    fn release_budget(&mut self, budget: &ByteBudget, freed: &tokio::sync::Notify) {
        if self.reserved > 0 {
            budget.release(self.reserved);
            self.reserved = 0;
            freed.notify_waiters();
        }
    }

    /// Writes as much of the write buffer as the socket takes without blocking.
    /// Returns how many bytes went out.
    fn try_flush(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = self.wbuf.split_to(n);
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf = BytesMut::new();
        Ok(written)
    }

    /// Queues a control packet.
    fn send(&mut self, packet: &Packet) {
        let before = self.wbuf.len();
        codec::write_packet(&mut self.wbuf, packet);
        let size = self.wbuf.len() - before;
        metrics().sent.count(codec::packet_type(packet), 1, size);
    }

    /// Writes a refusal CONNACK and gives the peer a moment to read it before closing.
    async fn refuse(&mut self, code: ConnackCode) {
        let code = match code {
            ConnackCode::Accepted => ConnectReturnCode::Success,
            ConnackCode::UnacceptableProtocolVersion => ConnectReturnCode::RefusedProtocolVersion,
            ConnackCode::IdentifierRejected => ConnectReturnCode::BadClientId,
        };
        self.send(&Packet::ConnAck(ConnAck::new(code, false)));
        let flush = async {
            while !self.wbuf.is_empty() {
                self.try_flush()?;
                if !self.wbuf.is_empty() {
                    self.stream.writable().await?;
                }
            }
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), flush).await;
    }
}

fn refused(reason: RefusalReason) {
    metrics().connections_refused.inc(reason);
}

fn configure_socket(stream: &TcpStream, config: &MqttConfig) {
    // MQTT packets are small and latency matters more than segment count.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "Cannot set TCP_NODELAY.");
    }
    // Half-open peers: the kernel gives up on unacknowledged data after write_stall_timeout.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) =
        socket2::SockRef::from(stream).set_tcp_user_timeout(Some(config.write_stall_timeout))
    {
        tracing::debug!(%error, "Cannot set TCP_USER_TIMEOUT.");
    }
}

/// What the handshake settled and the rest of the connection needs.
struct Established {
    session: Arc<Session>,
    session_id: SessionId,
    seq: u64,
    /// keep-alive x multiplier; `None` when the client asked for no keep-alive.
    keep_alive: Option<Duration>,
    /// Published if the connection ends without DISCONNECT. Boxed: most devices have none,
    /// and it is kept for the connection's whole life.
    will: Option<Box<LastWill>>,
}

/// Serves one accepted socket until it closes.
///
/// The handshake and the close are boxed so that their futures (timeouts, event sends) do not
/// stay inside every idle connection's task; the part that lives long is [`serve`], a small
/// poll loop. Not an `async fn`: its arguments would stay in the task for its whole life next
/// to the [`Io`] made of them (40 bytes of socket), so the task starts from the `Io`, and the
/// handshake asks the socket for the peer's address instead of keeping it.
pub fn run(
    stream: TcpStream,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    configure_socket(&stream, &shared.config);
    let mut io = Io {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        max_packet_size: shared.config.max_packet_size,
        reserved: 0,
    };
    async move {
        let established = Box::pin(handshake(&mut io, &shared, &shutdown)).await;
        let reason = match &established {
            Some(conn) => Some(serve(&mut io, &shared, conn, &shutdown).await),
            None => None,
        };
        io.release_budget(&shared.read_budget, &shared.read_budget_freed);
        drop(io);
        if let (Some(conn), Some(reason)) = (established, reason) {
            Box::pin(close(&shared, conn, reason)).await;
        }
    }
}

/// CONNECT within the timeout, validation, session attach (with takeover), the Connected event
/// and the CONNACK. `None` when the connection was refused (and already answered).
async fn handshake(
    io: &mut Io,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<Established> {
    let config = &shared.config;
    let peer = match io.stream.peer_addr() {
        Ok(peer) => peer,
        Err(error) => {
            tracing::debug!(%error, "Connection gone before CONNECT.");
            refused(RefusalReason::ConnectionLost);
            return None;
        }
    };
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            refused(RefusalReason::BrokerShutdown);
            return None;
        }
        first = tokio::time::timeout(
            config.connect_timeout,
            io.read_packet(&shared.read_budget, &shared.read_budget_freed),
        ) => first,
    };
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            tracing::info!(%peer,
                packet = codec::packet_type(&other).as_str(),
                "First packet is not CONNECT; closing."
            );
            refused(RefusalReason::ProtocolError);
            return None;
        }
        Ok(Err(ReadError::Codec(CodecError::UnsupportedProtocol { name, level }))) => {
            tracing::info!(%peer, name = name.as_str(), level, "Unsupported protocol version; CONNACK 0x01.");
            refused(RefusalReason::UnsupportedProtocolVersion);
            io.refuse(ConnackCode::UnacceptableProtocolVersion).await;
            return None;
        }
        Ok(Err(ReadError::Codec(error))) => {
            tracing::info!(%peer, %error, "Invalid packet before CONNECT; closing.");
            refused(RefusalReason::ProtocolError);
            return None;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "Connection closed before CONNECT.");
            refused(RefusalReason::ConnectionLost);
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?config.connect_timeout, "No CONNECT within the connect timeout; closing.");
            refused(RefusalReason::ConnectTimeout);
            return None;
        }
    };

    let client_id = match client_id(&connect, config) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(%peer, client_id = connect.client_id.as_str(), why, "Client identifier rejected; CONNACK 0x02.");
            refused(RefusalReason::IdentifierRejected);
            io.refuse(ConnackCode::IdentifierRejected).await;
            return None;
        }
    };
    tracing::Span::current().record("client_id", client_id.as_str());
    let keep_alive = match keep_alive(connect.keep_alive, config) {
        Ok(ka) => ka,
        Err(why) => {
            tracing::info!(%peer,
                keep_alive = connect.keep_alive,
                why,
                "Keep-alive refused; CONNACK 0x02."
            );
            refused(RefusalReason::KeepaliveRejected);
            io.refuse(ConnackCode::IdentifierRejected).await;
            return None;
        }
    };
    if let Some(will) = &connect.last_will {
        if !topic::valid_topic_name(&will.topic, config.max_topic_levels) {
            tracing::info!(%peer, topic = will.topic.as_str(), "Invalid will topic; closing.");
            refused(RefusalReason::ProtocolError);
            return None;
        }
    }

    // Attach, taking the session over from the connection that holds it, if any.
    let attach = async {
        let mut session = shared.session(&client_id);
        loop {
            let current = Arc::clone(&session);
            let released = shared.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match shared.attach(&current, connect.clean_session) {
                Attach::Attached(attached) => return (session, attached),
                Attach::Wait => released.await,
                Attach::Retry => session = shared.session(&client_id),
            }
        }
    };
    let (session, attached) = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            refused(RefusalReason::BrokerShutdown);
            return None;
        }
        attached = attach => attached,
    };
    shared.router.unsubscribe(
        session.key,
        attached.dropped_subscriptions.iter().map(|f| &**f),
    );

    // From here on exactly one Disconnected event is owed (sent by `close`).
    let (session_id, seq) = (attached.session_id, attached.seq);
    send_event(
        shared,
        ConnectionEvent::Connected {
            client_id,
            session_id,
            seq,
            peer,
            keep_alive,
            clean_session: connect.clean_session,
            time: SystemTime::now(),
        },
    )
    .await;
    session.touch();
    metrics().connections_accepted.inc();
    metrics().connections_current.inc();
    tracing::debug!(%session_id, seq, keep_alive, clean_session = connect.clean_session, "Connected.");

    io.send(&Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        attached.session_present,
    )));
    if attached.session_present {
        let resent = session.state().write_inflight(&mut io.wbuf);
        if resent > 0 {
            tracing::debug!(resent, "Redelivering in-flight messages.");
        }
    }
    Some(Established {
        session,
        session_id,
        seq,
        keep_alive: (keep_alive > 0).then(|| {
            Duration::from_secs(u64::from(keep_alive)).mul_f64(config.keepalive_multiplier)
        }),
        will: connect.last_will.map(Box::new),
    })
}

/// Detach, will, the Disconnected event, and the signals that let a waiting takeover and a
/// paused accept loop go on.
async fn close(shared: &Shared, conn: Established, reason: DisconnectReason) {
    metrics().connections_current.dec();
    metrics().disconnects.inc(reason);
    match reason {
        DisconnectReason::KeepaliveTimeout => metrics().keepalive_timeouts.inc(),
        DisconnectReason::Takeover => metrics().takeovers.inc(),
        _ => {}
    }
    let session = conn.session;
    // Nobody drains its queue now: it holds no publisher back.
    if session.set_online(false) {
        shared.drained.notify_waiters();
    }

    // The will goes out on every close that the client did not ask for, takeover included
    // (the old connection's will, as MQTT 3.1.1 section 3.1.4 requires). A broker shutdown closes
    // every subscriber at the same time, so wills are not sent then.
    if !matches!(
        reason,
        DisconnectReason::ClientDisconnect | DisconnectReason::BrokerShutdown
    ) {
        if let Some(will) = conn.will {
            publish_will(shared, *will);
        }
    }

    // The event goes out while this connection still owns the session: a newer connection of
    // the same client id waits for `released`, so its Connected always follows this event.
    tracing::debug!(session_id = %conn.session_id, reason = reason.as_str(), "Disconnected.");
    send_event(
        shared,
        ConnectionEvent::Disconnected {
            client_id: session.client_id.to_string(),
            session_id: conn.session_id,
            seq: conn.seq,
            reason,
            time: SystemTime::now(),
        },
    )
    .await;
    let dropped = shared.detach(&session, conn.session_id);
    shared
        .router
        .unsubscribe(session.key, dropped.iter().map(|f| &**f));
    shared.released.notify_waiters();
    shared.connection_closed.notify_waiters();
}

async fn send_event(shared: &Shared, event: ConnectionEvent) {
    // The receiver only goes away when the broker is being torn down; nothing is left to
    // deliver the event to then, and that is logged loudly.
    if let Err(error) = shared.events.send(event).await {
        tracing::error!(event = ?error.0, "Presence pipeline is gone; connection event not delivered.");
    }
}

fn publish_will(shared: &Shared, will: LastWill) {
    metrics().wills_published.inc();
    tracing::debug!(topic = will.topic.as_str(), "Publishing will.");
    shared.router.publish(Arc::new(Message {
        topic: will.topic.into_boxed_str(),
        payload: Bytes::copy_from_slice(&will.message),
        qos: will.qos,
        retain: will.retain,
    }));
}

/// The client id to use, or why the CONNECT's one is refused.
fn client_id(connect: &Connect, config: &MqttConfig) -> Result<String, &'static str> {
    let id = &connect.client_id;
    if id.is_empty() {
        if !connect.clean_session {
            return Err("an empty client id requires clean session");
        }
        return Ok(format!("hw-{}", uuid::Uuid::now_v7().simple()));
    }
    if id.len() > config.max_client_id_len {
        return Err("client id longer than mqtt.max_client_id_len");
    }
    if id.chars().any(char::is_control) {
        return Err("client id contains control characters");
    }
    Ok(id.clone())
}

/// The keep-alive in force after applying `min_keepalive`/`max_keepalive`. A client's 0 means
/// "never expires", which is above any `max_keepalive` (0 there: no upper bound).
fn keep_alive(requested: u16, config: &MqttConfig) -> Result<u16, &'static str> {
    let too_low = config
        .min_keepalive
        .filter(|min| requested != 0 && requested < *min);
    let too_high =
        Some(config.max_keepalive).filter(|max| *max != 0 && (requested == 0 || requested > *max));
    match (too_low.or(too_high), config.keepalive_policy) {
        (None, _) => Ok(requested),
        (Some(bound), KeepAlivePolicy::Clamp) => Ok(bound),
        (Some(_), KeepAlivePolicy::Reject) => {
            Err("keep-alive outside mqtt.min_keepalive..mqtt.max_keepalive")
        }
    }
}

/// Timers and counters of the serve loop.
struct Deadlines {
    /// When a complete packet was last received: the keep-alive deadline counts from here only.
    last_received: Instant,
    /// Since when the first byte of the packet still arriving is here.
    partial_since: Option<Instant>,
    /// Since when the write buffer has been waiting for the socket.
    stalled_since: Option<Instant>,
    /// The instant the timer is set to, if it is armed.
    armed: Option<Instant>,
}

/// A PUBLISH received but not yet routed, because a session it goes to is congested while the
/// broker could drain it ([`super::router::Router::try_publish`]). Nothing more is read from
/// the client until it is routed.
struct Parked<'a> {
    message: Arc<Message>,
    /// The PUBLISH's QoS and packet id, for its acknowledgement once routed.
    qos: QoS,
    pkid: u16,
    /// When it was parked.
    since: Instant,
    /// When to try again even if no drain was signalled.
    retry_at: Instant,
    /// Becomes ready when some session stops holding publishers back.
    drained: Pin<Box<Notified<'a>>>,
}

/// What one established connection keeps between wake-ups, besides its socket.
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

/// The established connection's loop, until it ends.
async fn serve(
    io: &mut Io,
    shared: &Shared,
    conn: &Established,
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
    // The CONNACK goes out before anything else, even a takeover that is already waiting.
    if let Err(error) = io.try_flush() {
        tracing::debug!(%error, "Write failed.");
        return DisconnectReason::ConnectionLost;
    }
    // Shutdown reaches an established connection as a session signal (Shared::close_all); a
    // connection that attached after that sweep sees the token here.
    if shutdown.is_cancelled() {
        return DisconnectReason::BrokerShutdown;
    }
    let reason =
        std::future::poll_fn(|cx| poll_serve(cx, io, shared, conn, timer.as_mut(), &mut state))
            .await;
    if let Some(parked) = state.parked.take() {
        // Received whole, so routed (or dropped and counted), not lost with the connection.
        shared.router.publish(parked.message);
    }
    reason
}

/// One wake-up of an established connection: signals, a SUBSCRIBE in progress, reads, writes,
/// deadlines.
///
/// Readiness is polled directly (`poll_read_ready`, `poll_write_ready`, the session's waker) so
/// that waiting costs no per-wait future inside the task. Every part does a bounded amount of
/// work; when one stops with work left, the task wakes itself and yields.
fn poll_serve<'a>(
    cx: &mut Context<'_>,
    io: &mut Io,
    shared: &'a Shared,
    conn: &Established,
    mut timer: Pin<&mut tokio::time::Sleep>,
    state: &mut ServeState<'a>,
) -> Poll<DisconnectReason> {
    let session = &conn.session;
    loop {
        let signals = session.take_signals(cx.waker());
        if signals.shutdown() {
            return Poll::Ready(DisconnectReason::BrokerShutdown);
        }
        if signals.kicked() {
            return Poll::Ready(DisconnectReason::Takeover);
        }

        let mut yield_now = false;
        if let Some(job) = &mut state.job {
            if job.run(io, shared, session) {
                state.job = None;
            } else {
                yield_now = true;
            }
        }
        if state.parked.is_some() {
            yield_now |= retry_parked(cx, io, shared, state);
        }
        if state.job.is_none() && state.parked.is_none() {
            match read_side(cx, io, shared, conn, state) {
                Ok(more) => yield_now |= more,
                Err(reason) => return Poll::Ready(reason),
            }
            if let Some(parked) = &mut state.parked {
                // Register for the drain that will let it go (and go on at once if it came).
                yield_now |= parked.drained.as_mut().poll(cx).is_ready();
            }
        }
        match write_side(cx, io, shared, session, &mut state.deadlines) {
            Ok(more) => yield_now |= more,
            Err(reason) => return Poll::Ready(reason),
        }

        let retry_parked_at = state.parked.as_ref().map(|p| p.retry_at);
        match deadlines(
            cx,
            shared,
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

/// Handles buffered packets and reads more, within the wake-up's budgets. Returns true when it
/// stopped with work left (the caller yields and comes back).
fn read_side<'a>(
    cx: &mut Context<'_>,
    io: &mut Io,
    shared: &'a Shared,
    conn: &Established,
    state: &mut ServeState<'a>,
) -> Result<bool, DisconnectReason> {
    let session = &conn.session;
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
            } else if packets >= PACKET_BUDGET {
                stop = Some(Ok(true));
            } else {
                match io.next_packet() {
                    Ok(Some(packet)) => {
                        packets += 1;
                        if let Err(reason) = handle(io, shared, session, packet, state) {
                            stop = Some(Err(reason));
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::info!(client_id = &*session.client_id, %error, "Protocol error; closing.");
                        stop = Some(Err(DisconnectReason::ProtocolError));
                    }
                }
            }
        }
        if let Some(result) = stop {
            break result;
        }
        if !io.settle_budget(&shared.read_budget, &shared.read_budget_freed) {
            // Wait for a release, registered before looking once more (none is missed).
            let wait = state.budget_wait.get_or_insert_with(|| {
                metrics().read_budget_waits.inc();
                Box::pin(shared.read_budget_freed.notified())
            });
            wait.as_mut().enable();
            if !io.settle_budget(&shared.read_budget, &shared.read_budget_freed)
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
        match io.stream.poll_read_ready(cx) {
            Poll::Pending => break Ok(false),
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "Socket error.");
                break Err(DisconnectReason::ConnectionLost);
            }
            Poll::Ready(Ok(())) => match io.read_once() {
                Ok(0) => {
                    tracing::debug!("Connection closed by peer without DISCONNECT.");
                    break Err(DisconnectReason::ConnectionLost);
                }
                Ok(n) => bytes += n,
                // Readiness was cleared: polling again registers for the next bytes.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::debug!(%error, "Read failed.");
                    break Err(DisconnectReason::ConnectionLost);
                }
            },
        }
    };
    let d = &mut state.deadlines;
    let now = Instant::now();
    if packets > 0 {
        // Only complete packets are activity (MQTT 3.1.1 section 3.1.2.10).
        d.last_received = now;
        session.touch();
    }
    d.partial_since = match (io.rbuf.is_empty(), d.partial_since) {
        (true, _) => None,
        (false, Some(since)) if packets == 0 => Some(since),
        (false, _) => Some(now),
    };
    result
}

/// Fills the write buffer from the session (retained deliveries, then the queue) and flushes
/// it, for as long as the socket takes bytes and the wake-up's budget lasts. Returns true when
/// it stopped with messages ready to go (the caller yields and comes back).
fn write_side(
    cx: &mut Context<'_>,
    io: &mut Io,
    shared: &Shared,
    session: &Arc<Session>,
    d: &mut Deadlines,
) -> Result<bool, DisconnectReason> {
    let mut total = 0;
    // Whether the writer stops because of the client (socket or in-flight window full) rather
    // than for lack of messages or of its turn.
    let mut client_behind = false;
    let mut more = true;
    for _ in 0..WRITE_ROUNDS {
        let backlog = if io.wbuf.len() >= WRITE_HIGH_WATER {
            Backlog::More
        } else {
            fill(io, shared, session)
        };
        let written = match io.try_flush() {
            Ok(written) => written,
            Err(error) => {
                tracing::debug!(%error, "Write failed.");
                return Err(DisconnectReason::ConnectionLost);
            }
        };
        total += written;
        if io.wbuf.is_empty() {
            d.stalled_since = None;
            if backlog != Backlog::More {
                client_behind = backlog == Backlog::Blocked;
                more = false;
                break;
            }
        } else {
            // The write deadline counts from the last progress: a slow reader that keeps
            // taking bytes is not a stalled one.
            if written > 0 || d.stalled_since.is_none() {
                d.stalled_since = Some(Instant::now());
            }
            match io.stream.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Pending => {
                    client_behind = true;
                    more = false;
                    break;
                }
                Poll::Ready(Err(error)) => {
                    tracing::debug!(%error, "Socket error.");
                    return Err(DisconnectReason::ConnectionLost);
                }
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
fn fill(io: &mut Io, shared: &Shared, session: &Arc<Session>) -> Backlog {
    let limits = shared.router.limits();
    let max_inflight = shared.config.max_inflight;
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
            drop(st);
            let mut batch = Vec::new();
            let done = shared.router.retained_step(&mut cursor, room, &mut batch);
            st = session.state();
            let (count, before) = (batch.len(), io.wbuf.len());
            st.write_retained(&mut io.wbuf, batch, cursor.qos, limits);
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
        shared.drained.notify_waiters();
    }
    backlog
}

/// Tries again to route the parked message, once some session drained (or it waited
/// [`PARK_MAX`]). Returns true when the caller should come back soon (a drain came meanwhile).
fn retry_parked<'a>(
    cx: &mut Context<'_>,
    io: &mut Io,
    shared: &'a Shared,
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
    parked.drained.set(shared.drained.notified());
    parked.drained.as_mut().enable();
    let message = Arc::clone(&parked.message);
    let routed = if waited_enough {
        shared.router.publish(message);
        true
    } else {
        match shared.router.try_publish(message) {
            Ok(()) => true,
            Err(_) => false,
        }
    };
    if routed {
        acknowledge(io, parked.qos, parked.pkid);
        state.parked = None;
        return false;
    }
    if timer_fired {
        parked.retry_at = now + PARK_MAX;
    }
    parked.drained.as_mut().poll(cx).is_ready()
}

/// Answers a routed PUBLISH: PUBACK for QoS 1, PUBREC for QoS 2.
fn acknowledge(io: &mut Io, qos: QoS, pkid: u16) {
    match qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => io.send(&Packet::PubAck(PubAck::new(pkid))),
        QoS::ExactlyOnce => io.send(&Packet::PubRec(PubRec::new(pkid))),
    }
}

/// Sets the connection's one timer to its earliest deadline. `Ready(Some)` when a deadline has
/// passed (the connection ends), `Ready(None)` when the timer fired early and was re-armed.
fn deadlines(
    cx: &mut Context<'_>,
    shared: &Shared,
    conn: &Established,
    io: &Io,
    mut timer: Pin<&mut tokio::time::Sleep>,
    d: &mut Deadlines,
    retry_parked_at: Option<Instant>,
) -> Poll<Option<DisconnectReason>> {
    let config = &shared.config;
    // Moved earlier when needed and otherwise left to fire and be pushed to the current
    // deadline (keep-alive deadlines only ever move later).
    let deadline = [
        conn.keep_alive.map(|ka| d.last_received + ka),
        d.partial_since.map(|s| s + config.packet_read_timeout),
        d.stalled_since.map(|s| s + config.write_stall_timeout),
        retry_parked_at,
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
    if let Some(ka) = conn.keep_alive {
        if now >= d.last_received + ka {
            tracing::info!(
                client_id = &*session.client_id,
                silent_for = ?now.duration_since(d.last_received),
                "Keep-alive timeout: no packet received; closing."
            );
            return Poll::Ready(Some(DisconnectReason::KeepaliveTimeout));
        }
    }
    if let Some(since) = d.partial_since {
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
/// Refused topic filters: one line per interval for the whole broker.
static FILTER_REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A SUBSCRIBE or UNSUBSCRIBE applied a slice of filters per wake-up, so that one packet of
/// thousands of filters does not hold a runtime thread (or the router's lock) for long.
enum Job {
    Subscribe {
        pkid: u16,
        filters: std::vec::IntoIter<SubscribeFilter>,
        codes: Vec<SubscribeReasonCode>,
        /// Retained deliveries of the granted filters, started once the SUBACK is written.
        cursors: Vec<Cursor>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
        /// Filters handled so far.
        done: usize,
    },
}

impl Job {
    /// Applies the next slice of filters; true when the packet is done (its ack is written).
    fn run(&mut self, io: &mut Io, shared: &Shared, session: &Arc<Session>) -> bool {
        let config = &shared.config;
        match self {
            Job::Subscribe {
                pkid,
                filters,
                codes,
                cursors,
            } => {
                let mut granted = Vec::new();
                {
                    let mut st = session.state();
                    for filter in filters.by_ref().take(FILTER_BUDGET) {
                        let refusal =
                            if !topic::valid_topic_filter(&filter.path, config.max_topic_levels) {
                                Some(SubscriptionRefusal::InvalidFilter)
                            } else if granted.len() + cursors.len()
                                >= config.max_filters_per_subscribe
                            {
                                Some(SubscriptionRefusal::FiltersPerSubscribe)
                            } else if st.subscription_count()
                                >= config.max_subscriptions_per_session
                                && !st.is_subscribed(&filter.path)
                            {
                                Some(SubscriptionRefusal::SubscriptionsPerSession)
                            } else {
                                None
                            };
                        match refusal {
                            Some(reason) => {
                                metrics().subscriptions_refused.inc(reason);
                                if let Some(suppressed) = FILTER_REFUSED_LOG.check() {
                                    tracing::info!(
                                        client_id = &*session.client_id,
                                        filter = filter.path.as_str(),
                                        reason = reason.as_str(),
                                        suppressed,
                                        "Topic filter refused (SUBACK 0x80)."
                                    );
                                }
                                codes.push(SubscribeReasonCode::Failure);
                            }
                            None => {
                                st.add_subscription(&filter.path, filter.qos);
                                codes.push(SubscribeReasonCode::Success(filter.qos));
                                granted.push(filter);
                            }
                        }
                    }
                }
                // The session lock is never held while taking the router's.
                shared
                    .router
                    .subscribe(session, granted.iter().map(|f| (f.path.as_str(), f.qos)));
                cursors.extend(
                    granted
                        .into_iter()
                        .map(|f| Cursor::new(f.path.into_boxed_str(), f.qos)),
                );
                if filters.len() > 0 {
                    return false;
                }
                io.send(&Packet::SubAck(SubAck::new(*pkid, std::mem::take(codes))));
                // Retained messages follow the SUBACK, streamed as the socket takes them.
                session.state().add_retained(std::mem::take(cursors));
                true
            }
            Job::Unsubscribe {
                pkid,
                filters,
                done,
            } => {
                let end = (*done + FILTER_BUDGET).min(filters.len());
                let slice = &filters[*done..end];
                {
                    let mut st = session.state();
                    for filter in slice {
                        st.remove_subscription(filter);
                    }
                    st.remove_retained(slice);
                }
                shared
                    .router
                    .unsubscribe(session.key, slice.iter().map(String::as_str));
                *done = end;
                if *done < filters.len() {
                    return false;
                }
                io.send(&Packet::UnsubAck(UnsubAck::new(*pkid)));
                true
            }
        }
    }
}

fn handle<'a>(
    io: &mut Io,
    shared: &'a Shared,
    session: &Arc<Session>,
    packet: Packet,
    state: &mut ServeState<'a>,
) -> Result<(), DisconnectReason> {
    let limits = shared.router.limits();
    match packet {
        Packet::Publish(publish) => {
            if !topic::valid_topic_name(&publish.topic, shared.config.max_topic_levels) {
                tracing::info!(
                    client_id = &*session.client_id,
                    topic = publish.topic.as_str(),
                    "PUBLISH to an invalid topic name; closing."
                );
                return Err(DisconnectReason::ProtocolError);
            }
            // QoS 2: routed on first receipt; a redelivery before PUBREL is only acknowledged.
            if publish.qos == QoS::ExactlyOnce && !session.state().receive_qos2(publish.pkid) {
                acknowledge(io, publish.qos, publish.pkid);
                return Ok(());
            }
            let message = Arc::new(Message {
                topic: publish.topic.into_boxed_str(),
                payload: Bytes::copy_from_slice(&publish.payload),
                qos: publish.qos,
                retain: publish.retain,
            });
            let Err(message) = shared.router.try_publish(message) else {
                acknowledge(io, publish.qos, publish.pkid);
                return Ok(());
            };
            // A subscriber is congested while the broker could drain it: stop reading from
            // this client until it has (the kernel's buffers then slow the client down).
            metrics().publish_backpressure.inc();
            let mut drained = Box::pin(shared.drained.notified());
            drained.as_mut().enable();
            let Err(message) = shared.router.try_publish(message) else {
                acknowledge(io, publish.qos, publish.pkid);
                return Ok(());
            };
            let now = Instant::now();
            state.parked = Some(Box::new(Parked {
                message,
                qos: publish.qos,
                pkid: publish.pkid,
                since: now,
                retry_at: now + PARK_MAX,
                drained,
            }));
        }
        Packet::PubAck(ack) => {
            if !session.state().puback(ack.pkid, limits) {
                tracing::debug!(pkid = ack.pkid, "PUBACK for an unknown packet id.");
            }
        }
        Packet::PubRec(rec) => {
            if !session.state().pubrec(rec.pkid) {
                tracing::debug!(pkid = rec.pkid, "PUBREC for an unknown packet id.");
            }
            io.send(&Packet::PubRel(PubRel::new(rec.pkid)));
        }
        Packet::PubRel(rel) => {
            session.state().release_qos2(rel.pkid);
            io.send(&Packet::PubComp(PubComp::new(rel.pkid)));
        }
        Packet::PubComp(comp) => {
            if !session.state().pubcomp(comp.pkid, limits) {
                tracing::debug!(pkid = comp.pkid, "PUBCOMP for an unknown packet id.");
            }
        }
        Packet::Subscribe(subscribe) => {
            let count = subscribe.filters.len();
            let mut new = Job::Subscribe {
                pkid: subscribe.pkid,
                filters: subscribe.filters.into_iter(),
                codes: Vec::with_capacity(count),
                cursors: Vec::new(),
            };
            if !new.run(io, shared, session) {
                state.job = Some(Box::new(new));
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.topics.is_empty() {
                tracing::info!(
                    client_id = &*session.client_id,
                    "UNSUBSCRIBE without topic filters; closing."
                );
                return Err(DisconnectReason::ProtocolError);
            }
            let mut new = Job::Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: unsubscribe.topics,
                done: 0,
            };
            if !new.run(io, shared, session) {
                state.job = Some(Box::new(new));
            }
        }
        Packet::PingReq => io.send(&Packet::PingResp),
        Packet::Disconnect => return Err(DisconnectReason::ClientDisconnect),
        Packet::Connect(_) => {
            tracing::info!(
                client_id = &*session.client_id,
                "Second CONNECT on one connection; closing."
            );
            return Err(DisconnectReason::ProtocolError);
        }
        other @ (Packet::ConnAck(_)
        | Packet::SubAck(_)
        | Packet::UnsubAck(_)
        | Packet::PingResp) => {
            tracing::info!(
                client_id = &*session.client_id,
                packet = codec::packet_type(&other).as_str(),
                "Server-only packet from a client; closing."
            );
            return Err(DisconnectReason::ProtocolError);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_bounds() {
        let mut c = MqttConfig::default();
        assert_eq!(keep_alive(30, &c), Ok(30));
        // The default bound: a client's 0 ("never") becomes 65535 s.
        assert_eq!(keep_alive(0, &c), Ok(65_535));
        c.max_keepalive = 0;
        assert_eq!(keep_alive(0, &c), Ok(0), "0: no upper bound");
        c.min_keepalive = Some(10);
        c.max_keepalive = 60;
        assert_eq!(keep_alive(5, &c), Ok(10));
        assert_eq!(keep_alive(0, &c), Ok(60));
        assert_eq!(keep_alive(61, &c), Ok(60));
        assert_eq!(keep_alive(30, &c), Ok(30));
        c.keepalive_policy = KeepAlivePolicy::Reject;
        assert!(keep_alive(5, &c).is_err());
        assert!(keep_alive(0, &c).is_err());
        assert_eq!(keep_alive(10, &c), Ok(10));
    }

    #[test]
    fn client_ids() {
        let c = MqttConfig::default();
        let mut connect = Connect::new("bad/id");
        assert_eq!(client_id(&connect, &c).as_deref(), Ok("bad/id"));
        connect.client_id = String::new();
        assert!(client_id(&connect, &c).is_ok_and(|id| id.starts_with("hw-")));
        connect.clean_session = false;
        assert!(client_id(&connect, &c).is_err());
        connect.client_id = "a\u{1}b".into();
        assert!(client_id(&connect, &c).is_err());
        connect.client_id = "x".repeat(c.max_client_id_len + 1);
        assert!(client_id(&connect, &c).is_err());
    }
}
#[cfg(test)]
mod size {
    /// An idle connection's memory is mostly its task and its session; keep both small (at
    /// most 2 KiB RSS per idle connection in total, and less is the goal).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tx, _rx) = crate::event::channel(1);
        let shared = std::sync::Arc::new(super::Shared::new(Default::default(), tx));
        let fut = super::run(stream, shared, tokio_util::sync::CancellationToken::new());
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 512, "connection future is {size} bytes");
        eprintln!(
            "connection future: {size} bytes, session: {} bytes",
            std::mem::size_of::<super::Session>()
        );
        assert!(std::mem::size_of::<super::Session>() <= 256);
    }
}
