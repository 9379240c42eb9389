//! Storage-engine bench for an MQTT broker's durable state.
//! Usage: engine-bench <log|redb|fjall|sqlite> <commit64|commit1|bulk|delete> <datadir> [secs]
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- record
// Encoded record is exactly 150 bytes: key 16 (session, msgid, big endian) + value 134.
pub const TOPIC: usize = 30;
pub const PAYLOAD: usize = 64;
pub const VAL_LEN: usize = 134; // topic 30 + payload 64 + flags 4 + props 36
pub const REC_LEN: usize = 16 + VAL_LEN;

#[derive(Clone)]
pub struct Record {
    pub session: u64,
    pub msgid: u64,
    pub topic: [u8; TOPIC],
    pub payload: [u8; PAYLOAD],
    pub flags: u32,
    pub props: [u8; 36], // expiry, receive time, packet id, ...
}

impl Record {
    fn make(session: u64, msgid: u64) -> Record {
        let mut topic = [b'_'; TOPIC];
        let t = format!("dev/{:010}/tele/temp", session);
        topic[..t.len().min(TOPIC)].copy_from_slice(&t.as_bytes()[..t.len().min(TOPIC)]);
        let mut payload = [0u8; PAYLOAD];
        let mut x = session.wrapping_mul(0x9E3779B97F4A7C15) ^ msgid.wrapping_add(0x1234567) | 1;
        for c in payload.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        let mut props = [0u8; 36];
        props[..8].copy_from_slice(&(1_700_000_000u64 + msgid).to_le_bytes());
        Record { session, msgid, topic, payload, flags: 0x1 | ((msgid as u32 & 1) << 3), props }
    }
    fn key(&self) -> [u8; 16] {
        key_bytes(self.session, self.msgid)
    }
    fn value(&self) -> [u8; VAL_LEN] {
        let mut v = [0u8; VAL_LEN];
        v[..30].copy_from_slice(&self.topic);
        v[30..94].copy_from_slice(&self.payload);
        v[94..98].copy_from_slice(&self.flags.to_le_bytes());
        v[98..].copy_from_slice(&self.props);
        v
    }
    fn decode(key: &[u8], v: &[u8]) -> Record {
        assert_eq!(v.len(), VAL_LEN);
        let (session, msgid) = parse_key(key);
        Record {
            session,
            msgid,
            topic: v[..30].try_into().unwrap(),
            payload: v[30..94].try_into().unwrap(),
            flags: u32::from_le_bytes(v[94..98].try_into().unwrap()),
            props: v[98..].try_into().unwrap(),
        }
    }
}
fn key_bytes(s: u64, m: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&s.to_be_bytes());
    k[8..].copy_from_slice(&m.to_be_bytes());
    k
}
fn parse_key(k: &[u8]) -> (u64, u64) {
    (u64::from_be_bytes(k[..8].try_into().unwrap()), u64::from_be_bytes(k[8..16].try_into().unwrap()))
}

pub enum Op {
    Put(Record),
    Del(u64, u64),
}

pub type State = HashMap<u64, Vec<Record>>;

// ---------------------------------------------------------------- engine trait
pub trait Engine: Send {
    /// Apply all ops atomically and make them durable (exactly one durable commit).
    fn commit(&mut self, ops: &[Op]);
    /// Force space reclamation.
    fn reclaim(&mut self);
    fn close(self: Box<Self>);
}

fn open_engine(kind: &str, dir: &Path) -> Box<dyn Engine> {
    fs::create_dir_all(dir).unwrap();
    match kind {
        "log" => Box::new(LogEngine::open(dir)),
        "logpre" => Box::new(PreLogEngine::open(dir)),
        "redb" => Box::new(RedbEngine::open(dir)),
        "fjall" => Box::new(FjallEngine::open(dir)),
        "sqlite" => Box::new(SqliteEngine::open(dir)),
        _ => panic!("unknown engine"),
    }
}

fn load_all(kind: &str, dir: &Path) -> State {
    match kind {
        "log" | "logpre" => LogEngine::load(dir),
        "redb" => RedbEngine::load(dir),
        "fjall" => FjallEngine::load(dir),
        "sqlite" => SqliteEngine::load(dir),
        _ => panic!(),
    }
}

fn push(st: &mut State, r: Record) {
    st.entry(r.session).or_default().push(r);
}

// ---------------------------------------------------------------- 1. append-only log
pub struct LogEngine {
    dir: PathBuf,
    f: File,
    buf: Vec<u8>,
}
const LOG_PUT: u8 = 1;
const LOG_DEL: u8 = 2;
impl LogEngine {
    fn open(dir: &Path) -> Self {
        let f = OpenOptions::new().create(true).append(true).open(dir.join("records.log")).unwrap();
        // make the file's directory entry durable once
        File::open(dir).unwrap().sync_all().unwrap();
        LogEngine { dir: dir.to_path_buf(), f, buf: Vec::with_capacity(1 << 20) }
    }
    fn frame(buf: &mut Vec<u8>, body: &[u8]) {
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        buf.extend_from_slice(body);
    }
    fn encode(buf: &mut Vec<u8>, op: &Op) {
        let mut body = [0u8; 1 + REC_LEN];
        match op {
            Op::Put(r) => {
                body[0] = LOG_PUT;
                body[1..17].copy_from_slice(&r.key());
                body[17..].copy_from_slice(&r.value());
                Self::frame(buf, &body);
            }
            Op::Del(s, m) => {
                body[0] = LOG_DEL;
                body[1..17].copy_from_slice(&key_bytes(*s, *m));
                Self::frame(buf, &body[..17]);
            }
        }
    }
    fn load(dir: &Path) -> State {
        let mut data = Vec::new();
        File::open(dir.join("records.log")).unwrap().read_to_end(&mut data).unwrap();
        let mut st: State = HashMap::new();
        let mut dels: Vec<(u64, u64)> = Vec::new();
        let mut p = 0;
        while p + 8 <= data.len() {
            let len = u32::from_le_bytes(data[p..p + 4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap());
            if p + 8 + len > data.len() {
                break; // torn tail
            }
            if len == 0 {
                break; // zero-filled preallocated tail
            }
            let body = &data[p + 8..p + 8 + len];
            if crc32fast::hash(body) != crc {
                break;
            }
            match body[0] {
                LOG_PUT => push(&mut st, Record::decode(&body[1..17], &body[17..])),
                LOG_DEL => dels.push(parse_key(&body[1..17])),
                _ => break,
            }
            p += 8 + len;
        }
        // apply tombstones (msgids are unique, so order put<del is implied)
        if !dels.is_empty() {
            let mut by_sess: HashMap<u64, Vec<u64>> = HashMap::new();
            for (s, m) in dels {
                by_sess.entry(s).or_default().push(m);
            }
            for (s, ms) in by_sess {
                if let Some(v) = st.get_mut(&s) {
                    v.retain(|r| !ms.contains(&r.msgid));
                    if v.is_empty() {
                        st.remove(&s);
                    }
                }
            }
        }
        st
    }
}
impl Engine for LogEngine {
    fn commit(&mut self, ops: &[Op]) {
        self.buf.clear();
        for op in ops {
            Self::encode(&mut self.buf, op);
        }
        self.f.write_all(&self.buf).unwrap();
        self.f.sync_data().unwrap();
    }
    fn reclaim(&mut self) {
        // Offline compaction: load live set, rewrite to tmp, fsync, rename, fsync dir.
        let st = Self::load(&self.dir);
        let tmp = self.dir.join("records.log.tmp");
        let mut out = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp).unwrap());
        let mut buf = Vec::new();
        for v in st.values() {
            for r in v {
                buf.clear();
                Self::encode(&mut buf, &Op::Put(r.clone()));
                out.write_all(&buf).unwrap();
            }
        }
        let f = out.into_inner().unwrap();
        f.sync_all().unwrap();
        fs::rename(&tmp, self.dir.join("records.log")).unwrap();
        File::open(&self.dir).unwrap().sync_all().unwrap();
        self.f = OpenOptions::new().append(true).open(self.dir.join("records.log")).unwrap();
    }
    fn close(self: Box<Self>) {}
}

// ---------------------------------------------------------------- 1b. log with zero-filled preallocation
/// Same framing as LogEngine, but the file is extended in 64 MiB zero-filled chunks (written + fsync'd
/// once), so each commit is pwrite + fdatasync into already-allocated blocks with unchanged i_size.
pub struct PreLogEngine {
    f: File,
    off: u64,
    cap: u64,
    buf: Vec<u8>,
}
const PRE_CHUNK: u64 = 64 << 20;
impl PreLogEngine {
    fn open(dir: &Path) -> Self {
        // bench only: always starts with a fresh file (recovery would scan to the first len==0 frame)
        let f = OpenOptions::new().create(true).read(true).write(true).truncate(true).open(dir.join("records.log")).unwrap();
        File::open(dir).unwrap().sync_all().unwrap();
        let mut e = PreLogEngine { f, off: 0, cap: 0, buf: Vec::with_capacity(1 << 20) };
        e.grow(PRE_CHUNK);
        e
    }
    fn grow(&mut self, need: u64) {
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; 1 << 20];
        while self.cap < need {
            self.f.write_all_at(&zeros, self.cap).unwrap();
            self.cap += zeros.len() as u64;
        }
        self.f.sync_all().unwrap();
    }
}
impl Engine for PreLogEngine {
    fn commit(&mut self, ops: &[Op]) {
        use std::os::unix::fs::FileExt;
        self.buf.clear();
        for op in ops {
            LogEngine::encode(&mut self.buf, op);
        }
        let end = self.off + self.buf.len() as u64;
        if end > self.cap {
            let c = end.div_ceil(PRE_CHUNK) * PRE_CHUNK;
            self.grow(c);
        }
        self.f.write_all_at(&self.buf, self.off).unwrap();
        self.f.sync_data().unwrap();
        self.off = end;
    }
    fn reclaim(&mut self) {}
    fn close(self: Box<Self>) {}
}

// ---------------------------------------------------------------- 2. redb
const RTABLE: redb::TableDefinition<(u64, u64), &[u8]> = redb::TableDefinition::new("msgs");
pub struct RedbEngine {
    db: redb::Database,
}
impl RedbEngine {
    fn open(dir: &Path) -> Self {
        let db = redb::Database::create(dir.join("db.redb")).unwrap();
        RedbEngine { db }
    }
    fn load(dir: &Path) -> State {
        use redb::{ReadableDatabase, ReadableTable};
        let db = redb::Database::create(dir.join("db.redb")).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(RTABLE).unwrap();
        let mut st: State = HashMap::new();
        for item in t.iter().unwrap() {
            let (k, v) = item.unwrap();
            let (s, m) = k.value();
            push(&mut st, Record::decode(&key_bytes(s, m), v.value()));
        }
        st
    }
}
impl Engine for RedbEngine {
    fn commit(&mut self, ops: &[Op]) {
        let tx = self.db.begin_write().unwrap(); // default durability: Immediate
        {
            let mut t = tx.open_table(RTABLE).unwrap();
            for op in ops {
                match op {
                    Op::Put(r) => {
                        t.insert((r.session, r.msgid), &r.value()[..]).unwrap();
                    }
                    Op::Del(s, m) => {
                        t.remove((*s, *m)).unwrap();
                    }
                }
            }
        }
        tx.commit().unwrap();
    }
    fn reclaim(&mut self) {
        while self.db.compact().unwrap() {}
    }
    fn close(self: Box<Self>) {
        drop(self.db);
    }
}

// ---------------------------------------------------------------- 3. fjall
pub struct FjallEngine {
    db: fjall::Database,
    ks: fjall::Keyspace,
}
impl FjallEngine {
    fn open(dir: &Path) -> Self {
        let db = fjall::Database::builder(dir).open().unwrap();
        let ks = db.keyspace("msgs", fjall::KeyspaceCreateOptions::default).unwrap();
        FjallEngine { db, ks }
    }
    fn load(dir: &Path) -> State {
        let e = Self::open(dir);
        let mut st: State = HashMap::new();
        for g in e.ks.iter() {
            let (k, v) = g.into_inner().unwrap();
            push(&mut st, Record::decode(&k, &v));
        }
        st
    }
}
impl Engine for FjallEngine {
    fn commit(&mut self, ops: &[Op]) {
        let mut b = self.db.batch().durability(Some(fjall::PersistMode::SyncAll));
        for op in ops {
            match op {
                Op::Put(r) => b.insert(&self.ks, r.key(), r.value()),
                Op::Del(s, m) => b.remove(&self.ks, key_bytes(*s, *m)),
            }
        }
        b.commit().unwrap();
    }
    fn reclaim(&mut self) {
        self.ks.rotate_memtable_and_wait().unwrap();
        self.ks.major_compact().unwrap();
        // let journals whose data is flushed get deleted
        self.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    fn close(self: Box<Self>) {
        self.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
}

// ---------------------------------------------------------------- 4. sqlite
pub struct SqliteEngine {
    c: rusqlite::Connection,
}
impl SqliteEngine {
    fn open(dir: &Path) -> Self {
        let c = rusqlite::Connection::open(dir.join("db.sqlite")).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "FULL").unwrap();
        c.execute_batch(
            "CREATE TABLE IF NOT EXISTS msgs(session INTEGER NOT NULL, msgid INTEGER NOT NULL, \
             data BLOB NOT NULL, PRIMARY KEY(session, msgid)) WITHOUT ROWID;",
        )
        .unwrap();
        SqliteEngine { c }
    }
    fn load(dir: &Path) -> State {
        let e = Self::open(dir);
        let mut st: State = HashMap::new();
        let mut q = e.c.prepare("SELECT session, msgid, data FROM msgs").unwrap();
        let mut rows = q.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let s: i64 = row.get(0).unwrap();
            let m: i64 = row.get(1).unwrap();
            let d = row.get_ref(2).unwrap().as_blob().unwrap();
            push(&mut st, Record::decode(&key_bytes(s as u64, m as u64), d));
        }
        st
    }
}
impl Engine for SqliteEngine {
    fn commit(&mut self, ops: &[Op]) {
        let tx = self.c.transaction().unwrap();
        {
            let mut ins = tx.prepare_cached("INSERT INTO msgs(session,msgid,data) VALUES(?1,?2,?3)").unwrap();
            let mut del = tx.prepare_cached("DELETE FROM msgs WHERE session=?1 AND msgid=?2").unwrap();
            for op in ops {
                match op {
                    Op::Put(r) => {
                        ins.execute(rusqlite::params![r.session as i64, r.msgid as i64, &r.value()[..]]).unwrap();
                    }
                    Op::Del(s, m) => {
                        del.execute(rusqlite::params![*s as i64, *m as i64]).unwrap();
                    }
                }
            }
        }
        tx.commit().unwrap();
    }
    fn reclaim(&mut self) {
        self.c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM; PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    }
    fn close(self: Box<Self>) {
        drop(self.c); // last connection close checkpoints + removes WAL
    }
}

// ---------------------------------------------------------------- helpers
fn dir_size(dir: &Path) -> (u64, u64, usize) {
    use std::os::unix::fs::MetadataExt;
    let (mut apparent, mut alloc, mut n) = (0, 0, 0);
    for e in walk(dir) {
        let md = fs::metadata(&e).unwrap();
        apparent += md.len();
        alloc += md.blocks() * 512;
        n += 1;
    }
    (apparent, alloc, n)
}
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
/// Evict our own data files from the page cache (POSIX_FADV_DONTNEED) for a cold-ish reopen.
fn evict(dir: &Path) {
    use std::os::fd::AsRawFd;
    for p in walk(dir) {
        if let Ok(f) = File::open(&p) {
            let _ = f.sync_all();
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}
fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}
fn count(st: &State) -> usize {
    st.values().map(|v| v.len()).sum()
}

// ---------------------------------------------------------------- group-commit harness
struct Req {
    op: Op,
    done: SyncSender<()>,
}

fn writer_loop(mut eng: Box<dyn Engine>, rx: Receiver<Req>) -> (Box<dyn Engine>, u64, u64) {
    let mut commits = 0u64;
    let mut recs = 0u64;
    let mut reqs: Vec<Req> = Vec::with_capacity(1024);
    let mut ops: Vec<Op> = Vec::with_capacity(1024);
    while let Ok(first) = rx.recv() {
        reqs.push(first);
        while let Ok(r) = rx.try_recv() {
            reqs.push(r);
        }
        let dones: Vec<SyncSender<()>> = reqs
            .drain(..)
            .map(|r| {
                ops.push(r.op);
                r.done
            })
            .collect();
        eng.commit(&ops);
        commits += 1;
        recs += ops.len() as u64;
        ops.clear();
        for d in dones {
            let _ = d.send(());
        }
    }
    (eng, commits, recs)
}

fn commit_bench(kind: &str, dir: &Path, producers: usize, secs: u64) {
    let eng = open_engine(kind, dir);
    let (tx, rx) = channel::<Req>();
    let writer = std::thread::spawn(move || writer_loop(eng, rx));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut hs = vec![];
    for p in 0..producers {
        let tx = tx.clone();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || {
            let (dtx, drx) = sync_channel::<()>(1);
            let mut lat = Vec::with_capacity(100_000);
            let session = 1_000_000 + p as u64;
            let mut msgid = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = Record::make(session, msgid);
                msgid += 1;
                let t = Instant::now();
                tx.send(Req { op: Op::Put(r), done: dtx.clone() }).unwrap();
                drx.recv().unwrap();
                lat.push(t.elapsed().as_micros() as u32);
            }
            lat
        }));
    }
    drop(tx);
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut lat: Vec<u32> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let el = start.elapsed().as_secs_f64();
    let (eng, commits, recs) = writer.join().unwrap();
    eng.close();
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)] as f64 / 1000.0;
    println!(
        "RESULT engine={kind} test=commit producers={producers} secs={el:.1} recs={recs} recs_per_s={:.0} commits_per_s={:.0} avg_batch={:.1} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        recs as f64 / el,
        commits as f64 / el,
        recs as f64 / commits as f64,
        pct(0.5),
        pct(0.99),
        *lat.last().unwrap() as f64 / 1000.0
    );
}

const SESSIONS: u64 = 100_000;
const MSGS: u64 = 10;
const BATCH: usize = 10_000;

fn bulk_bench(kind: &str, dir: &Path) {
    let _ = fs::remove_dir_all(dir);
    let t = Instant::now();
    let mut eng = open_engine(kind, dir);
    let mut ops = Vec::with_capacity(BATCH);
    // insertion order: message-major (like real traffic: every session gets msg 0, then msg 1 ...)
    for m in 0..MSGS {
        for s in 0..SESSIONS {
            ops.push(Op::Put(Record::make(s, m)));
            if ops.len() == BATCH {
                eng.commit(&ops);
                ops.clear();
            }
        }
    }
    if !ops.is_empty() {
        eng.commit(&ops);
    }
    let ins = t.elapsed().as_secs_f64();
    let t = Instant::now();
    eng.close();
    let close = t.elapsed().as_secs_f64();
    let (a, al, n) = dir_size(dir);
    evict(dir);
    let t = Instant::now();
    let st = load_all(kind, dir);
    let cold = t.elapsed().as_secs_f64();
    let c1 = count(&st);
    assert_eq!(c1 as u64, SESSIONS * MSGS);
    assert_eq!(st.len() as u64, SESSIONS);
    drop(st);
    let t = Instant::now();
    let st = load_all(kind, dir);
    let warm = t.elapsed().as_secs_f64();
    assert_eq!(count(&st) as u64, SESSIONS * MSGS);
    drop(st);
    println!(
        "RESULT engine={kind} test=bulk insert_s={ins:.2} close_s={close:.2} load_cold_s={cold:.2} load_warm_s={warm:.2} disk_mb={:.1} alloc_mb={:.1} files={n}",
        mb(a),
        mb(al)
    );
}

/// Runs on the data left by bulk: delete 90% (msgids 0..9 of every session, i.e. the oldest 9 of 10),
/// committed durably in batches of 10k, then force reclamation.
fn delete_bench(kind: &str, dir: &Path) {
    let (a0, _, _) = dir_size(dir);
    let mut eng = open_engine(kind, dir);
    let t = Instant::now();
    let mut ops = Vec::with_capacity(BATCH);
    for m in 0..9 {
        for s in 0..SESSIONS {
            ops.push(Op::Del(s, m));
            if ops.len() == BATCH {
                eng.commit(&ops);
                ops.clear();
            }
        }
    }
    if !ops.is_empty() {
        eng.commit(&ops);
    }
    let del_s = t.elapsed().as_secs_f64();
    // let background work (fjall flush/compaction) happen for a moment
    std::thread::sleep(Duration::from_secs(2));
    let (a1, al1, n1) = dir_size(dir);
    let t = Instant::now();
    eng.reclaim();
    let rec_s = t.elapsed().as_secs_f64();
    eng.close();
    let (a2, al2, n2) = dir_size(dir);
    evict(dir);
    let t = Instant::now();
    let st = load_all(kind, dir);
    let load = t.elapsed().as_secs_f64();
    assert_eq!(count(&st) as u64, SESSIONS);
    let (a3, _, _) = dir_size(dir);
    println!(
        "RESULT engine={kind} test=delete before_mb={:.1} delete_s={del_s:.2} after_delete_mb={:.1} (alloc {:.1}, files {n1}) reclaim_s={rec_s:.2} after_reclaim_mb={:.1} (alloc {:.1}, files {n2}) load_after_s={load:.2} after_reopen_mb={:.1}",
        mb(a0),
        mb(a1),
        mb(al1),
        mb(a2),
        mb(al2),
        mb(a3)
    );
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let kind = a[1].as_str();
    let test = a[2].as_str();
    let dir = PathBuf::from(&a[3]);
    let secs: u64 = a.get(4).map(|s| s.parse().unwrap()).unwrap_or(10);
    match test {
        "commit64" | "commit1" => {
            let _ = fs::remove_dir_all(&dir);
            let n = if test == "commit64" { 64 } else { 1 };
            commit_bench(kind, &dir, n, secs);
        }
        "bulk" => bulk_bench(kind, &dir),
        "delete" => delete_bench(kind, &dir),
        _ => panic!("unknown test"),
    }
}
