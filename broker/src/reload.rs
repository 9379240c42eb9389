//! Reloading, without a restart, the files the broker reads at start: the TLS certificate
//! files, the password file, the ACL file, the API tokens file. SIGHUP and `POST /api/v1/admin/reload` both go
//! through one [`Reloader`]: each configured file is read again off the async runtime; a file
//! that cannot be used leaves the one in force; each outcome is logged and counted.
//!
//! A new file is one more [`Reloader::file`] call where the broker builds its reloader
//! (`serve` in lib.rs).

use std::sync::Arc;

use serde::Serialize;

use crate::labels::ReloadOutcome;
use crate::metrics::Counters;

/// How one file's reload went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// Read and in force.
    Reloaded,
    /// Not usable; the previous one stays in force.
    Failed {
        /// Why (names the key, the file and, for a malformed line, its number).
        error: String,
    },
    /// The configuration names no such file.
    NotConfigured,
}

/// Reads one file again; a message on failure.
type ReloadFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One file the reloader knows.
struct Entry {
    /// Its configuration key (`auth.password_file`), as reports name it.
    key: &'static str,
    /// What log lines call it ("Password file").
    what: &'static str,
    /// Counts its reloads by outcome.
    counter: &'static Counters<ReloadOutcome>,
    /// `None`: not configured.
    reload: Option<ReloadFn>,
}

/// The files that can be reloaded, in the order they are reloaded and reported.
pub struct Reloader {
    entries: Vec<Entry>,
    /// One reload at a time (a SIGHUP and an API call at once take turns).
    running: tokio::sync::Mutex<()>,
}

impl Default for Reloader {
    fn default() -> Self {
        Self::new()
    }
}

impl Reloader {
    /// A reloader of no files.
    pub fn new() -> Self {
        Self {
            entries: Vec::new(),
            running: tokio::sync::Mutex::new(()),
        }
    }

    /// Adds the file of configuration key `key`, called `what` in logs and counted in
    /// `counter`; `reload` reads it again (blocking; `None` when the file is not configured).
    pub fn file<F, E>(
        mut self,
        key: &'static str,
        what: &'static str,
        counter: &'static Counters<ReloadOutcome>,
        reload: Option<F>,
    ) -> Self
    where
        F: Fn() -> Result<(), E> + Send + Sync + 'static,
        E: std::fmt::Display,
    {
        self.entries.push(Entry {
            key,
            what,
            counter,
            reload: reload.map(|f| Box::new(move || f().map_err(|e| e.to_string())) as ReloadFn),
        });
        self
    }

    /// Reloads every configured file, off the async runtime; logs (naming `trigger`, such as
    /// "SIGHUP") and counts each outcome. Every known file is in the answer, in order.
    pub async fn reload(self: &Arc<Self>, trigger: &'static str) -> Vec<(&'static str, Outcome)> {
        let _turn = self.running.lock().await;
        let this = Arc::clone(self);
        let outcomes = tokio::task::spawn_blocking(move || {
            this.entries
                .iter()
                .map(|entry| match &entry.reload {
                    None => Outcome::NotConfigured,
                    Some(reload) => match reload() {
                        Ok(()) => Outcome::Reloaded,
                        Err(error) => Outcome::Failed { error },
                    },
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| {
            let error = "the reload task failed".to_owned();
            self.entries
                .iter()
                .map(|entry| match entry.reload {
                    None => Outcome::NotConfigured,
                    Some(_) => Outcome::Failed {
                        error: error.clone(),
                    },
                })
                .collect()
        });
        if outcomes.iter().all(|o| *o == Outcome::NotConfigured) {
            tracing::info!(
                trigger,
                "Reload asked for: no TLS certificate, password, ACL or API tokens file is configured."
            );
        }
        for (entry, outcome) in self.entries.iter().zip(&outcomes) {
            let (key, what) = (entry.key, entry.what);
            match outcome {
                Outcome::NotConfigured => {}
                Outcome::Reloaded => {
                    entry.counter.inc(ReloadOutcome::Ok);
                    tracing::info!(
                        trigger,
                        key,
                        "{what} reloaded; new connections and requests use it."
                    );
                }
                Outcome::Failed { error } => {
                    entry.counter.inc(ReloadOutcome::Failed);
                    tracing::error!(trigger, key, %error, "{what} not reloaded; the previous one stays in use.");
                }
            }
        }
        self.entries.iter().map(|e| e.key).zip(outcomes).collect()
    }
}
