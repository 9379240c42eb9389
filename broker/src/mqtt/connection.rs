//! One task per TCP connection: CONNECT within `connect_timeout`, session attach (with takeover),
//! then a loop that reads packets, writes queued messages and enforces keep-alive and the write
//! deadline, until the connection ends with exactly one [`DisconnectReason`].
//!
//! Keep-alive is exact: the deadline is the last *received* byte plus keep-alive x multiplier;
//! nothing the broker sends moves it. One timer per connection serves both deadlines and is
//! re-armed lazily (when it fires early it is pushed to the current deadline), so an active
//! connection costs about one timer operation per keep-alive period.
//!
//! An idle connection holds no read or write buffer: both are allocated when bytes arrive or
//! leave and released once empty.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, PubAck, PubComp, PubRec, PubRel, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::codec::{self, CodecError, ConnackCode};
use super::session::{Message, Session};
use super::{topic, Attach, Shared};
use crate::config::{KeepAlivePolicy, MqttConfig};
use crate::metrics::metrics;
use crate::presence::{ConnectionEvent, DisconnectReason, SessionId};

/// Bytes read from the socket per read call.
const READ_CHUNK: usize = 4096;
/// Most bytes read in one wake-up before other work gets a turn.
const READ_BUDGET: usize = 64 * 1024;
/// Queued messages are moved into the write buffer until it holds this many bytes.
const WRITE_HIGH_WATER: usize = 64 * 1024;

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
}

impl Io {
    /// Reads what the socket has, up to [`READ_BUDGET`]. Returns (bytes read, end of stream,
    /// budget exhausted with more possibly waiting).
    fn read_available(&mut self) -> io::Result<(usize, bool, bool)> {
        let mut total = 0;
        let mut exhausted = true;
        while total < READ_BUDGET {
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Ok((total, true, false)),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    exhausted = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((total, false, exhausted))
    }

    /// The next complete packet in the read buffer, if any.
    fn next_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        let before = self.rbuf.len();
        let packet = codec::read_packet(&mut self.rbuf, self.max_packet_size)?;
        if let Some(p) = &packet {
            let size = before - self.rbuf.len();
            metrics().received.count(codec::packet_label(p), 1, size);
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            // Give the buffer back while the connection is idle.
            self.rbuf = BytesMut::new();
        }
        Ok(packet)
    }

    /// Reads until one packet is complete (used for CONNECT).
    async fn read_packet(&mut self) -> Result<Packet, ReadError> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(packet);
            }
            self.stream.readable().await?;
            if let (_, true, _) = self.read_available()? {
                return match self.next_packet()? {
                    Some(packet) => Ok(packet),
                    None => Err(ReadError::Closed),
                };
            }
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
        metrics().sent.count(codec::packet_label(packet), 1, size);
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

fn refused(reason: &'static str) {
    metrics()
        .connections_refused
        .with_label_values(&[reason])
        .inc();
}

fn configure_socket(stream: &TcpStream, config: &MqttConfig) {
    // MQTT packets are small and latency matters more than segment count.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "Cannot set TCP_NODELAY.");
    }
    // Half-open peers: the kernel gives up on unacknowledged data after write_timeout.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(error) =
        socket2::SockRef::from(stream).set_tcp_user_timeout(Some(config.write_timeout))
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
/// poll loop.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    configure_socket(&stream, &shared.config);
    let mut io = Io {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        max_packet_size: shared.config.max_packet_size,
    };
    let Some(conn) = Box::pin(handshake(&mut io, peer, &shared, &shutdown)).await else {
        return;
    };
    let reason = serve(&mut io, &shared, &conn, &shutdown).await;
    drop(io);
    Box::pin(close(&shared, conn, reason)).await;
}

/// CONNECT within the timeout, validation, session attach (with takeover), the Connected event
/// and the CONNACK. `None` when the connection was refused (and already answered).
async fn handshake(
    io: &mut Io,
    peer: SocketAddr,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Option<Established> {
    let config = &shared.config;
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            refused("broker_shutdown");
            return None;
        }
        first = tokio::time::timeout(config.connect_timeout, io.read_packet()) => first,
    };
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            tracing::info!(%peer,
                packet = codec::packet_label(&other),
                "First packet is not CONNECT; closing."
            );
            refused("protocol_error");
            return None;
        }
        Ok(Err(ReadError::Codec(CodecError::UnsupportedProtocol { name, level }))) => {
            tracing::info!(%peer, name = name.as_str(), level, "Unsupported protocol version; CONNACK 0x01.");
            refused("unsupported_protocol_version");
            io.refuse(ConnackCode::UnacceptableProtocolVersion).await;
            return None;
        }
        Ok(Err(ReadError::Codec(error))) => {
            tracing::info!(%peer, %error, "Invalid packet before CONNECT; closing.");
            refused("protocol_error");
            return None;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "Connection closed before CONNECT.");
            refused("connection_lost");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?config.connect_timeout, "No CONNECT within the connect timeout; closing.");
            refused("connect_timeout");
            return None;
        }
    };

    let client_id = match client_id(&connect, config) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(%peer, client_id = connect.client_id.as_str(), why, "Client identifier rejected; CONNACK 0x02.");
            refused("identifier_rejected");
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
            refused("keepalive_rejected");
            io.refuse(ConnackCode::IdentifierRejected).await;
            return None;
        }
    };
    if let Some(will) = &connect.last_will {
        if !topic::valid_topic_name(&will.topic) {
            tracing::info!(%peer, topic = will.topic.as_str(), "Invalid will topic; closing.");
            refused("protocol_error");
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
            refused("broker_shutdown");
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
    metrics()
        .disconnects
        .with_label_values(&[reason.as_str()])
        .inc();
    match reason {
        DisconnectReason::KeepaliveTimeout => metrics().keepalive_timeouts.inc(),
        DisconnectReason::Takeover => metrics().takeovers.inc(),
        _ => {}
    }
    let session = conn.session;

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
    shared.router.publish(Message {
        topic: will.topic.into_boxed_str(),
        payload: Bytes::copy_from_slice(&will.message),
        qos: will.qos,
        retain: will.retain,
    });
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

/// The keep-alive in force after applying `min_keepalive`/`max_keepalive`. 0 means "never
/// expires"; only `max_keepalive` bounds it.
fn keep_alive(requested: u16, config: &MqttConfig) -> Result<u16, &'static str> {
    let too_low = config
        .min_keepalive
        .filter(|min| requested != 0 && requested < *min);
    let too_high = config
        .max_keepalive
        .filter(|max| requested == 0 || requested > *max);
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
    /// When bytes were last received: the keep-alive deadline counts from here only.
    last_received: Instant,
    /// Since when the write buffer has been waiting for the socket.
    stalled_since: Option<Instant>,
    /// The instant the timer is set to, if it is armed.
    armed: Option<Instant>,
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
    let mut deadlines = Deadlines {
        last_received: Instant::now(),
        stalled_since: None,
        armed: None,
    };
    // The CONNACK goes out before anything else, even a takeover that is already waiting.
    if let Err(error) = io.try_flush() {
        tracing::debug!(%error, "Write failed.");
        return DisconnectReason::ConnectionLost;
    }
    // Packets that arrived together with the CONNECT are already buffered.
    if let Err(reason) = handle_packets(io, shared, &conn.session) {
        return reason;
    }
    // Shutdown reaches an established connection as a session signal (Shared::close_all); a
    // connection that attached after that sweep sees the token here.
    if shutdown.is_cancelled() {
        return DisconnectReason::BrokerShutdown;
    }
    std::future::poll_fn(|cx| poll_serve(cx, io, shared, conn, timer.as_mut(), &mut deadlines))
        .await
}

/// One wake-up of an established connection: signals, reads, writes, deadlines.
///
/// Readiness is polled directly (`poll_read_ready`, `poll_write_ready`, the session's waker) so
/// that waiting costs no per-wait future inside the task.
fn poll_serve(
    cx: &mut Context<'_>,
    io: &mut Io,
    shared: &Shared,
    conn: &Established,
    mut timer: Pin<&mut tokio::time::Sleep>,
    d: &mut Deadlines,
) -> Poll<DisconnectReason> {
    let session = &conn.session;
    let write_timeout = shared.config.write_timeout;
    loop {
        let signals = session.take_signals(cx.waker());
        if signals.shutdown() {
            return Poll::Ready(DisconnectReason::BrokerShutdown);
        }
        if signals.kicked() {
            return Poll::Ready(DisconnectReason::Takeover);
        }

        let mut yield_now = false;
        match io.stream.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {
                let (n, eof, exhausted) = match io.read_available() {
                    Ok(read) => read,
                    Err(error) => {
                        tracing::debug!(%error, "Read failed.");
                        return Poll::Ready(DisconnectReason::ConnectionLost);
                    }
                };
                if n > 0 {
                    d.last_received = Instant::now();
                    session.touch();
                }
                if let Err(reason) = handle_packets(io, shared, session) {
                    return Poll::Ready(reason);
                }
                if eof {
                    tracing::debug!("Connection closed by peer without DISCONNECT.");
                    return Poll::Ready(DisconnectReason::ConnectionLost);
                }
                // A client that keeps the socket full gets its turn again later, not now.
                yield_now = exhausted;
                if !exhausted {
                    // Readiness was cleared by WouldBlock: poll again so that the waker is
                    // registered for the next bytes.
                    continue;
                }
            }
            Poll::Ready(Err(error)) => {
                tracing::debug!(%error, "Socket error.");
                return Poll::Ready(DisconnectReason::ConnectionLost);
            }
            Poll::Pending => {}
        }

        if io.wbuf.len() < WRITE_HIGH_WATER {
            let before = io.wbuf.len();
            let written = session.state().write_pending(
                &mut io.wbuf,
                WRITE_HIGH_WATER,
                shared.config.max_inflight,
            );
            if written > 0 {
                let size = io.wbuf.len() - before;
                metrics().sent.count("publish", written as u64, size);
            }
        }
        let written = match io.try_flush() {
            Ok(written) => written,
            Err(error) => {
                tracing::debug!(%error, "Write failed.");
                return Poll::Ready(DisconnectReason::ConnectionLost);
            }
        };
        if io.wbuf.is_empty() {
            d.stalled_since = None;
        } else {
            // The write deadline counts from the last progress: a slow reader that keeps
            // taking bytes is not a stalled one.
            if written > 0 || d.stalled_since.is_none() {
                d.stalled_since = Some(Instant::now());
            }
            match io.stream.poll_write_ready(cx) {
                // Room again: write more right away.
                Poll::Ready(Ok(())) if !yield_now => continue,
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(error)) => {
                    tracing::debug!(%error, "Socket error.");
                    return Poll::Ready(DisconnectReason::ConnectionLost);
                }
            }
        }

        // One timer for both deadlines, moved earlier when needed and otherwise left to fire
        // and be pushed to the current deadline (keep-alive deadlines only ever move later).
        let deadline = [
            conn.keep_alive.map(|ka| d.last_received + ka),
            d.stalled_since.map(|s| s + write_timeout),
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
        if d.armed.is_some() && timer.as_mut().poll(cx).is_ready() {
            d.armed = None;
            let now = Instant::now();
            if let Some(ka) = conn.keep_alive {
                if now >= d.last_received + ka {
                    tracing::info!(
                        client_id = &*session.client_id,
                        silent_for = ?now.duration_since(d.last_received),
                        "Keep-alive timeout: nothing received; closing."
                    );
                    return Poll::Ready(DisconnectReason::KeepaliveTimeout);
                }
            }
            if let Some(since) = d.stalled_since {
                if now >= since + write_timeout {
                    tracing::info!(
                        client_id = &*session.client_id,
                        pending_bytes = io.wbuf.len(),
                        "Writes made no progress within the write timeout; closing."
                    );
                    return Poll::Ready(DisconnectReason::ConnectionLost);
                }
            }
            // Fired early (the deadline moved): re-arm.
            continue;
        }

        if yield_now {
            cx.waker().wake_by_ref();
        }
        return Poll::Pending;
    }
}

/// Handles every complete packet in the read buffer.
fn handle_packets(
    io: &mut Io,
    shared: &Shared,
    session: &Arc<Session>,
) -> Result<(), DisconnectReason> {
    loop {
        match io.next_packet() {
            Ok(Some(packet)) => handle(io, shared, session, packet)?,
            Ok(None) => return Ok(()),
            Err(error) => {
                tracing::info!(client_id = &*session.client_id, %error, "Protocol error; closing.");
                return Err(DisconnectReason::ProtocolError);
            }
        }
    }
}

fn handle(
    io: &mut Io,
    shared: &Shared,
    session: &Arc<Session>,
    packet: Packet,
) -> Result<(), DisconnectReason> {
    match packet {
        Packet::Publish(publish) => {
            if !topic::valid_topic_name(&publish.topic) {
                tracing::info!(
                    client_id = &*session.client_id,
                    topic = publish.topic.as_str(),
                    "PUBLISH to an invalid topic name; closing."
                );
                return Err(DisconnectReason::ProtocolError);
            }
            let message = Message {
                topic: publish.topic.into_boxed_str(),
                payload: Bytes::copy_from_slice(&publish.payload),
                qos: publish.qos,
                retain: publish.retain,
            };
            match publish.qos {
                QoS::AtMostOnce => shared.router.publish(message),
                QoS::AtLeastOnce => {
                    shared.router.publish(message);
                    io.send(&Packet::PubAck(PubAck::new(publish.pkid)));
                }
                QoS::ExactlyOnce => {
                    // Routed on first receipt; a redelivery before PUBREL is only acknowledged.
                    if session.state().receive_qos2(publish.pkid) {
                        shared.router.publish(message);
                    }
                    io.send(&Packet::PubRec(PubRec::new(publish.pkid)));
                }
            }
        }
        Packet::PubAck(ack) => {
            if !session.state().puback(ack.pkid) {
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
            if !session.state().pubcomp(comp.pkid) {
                tracing::debug!(pkid = comp.pkid, "PUBCOMP for an unknown packet id.");
            }
        }
        Packet::Subscribe(subscribe) => {
            let mut codes = Vec::with_capacity(subscribe.filters.len());
            let mut granted = Vec::with_capacity(subscribe.filters.len());
            for filter in subscribe.filters {
                if topic::valid_topic_filter(&filter.path) {
                    shared.router.subscribe(session, &filter.path, filter.qos);
                    codes.push(SubscribeReasonCode::Success(filter.qos));
                    granted.push((filter.path, filter.qos));
                } else {
                    tracing::info!(
                        client_id = &*session.client_id,
                        filter = filter.path.as_str(),
                        "Invalid topic filter refused."
                    );
                    codes.push(SubscribeReasonCode::Failure);
                }
            }
            {
                let mut st = session.state();
                for (filter, qos) in &granted {
                    st.add_subscription(filter, *qos);
                }
            }
            io.send(&Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
            // Retained messages follow the SUBACK (they are written from the queue).
            for (filter, qos) in granted {
                shared.router.send_retained(session, &filter, qos);
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
            shared
                .router
                .unsubscribe(session.key, unsubscribe.topics.iter().map(|t| t.as_str()));
            {
                let mut st = session.state();
                for filter in &unsubscribe.topics {
                    st.remove_subscription(filter);
                }
            }
            io.send(&Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
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
                packet = codec::packet_label(&other),
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
        assert_eq!(keep_alive(0, &c), Ok(0));
        assert_eq!(keep_alive(30, &c), Ok(30));
        c.min_keepalive = Some(10);
        c.max_keepalive = Some(60);
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
    /// An idle connection's memory is mostly its task; keep the future small (issue: at most
    /// 2 KiB RSS per idle connection in total).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tx, _rx) = crate::presence::channel(1);
        let shared = std::sync::Arc::new(super::Shared::new(Default::default(), tx));
        let fut = super::run(
            stream,
            addr,
            shared,
            tokio_util::sync::CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 640, "connection future is {size} bytes");
        eprintln!(
            "connection future: {size} bytes, session: {} bytes",
            std::mem::size_of::<super::Session>()
        );
        assert!(std::mem::size_of::<super::Session>() <= 256);
    }
}
