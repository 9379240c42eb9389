//! The `durable` scenario's ground truth and its check, kept free of I/O so that the verdict
//! rules are unit-tested: what the publishers were promised per device ([`DeviceTruth`]), what
//! the device then saw ([`DeviceSeen`]), and the counts of the comparison ([`Verdict`]).
//!
//! The rules: every command message whose PUBACK arrived is delivered at least once
//! (`missing` otherwise); first deliveries come in publish order, which for one device is
//! sequence order, since one publisher connection sends all of a device's messages in order
//! (`out_of_order` otherwise); the retained state is the last acknowledged value or a later
//! one (`retained_stale` otherwise). Messages published but never acknowledged may or may not
//! arrive (the broker may have made them durable before it died): they are counted, not judged.

use serde::{Deserialize, Serialize};

/// Problems quoted in the report; the counts cover all of them.
const EXAMPLES: usize = 10;

/// What one device's publisher knows: the ground truth of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceTruth {
    /// Sequence numbers of the command messages whose PUBACK arrived.
    pub acked: Vec<u32>,
    /// Highest command sequence number written to the broker, acknowledged or not: nothing
    /// higher can be delivered.
    pub sent_max: u32,
    /// Last retained state value whose PUBACK arrived (0: none).
    pub state_acked: u32,
}

/// What one device observed after the publishers were done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceSeen {
    /// Sequence numbers of the command messages delivered, in arrival order (redeliveries
    /// included).
    pub delivered: Vec<u32>,
    /// Whether the broker still had the device's session when it came back to drain it.
    pub session_present: bool,
    /// The retained state value of this run read at the end (`None`: none, or another run's).
    pub retained: Option<u32>,
}

/// The counts of a `durable` run's check (the `durable` object of `--json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Devices checked.
    pub devices: u64,
    /// Command messages acknowledged by the broker (PUBACK received).
    pub acknowledged: u64,
    /// Command messages delivered to the devices, redeliveries included.
    pub delivered: u64,
    /// Deliveries of a message the device had already received.
    pub duplicates: u64,
    /// Acknowledged messages never delivered.
    pub missing: u64,
    /// First deliveries that came after a later message of the same device.
    pub out_of_order: u64,
    /// Messages delivered whose PUBACK never arrived (made durable before the broker died).
    pub unacknowledged_delivered: u64,
    /// Devices with an acknowledged state value, whose retained value was checked.
    pub retained_checked: u64,
    /// Devices whose retained value is absent or older than the last acknowledged one.
    pub retained_stale: u64,
    /// Devices whose session the broker no longer had when they came back.
    pub sessions_lost: u64,
    /// The first problems, one line each (`MISSING dev-7 seq 4`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<String>,
}

impl Verdict {
    /// Whether the broker kept every promise: nothing missing, out of order or stale.
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.out_of_order == 0 && self.retained_stale == 0
    }

    /// Adds the comparison of one device's truth and observation.
    pub fn add(&mut self, client_id: &str, truth: &DeviceTruth, seen: &DeviceSeen) {
        self.devices += 1;
        self.acknowledged += truth.acked.len() as u64;
        self.delivered += seen.delivered.len() as u64;
        if !seen.session_present && !truth.acked.is_empty() {
            self.sessions_lost += 1;
            self.example(format!("SESSION LOST {client_id}"));
        }
        // First deliveries must rise; anything seen before is a duplicate.
        let mut first = std::collections::HashSet::new();
        let mut highest = 0u32;
        for &seq in &seen.delivered {
            if !first.insert(seq) {
                self.duplicates += 1;
            } else if seq < highest {
                self.out_of_order += 1;
                self.example(format!(
                    "OUT OF ORDER {client_id} seq {seq} delivered after seq {highest}"
                ));
            }
            highest = highest.max(seq);
        }
        let acked: std::collections::HashSet<u32> = truth.acked.iter().copied().collect();
        for &seq in &truth.acked {
            if !first.contains(&seq) {
                self.missing += 1;
                self.example(format!(
                    "MISSING {client_id} seq {seq} (acknowledged, never delivered)"
                ));
            }
        }
        self.unacknowledged_delivered += first.iter().filter(|s| !acked.contains(s)).count() as u64;
        if truth.state_acked > 0 {
            self.retained_checked += 1;
            if seen.retained.is_none_or(|v| v < truth.state_acked) {
                self.retained_stale += 1;
                self.example(format!(
                    "STALE {client_id} retained state {} (last acknowledged {})",
                    seen.retained
                        .map_or_else(|| "absent".to_owned(), |v| v.to_string()),
                    truth.state_acked
                ));
            }
        }
    }

    fn example(&mut self, line: String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truth(acked: &[u32], sent_max: u32, state_acked: u32) -> DeviceTruth {
        DeviceTruth {
            acked: acked.to_vec(),
            sent_max,
            state_acked,
        }
    }

    fn seen(delivered: &[u32], retained: Option<u32>) -> DeviceSeen {
        DeviceSeen {
            delivered: delivered.to_vec(),
            session_present: true,
            retained,
        }
    }

    #[test]
    fn everything_acknowledged_delivered_in_order_passes() {
        let mut v = Verdict::default();
        v.add("d", &truth(&[1, 2, 3], 3, 3), &seen(&[1, 2, 3], Some(3)));
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.acknowledged, v.delivered, v.duplicates), (3, 3, 0));
    }

    #[test]
    fn unacknowledged_messages_may_arrive_and_redeliveries_are_duplicates() {
        let mut v = Verdict::default();
        // 3 was written but its PUBACK lost in a crash; 2 redelivered after a reconnect.
        v.add(
            "d",
            &truth(&[1, 2, 4], 4, 4),
            &seen(&[1, 2, 2, 3, 4], Some(4)),
        );
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.duplicates, v.unacknowledged_delivered), (1, 1));
    }

    #[test]
    fn a_lost_acknowledged_message_is_missing() {
        let mut v = Verdict::default();
        v.add("d", &truth(&[1, 2, 3], 3, 0), &seen(&[1, 3], None));
        assert!(!v.ok());
        assert_eq!(v.missing, 1);
        assert_eq!(
            v.examples,
            ["MISSING d seq 2 (acknowledged, never delivered)"]
        );
    }

    #[test]
    fn a_first_delivery_after_a_later_one_is_out_of_order() {
        let mut v = Verdict::default();
        v.add("d", &truth(&[1, 2, 3], 3, 0), &seen(&[1, 3, 2, 3], None));
        assert_eq!((v.out_of_order, v.duplicates, v.missing), (1, 1, 0));
        assert!(!v.ok());
    }

    #[test]
    fn the_retained_state_must_be_the_last_acknowledged_or_newer() {
        let mut v = Verdict::default();
        v.add("newer", &truth(&[], 0, 2), &seen(&[], Some(3)));
        assert!(v.ok());
        v.add("older", &truth(&[], 0, 2), &seen(&[], Some(1)));
        v.add("absent", &truth(&[], 0, 2), &seen(&[], None));
        assert_eq!((v.retained_checked, v.retained_stale), (3, 2));
        assert!(!v.ok());
    }

    #[test]
    fn a_session_lost_is_counted_when_it_had_something_to_deliver() {
        let mut v = Verdict::default();
        let mut s = seen(&[], None);
        s.session_present = false;
        v.add("d", &truth(&[1], 1, 0), &s);
        assert_eq!((v.sessions_lost, v.missing), (1, 1));
    }
}
