//! The bridge: connection events -> the presence store, ordered, batched and never lost.
//!
//! Events arrive on the channel and wait in memory; a batch (up to `bridge.batch_size` events,
//! or whatever has waited `bridge.batch_interval`) is applied in one transaction. While the
//! database is unreachable or slow, the channel keeps being drained (the broker keeps serving),
//! events pile up in memory up to `bridge.memory_capacity`, and beyond that are appended to the
//! journal (fsynced). Everything in the journal is older than everything in memory, and the
//! journal is applied first, so the store sees events in their original order.
//!
//! Start-up order: migrations, then the records a previous run left in the journal, then crash
//! recovery of the node's earlier boots (`begin_boot`), then new events. Shutdown: the bridge
//! ends when every event sender is gone, after draining what it can within its deadline; what
//! is left goes to the journal for the next start.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::Utc;
use tokio::time::Instant;
use uuid::Uuid;

use super::journal::Journal;
use super::retention::NewSessions;
use crate::config::BridgeConfig;
use crate::event::PresenceRecord;
use crate::event::{ConnectionEvent, EventReceiver};
use crate::labels::StoreOperation;
use crate::metrics::metrics;
use crate::store::{PresenceStore, StoreError};

/// First retry delay after a store failure; doubles up to `bridge.retry_backoff_max`.
const RETRY_MIN: Duration = Duration::from_millis(100);

/// Where the bridge is in its start-up sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Schema migrations not yet applied.
    Migrate,
    /// Replaying the records a previous run left in the journal (up to `old_records` of them).
    ReplayOld,
    /// Closing sessions left open by the node's earlier boots.
    Recover,
    /// Applying new events.
    Running,
}

/// What the job in flight was.
enum Job {
    Migrate,
    Recover,
    /// A batch from the journal: the offset just past it and its record count.
    Journal {
        /// Undecodable lines in the batch: counted as lost once the batch is committed.
        corrupt: u64,
        offset: u64,
        count: u64,
    },
    /// A batch from memory (put back in front on failure).
    Memory,
}

type JobFuture =
    Pin<Box<dyn Future<Output = (Job, Vec<PresenceRecord>, Result<(), StoreError>)> + Send>>;

/// The bridge task's state.
pub struct Bridge<S> {
    store: S,
    config: BridgeConfig,
    node_id: Arc<str>,
    boot_id: Uuid,
    events: EventReceiver,
    memory: VecDeque<PresenceRecord>,
    journal: Journal,
    /// Journal records written by earlier runs, applied before crash recovery.
    old_records: u64,
    phase: Phase,
    /// Consecutive failures, for backoff and for logging the first one loudly.
    failures: u32,
    /// No store call before this instant (backoff after a failure).
    retry_at: Option<Instant>,
    /// Set once migrations are applied (readiness).
    migrated: Arc<AtomicBool>,
    /// The batch taken from memory that is being written: back to memory if the write fails
    /// or is abandoned at shutdown. Shared with the write, not copied.
    writing: Arc<Vec<PresenceRecord>>,
    /// Where committed sessions are counted per device for retention's cap, when it is on.
    new_sessions: Option<Arc<NewSessions>>,
}

impl<S: PresenceStore + Clone + 'static> Bridge<S> {
    /// A bridge for `node_id`'s boot `boot_id`, reading `events`.
    pub fn new(
        store: S,
        events: EventReceiver,
        config: BridgeConfig,
        node_id: &str,
        boot_id: Uuid,
    ) -> Result<Self, super::journal::JournalError> {
        let journal = Journal::open(&config.journal_path)?;
        let old_records = journal.unread();
        if old_records > 0 {
            tracing::warn!(
                records = old_records,
                path = %journal.path().display(),
                "Journal holds presence events of an earlier run; replaying them first."
            );
        }
        Ok(Self {
            store,
            config,
            node_id: node_id.into(),
            boot_id,
            events,
            memory: VecDeque::new(),
            journal,
            old_records,
            phase: Phase::Migrate,
            failures: 0,
            retry_at: None,
            migrated: Arc::new(AtomicBool::new(false)),
            writing: Arc::default(),
            new_sessions: None,
        })
    }

    /// Counts the sessions of every committed batch per device in `counts` (for retention's
    /// cap per device).
    pub fn count_new_sessions(&mut self, counts: Arc<NewSessions>) {
        self.new_sessions = Some(counts);
    }

    /// Becomes true once the store's migrations are applied.
    pub fn migrated(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.migrated)
    }

    /// Runs until every event sender is gone (or `stop` is cancelled) and the drain is over,
    /// bounded by `bridge.drain_timeout` from that moment.
    pub async fn run(mut self, stop: tokio_util::sync::CancellationToken) {
        let mut inflight: Option<JobFuture> = None;
        let mut open = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if inflight.is_none() {
                inflight = self.next_job(open);
            }
            // Done draining: nothing left, or only journal records while the store is failing
            // (they stay in the journal for the next start).
            if !open
                && inflight.is_none()
                && self.memory.is_empty()
                && (self.journal.unread() == 0 || self.retry_at.is_some())
            {
                break;
            }
            if let Some(deadline) = drain_deadline {
                if Instant::now() >= deadline {
                    break;
                }
            }
            // With a job in flight, its completion is what the loop waits for.
            let wake_at = inflight
                .is_none()
                .then(|| self.wake_at(open))
                .flatten()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));

            tokio::select! {
                biased;
                done = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                    inflight = None;
                    self.finish(done);
                }
                event = self.events.recv(), if open => match event {
                    Some(event) => self.push(event),
                    None => {
                        open = false;
                        drain_deadline = Some(Instant::now() + self.config.drain_timeout);
                        tracing::info!(pending = self.memory.len(), "Event stream closed; draining presence events.");
                    }
                },
                _ = stop.cancelled(), if open => {
                    // Events already in the channel are kept; senders still alive after this
                    // (connections that outlived the grace period) are not waited for.
                    while let Ok(event) = self.events.try_recv() {
                        self.push(event);
                    }
                    open = false;
                    drain_deadline = Some(Instant::now() + self.config.drain_timeout);
                    tracing::info!(pending = self.memory.len(), "Stopping; draining presence events.");
                }
                _ = tokio::time::sleep_until(wake_at) => {}
                _ = async { tokio::time::sleep_until(drain_deadline.expect("guarded")).await }, if drain_deadline.is_some() => {}
                _ = tick.tick() => self.update_gauges(),
            }
            self.spill_if_full();
        }

        // What could not be written goes to the journal for the next start, in order: an
        // abandoned write first (it is older than what is still in memory). An abandoned
        // journal batch simply stays in the journal.
        drop(inflight.take());
        let mut left = self.take_writing();
        left.extend(self.memory.drain(..));
        if !left.is_empty() {
            tracing::warn!(
                events = left.len(),
                path = %self.journal.path().display(),
                "Database not reachable in time: presence events kept in the journal for the next start."
            );
            self.spill(left);
        }
        self.update_gauges();
        tracing::info!(
            journal_records = self.journal.unread(),
            "Presence bridge stopped."
        );
    }

    fn push(&mut self, event: ConnectionEvent) {
        metrics().presence_transitions.inc(event.kind());
        self.memory.push_back(PresenceRecord {
            node_id: self.node_id.to_string(),
            boot_id: self.boot_id,
            event,
        });
    }

    /// When the loop must look again without an event arriving: the batch interval of the
    /// oldest waiting event, or the end of a backoff.
    fn wake_at(&self, open: bool) -> Option<Instant> {
        if let Some(retry) = self.retry_at {
            return Some(retry);
        }
        if !open || self.journal.unread() > 0 || self.phase != Phase::Running {
            return Some(Instant::now());
        }
        self.memory.front().map(|oldest| {
            let waited = SystemTime::now()
                .duration_since(oldest.event.time())
                // An event "from the future" (the clock was stepped back) is due now.
                .unwrap_or(self.config.batch_interval);
            Instant::now() + self.config.batch_interval.saturating_sub(waited)
        })
    }

    /// The next store call to make, if any is due.
    fn next_job(&mut self, open: bool) -> Option<JobFuture> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        self.retry_at = None;
        let store = self.store.clone();
        let timeout = self.config.store_timeout;
        let run = move |job: Job,
                        batch: Vec<PresenceRecord>,
                        f: Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>|
              -> JobFuture {
            Box::pin(async move {
                let started = Instant::now();
                let result = match tokio::time::timeout(timeout, f).await {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::Database(sqlx::Error::PoolTimedOut)),
                };
                metrics()
                    .bridge_flush_duration
                    .observe(started.elapsed().as_secs_f64());
                (job, batch, result)
            })
        };
        match self.phase {
            Phase::Migrate => {
                let f = Box::pin(async move { store.migrate().await });
                Some(run(Job::Migrate, Vec::new(), f))
            }
            Phase::ReplayOld | Phase::Running if self.journal.unread() > 0 => {
                let max = if self.phase == Phase::ReplayOld {
                    self.old_records.min(self.config.batch_size as u64) as usize
                } else {
                    self.config.batch_size
                };
                let (batch, offset, corrupt) = match self.journal.peek(max.max(1)) {
                    Ok(read) => read,
                    Err(error) => {
                        tracing::error!(%error, "Cannot read the presence journal.");
                        self.backoff();
                        return None;
                    }
                };
                let count = batch.len() as u64 + corrupt;
                if count == 0 {
                    // The file holds less than the journal counted (cut short behind its back).
                    let lost = self.journal.reset_unreadable();
                    metrics().bridge_lost_events.inc_by(lost);
                    tracing::error!(
                        lost,
                        path = %self.journal.path().display(),
                        "PRESENCE EVENTS LOST: the journal file is shorter than recorded."
                    );
                    return None;
                }
                let for_store = batch.clone();
                let f = Box::pin(async move { store.apply(&for_store).await });
                Some(run(
                    Job::Journal {
                        corrupt,
                        offset,
                        count,
                    },
                    batch,
                    f,
                ))
            }
            Phase::ReplayOld => {
                self.phase = Phase::Recover;
                self.next_job(open)
            }
            Phase::Recover => {
                let node_id = self.node_id.clone();
                let boot_id = self.boot_id;
                let f = Box::pin(async move {
                    let recovery = store.begin_boot(&node_id, boot_id, Utc::now()).await?;
                    if recovery.sessions_closed > 0 || recovery.boots > 0 {
                        tracing::info!(
                            boots = recovery.boots,
                            sessions = recovery.sessions_closed,
                            devices = recovery.devices_offline,
                            "Closed sessions left open by earlier boots of this node (broker_restart)."
                        );
                    }
                    Ok(())
                });
                Some(run(Job::Recover, Vec::new(), f))
            }
            Phase::Running => {
                let oldest_waited = self.memory.front().map(|r| {
                    SystemTime::now()
                        .duration_since(r.event.time())
                        .unwrap_or(self.config.batch_interval)
                })?;
                let due = self.memory.len() >= self.config.batch_size
                    || oldest_waited >= self.config.batch_interval
                    || !open;
                if !due {
                    return None;
                }
                let n = self.memory.len().min(self.config.batch_size);
                self.writing = Arc::new(self.memory.drain(..n).collect());
                let for_store = Arc::clone(&self.writing);
                let f = Box::pin(async move { store.apply(&for_store).await });
                Some(run(Job::Memory, Vec::new(), f))
            }
        }
    }

    fn finish(&mut self, (job, batch, result): (Job, Vec<PresenceRecord>, Result<(), StoreError>)) {
        match result {
            Ok(()) => {
                if self.failures > 0 {
                    tracing::warn!(failures = self.failures, "Presence store reachable again.");
                }
                self.failures = 0;
                match job {
                    Job::Migrate => {
                        tracing::info!("Presence store migrations applied.");
                        self.migrated.store(true, Ordering::Release);
                        self.phase = Phase::ReplayOld;
                    }
                    Job::Recover => self.phase = Phase::Running,
                    Job::Journal {
                        corrupt,
                        offset,
                        count,
                    } => {
                        if corrupt > 0 {
                            metrics().bridge_lost_events.inc_by(corrupt);
                            tracing::error!(
                                records = corrupt,
                                "PRESENCE EVENTS LOST: undecodable records in the journal skipped."
                            );
                        }
                        if let Err(error) = self.journal.consume(offset, count) {
                            tracing::error!(%error, "Cannot truncate the presence journal.");
                        }
                        if self.phase == Phase::ReplayOld {
                            self.old_records = self.old_records.saturating_sub(count);
                            if self.old_records == 0 {
                                self.phase = Phase::Recover;
                            }
                        }
                        self.committed(&batch);
                    }
                    Job::Memory => {
                        // Empty when the batch was spilled to the journal while it was being
                        // written (it will be applied again from there, harmlessly).
                        let written = self.take_writing();
                        self.committed(&written);
                    }
                }
                if self.memory.is_empty() && self.memory.capacity() > 4 * self.config.batch_size {
                    // A burst (or an outage) is over: give its buffer back.
                    self.memory = VecDeque::new();
                }
            }
            Err(error) => {
                let operation = match job {
                    Job::Migrate => StoreOperation::Migrate,
                    Job::Recover => StoreOperation::BeginBoot,
                    Job::Journal { .. } | Job::Memory => StoreOperation::Apply,
                };
                metrics().store_errors.inc(operation);
                let operation = operation.as_str();
                if self.failures == 0 {
                    tracing::error!(%error, operation, "Presence store unavailable; buffering events and retrying.");
                } else {
                    tracing::debug!(%error, operation, failures = self.failures, "Presence store still unavailable.");
                }
                if let Job::Memory = job {
                    metrics().bridge_retries.inc();
                    for record in self.take_writing().into_iter().rev() {
                        self.memory.push_front(record);
                    }
                }
                self.backoff();
            }
        }
        self.update_gauges();
    }

    /// The batch being written, taken back (copied only while the write still holds it).
    fn take_writing(&mut self) -> Vec<PresenceRecord> {
        let writing = std::mem::take(&mut self.writing);
        Arc::try_unwrap(writing).unwrap_or_else(|shared| (*shared).clone())
    }

    fn committed(&self, batch: &[PresenceRecord]) {
        if let Some(counts) = &self.new_sessions {
            counts.record(batch);
        }
        metrics().bridge_batch_size.observe(batch.len() as f64);
        let now = SystemTime::now();
        for record in batch {
            let latency = now.duration_since(record.event.time()).unwrap_or_default();
            metrics()
                .bridge_commit_latency
                .observe(latency.as_secs_f64());
        }
        metrics().bridge_persisted.inc_by(batch.len() as u64);
    }

    fn backoff(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let exp = RETRY_MIN.saturating_mul(1 << self.failures.min(16).saturating_sub(1));
        let delay = exp.min(self.config.retry_backoff_max);
        // Jitter in [50 %, 100 %] of the delay, so that many brokers do not retry in step.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let jitter = 0.5 + f64::from(nanos % 1000) / 2000.0;
        self.retry_at = Some(Instant::now() + delay.mul_f64(jitter));
    }

    fn spill_if_full(&mut self) {
        if self.memory.len() >= self.config.memory_capacity {
            // The batch being written goes first: it is older than memory, and the journal is
            // applied before memory. If its write succeeds after all, the journal applies it
            // again, which changes nothing.
            let mut all = self.take_writing();
            all.extend(self.memory.drain(..));
            tracing::warn!(
                events = all.len(),
                path = %self.journal.path().display(),
                "Presence events exceed bridge.memory_capacity; appending them to the journal."
            );
            self.spill(all);
        }
    }

    fn spill(&mut self, records: Vec<PresenceRecord>) {
        match self.journal.append(&records) {
            Ok(()) => {
                metrics().bridge_journaled.inc_by(records.len() as u64);
            }
            Err(error) => {
                metrics().bridge_lost_events.inc_by(records.len() as u64);
                tracing::error!(
                    %error,
                    lost = records.len(),
                    "PRESENCE EVENTS LOST: the journal cannot be written (disk full?). \
                     Device states will be repaired only by later events."
                );
            }
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        let m = metrics();
        m.bridge_queue_depth.set(
            (self.writing.len() as u64 + self.memory.len() as u64 + self.journal.unread()) as i64,
        );
        m.bridge_journal_bytes.set(self.journal.bytes() as i64);
        let oldest = if self.journal.unread() > 0 {
            self.journal
                .peek(1)
                .ok()
                .and_then(|(r, _, _)| r.into_iter().next())
                .map(|r| r.event.time())
        } else {
            self.writing
                .first()
                .or(self.memory.front())
                .map(|r| r.event.time())
        };
        let age = oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        m.bridge_oldest_age.set(age.as_secs_f64());
    }
}
