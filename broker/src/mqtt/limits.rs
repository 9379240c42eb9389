//! Limits on how fast and how often clients may come and talk, beyond what one connection
//! holds: token buckets that slow accepting per listener (`mqtt.max_connection_rate`) and
//! reading a client's publishes (`mqtt.max_publish_rate`, `mqtt.max_publish_bytes_rate`) —
//! they delay, never drop —, the count of connections per source address
//! (`mqtt.max_connections_per_address`), and flapping detection (`mqtt.flapping`): a client id
//! that connects too often in a window is banned for a while, and the bans can be listed and
//! lifted (the admin API).
//!
//! Memory is bounded: the address counts hold one entry per address with a connection open
//! (removed at zero), the flapping table one per client id that connected within the last
//! window (swept once per window) or is banned, and at most [`MAX_TRACKED_IDS`] of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{FlappingConfig, MqttConfig};
use crate::labels::PublishLimit;
use crate::metrics::metrics;
use crate::telemetry::LogLimiter;

/// Most client ids the flapping detector follows at once; beyond, new ids are not followed
/// until a sweep makes room (logged).
pub const MAX_TRACKED_IDS: usize = 1_000_000;

/// One line per 10 s about a full flapping table.
static FLAPPING_FULL: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A token bucket: `rate` tokens a second, at most `burst` saved up; it starts full. A taker
/// may go into debt ([`take`](Self::take)), and then waits until the debt is paid off.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held.
    burst: f64,
    /// Tokens now (negative: debt), as of `at`.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens (one second's worth when `burst` is 0), refilled at
    /// `rate` a second. `None` when `rate` is 0 (no limit).
    pub fn new(rate: u64, burst: u64, now: Instant) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let burst = if burst == 0 { rate } else { burst } as f64;
        Some(Self {
            rate: rate as f64,
            burst,
            tokens: burst,
            at: now,
        })
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
    }

    /// How long until `n` tokens are there (zero: now).
    pub fn wait_for(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.time_to(n)
    }

    /// Takes `n` tokens, going into debt if there are fewer, and says how long the taker must
    /// wait before taking more (zero: no debt).
    pub fn take(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        self.time_to(0.0)
    }

    /// How long until the bucket holds `n` tokens from what it holds now.
    fn time_to(&self, n: f64) -> Duration {
        if self.tokens >= n {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(((n - self.tokens) / self.rate).min(86_400.0))
        }
    }
}

/// A connection's publish rates: nothing more is read from its socket while it is in debt.
#[derive(Debug)]
pub struct Throttle {
    /// PUBLISH packets a second (`mqtt.max_publish_rate`).
    messages: Option<TokenBucket>,
    /// Topic and payload bytes a second (`mqtt.max_publish_bytes_rate`).
    bytes: Option<TokenBucket>,
    /// Since when reading has been paused, and until when.
    paused: Option<(Instant, Instant)>,
}

impl Throttle {
    /// The publish limits of `config` for a new connection; `None` when there are none.
    pub fn new(config: &MqttConfig, now: Instant) -> Option<Self> {
        let messages = TokenBucket::new(config.max_publish_rate, config.publish_rate_burst, now);
        let bytes = TokenBucket::new(
            config.max_publish_bytes_rate,
            config.publish_bytes_burst,
            now,
        );
        (messages.is_some() || bytes.is_some()).then_some(Self {
            messages,
            bytes,
            paused: None,
        })
    }

    /// Counts a received PUBLISH of `size` topic and payload bytes. When that puts a bucket
    /// into debt, reading pauses until it is paid off (counted by the limit that waits
    /// longest, and the time in `heartwire_publish_throttled_seconds_total`).
    pub fn publish(&mut self, size: usize, now: Instant) {
        let by_messages = self
            .messages
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(1.0, now));
        let by_bytes = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.take(size as f64, now));
        let (wait, limit) = if by_bytes > by_messages {
            (by_bytes, PublishLimit::Bytes)
        } else {
            (by_messages, PublishLimit::Messages)
        };
        if wait.is_zero() {
            return;
        }
        metrics().publish_throttled.inc(limit);
        metrics()
            .publish_throttled_seconds
            .inc_by(wait.as_secs_f64());
        let until = match self.paused {
            Some((_, until)) => until.max(now + wait),
            None => now + wait,
        };
        self.paused = Some((self.paused.map_or(now, |(since, _)| since), until));
    }

    /// Until when reading is paused, if it is.
    pub fn paused_until(&self) -> Option<Instant> {
        self.paused.map(|(_, until)| until)
    }

    /// Ends a pause that is over; returns how long it lasted (the time the broker, not the
    /// client, held its reads back).
    pub fn resume(&mut self, now: Instant) -> Option<Duration> {
        match self.paused {
            Some((since, until)) if now >= until => {
                self.paused = None;
                Some(now.saturating_duration_since(since))
            }
            _ => None,
        }
    }
}

/// Connections open per source address (`mqtt.max_connections_per_address`).
#[derive(Debug, Default)]
pub struct AddressCounts {
    /// Address -> connections open from it; an address leaves at zero.
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl AddressCounts {
    /// Counts a connection from `address`, unless `max` are open from it already (false).
    pub fn acquire(&self, address: IpAddr, max: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(address).or_insert(0);
        if *count as usize >= max {
            if *count == 0 {
                open.remove(&address);
            }
            return false;
        }
        *count += 1;
        true
    }

    /// A connection from `address` closed.
    pub fn release(&self, address: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&address);
            }
        }
    }

    /// Connections open from `address`.
    pub fn get(&self, address: IpAddr) -> u32 {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&address).copied().unwrap_or(0)
    }

    /// Addresses with a connection open.
    pub fn addresses(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A client id banned by flapping detection, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// The client id.
    pub client_id: String,
    /// When the ban began.
    pub since: SystemTime,
    /// When it ends.
    pub until: SystemTime,
    /// Why ("flapping").
    pub reason: &'static str,
}

/// What flapping detection says of an accepted CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flap {
    /// Within the limit.
    Allowed,
    /// One too many in the window: the id is banned from now on, this CONNECT included.
    NewBan,
    /// Banned already (another connection of the id was checked at the same time).
    Banned,
}

/// What the flapping detector knows of one client id.
#[derive(Debug)]
struct Track {
    /// When the current window began (its first connect).
    window_start: Instant,
    /// Connects within the window.
    connects: u32,
    /// While banned: since when (wall clock, for the API) and until when.
    banned: Option<(SystemTime, Instant)>,
}

/// The flapping table, behind its lock.
#[derive(Debug)]
struct FlapTable {
    ids: HashMap<Box<str>, Track>,
    /// When stale entries were last removed.
    swept: Instant,
}

/// Flapping detection (`mqtt.flapping`): a client id that connects more than `max_connects`
/// times within `window` is refused for `ban_time`.
#[derive(Debug)]
pub struct Flapping {
    config: FlappingConfig,
    table: Mutex<FlapTable>,
}

impl Flapping {
    /// A detector as `config` says (off when `max_connects` is 0).
    pub fn new(config: &FlappingConfig) -> Self {
        Self {
            config: config.clone(),
            table: Mutex::new(FlapTable {
                ids: HashMap::new(),
                swept: Instant::now(),
            }),
        }
    }

    fn enabled(&self) -> bool {
        self.config.max_connects > 0
    }

    fn table(&self) -> std::sync::MutexGuard<'_, FlapTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `client_id` is banned now.
    pub fn is_banned(&self, client_id: &str, now: Instant) -> bool {
        if !self.enabled() {
            return false;
        }
        self.table()
            .ids
            .get(client_id)
            .and_then(|t| t.banned)
            .is_some_and(|(_, until)| now < until)
    }

    /// Counts an accepted CONNECT of `client_id`, and says whether it may go on.
    pub fn connected(&self, client_id: &str, now: Instant) -> Flap {
        if !self.enabled() {
            return Flap::Allowed;
        }
        let window = self.config.window;
        let mut table = self.table();
        if now.saturating_duration_since(table.swept) >= window {
            table.ids.retain(|_, t| {
                now < t.window_start + window || t.banned.is_some_and(|b| now < b.1)
            });
            table.swept = now;
        }
        if !table.ids.contains_key(client_id) {
            if table.ids.len() >= MAX_TRACKED_IDS {
                if let Some(suppressed) = FLAPPING_FULL.check() {
                    tracing::warn!(
                        tracked = table.ids.len(),
                        suppressed,
                        "Flapping detection follows as many client ids as it may; new ones \
                         are not followed until older ones leave the window."
                    );
                }
                return Flap::Allowed;
            }
            table.ids.insert(
                client_id.into(),
                Track {
                    window_start: now,
                    connects: 0,
                    banned: None,
                },
            );
        }
        let Some(track) = table.ids.get_mut(client_id) else {
            return Flap::Allowed;
        };
        match track.banned {
            // Banned meanwhile (another connection of the id passed the check at the same
            // time): refused, and the ban stays as it is.
            Some((_, until)) if now < until => return Flap::Banned,
            Some(_) => {
                track.banned = None;
                track.connects = 0;
                track.window_start = now;
            }
            None => {}
        }
        if now >= track.window_start + window {
            track.window_start = now;
            track.connects = 0;
        }
        track.connects = track.connects.saturating_add(1);
        if track.connects <= self.config.max_connects {
            return Flap::Allowed;
        }
        track.banned = Some((SystemTime::now(), now + self.config.ban_time));
        metrics().flapping_bans.inc();
        Flap::NewBan
    }

    /// The bans in force, by client id.
    pub fn bans(&self) -> Vec<Ban> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let table = self.table();
        let mut bans: Vec<Ban> = table
            .ids
            .iter()
            .filter_map(|(id, track)| {
                let (since, until) = track.banned?;
                (now < until).then(|| Ban {
                    client_id: id.to_string(),
                    since,
                    until: wall + (until - now),
                    reason: "flapping",
                })
            })
            .collect();
        bans.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        bans
    }

    /// Lifts the ban of `client_id` (and forgets its connects); false when it was not banned.
    pub fn lift(&self, client_id: &str) -> bool {
        let now = Instant::now();
        let mut table = self.table();
        let banned = table
            .ids
            .get(client_id)
            .and_then(|t| t.banned)
            .is_some_and(|(_, until)| now < until);
        if banned {
            table.ids.remove(client_id);
        }
        banned
    }

    /// Client ids followed now (banned or within the window).
    pub fn tracked(&self) -> usize {
        self.table().ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0).expect("a limit");
        for _ in 0..3 {
            assert_eq!(b.wait_for(1.0, t0), Duration::ZERO);
            assert_eq!(b.take(1.0, t0), Duration::ZERO);
        }
        // Empty: the next token comes after 100 ms.
        let wait = b.wait_for(1.0, t0);
        assert!(wait > 99 * MS && wait <= 100 * MS, "{wait:?}");
        assert_eq!(b.wait_for(1.0, t0 + 100 * MS), Duration::ZERO);
        // Never more than the burst saved up.
        b.take(1.0, t0 + 100 * MS);
        assert_eq!(b.take(3.0, t0 + 10_000 * MS), Duration::ZERO);
        let wait = b.take(1.0, t0 + 10_000 * MS);
        assert!(wait > 99 * MS && wait <= 100 * MS, "{wait:?}");
        assert!(TokenBucket::new(0, 5, t0).is_none(), "0: no limit");
    }

    #[test]
    fn a_large_take_goes_into_debt_and_waits_it_off() {
        let t0 = Instant::now();
        // 1,000 bytes a second, 1,000 saved: a 5,000-byte message pays off 4 s of debt.
        let mut b = TokenBucket::new(1000, 0, t0).expect("a limit");
        let wait = b.take(5000.0, t0);
        assert!(wait > 3999 * MS && wait <= 4000 * MS, "{wait:?}");
        assert_eq!(b.take(0.0, t0 + 4000 * MS), Duration::ZERO);
    }

    #[test]
    fn a_throttle_pauses_and_resumes() {
        let t0 = Instant::now();
        let config = MqttConfig {
            max_publish_rate: 2,
            publish_rate_burst: 1,
            ..MqttConfig::default()
        };
        let mut t = Throttle::new(&config, t0).expect("a limit");
        t.publish(10, t0);
        assert_eq!(t.paused_until(), None);
        t.publish(10, t0);
        assert_eq!(t.paused_until(), Some(t0 + 500 * MS));
        assert_eq!(t.resume(t0 + 499 * MS), None);
        assert_eq!(t.resume(t0 + 500 * MS), Some(500 * MS));
        assert_eq!(t.paused_until(), None);
        assert!(Throttle::new(&MqttConfig::default(), t0).is_none());
    }

    #[test]
    fn addresses_are_counted_and_forgotten_at_zero() {
        let counts = AddressCounts::default();
        let a: IpAddr = "192.0.2.1".parse().expect("address");
        let b: IpAddr = "2001:db8::1".parse().expect("address");
        assert!(counts.acquire(a, 2));
        assert!(counts.acquire(a, 2));
        assert!(!counts.acquire(a, 2));
        assert!(counts.acquire(b, 2));
        assert_eq!((counts.get(a), counts.addresses()), (2, 2));
        counts.release(a);
        counts.release(a);
        counts.release(b);
        assert_eq!(counts.addresses(), 0, "no entry left at zero");
        assert!(!counts.acquire(a, 0));
        assert_eq!(counts.addresses(), 0);
    }

    fn flapping(max_connects: u32) -> Flapping {
        Flapping::new(&FlappingConfig {
            max_connects,
            window: Duration::from_secs(60),
            ban_time: Duration::from_secs(300),
        })
    }

    #[test]
    fn a_client_id_connecting_too_often_is_banned_for_a_while() {
        let f = flapping(3);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(f.connected("dev", t0 + i * MS), Flap::Allowed);
        }
        assert!(!f.is_banned("dev", t0));
        assert_eq!(
            f.connected("dev", t0 + 3 * MS),
            Flap::NewBan,
            "the fourth in the window"
        );
        assert!(f.is_banned("dev", t0 + 4 * MS));
        assert!(!f.is_banned("other", t0 + 4 * MS));
        assert!(f.is_banned("dev", t0 + Duration::from_secs(300)));
        assert!(!f.is_banned("dev", t0 + Duration::from_secs(301)));
        // Another connect while banned stays refused, and does not move the ban.
        assert_eq!(f.connected("dev", t0 + 10 * MS), Flap::Banned);
        assert!(!f.is_banned("dev", t0 + Duration::from_secs(301)));
        // After the ban, a fresh window.
        assert_eq!(
            f.connected("dev", t0 + Duration::from_secs(301)),
            Flap::Allowed
        );
    }

    #[test]
    fn connects_spread_over_windows_are_not_flapping() {
        let f = flapping(2);
        let t0 = Instant::now();
        for i in 0..10 {
            let at = t0 + Duration::from_secs(31 * i);
            assert_eq!(f.connected("slow", at), Flap::Allowed);
        }
    }

    #[test]
    fn bans_are_listed_and_lifted() {
        let f = flapping(1);
        let now = Instant::now();
        f.connected("b", now);
        f.connected("b", now);
        f.connected("a", now);
        f.connected("a", now);
        f.connected("c", now);
        let bans = f.bans();
        let ids: Vec<&str> = bans.iter().map(|b| b.client_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert!(bans[0].until > bans[0].since);
        assert!(f.lift("a"));
        assert!(!f.lift("a"), "no longer banned");
        assert!(!f.lift("c"), "never banned");
        assert!(!f.is_banned("a", now));
        assert_eq!(f.bans().len(), 1);
    }

    #[test]
    fn the_table_forgets_ids_outside_the_window() {
        let f = flapping(5);
        let t0 = Instant::now();
        for i in 0..100 {
            f.connected(&format!("d{i}"), t0);
        }
        assert_eq!(f.tracked(), 100);
        f.connected("late", t0 + Duration::from_secs(61));
        assert_eq!(f.tracked(), 1, "swept once the window passed");
        let off = flapping(0);
        assert_eq!(off.connected("x", t0), Flap::Allowed);
        assert_eq!(off.tracked(), 0, "off: nothing followed");
    }
}
