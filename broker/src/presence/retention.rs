//! History retention: every `database.prune_interval`, closed sessions older than
//! `database.history_max_age` are deleted, and so are a device's closed sessions beyond its
//! `database.history_max_sessions_per_device` newest. Both run as short statements of at most
//! `database.prune_batch_size` rows on the bridge's pool, so a presence write waits behind one
//! short delete at most. Open sessions are never deleted.
//!
//! The cap per device looks only at devices that got new sessions: the bridge counts them per
//! device as it commits ([`NewSessions`]), and a device is checked once a tenth of its cap has
//! accumulated. No pass scans the whole table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseConfig;
use crate::event::ConnectionEvent;
use crate::event::PresenceRecord;
use crate::labels::{RetentionPolicy, StoreOperation};
use crate::metrics::metrics;
use crate::store::{PresenceStore, StoreError};
use crate::telemetry::LogLimiter;

/// Devices tracked at once; beyond, a device's new sessions are counted again once others were
/// checked (its history is still bounded by age).
const MAX_TRACKED: usize = 100_000;

static PRUNE_FAILED: LogLimiter = LogLimiter::new(Duration::from_secs(60));

/// New history sessions per device since the device was last checked against its cap.
#[derive(Debug)]
pub struct NewSessions {
    counts: Mutex<HashMap<String, u32>>,
    /// A device is due for a check once it has this many.
    due_at: u32,
}

impl NewSessions {
    /// Counts for a cap of `max_per_device` sessions: a device is due after a tenth of it.
    pub fn new(max_per_device: u32) -> Self {
        Self {
            counts: Mutex::new(HashMap::new()),
            due_at: (max_per_device / 10).max(1),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts the sessions a committed batch started.
    pub fn record(&self, batch: &[PresenceRecord]) {
        let mut counts = self.counts();
        for record in batch {
            if let ConnectionEvent::Connected { client_id, .. } = &record.event {
                if let Some(n) = counts.get_mut(client_id.as_str()) {
                    *n = n.saturating_add(1);
                } else if counts.len() < MAX_TRACKED {
                    counts.insert(client_id.clone(), 1);
                }
            }
        }
    }

    /// The devices due for a check, forgotten until their next sessions.
    fn take_due(&self) -> Vec<String> {
        let mut counts = self.counts();
        let due: Vec<String> = counts
            .iter()
            .filter(|(_, n)| **n >= self.due_at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &due {
            counts.remove(id);
        }
        if counts.is_empty() && counts.capacity() > 1024 {
            *counts = HashMap::new();
        }
        due
    }

    /// Devices whose check did not happen (the store failed): due again at the next pass.
    fn put_back(&self, devices: impl IntoIterator<Item = String>) {
        let mut counts = self.counts();
        for id in devices {
            counts.insert(id, self.due_at);
        }
    }
}

/// What one pass deleted.
#[derive(Debug, Default)]
struct Pass {
    by_age: u64,
    by_cap: u64,
    devices: usize,
}

/// Runs retention until `shutdown`, once the bridge has `migrated` the schema; `new_sessions`
/// is what the bridge records when the per-device cap is on.
pub async fn run<S: PresenceStore>(
    store: S,
    config: DatabaseConfig,
    new_sessions: Option<Arc<NewSessions>>,
    migrated: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    if config.history_max_age.is_zero() && config.history_max_sessions_per_device == 0 {
        return;
    }
    let mut tick = tokio::time::interval(config.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !migrated.load(Ordering::Acquire) {
            continue;
        }
        let started = Instant::now();
        let mut pass = Pass::default();
        let result = prune(
            &store,
            &config,
            new_sessions.as_deref(),
            &shutdown,
            &mut pass,
        )
        .await;
        tracing::debug!(
            by_age = pass.by_age,
            by_device_cap = pass.by_cap,
            devices_checked = pass.devices,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "History pruned."
        );
        if let Err(error) = result {
            metrics().store_errors.inc(StoreOperation::Prune);
            if let Some(suppressed) = PRUNE_FAILED.check() {
                tracing::warn!(%error, suppressed, "History pruning failed; retrying at the next pass.");
            }
        }
    }
}

/// One pass: by age, then the devices due for their cap.
async fn prune<S: PresenceStore>(
    store: &S,
    config: &DatabaseConfig,
    new_sessions: Option<&NewSessions>,
    shutdown: &CancellationToken,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let batch = config.prune_batch_size;
    if !config.history_max_age.is_zero() {
        let age =
            chrono::Duration::from_std(config.history_max_age).unwrap_or(chrono::TimeDelta::MAX);
        let before = Utc::now() - age;
        loop {
            let n = store.prune_ended_before(before, batch).await?;
            pass.by_age += n;
            metrics().history_pruned.inc_by(RetentionPolicy::MaxAge, n);
            if n < u64::from(batch) || shutdown.is_cancelled() {
                break;
            }
        }
    }
    let keep = config.history_max_sessions_per_device;
    let Some(new_sessions) = new_sessions.filter(|_| keep > 0) else {
        return Ok(());
    };
    let mut due = new_sessions.take_due().into_iter();
    while let Some(device) = due.next() {
        pass.devices += 1;
        loop {
            let n = match store.prune_device(&device, keep, batch).await {
                Ok(n) => n,
                Err(error) => {
                    new_sessions.put_back(std::iter::once(device).chain(due));
                    return Err(error);
                }
            };
            pass.by_cap += n;
            metrics()
                .history_pruned
                .inc_by(RetentionPolicy::MaxSessionsPerDevice, n);
            if n < u64::from(batch) {
                break;
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::SessionId;

    fn connected(id: &str) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: uuid::Uuid::nil(),
            event: ConnectionEvent::Connected {
                protocol: Default::default(),
                client_id: id.into(),
                session_id: SessionId::new(),
                seq: 1,
                peer: "127.0.0.1:1".parse().expect("addr"),
                listener: crate::labels::Listener::Tcp,
                identity: None,
                username: None,
                auth_method: crate::labels::AuthMethod::Anonymous,
                keep_alive: 30,
                clean_session: true,
                time: std::time::SystemTime::now(),
            },
        }
    }

    #[test]
    fn a_device_is_due_after_a_tenth_of_its_cap() {
        let new = NewSessions::new(50);
        new.record(&[connected("a"), connected("b"), connected("a")]);
        new.record(&vec![connected("a"); 2]);
        assert!(new.take_due().is_empty(), "a has 4 of 5");
        new.record(&[connected("a")]);
        assert_eq!(new.take_due(), ["a"]);
        assert!(new.take_due().is_empty(), "counted again from 0");
        new.put_back(["b".to_owned()]);
        assert_eq!(new.take_due(), ["b"]);
        // A small cap: every new session makes the device due.
        let new = NewSessions::new(5);
        new.record(&[connected("c")]);
        assert_eq!(new.take_due(), ["c"]);
    }
}
