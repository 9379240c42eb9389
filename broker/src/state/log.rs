//! The embedded engine: an append-only log with group commit, and snapshots written in the
//! background.
//!
//! Files in `persistence.dir`: `snapshot` (the state of every log before the generation its
//! header names), `log-NNNNNNNNNNNNNNNNNNNN` (one per generation, records appended in commit
//! order), `spare` (the next log, grown ahead) and `LOCK` (held while a broker uses the
//! directory).
//!
//! - **Group commit.** Connections append records to a queue in memory (a push under a mutex:
//!   no I/O, no encoding) and get a ticket. One writer thread takes everything queued, encodes
//!   it, writes it with one `write` and makes it durable with one `fdatasync`, then wakes the
//!   connections whose tickets it covered. `persistence.commit_window` spaces fsyncs at least
//!   that far apart, so that under load each one carries more records.
//! - **Logs grown ahead.** A spare thread keeps the next log ready: `persistence.segment_bytes`
//!   of zeros, written and synced. Writing records over them changes no file size, so an
//!   `fdatasync` has no metadata to commit: on ext4 about twice as many per second as when
//!   appending. Reading stops at a log's zero tail; a closed log is cut to what it holds.
//! - **Crash.** A record is acknowledged to nobody before its fsync; a crash leaves at most a
//!   torn frame at the end of the newest log, which the next start cuts off (its checksum or
//!   length does not hold, or its header is zeros with bytes after it).
//! - **Compaction.** When the closed logs outweigh the snapshot (or the disk budget is
//!   passed), the writer starts a new log and a compactor thread folds the snapshot and the
//!   closed logs into a new snapshot (written aside, fsynced, renamed over the old one), then
//!   deletes those logs. Connections and the writer never wait for it.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;

use super::image::Image;
use super::record::{DecodeError, Record, FRAME_HEADER};
use super::{Loaded, StateError, StateStore, Ticket};
use crate::config::{PersistenceConfig, PersistenceMode};
use crate::metrics::metrics;
use crate::telemetry::LogLimiter;

const SNAPSHOT: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const LOCK: &str = "LOCK";
const SPARE: &str = "spare";
const SPARE_TMP: &str = "spare.tmp";

fn log_name(generation: u64) -> String {
    format!("log-{generation:020}")
}

fn log_generation(name: &str) -> Option<u64> {
    name.strip_prefix("log-")?.parse().ok()
}

/// What connections append and the writer takes.
#[derive(Default)]
struct Queue {
    records: Vec<Record>,
    /// Tickets handed out: the ticket of the last record appended.
    appended: Ticket,
    /// Asked for a new log generation once everything appended so far is durable; answered
    /// with the first generation not yet closed.
    rotations: Vec<mpsc::Sender<u64>>,
    /// Stop once everything is durable.
    closing: bool,
}

struct Shared {
    dir: PathBuf,
    config: PersistenceConfig,
    queue: Mutex<Queue>,
    /// Wakes the writer.
    wake: Condvar,
    /// The last ticket made durable.
    durable: AtomicU64,
    /// Connections waiting for a ticket to be durable: all are woken at every commit.
    waiters: Mutex<Vec<Waker>>,
    /// Bytes of the directory's snapshot and logs (of the log being written, the bytes it
    /// holds, not its zeros).
    disk: AtomicU64,
    /// The generation of the log being written, and the bytes written to it.
    current: AtomicU64,
    current_bytes: AtomicU64,
    /// A spare log grown ahead is ready.
    spare_ready: AtomicBool,
    over_budget: AtomicBool,
    message_ids: AtomicU64,
    /// Held by whoever folds the files (compaction, export), so that they never delete what
    /// the other reads.
    folding: Mutex<()>,
}

/// The embedded broker-state store (see the module documentation).
pub struct LogStore {
    shared: Arc<Shared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Held (locked) for the store's life.
    _lock: File,
}

/// Writes that failed: one line per interval.
static WRITE_FAILED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogStore {
    /// Opens (or creates) the state in `config.dir`, reads it back, and starts the writer and
    /// compactor threads. Blocking: call it before serving, or off the async runtime.
    pub fn open(config: &PersistenceConfig) -> Result<(Arc<LogStore>, Loaded), StateError> {
        let started = Instant::now();
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| StateError::io(&dir, e))?;
        let lock_path = dir.join(LOCK);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StateError::io(&lock_path, e))?;
        if lock_file.try_lock().is_err() {
            return Err(StateError::Locked(dir));
        }
        let mut read = read_files(&dir, None, true)?;
        // Whatever the stopped broker was routing is over.
        read.image.end_routing();
        let _ = std::fs::remove_file(dir.join(SPARE_TMP));
        let generation = read.next_generation;
        let (log, grown) = new_log(&dir, generation)?;
        let (compact_tx, compact_rx) = mpsc::channel();
        let (spare_tx, spare_rx) = mpsc::channel();
        let _ = spare_tx.send(());
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            config: config.clone(),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            durable: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            disk: AtomicU64::new(0),
            over_budget: AtomicBool::new(false),
            message_ids: AtomicU64::new(read.image.message_ids),
            folding: Mutex::new(()),
            current: AtomicU64::new(generation),
            current_bytes: AtomicU64::new(0),
            spare_ready: AtomicBool::new(false),
        });
        shared.recount_disk();
        let writer = {
            let shared = Arc::clone(&shared);
            let closed_bytes = read.log_bytes;
            std::thread::Builder::new()
                .name("state-writer".into())
                .spawn(move || {
                    let mut writer =
                        Writer::new(shared, log, generation, closed_bytes, compact_tx, spare_tx);
                    writer.grown = grown;
                    writer.run()
                })
                .map_err(|e| StateError::io(&dir, e))?
        };
        let spare = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("state-spare".into())
                .spawn(move || spare_maker(&shared, spare_rx))
                .map_err(|e| StateError::io(&dir, e))?
        };
        let compactor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("state-compactor".into())
                .spawn(move || compactor(shared, compact_rx))
                .map_err(|e| StateError::io(&dir, e))?
        };
        let store = Arc::new(LogStore {
            shared,
            threads: Mutex::new(vec![writer, compactor, spare]),
            _lock: lock_file,
        });
        let loaded = Loaded {
            image: read.image,
            truncated_bytes: read.truncated_bytes,
            read_bytes: read.read_bytes,
            elapsed: started.elapsed(),
        };
        Ok((store, loaded))
    }
}

impl Shared {
    fn recount_disk(&self) {
        let bytes = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        match log_generation(&name) {
                            Some(g) if g == self.current.load(Ordering::Relaxed) => {
                                Some(self.current_bytes.load(Ordering::Relaxed))
                            }
                            Some(_) => Some(e.metadata().ok()?.len()),
                            None if name == SNAPSHOT => Some(e.metadata().ok()?.len()),
                            None => None,
                        }
                    })
                    .sum()
            })
            .unwrap_or(0);
        self.set_disk(bytes);
    }

    fn set_disk(&self, bytes: u64) {
        self.disk.store(bytes, Ordering::Relaxed);
        metrics().state_disk_bytes.set(bytes as i64);
        let over = self.config.max_disk > 0 && bytes > self.config.max_disk;
        if self.over_budget.swap(over, Ordering::Relaxed) != over {
            if over {
                tracing::warn!(
                    disk_bytes = bytes,
                    max_disk = self.config.max_disk,
                    "Broker state passed persistence.max_disk: QoS 1/2 messages for persistent \
                     sessions and retained messages are refused until compaction frees space."
                );
            } else {
                tracing::info!(
                    disk_bytes = bytes,
                    "Broker state is below persistence.max_disk again."
                );
            }
        }
    }

    fn add_disk(&self, bytes: u64) {
        let total = self.disk.load(Ordering::Relaxed) + bytes;
        self.set_disk(total);
    }

    fn wake_waiters(&self) {
        let waiters = std::mem::take(&mut *lock(&self.waiters));
        for waker in waiters {
            waker.wake();
        }
    }
}

impl StateStore for LogStore {
    fn append(&self, record: Record) -> Ticket {
        let mut queue = lock(&self.shared.queue);
        queue.records.push(record);
        queue.appended += 1;
        let ticket = queue.appended;
        if queue.records.len() == 1 {
            self.shared.wake.notify_one();
        }
        ticket
    }

    fn poll_durable(&self, ticket: Ticket, waker: &Waker) -> Poll<()> {
        let shared = &self.shared;
        if shared.durable.load(Ordering::Acquire) >= ticket {
            return Poll::Ready(());
        }
        let mut waiters = lock(&shared.waiters);
        // Checked again under the lock the writer takes to wake: no commit is missed.
        if shared.durable.load(Ordering::Acquire) >= ticket {
            return Poll::Ready(());
        }
        if !waiters.iter().rev().take(4).any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
        Poll::Pending
    }

    fn acks_wait(&self) -> bool {
        self.shared.config.mode == PersistenceMode::Sync
    }

    fn over_budget(&self) -> bool {
        self.shared.over_budget.load(Ordering::Relaxed)
    }

    fn next_message_id(&self) -> u64 {
        self.shared.message_ids.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn export(&self, out: &mut dyn Write) -> Result<u64, StateError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut queue = lock(&self.shared.queue);
            if queue.closing {
                return Err(StateError::Closed);
            }
            queue.rotations.push(tx);
            self.shared.wake.notify_one();
        }
        let upto = rx.recv().map_err(|_| StateError::Closed)?;
        let _folding = lock(&self.shared.folding);
        let image = fold(&self.shared.dir, upto)?;
        let mut buf = BytesMut::new();
        let mut written = 0u64;
        for record in image.records(0) {
            record.write_frame(&mut buf);
            if buf.len() >= 1 << 20 {
                out.write_all(&buf).map_err(StateError::Export)?;
                written += buf.len() as u64;
                buf.clear();
            }
        }
        out.write_all(&buf).map_err(StateError::Export)?;
        out.flush().map_err(StateError::Export)?;
        Ok(written + buf.len() as u64)
    }

    fn close(&self) {
        {
            let mut queue = lock(&self.shared.queue);
            queue.closing = true;
            self.shared.wake.notify_one();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    file: File,
    generation: u64,
    /// Bytes of this generation's log made durable (where a failed write is cut back to).
    written: u64,
    /// Bytes of closed logs not folded into the snapshot yet.
    closed_bytes: u64,
    last_sync: Option<Instant>,
    /// When the last commit (a batch written) started.
    last_commit: Option<Instant>,
    /// Compaction requests: fold every log before this generation. Dropped with the writer,
    /// which stops the compactor.
    compact: mpsc::Sender<u64>,
    /// Asks the spare thread for the next log grown ahead. Dropped with the writer.
    spare: mpsc::Sender<()>,
    /// The log being written was grown ahead.
    grown: bool,
    /// A ready spare could not be taken: no more moving to it early (see [`Writer::run`]).
    spare_failed: bool,
    /// The ticket of the last record written (durable once synced).
    committed: Ticket,
    buf: BytesMut,
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        file: File,
        generation: u64,
        closed_bytes: u64,
        compact: mpsc::Sender<u64>,
        spare: mpsc::Sender<()>,
    ) -> Self {
        Self {
            shared,
            file,
            generation,
            written: 0,
            closed_bytes,
            last_sync: None,
            last_commit: None,
            compact,
            spare,
            grown: false,
            spare_failed: false,
            committed: 0,
            buf: BytesMut::new(),
        }
    }

    fn run(mut self) {
        loop {
            let (records, upto, rotations, closing) = self.next_batch();
            if !records.is_empty() {
                self.commit(&records, upto);
            }
            drop(records);
            if !rotations.is_empty() {
                let closed = self.rotate();
                for tx in rotations {
                    let _ = tx.send(closed);
                }
            } else if self.written >= self.shared.config.segment_bytes
                || (self.shared.over_budget.load(Ordering::Relaxed) && self.written > 0)
                // A log that was not grown ahead (the first one in a new directory) gives way
                // to the spare as soon as it is ready.
                || (!closing
                    && !self.grown
                    && !self.spare_failed
                    && self.shared.spare_ready.load(Ordering::Relaxed))
            {
                self.rotate();
            }
            if closing {
                // Interval mode leaves the last records unsynced: sync them now.
                self.sync_if_needed(self.committed);
                // The next start reads the log's records, not the zeros it was grown with.
                if self.grown {
                    let _ = self.file.set_len(self.written);
                }
                return;
            }
        }
    }

    /// Waits for records (or a rotation, or the close), spacing commits by the commit window.
    fn next_batch(&mut self) -> (Vec<Record>, Ticket, Vec<mpsc::Sender<u64>>, bool) {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let mut queue = lock(&shared.queue);
        loop {
            if queue.closing || !queue.rotations.is_empty() {
                break;
            }
            if !queue.records.is_empty() {
                // One commit (write, and fsync in sync mode) per window at most: records
                // arriving meanwhile share the next.
                let due = self
                    .last_commit
                    .map_or_else(Instant::now, |last| last + config.commit_window);
                let now = Instant::now();
                if now >= due {
                    break;
                }
                queue = shared
                    .wake
                    .wait_timeout(queue, due - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            let timeout = match config.mode {
                PersistenceMode::Interval => config.sync_interval,
                _ => Duration::from_secs(1),
            };
            let (q, timed_out) = shared
                .wake
                .wait_timeout(queue, timeout)
                .unwrap_or_else(|e| e.into_inner());
            queue = q;
            if timed_out.timed_out() && config.mode == PersistenceMode::Interval {
                drop(queue);
                self.sync_if_needed(self.committed);
                queue = lock(&shared.queue);
            }
        }
        let records = std::mem::take(&mut queue.records);
        let rotations = std::mem::take(&mut queue.rotations);
        (records, queue.appended, rotations, queue.closing)
    }

    /// Writes `records` and, in sync mode, makes them durable; retries until it succeeds.
    fn commit(&mut self, records: &[Record], upto: Ticket) {
        self.last_commit = Some(Instant::now());
        self.buf.clear();
        for record in records {
            record.write_frame(&mut self.buf);
        }
        let m = metrics();
        m.state_commit_records.observe(records.len() as f64);
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.write_out() {
                Ok(()) => break,
                Err(error) => {
                    m.state_write_errors.inc();
                    if let Some(suppressed) = WRITE_FAILED_LOG.check() {
                        tracing::error!(
                            %error,
                            dir = %self.shared.dir.display(),
                            records = records.len(),
                            suppressed,
                            "Writing broker state failed; retrying. Acknowledgements wait \
                             (counted in heartwire_state_write_errors_total)."
                        );
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.shared.add_disk(self.buf.len() as u64);
        self.written += self.buf.len() as u64;
        self.shared
            .current_bytes
            .store(self.written, Ordering::Relaxed);
        self.committed = upto;
        match self.shared.config.mode {
            PersistenceMode::Sync => self.mark_durable(upto),
            // Interval mode: an fsync once the interval has passed since the last one, under
            // steady load as when idle.
            _ => {
                let due = self
                    .last_sync
                    .is_none_or(|t| t.elapsed() >= self.shared.config.sync_interval);
                if due {
                    self.sync_if_needed(upto);
                }
            }
        }
    }

    fn write_out(&mut self) -> std::io::Result<()> {
        // Over the zeros of a log grown ahead, or past its end.
        let result = self
            .file
            .write_all_at(&self.buf, self.written)
            .and_then(|()| {
                if self.shared.config.mode == PersistenceMode::Sync {
                    self.sync()
                } else {
                    Ok(())
                }
            });
        if result.is_err() {
            // What reached the file of this attempt is not trusted: cut back (the zeros ahead
            // with it) and write again.
            let _ = self.file.set_len(self.written);
        }
        result
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let started = Instant::now();
        self.last_sync = Some(started);
        let result = self.file.sync_data();
        let m = metrics();
        m.state_fsyncs.inc();
        m.state_fsync_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn mark_durable(&self, upto: Ticket) {
        self.shared.durable.store(upto, Ordering::Release);
        self.shared.wake_waiters();
    }

    /// Interval mode (and the close): fsyncs what was written since the last fsync.
    fn sync_if_needed(&mut self, upto: Ticket) {
        if self.shared.durable.load(Ordering::Acquire) >= upto {
            return;
        }
        if let Err(error) = self.sync() {
            metrics().state_write_errors.inc();
            tracing::error!(%error, "Syncing broker state failed.");
            return;
        }
        self.mark_durable(upto);
    }

    /// Closes this generation's log (synced) and opens the next; asks for a compaction when
    /// the closed logs outweigh the snapshot. Returns the first generation not closed.
    fn rotate(&mut self) -> u64 {
        self.sync_if_needed(self.committed);
        let next = self.generation + 1;
        let ready = self.shared.spare_ready.swap(false, Ordering::Relaxed);
        match new_log(&self.shared.dir, next) {
            Ok((file, grown)) => {
                if ready && !grown && !self.spare_failed {
                    // Logs still work, growing as they are written; the spare is not chased.
                    self.spare_failed = true;
                    metrics().state_write_errors.inc();
                    tracing::error!(
                        dir = %self.shared.dir.display(),
                        "The spare state log could not be taken as the next log; logs grow as \
                         they are written."
                    );
                }
                // The closed log keeps what it holds, not the zeros it was grown with (a cut
                // lost in a crash leaves zeros, which reading skips).
                if self.file.metadata().is_ok_and(|m| m.len() > self.written) {
                    let _ = self.file.set_len(self.written);
                }
                self.file = file;
                self.grown = grown;
                self.generation = next;
                self.closed_bytes += self.written;
                self.written = 0;
                self.shared.current.store(next, Ordering::Relaxed);
                self.shared.current_bytes.store(0, Ordering::Relaxed);
                let _ = self.spare.send(());
            }
            Err(error) => {
                metrics().state_write_errors.inc();
                tracing::error!(%error, "Could not start a new state log; keeping the current one.");
                return self.generation;
            }
        }
        let snapshot_bytes =
            std::fs::metadata(self.shared.dir.join(SNAPSHOT)).map_or(0, |m| m.len());
        let due = self.closed_bytes >= snapshot_bytes.max(self.shared.config.segment_bytes)
            || self.shared.over_budget.load(Ordering::Relaxed);
        if due && self.compact.send(self.generation).is_ok() {
            self.closed_bytes = 0;
        }
        self.generation
    }
}

/// Starts the log of `generation`: the spare grown ahead, renamed, when there is one (then
/// `true`), else a new empty file.
fn new_log(dir: &Path, generation: u64) -> Result<(File, bool), StateError> {
    let path = dir.join(log_name(generation));
    let grown = std::fs::rename(dir.join(SPARE), &path).is_ok();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StateError::io(&path, e))?;
    sync_dir(dir);
    Ok((file, grown))
}

/// The spare thread: at each request, makes the next log ahead of time (`spare`: zeros of
/// `persistence.segment_bytes`, synced, renamed into place) unless there is one. Gives up a
/// spare half made when the store closes.
fn spare_maker(shared: &Shared, requests: mpsc::Receiver<()>) {
    let zeros = vec![0u8; 1 << 20];
    while requests.recv().is_ok() {
        let spare = shared.dir.join(SPARE);
        if spare.exists() {
            shared.spare_ready.store(true, Ordering::Relaxed);
            continue;
        }
        let tmp = shared.dir.join(SPARE_TMP);
        let made = (|| {
            let mut file = File::create(&tmp)?;
            let mut left = shared.config.segment_bytes;
            while left > 0 {
                if lock(&shared.queue).closing {
                    return Err(std::io::Error::other("closing"));
                }
                let n = left.min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            file.sync_data()?;
            std::fs::rename(&tmp, &spare)?;
            sync_dir(&shared.dir);
            shared.spare_ready.store(true, Ordering::Relaxed);
            Ok(())
        })();
        if let Err(error) = made {
            let _ = std::fs::remove_file(&tmp);
            if lock(&shared.queue).closing {
                return;
            }
            // The next log is then made empty and grows as it is written.
            metrics().state_write_errors.inc();
            if let Some(suppressed) = WRITE_FAILED_LOG.check() {
                tracing::error!(%error, path = %tmp.display(), suppressed, "Growing the next state log ahead failed.");
            }
        }
    }
}

/// The compactor thread: folds the snapshot and the closed logs into a new snapshot.
fn compactor(shared: Arc<Shared>, requests: mpsc::Receiver<u64>) {
    while let Ok(mut upto) = requests.recv() {
        // Requests that piled up while folding: the newest covers them.
        while let Ok(later) = requests.try_recv() {
            upto = upto.max(later);
        }
        let started = Instant::now();
        let _folding = lock(&shared.folding);
        match compact(&shared.dir, upto) {
            Ok(bytes) => {
                let m = metrics();
                m.state_compactions.inc();
                m.state_compaction_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(
                    snapshot_bytes = bytes,
                    upto,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Broker state compacted."
                );
            }
            Err(error) => {
                metrics().state_write_errors.inc();
                tracing::error!(%error, "Compacting broker state failed; the logs are kept.");
            }
        }
        shared.recount_disk();
    }
}

/// Writes the state of every log before `upto` as the new snapshot and deletes those logs.
fn compact(dir: &Path, upto: u64) -> Result<u64, StateError> {
    let image = fold(dir, upto)?;
    let tmp = dir.join(SNAPSHOT_TMP);
    let mut file = File::create(&tmp).map_err(|e| StateError::io(&tmp, e))?;
    let mut buf = BytesMut::new();
    let mut bytes = 0u64;
    for record in image.records(upto) {
        record.write_frame(&mut buf);
        if buf.len() >= 1 << 20 {
            file.write_all(&buf).map_err(|e| StateError::io(&tmp, e))?;
            bytes += buf.len() as u64;
            buf.clear();
        }
    }
    file.write_all(&buf).map_err(|e| StateError::io(&tmp, e))?;
    bytes += buf.len() as u64;
    file.sync_all().map_err(|e| StateError::io(&tmp, e))?;
    drop(file);
    let snapshot = dir.join(SNAPSHOT);
    std::fs::rename(&tmp, &snapshot).map_err(|e| StateError::io(&snapshot, e))?;
    sync_dir(dir);
    for (generation, path) in logs(dir)? {
        if generation < upto {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(bytes)
}

/// The image of the snapshot and every log before `upto` (all closed).
fn fold(dir: &Path, upto: u64) -> Result<Image, StateError> {
    let read = read_files(dir, Some(upto), false)?;
    Ok(read.image)
}

/// What reading the directory found.
struct Read {
    image: Image,
    /// The generation a new log starts at.
    next_generation: u64,
    /// Bytes of logs read.
    log_bytes: u64,
    /// Bytes of all files read.
    read_bytes: u64,
    /// Bytes cut off the end of the newest log (a torn write).
    truncated_bytes: u64,
}

/// Reads the snapshot, then the logs from its generation on (before `upto` if given). With
/// `repair`, a torn end of the newest log is cut off and logs the snapshot already holds are
/// deleted.
fn read_files(dir: &Path, upto: Option<u64>, repair: bool) -> Result<Read, StateError> {
    let mut image = Image::default();
    let mut from = 0;
    let mut read_bytes = 0;
    let snapshot = dir.join(SNAPSHOT);
    match std::fs::read(&snapshot) {
        Ok(bytes) => {
            read_bytes += bytes.len() as u64;
            let mut at = 0;
            while at < bytes.len() {
                let (record, len) = Record::read_frame(&bytes[at..])
                    .map_err(|e| StateError::corrupt(&snapshot, at, e))?;
                if let Record::Header { generation, .. } = &record {
                    from = *generation;
                }
                image.apply(record);
                at += len;
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StateError::io(&snapshot, e)),
    }
    let mut logs: VecDeque<(u64, PathBuf)> = logs(dir)?.into();
    let mut next_generation = from;
    let mut log_bytes = 0;
    let mut truncated_bytes = 0;
    while let Some((generation, path)) = logs.pop_front() {
        if generation < from {
            if repair {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if upto.is_some_and(|upto| generation >= upto) {
            break;
        }
        let newest = logs.is_empty();
        let bytes = std::fs::read(&path).map_err(|e| StateError::io(&path, e))?;
        read_bytes += bytes.len() as u64;
        let mut at = 0;
        while at < bytes.len() {
            match Record::read_frame(&bytes[at..]) {
                Ok((record, len)) => {
                    image.apply(record);
                    at += len;
                }
                // The zeros a log was grown with, past its last record: cut off when
                // repairing (the log is closed from now on).
                Err(_) if bytes[at..].iter().all(|&b| b == 0) => {
                    if repair {
                        cut(&path, at as u64)?;
                    }
                    break;
                }
                Err(e)
                    if newest
                        && upto.is_none()
                        && (matches!(e, DecodeError::Truncated | DecodeError::Checksum)
                            || zero_header(&bytes[at..])) =>
                {
                    // A write the crash tore: never acknowledged, cut off.
                    truncated_bytes = (bytes.len() - at) as u64;
                    if repair {
                        cut(&path, at as u64)?;
                    }
                    break;
                }
                Err(e) => return Err(StateError::corrupt(&path, at, e)),
            }
        }
        log_bytes += at as u64;
        next_generation = generation + 1;
    }
    Ok(Read {
        image,
        next_generation,
        log_bytes,
        read_bytes,
        truncated_bytes,
    })
}

/// Cuts the log at `path` to its first `len` bytes, durably.
fn cut(path: &Path, len: u64) -> Result<(), StateError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| StateError::io(path, e))?;
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(|e| StateError::io(path, e))
}

/// Whether a frame starts with a header of zeros: where a log grown ahead was not written, or
/// a torn write left its first bytes out.
fn zero_header(frame: &[u8]) -> bool {
    frame.iter().take(FRAME_HEADER).all(|&b| b == 0)
}

/// The logs in `dir`, oldest first.
fn logs(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StateError> {
    let mut logs: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| StateError::io(dir, e))?
        .flatten()
        .filter_map(|e| Some((log_generation(&e.file_name().to_string_lossy())?, e.path())))
        .collect();
    logs.sort();
    Ok(logs)
}

/// Makes a directory's entries (a new or renamed file) durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes an export (a stream of records, as [`StateStore::export`] writes) as the state of
/// `dir`, which must hold no state: `broker restore`.
pub fn import(dir: &Path, export: &[u8]) -> Result<Image, StateError> {
    std::fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
    if std::fs::read_dir(dir)
        .map_err(|e| StateError::io(dir, e))?
        .flatten()
        .any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name == SNAPSHOT || log_generation(&name).is_some()
        })
    {
        return Err(StateError::NotEmpty(dir.to_owned()));
    }
    let mut image = Image::default();
    let mut at = 0;
    while at < export.len() {
        let (record, len) = Record::read_frame(&export[at..])
            .map_err(|e| StateError::corrupt(Path::new("export"), at, e))?;
        image.apply(record);
        at += len;
    }
    image.end_routing();
    let tmp = dir.join(SNAPSHOT_TMP);
    let mut buf = BytesMut::new();
    for record in image.records(0) {
        record.write_frame(&mut buf);
    }
    std::fs::write(&tmp, &buf)
        .and_then(|()| File::open(&tmp)?.sync_all())
        .map_err(|e| StateError::io(&tmp, e))?;
    let snapshot = dir.join(SNAPSHOT);
    std::fs::rename(&tmp, &snapshot).map_err(|e| StateError::io(&snapshot, e))?;
    sync_dir(dir);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{StoredDelivery, StoredMessage};
    use bytes::Bytes;

    fn config(dir: &Path, segment_bytes: u64) -> PersistenceConfig {
        PersistenceConfig {
            dir: dir.to_owned(),
            segment_bytes,
            commit_window: Duration::ZERO,
            ..PersistenceConfig::default()
        }
    }

    /// A session with `n` messages queued, the first half acknowledged, and a retained one.
    fn records(key: u64, n: u64) -> Vec<Record> {
        let mut out = vec![Record::Session {
            key,
            client_id: format!("c{key}").into(),
            expiry: None,
            access: None,
        }];
        for i in 0..n {
            let id = key * 1_000_000 + i + 1;
            out.push(Record::Message {
                id,
                message: StoredMessage {
                    topic: format!("t/{key}").into(),
                    payload: Bytes::from(vec![b'x'; 100]),
                    qos: 1,
                    retain: false,
                    properties: None,
                },
            });
            out.push(Record::Enqueue {
                key,
                id,
                delivery: StoredDelivery {
                    qos: 1,
                    retain: false,
                    ids: None,
                    shared: None,
                },
            });
            if i < n / 2 {
                out.push(Record::Done { key, id });
            }
        }
        out.push(Record::Retain {
            topic: format!("r/{key}").into(),
            message: None,
        });
        out
    }

    fn append_durably(store: &LogStore, records: Vec<Record>) {
        let mut last = 0;
        for r in records {
            last = store.append(r);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while store
            .poll_durable(last, std::task::Waker::noop())
            .is_pending()
        {
            assert!(Instant::now() < deadline, "never durable");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn expected(records: &[Record]) -> Image {
        let mut image = Image::default();
        for r in records {
            image.apply(r.clone());
        }
        image.end_routing();
        image
    }

    #[test]
    fn state_is_read_back_and_a_second_broker_is_locked_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = records(1, 10);
        let (store, loaded) = LogStore::open(&config(dir.path(), 1 << 20)).expect("open");
        assert_eq!(loaded.image, Image::default());
        assert!(matches!(
            LogStore::open(&config(dir.path(), 1 << 20)),
            Err(StateError::Locked(_))
        ));
        append_durably(&store, all.clone());
        drop(store);
        let (_store, loaded) = LogStore::open(&config(dir.path(), 1 << 20)).expect("reopen");
        assert_eq!(loaded.image.sessions, expected(&all).sessions);
        assert_eq!(loaded.image.messages.len(), 5);
    }

    #[test]
    fn interval_mode_syncs_every_interval_under_steady_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = PersistenceConfig {
            mode: PersistenceMode::Interval,
            sync_interval: Duration::from_millis(50),
            ..config(dir.path(), 1 << 20)
        };
        let (store, _) = LogStore::open(&cfg).expect("open");
        assert!(!store.acks_wait());
        // Records keep coming, never an idle interval: a ticket still becomes durable.
        let started = Instant::now();
        let mut ticket = None;
        while started.elapsed() < Duration::from_secs(10) {
            let t = store.append(Record::Received { key: 1, pkid: 1 });
            let first = *ticket.get_or_insert(t);
            if store
                .poll_durable(first, std::task::Waker::noop())
                .is_ready()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let first = ticket.expect("appended");
        assert!(
            store
                .poll_durable(first, std::task::Waker::noop())
                .is_ready(),
            "never synced under load"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_torn_write_at_the_end_is_cut_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = records(1, 4);
        let (store, _) = LogStore::open(&config(dir.path(), 1 << 20)).expect("open");
        append_durably(&store, all.clone());
        drop(store);
        // Half a frame after the last record, as a crash in the middle of a write leaves it
        // (over the zeros of a log grown ahead, if the writer was on the spare by then).
        let (_, newest) = logs(dir.path()).expect("logs").pop().expect("a log");
        let bytes = std::fs::read(&newest).expect("log");
        let mut written = 0;
        while let Ok((_, len)) = Record::read_frame(&bytes[written..]) {
            written += len;
        }
        let written = written as u64;
        let mut frame = BytesMut::new();
        // A key whose last bytes are not zeros: over zeros, the frame would be whole.
        Record::SessionEnd {
            key: u64::from_le_bytes([1; 8]),
        }
        .write_frame(&mut frame);
        let file = OpenOptions::new().write(true).open(&newest).expect("log");
        file.write_all_at(&frame[..frame.len() - 3], written)
            .expect("write");
        let len = file.metadata().expect("len").len();
        drop(file);
        let (store, loaded) = LogStore::open(&config(dir.path(), 1 << 20)).expect("reopen");
        assert_eq!(loaded.truncated_bytes, len - written);
        assert_eq!(std::fs::metadata(&newest).expect("log").len(), written);
        assert_eq!(loaded.image.sessions, expected(&all).sessions);
        drop(store);
        let (_store, loaded) = LogStore::open(&config(dir.path(), 1 << 20)).expect("again");
        assert_eq!(loaded.truncated_bytes, 0, "cut off for good");
    }

    /// Waits until the spare log grown ahead is ready.
    fn spare_ready(dir: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.join(SPARE).exists() {
            assert!(Instant::now() < deadline, "no spare log made");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn logs_grown_ahead_are_written_over_cut_when_closed_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment = 64 * 1024;
        // Below one segment of closed logs: no compaction in this test.
        let cfg = config(dir.path(), segment);
        let (store, _) = LogStore::open(&cfg).expect("open");
        spare_ready(dir.path());
        assert_eq!(
            std::fs::metadata(dir.path().join(SPARE))
                .expect("spare")
                .len(),
            segment
        );
        // The first log, not grown ahead, gives way to the spare at the first commit.
        let mut all = records(1, 50);
        append_durably(&store, all.clone());
        spare_ready(dir.path());
        let more = records(2, 50);
        all.extend(more.clone());
        append_durably(&store, more);
        let files = logs(dir.path()).expect("logs");
        assert_eq!(files.len(), 2, "rotated once: {files:?}");
        let (_, grown) = files.last().expect("newest").clone();
        let current = store.shared.current_bytes.load(Ordering::Relaxed);
        assert!(current > 0 && current < segment, "{current}");
        assert_eq!(
            std::fs::metadata(&grown).expect("log").len(),
            segment,
            "written over the zeros of the spare"
        );
        // The state on disk counts records, not zeros.
        let first = std::fs::metadata(&files[0].1).expect("log").len();
        assert_eq!(store.shared.disk.load(Ordering::Relaxed), first + current);
        // Closed (here by an export's rotation), the grown log keeps its records only.
        store.export(&mut Vec::new()).expect("export");
        assert_eq!(std::fs::metadata(&grown).expect("log").len(), current);
        let newest = logs(dir.path()).expect("logs").pop().expect("a log").1;
        drop(store);

        // Read back; the newest log, which holds no record, is cut to nothing.
        let (store, loaded) = LogStore::open(&cfg).expect("reopen");
        assert_eq!(loaded.image.sessions, expected(&all).sessions);
        assert_eq!(loaded.truncated_bytes, 0, "zeros are not a torn write");
        assert_eq!(std::fs::metadata(newest).expect("newest").len(), 0);
        // Records written over a spare after the reopen, then a write torn over its zeros:
        // the header never landed, bytes after it did.
        spare_ready(dir.path());
        let more = records(6, 10);
        all.extend(more.clone());
        drop(store);
        let (store, _) = LogStore::open(&cfg).expect("open a log grown ahead");
        append_durably(&store, more);
        let written = store.shared.current_bytes.load(Ordering::Relaxed);
        drop(store);
        let (_, grown) = logs(dir.path()).expect("logs").pop().expect("a log");
        let file = OpenOptions::new().write(true).open(&grown).expect("log");
        assert_eq!(
            file.metadata().expect("len").len(),
            written,
            "a clean close cuts the zeros off"
        );
        // As a crash leaves it: the zeros still there.
        file.set_len(segment).expect("grow");
        file.write_all_at(b"torn", written + 100).expect("write");
        drop(file);
        let (_store, loaded) = LogStore::open(&cfg).expect("reopen after a torn write");
        assert_eq!(loaded.truncated_bytes, segment - written);
        assert_eq!(loaded.image.sessions, expected(&all).sessions);
        assert_eq!(std::fs::metadata(&grown).expect("log").len(), written);
    }

    #[test]
    fn compaction_folds_closed_logs_into_a_snapshot_that_reads_back_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Small logs: many rotations and compactions.
        let cfg = config(dir.path(), 16 * 1024);
        let (store, _) = LogStore::open(&cfg).expect("open");
        let mut all = Vec::new();
        for key in 1..=40 {
            let r = records(key, 20);
            all.extend(r.clone());
            append_durably(&store, r);
        }
        // Sessions that end leave nothing behind.
        for key in 1..=10 {
            all.push(Record::SessionEnd { key });
            append_durably(&store, vec![Record::SessionEnd { key }]);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.path().join(SNAPSHOT).exists() {
            assert!(Instant::now() < deadline, "no snapshot written");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(store);
        let (store, loaded) = LogStore::open(&cfg).expect("reopen");
        let want = expected(&all);
        assert_eq!(loaded.image.sessions, want.sessions);
        assert_eq!(loaded.image.messages, want.messages);
        assert!(
            logs(dir.path()).expect("logs").len() < 40,
            "closed logs were deleted"
        );

        // An export reads back as the same state, in an empty directory.
        let mut export = Vec::new();
        store.export(&mut export).expect("export");
        let copy = tempfile::tempdir().expect("tempdir");
        let imported = import(copy.path(), &export).expect("import");
        assert_eq!(imported.sessions, want.sessions);
        assert!(matches!(
            import(copy.path(), &export),
            Err(StateError::NotEmpty(_))
        ));
        let (_copy, loaded) = LogStore::open(&config(copy.path(), 1 << 20)).expect("open copy");
        assert_eq!(loaded.image.sessions, want.sessions);
    }
}
