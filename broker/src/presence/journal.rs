//! The local journal: an append-only file of presence records (JSON lines) that holds what the
//! database could not take yet. Records are appended in order and fsynced per append; they are
//! read back in order from a cursor, and the file is truncated once everything in it has been
//! applied. The cursor is not persisted: after a crash the whole file is replayed, which is safe
//! because applying a batch again changes nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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
}

/// The journal file and the read cursor.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Byte offset of the first record not yet applied.
    read_offset: u64,
    /// File length.
    len: u64,
    /// Records between `read_offset` and the end.
    unread: u64,
}

impl Journal {
    /// Opens (creating) the journal; records left by an earlier run count as unread.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
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
        };
        journal.file.set_len(len).map_err(err)?;
        Ok(journal)
    }

    fn err(&self, source: io::Error) -> JournalError {
        JournalError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends records and fsyncs.
    pub fn append(&mut self, records: &[PresenceRecord]) -> Result<(), JournalError> {
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
        Ok(())
    }

    /// Up to `max` unread lines decoded, the offset just past them (for [`Journal::consume`])
    /// and how many of the lines could not be decoded (they are skipped).
    pub fn peek(&self, max: usize) -> Result<(Vec<PresenceRecord>, u64, u64), JournalError> {
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.read_offset))
            .map_err(|e| self.err(e))?;
        let mut reader = BufReader::new(file);
        let mut records = Vec::new();
        let mut offset = self.read_offset;
        let mut corrupt = 0;
        let mut lines = 0;
        let mut line = Vec::new();
        while lines < max && offset < self.len {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| self.err(e))?;
            if n == 0 {
                break;
            }
            lines += 1;
            offset += n as u64;
            match serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(&line)) {
                Ok(record) => records.push(record),
                Err(_) => corrupt += 1,
            }
        }
        Ok((records, offset, corrupt))
    }

    /// Forgets unread records that cannot be read back (the file was cut short behind the
    /// journal's back): returns how many.
    pub fn reset_unreadable(&mut self) -> u64 {
        let lost = self.unread;
        self.unread = 0;
        self.read_offset = self.len;
        lost
    }

    /// Marks everything before `offset` (as returned by `peek`, `count` records) applied;
    /// truncates the file once all of it is.
    pub fn consume(&mut self, offset: u64, count: u64) -> Result<(), JournalError> {
        self.read_offset = offset;
        self.unread = self.unread.saturating_sub(count);
        if self.read_offset >= self.len {
            self.file.set_len(0).map_err(|e| self.err(e))?;
            self.file.sync_data().map_err(|e| self.err(e))?;
            self.read_offset = 0;
            self.len = 0;
            self.unread = 0;
        }
        Ok(())
    }

    /// Records not yet applied.
    pub fn unread(&self) -> u64 {
        self.unread
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ConnectionEvent, SessionId};
    use crate::labels::DisconnectReason;

    fn record(i: u64) -> PresenceRecord {
        PresenceRecord {
            node_id: "n".into(),
            boot_id: uuid::Uuid::nil(),
            event: ConnectionEvent::Disconnected {
                client_id: format!("d{i}"),
                session_id: SessionId::new(),
                seq: i,
                reason: DisconnectReason::ConnectionLost,
                time: std::time::SystemTime::now(),
            },
        }
    }

    #[test]
    fn append_peek_consume_truncate_and_reopen() {
        let path = std::env::temp_dir().join(format!("hw-journal-{}", uuid::Uuid::now_v7()));
        let mut j = Journal::open(&path).expect("open");
        let all: Vec<_> = (0..5).map(record).collect();
        j.append(&all[..3]).expect("append");
        j.append(&all[3..]).expect("append");
        assert_eq!(j.unread(), 5);
        let (first, off, corrupt) = j.peek(2).expect("peek");
        assert_eq!((first.as_slice(), corrupt), (&all[..2], 0));
        j.consume(off, 2).expect("consume");
        assert_eq!(j.unread(), 3);

        // Reopening (a restart) sees every record again: the cursor is not persisted.
        drop(j);
        let mut j = Journal::open(&path).expect("reopen");
        assert_eq!(j.unread(), 5);
        let (rest, off, _) = j.peek(100).expect("peek");
        assert_eq!(rest, all);
        j.consume(off, 5).expect("consume");
        assert_eq!((j.unread(), j.bytes()), (0, 0));
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_torn_last_line_is_dropped() {
        let path = std::env::temp_dir().join(format!("hw-journal-{}", uuid::Uuid::now_v7()));
        let mut j = Journal::open(&path).expect("open");
        j.append(&[record(1)]).expect("append");
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        // Torn inside a multi-byte character.
        f.write_all(b"{\"node_id\":\"Ger\xc3").expect("write");
        drop(f);
        let j = Journal::open(&path).expect("reopen");
        assert_eq!(j.unread(), 1);
        assert_eq!(j.peek(10).expect("peek").0.len(), 1);
        let _ = std::fs::remove_file(&path);
    }
}
