//! `broker restore`: makes a backup of the broker state (written by
//! `POST /api/v1/admin/state/backup` or every `persistence.backup_interval`) the state of a
//! directory, with the broker stopped.

use std::path::PathBuf;

use anyhow::Context;

/// `broker restore BACKUP [--dir DIR]`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup file (`state-*.hwstate` in `persistence.backup_dir`, by default
    /// `persistence.dir`/backups).
    backup: PathBuf,
    /// The state directory to restore into (`persistence.dir`); it must hold no state: move
    /// the old one away first.
    #[arg(long, value_name = "DIR", default_value = "data/state")]
    dir: PathBuf,
}

/// Restores `args.backup` into `args.dir` and says what it holds.
pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let export = std::fs::read(&args.backup)
        .with_context(|| format!("reading {}", args.backup.display()))?;
    let image = broker::state::log::import(&args.dir, &export)?;
    println!(
        "Restored {} into {}: {} persistent sessions, {} queued messages, {} retained messages.",
        args.backup.display(),
        args.dir.display(),
        image.sessions.len(),
        image.queued(),
        image.retained.len()
    );
    Ok(())
}
