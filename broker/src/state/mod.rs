//! Durable broker state: retained messages and persistent sessions (subscriptions, queued and
//! in-flight messages, QoS 2 receipts, session expiry) that survive a restart or a crash.
//!
//! The MQTT layer describes every change as a [`Record`] and appends it to a [`StateStore`],
//! which answers with a [`Ticket`]; in `sync` mode an acknowledgement that promises something
//! is stored (PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK) waits until its ticket is durable
//! ([`StateStore::poll_durable`]). At start the store gives back the [`Image`] its records add up
//! to, and the broker rebuilds its sessions, subscriptions and retained messages from it.
//!
//! The trait knows nothing of files: tickets, durability and an export stream are what an
//! engine offers. [`log::LogStore`] is the embedded engine (an append-only log with group
//! commit and background snapshots in `persistence.dir`); the cluster will add one on a
//! distributed engine. Separate from the presence store ([`crate::store`]), which records
//! connections, not devices' data.

pub mod backup;
pub mod image;
pub mod log;
pub mod record;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

pub use image::{Image, Queued, StoredSession};
pub use record::{
    Record, StoredAccess, StoredDelivery, StoredMessage, StoredOptions, StoredProperties,
};

use crate::config::{PersistenceConfig, PersistenceMode};

/// A position in the order of appended records: the ticket of a record is durable once every
/// record up to it is.
pub type Ticket = u64;

/// Where the broker's durable state goes.
pub trait StateStore: Send + Sync + 'static {
    /// Appends `record` after every record appended before it (cheap: no I/O). Returns its
    /// ticket.
    fn append(&self, record: Record) -> Ticket;

    /// `Ready` once `ticket` is durable; otherwise `waker` is woken when more is (and the
    /// caller asks again).
    fn poll_durable(&self, ticket: Ticket, waker: &Waker) -> Poll<()>;

    /// Whether acknowledgements wait for durability (`persistence.mode = "sync"`).
    fn acks_wait(&self) -> bool;

    /// Whether new state must be refused: the store is over its budget
    /// (`persistence.max_disk`) until it frees space.
    fn over_budget(&self) -> bool;

    /// A new message id, never handed out before in this state.
    fn next_message_id(&self) -> u64;

    /// Writes a consistent copy of the state, as of the call, to `out` as a stream of records
    /// (a backup, which `broker restore` imports). Blocking. Returns the bytes written.
    fn export(&self, out: &mut dyn Write) -> Result<u64, StateError>;

    /// Makes everything appended durable and stops. Blocking.
    fn close(&self);
}

/// What opening the state found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The state.
    pub image: Image,
    /// Bytes cut off the end of the newest log: a write a crash tore (never acknowledged).
    pub truncated_bytes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// How long reading took.
    pub elapsed: Duration,
}

/// Why the state could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file or directory could not be used.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another broker uses the directory.
    #[error("{0} is in use by another broker process (its LOCK file is locked)")]
    Locked(PathBuf),
    /// A file holds a record that is not a torn write at the end of the newest log.
    #[error(
        "{path}: corrupt record at byte {offset} ({error}); restore a backup \
             (`broker restore`) or move the directory away to start empty"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where in it.
        offset: usize,
        /// What is wrong.
        error: record::DecodeError,
    },
    /// An import into a directory that already holds state.
    #[error("{0} already holds broker state; import into an empty directory")]
    NotEmpty(PathBuf),
    /// Writing an export failed.
    #[error("writing the export: {0}")]
    Export(std::io::Error),
    /// The store was closed.
    #[error("the state store is closed")]
    Closed,
}

impl StateError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    fn corrupt(path: &Path, offset: usize, error: record::DecodeError) -> Self {
        Self::Corrupt {
            path: path.to_owned(),
            offset,
            error,
        }
    }
}

/// An opened store and what it held.
pub type Opened = (Arc<dyn StateStore>, Loaded);

/// Opens the state `config` asks for: `None` when `persistence.mode = "off"`. Blocking.
pub fn open(config: &PersistenceConfig) -> Result<Option<Opened>, StateError> {
    if config.mode == PersistenceMode::Off {
        return Ok(None);
    }
    let (store, loaded) = log::LogStore::open(config)?;
    Ok(Some((store, loaded)))
}
