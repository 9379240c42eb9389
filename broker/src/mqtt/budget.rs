//! Broker-wide byte budgets: memory that many connections draw from (queued messages, partly
//! received packets), so that no number of clients can make the process grow without bound.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntGauge;

/// A number of bytes shared by every connection, reserved before use and released after.
#[derive(Debug)]
pub struct ByteBudget {
    used: AtomicUsize,
    limit: usize,
    /// Mirrors `used` for /metrics.
    gauge: IntGauge,
}

impl ByteBudget {
    /// A budget of `limit` bytes, reported in `gauge`.
    pub fn new(limit: usize, gauge: IntGauge) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
            gauge,
        }
    }

    /// Reserves `bytes`; false (and nothing reserved) when that would pass the limit.
    pub fn try_reserve(&self, bytes: usize) -> bool {
        let reserved = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if reserved {
            self.gauge.add(bytes as i64);
        }
        reserved
    }

    /// Reserves `bytes` even past the limit: for state restored at start, which was accepted
    /// under the limit of its time.
    pub fn force_reserve(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        self.gauge.add(bytes as i64);
    }

    /// Gives back `bytes` reserved earlier.
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(before >= bytes, "released more than reserved");
        self.gauge.sub(bytes as i64);
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_up_to_the_limit() {
        let gauge = IntGauge::new("t", "t").expect("gauge");
        let b = ByteBudget::new(10, gauge.clone());
        assert!(b.try_reserve(6));
        assert!(!b.try_reserve(5));
        assert!(b.try_reserve(4));
        b.release(6);
        assert_eq!((b.used(), gauge.get()), (4, 4));
        assert!(!b.try_reserve(usize::MAX));
    }
}
