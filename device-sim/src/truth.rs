//! Ground truth: one JSON line per intended or observed state change of a device, written by
//! `run --truth FILE` and read back by `verify`.
//!
//! Each line is a [`Record`]. `observed: false` marks what the simulator *did* (an intended
//! change: `disconnect_clean`, `close_abrupt`, `silent_death`, `takeover`), `observed: true`
//! what it *saw* on the wire (`connected` on CONNACK, `takeover_connected`, `taken_over` when
//! the replaced connection was closed by the broker, `connection_lost` for a drop it did not
//! cause; with MQTT 5 also `server_disconnect`, the broker's DISCONNECT and its reason code,
//! for the connection that received its CONNACK at `connected_at`). After the last change of a
//! device, a `final` record gives the state the broker must show for it (`state: "online"` or
//! `"offline"`); a later `final` (after a `--end-state keep` hold) supersedes an earlier one.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use anyhow::{Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// A device connected (CONNACK received).
pub const CONNECTED: &str = "connected";
/// The device sent DISCONNECT and closed its socket.
pub const DISCONNECT_CLEAN: &str = "disconnect_clean";
/// The device closed its socket without DISCONNECT (FIN).
pub const CLOSE_ABRUPT: &str = "close_abrupt";
/// The device stopped sending anything but kept its socket open.
pub const SILENT_DEATH: &str = "silent_death";
/// The device opened a second connection with its client id.
pub const TAKEOVER: &str = "takeover";
/// The second connection of a takeover received its CONNACK.
pub const TAKEOVER_CONNECTED: &str = "takeover_connected";
/// The first connection of a takeover was closed by the broker.
pub const TAKEN_OVER: &str = "taken_over";
/// A connection the device did not mean to end was closed or failed.
pub const CONNECTION_LOST: &str = "connection_lost";
/// The broker sent an MQTT 5 DISCONNECT (`reason_code`) before closing the connection that
/// received its CONNACK at `connected_at`.
pub const SERVER_DISCONNECT: &str = "server_disconnect";
/// The state the device is meant to have from now on.
pub const FINAL: &str = "final";

/// One line of the truth file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When it happened (RFC 3339, UTC).
    pub t: DateTime<Utc>,
    /// The client id.
    pub device: String,
    /// What happened: one of the constants of this module.
    pub event: String,
    /// `true` when seen on the wire, `false` when done by the simulator.
    pub observed: bool,
    /// For `final`: `online` or `offline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Why (for example `churn`, `storm`, `flap`, `end`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// For `silent_death`: when the device last sent a packet (CONNECT or PINGREQ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sent: Option<DateTime<Utc>>,
    /// For `silent_death`: the keep-alive of the connection, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive: Option<u16>,
    /// For `server_disconnect`: the reason code of the broker's DISCONNECT (0x8E = 142 session
    /// taken over, 0x8D keep-alive timeout, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u8>,
    /// For `server_disconnect`: when the connection received its CONNACK (which session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<DateTime<Utc>>,
}

impl Record {
    /// A record of `event` for `device` at the current time.
    pub fn now(device: &str, event: &str, observed: bool) -> Self {
        Self {
            t: Utc::now(),
            device: device.to_owned(),
            event: event.to_owned(),
            observed,
            state: None,
            cause: None,
            last_sent: None,
            keepalive: None,
            reason_code: None,
            connected_at: None,
        }
    }

    /// Sets `cause`.
    pub fn cause(mut self, cause: &str) -> Self {
        self.cause = Some(cause.to_owned());
        self
    }
}

/// Appends records to a truth file; a disabled writer drops them.
pub struct TruthWriter {
    out: Option<Mutex<BufWriter<File>>>,
}

impl TruthWriter {
    /// A writer that records nothing (no `--truth`).
    pub fn disabled() -> Self {
        Self { out: None }
    }

    /// Creates (truncates) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self {
            out: Some(Mutex::new(BufWriter::new(file))),
        })
    }

    /// Appends one record; write errors are reported once per call on stderr.
    pub fn record(&self, record: &Record) {
        let Some(out) = &self.out else { return };
        let line = match serde_json::to_string(record) {
            Ok(line) => line,
            Err(e) => {
                eprintln!("device-sim: cannot encode truth record: {e}");
                return;
            }
        };
        let mut out = match out.lock() {
            Ok(out) => out,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = writeln!(out, "{line}") {
            eprintln!("device-sim: cannot write truth file: {e}");
        }
    }

    /// The `final` record of `device`.
    pub fn final_state(&self, device: &str, online: bool) {
        let mut r = Record::now(device, FINAL, false);
        r.state = Some(if online { "online" } else { "offline" }.to_owned());
        self.record(&r);
    }

    /// Writes buffered records to the file.
    pub fn flush(&self) -> Result<()> {
        let Some(out) = &self.out else { return Ok(()) };
        let mut out = match out.lock() {
            Ok(out) => out,
            Err(poisoned) => poisoned.into_inner(),
        };
        out.flush().context("flushing the truth file")
    }
}

/// Converts a [`SystemTime`] for a record.
pub fn utc(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

/// Formats a time the way records do.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Reads every record of a truth file, in file order.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut records = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a truth record", path.display(), n + 1))?;
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_omit_empty_fields() -> Result<()> {
        let mut r = Record::now("dev-1", SILENT_DEATH, false).cause("churn");
        r.keepalive = Some(1);
        let line = serde_json::to_string(&r)?;
        assert!(line.contains("\"event\":\"silent_death\""), "{line}");
        assert!(!line.contains("state"), "{line}");
        let back: Record = serde_json::from_str(&line)?;
        assert_eq!(back, r);
        let parsed: Record = serde_json::from_str(
            r#"{"t":"2026-01-02T03:04:05.123Z","device":"d","event":"final","observed":false,"state":"online"}"#,
        )?;
        assert_eq!(parsed.state.as_deref(), Some("online"));
        Ok(())
    }
}
