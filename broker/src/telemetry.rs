//! Tracing setup: `RUST_LOG` (or `log.level`) filters, `log.format` picks pretty or JSON lines;
//! and [`LogLimiter`], which keeps a log line that a client can trigger at will from flooding the
//! log.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to stderr. Call once, before anything logs.
///
/// Colour codes are written only to a terminal, and never when `NO_COLOR` is set to a non-empty
/// value (<https://no-color.org>).
pub fn init(config: &LogConfig) {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    // Fails only when a global subscriber is already set, which init() is documented not to do.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.level));
    // Fails only when a global subscriber is already set, which init() is documented not to do.
    let _ = tracing::subscriber::set_global_default(subscriber(
        config.format,
        filter,
        std::io::stderr,
        ansi,
    ));
}

/// The subscriber [`init`] installs: `format`, filtered by `filter`, writing to `writer` (tests
/// capture the output with it), with colour codes when `ansi`.
///
/// Strings that clients choose (client ids, topics, filters) are logged as `&str` field
/// values, never with `%`: both formats then escape them (the pretty format writes them quoted
/// with control characters escaped, JSON escapes them as JSON), so a client cannot forge a log
/// line or send escape sequences to the operator's terminal.
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Pretty => Box::new(builder.finish()),
        LogFormat::Json => Box::new(builder.json().flatten_event(true).finish()),
    }
}

/// The process's own monotonic clock origin, so that a limiter fits in a `static`.
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Lets one kind of log line through at most once per interval and counts the ones held back.
///
/// For lines that a client (or many clients) can trigger at any rate: overflows, refusals,
/// failed API requests. The metric next to the line still counts every occurrence; the limiter
/// only keeps the log readable.
///
/// ```
/// use std::time::Duration;
/// use broker::telemetry::LogLimiter;
///
/// static QUEUE_FULL: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// if let Some(suppressed) = QUEUE_FULL.check() {
///     tracing::warn!(suppressed, "Session queue full.");
/// }
/// ```
#[derive(Debug)]
pub struct LogLimiter {
    interval_ms: u64,
    /// Milliseconds since [`ORIGIN`] before which nothing is let through; 0 at first.
    next_ms: AtomicU64,
    /// Occurrences held back since the last line let through.
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter letting one line through per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the caller should log now, `n` being how many occurrences were held back
    /// since the last line; `None` when this one is held back (and counted).
    pub fn check(&self) -> Option<u64> {
        let now = ORIGIN.elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now + self.interval_ms.max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_counted() {
        let limiter = LogLimiter::new(Duration::from_millis(200));
        assert_eq!(limiter.check(), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.check(), None);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(held) = limiter.check() {
                // The failed checks while waiting are held back too.
                assert!(held >= 5, "held back {held}");
                break;
            }
            assert!(Instant::now() < deadline, "limiter never opened again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
