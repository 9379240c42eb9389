//! The HTTP listener: an accept loop that holds at most `http.max_connections` connections, and
//! one task per connection serving HTTP/1.1 with hyper, closed when a request head takes longer
//! than `http.header_read_timeout` or a keep-alive connection waits longer than
//! `http.idle_timeout` for its next request.
//!
//! At the limit the loop stops accepting: new connections wait in the kernel's listen backlog,
//! where they cost the process no file descriptor, until a connection closes. (Accepting and
//! closing them at once would answer faster, but each refusal would take a descriptor for a
//! moment, which is what must not happen while MQTT is short of them.) So HTTP never holds more
//! than `http.max_connections` + 1 descriptors (the listener).
//!
//! hyper's own `header_read_timeout` runs from the end of a response to the end of the next
//! request head, idle wait included (hyper 1.12), so it cannot tell an idle keep-alive
//! connection from a slow request. The two timeouts are kept here instead: the connection's
//! `Activity` records when a request head starts (its first byte), when a request is being
//! answered and when the connection became idle, and the connection task closes it at the
//! deadline of its current phase.
//!
//! The socket wrapper (`Watched`) also checks each request head before hyper reads it
//! ([`super::head`]) and answers a refused one itself, with a JSON body. It knows where heads
//! start as long as requests come one at a time without bodies (what this API receives); once
//! bytes arrive beyond a head (a pipelined request or a request body) it steps aside for the
//! rest of the connection, and hyper's own limits, set above ours, apply.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::head::{HeadLimits, HeadScanner, Scan};
use crate::config::HttpConfig;
use crate::labels::{HttpRoute, HttpTimeout};
use crate::metrics::metrics;
use crate::telemetry::LogLimiter;

/// First wait after running out of file descriptors; doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait between two accept attempts while out of file descriptors.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// After answering a refused head, at most this much of what the client still sends is read
/// and dropped before the close (closing with unread input would reset the connection, and
/// the client could lose the answer).
const DRAIN_MAX: usize = 1 << 20;

static AT_LIMIT: LogLimiter = LogLimiter::new(Duration::from_secs(10));
static NO_FDS: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops accepting, lets each
/// connection finish the request it is answering, and waits up to `grace` for them.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &HttpConfig,
    shutdown: CancellationToken,
    grace: Duration,
) {
    warn_if_near_the_fd_limit(config.max_connections);
    let limits = Arc::new(Limits::new(config, grace));
    let slots = Arc::new(Semaphore::new(config.max_connections as usize));
    let tracker = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;

    'accepting: loop {
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                metrics().http_connection_limit_waits.inc();
                if let Some(suppressed) = AT_LIMIT.check() {
                    tracing::warn!(
                        max_connections = config.max_connections,
                        suppressed,
                        "HTTP connection limit reached (http.max_connections): new connections \
                         wait in the listen backlog until one closes."
                    );
                }
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break, // (never closed)
                    },
                }
            }
        };
        let (stream, peer) = loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break 'accepting,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok(accepted) => break accepted,
                Err(error) if is_fd_exhaustion(&error) => {
                    metrics().http_accept_fd_exhausted.inc();
                    if let Some(suppressed) = NO_FDS.check() {
                        tracing::warn!(
                            %error,
                            suppressed,
                            "HTTP listener out of file descriptors; retrying."
                        );
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'accepting,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
                // Errors of one half-open socket (ECONNABORTED, ...) concern only that socket.
                Err(error) => tracing::debug!(%error, "HTTP accept failed."),
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        metrics().http_connections_accepted.inc();
        tracker.spawn(connection(
            stream,
            peer,
            app.clone(),
            Arc::clone(&limits),
            shutdown.clone(),
            slot,
        ));
    }

    drop(listener);
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            remaining = tracker.len(),
            ?grace,
            "Grace period over with HTTP connections still open."
        );
    }
}

/// Warns when HTTP may hold more than half of the process's file descriptors.
fn warn_if_near_the_fd_limit(max_connections: u32) {
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
        if u64::from(max_connections).saturating_mul(2) > soft {
            tracing::warn!(
                max_connections,
                open_file_limit = soft,
                "http.max_connections is more than half the open-file limit: HTTP clients \
                 could hold descriptors that MQTT connections need."
            );
        }
    }
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or system is out of resources, not the peer.
fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The per-connection settings, shared by every connection.
struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// After shutdown begins, how long a connection may take to finish.
    grace: Duration,
    head: HeadLimits,
    /// hyper's read buffer: room for a head within `head` and more, so that hyper's own limit
    /// (answered with an empty body) is never the one a head checked by us reaches.
    hyper_max_buf: usize,
}

impl Limits {
    fn new(config: &HttpConfig, grace: Duration) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            grace,
            head: HeadLimits {
                max_uri_len: config.max_uri_len,
                max_header_size: config.max_header_size,
                max_headers: config.max_headers,
            },
            hyper_max_buf: config.max_header_size + 8192,
        }
    }
}

/// Where a connection is in its request cycle, for its timeouts.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// A request head is expected or arriving: since its first byte, or since the accept for
    /// the first request.
    Head(Instant),
    /// A request is being answered (no timeout: the handlers bound their own store calls).
    Busy,
    /// Between requests, since this instant (a response that the client does not read counts
    /// as idle: it is bounded by the same timeout).
    Idle(Instant),
}

/// A connection's phase, shared by its socket (a request head starts), its service (a request
/// is answered) and its task (the deadline).
struct Activity {
    phase: Mutex<Phase>,
    /// Signalled when a request head starts, which can bring the deadline forward.
    head_started: Notify,
    /// Set once a request came with a body: where the next head starts is then unknown to the
    /// socket wrapper.
    body_seen: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Head(Instant::now())),
            head_started: Notify::new(),
            body_seen: AtomicBool::new(false),
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
    }

    /// Bytes arrived from the client; returns the phase they arrived in.
    fn received(&self) -> Phase {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let was = *phase;
        if let Phase::Idle(_) = was {
            *phase = Phase::Head(Instant::now());
            drop(phase);
            self.head_started.notify_one();
        }
        was
    }

    /// When the current phase times out, and as what.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, HttpTimeout)> {
        match self.phase() {
            Phase::Head(since) => {
                Some((since + limits.header_read_timeout, HttpTimeout::HeaderRead))
            }
            Phase::Busy => None,
            Phase::Idle(since) => Some((since + limits.idle_timeout, HttpTimeout::Idle)),
        }
    }
}

/// Counts a connection in `heartwire_http_connections` while it lives.
struct Open;

impl Open {
    fn new() -> Self {
        metrics().http_connections.inc();
        Self
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics().http_connections.dec();
    }
}

/// Serves one connection until it closes, times out, or shutdown's grace is over. `_slot` is
/// its place under `http.max_connections`, given back when the task ends.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let _open = Open::new();
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        stream,
        activity: Arc::clone(&activity),
        guard: Guard::Checking(HeadScanner::new(limits.head)),
        limits: limits.head,
        write_pending: false,
        peer,
    });
    let service = Tracked {
        inner: TowerToHyperService::new(app),
        activity: Arc::clone(&activity),
        peer,
    };
    let mut builder = http1::Builder::new();
    builder
        // The timeouts are ours (see the module documentation).
        .header_read_timeout(None)
        .keep_alive(true)
        .max_buf_size(limits.hyper_max_buf);
    // hyper's default (100) is above ours unless ours is higher (setting it costs hyper a heap
    // allocation per request).
    if limits.head.max_headers > 100 {
        builder.max_headers(limits.head.max_headers);
    }
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let far = || Instant::now() + Duration::from_secs(86_400);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(sleep);
    let mut stop_by: Option<Instant> = None;

    loop {
        let deadline = activity.deadline(&limits);
        let wake_at = match (deadline.map(|d| d.0), stop_by) {
            (Some(d), Some(s)) => d.min(s),
            (Some(d), None) => d,
            (None, Some(s)) => s,
            (None, None) => far(),
        };
        sleep.as_mut().reset(wake_at);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "HTTP connection ended with an error.");
                }
                return;
            }
            _ = activity.head_started.notified() => {}
            _ = &mut sleep => {
                let now = Instant::now();
                if let Some((_, kind)) = activity.deadline(&limits).filter(|d| d.0 <= now) {
                    metrics().http_connection_timeouts.inc(kind);
                    tracing::debug!(%peer, timeout = kind.as_str(), "HTTP connection timed out; closing.");
                    return;
                }
                if stop_by.is_some_and(|s| s <= now) {
                    tracing::debug!(%peer, "HTTP connection still busy after the grace period; closing.");
                    return;
                }
            }
            _ = shutdown.cancelled(), if stop_by.is_none() => {
                // Closes an idle connection at once; a busy one after its response.
                conn.as_mut().graceful_shutdown();
                stop_by = Some(Instant::now() + limits.grace);
            }
        }
    }
}

/// The socket, reporting arriving bytes to the connection's [`Activity`] and checking request
/// heads before hyper reads them.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    guard: Guard,
    limits: HeadLimits,
    /// A write of hyper's is waiting for the socket: an answer of ours would mix with it.
    write_pending: bool,
    peer: SocketAddr,
}

/// What the socket wrapper does with the bytes it reads.
enum Guard {
    /// Checking the head being received.
    Checking(HeadScanner),
    /// The head passed; the next one is checked once the connection is idle again.
    Passed,
    /// Off for the rest of the connection: bytes came beyond a head (a pipelined request or a
    /// request body), so where heads start is no longer known; hyper's own limits apply.
    Off,
    /// Writing the answer to a refused head; how much of it is written.
    Answering(Vec<u8>, usize),
    /// The answer is out: reading and dropping what the client still sends, up to this many
    /// bytes, then end of stream.
    Draining(usize),
    /// End of stream for hyper.
    Done,
}

impl Watched {
    /// Drives the answer to a refused head; `Ready` once the connection is over for hyper.
    fn poll_refusal(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.guard {
                Guard::Answering(answer, written) => {
                    while *written < answer.len() {
                        match ready!(Pin::new(&mut self.stream).poll_write(cx, &answer[*written..]))
                        {
                            Ok(0) => break,
                            Ok(n) => *written += n,
                            Err(error) => return Poll::Ready(Err(error)),
                        }
                    }
                    // The FIN after the answer; then only reading is left.
                    let _ = ready!(Pin::new(&mut self.stream).poll_shutdown(cx));
                    self.guard = Guard::Draining(DRAIN_MAX);
                }
                Guard::Draining(left) => {
                    let mut scratch = [0u8; 4096];
                    let mut dropped = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut self.stream).poll_read(cx, &mut dropped)) {
                        Ok(())
                            if !dropped.filled().is_empty() && dropped.filled().len() < *left =>
                        {
                            *left -= dropped.filled().len();
                        }
                        _ => self.guard = Guard::Done,
                    }
                }
                // (Only called once a head was refused: the other states end the stream too.)
                Guard::Done | Guard::Checking(_) | Guard::Passed | Guard::Off => {
                    return Poll::Ready(Ok(()))
                }
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(
            this.guard,
            Guard::Answering(..) | Guard::Draining(_) | Guard::Done
        ) {
            // Nothing for hyper: its end of stream once the answer is out.
            return this.poll_refusal(cx);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        let received = &buf.filled()[before..];
        if received.is_empty() {
            return Poll::Ready(Ok(()));
        }
        match this.activity.received() {
            // The first byte of the next head.
            Phase::Idle(_) => {
                if let Guard::Passed = this.guard {
                    this.guard = Guard::Checking(HeadScanner::new(this.limits));
                }
            }
            // Bytes while a request is answered: pipelined, or its body.
            Phase::Busy => this.guard = Guard::Off,
            Phase::Head(_) => {}
        }
        if this.activity.body_seen.load(Ordering::Relaxed) {
            this.guard = Guard::Off;
        }
        let Guard::Checking(scanner) = &mut this.guard else {
            return Poll::Ready(Ok(()));
        };
        match scanner.feed(received) {
            Scan::Partial => Poll::Ready(Ok(())),
            Scan::Complete(end) => {
                this.guard = if end < received.len() {
                    Guard::Off
                } else {
                    Guard::Passed
                };
                Poll::Ready(Ok(()))
            }
            Scan::Rejected(rejection) => {
                // hyper never sees the refused bytes; it gets the end of stream instead.
                buf.set_filled(before);
                super::layers::count(HttpRoute::Rejected, rejection.status());
                tracing::debug!(peer = %this.peer, reason = %rejection.message(), "HTTP request head refused.");
                this.guard = if this.write_pending {
                    Guard::Done
                } else {
                    Guard::Answering(rejection.response(), 0)
                };
                this.poll_refusal(cx)
            }
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.write_pending = polled.is_pending();
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.write_pending = polled.is_pending();
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.write_pending = polled.is_pending();
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The router as a hyper service, marking the connection busy while a request is answered.
#[derive(Clone)]
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
    /// The client's address, given to every request (`ConnectInfo`) for the logs of refusals.
    peer: SocketAddr,
}

type Answer = Result<axum::response::Response, std::convert::Infallible>;

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        self.activity.set(Phase::Busy);
        if !axum::body::HttpBody::is_end_stream(request.body()) {
            self.activity.body_seen.store(true, Ordering::Relaxed);
        }
        let mut request = request.map(axum::body::Body::new);
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(self.peer));
        let answer = self.inner.call(request);
        let activity = Arc::clone(&self.activity);
        Box::pin(async move {
            let response = answer.await;
            activity.set(Phase::Idle(Instant::now()));
            response
        })
    }
}
