//! What Linux says about a process: CPU time used (from `/proc/PID/stat`) and resident memory
//! (from `/proc/PID/status`). Used for the broker under test (`--broker-pid`) and for the
//! generator itself, so that a saturated generator is visible in the report.

use std::fs;
use std::io;

use anyhow::{Context, Result};
use nix::unistd::{sysconf, SysconfVar};

/// Which process to read: a pid, or the generator itself.
#[derive(Debug, Clone, Copy)]
pub enum Proc {
    Pid(u32),
    Myself,
}

impl Proc {
    fn path(self, file: &str) -> String {
        match self {
            Proc::Pid(pid) => format!("/proc/{pid}/{file}"),
            Proc::Myself => format!("/proc/self/{file}"),
        }
    }

    /// User plus system CPU time, in seconds.
    pub fn cpu_seconds(self, ticks_per_s: f64) -> Result<f64> {
        let path = self.path("stat");
        let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let ticks = parse_cpu_ticks(&stat).with_context(|| format!("parsing {path}"))?;
        Ok(ticks as f64 / ticks_per_s)
    }

    /// Resident set size (VmRSS), in KiB.
    pub fn rss_kib(self) -> Result<u64> {
        let path = self.path("status");
        let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
    }
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`), in which `/proc/PID/stat`
/// counts CPU time. Falls back to 100, Linux's value on every common architecture, and says so.
pub fn clock_ticks_per_second() -> f64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as f64,
        other => {
            eprintln!(
                "loadgen: sysconf(_SC_CLK_TCK) gave {other:?}; assuming 100 ticks per second"
            );
            100.0
        }
    }
}

/// utime + stime (fields 14 and 15). The command name in field 2 may contain spaces and
/// parentheses, so fields are counted from after its last closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> io::Result<u64> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected /proc/PID/stat format",
        )
    };
    let after_name = &stat[stat.rfind(')').ok_or_else(invalid)? + 1..];
    // After the name: field 3 (state) is index 0, so utime (14) is index 11 and stime 12.
    let mut fields = after_name.split_whitespace().skip(11);
    let mut next = || -> io::Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(invalid)
    };
    Ok(next()? + next()?)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces() {
        let stat = "42 (tokio (rt) w) S 1 42 42 0 -1 4194560 500 0 0 0 \
                    1234 567 0 0 20 0 3 0 100 1000000 250 ...";
        assert_eq!(parse_cpu_ticks(stat).expect("parses"), 1234 + 567);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tbroker\nVmPeak:\t  9000 kB\nVmRSS:\t   14236 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(14236));
    }

    #[test]
    fn own_process_is_readable() {
        let hz = clock_ticks_per_second();
        assert!(Proc::Myself.cpu_seconds(hz).expect("stat") >= 0.0);
        assert!(Proc::Myself.rss_kib().expect("status") > 0);
    }
}
