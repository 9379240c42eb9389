//! How the API spends the store: at most `http.max_store_queries` requests query it at once
//! (each has a connection of the API's own pool waiting for it), a short wait for a slot and
//! then 503; and /api/v1/stats from a cached result that concurrent requests refresh once. The
//! refresh runs one at a time, on a connection of its own rather than a slot, so that a burst
//! of other requests cannot make /stats fail.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use super::error::ApiError;
use crate::metrics::metrics;
use crate::store::{PresenceStore, Stats};

/// The API's store query slots.
pub struct QueryLimit {
    /// One permit per query that may run at once.
    slots: Semaphore,
    /// How long a request waits for a permit before it is answered 503.
    wait: Duration,
}

impl QueryLimit {
    /// `max` queries at once; a request waits at most `wait` for a slot.
    pub fn new(max: u32, wait: Duration) -> Self {
        Self {
            slots: Semaphore::new(max as usize),
            wait,
        }
    }

    /// A slot for one request's store queries, held until dropped; [`ApiError::Busy`] when none
    /// frees up within the wait (counted).
    pub async fn acquire(&self) -> Result<SemaphorePermit<'_>, ApiError> {
        match tokio::time::timeout(self.wait, self.slots.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // (The semaphore is never closed.)
            Ok(Err(_)) | Err(_) => {
                metrics().http_store_busy.inc();
                Err(ApiError::Busy)
            }
        }
    }
}

/// The last stats refresh.
struct Refreshed {
    /// When it finished.
    at: Instant,
    /// Increases with every refresh, so that a request that waited for one knows it happened.
    generation: u64,
    /// `None` when it failed (the failure was logged): the requests that waited for this
    /// refresh share its answer.
    result: Option<Arc<Stats>>,
}

/// /api/v1/stats totals, reused for `http.stats_cache_ttl`, refreshed by one query at a time.
pub struct StatsCache {
    ttl: Duration,
    last: Mutex<Option<Refreshed>>,
    /// Held by the one request that refreshes; the others wait for its result.
    refreshing: tokio::sync::Mutex<()>,
}

impl StatsCache {
    /// A cache whose results are fresh for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Option<Refreshed>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The totals: the cached ones while fresh, else the result of the refresh in flight, else
    /// a new refresh.
    pub async fn get<S: PresenceStore>(&self, store: &S) -> Result<Arc<Stats>, ApiError> {
        let seen = {
            let last = self.last();
            match &*last {
                Some(r) if r.at.elapsed() < self.ttl => {
                    if let Some(stats) = &r.result {
                        return Ok(Arc::clone(stats));
                    }
                    r.generation
                }
                Some(r) => r.generation,
                None => 0,
            }
        };
        let _refreshing = self.refreshing.lock().await;
        {
            let last = self.last();
            if let Some(r) = last.as_ref().filter(|r| r.generation != seen) {
                // Refreshed while this request waited: share that answer, whatever it was.
                return r.result.clone().ok_or(ApiError::Unavailable);
            }
        }
        metrics().http_stats_refreshes.inc();
        let result = store.stats().await.map(Arc::new).map_err(ApiError::from);
        *self.last() = Some(Refreshed {
            at: Instant::now(),
            generation: seen + 1,
            result: result.as_ref().ok().cloned(),
        });
        result
    }
}
