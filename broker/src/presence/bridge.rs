//! The bridge: connection events -> the presence store, ordered, batched and never lost.
//!
//! Events arrive on the channel and wait in memory; a batch (up to `bridge.batch_size` events,
//! or whatever has waited `bridge.batch_interval`) is applied in one transaction. While the
//! database is unreachable or slow, the channel keeps being drained (the broker keeps serving),
//! events pile up in memory up to `bridge.memory_capacity`, and beyond that are appended to the
//! journal (fsynced). Everything in the journal is older than everything in memory, and the
//! journal is applied first, so the store sees events in their original order.
//!
//! One store call runs at a time (`StoreCall`); it owns the batch it writes and gives it back
//! when it ends, so the batch has one holder. A call that takes longer than
//! `bridge.store_timeout` fails with [`StoreError::Timeout`] and is retried. The journal's file
//! I/O runs on the blocking pool ([`super::journal`]); the bridge awaits it, and reads the
//! journal's counts and oldest event time from the journal handle, not from the file.
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

use chrono::{DateTime, Utc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::journal::{Journal, JournalError};
use super::retention::NewSessions;
use crate::config::BridgeConfig;
use crate::event::{ConnectionEvent, EventReceiver, PresenceRecord};
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

/// What a store call is for.
#[derive(Debug, Clone, Copy)]
enum Job {
    Migrate,
    Recover,
    /// A batch read from the journal: consumed (up to `end`, `lines` lines) once committed.
    Journal {
        end: u64,
        lines: u64,
        /// Lines that did not decode: counted as lost once the batch is committed.
        corrupt: u64,
    },
    /// A batch taken from memory (put back in front on failure).
    Memory,
}

/// What a store call gives back when it ends: its batch, and its result (`None` when it was
/// abandoned).
type Ended = (Vec<PresenceRecord>, Option<Result<(), StoreError>>);

/// The store call in flight. Its future owns the batch it writes and hands it back when it
/// ends, or at once when abandoned; nobody else holds the batch meanwhile.
struct StoreCall {
    job: Job,
    /// Events in the batch (queue depth gauge).
    len: usize,
    /// Time of the batch's first event (oldest-event gauge).
    oldest: Option<SystemTime>,
    /// Cancelled to abandon the call.
    abandon: CancellationToken,
    future: Pin<Box<dyn Future<Output = Ended> + Send>>,
}

impl StoreCall {
    /// Abandons the call (a transaction it began is rolled back, or may have committed: the
    /// batch is idempotent) and takes its batch back.
    async fn abandon(mut self) -> Vec<PresenceRecord> {
        self.abandon.cancel();
        self.future.as_mut().await.0
    }
}

/// The end of the call in flight; pending while there is none.
async fn ended(call: &mut Option<StoreCall>) -> Ended {
    match call {
        Some(call) => call.future.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Crash recovery of the node's earlier boots, with the persistent sessions the broker state
/// restored held again; logged when it changed anything.
async fn recover<S: PresenceStore>(
    store: &S,
    node_id: &str,
    boot_id: Uuid,
    held: &[(String, DateTime<Utc>)],
) -> Result<(), StoreError> {
    let recovery = store.begin_boot(node_id, boot_id, Utc::now(), held).await?;
    if !held.is_empty() {
        tracing::info!(
            sessions = held.len(),
            devices = recovery.held_sessions_restored,
            "Persistent sessions restored from the broker state are held again."
        );
    }
    if recovery.sessions_closed > 0 || recovery.boots > 0 {
        tracing::info!(
            boots = recovery.boots,
            sessions = recovery.sessions_closed,
            devices = recovery.devices_offline,
            "Closed sessions left open by earlier boots of this node (broker_restart)."
        );
    }
    if recovery.held_sessions_ended > 0 {
        tracing::info!(
            devices = recovery.held_sessions_ended,
            "Persistent sessions held by earlier boots of this node ended while it was down \
             (expired, or not kept by the broker state)."
        );
    }
    Ok(())
}

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
    /// The store call in flight, holding its batch.
    in_flight: Option<StoreCall>,
    /// Where committed sessions are counted per device for retention's cap, when it is on.
    new_sessions: Option<Arc<NewSessions>>,
    /// Persistent sessions the broker state restored (client id, expiry), recorded at
    /// recovery.
    held: Arc<[(String, DateTime<Utc>)]>,
}

impl<S: PresenceStore> Bridge<S> {
    /// A bridge for `node_id`'s boot `boot_id`, reading `events`; opens the journal.
    pub async fn new(
        store: S,
        events: EventReceiver,
        config: BridgeConfig,
        node_id: &str,
        boot_id: Uuid,
    ) -> Result<Self, JournalError> {
        let journal = Journal::open(&config.journal_path).await?;
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
            in_flight: None,
            new_sessions: None,
            held: Arc::new([]),
        })
    }

    /// Counts the sessions of every committed batch per device in `counts` (for retention's
    /// cap per device).
    pub fn count_new_sessions(&mut self, counts: Arc<NewSessions>) {
        self.new_sessions = Some(counts);
    }

    /// Records the persistent sessions the broker state restored as held, at recovery (they
    /// outlived the earlier boot whose held sessions recovery clears).
    pub fn hold_sessions(&mut self, held: Vec<(String, DateTime<Utc>)>) {
        self.held = held.into();
    }

    /// Becomes true once the store's migrations are applied.
    pub fn migrated(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.migrated)
    }

    /// Runs until every event sender is gone (or `stop` is cancelled) and the drain is over,
    /// bounded by `bridge.drain_timeout` from that moment.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut open = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if self.in_flight.is_none() {
                self.in_flight = self.next_call(open).await;
            }
            // Done draining: nothing left, or only journal records while the store is failing
            // (they stay in the journal for the next start).
            if !open
                && self.in_flight.is_none()
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
            // With a call in flight, its end is what the loop waits for.
            let wake_at = self
                .in_flight
                .is_none()
                .then(|| self.wake_at(open))
                .flatten()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));

            tokio::select! {
                biased;
                done = ended(&mut self.in_flight), if self.in_flight.is_some() => {
                    if let Some(call) = self.in_flight.take() {
                        self.finish(call.job, done).await;
                    }
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
            self.spill_if_full().await;
        }

        // What could not be written goes to the journal for the next start, in order: an
        // abandoned memory batch first (it is older than what is still in memory). An
        // abandoned journal batch simply stays in the journal.
        let mut left = match self.in_flight.take() {
            Some(call) => {
                let job = call.job;
                let batch = call.abandon().await;
                if let Job::Memory = job {
                    batch
                } else {
                    Vec::new()
                }
            }
            None => Vec::new(),
        };
        left.extend(self.memory.drain(..));
        if !left.is_empty() {
            tracing::warn!(
                events = left.len(),
                path = %self.journal.path().display(),
                "Database not reachable in time: presence events kept in the journal for the next start."
            );
            self.spill(left).await;
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

    /// Starts the store call of `job` on `batch`, bounded by `bridge.store_timeout`.
    fn start(&self, job: Job, batch: Vec<PresenceRecord>) -> StoreCall {
        let store = self.store.clone();
        let node_id = Arc::clone(&self.node_id);
        let boot_id = self.boot_id;
        let held = Arc::clone(&self.held);
        let timeout = self.config.store_timeout;
        let abandon = CancellationToken::new();
        let abandoned = abandon.clone();
        let len = batch.len();
        let oldest = batch.first().map(|r| r.event.time());
        let future = Box::pin(async move {
            let started = Instant::now();
            let call = async {
                match job {
                    Job::Migrate => store.migrate().await,
                    Job::Recover => recover(&store, &node_id, boot_id, &held).await,
                    Job::Journal { .. } | Job::Memory => store.apply(&batch).await,
                }
            };
            let result = tokio::select! {
                biased;
                _ = abandoned.cancelled() => None,
                result = tokio::time::timeout(timeout, call) => {
                    metrics()
                        .bridge_flush_duration
                        .observe(started.elapsed().as_secs_f64());
                    Some(result.unwrap_or(Err(StoreError::Timeout(timeout))))
                }
            };
            (batch, result)
        });
        StoreCall {
            job,
            len,
            oldest,
            abandon,
            future,
        }
    }

    /// The next store call to make, if any is due.
    async fn next_call(&mut self, open: bool) -> Option<StoreCall> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        self.retry_at = None;
        if self.phase == Phase::ReplayOld && self.journal.unread() == 0 {
            self.phase = Phase::Recover;
        }
        match self.phase {
            Phase::Migrate => Some(self.start(Job::Migrate, Vec::new())),
            Phase::ReplayOld => self.journal_batch().await,
            Phase::Recover => Some(self.start(Job::Recover, Vec::new())),
            Phase::Running if self.journal.unread() > 0 => self.journal_batch().await,
            Phase::Running => self.memory_batch(open),
        }
    }

    /// A call applying the journal's next batch.
    async fn journal_batch(&mut self) -> Option<StoreCall> {
        let max = if self.phase == Phase::ReplayOld {
            self.old_records.min(self.config.batch_size as u64) as usize
        } else {
            self.config.batch_size
        };
        let read = match self.journal.peek(max.max(1)).await {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(%error, "Cannot read the presence journal.");
                self.backoff();
                return None;
            }
        };
        if read.lines() == 0 {
            // The file holds less than the journal counted (cut short behind its back).
            match self.journal.reset_unreadable().await {
                Ok(lost) => {
                    metrics().bridge_lost_events.inc_by(lost);
                    tracing::error!(
                        lost,
                        path = %self.journal.path().display(),
                        "PRESENCE EVENTS LOST: the journal file is shorter than recorded."
                    );
                }
                Err(error) => {
                    tracing::error!(%error, "Cannot read the presence journal.");
                    self.backoff();
                }
            }
            return None;
        }
        let job = Job::Journal {
            end: read.end,
            lines: read.lines(),
            corrupt: read.corrupt,
        };
        Some(self.start(job, read.records))
    }

    /// A call applying the oldest events in memory, when a batch is due.
    fn memory_batch(&mut self, open: bool) -> Option<StoreCall> {
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
        let batch = self.memory.drain(..n).collect();
        Some(self.start(Job::Memory, batch))
    }

    async fn finish(&mut self, job: Job, (batch, result): Ended) {
        match result {
            Some(Ok(())) => {
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
                        end,
                        lines,
                        corrupt,
                    } => {
                        if corrupt > 0 {
                            metrics().bridge_lost_events.inc_by(corrupt);
                            tracing::error!(
                                records = corrupt,
                                "PRESENCE EVENTS LOST: undecodable records in the journal skipped."
                            );
                        }
                        if let Err(error) = self.journal.consume(end, lines).await {
                            tracing::error!(%error, "Cannot truncate the presence journal.");
                        }
                        if self.phase == Phase::ReplayOld {
                            self.old_records = self.old_records.saturating_sub(lines);
                            if self.old_records == 0 {
                                self.phase = Phase::Recover;
                            }
                        }
                        self.committed(&batch);
                    }
                    Job::Memory => self.committed(&batch),
                }
                if self.memory.is_empty() && self.memory.capacity() > 4 * self.config.batch_size {
                    // A burst (or an outage) is over: give its buffer back.
                    self.memory = VecDeque::new();
                }
            }
            Some(Err(error)) => {
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
                    self.put_back(batch);
                }
                self.backoff();
            }
            // Abandoned (only `StoreCall::abandon` does that, which takes the batch itself): a
            // memory batch goes back in front, a journal batch stays in the journal.
            None => {
                if let Job::Memory = job {
                    self.put_back(batch);
                }
            }
        }
        self.update_gauges();
    }

    /// A memory batch that was not written, back in front of memory.
    fn put_back(&mut self, batch: Vec<PresenceRecord>) {
        for record in batch.into_iter().rev() {
            self.memory.push_front(record);
        }
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

    async fn spill_if_full(&mut self) {
        if self.memory.len() < self.config.memory_capacity {
            return;
        }
        // The batch being written goes first: it is older than memory, and the journal is
        // applied before memory. Its write is abandoned; if it committed after all, the journal
        // applies it again, which changes nothing.
        let mut all = match self
            .in_flight
            .take_if(|call| matches!(call.job, Job::Memory))
        {
            Some(call) => call.abandon().await,
            None => Vec::new(),
        };
        all.extend(self.memory.drain(..));
        tracing::warn!(
            events = all.len(),
            path = %self.journal.path().display(),
            "Presence events exceed bridge.memory_capacity; appending them to the journal."
        );
        self.spill(all).await;
    }

    async fn spill(&mut self, records: Vec<PresenceRecord>) {
        let count = records.len() as u64;
        match self.journal.append(records).await {
            Ok(()) => {
                metrics().bridge_journaled.inc_by(count);
            }
            Err(error) => {
                metrics().bridge_lost_events.inc_by(count);
                tracing::error!(
                    %error,
                    lost = count,
                    "PRESENCE EVENTS LOST: the journal cannot be written (disk full?). \
                     Device states will be repaired only by later events."
                );
            }
        }
        self.update_gauges();
    }

    /// Queue depth, journal size and the age of the oldest waiting event, from what the bridge
    /// holds and the journal's cached counts: no file is read.
    fn update_gauges(&self) {
        let m = metrics();
        let writing = self
            .in_flight
            .as_ref()
            .filter(|call| matches!(call.job, Job::Memory));
        m.bridge_queue_depth.set(
            (writing.map_or(0, |call| call.len) as u64
                + self.memory.len() as u64
                + self.journal.unread()) as i64,
        );
        m.bridge_journal_bytes.set(self.journal.bytes() as i64);
        let oldest = if self.journal.unread() > 0 {
            self.journal.oldest()
        } else {
            writing
                .and_then(|call| call.oldest)
                .or(self.memory.front().map(|r| r.event.time()))
        };
        let age = oldest
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        m.bridge_oldest_age.set(age.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SessionId;
    use crate::store::{
        Access, Boot, Credential, CredentialRecord, Device, Recovery, Session, Stats,
    };
    use chrono::DateTime;

    /// A store that never answers.
    #[derive(Clone)]
    struct Silent;

    impl PresenceStore for Silent {
        async fn open(_: &str, _: u32, _: Access) -> Result<Self, StoreError> {
            Ok(Self)
        }
        fn coalescing(self, _: usize) -> Self {
            self
        }
        async fn migrate(&self) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn ping(&self) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn begin_boot(
            &self,
            _: &str,
            _: Uuid,
            _: DateTime<Utc>,
            _: &[(String, DateTime<Utc>)],
        ) -> Result<Recovery, StoreError> {
            std::future::pending().await
        }
        async fn heartbeat(&self, _: Uuid, _: DateTime<Utc>) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn apply(&self, _: &[PresenceRecord]) -> Result<(), StoreError> {
            std::future::pending().await
        }
        async fn device(&self, _: &str) -> Result<Option<Device>, StoreError> {
            std::future::pending().await
        }
        async fn devices(
            &self,
            _: Option<bool>,
            _: Option<&str>,
            _: u32,
        ) -> Result<Vec<Device>, StoreError> {
            std::future::pending().await
        }
        async fn sessions(&self, _: &str, _: u32) -> Result<Vec<Session>, StoreError> {
            std::future::pending().await
        }
        async fn stats(&self) -> Result<Stats, StoreError> {
            std::future::pending().await
        }
        async fn prune_ended_before(&self, _: DateTime<Utc>, _: u32) -> Result<u64, StoreError> {
            std::future::pending().await
        }
        async fn prune_device(&self, _: &str, _: u32, _: u32) -> Result<u64, StoreError> {
            std::future::pending().await
        }
        async fn nodes(&self, _: Option<&str>, _: u32) -> Result<Vec<Boot>, StoreError> {
            std::future::pending().await
        }
        async fn credential(&self, _: &str) -> Result<Option<CredentialRecord>, StoreError> {
            std::future::pending().await
        }
        async fn create_credential(&self, _: &CredentialRecord) -> Result<bool, StoreError> {
            std::future::pending().await
        }
        async fn rotate_credential(
            &self,
            _: &str,
            _: &str,
            _: DateTime<Utc>,
        ) -> Result<bool, StoreError> {
            std::future::pending().await
        }
        async fn revoke_credential(&self, _: &str, _: DateTime<Utc>) -> Result<bool, StoreError> {
            std::future::pending().await
        }
        async fn credentials(
            &self,
            _: Option<&str>,
            _: u32,
        ) -> Result<Vec<Credential>, StoreError> {
            std::future::pending().await
        }
    }

    fn records(n: u64) -> Vec<PresenceRecord> {
        (0..n)
            .map(|seq| PresenceRecord {
                node_id: "n".into(),
                boot_id: Uuid::nil(),
                event: ConnectionEvent::Connected {
                    protocol: Default::default(),
                    client_id: format!("d{seq}"),
                    session_id: SessionId::new(),
                    seq,
                    peer: "127.0.0.1:1".parse().expect("addr"),
                    listener: crate::labels::Listener::Tcp,
                    identity: None,
                    username: None,
                    auth_method: crate::labels::AuthMethod::Anonymous,
                    keep_alive: 30,
                    clean_session: true,
                    time: SystemTime::now(),
                },
            })
            .collect()
    }

    async fn bridge() -> Bridge<Silent> {
        let journal_path = std::env::temp_dir().join(format!("hw-bridge-{}", uuid::Uuid::now_v7()));
        let config = BridgeConfig {
            journal_path,
            store_timeout: Duration::from_secs(10),
            ..BridgeConfig::default()
        };
        let (_, events) = crate::event::channel(1);
        Bridge::new(Silent, events, config, "n", Uuid::nil())
            .await
            .expect("bridge")
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_call_over_the_timeout_fails_as_a_timeout_and_gives_its_batch_back() {
        let bridge = bridge().await;
        let batch = records(3);
        let mut call = bridge.start(Job::Memory, batch.clone());
        assert_eq!((call.len, call.oldest), (3, Some(batch[0].event.time())));
        let (back, result) = call.future.as_mut().await;
        assert_eq!(back, batch, "the call hands its batch back");
        assert!(
            matches!(result, Some(Err(StoreError::Timeout(t))) if t == Duration::from_secs(10)),
            "{result:?}"
        );
        let _ = std::fs::remove_file(bridge.journal.path());
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_call_gives_its_batch_back_at_once() {
        let bridge = bridge().await;
        let batch = records(2);
        let mut call = bridge.start(Job::Memory, batch.clone());
        // Under way, stalled in the store.
        let pending = tokio::time::timeout(Duration::from_secs(1), call.future.as_mut()).await;
        assert!(pending.is_err());
        let started = Instant::now();
        assert_eq!(call.abandon().await, batch);
        assert_eq!(started.elapsed(), Duration::ZERO);
        let _ = std::fs::remove_file(bridge.journal.path());
    }
}
