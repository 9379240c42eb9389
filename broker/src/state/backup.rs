//! Backups of the broker state while the broker runs: a consistent copy (everything
//! acknowledged before it began, nothing after) written to a new file of the backup directory
//! (`persistence.backup_dir`), on request (`POST /api/v1/admin/state/backup`) or every
//! `persistence.backup_interval`, keeping the newest `persistence.backup_keep` scheduled ones.
//! `broker restore` makes a backup the state of a directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::{StateError, StateStore};
use crate::labels::BackupOutcome;
use crate::metrics::metrics;

/// The names of backups: `state-<UTC time>[-scheduled].hwstate`, in time order.
const PREFIX: &str = "state-";
const EXTENSION: &str = "hwstate";
/// What scheduled backups add to their name; only they are pruned.
const SCHEDULED: &str = "-scheduled";

/// Who asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// An operator, through the admin API.
    Request,
    /// `persistence.backup_interval`.
    Schedule,
}

/// A backup written.
#[derive(Debug)]
pub struct Written {
    /// Its file.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Writes `store`'s export to a new file in `dir` (created if missing): written aside,
/// fsynced, renamed, so that a file with the backup's name is whole. Counted in
/// `heartwire_state_backups_total`. Blocking.
pub fn write(store: &dyn StateStore, dir: &Path, trigger: Trigger) -> Result<Written, StateError> {
    let started = Instant::now();
    let written = write_file(store, dir, trigger);
    let m = metrics();
    match &written {
        Ok(_) => {
            m.state_backups.inc(BackupOutcome::Written);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            m.state_last_backup.set(now.as_secs_f64());
        }
        Err(_) => m.state_backups.inc(BackupOutcome::Failed),
    }
    let (path, bytes) = written?;
    Ok(Written {
        path,
        bytes,
        elapsed: started.elapsed(),
    })
}

fn write_file(
    store: &dyn StateStore,
    dir: &Path,
    trigger: Trigger,
) -> Result<(PathBuf, u64), StateError> {
    std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
    let suffix = match trigger {
        Trigger::Request => "",
        Trigger::Schedule => SCHEDULED,
    };
    let time = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let path = dir.join(format!("{PREFIX}{time}{suffix}.{EXTENSION}"));
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| StateError::io(&tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        let bytes = store.export(&mut out)?;
        out.flush().map_err(|e| StateError::io(&tmp, e))?;
        out.get_ref()
            .sync_all()
            .map_err(|e| StateError::io(&tmp, e))?;
        drop(out);
        std::fs::rename(&tmp, &path).map_err(|e| StateError::io(&path, e))?;
        Ok(bytes)
    })();
    let bytes = match result {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(error);
        }
    };
    // The rename is durable with the directory.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((path, bytes))
}

/// Whether `name` is the file name of a backup (and nothing else: no path).
pub fn is_backup_name(name: &str) -> bool {
    name.starts_with(PREFIX)
        && name.ends_with(&format!(".{EXTENSION}"))
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
        && !name.contains("..")
}

/// A backup in the backup directory.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    /// Its file name.
    pub name: String,
    /// Its size.
    pub bytes: u64,
    /// Written by `persistence.backup_interval` (pruned to `persistence.backup_keep`).
    pub scheduled: bool,
}

/// The backups in `dir`, newest first (none when it does not exist yet). Blocking.
pub fn list(dir: &Path) -> Result<Vec<Listed>, StateError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StateError::io(dir, e)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StateError::io(dir, e))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if !is_backup_name(&name) {
            continue;
        }
        let meta = entry
            .metadata()
            .map_err(|e| StateError::io(&entry.path(), e))?;
        listed.push(Listed {
            scheduled: name.ends_with(&format!("{SCHEDULED}.{EXTENSION}")),
            name,
            bytes: meta.len(),
        });
    }
    // The names sort in time order.
    listed.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(listed)
}

/// Deletes the scheduled backups in `dir` older than the newest `keep`; backups taken on
/// request are the operator's to delete. Returns the files deleted. Blocking.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, StateError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StateError::io(dir, e))?;
    let mut scheduled: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| StateError::io(dir, e))?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with(PREFIX) && name.ends_with(&format!("{SCHEDULED}.{EXTENSION}")) {
            scheduled.push(path);
        }
    }
    // The names sort in time order.
    scheduled.sort();
    let old = scheduled.len().saturating_sub(keep);
    let mut deleted = Vec::with_capacity(old);
    for path in scheduled.into_iter().take(old) {
        std::fs::remove_file(&path).map_err(|e| StateError::io(&path, e))?;
        deleted.push(path);
    }
    Ok(deleted)
}

/// Writes a backup into `dir` every `interval` (the first one `interval` after start) and
/// prunes the scheduled ones to the newest `keep`, until `stop`. Each backup runs on the
/// blocking pool; a failure is logged and counted, and the next one is tried on time.
pub async fn schedule(
    store: Arc<dyn StateStore>,
    dir: PathBuf,
    interval: Duration,
    keep: usize,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (store, dir_for_task) = (Arc::clone(&store), dir.clone());
        let done = tokio::task::spawn_blocking(move || {
            let written = write(&*store, &dir_for_task, Trigger::Schedule)?;
            let pruned = prune(&dir_for_task, keep)?;
            Ok::<_, StateError>((written, pruned))
        })
        .await;
        match done {
            Ok(Ok((written, pruned))) => tracing::info!(
                path = %written.path.display(),
                bytes = written.bytes,
                elapsed_ms = written.elapsed.as_millis() as u64,
                pruned = pruned.len(),
                "Scheduled backup of the broker state written."
            ),
            // Closed: the broker is stopping.
            Ok(Err(StateError::Closed)) => return,
            Ok(Err(error)) => {
                tracing::error!(%error, dir = %dir.display(), "Scheduled backup of the broker state failed.");
            }
            Err(error) => tracing::error!(%error, "Scheduled backup task failed."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Record, Ticket};
    use std::task::{Poll, Waker};

    /// A store whose export writes `good` bytes and then fails (`fail`) or ends.
    struct Exporting {
        good: usize,
        fail: bool,
    }

    impl StateStore for Exporting {
        fn append(&self, _: Record) -> Ticket {
            0
        }
        fn poll_durable(&self, _: Ticket, _: &Waker) -> Poll<()> {
            Poll::Ready(())
        }
        fn acks_wait(&self) -> bool {
            false
        }
        fn over_budget(&self) -> bool {
            false
        }
        fn next_message_id(&self) -> u64 {
            1
        }
        fn export(&self, out: &mut dyn Write) -> Result<u64, StateError> {
            out.write_all(&vec![7; self.good])
                .map_err(StateError::Export)?;
            if self.fail {
                return Err(StateError::Export(std::io::Error::other("disk gone")));
            }
            Ok(self.good as u64)
        }
        fn close(&self) {}
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hw-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_failed_backup_leaves_no_file_and_is_counted() {
        let dir = temp("backup-fail");
        let failed = || metrics().state_backups.get(BackupOutcome::Failed);
        let written = || metrics().state_backups.get(BackupOutcome::Written);
        let (failed_before, written_before) = (failed(), written());
        let store = Exporting {
            good: 3 << 20,
            fail: true,
        };
        let error = write(&store, &dir, Trigger::Schedule).expect_err("the export fails");
        assert!(error.to_string().contains("disk gone"), "{error}");
        assert_eq!(std::fs::read_dir(&dir).expect("dir").count(), 0);
        assert_eq!((failed(), written()), (failed_before + 1, written_before));

        let store = Exporting {
            good: 1000,
            fail: false,
        };
        let done = write(&store, &dir, Trigger::Request).expect("written");
        assert_eq!(done.bytes, 1000);
        assert_eq!(std::fs::metadata(&done.path).expect("file").len(), 1000);
        assert_eq!(list(&dir).expect("list").len(), 1);
        assert_eq!(written(), written_before + 1);
        assert!(metrics().state_last_backup.get() > 0.0);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn backup_names_are_file_names_only() {
        for good in [
            "state-20261130T100000.000Z.hwstate",
            "state-20261130T100000.000Z-scheduled.hwstate",
        ] {
            assert!(is_backup_name(good), "{good}");
        }
        for bad in [
            "state-../../etc/passwd.hwstate",
            "state-x/y.hwstate",
            "state-x.tmp",
            "other.hwstate",
            "state-..hwstate",
            "state-a b.hwstate",
        ] {
            assert!(!is_backup_name(bad), "{bad}");
        }
    }

    #[test]
    fn only_the_oldest_scheduled_backups_are_pruned() {
        let dir = temp("prune");
        std::fs::create_dir_all(&dir).expect("dir");
        let names = [
            "state-20261130T100000.000Z-scheduled.hwstate",
            "state-20261130T110000.000Z-scheduled.hwstate",
            "state-20261130T113000.000Z.hwstate",
            "state-20261130T120000.000Z-scheduled.hwstate",
            "state-20261130T130000.000Z-scheduled.hwstate",
            "notes.txt",
        ];
        for name in names {
            std::fs::write(dir.join(name), b"x").expect("file");
        }
        let deleted = prune(&dir, 2).expect("prune");
        let deleted: Vec<_> = deleted
            .iter()
            .map(|p| p.file_name().and_then(|n| n.to_str()).expect("name"))
            .collect();
        assert_eq!(deleted, [names[0], names[1]]);
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("name"))
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt", names[2], names[3], names[4]]);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
