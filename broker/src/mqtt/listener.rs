//! The accept loops: one per configured listener (TCP, TLS, WebSocket, WebSocket over TLS),
//! one task per accepted socket, never blocked by any one client, backing off (and counting)
//! while the process is out of file descriptors.
//!
//! A socket that needs a transport handshake first (PROXY header, TLS, WebSocket upgrade) gets
//! a short-lived task for it, under the connection's `mqtt.connect_timeout` (which also covers
//! the CONNECT that follows); it then hands the stream to a connection task of its own, so
//! that a long-lived connection carries nothing of its handshake.
//!
//! With `mqtt.max_connection_rate`, each accept loop takes a token from a bucket of its own
//! before accepting the next socket, waiting for one when there is none (as EMQX's
//! max_conn_rate): sockets beyond the rate wait in the kernel's listen backlog.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::connection::{self, Hello, Transport};
use super::limits::TokenBucket;
use super::Broker;
use crate::config::{MqttConfig, WsConfig};
use crate::labels::{HandshakeFailure, Listener, RefusalReason};
use crate::metrics::metrics;
use crate::telemetry::LogLimiter;
use crate::transport::tls::{self, Tls};
use crate::transport::tls_stream::{self, TlsStream};
use crate::transport::{proxy, ws};

/// First wait after running out of file descriptors; doubles up to `mqtt.accept_backoff_max`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// One line per 10 s about failed transport handshakes; each failure is counted.
static HANDSHAKE_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// One line per 10 s about accept loops waiting for `mqtt.max_connection_rate`.
static RATE_WAIT: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// What a listener does with a socket before MQTT begins.
#[derive(Clone)]
pub enum Upgrade {
    /// Nothing: MQTT over TCP.
    Plain,
    /// A TLS handshake.
    Tls(Arc<Tls>),
    /// A WebSocket upgrade.
    Ws(Arc<WsEndpoint>),
    /// A TLS handshake, then a WebSocket upgrade.
    Wss(Arc<Tls>, Arc<WsEndpoint>),
}

/// A bound listener and what its sockets go through.
pub struct Endpoint {
    listener: TcpListener,
    setup: Arc<Setup>,
}

/// The part of an [`Endpoint`] that its handshake tasks share.
struct Setup {
    kind: Listener,
    proxy_protocol: bool,
    upgrade: Upgrade,
}

impl Endpoint {
    /// A listener of `kind` whose sockets go through `upgrade`, after a PROXY protocol header
    /// when `proxy_protocol`.
    pub fn new(
        listener: TcpListener,
        kind: Listener,
        upgrade: Upgrade,
        proxy_protocol: bool,
    ) -> Self {
        Self {
            listener,
            setup: Arc::new(Setup {
                kind,
                proxy_protocol,
                upgrade,
            }),
        }
    }

    /// Plain MQTT over TCP.
    pub fn tcp(listener: TcpListener) -> Self {
        Self::new(listener, Listener::Tcp, Upgrade::Plain, false)
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Which listener it is.
    pub fn kind(&self) -> Listener {
        self.setup.kind
    }
}

/// The bound MQTT listeners: TCP always, the others when configured.
pub struct Sockets {
    /// `mqtt.listen`.
    pub tcp: TcpListener,
    /// `mqtt.tls.listen`.
    pub tls: Option<TcpListener>,
    /// `mqtt.ws.listen`.
    pub ws: Option<TcpListener>,
    /// `mqtt.wss.listen`.
    pub wss: Option<TcpListener>,
}

impl Sockets {
    /// Their endpoints, as `config` sets them up, and the TLS configuration they share (read
    /// here from the certificate files, when a TLS or WSS listener is bound).
    pub fn endpoints(
        self,
        config: &MqttConfig,
    ) -> Result<(Vec<Endpoint>, Option<Arc<Tls>>), tls::TlsError> {
        let tls = if self.tls.is_some() || self.wss.is_some() {
            Some(Arc::new(Tls::load(&config.tls)?))
        } else {
            None
        };
        let mut endpoints = vec![Endpoint::new(
            self.tcp,
            Listener::Tcp,
            Upgrade::Plain,
            config.proxy_protocol,
        )];
        if let (Some(listener), Some(tls)) = (self.tls, &tls) {
            endpoints.push(Endpoint::new(
                listener,
                Listener::Tls,
                Upgrade::Tls(Arc::clone(tls)),
                config.tls.proxy_protocol,
            ));
        }
        if let Some(listener) = self.ws {
            endpoints.push(Endpoint::new(
                listener,
                Listener::Ws,
                Upgrade::Ws(Arc::new(WsEndpoint::new(&config.ws))),
                config.ws.proxy_protocol,
            ));
        }
        if let (Some(listener), Some(tls)) = (self.wss, &tls) {
            endpoints.push(Endpoint::new(
                listener,
                Listener::Wss,
                Upgrade::Wss(Arc::clone(tls), Arc::new(WsEndpoint::new(&config.wss))),
                config.wss.proxy_protocol,
            ));
        }
        Ok((endpoints, tls))
    }
}

/// Accepts MQTT connections on every endpoint until `shutdown` is cancelled, then waits up to
/// `grace` for every connection to close (each emits its Disconnected event with reason
/// broker_shutdown). `broker` is the state the connections share (the caller may keep a handle
/// on it, e.g. for [`super::LiveSessions`]).
pub async fn serve(
    endpoints: Vec<Endpoint>,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    let expiry = TaskTracker::new();
    expiry.spawn(super::expiry::run(
        Arc::clone(&broker),
        shutdown.child_token(),
    ));
    expiry.close();
    let accepting = TaskTracker::new();
    for endpoint in endpoints {
        accepting.spawn(accept_loop(
            endpoint,
            Arc::clone(&broker),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    accepting.close();
    accepting.wait().await;

    broker.sessions.close_all();
    tracker.close();
    tracing::info!(
        connections = tracker.len(),
        "Listeners closed; closing connections."
    );
    // The expiry task ends with the shutdown token; connections take their grace period.
    expiry.wait().await;
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            ?grace,
            "Grace period over with connections still closing."
        );
    }
}

/// Accepts on one listener until `shutdown`.
async fn accept_loop(
    endpoint: Endpoint,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let Endpoint { listener, setup } = endpoint;
    let direct = matches!(setup.upgrade, Upgrade::Plain) && !setup.proxy_protocol;
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut refused_in_streak: u64 = 0;
    let mut rate = TokenBucket::new(
        broker.config.max_connection_rate,
        broker.config.connection_rate_burst,
        Instant::now(),
    );
    loop {
        if let Some(bucket) = &mut rate {
            let wait = bucket.wait_for(1.0, Instant::now());
            if !wait.is_zero() {
                metrics().accept_rate_waits.inc(setup.kind);
                if let Some(suppressed) = RATE_WAIT.check() {
                    tracing::info!(
                        listener = setup.kind.as_str(),
                        rate = broker.config.max_connection_rate,
                        suppressed,
                        "mqtt.max_connection_rate reached: accepting slowed down (new sockets \
                         wait in the listen backlog); counted in \
                         heartwire_listener_accept_rate_waits_total, this line at most every 10 s."
                    );
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(bucket) = &mut rate {
                    bucket.take(1.0, Instant::now());
                }
                if refused_in_streak > 0 {
                    tracing::warn!(
                        refused = refused_in_streak,
                        "File descriptors available again; accepting connections."
                    );
                    refused_in_streak = 0;
                }
                backoff = ACCEPT_BACKOFF_MIN;
                metrics().tcp_accepted.inc();
                metrics().listener_accepted.inc(setup.kind);
                // The deadline of the transport handshake and the CONNECT together.
                let deadline = Instant::now() + broker.config.connect_timeout;
                // Debug level: an enabled span costs ~450 bytes per connection. The info-level
                // lines of a connection name the peer or client id themselves.
                let span = tracing::debug_span!(
                    "conn",
                    %peer,
                    listener = setup.kind.as_str(),
                    client_id = tracing::field::Empty
                );
                configure_socket(&stream, &broker.config);
                if direct {
                    let hello = Hello::new(peer, setup.kind, None, deadline);
                    tracker.spawn(
                        connection::run(stream, hello, Arc::clone(&broker), shutdown.child_token())
                            .instrument(span),
                    );
                } else {
                    tracker.spawn(
                        upgrade(
                            stream,
                            peer,
                            deadline,
                            Arc::clone(&setup),
                            Arc::clone(&broker),
                            tracker.clone(),
                            shutdown.clone(),
                        )
                        .instrument(span),
                    );
                }
            }
            Err(error) if is_fd_exhaustion(&error) => {
                metrics().accept_fd_exhausted.inc();
                metrics()
                    .connections_refused
                    .inc(RefusalReason::FdExhausted);
                if refused_in_streak == 0 {
                    tracing::error!(
                        %error,
                        listener = setup.kind.as_str(),
                        connections = metrics().connections_current.get(),
                        "Out of file descriptors: accepting paused until a connection closes. \
                         Raise the open-file limit (ulimit -n) to hold more connections."
                    );
                }
                refused_in_streak += 1;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = broker.connection_closed.notified() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(broker.config.accept_backoff_max);
            }
            // Errors of one half-open socket (ECONNABORTED, ...) concern only that socket.
            Err(error) => {
                tracing::debug!(%error, "Accept failed.");
            }
        }
    }
}

/// The transport handshake of one socket, then its connection in a task of its own.
async fn upgrade(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    deadline: Instant,
    setup: Arc<Setup>,
    broker: Arc<Broker>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let handshake = async {
        if setup.proxy_protocol {
            match proxy::read_header(&mut stream).await {
                Ok(Some(source)) => peer = source,
                Ok(None) => {}
                Err(proxy::ProxyError::Closed) => return Err(HandshakeFailure::Closed),
                Err(error) => {
                    tracing::debug!(%error, "Invalid PROXY protocol header.");
                    return Err(HandshakeFailure::ProxyHeader);
                }
            }
        }
        let hello = |peer, identity| Hello::new(peer, setup.kind, identity, deadline);
        match &setup.upgrade {
            Upgrade::Plain => launch(stream, hello(peer, None), &broker, &tracker, &shutdown),
            Upgrade::Tls(tls) => {
                let stream = tls_accept(tls, stream).await?;
                let identity = client_identity(&stream, tls)?;
                launch(stream, hello(peer, identity), &broker, &tracker, &shutdown);
            }
            Upgrade::Ws(ws) => {
                let (stream, peer) = ws.accept(stream, peer).await?;
                launch(stream, hello(peer, None), &broker, &tracker, &shutdown);
            }
            Upgrade::Wss(tls, ws) => {
                let stream = tls_accept(tls, stream).await?;
                let identity = client_identity(&stream, tls)?;
                let (stream, peer) = ws.accept(stream, peer).await?;
                launch(stream, hello(peer, identity), &broker, &tracker, &shutdown);
            }
        }
        Ok(())
    };
    let outcome = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            metrics().connections_refused.inc(RefusalReason::BrokerShutdown);
            return;
        }
        outcome = tokio::time::timeout_at(deadline, handshake) => outcome,
    };
    let reason = match outcome {
        Ok(Ok(())) => return,
        Ok(Err(reason)) => reason,
        Err(_) => HandshakeFailure::Timeout,
    };
    metrics().handshake_failures.inc(setup.kind, reason);
    tracing::debug!(
        reason = reason.as_str(),
        "Transport handshake failed; closing."
    );
    if let Some(suppressed) = HANDSHAKE_FAILED.check() {
        tracing::info!(
            %peer,
            listener = setup.kind.as_str(),
            reason = reason.as_str(),
            suppressed,
            "Transport handshake failed; closing. Counted by reason in \
             heartwire_transport_handshake_failures_total; this line at most every 10 s."
        );
    }
}

/// The TLS handshake.
async fn tls_accept(
    tls: &Tls,
    stream: TcpStream,
) -> Result<TlsStream<TcpStream>, HandshakeFailure> {
    tls_stream::accept(stream, tls.config())
        .await
        .map_err(|error| {
            tracing::debug!(%error, "TLS handshake failed.");
            tls::failure(&error)
        })
}

/// A WebSocket endpoint: its path and the proxies whose X-Forwarded-For is believed.
pub struct WsEndpoint {
    options: ws::WsOptions,
    trusted_proxies: Vec<ipnet::IpNet>,
}

impl WsEndpoint {
    /// The endpoint `config` describes.
    pub fn new(config: &WsConfig) -> Self {
        Self {
            options: ws::WsOptions {
                path: config.path.clone(),
                ..ws::WsOptions::default()
            },
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }

    /// The WebSocket upgrade of `stream` from `peer`; the stream and the client's address
    /// (from X-Forwarded-For when `peer` is a trusted proxy; its port is then unknown, 0).
    async fn accept<S: Transport>(
        &self,
        stream: S,
        peer: SocketAddr,
    ) -> Result<(ws::WsStream<S>, SocketAddr), HandshakeFailure> {
        let (stream, upgraded) = ws::accept(stream, &self.options).await.map_err(|error| {
            tracing::debug!(%error, "WebSocket upgrade failed.");
            match error {
                ws::WsError::Request(_) => HandshakeFailure::WsRequest,
                ws::WsError::Path(_) => HandshakeFailure::WsPath,
                ws::WsError::Subprotocol => HandshakeFailure::WsSubprotocol,
                ws::WsError::Io(_) | ws::WsError::Closed => HandshakeFailure::Closed,
            }
        })?;
        let client = ws::client_addr(peer.ip(), &upgraded.forwarded_for, &self.trusted_proxies);
        let peer = if client == peer.ip() {
            peer
        } else {
            SocketAddr::new(client, 0)
        };
        Ok((stream, peer))
    }
}

/// The identity of the verified client certificate, if any. With
/// `mqtt.tls.require_client_cert`, a certificate without one is refused.
fn client_identity<S>(
    stream: &TlsStream<S>,
    tls: &Tls,
) -> Result<Option<String>, HandshakeFailure> {
    let chain = stream.connection().peer_certificates();
    let identity = tls::identity(chain, tls.identity_source());
    if identity.is_none() && chain.is_some_and(|c| !c.is_empty()) && tls.requires_client_cert() {
        return Err(HandshakeFailure::NoIdentity);
    }
    Ok(identity)
}

/// Starts the connection task of an upgraded stream.
fn launch<S: Transport>(
    stream: S,
    hello: Hello,
    broker: &Arc<Broker>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    tracker.spawn(
        connection::run(stream, hello, Arc::clone(broker), shutdown.child_token())
            .instrument(tracing::Span::current()),
    );
}

/// TCP settings of every accepted socket.
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

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or system is out of resources, not the peer.
fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
