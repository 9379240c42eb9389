//! The local journal: an append-only file of presence records (JSON lines) that holds what the
//! database could not take yet. Records are appended in order and fsynced per append; they are
//! read back in order from a cursor, and the file is truncated once everything in it has been
//! applied. The cursor is not persisted: after a crash the whole file is replayed, which is safe
//! because applying a batch again changes nothing.
//!
//! Every file operation runs on tokio's blocking pool, never on an async worker: [`Journal`] is
//! the async handle the bridge holds, `JournalFile` the file and its cursor. The handle keeps
//! the counts of the last operation (records unread, bytes, the time of the oldest unread
//! record), so that the bridge's gauges and decisions read them without touching the file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::event::PresenceRecord;

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Reading or writing the file failed (disk full, permissions, ...).
    #[error("journal {path}: {source}")]
    Io {
        /// The journal file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// The blocking task that ran a file operation failed (it panicked).
    #[error("journal {path}: file operation failed: {reason}")]
    Task {
        /// The journal file.
        path: PathBuf,
        /// What the runtime said.
        reason: String,
    },
}

/// Records read from the journal's cursor by [`Journal::peek`].
#[derive(Debug)]
pub struct Peeked {
    /// The lines that decoded, in order.
    pub records: Vec<PresenceRecord>,
    /// The offset just past the lines read, for [`Journal::consume`].
    pub end: u64,
    /// Lines read that could not be decoded (skipped).
    pub corrupt: u64,
}

impl Peeked {
    /// Lines read, decoded or not: what [`Journal::consume`] is told.
    pub fn lines(&self) -> u64 {
        self.records.len() as u64 + self.corrupt
    }
}

/// What the journal holds, as of its last operation.
#[derive(Debug, Clone, Copy, Default)]
struct Status {
    /// Records not yet applied.
    unread: u64,
    /// File length.
    bytes: u64,
    /// Event time of the first unread record that decodes.
    oldest: Option<SystemTime>,
}

/// The journal, for async code: each operation runs on the blocking pool and is awaited, one at
/// a time (the methods take `&mut self`).
pub struct Journal {
    path: PathBuf,
    /// Locked only inside blocking tasks, which run one at a time: never contended.
    file: Arc<Mutex<JournalFile>>,
    /// The counts after the last operation.
    status: Status,
}

impl Journal {
    /// Opens (creating) the journal; records left by an earlier run count as unread.
    pub async fn open(path: &Path) -> Result<Self, JournalError> {
        let owned = path.to_owned();
        let file = tokio::task::spawn_blocking(move || JournalFile::open(&owned))
            .await
            .map_err(|e| JournalError::Task {
                path: path.to_owned(),
                reason: e.to_string(),
            })??;
        Ok(Self {
            path: path.to_owned(),
            status: file.status(),
            file: Arc::new(Mutex::new(file)),
        })
    }

    /// Runs `op` on the file in the blocking pool, then takes note of the file's counts.
    async fn run<T: Send + 'static>(
        &mut self,
        op: impl FnOnce(&mut JournalFile) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, JournalError> {
        let file = Arc::clone(&self.file);
        let (result, status) = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            let result = op(&mut file);
            (result, file.status())
        })
        .await
        .map_err(|e| JournalError::Task {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        self.status = status;
        result
    }

    /// Appends records and fsyncs.
    pub async fn append(&mut self, records: Vec<PresenceRecord>) -> Result<(), JournalError> {
        self.run(move |file| file.append(&records)).await
    }

    /// Up to `max` unread lines from the cursor, decoded, without moving the cursor.
    pub async fn peek(&mut self, max: usize) -> Result<Peeked, JournalError> {
        self.run(move |file| file.peek(max)).await
    }

    /// Marks the `lines` lines before `end` (as returned by [`Journal::peek`]) applied;
    /// truncates the file once all of it is.
    pub async fn consume(&mut self, end: u64, lines: u64) -> Result<(), JournalError> {
        self.run(move |file| file.consume(end, lines)).await
    }

    /// Forgets unread records that cannot be read back (the file was cut short behind the
    /// journal's back): returns how many.
    pub async fn reset_unreadable(&mut self) -> Result<u64, JournalError> {
        self.run(|file| Ok(file.reset_unreadable())).await
    }

    /// Records not yet applied.
    pub fn unread(&self) -> u64 {
        self.status.unread
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.status.bytes
    }

    /// Event time of the oldest record not yet applied (the first one that decodes), if any.
    pub fn oldest(&self) -> Option<SystemTime> {
        self.status.oldest
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The journal file and the read cursor; blocking I/O, run by [`Journal`] on the blocking pool.
struct JournalFile {
    path: PathBuf,
    file: File,
    /// Byte offset of the first record not yet applied.
    read_offset: u64,
    /// File length.
    len: u64,
    /// Records between `read_offset` and the end.
    unread: u64,
    /// Event time of the first record from `read_offset` on that decodes: kept up to date as
    /// records are appended and consumed, so that nobody reads the file to know it.
    oldest: Option<SystemTime>,
}

/// The record a journal line holds, if it decodes.
fn decode(line: &[u8]) -> Option<PresenceRecord> {
    serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(line)).ok()
}

impl JournalFile {
    fn open(path: &Path) -> Result<Self, JournalError> {
        let err = |source| JournalError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(err)?;
        let mut unread = 0;
        let mut oldest = None;
        let mut reader = BufReader::new(&file);
        let mut line = Vec::new();
        let mut len = 0;
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(err)?;
            if n == 0 {
                break;
            }
            if line.ends_with(b"\n") {
                unread += 1;
                len += n as u64;
                if oldest.is_none() {
                    oldest = decode(&line).map(|r| r.event.time());
                }
            } else {
                // A torn last line from a crash mid-append: ignore it and cut it off.
                break;
            }
        }
        let journal = Self {
            path: path.to_owned(),
            file,
            read_offset: 0,
            len,
            unread,
            oldest,
        };
        journal.file.set_len(len).map_err(err)?;
        Ok(journal)
    }

    fn status(&self) -> Status {
        Status {
            unread: self.unread,
            bytes: self.len,
            oldest: self.oldest,
        }
    }

    fn err(&self, source: io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn append(&mut self, records: &[PresenceRecord]) -> Result<(), JournalError> {
        let mut buf = Vec::with_capacity(records.len() * 200);
        for record in records {
            serde_json::to_writer(&mut buf, record)
                .map_err(|e| self.err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            buf.push(b'\n');
        }
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data())
        {
            // Cut off a partial append so the file stays a sequence of whole records.
            let _ = self.file.set_len(self.len);
            return Err(self.err(e));
        }
        self.len += buf.len() as u64;
        self.unread += records.len() as u64;
        if self.oldest.is_none() {
            self.oldest = records.first().map(|r| r.event.time());
        }
        Ok(())
    }

    fn peek(&self, max: usize) -> Result<Peeked, JournalError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.read_offset))
            .map_err(|e| self.err(e))?;
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut end = self.read_offset;
        let mut corrupt = 0;
        let mut lines = 0;
        let mut line = Vec::new();
        while lines < max && end < self.len {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| self.err(e))?;
            if n == 0 {
                break;
            }
            lines += 1;
            end += n as u64;
            match decode(&line) {
                Some(record) => records.push(record),
                None => corrupt += 1,
            }
        }
        Ok(Peeked {
            records,
            end,
            corrupt,
        })
    }

    /// The event time of the first record from `offset` on that decodes. Only for the gauge of
    /// the oldest waiting event: a read error leaves it unknown.
    fn oldest_from(&self, offset: u64) -> Option<SystemTime> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset)).ok()?;
        let mut reader = BufReader::new(file);
        let mut line = Vec::new();
        let mut at = offset;
        while at < self.len {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).ok()?;
            if n == 0 {
                return None;
            }
            at += n as u64;
            if let Some(record) = decode(&line) {
                return Some(record.event.time());
            }
        }
        None
    }

    fn reset_unreadable(&mut self) -> u64 {
        let lost = self.unread;
        self.unread = 0;
        self.read_offset = self.len;
        self.oldest = None;
        lost
    }

    fn consume(&mut self, end: u64, lines: u64) -> Result<(), JournalError> {
        self.read_offset = end;
        self.unread = self.unread.saturating_sub(lines);
        if self.read_offset >= self.len {
            self.read_offset = 0;
            self.len = 0;
            self.unread = 0;
            self.oldest = None;
            self.file.set_len(0).map_err(|e| self.err(e))?;
            self.file.sync_data().map_err(|e| self.err(e))?;
        } else {
            self.oldest = self.oldest_from(self.read_offset);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ConnectionEvent, SessionId};
    use crate::labels::DisconnectReason;
    use std::time::Duration;

    fn record(i: u64) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: uuid::Uuid::nil(),
            event: ConnectionEvent::Disconnected {
                reason_code: None,
                reason_string: None,
                session_expires_at: None,
                client_id: format!("d{i}"),
                session_id: SessionId::new(),
                seq: i,
                reason: DisconnectReason::ConnectionLost,
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i),
            },
        }
    }

    fn time(i: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i))
    }

    #[tokio::test]
    async fn append_peek_consume_truncate_and_reopen() {
        let path = std::env::temp_dir().join(format!("hw-journal-{}", uuid::Uuid::now_v7()));
        let mut j = Journal::open(&path).await.expect("open");
        assert_eq!(j.oldest(), None);
        let all: Vec<_> = (0..5).map(record).collect();
        j.append(all[..3].to_vec()).await.expect("append");
        j.append(all[3..].to_vec()).await.expect("append");
        assert_eq!((j.unread(), j.oldest()), (5, time(0)));
        let first = j.peek(2).await.expect("peek");
        assert_eq!((first.records.as_slice(), first.corrupt), (&all[..2], 0));
        j.consume(first.end, first.lines()).await.expect("consume");
        assert_eq!((j.unread(), j.oldest()), (3, time(2)));

        // Reopening (a restart) sees every record again: the cursor is not persisted.
        drop(j);
        let mut j = Journal::open(&path).await.expect("reopen");
        assert_eq!((j.unread(), j.oldest()), (5, time(0)));
        let rest = j.peek(100).await.expect("peek");
        assert_eq!(rest.records, all);
        j.consume(rest.end, 5).await.expect("consume");
        assert_eq!((j.unread(), j.bytes(), j.oldest()), (0, 0, None));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_dropped() {
        let path = std::env::temp_dir().join(format!("hw-journal-{}", uuid::Uuid::now_v7()));
        let mut j = Journal::open(&path).await.expect("open");
        j.append(vec![record(1)]).await.expect("append");
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        // Torn inside a multi-byte character.
        f.write_all(b"{\"node_id\":\"Ger\xc3").expect("write");
        drop(f);
        let mut j = Journal::open(&path).await.expect("reopen");
        assert_eq!(j.unread(), 1);
        assert_eq!(j.peek(10).await.expect("peek").records.len(), 1);
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn the_oldest_time_skips_undecodable_lines() {
        let path = std::env::temp_dir().join(format!("hw-journal-{}", uuid::Uuid::now_v7()));
        let mut f = File::create(&path).expect("create");
        f.write_all(b"not json\n").expect("write");
        drop(f);
        let mut j = Journal::open(&path).await.expect("open");
        assert_eq!((j.unread(), j.oldest()), (1, None));
        j.append(vec![record(7), record(8)]).await.expect("append");
        assert_eq!((j.unread(), j.oldest()), (3, time(7)));
        let read = j.peek(2).await.expect("peek");
        assert_eq!((read.records.len(), read.corrupt), (1, 1));
        j.consume(read.end, read.lines()).await.expect("consume");
        assert_eq!((j.unread(), j.oldest()), (1, time(8)));
        let lost = j.reset_unreadable().await.expect("reset");
        assert_eq!((lost, j.unread(), j.oldest()), (1, 0, None));
        let _ = std::fs::remove_file(&path);
    }
}
