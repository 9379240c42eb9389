//! One task per client connection, in four parts, each a module: [`io`] (the stream and its
//! on-demand buffers, generic over the [`Transport`]), [`handshake`](mod@handshake) (CONNECT, validation,
//! attaching to the session with takeover, CONNACK), [`serve`](mod@serve) (the loop of reads, writes and
//! deadlines until the connection ends with exactly one [`DisconnectReason`]) and [`packets`]
//! (what each packet means). Here: the task itself and its close (detach, will, the
//! Disconnected event).
//!
//! Memory: an idle connection holds no read or write buffer (both are allocated when bytes
//! arrive or leave and released once empty), and its task is a small poll loop. A packet larger
//! than one read chunk is buffered only as its bytes arrive, and only while the broker-wide
//! `mqtt.max_buffered_read_bytes` allows.

pub mod handshake;
pub mod io;
pub mod packets;
pub mod serve;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::event::{self, ConnectionEvent};
use crate::labels::{DisconnectReason, Listener};
use crate::metrics::metrics;
use crate::mqtt::message::Message;
use crate::mqtt::packet::{reason, Will};
use crate::mqtt::Broker;
use handshake::{handshake, Established};
use io::Io;
pub use io::Transport;
use serve::serve;

/// What the listener learnt of a connection before its first MQTT byte.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The client's address (from the PROXY header or a trusted proxy where configured).
    pub peer: SocketAddr,
    /// The listener it came in on.
    pub listener: Listener,
    /// The identity of its verified TLS client certificate.
    pub identity: Option<String>,
    /// When the CONNECT must have arrived (`mqtt.connect_timeout` after the accept).
    pub deadline: Instant,
}

impl Hello {
    /// A connection from `peer` on `listener`.
    pub fn new(
        peer: SocketAddr,
        listener: Listener,
        identity: Option<String>,
        deadline: Instant,
    ) -> Self {
        Self {
            peer,
            listener,
            identity,
            deadline,
        }
    }
}

/// Serves one accepted stream until it closes.
///
/// The handshake and the close are boxed so that their futures (timeouts, event sends) do not
/// stay inside every idle connection's task; the part that lives long is [`serve`](fn@serve), a small
/// poll loop. Not an `async fn`: its arguments would stay in the task for its whole life next
/// to the [`Io`] made of them, so the task starts from the `Io`, and the handshake asks the
/// stream for the peer's address instead of keeping it.
pub fn run<S: Transport>(
    stream: S,
    hello: Hello,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send {
    let mut io = Io::new(stream, broker.config.max_packet_size);
    // Boxed: it is needed by the handshake only, and would otherwise stay in the task.
    let hello = Box::new(hello);
    async move {
        let mut established = Box::pin(handshake(&mut io, hello, &broker, &shutdown)).await;
        let reason = match &mut established {
            Some(conn) => {
                let reason = serve(&mut io, &broker, conn, &shutdown).await;
                // An MQTT 5 client is told why the broker ends its connection: one attempt
                // now, the rest after `close` (a takeover does not wait for a slow reader).
                if let Some(code) = goodbye(reason) {
                    io.disconnect(code, None);
                }
                if io.said_goodbye {
                    let _ = serve::write_now(&mut io);
                }
                Some(reason)
            }
            None => None,
        };
        io.release_budget(&broker.read_budget, &broker.read_budget_freed);
        if let (Some(conn), Some(reason)) = (established, reason) {
            Box::pin(close(&broker, conn, reason, io.goodbye_code, &shutdown)).await;
        }
        // Then the stream's own goodbye: a WebSocket close frame, a TLS close_notify, a TCP
        // FIN, and the peer's answer. After `close`, so that a client that does not answer
        // delays neither its Disconnected event nor a takeover.
        Box::pin(io.shutdown()).await;
    }
}

/// Detach, will, the Disconnected event, and the signals that let a waiting takeover and a
/// paused accept loop go on. `sent` is the reason code of the DISCONNECT the broker sent, if
/// it sent one.
async fn close(
    broker: &Arc<Broker>,
    conn: Established,
    reason: DisconnectReason,
    sent: Option<u8>,
    shutdown: &CancellationToken,
) {
    metrics().connections_current.dec();
    metrics().listener_connections.dec(conn.listener);
    broker
        .open_connections
        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    metrics().disconnects.inc(reason);
    match reason {
        DisconnectReason::KeepaliveTimeout => metrics().keepalive_timeouts.inc(),
        DisconnectReason::Takeover => metrics().takeovers.inc(),
        _ => {}
    }
    let session = conn.session;
    let extras = conn.extras.map(|e| *e).unwrap_or_default();
    if let Some(address) = extras.address {
        broker.addresses.release(address);
    }
    // Nobody drains its queue now: it holds no publisher back.
    if session.set_online(false) {
        broker.drained.notify_waiters();
    }

    // The will goes out on every close that the client did not ask for, takeover included
    // (the old connection's will, as MQTT 3.1.1 section 3.1.4 requires), and on an MQTT 5
    // DISCONNECT 0x04 (a DISCONNECT without it took the will away). A broker shutdown closes
    // every subscriber at the same time, so wills are not sent then. An MQTT 5 will delay
    // holds it back (after the detach below) unless the session ends now.
    let mut delayed = None;
    if reason != DisconnectReason::BrokerShutdown {
        if let Some(will) = extras.will {
            // A takeover is a new connection to the session: a delayed will waits like any
            // other, and the new connection cancels it (MQTT 5 section 3.1.2.5).
            if will.delay > 0 {
                delayed = Some(will);
            } else {
                publish_will(broker, will);
            }
        }
    }

    // The event goes out while this connection still owns the session: a newer connection of
    // the same client id waits for `released`, so its Connected always follows this event.
    tracing::debug!(session_id = %conn.session_id, reason = reason.as_str(), "Disconnected.");
    let time = SystemTime::now();
    let (reason_code, reason_string) = match extras.goodbye {
        Some((code, text)) => (Some(code), text.as_deref().map(event::reason_string)),
        None => (sent, None),
    };
    broker
        .send_event(ConnectionEvent::Disconnected {
            client_id: session.client_id.to_string(),
            session_id: conn.session_id,
            seq: conn.seq,
            reason,
            reason_code,
            reason_string,
            session_expires_at: held_until(broker, &session, reason, time),
            time,
        })
        .await;
    broker.detach(&session, conn.session_id);
    broker.released.notify_waiters();
    broker.connection_closed.notify_waiters();
    if let Some(will) = delayed {
        delay_will(broker, session, will, shutdown);
    }
}

/// Until when `session` is held after its connection ends now with `reason`: `None` when it
/// ends with the connection, goes on with a newer one (takeover), or ends with the broker
/// (a shutdown without persistence).
fn held_until(
    broker: &Broker,
    session: &crate::mqtt::session::Session,
    reason: DisconnectReason,
    now: SystemTime,
) -> Option<SystemTime> {
    // A shutdown ends the sessions with the broker, unless the broker state keeps them.
    if reason == DisconnectReason::Takeover
        || (reason == DisconnectReason::BrokerShutdown && broker.router.store().is_none())
    {
        return None;
    }
    let st = session.state();
    if !st.persistent || st.ended {
        return None;
    }
    now.checked_add(
        st.expiry()
            .unwrap_or(broker.config.persistent_session_expiry),
    )
}

/// Publishes `will` once its will delay has passed, or when the session ends if that is
/// sooner (MQTT 5 section 3.1.3.2.2), unless the client has connected again meanwhile.
fn delay_will(
    broker: &Arc<Broker>,
    session: Arc<crate::mqtt::session::Session>,
    will: Will,
    shutdown: &CancellationToken,
) {
    let (leave, ends_in) = {
        let st = session.state();
        let ends_in = if !st.persistent || st.ended {
            std::time::Duration::ZERO
        } else {
            st.expiry()
                .unwrap_or(broker.config.persistent_session_expiry)
        };
        (st.leaves, ends_in)
    };
    let delay = std::time::Duration::from_secs(u64::from(will.delay)).min(ends_in);
    if delay.is_zero() {
        publish_will(broker, will);
        return;
    }
    let broker = Arc::clone(broker);
    let shutdown = shutdown.clone();
    metrics().wills_delayed.inc();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let back = {
            let st = session.state();
            !st.ended && (st.online || st.leaves != leave)
        };
        metrics().wills_delayed.dec();
        if back {
            tracing::debug!(
                client_id = &*session.client_id,
                "Delayed will cancelled: the client is back."
            );
        } else {
            publish_will(&broker, will);
        }
    });
}

fn publish_will(broker: &Broker, will: Will) {
    metrics().wills_published.inc();
    tracing::debug!(topic = will.topic.as_str(), "Publishing will.");
    broker.router.publish(Arc::new(Message::new(
        will.topic.into_boxed_str(),
        will.payload,
        will.qos,
        will.retain,
        will.properties.as_deref(),
        Instant::now(),
    )));
}

/// The reason code of the DISCONNECT that tells an MQTT 5 client why the broker ended its
/// connection; `None` when the client ended it or the connection is gone.
fn goodbye(reason: DisconnectReason) -> Option<u8> {
    match reason {
        DisconnectReason::Takeover => Some(reason::SESSION_TAKEN_OVER),
        DisconnectReason::KeepaliveTimeout => Some(reason::KEEP_ALIVE_TIMEOUT),
        DisconnectReason::BrokerShutdown | DisconnectReason::BrokerRestart => {
            Some(reason::SERVER_SHUTTING_DOWN)
        }
        DisconnectReason::Kicked => Some(reason::ADMINISTRATIVE_ACTION),
        DisconnectReason::NotAuthorized => Some(reason::NOT_AUTHORIZED),
        DisconnectReason::ProtocolError => Some(reason::PROTOCOL_ERROR),
        DisconnectReason::ClientDisconnect | DisconnectReason::ConnectionLost => None,
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
        let broker = std::sync::Arc::new(crate::mqtt::Broker::new(Default::default(), tx));
        let hello = super::Hello::new(
            addr,
            crate::labels::Listener::Tcp,
            None,
            tokio::time::Instant::now(),
        );
        let fut = super::run(
            stream,
            hello,
            broker,
            tokio_util::sync::CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 496, "connection future is {size} bytes");
        eprintln!(
            "connection future: {size} bytes, session: {} bytes",
            std::mem::size_of::<crate::mqtt::session::Session>()
        );
        // 264 bytes: an `Arc<Session>` asks malloc for 280, which glibc serves from the same
        // 288-byte chunk as it would 272 (a 256-byte session): the durable state's session
        // key costs no memory.
        assert!(std::mem::size_of::<crate::mqtt::session::Session>() <= 264);
        // A TLS connection's future holds the rustls connection instead of the bare socket.
        let tls =
            std::mem::size_of::<crate::transport::tls_stream::TlsStream<tokio::net::TcpStream>>();
        let tcp = std::mem::size_of::<tokio::net::TcpStream>();
        eprintln!("TLS stream: {tls} bytes, TCP stream: {tcp} bytes");
    }
}
