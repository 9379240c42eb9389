//! The once-per-second progress output: plain status lines (parsed by tests and scripts)
//! when stdout is not a terminal, an `indicatif` bar (connected / target, the other status
//! fields as its message) when it is.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{self, Snapshot};

/// Where the per-second status goes (clones share the bar).
#[derive(Debug, Clone)]
pub enum Progress {
    /// One `t=… connected=…` line per second on stdout.
    Plain,
    /// A progress bar on the terminal.
    Bar(ProgressBar),
}

impl Progress {
    /// A bar when stdout is a terminal, plain lines otherwise.
    pub fn new(target: u64) -> Self {
        if std::io::stdout().is_terminal() {
            Self::bar(target, ProgressDrawTarget::stdout())
        } else {
            Self::Plain
        }
    }

    fn bar(target: u64, draw: ProgressDrawTarget) -> Self {
        let bar = ProgressBar::with_draw_target(Some(target), draw);
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} connected {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(250));
        Self::Bar(bar)
    }

    /// Shows the status `elapsed_s` seconds into the run.
    pub fn update(&self, elapsed_s: u64, s: &Snapshot) {
        match self {
            Self::Plain => println!("{}", report::status_line(elapsed_s, s)),
            Self::Bar(bar) => {
                bar.set_position(s.connected);
                bar.set_message(message(s));
            }
        }
    }

    /// Prints a line above the bar (or just prints it).
    pub fn println(&self, line: &str) {
        match self {
            Self::Plain => println!("{line}"),
            Self::Bar(bar) => bar.println(line),
        }
    }

    /// Stops the bar, leaving its last state on its own line of the terminal.
    pub fn finish(&self) {
        if let Self::Bar(bar) = self {
            if !bar.is_finished() {
                bar.abandon();
                if !bar.is_hidden() {
                    // indicatif leaves the cursor at the end of the bar's line.
                    println!();
                }
            }
        }
    }
}

/// The status fields other than `connected`, for the bar's message.
fn message(s: &Snapshot) -> String {
    format!(
        "connecting={} away={} errors={} reconnects={} takeovers={} published={}",
        s.connecting, s.away, s.errors, s.reconnects, s.takeovers, s.published
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_bar_tracks_connected_and_fields() {
        let p = Progress::bar(10, ProgressDrawTarget::hidden());
        let s = Snapshot {
            connected: 7,
            errors: 2,
            ..Snapshot::default()
        };
        p.update(3, &s);
        let Progress::Bar(bar) = &p else {
            panic!("expected a bar");
        };
        assert_eq!(bar.position(), 7);
        assert_eq!(bar.length(), Some(10));
        assert!(bar.message().contains("errors=2"), "{}", bar.message());
        p.finish();
        assert!(bar.is_finished());
    }
}
