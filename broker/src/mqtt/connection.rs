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

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
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
use super::session::{Message, Owner, Session};
use super::{topic, Shared};
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
    /// Reads what the socket has (up to [`READ_BUDGET`]). Returns (bytes read, end of stream).
    fn read_available(&mut self) -> io::Result<(usize, bool)> {
        let mut total = 0;
        while total < READ_BUDGET {
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Ok((total, true)),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        metrics().bytes_received.inc_by(total as u64);
        Ok((total, false))
    }

    /// The next complete packet in the read buffer, if any.
    fn next_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        let packet = codec::read_packet(&mut self.rbuf, self.max_packet_size)?;
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            // Give the buffer back while the connection is idle.
            self.rbuf = BytesMut::new();
        }
        if let Some(p) = &packet {
            metrics()
                .packets_received
                .with_label_values(&[codec::packet_label(p)])
                .inc();
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
            if let (_, true) = self.read_available()? {
                return match self.next_packet()? {
                    Some(packet) => Ok(packet),
                    None => Err(ReadError::Closed),
                };
            }
        }
    }

    /// Writes as much of the write buffer as the socket takes without blocking.
    fn try_flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    metrics().bytes_sent.inc_by(n as u64);
                    let _ = self.wbuf.split_to(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf = BytesMut::new();
        Ok(())
    }

    /// Queues a control packet.
    fn send(&mut self, packet: &Packet) {
        metrics()
            .packets_sent
            .with_label_values(&[codec::packet_label(packet)])
            .inc();
        codec::write_packet(&mut self.wbuf, packet);
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

/// Serves one accepted socket until it closes.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let config = &shared.config;
    configure_socket(&stream, config);
    let mut io = Io {
        stream,
        rbuf: BytesMut::new(),
        wbuf: BytesMut::new(),
        max_packet_size: config.max_packet_size,
    };

    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            refused("broker_shutdown");
            return;
        }
        first = tokio::time::timeout(config.connect_timeout, io.read_packet()) => first,
    };
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            tracing::info!(
                packet = codec::packet_label(&other),
                "First packet is not CONNECT; closing."
            );
            refused("protocol_error");
            return;
        }
        Ok(Err(ReadError::Codec(CodecError::UnsupportedProtocol { name, level }))) => {
            tracing::info!(%name, level, "Unsupported protocol version; CONNACK 0x01.");
            refused("unsupported_protocol_version");
            io.refuse(ConnackCode::UnacceptableProtocolVersion).await;
            return;
        }
        Ok(Err(ReadError::Codec(error))) => {
            tracing::info!(%error, "Invalid packet before CONNECT; closing.");
            refused("protocol_error");
            return;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "Connection closed before CONNECT.");
            refused("connection_lost");
            return;
        }
        Err(_) => {
            tracing::info!(timeout = ?config.connect_timeout, "No CONNECT within the connect timeout; closing.");
            refused("connect_timeout");
            return;
        }
    };

    let client_id = match client_id(&connect, config) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(client_id = %connect.client_id, why, "Client identifier rejected; CONNACK 0x02.");
            refused("identifier_rejected");
            io.refuse(ConnackCode::IdentifierRejected).await;
            return;
        }
    };
    tracing::Span::current().record("client_id", client_id.as_str());
    let keep_alive = match keep_alive(connect.keep_alive, config) {
        Ok(ka) => ka,
        Err(why) => {
            tracing::info!(
                keep_alive = connect.keep_alive,
                why,
                "Keep-alive refused; CONNACK 0x02."
            );
            refused("keepalive_rejected");
            io.refuse(ConnackCode::IdentifierRejected).await;
            return;
        }
    };
    if let Some(will) = &connect.last_will {
        if !topic::valid_topic_name(&will.topic) {
            tracing::info!(topic = %will.topic, "Invalid will topic; closing.");
            refused("protocol_error");
            return;
        }
    }

    // Take the session over from any connection that holds it, then attach.
    let session_id = SessionId::new();
    let owner = Owner {
        session_id,
        kick: CancellationToken::new(),
        closed: CancellationToken::new(),
    };
    let attach = async {
        loop {
            let session = shared.session(&client_id);
            let guard = session.connect_lock.lock().await;
            let previous = session.state().owner.clone();
            if let Some(previous) = previous {
                tracing::debug!(previous = %previous.session_id, "Taking over the session.");
                previous.kick.cancel();
                previous.closed.cancelled().await;
            }
            if let Some(attached) = shared.attach(&session, owner.clone(), connect.clean_session) {
                let seq = shared.next_seq();
                drop(guard);
                return (session, attached, seq);
            }
        }
    };
    let (session, attached, seq) = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            refused("broker_shutdown");
            return;
        }
        attached = attach => attached,
    };
    // From here on the Disconnected event is owed; `closed` tells a waiting takeover it was sent.
    let _closed = owner.closed.clone().drop_guard();
    shared.router.unsubscribe(
        session.key,
        attached.dropped_subscriptions.iter().map(|f| &**f),
    );

    let connected_at = SystemTime::now();
    let event = ConnectionEvent::Connected {
        client_id: client_id.clone(),
        session_id,
        seq,
        peer,
        keep_alive,
        clean_session: connect.clean_session,
        time: connected_at,
    };
    send_event(&shared, event).await;
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

    let mut conn = Connection {
        io,
        shared: &shared,
        session: &session,
        keep_alive: (keep_alive > 0).then(|| {
            Duration::from_secs(u64::from(keep_alive)).mul_f64(config.keepalive_multiplier)
        }),
        last_received: Instant::now(),
    };
    let reason = conn.serve(&shutdown, &owner.kick).await;
    drop(conn);

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
    let dropped = shared.detach(&session, session_id);
    shared
        .router
        .unsubscribe(session.key, dropped.iter().map(|f| &**f));

    // The will goes out on every close that the client did not ask for, takeover included
    // (the old connection's will, as MQTT 3.1.1 section 3.1.4 requires). A broker shutdown closes
    // every subscriber at the same time, so wills are not sent then.
    if !matches!(
        reason,
        DisconnectReason::ClientDisconnect | DisconnectReason::BrokerShutdown
    ) {
        if let Some(will) = connect.last_will {
            publish_will(&shared, will);
        }
    }

    tracing::debug!(%session_id, reason = reason.as_str(), "Disconnected.");
    let event = ConnectionEvent::Disconnected {
        client_id,
        session_id,
        seq,
        reason,
        time: SystemTime::now(),
    };
    send_event(&shared, event).await;
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
    tracing::debug!(topic = %will.topic, "Publishing will.");
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

/// An established connection.
struct Connection<'a> {
    io: Io,
    shared: &'a Shared,
    session: &'a Arc<Session>,
    /// keep-alive x multiplier; `None` when the client asked for no keep-alive.
    keep_alive: Option<Duration>,
    /// When bytes were last received: the keep-alive deadline counts from here only.
    last_received: Instant,
}

impl Connection<'_> {
    async fn serve(
        &mut self,
        shutdown: &CancellationToken,
        kick: &CancellationToken,
    ) -> DisconnectReason {
        let write_timeout = self.shared.config.write_timeout;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        // Since when the write buffer has been waiting for the socket.
        let mut stalled_since: Option<Instant> = None;

        loop {
            if self.io.wbuf.len() < WRITE_HIGH_WATER {
                let written = self.session.state().write_pending(
                    &mut self.io.wbuf,
                    WRITE_HIGH_WATER,
                    self.shared.config.max_inflight,
                );
                if written > 0 {
                    metrics()
                        .packets_sent
                        .with_label_values(&["publish"])
                        .inc_by(written as u64);
                }
            }
            if let Err(error) = self.io.try_flush() {
                tracing::debug!(%error, "Write failed.");
                return DisconnectReason::ConnectionLost;
            }
            let pending_write = !self.io.wbuf.is_empty();
            stalled_since = match (pending_write, stalled_since) {
                (false, _) => None,
                (true, None) => Some(Instant::now()),
                (true, since) => since,
            };

            let deadline = [
                self.keep_alive.map(|ka| self.last_received + ka),
                stalled_since.map(|s| s + write_timeout),
            ]
            .into_iter()
            .flatten()
            .min();
            match (deadline, armed) {
                (None, _) => armed = None,
                (Some(d), Some(a)) if a <= d => {}
                (Some(d), _) => {
                    timer.as_mut().reset(d);
                    armed = Some(d);
                }
            }

            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return DisconnectReason::BrokerShutdown,
                _ = kick.cancelled() => return DisconnectReason::Takeover,
                readable = self.io.stream.readable() => {
                    if let Err(error) = readable {
                        tracing::debug!(%error, "Socket error.");
                        return DisconnectReason::ConnectionLost;
                    }
                    if let Err(reason) = self.on_readable() {
                        return reason;
                    }
                }
                writable = self.io.stream.writable(), if pending_write => {
                    if writable.is_err() {
                        return DisconnectReason::ConnectionLost;
                    }
                }
                _ = self.session.wake.notified() => {}
                _ = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    if let Some(ka) = self.keep_alive {
                        if now >= self.last_received + ka {
                            tracing::info!(
                                silent_for = ?now.duration_since(self.last_received),
                                "Keep-alive timeout: nothing received; closing."
                            );
                            return DisconnectReason::KeepaliveTimeout;
                        }
                    }
                    if let Some(since) = stalled_since {
                        if now >= since + write_timeout {
                            tracing::info!(
                                pending_bytes = self.io.wbuf.len(),
                                "Writes made no progress within the write timeout; closing."
                            );
                            return DisconnectReason::ConnectionLost;
                        }
                    }
                }
            }
        }
    }

    /// Reads what arrived and handles every complete packet.
    fn on_readable(&mut self) -> Result<(), DisconnectReason> {
        let (n, eof) = self.io.read_available().map_err(|error| {
            tracing::debug!(%error, "Read failed.");
            DisconnectReason::ConnectionLost
        })?;
        if n > 0 {
            self.last_received = Instant::now();
        }
        loop {
            match self.io.next_packet() {
                Ok(Some(packet)) => self.handle(packet)?,
                Ok(None) => break,
                Err(error) => {
                    tracing::info!(%error, "Protocol error; closing.");
                    return Err(DisconnectReason::ProtocolError);
                }
            }
        }
        if eof {
            tracing::debug!("Connection closed by peer without DISCONNECT.");
            return Err(DisconnectReason::ConnectionLost);
        }
        Ok(())
    }

    fn handle(&mut self, packet: Packet) -> Result<(), DisconnectReason> {
        match packet {
            Packet::Publish(publish) => {
                if !topic::valid_topic_name(&publish.topic) {
                    tracing::info!(topic = %publish.topic, "PUBLISH to an invalid topic name; closing.");
                    return Err(DisconnectReason::ProtocolError);
                }
                let message = Message {
                    topic: publish.topic.into_boxed_str(),
                    payload: Bytes::copy_from_slice(&publish.payload),
                    qos: publish.qos,
                    retain: publish.retain,
                };
                match publish.qos {
                    QoS::AtMostOnce => self.shared.router.publish(message),
                    QoS::AtLeastOnce => {
                        self.shared.router.publish(message);
                        self.io.send(&Packet::PubAck(PubAck::new(publish.pkid)));
                    }
                    QoS::ExactlyOnce => {
                        // Routed on first receipt; a redelivery before PUBREL is only acknowledged.
                        if self.session.state().receive_qos2(publish.pkid) {
                            self.shared.router.publish(message);
                        }
                        self.io.send(&Packet::PubRec(PubRec::new(publish.pkid)));
                    }
                }
            }
            Packet::PubAck(ack) => {
                if !self.session.state().puback(ack.pkid) {
                    tracing::debug!(pkid = ack.pkid, "PUBACK for an unknown packet id.");
                }
            }
            Packet::PubRec(rec) => {
                if !self.session.state().pubrec(rec.pkid) {
                    tracing::debug!(pkid = rec.pkid, "PUBREC for an unknown packet id.");
                }
                self.io.send(&Packet::PubRel(PubRel::new(rec.pkid)));
            }
            Packet::PubRel(rel) => {
                self.session.state().release_qos2(rel.pkid);
                self.io.send(&Packet::PubComp(PubComp::new(rel.pkid)));
            }
            Packet::PubComp(comp) => {
                if !self.session.state().pubcomp(comp.pkid) {
                    tracing::debug!(pkid = comp.pkid, "PUBCOMP for an unknown packet id.");
                }
            }
            Packet::Subscribe(subscribe) => {
                let mut codes = Vec::with_capacity(subscribe.filters.len());
                let mut granted = Vec::with_capacity(subscribe.filters.len());
                for filter in subscribe.filters {
                    if topic::valid_topic_filter(&filter.path) {
                        self.shared
                            .router
                            .subscribe(self.session, &filter.path, filter.qos);
                        codes.push(SubscribeReasonCode::Success(filter.qos));
                        granted.push((filter.path, filter.qos));
                    } else {
                        tracing::info!(filter = %filter.path, "Invalid topic filter refused.");
                        codes.push(SubscribeReasonCode::Failure);
                    }
                }
                {
                    let mut st = self.session.state();
                    for (filter, qos) in &granted {
                        st.subscriptions.insert(filter.as_str().into(), *qos);
                    }
                }
                self.io
                    .send(&Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
                // Retained messages follow the SUBACK (they are written from the queue).
                for (filter, qos) in granted {
                    self.shared.router.send_retained(self.session, &filter, qos);
                }
            }
            Packet::Unsubscribe(unsubscribe) => {
                if unsubscribe.topics.is_empty() {
                    tracing::info!("UNSUBSCRIBE without topic filters; closing.");
                    return Err(DisconnectReason::ProtocolError);
                }
                self.shared.router.unsubscribe(
                    self.session.key,
                    unsubscribe.topics.iter().map(|t| t.as_str()),
                );
                {
                    let mut st = self.session.state();
                    for filter in &unsubscribe.topics {
                        st.subscriptions.remove(filter.as_str());
                    }
                }
                self.io
                    .send(&Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
            }
            Packet::PingReq => self.io.send(&Packet::PingResp),
            Packet::Disconnect => return Err(DisconnectReason::ClientDisconnect),
            Packet::Connect(_) => {
                tracing::info!("Second CONNECT on one connection; closing.");
                return Err(DisconnectReason::ProtocolError);
            }
            other @ (Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => {
                tracing::info!(
                    packet = codec::packet_label(&other),
                    "Server-only packet from a client; closing."
                );
                return Err(DisconnectReason::ProtocolError);
            }
        }
        Ok(())
    }
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
