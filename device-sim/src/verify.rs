//! `device-sim verify`: compares a run's ground truth with what the broker's presence API
//! says, after letting the broker settle.
//!
//! 1. Every device's final state in the truth (`final` records) must equal its `online` flag
//!    in `GET /api/v1/devices` (a device the API does not know counts as offline), and with
//!    `--database-url` in the database's `devices` table too (read directly, see [`crate::db`]).
//! 2. Every intended end of a session (`disconnect_clean`, `close_abrupt`, `silent_death`,
//!    `takeover`) must have ended the session that was open at that moment (the newest with
//!    `connected_at` ≤ the truth time, from `GET /api/v1/devices/{id}/sessions`) with the
//!    matching reason: `client_disconnect`, `connection_lost`, `keepalive_timeout`, `takeover`.
//!    A clean or abrupt leave that ends as `takeover` is accepted (the device's own reconnect
//!    can reach the broker before the close of the old socket is processed).
//! 3. Silent deaths: detection latency = the session's `disconnected_at` − the death's truth
//!    time; its percentiles are printed, with the overshoot past the broker's deadline
//!    (last packet sent + `--keepalive-multiplier` × keep-alive: the broker's
//!    `mqtt.keepalive_multiplier`, 1.5 unless it was configured otherwise).
//! 4. Broker crashes: the boots of the broker nodes come from `GET /api/v1/nodes`. A session
//!    recorded as `broker_restart` is accepted in place of the intended reason when it was open
//!    at a crash ([`ended_by_crash`]): its boot is `recovered` (a later boot of the node closed
//!    its open sessions), the session is closed at that boot's last heartbeat (or at its own
//!    start, if later) as the crash repair does, and the truth's end (for a silent death, the
//!    keep-alive deadline) is not before that time, give or take [`CRASH_SLACK`]. Their number
//!    is printed; every other check stays as strict.
//!
//! 5. MQTT 5 (`run --protocol 5`): every DISCONNECT a device received from the broker
//!    (`server_disconnect` records) must agree with the reason the broker recorded for the
//!    session it ended ([`reasons_for_code`]): 0x8E `takeover`, 0x8D `keepalive_timeout`, 0x8B
//!    `broker_shutdown` (or `broker_restart`), 0x98 `kicked`, 0x87 `not_authorized`, 0x81 and
//!    0x82 `protocol_error`; other codes are counted, not checked. The session is the newest
//!    that started by the time the connection received its CONNACK (the broker stores the
//!    start before it sends the CONNACK; [`CLOSE_TOLERANCE`] covers the rounding).
//!
//! Timestamps of both sides are compared directly: run the simulator and the broker on hosts
//! with synchronised clocks (or the same host).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use tokio::task::JoinSet;

use crate::cli::VerifyArgs;
use crate::db;
use crate::http::{encode, Api};
use crate::presence::Presence;
use crate::truth::{self, Record};

/// Page size for the device list, the session history and the node boots.
const PAGE: u32 = 1000;
/// How much earlier than a crashed boot's last heartbeat an end may lie and still be lost in
/// the crash: the broker may have seen it without storing it yet (the bridge writes every
/// `bridge.batch_interval`, 100 ms by default; a keep-alive timeout fires a little after its
/// deadline).
const CRASH_SLACK: chrono::TimeDelta = chrono::TimeDelta::seconds(1);
/// Tolerance between a crash-closed session's `disconnected_at` and the boot's last heartbeat
/// (both are stored in microseconds).
const CLOSE_TOLERANCE: chrono::TimeDelta = chrono::TimeDelta::milliseconds(1);
/// The reason the crash repair records.
const BROKER_RESTART: &str = "broker_restart";
/// Session-history requests in flight at once.
const PARALLEL: usize = 8;

#[derive(Debug, Deserialize)]
struct ApiDevice {
    device_id: String,
    online: bool,
    #[serde(default)]
    last_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DevicePage {
    devices: Vec<ApiDevice>,
    next_cursor: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct ApiSession {
    session_id: String,
    /// The broker boot that held the session.
    #[serde(default)]
    boot_id: Option<String>,
    connected_at: DateTime<Utc>,
    disconnected_at: Option<DateTime<Utc>>,
    reason: Option<String>,
}

/// One boot of a broker node, from `GET /api/v1/nodes`.
#[derive(Debug, Clone, Deserialize)]
struct Boot {
    node_id: String,
    boot_id: String,
    /// Its last heartbeat: where the crash repair closes the sessions it left open.
    heartbeat_at: DateTime<Utc>,
    /// A later boot of the node closed its open sessions: it crashed.
    recovered: bool,
}

#[derive(Debug, Deserialize)]
struct BootList {
    nodes: Vec<Boot>,
}

#[derive(Debug, Deserialize)]
struct SessionList {
    sessions: Vec<ApiSession>,
}

/// What the truth says about one device.
#[derive(Debug, Default)]
struct Expected {
    /// From the last `final` record.
    final_online: Option<bool>,
    /// From the last state-changing event (used when there is no `final`).
    derived_online: bool,
    /// Intended session ends.
    ends: Vec<Record>,
    /// MQTT 5 DISCONNECTs received from the broker (`server_disconnect`).
    goodbyes: Vec<Record>,
}

/// Reason the broker must record for an intended end.
fn expected_reason(event: &str) -> Option<&'static str> {
    match event {
        truth::DISCONNECT_CLEAN => Some("client_disconnect"),
        truth::CLOSE_ABRUPT => Some("connection_lost"),
        truth::SILENT_DEATH => Some("keepalive_timeout"),
        truth::TAKEOVER => Some("takeover"),
        _ => None,
    }
}

/// The reasons the broker records for a session it ended with an MQTT 5 DISCONNECT of reason
/// `code` (its `goodbye()`); `None` for a code verify does not check.
fn reasons_for_code(code: u8) -> Option<&'static [&'static str]> {
    match code {
        0x8E => Some(&["takeover"]),
        0x8D => Some(&["keepalive_timeout"]),
        // The broker says "shutting down" when it restarts, too.
        0x8B => Some(&["broker_shutdown", BROKER_RESTART]),
        0x98 => Some(&["kicked"]),
        0x87 => Some(&["not_authorized"]),
        0x81 | 0x82 => Some(&["protocol_error"]),
        _ => None,
    }
}

/// What checking the MQTT 5 DISCONNECTs of the truth against the session histories found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Goodbyes {
    /// DISCONNECTs received.
    received: usize,
    /// Compared with the session's reason (and agreeing, unless in `wrong`).
    checked: usize,
    /// With a code verify does not check.
    unchecked: usize,
    /// Their session is older than the history fetched.
    beyond: usize,
    /// One line per disagreement.
    wrong: Vec<String>,
}

/// Checks every device's MQTT 5 DISCONNECTs against its session `history` (newest first).
fn check_goodbyes(
    expected: &BTreeMap<String, Expected>,
    history: &HashMap<String, Vec<ApiSession>>,
) -> Goodbyes {
    let mut found = Goodbyes::default();
    for (id, e) in expected {
        let sessions = history.get(id).map(Vec::as_slice).unwrap_or_default();
        for g in &e.goodbyes {
            found.received += 1;
            let Some(code) = g.reason_code else { continue };
            let Some(want) = reasons_for_code(code) else {
                found.unchecked += 1;
                continue;
            };
            // Newest first: the first that started by the CONNACK is the connection's.
            let acked = g.connected_at.unwrap_or(g.t);
            let Some(s) = sessions
                .iter()
                .find(|s| s.connected_at <= acked + CLOSE_TOLERANCE)
            else {
                if sessions.len() >= PAGE as usize {
                    found.beyond += 1;
                } else {
                    found.wrong.push(format!(
                        "WRONG {id}: DISCONNECT {} received at {} for the connection of {}: the \
                         broker has no session that started by then",
                        crate::report::hex(code),
                        truth::rfc3339(g.t),
                        truth::rfc3339(acked)
                    ));
                }
                continue;
            };
            found.checked += 1;
            let reason = s.reason.as_deref();
            if !reason.is_some_and(|r| want.contains(&r)) {
                found.wrong.push(format!(
                    "WRONG {id}: DISCONNECT {} received at {} ended session {} with reason {} \
                     (want {})",
                    crate::report::hex(code),
                    truth::rfc3339(g.t),
                    s.session_id,
                    reason.unwrap_or("none: still open"),
                    want.join(" or ")
                ));
            }
        }
    }
    found
}

fn expectations(records: Vec<Record>) -> BTreeMap<String, Expected> {
    let mut by_device: BTreeMap<String, Expected> = BTreeMap::new();
    for r in records {
        let e = by_device.entry(r.device.clone()).or_default();
        match r.event.as_str() {
            truth::FINAL => e.final_online = Some(r.state.as_deref() == Some("online")),
            truth::CONNECTED | truth::TAKEOVER_CONNECTED => e.derived_online = true,
            truth::TAKEOVER | truth::SERVER_DISCONNECT => {}
            _ => e.derived_online = false,
        }
        if expected_reason(&r.event).is_some() {
            e.ends.push(r);
        } else if r.event == truth::SERVER_DISCONNECT {
            e.goodbyes.push(r);
        }
    }
    by_device
}

/// How long the broker waits for a packet from a client with keep-alive `keepalive` seconds
/// before it closes the connection: keep-alive × `multiplier` (its `mqtt.keepalive_multiplier`).
fn keepalive_window(keepalive: u16, multiplier: f64) -> chrono::TimeDelta {
    chrono::TimeDelta::microseconds((f64::from(keepalive) * multiplier * 1e6) as i64)
}

/// When the truth says the broker should have ended the session at the latest: for a silent
/// death its keep-alive deadline (last packet sent + `multiplier` × keep-alive), else the end
/// itself.
fn expected_end(end: &Record, multiplier: f64) -> DateTime<Utc> {
    match (end.event.as_str(), end.last_sent, end.keepalive) {
        (truth::SILENT_DEATH, Some(last), Some(k)) => last + keepalive_window(k, multiplier),
        _ => end.t,
    }
}

/// Whether `session`, recorded as broker_restart, was open when its boot crashed, so that the
/// broker could not record the end the truth expects (`expected`, see [`expected_end`]): its
/// boot is one of the `crashed` (recovered) boots, it was closed where the crash repair closes
/// (the boot's last heartbeat, or the session's start if later), and by the truth it was still
/// open then (`expected` not before that, give or take [`CRASH_SLACK`]).
fn ended_by_crash(
    session: &ApiSession,
    expected: DateTime<Utc>,
    crashed: &HashMap<String, Boot>,
) -> bool {
    let (Some(BROKER_RESTART), Some(at), Some(boot)) = (
        session.reason.as_deref(),
        session.disconnected_at,
        session.boot_id.as_ref().and_then(|b| crashed.get(b)),
    ) else {
        return false;
    };
    let closed = boot.heartbeat_at.max(session.connected_at);
    boot.recovered && (at - closed).abs() <= CLOSE_TOLERANCE && expected + CRASH_SLACK >= closed
}

/// The boots that crashed (recovered by a later boot), by boot id; `None` when the broker has
/// no `/api/v1/nodes`.
async fn crashed_boots(api: &Api) -> Result<Option<HashMap<String, Boot>>> {
    let list: Option<BootList> = api.get_json(&format!("/api/v1/nodes?limit={PAGE}")).await?;
    Ok(list.map(|l| {
        l.nodes
            .into_iter()
            .filter(|b| b.recovered)
            .map(|b| (b.boot_id.clone(), b))
            .collect()
    }))
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// Formats p50/p90/p99/max of `values` (milliseconds).
fn spread(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        percentile(values, 0.50),
        percentile(values, 0.90),
        percentile(values, 0.99),
        values.last().copied().unwrap_or(0.0)
    )
}

async fn all_devices(api: &Api) -> Result<HashMap<String, ApiDevice>> {
    let mut devices = HashMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/devices?limit={PAGE}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", encode(c)));
        }
        let page: DevicePage = api
            .get_json(&path)
            .await?
            .context("the device list answered 404")?;
        for d in page.devices {
            devices.insert(d.device_id.clone(), d);
        }
        match page.next_cursor {
            Some(c) if cursor.as_deref() != Some(c.as_str()) => cursor = Some(c),
            _ => return Ok(devices),
        }
    }
}

async fn histories(api: &Api, ids: Vec<String>) -> Result<HashMap<String, Vec<ApiSession>>> {
    let api = Arc::new(api.clone());
    let mut out = HashMap::new();
    let mut pending = ids.into_iter();
    let mut set = JoinSet::new();
    loop {
        while set.len() < PARALLEL {
            let Some(id) = pending.next() else { break };
            let api = Arc::clone(&api);
            set.spawn(async move {
                let path = format!("/api/v1/devices/{}/sessions?limit={PAGE}", encode(&id));
                let list: Option<SessionList> = api.get_json(&path).await?;
                anyhow::Ok((id, list.map(|l| l.sessions).unwrap_or_default()))
            });
        }
        let Some(done) = set.join_next().await else {
            break;
        };
        let (id, sessions) = done.context("session request task failed")??;
        out.insert(id, sessions);
    }
    Ok(out)
}

/// Compares every device's final state in the truth with `source` (the API or the database),
/// printing each disagreement; returns their number.
fn compare_states(
    expected: &BTreeMap<String, Expected>,
    known: &HashMap<String, Presence>,
    source: &str,
) -> usize {
    let mut failures = 0usize;
    let (mut want_online, mut no_final) = (0usize, 0usize);
    for (id, e) in expected {
        let want = e.final_online.unwrap_or_else(|| {
            no_final += 1;
            e.derived_online
        });
        want_online += usize::from(want);
        let got = known.get(id);
        let is = got.is_some_and(|d| d.online);
        if want != is {
            failures += 1;
            let detail = match got {
                None => "unknown to the broker".to_owned(),
                Some(d) => format!("last_reason={}", d.last_reason.as_deref().unwrap_or("none")),
            };
            println!(
                "WRONG {id}: truth {} but the {source} says {} ({detail})",
                if want { "online" } else { "offline" },
                if is { "online" } else { "offline" },
            );
        }
    }
    let label = if source == "API" {
        "state"
    } else {
        "database state"
    };
    println!(
        "{label}: {} devices in the truth ({want_online} online, {} offline), {} known to the \
         {source}, {failures} wrong",
        expected.len(),
        expected.len() - want_online,
        known.len()
    );
    if no_final > 0 && source == "API" {
        println!("note: {no_final} devices have no final record; their last event was used");
    }
    failures
}

/// Runs the check and prints its findings; `Ok(true)` when the broker agrees with the truth.
pub async fn verify(args: &VerifyArgs) -> Result<bool> {
    let api = Api::parse(&args.api)?.with_token(args.api_token.clone())?;
    let records = truth::read(&args.truth)?;
    let multiplier = args.keepalive_multiplier;
    // The latest moment by which the broker must have detected every silent death.
    let detect_by = records
        .iter()
        .filter(|r| r.event == truth::SILENT_DEATH)
        .filter_map(|r| Some(r.t + keepalive_window(r.keepalive?, multiplier)))
        .max();
    let expected = expectations(records);
    if let Some(by) = detect_by {
        let settled =
            Utc::now() + chrono::TimeDelta::milliseconds((args.settle.max(0.0) * 1000.0) as i64);
        if settled < by {
            println!(
                "note: the last silent death is due for detection at {}, after --settle ends; \
                 use --settle of at least {multiplier} × keep-alive",
                truth::rfc3339(by)
            );
        }
    }
    if args.settle > 0.0 {
        tokio::time::sleep(Duration::try_from_secs_f64(args.settle).context("bad --settle")?).await;
    }

    let devices: HashMap<String, Presence> = all_devices(&api)
        .await?
        .into_values()
        .map(|d| {
            let p = Presence {
                online: d.online,
                last_reason: d.last_reason,
            };
            (d.device_id, p)
        })
        .collect();
    let mut failures = compare_states(&expected, &devices, "API");
    if let Some(url) = &args.database_url {
        let rows = db::devices(url).await?;
        failures += compare_states(&expected, &rows, "database");
    }

    let ids: Vec<String> = expected
        .iter()
        .filter(|(_, e)| !e.ends.is_empty() || !e.goodbyes.is_empty())
        .map(|(id, _)| id.clone())
        .collect();
    let history = histories(&api, ids).await?;
    let crashed = match crashed_boots(&api).await? {
        Some(crashed) => crashed,
        None => {
            println!(
                "note: the API has no /api/v1/nodes (an older broker): sessions ended by a \
                 broker crash (broker_restart) count as wrong"
            );
            HashMap::new()
        }
    };
    let first = expected.values().flat_map(|e| &e.ends).map(|r| r.t).min();
    let mut crashes: Vec<&Boot> = crashed
        .values()
        .filter(|b| first.is_some_and(|t| b.heartbeat_at >= t))
        .collect();
    crashes.sort_by_key(|b| b.heartbeat_at);
    for b in &crashes {
        println!(
            "broker crash: node {} boot {} last alive at {}; its open sessions were closed as \
             broker_restart at the next start",
            b.node_id,
            b.boot_id,
            truth::rfc3339(b.heartbeat_at)
        );
    }
    let mut latency = Vec::new();
    let mut overshoot = Vec::new();
    let (mut checked, mut superseded, mut unknown, mut wrong) = (0usize, 0usize, 0usize, 0usize);
    let mut by_crash = 0usize;
    for (id, e) in &expected {
        let sessions = history.get(id).map(Vec::as_slice).unwrap_or_default();
        for end in &e.ends {
            let Some(want) = expected_reason(&end.event) else {
                continue;
            };
            // Newest first: the first one that started before the end is the one it ended.
            let Some(s) = sessions.iter().find(|s| s.connected_at <= end.t) else {
                if sessions.len() >= PAGE as usize {
                    unknown += 1; // older than the history we fetched
                } else {
                    wrong += 1;
                    println!(
                        "WRONG {id}: {} at {}: no session open at that time",
                        end.event,
                        truth::rfc3339(end.t)
                    );
                }
                continue;
            };
            checked += 1;
            let reason = s.reason.as_deref();
            let ok = reason == Some(want)
                || (reason == Some("takeover")
                    && matches!(
                        end.event.as_str(),
                        truth::DISCONNECT_CLEAN | truth::CLOSE_ABRUPT
                    ));
            if !ok && ended_by_crash(s, expected_end(end, multiplier), &crashed) {
                by_crash += 1;
                continue;
            }
            if !ok {
                wrong += 1;
                println!(
                    "WRONG {id}: {} at {} ended session {} with reason {} (want {want})",
                    end.event,
                    truth::rfc3339(end.t),
                    s.session_id,
                    reason.unwrap_or("none: still open")
                );
                continue;
            }
            if reason != Some(want) {
                superseded += 1;
            }
            if end.event == truth::SILENT_DEATH {
                if let Some(at) = s.disconnected_at {
                    latency.push(ms(at - end.t));
                    if let (Some(last), Some(k)) = (end.last_sent, end.keepalive) {
                        let deadline = last + keepalive_window(k, multiplier);
                        overshoot.push(ms(at - deadline));
                    }
                }
            }
        }
    }
    println!(
        "sessions: {checked} intended ends checked, {wrong} wrong, {superseded} ended by the \
         device's own reconnect (takeover), {by_crash} ended by a broker crash (broker_restart \
         at the crashed boot's last heartbeat), {unknown} beyond the fetched history"
    );
    if !latency.is_empty() {
        println!(
            "silent deaths: {} detected by keep-alive; latency {}",
            latency.len(),
            spread(&mut latency)
        );
        if !overshoot.is_empty() {
            println!(
                "  past the deadline (last packet + {multiplier} × keep-alive): {}",
                spread(&mut overshoot)
            );
        }
    }
    failures += wrong;
    let goodbyes = check_goodbyes(&expected, &history);
    if goodbyes.received > 0 {
        for line in &goodbyes.wrong {
            println!("{line}");
        }
        println!(
            "MQTT 5 DISCONNECTs: {} received from the broker, {} checked against the session's \
             reason, {} wrong, {} with a reason code not checked, {} beyond the fetched history",
            goodbyes.received,
            goodbyes.checked,
            goodbyes.wrong.len(),
            goodbyes.unchecked,
            goodbyes.beyond
        );
        failures += goodbyes.wrong.len();
    }
    println!("{}", if failures == 0 { "OK" } else { "FAIL" });
    Ok(failures == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap_or_default()
    }

    fn restart_session(boot: &str, connected: i64, closed: i64) -> ApiSession {
        ApiSession {
            session_id: "s".into(),
            boot_id: Some(boot.into()),
            connected_at: at(connected),
            disconnected_at: Some(at(closed)),
            reason: Some(BROKER_RESTART.into()),
        }
    }

    /// Boot `crashed` (recovered) last alive at 100 s.
    fn crashed() -> HashMap<String, Boot> {
        let boot = Boot {
            node_id: "n1".into(),
            boot_id: "crashed".into(),
            heartbeat_at: at(100),
            recovered: true,
        };
        HashMap::from([(boot.boot_id.clone(), boot)])
    }

    #[test]
    fn broker_restart_is_accepted_only_for_sessions_open_at_a_crash() {
        let crashed = crashed();
        let s = restart_session("crashed", 10, 100);
        // Silent and not yet due for detection at the crash; or due just before the last
        // heartbeat (within the slack: seen by the broker, not yet stored).
        assert!(ended_by_crash(&s, at(102), &crashed));
        assert!(ended_by_crash(&s, at(100), &crashed));
        assert!(ended_by_crash(
            &s,
            at(100) - chrono::TimeDelta::milliseconds(900),
            &crashed
        ));
        // Due well before the last heartbeat: the broker had time to record the real end.
        assert!(!ended_by_crash(&s, at(98), &crashed));
        // Not closed where the crash repair closes.
        assert!(!ended_by_crash(
            &restart_session("crashed", 10, 103),
            at(105),
            &crashed
        ));
        // A session that started after the last heartbeat is closed at its own start.
        assert!(ended_by_crash(
            &restart_session("crashed", 101, 101),
            at(101),
            &crashed
        ));
        // A boot that did not crash, or is unknown; another reason; a session without a boot.
        let mut live = crashed.clone();
        if let Some(b) = live.get_mut("crashed") {
            b.recovered = false;
        }
        assert!(!ended_by_crash(&s, at(102), &live));
        assert!(!ended_by_crash(
            &restart_session("other", 10, 100),
            at(102),
            &crashed
        ));
        let mut timeout = restart_session("crashed", 10, 100);
        timeout.reason = Some("keepalive_timeout".into());
        assert!(!ended_by_crash(&timeout, at(102), &crashed));
        let mut open = restart_session("crashed", 10, 100);
        open.disconnected_at = None;
        assert!(!ended_by_crash(&open, at(102), &crashed));
        let mut no_boot = restart_session("crashed", 10, 100);
        no_boot.boot_id = None;
        assert!(!ended_by_crash(&no_boot, at(102), &crashed));
    }

    #[test]
    fn a_silent_death_is_expected_to_end_at_its_keepalive_deadline() {
        let mut death = Record::now("d", truth::SILENT_DEATH, false);
        death.t = at(50);
        death.last_sent = Some(at(49));
        death.keepalive = Some(2);
        assert_eq!(expected_end(&death, 1.5), at(52));
        assert_eq!(expected_end(&death, 3.0), at(55));
        let mut clean = Record::now("d", truth::DISCONNECT_CLEAN, false);
        clean.t = at(50);
        assert_eq!(expected_end(&clean, 1.5), at(50));
        assert_eq!(expected_end(&clean, 3.0), at(50));
    }

    #[test]
    fn the_keepalive_multiplier_decides_whether_a_crash_came_before_a_silent_death() {
        // Silent at 95 s, last packet at 94 s, keep-alive 2 s; the broker crashed at 100 s and
        // the next boot closed the session as broker_restart at that last heartbeat.
        let mut death = Record::now("d", truth::SILENT_DEATH, false);
        death.t = at(95);
        death.last_sent = Some(at(94));
        death.keepalive = Some(2);
        let s = restart_session("crashed", 10, 100);
        // Multiplier 1.5: the deadline (97 s) came well before the crash, so the broker should
        // have recorded keepalive_timeout: broker_restart is wrong.
        assert!(!ended_by_crash(&s, expected_end(&death, 1.5), &crashed()));
        // Multiplier 3 (a broker configured so): the deadline (100 s) was not yet due at the
        // crash, so broker_restart is right.
        assert!(ended_by_crash(&s, expected_end(&death, 3.0), &crashed()));
    }

    #[test]
    fn disconnect_codes_map_to_the_brokers_reasons() {
        assert_eq!(reasons_for_code(0x8E), Some(&["takeover"][..]));
        assert_eq!(reasons_for_code(0x8D), Some(&["keepalive_timeout"][..]));
        assert_eq!(
            reasons_for_code(0x8B),
            Some(&["broker_shutdown", "broker_restart"][..])
        );
        assert_eq!(reasons_for_code(0x98), Some(&["kicked"][..]));
        assert_eq!(reasons_for_code(0x87), Some(&["not_authorized"][..]));
        assert_eq!(reasons_for_code(0x82), Some(&["protocol_error"][..]));
        assert_eq!(reasons_for_code(0x81), Some(&["protocol_error"][..]));
        assert_eq!(reasons_for_code(0x00), None);
        assert_eq!(reasons_for_code(0x93), None);
    }

    /// A session of the history, started at `connected` s and ended at `connected + 5` s
    /// with `reason`.
    fn session(id: &str, connected: i64, reason: &str) -> ApiSession {
        ApiSession {
            session_id: id.into(),
            boot_id: None,
            connected_at: at(connected),
            disconnected_at: Some(at(connected + 5)),
            reason: Some(reason.into()),
        }
    }

    /// A `server_disconnect` record: `code` received at `t` s by the connection acknowledged
    /// at `acked` s.
    fn goodbye(device: &str, code: u8, acked: i64, t: i64) -> Record {
        let mut r = Record::now(device, truth::SERVER_DISCONNECT, true);
        r.t = at(t);
        r.reason_code = Some(code);
        r.connected_at = Some(at(acked));
        r
    }

    #[test]
    fn disconnect_codes_are_checked_against_the_session_they_ended() {
        // d1 was taken over (its first session, 10 s) and later kicked (the second, 20 s): it
        // received 0x8E and 0x98. The second connection's CONNACK came 1 ms after the broker
        // stored the session's start, as it does.
        let mut g2 = goodbye("d1", 0x98, 20, 25);
        g2.connected_at = g2
            .connected_at
            .map(|t| t + chrono::TimeDelta::milliseconds(1));
        let records = vec![
            goodbye("d1", 0x8E, 10, 21),
            g2,
            goodbye("d2", 0x8D, 10, 14),
            goodbye("d3", 0x93, 10, 12),
        ];
        let expected = expectations(records);
        assert!(expected["d1"].ends.is_empty() && expected["d1"].goodbyes.len() == 2);
        let history = HashMap::from([
            (
                "d1".to_owned(),
                vec![session("s2", 20, "kicked"), session("s1", 10, "takeover")],
            ),
            // The broker says this session ended as connection_lost: a mismatch.
            ("d2".to_owned(), vec![session("s3", 10, "connection_lost")]),
            ("d3".to_owned(), vec![session("s4", 10, "protocol_error")]),
        ]);
        let found = check_goodbyes(&expected, &history);
        assert_eq!(
            (found.received, found.checked, found.unchecked, found.beyond),
            (4, 3, 1, 0)
        );
        assert_eq!(found.wrong.len(), 1, "{:?}", found.wrong);
        let line = &found.wrong[0];
        for part in [
            "WRONG d2",
            "0x8D",
            "s3",
            "connection_lost",
            "keepalive_timeout",
        ] {
            assert!(line.contains(part), "{line:?} lacks {part:?}");
        }

        // No session started by the connection's CONNACK: wrong too.
        let expected = expectations(vec![goodbye("d4", 0x8E, 100, 101)]);
        let history = HashMap::from([("d4".to_owned(), vec![session("s5", 200, "takeover")])]);
        let found = check_goodbyes(&expected, &history);
        assert_eq!(found.wrong.len(), 1, "{:?}", found.wrong);
        assert!(found.wrong[0].contains("no session"), "{:?}", found.wrong);
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.9), 7.0);
    }

    #[test]
    fn final_records_win_and_events_derive_otherwise() {
        let mut a = Record::now("a", truth::CONNECTED, true);
        let mut f = Record::now("a", truth::FINAL, false);
        f.state = Some("offline".into());
        a.t = f.t;
        let b = Record::now("b", truth::CONNECTED, true);
        let c = Record::now("c", truth::SILENT_DEATH, false);
        let e = expectations(vec![a, f, b, c]);
        assert_eq!(e["a"].final_online, Some(false));
        assert!(e["b"].derived_online && e["b"].final_online.is_none());
        assert!(!e["c"].derived_online);
        assert_eq!(e["c"].ends.len(), 1);
    }
}
