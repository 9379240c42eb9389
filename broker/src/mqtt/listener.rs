//! The accept loop: one task per accepted socket, never blocked by any one client, backing off
//! (and counting) while the process is out of file descriptors.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{connection, Broker};
use crate::config::MqttConfig;
use crate::labels::RefusalReason;
use crate::metrics::metrics;

/// First wait after running out of file descriptors; doubles up to `mqtt.accept_backoff_max`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// Accepts MQTT connections on `listener` until `shutdown` is cancelled, then waits up to
/// `grace` for every connection to close (each emits its Disconnected event with reason
/// broker_shutdown). `broker` is the state the connections share (the caller may keep a handle
/// on it, e.g. for [`super::LiveSessions`]).
pub async fn serve(
    listener: TcpListener,
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
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut refused_in_streak: u64 = 0;

    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if refused_in_streak > 0 {
                    tracing::warn!(
                        refused = refused_in_streak,
                        "File descriptors available again; accepting connections."
                    );
                    refused_in_streak = 0;
                }
                backoff = ACCEPT_BACKOFF_MIN;
                metrics().tcp_accepted.inc();
                // Debug level: an enabled span costs ~450 bytes per connection. The info-level
                // lines of a connection name the peer or client id themselves.
                let span = tracing::debug_span!("conn", %peer, client_id = tracing::field::Empty);
                configure_socket(&stream, &broker.config);
                tracker.spawn(
                    connection::run(stream, Arc::clone(&broker), shutdown.child_token())
                        .instrument(span),
                );
            }
            Err(error) if is_fd_exhaustion(&error) => {
                metrics().accept_fd_exhausted.inc();
                metrics()
                    .connections_refused
                    .inc(RefusalReason::FdExhausted);
                if refused_in_streak == 0 {
                    tracing::error!(
                        %error,
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

    drop(listener);
    broker.sessions.close_all();
    tracker.close();
    tracing::info!(
        connections = tracker.len(),
        "Listener closed; closing connections."
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
