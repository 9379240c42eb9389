//! `--metrics-listen ADDR`: a minimal Prometheus text endpoint (`GET /metrics`) on a raw
//! tokio listener. With `--workers`, only the parent listens and serves the sum of its
//! workers' numbers (as of their latest per-second report).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::report::{Live, BUCKETS_S};

/// Bound on answering one request, first byte read to last byte written.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Where the endpoint gets its numbers.
pub type Source = Arc<dyn Fn() -> Live + Send + Sync>;

/// Binds `addr` and serves `/metrics` from tasks on `tasks` (the run's tracker) until `stop` is
/// cancelled, which also cuts short the answers in progress.
pub async fn serve(
    addr: &str,
    source: Source,
    tasks: &TaskTracker,
    stop: CancellationToken,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    let answers = tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            };
            let source = Arc::clone(&source);
            let stop = stop.clone();
            answers.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::timeout(ANSWER_TIMEOUT, answer(stream, source)) => {}
                }
            });
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, source: Source) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
        ("200 OK", render(&source()))
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The Prometheus text exposition of `live`.
pub fn render(live: &Live) -> String {
    let s = &live.snapshot;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP devicesim_devices Devices in the run (--count).\n\
         # TYPE devicesim_devices gauge\ndevicesim_devices {}\n\
         # HELP devicesim_connected Devices with an established MQTT session.\n\
         # TYPE devicesim_connected gauge\ndevicesim_connected {}\n\
         # HELP devicesim_connecting Devices dialling or backing off.\n\
         # TYPE devicesim_connecting gauge\ndevicesim_connecting {}\n\
         # HELP devicesim_away Devices that left on purpose and have not come back yet.\n\
         # TYPE devicesim_away gauge\ndevicesim_away {}",
        live.target, s.connected, s.connecting, s.away
    );
    let _ = writeln!(
        out,
        "# HELP devicesim_connect_latency_seconds Time from starting an attempt to CONNACK.\n\
         # TYPE devicesim_connect_latency_seconds histogram"
    );
    for (b, n) in BUCKETS_S.iter().zip(&live.buckets) {
        let _ = writeln!(
            out,
            "devicesim_connect_latency_seconds_bucket{{le=\"{b}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "devicesim_connect_latency_seconds_bucket{{le=\"+Inf\"}} {c}\n\
         devicesim_connect_latency_seconds_sum {}\n\
         devicesim_connect_latency_seconds_count {c}",
        live.sum_s,
        c = live.count
    );
    let _ = writeln!(
        out,
        "# HELP devicesim_errors_total Connection errors by kind.\n\
         # TYPE devicesim_errors_total counter\n\
         devicesim_errors_total{{kind=\"connect_failed\"}} {}\n\
         devicesim_errors_total{{kind=\"connection_lost\"}} {}",
        s.connect_failed, s.connection_lost
    );
    let _ = writeln!(
        out,
        "# HELP devicesim_reconnects_total Sessions re-established after a lost one.\n\
         # TYPE devicesim_reconnects_total counter\ndevicesim_reconnects_total {}\n\
         # HELP devicesim_takeovers_total Completed takeovers (a second connection replaced the \
         first).\n\
         # TYPE devicesim_takeovers_total counter\ndevicesim_takeovers_total {}",
        s.reconnects, s.takeovers
    );
    let _ = writeln!(
        out,
        "# HELP devicesim_messages_published_total Telemetry PUBLISH packets written.\n\
         # TYPE devicesim_messages_published_total counter\n\
         devicesim_messages_published_total {}\n\
         # HELP devicesim_messages_acknowledged_total PUBACKs and PUBCOMPs received.\n\
         # TYPE devicesim_messages_acknowledged_total counter\n\
         devicesim_messages_acknowledged_total {}\n\
         # HELP devicesim_messages_skipped_total Telemetry messages skipped: the previous one was \
         still in flight.\n\
         # TYPE devicesim_messages_skipped_total counter\n\
         devicesim_messages_skipped_total {}",
        s.published, s.acknowledged, s.publish_skipped
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_all_families() {
        let mut live = Live {
            buckets: vec![1; BUCKETS_S.len()],
            count: 1,
            sum_s: 0.0005,
            ..Live::default()
        };
        live.snapshot.connected = 7;
        live.target = 9;
        let text = render(&live);
        assert!(text.contains("devicesim_devices 9\n"), "{text}");
        assert!(text.contains("devicesim_takeovers_total 0\n"), "{text}");
        assert!(text.contains("devicesim_connected 7\n"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 1\n"), "{text}");
        assert!(text.contains("devicesim_errors_total{kind=\"connect_failed\"} 0"));
        assert!(text.contains("devicesim_reconnects_total 0"));
        assert!(
            text.contains("devicesim_messages_published_total 0\n"),
            "{text}"
        );
        assert!(
            text.contains("devicesim_messages_skipped_total 0\n"),
            "{text}"
        );
    }
}
