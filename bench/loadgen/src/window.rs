//! A measurement window: CPU marks of the broker and of the generator at both ends, and the
//! broker's peak RSS sampled in between.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::procfs::Proc;
use crate::report::BrokerUsage;

/// How often the broker's RSS is read while a window is open.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// CPU times at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub at: Instant,
    /// `None` when the broker's /proc entry could not be read (it exited, or no pid given).
    broker_cpu_s: Option<f64>,
    own_cpu_s: f64,
}

/// Takes the marks and RSS readings; warns once per failed read rather than aborting a run
/// whose message counts are still worth reporting.
#[derive(Debug, Clone, Copy)]
pub struct Meter {
    broker: Option<u32>,
    ticks_per_s: f64,
}

impl Meter {
    pub fn new(broker: Option<u32>, ticks_per_s: f64) -> Self {
        Self {
            broker,
            ticks_per_s,
        }
    }

    pub fn mark(&self) -> Mark {
        let at = Instant::now();
        let broker_cpu_s = self.broker.and_then(|pid| {
            Proc::Pid(pid)
                .cpu_seconds(self.ticks_per_s)
                .map_err(|e| eprintln!("loadgen: broker CPU unreadable: {e:#}"))
                .ok()
        });
        let own_cpu_s = Proc::Myself.cpu_seconds(self.ticks_per_s).unwrap_or(0.0);
        Mark {
            at,
            broker_cpu_s,
            own_cpu_s,
        }
    }

    pub fn broker_rss_kib(&self) -> Option<u64> {
        let pid = self.broker?;
        Proc::Pid(pid)
            .rss_kib()
            .map_err(|e| eprintln!("loadgen: broker RSS unreadable: {e:#}"))
            .ok()
    }

    /// Starts sampling the broker's RSS every 250 ms; `start_kib` is the first reading.
    pub fn sample_peak_rss(&self, start_kib: Option<u64>) -> PeakRss {
        let peak = Arc::new(AtomicU64::new(start_kib.unwrap_or(0)));
        let stop = CancellationToken::new();
        let task = self.broker.map(|pid| {
            let (peak, stop) = (peak.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(RSS_SAMPLE_INTERVAL);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    match Proc::Pid(pid).rss_kib() {
                        Ok(kib) => {
                            peak.fetch_max(kib, Ordering::Relaxed);
                        }
                        Err(_) => break, // the broker exited: keep what was seen
                    }
                }
            })
        });
        PeakRss { peak, stop, task }
    }

    /// The broker's usage between two marks, if every reading worked.
    pub fn usage(
        &self,
        start: &Mark,
        end: &Mark,
        rss: (Option<u64>, u64, Option<u64>),
    ) -> Option<BrokerUsage> {
        let pid = self.broker?;
        let cpu_s = end.broker_cpu_s? - start.broker_cpu_s?;
        let (rss_start_kib, rss_peak_kib, rss_end_kib) = (rss.0?, rss.1, rss.2?);
        Some(BrokerUsage {
            pid,
            cpu_s,
            cpu_percent: cpu_s / seconds_between(start, end) * 100.0,
            rss_start_kib,
            rss_peak_kib: rss_peak_kib.max(rss_end_kib),
            rss_end_kib,
        })
    }
}

/// The generator's own CPU between two marks, in percent of one core.
pub fn own_cpu_percent(start: &Mark, end: &Mark) -> f64 {
    (end.own_cpu_s - start.own_cpu_s) / seconds_between(start, end) * 100.0
}

pub fn seconds_between(start: &Mark, end: &Mark) -> f64 {
    end.at.duration_since(start.at).as_secs_f64().max(1e-9)
}

/// A running RSS sampler.
pub struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl PeakRss {
    /// Stops sampling and returns the highest reading.
    pub async fn finish(self) -> u64 {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
        self.peak.load(Ordering::Relaxed)
    }
}
