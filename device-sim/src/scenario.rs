//! Scenario schedulers: what happens to the fleet during a run, on top of every device staying
//! connected. Each scheduler sends [`Command`]s to devices that are connected at that moment.
//!
//! - `steady`: nothing; devices stay connected.
//! - `churn`: `--churn-percent` of the devices per minute leave (clean DISCONNECT, abrupt
//!   close, or silent death, picked at random from `--churn-mix`) and come back after about
//!   `--churn-pause` (a silently dead device stays away until the broker's keep-alive deadline
//!   has passed, so the broker and not its comeback ends the dead session). No silent death
//!   starts so late that its deadline would fall after the end of the run.
//! - `flap`: `--flappers` devices leave (clean or abrupt) and reconnect every few hundred ms.
//! - `storm`: every `--storm-every` seconds (once, half-way, in a shorter run) every connected
//!   device closes abruptly and reconnects after a jittered backoff.
//! - `takeover`: `--churn-percent` of the devices per minute are replaced by a second
//!   connection with their client id.
//!
//! `durable` is no schedule over a connected fleet but phases of its own, in
//! [`crate::durable`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::device::{phase, random_u64, Command, LeaveKind};
use crate::progress::Progress;

/// Scheduler period.
const TICK: Duration = Duration::from_millis(50);
/// Attempts to find a connected device for one churn event.
const PICK_TRIES: usize = 20;

/// The scenario of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Stay connected.
    Steady,
    /// Devices leave and come back (clean, abrupt, silent).
    Churn,
    /// A few devices reconnect rapidly.
    Flap,
    /// Every device drops at once and reconnects.
    Storm,
    /// Second connections replace first ones.
    Takeover,
    /// Persistent sessions offline, QoS 1 messages queued for them, then drained and checked
    /// against what the broker acknowledged (see [`crate::durable`]).
    Durable,
}

/// A leave kind as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MixKind {
    /// DISCONNECT then close.
    Clean,
    /// Close without DISCONNECT.
    Abrupt,
    /// Stop sending, keep the socket open.
    Silent,
}

impl From<MixKind> for LeaveKind {
    fn from(k: MixKind) -> Self {
        match k {
            MixKind::Clean => LeaveKind::Clean,
            MixKind::Abrupt => LeaveKind::Abrupt,
            MixKind::Silent => LeaveKind::Silent,
        }
    }
}

/// The scheduler's handle on one device.
pub struct Handle {
    /// Commands to the device.
    pub commands: mpsc::Sender<Command>,
    /// The device's phase.
    pub phase: Arc<AtomicU8>,
}

impl Handle {
    fn connected(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == phase::CONNECTED
    }
}

/// Devices started so far, in start order.
pub type Fleet = Arc<Mutex<Vec<Handle>>>;

/// Parameters of a scenario.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Which scenario.
    pub scenario: Scenario,
    /// Number of devices of the run.
    pub count: u64,
    /// Churn or takeover events per minute, in percent of `count`.
    pub churn_percent: f64,
    /// Leave kinds churn picks from.
    pub mix: Vec<LeaveKind>,
    /// Mean time away after a churn leave.
    pub churn_pause: Duration,
    /// Number of flapping devices.
    pub flappers: u64,
    /// Time between storms.
    pub storm_every: Duration,
    /// Shortest time away after a silent death (keep-alive deadline plus margin).
    pub silent_pause: Duration,
    /// Start of the run.
    pub start: Instant,
    /// End of the run.
    pub deadline: Instant,
    /// Where announcements (storms) are printed.
    pub progress: Progress,
}

/// Small xorshift generator for picking devices.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        Self(random_u64() | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }
}

/// When storms happen, as offsets from the start.
pub fn storm_times(duration: Duration, every: Duration) -> Vec<Duration> {
    let mut times = Vec::new();
    if !every.is_zero() {
        let mut t = every;
        while t < duration {
            times.push(t);
            t += every;
        }
    }
    if times.is_empty() {
        times.push(duration / 2);
    }
    times
}

/// Runs the scenario's scheduler until `end` is cancelled.
pub async fn drive(plan: Plan, fleet: Fleet, end: CancellationToken) {
    let mut rng = Rng::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let per_tick = plan.count as f64 * plan.churn_percent / 100.0 / 60.0 * TICK.as_secs_f64();
    let mut owed = 0.0f64;
    let mut storms = storm_times(plan.deadline - plan.start, plan.storm_every).into_iter();
    let mut next_storm = storms.next();
    let flappers = usize::try_from(plan.flappers.min(plan.count)).unwrap_or(usize::MAX);
    let mut flap_at: Vec<Instant> = (0..flappers)
        .map(|_| plan.start + rng.between(Duration::ZERO, Duration::from_secs(1)))
        .collect();
    loop {
        tokio::select! {
            _ = end.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let fleet = match fleet.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        match plan.scenario {
            // `durable` runs its own phases (crate::durable), never this scheduler.
            Scenario::Steady | Scenario::Durable => {}
            Scenario::Churn | Scenario::Takeover => {
                owed += per_tick;
                while owed >= 1.0 {
                    owed -= 1.0;
                    let Some(h) = pick(&mut rng, &fleet) else {
                        break;
                    };
                    let command = if plan.scenario == Scenario::Takeover {
                        Command::Takeover
                    } else {
                        churn_command(&plan, &mut rng, now)
                    };
                    let _ = h.commands.try_send(command);
                }
            }
            Scenario::Flap => {
                for (i, at) in flap_at.iter_mut().enumerate() {
                    let Some(h) = fleet.get(i) else { break };
                    if now < *at || !h.connected() {
                        continue;
                    }
                    let kind = if rng.below(2) == 0 {
                        LeaveKind::Clean
                    } else {
                        LeaveKind::Abrupt
                    };
                    let pause = rng.between(Duration::from_millis(20), Duration::from_millis(200));
                    let _ = h.commands.try_send(Command::Leave {
                        kind,
                        pause,
                        cause: "flap",
                    });
                    *at = now + rng.between(Duration::from_millis(100), Duration::from_millis(600));
                }
            }
            Scenario::Storm => {
                if next_storm.is_some_and(|t| now >= plan.start + t) {
                    next_storm = storms.next();
                    let mut dropped = 0u64;
                    for h in fleet.iter().filter(|h| h.connected()) {
                        if h.commands.try_send(Command::Storm).is_ok() {
                            dropped += 1;
                        }
                    }
                    plan.progress.println(&format!(
                        "storm t={:.1}s dropping={dropped}",
                        (now - plan.start).as_secs_f64()
                    ));
                }
            }
        }
    }
}

/// A random connected device.
fn pick<'a>(rng: &mut Rng, fleet: &'a [Handle]) -> Option<&'a Handle> {
    let len = fleet.len() as u64;
    (0..PICK_TRIES)
        .filter_map(|_| fleet.get(usize::try_from(rng.below(len)).ok()?))
        .find(|h| h.connected())
}

/// A churn leave: random kind from the mix (no silent death whose keep-alive deadline would
/// fall after the end of the run), pause of 0.5-1.5 × `churn_pause`.
fn churn_command(plan: &Plan, rng: &mut Rng, now: Instant) -> Command {
    let mut kind = plan.mix[usize::try_from(rng.below(plan.mix.len() as u64)).unwrap_or(0)];
    if kind == LeaveKind::Silent && now + plan.silent_pause > plan.deadline {
        kind = LeaveKind::Abrupt;
    }
    Command::Leave {
        kind,
        pause: plan.churn_pause.mul_f64(0.5 + rng.unit()),
        cause: "churn",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storms_every_period_or_once_half_way() {
        let s = Duration::from_secs;
        assert_eq!(storm_times(s(70), s(30)), vec![s(30), s(60)]);
        assert_eq!(storm_times(s(10), s(30)), vec![s(5)]);
        assert_eq!(storm_times(s(10), Duration::ZERO), vec![s(5)]);
    }

    #[test]
    fn rng_stays_in_range() {
        let mut rng = Rng::new();
        for _ in 0..1000 {
            assert!(rng.below(7) < 7);
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
