//! The accept loop: one task per accepted socket, never blocked by any one client, backing off
//! (and counting) while the process is out of file descriptors.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{connection, Shared};
use crate::config::MqttConfig;
use crate::event::EventSender;
use crate::labels::RefusalReason;
use crate::metrics::metrics;

/// First wait after running out of file descriptors; doubles up to `mqtt.accept_backoff_max`.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// Accepts MQTT connections on `listener` until `shutdown` is cancelled, then waits up to
/// `grace` for every connection to close (each emits its Disconnected event with reason
/// broker_shutdown).
pub async fn serve(
    listener: TcpListener,
    config: MqttConfig,
    events: EventSender,
    shutdown: CancellationToken,
    grace: Duration,
) {
    serve_shared(
        listener,
        Arc::new(Shared::new(config, events)),
        shutdown,
        grace,
    )
    .await;
}

/// As [`serve`], with state the caller keeps a handle on (see [`super::Registry`]).
pub async fn serve_shared(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let tracker = TaskTracker::new();
    let expiry = TaskTracker::new();
    expiry.spawn(super::expiry::run(
        Arc::clone(&shared),
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
                tracker.spawn(
                    connection::run(stream, Arc::clone(&shared), shutdown.child_token())
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
                    _ = shared.connection_closed.notified() => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(shared.config.accept_backoff_max);
            }
            // Errors of one half-open socket (ECONNABORTED, ...) concern only that socket.
            Err(error) => {
                tracing::debug!(%error, "Accept failed.");
            }
        }
    }

    drop(listener);
    shared.close_all();
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

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: the process or system is out of resources, not the peer.
fn is_fd_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
