//! A real, private PostgreSQL for tests.
//!
//! [`TestPostgres::start`] gives each caller a fresh, empty database:
//!
//! * If `TEST_DATABASE_URL` is set, a uniquely named database (`hw_test_<random>`) is created in
//!   that server (the user needs CREATEDB) and dropped again on `Drop` (best effort).
//! * Otherwise a throwaway cluster is started from the local PostgreSQL binaries (`initdb`,
//!   `pg_ctl`, `postgres` on `PATH`, else `/usr/lib/postgresql/<highest version>/bin`). `initdb`
//!   runs once per machine into a cached template directory
//!   (`<base>/heartwire-pg-template-<major>-u<uid>-v<n>`, built elsewhere and renamed into place
//!   atomically, so concurrent test processes never see a half-built one); each cluster is a copy
//!   of it (`<base>/heartwire-pg-<pid>-<random>/data`), listening on 127.0.0.1 only, on a free
//!   port outside the kernel's ephemeral range ([`free_port`](crate::free_port)), with
//!   trust authentication, `fsync = off` and its unix socket inside its data directory. The
//!   database is `hw_test`, user `postgres`. As root, the server binaries run as the `postgres`
//!   OS user (PostgreSQL refuses to run as root). `<base>` is /dev/shm when it has 1 GiB free,
//!   else `std::env::temp_dir()`.
//! * Otherwise it panics, saying how to provide one.
//!
//! The private cluster is stopped (`pg_ctl stop -m immediate`) and its directory removed when the
//! `TestPostgres` is dropped, also while unwinding from a panic. A watchdog process, in its own
//! process group so that nextest's kill of a timed-out test does not reach it, does the same if
//! the test process dies without running `Drop` (SIGKILL, `process::exit`, abort).
//!
//! Every wait is bounded; none uses the tokio clock, so `start_paused` tests work too.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

use crate::random_u64;

/// Environment variable naming an existing server to create test databases in.
pub const ENV_URL: &str = "TEST_DATABASE_URL";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const INITDB_TIMEOUT: Duration = Duration::from_secs(50);
const SQL_TIMEOUT: Duration = Duration::from_secs(10);
/// Database baked into the template, so a private cluster needs no CREATE DATABASE.
const DB_NAME: &str = "hw_test";
/// Bump when the template's contents or settings change, so stale caches are not reused.
const TEMPLATE_FORMAT: u32 = 1;
const TEMPLATE_MARKER: &str = "heartwire-template-complete";
/// Per-cluster settings (port, socket directory), included from the template's postgresql.conf.
const CLUSTER_CONF: &str = "heartwire-test.conf";

const TEMPLATE_CONF: &str = "
# --- heartwire test harness ---
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
shared_buffers = 16MB
huge_pages = off
logging_collector = off
include_if_exists = 'heartwire-test.conf'
";

/// Waits for stdin to close (our process ended, however it ended), then stops and deletes the
/// cluster. After a normal Drop there is nothing left to do and it exits at once.
const WATCHDOG: &str = r#"trap '' HUP INT; cat >/dev/null 2>&1; "$0" stop -D "$1" -m immediate -w -t 10 >/dev/null 2>&1; rm -rf "$2""#;

const HOW_TO: &str = "set TEST_DATABASE_URL=postgres://USER:PASSWORD@HOST:PORT/DB (USER needs \
                      CREATEDB), or install the PostgreSQL server binaries so a private server can \
                      be started (Debian/Ubuntu: `apt-get install postgresql`)";

/// A fresh, empty database for one test; see the module documentation.
pub struct TestPostgres {
    url: String,
    backend: Backend,
}

enum Backend {
    #[expect(dead_code, reason = "held for its Drop, which drops the database")]
    External(ExternalDb),
    Private(Cluster),
}

impl TestPostgres {
    /// A fresh, empty database. Panics, saying how to provide PostgreSQL, if there is none.
    pub async fn start() -> TestPostgres {
        match std::env::var(ENV_URL) {
            Ok(url) if !url.trim().is_empty() => {
                let url = url.trim().to_owned();
                match off_runtime(move || ExternalDb::create(&url)).await {
                    Ok((url, db)) => TestPostgres {
                        url,
                        backend: Backend::External(db),
                    },
                    Err(e) => panic!("test PostgreSQL: {ENV_URL} is set, but {e}"),
                }
            }
            _ => match off_runtime(Cluster::start).await {
                Ok(cluster) => TestPostgres {
                    url: cluster.url(),
                    backend: Backend::Private(cluster),
                },
                Err(e) => panic!("test PostgreSQL: {e}"),
            },
        }
    }

    /// Connection URL of the test database (`postgres://...`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether [`stop_server`](Self::stop_server) / [`start_server`](Self::start_server) work:
    /// true for a private cluster, false with `TEST_DATABASE_URL` (someone else's server).
    pub fn controls_server(&self) -> bool {
        matches!(self.backend, Backend::Private(_))
    }

    /// Data directory of the private cluster (`None` with `TEST_DATABASE_URL`).
    pub fn data_dir(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Private(c) => Some(&c.data),
            Backend::External(_) => None,
        }
    }

    /// Stops the private server (fast shutdown: sessions are terminated, new connections are
    /// refused), to simulate a database outage. Errors with [`io::ErrorKind::Unsupported`] when
    /// using `TEST_DATABASE_URL` (callers may skip the outage part then), or if stopping fails
    /// (e.g. it is already stopped).
    pub async fn stop_server(&self) -> io::Result<()> {
        let ctl = self.ctl()?;
        off_runtime(move || ctl.stop("fast"))
            .await
            .map_err(io::Error::other)
    }

    /// Starts the private server again on the same port (so [`url`](Self::url) stays valid).
    /// Errors like [`stop_server`](Self::stop_server), or if it fails to start (e.g. it is
    /// already running, or another process took the port meanwhile).
    pub async fn start_server(&self) -> io::Result<()> {
        let ctl = self.ctl()?;
        off_runtime(move || match ctl.start() {
            Ok(()) => Ok(()),
            Err(StartError::PortInUse(e)) | Err(StartError::Other(e)) => Err(e),
        })
        .await
        .map_err(io::Error::other)
    }

    fn ctl(&self) -> io::Result<Ctl> {
        match &self.backend {
            Backend::Private(c) => Ok(c.ctl.clone()),
            Backend::External(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the server behind {ENV_URL} is not ours to stop or start"),
            )),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// TEST_DATABASE_URL

struct ExternalDb {
    admin_url: String,
    name: String,
}

impl ExternalDb {
    fn create(admin_url: &str) -> Result<(String, ExternalDb), String> {
        let name = format!("hw_test_{:016x}", random_u64());
        block_on_own_runtime(async {
            let mut conn = admin_connect(admin_url).await?;
            let sql = format!("CREATE DATABASE \"{name}\"");
            let created = tokio::time::timeout(SQL_TIMEOUT, sqlx::raw_sql(&sql).execute(&mut conn))
                .await
                .map_err(|_| format!("`{sql}` timed out after {SQL_TIMEOUT:?}"))
                .and_then(|r| {
                    r.map_err(|e| format!("`{sql}` failed (the user needs CREATEDB): {e}"))
                });
            let _ = conn.close().await;
            created.map(|_| ())
        })?;
        let url = with_database(admin_url, &name);
        Ok((
            url,
            ExternalDb {
                admin_url: admin_url.to_owned(),
                name,
            },
        ))
    }
}

impl Drop for ExternalDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Own thread and runtime: Drop may run inside the test's runtime, which we cannot block on.
        let dropper = std::thread::spawn(move || {
            let _ = block_on_own_runtime(async {
                let mut conn = admin_connect(&admin_url).await?;
                for sql in [
                    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
                    format!("DROP DATABASE IF EXISTS \"{name}\""), // before PostgreSQL 13
                ] {
                    let r =
                        tokio::time::timeout(SQL_TIMEOUT, sqlx::raw_sql(&sql).execute(&mut conn))
                            .await;
                    if matches!(r, Ok(Ok(_))) {
                        break;
                    }
                }
                let _ = conn.close().await;
                Ok::<(), String>(())
            });
        });
        let _ = dropper.join();
    }
}

async fn admin_connect(url: &str) -> Result<PgConnection, String> {
    let opts =
        PgConnectOptions::from_str(url).map_err(|e| format!("it is not a valid URL: {e}"))?;
    let first = match tokio::time::timeout(SQL_TIMEOUT, PgConnection::connect_with(&opts)).await {
        Ok(Ok(conn)) => return Ok(conn),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("timed out after {SQL_TIMEOUT:?}"),
    };
    // The URL may name no database or one that does not exist; `postgres` usually does.
    match tokio::time::timeout(
        SQL_TIMEOUT,
        PgConnection::connect_with(&opts.database("postgres")),
    )
    .await
    {
        Ok(Ok(conn)) => Ok(conn),
        _ => Err(format!("connecting to it failed: {first}")),
    }
}

/// `url` with its database (path) replaced by `db`, keeping any `?query`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let userinfo_end = base[authority..]
        .rfind('@')
        .map_or(authority, |i| authority + i);
    let path = base[userinfo_end..]
        .find('/')
        .map_or(base.len(), |i| userinfo_end + i);
    format!("{}/{db}{query}", &base[..path])
}

fn block_on_own_runtime<T>(
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a tokio runtime: {e}"))?
        .block_on(f)
}

// ------------------------------------------------------------------------------------------------
// Private cluster

struct PgBins {
    dir: PathBuf,
    major: u32,
}

impl PgBins {
    fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// What a cluster needs to be stopped and started; cheap to clone into a worker thread.
#[derive(Clone)]
struct Ctl {
    pg_ctl: PathBuf,
    /// uid/gid to run server binaries as (`None`: as ourselves).
    user: Option<(u32, u32)>,
    data: PathBuf,
    log: PathBuf,
}

struct Cluster {
    ctl: Ctl,
    root: PathBuf,
    data: PathBuf,
    port: u16,
    watchdog: Option<Child>,
}

enum StartError {
    PortInUse(String),
    Other(String),
}

impl Cluster {
    fn start() -> Result<Cluster, String> {
        let bins = pg_bins()?;
        let user = server_user()?;
        let template = template(bins, user)?;

        let root = base_dir().join(format!(
            "heartwire-pg-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        let data = root.join("data");
        fs::create_dir(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let mut cluster = Cluster {
            ctl: Ctl {
                pg_ctl: bins.bin("pg_ctl"),
                user,
                data: data.clone(),
                log: root.join("server.log"),
            },
            root: root.clone(),
            data: data.clone(),
            port: 0,
            watchdog: None,
        };
        // From here on, dropping `cluster` cleans up.
        let prepare = || -> io::Result<()> {
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))?;
            chown(&root, user)?;
            copy_tree(&template, &data, user)
        };
        prepare().map_err(|e| {
            format!(
                "cannot copy the template {} to {}: {e}",
                template.display(),
                data.display()
            )
        })?;
        cluster.watchdog = Some(spawn_watchdog(&cluster.ctl, &root)?);

        let mut last = String::new();
        for _ in 0..8 {
            cluster.port = crate::net::pick_port()?;
            let sockets = if data.as_os_str().len() < 80 {
                data.to_string_lossy().into_owned()
            } else {
                String::new()
            };
            let conf = format!(
                "port = {}\nunix_socket_directories = '{}'\n",
                cluster.port,
                sockets.replace('\'', "''")
            );
            let conf_path = data.join(CLUSTER_CONF);
            fs::write(&conf_path, conf)
                .and_then(|()| chown(&conf_path, user))
                .map_err(|e| format!("cannot write {}: {e}", conf_path.display()))?;
            match cluster.ctl.start() {
                Ok(()) => return Ok(cluster),
                Err(StartError::PortInUse(e)) => last = e,
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(format!(
            "no free port for PostgreSQL after 8 tries; last error: {last}"
        ))
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{DB_NAME}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.ctl.stop("immediate");
        }
        for _ in 0..3 {
            if fs::remove_dir_all(&self.root).is_ok() || !self.root.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            drop(watchdog.stdin.take()); // it wakes up, finds nothing left to do, and exits
            if wait_timeout(&mut watchdog, Duration::from_secs(5)).is_none() {
                let _ = watchdog.kill();
                let _ = watchdog.wait();
            }
        }
    }
}

impl Ctl {
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(base_dir())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT");
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// `pg_ctl start` without its wait (which polls only every 100 ms), then our own wait for
    /// postmaster.pid to say "ready".
    fn start(&self) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let log_before = fs::metadata(&self.log).map_or(0, |m| m.len());
        let failed = |why: String| {
            let log = read_from(&self.log, log_before);
            let msg = format!(
                "PostgreSQL did not start: {why}\nserver log {}:\n{log}",
                self.log.display()
            );
            if log.contains("Address already in use") || log.contains("could not bind") {
                StartError::PortInUse(msg)
            } else {
                StartError::Other(msg)
            }
        };
        let mut cmd = self.command(&self.pg_ctl);
        cmd.arg("start")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-W", "-s"]);
        let out = run(&mut cmd, None, START_TIMEOUT).map_err(StartError::Other)?;
        if !out.status.success() {
            return Err(failed(format!(
                "`pg_ctl start` failed ({}): {}{}",
                out.status, out.stdout, out.stderr
            )));
        }
        let pid_file = self.data.join("postmaster.pid");
        let mut pause = Duration::from_millis(1);
        loop {
            // postmaster.pid: pid, data dir, start time, port, socket dir, listen address,
            // shared memory key, status.
            let pid_lines = fs::read_to_string(&pid_file).unwrap_or_default();
            let lines: Vec<&str> = pid_lines.lines().collect();
            if lines.get(7).is_some_and(|status| status.trim() == "ready") {
                return Ok(());
            }
            if let Some(pid) = lines.first().filter(|p| !p.trim().is_empty()) {
                if !Path::new("/proc").join(pid.trim()).exists() {
                    return Err(failed(format!(
                        "the postmaster (pid {}) exited",
                        pid.trim()
                    )));
                }
            } else {
                // No pid file (yet, or any more): a startup failure is logged as FATAL.
                let log = read_from(&self.log, log_before);
                if log.contains("FATAL:") || log.contains("PANIC:") {
                    return Err(failed("it logged a fatal error".into()));
                }
            }
            if Instant::now() >= deadline {
                let _ = self.stop("immediate");
                return Err(failed(format!("not ready within {START_TIMEOUT:?}")));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
    }

    /// `pg_ctl stop` without its wait (100 ms polling), then our own wait for the postmaster
    /// to remove postmaster.pid as it exits.
    fn stop(&self, mode: &str) -> Result<(), String> {
        let mut cmd = self.command(&self.pg_ctl);
        cmd.arg("stop")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-W", "-s"]);
        let out = run(&mut cmd, None, STOP_TIMEOUT)?;
        if !out.status.success() {
            return Err(format!(
                "`pg_ctl stop -m {mode}` failed ({}): {}{}",
                out.status, out.stdout, out.stderr
            ));
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let pid_file = self.data.join("postmaster.pid");
        let mut pause = Duration::from_millis(1);
        while pid_file.exists() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "PostgreSQL did not stop within {STOP_TIMEOUT:?} (`pg_ctl stop -m {mode}`)"
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        Ok(())
    }
}

fn spawn_watchdog(ctl: &Ctl, root: &Path) -> Result<Child, String> {
    let mut cmd = ctl.command(Path::new("/bin/sh"));
    cmd.arg("-c")
        .arg(WATCHDOG)
        .arg(&ctl.pg_ctl)
        .arg(&ctl.data)
        .arg(root);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    cmd.spawn()
        .map_err(|e| format!("cannot start the watchdog /bin/sh: {e}"))
}

/// The server binaries: `initdb` on PATH (with `pg_ctl` and `postgres` beside it), else the
/// highest version under /usr/lib/postgresql.
fn pg_bins() -> Result<&'static PgBins, String> {
    static BINS: OnceLock<Result<PgBins, String>> = OnceLock::new();
    BINS.get_or_init(|| {
        let mut dirs = Vec::new();
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            if let Ok(initdb) = fs::canonicalize(dir.join("initdb")) {
                dirs.extend(initdb.parent().map(Path::to_path_buf));
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        dirs.extend(versions.into_iter().map(|(_, dir)| dir));

        for dir in dirs {
            if !["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| dir.join(b).is_file())
            {
                continue;
            }
            let out = run(
                Command::new(dir.join("initdb")).arg("--version"),
                None,
                Duration::from_secs(10),
            )?;
            // "initdb (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)"
            let major = out.stdout.split("(PostgreSQL)").nth(1).and_then(|v| {
                v.trim()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            });
            if let Some(major) = major {
                return Ok(PgBins { dir, major });
            }
        }
        Err(format!(
            "no PostgreSQL found: {ENV_URL} is unset and there is no `initdb` (with `pg_ctl` and \
             `postgres`) on PATH or in /usr/lib/postgresql/*/bin. To run these tests, {HOW_TO}."
        ))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// `None` when we are not root (run the binaries as ourselves), else the `postgres` user's
/// uid/gid: PostgreSQL refuses to run as root.
fn server_user() -> Result<Option<(u32, u32)>, String> {
    static USER: OnceLock<Result<Option<(u32, u32)>, String>> = OnceLock::new();
    USER.get_or_init(|| {
        if effective_uid() != 0 {
            return Ok(None);
        }
        let passwd = run(
            Command::new("getent").args(["passwd", "postgres"]),
            None,
            Duration::from_secs(10),
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
        let passwd = if passwd.is_empty() {
            fs::read_to_string("/etc/passwd").unwrap_or_default()
        } else {
            passwd
        };
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[0] == "postgres")
            .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .filter(|&(uid, _)| uid != 0)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "running as root, but PostgreSQL refuses to run as root and there is no \
                     `postgres` OS user to run it as. Create one (Debian's `postgresql` package \
                     does), run the tests as another user, or {HOW_TO}."
                )
            })
    })
    .clone()
}

fn effective_uid() -> u32 {
    // /proc/<pid> belongs to the process's effective uid.
    if let Ok(m) = fs::metadata("/proc/self") {
        return m.uid();
    }
    run(Command::new("id").arg("-u"), None, Duration::from_secs(10))
        .ok()
        .and_then(|o| o.stdout.trim().parse().ok())
        .unwrap_or(u32::MAX)
}

/// The cached, initialized template cluster (containing the `hw_test` database); built if missing.
fn template(bins: &PgBins, user: Option<(u32, u32)>) -> Result<PathBuf, String> {
    let tmp = base_dir();
    let owner = user.map_or_else(effective_uid, |(uid, _)| uid);
    let name = format!(
        "heartwire-pg-template-{}-u{owner}-v{TEMPLATE_FORMAT}",
        bins.major
    );
    let ready = tmp.join(&name);
    let is_ready = |dir: &Path| {
        [
            TEMPLATE_MARKER,
            "PG_VERSION",
            "global/pg_control",
            "postgresql.conf",
        ]
        .iter()
        .all(|f| dir.join(f).is_file())
    };
    if is_ready(&ready) {
        return Ok(ready);
    }
    if ready.exists() {
        // Damaged (e.g. by a /tmp cleaner): move it out of the way atomically, then rebuild.
        let aside = tmp.join(format!("{name}.broken-{:016x}", random_u64()));
        if fs::rename(&ready, &aside).is_ok() {
            let _ = fs::remove_dir_all(&aside);
        }
    }
    remove_stale_builds(&tmp, &name);

    let build = tmp.join(format!(
        "{name}.tmp-{}-{:016x}",
        std::process::id(),
        random_u64()
    ));
    if let Err(e) = build_template(bins, user, &build) {
        let _ = fs::remove_dir_all(&build);
        return Err(e);
    }
    match fs::rename(&build, &ready) {
        Ok(()) => Ok(ready),
        Err(e) => {
            let _ = fs::remove_dir_all(&build);
            // Most likely another test process won the race: use its template.
            if is_ready(&ready) {
                Ok(ready)
            } else {
                Err(format!(
                    "cannot rename {} to {}: {e}",
                    build.display(),
                    ready.display()
                ))
            }
        }
    }
}

fn build_template(bins: &PgBins, user: Option<(u32, u32)>, dir: &Path) -> Result<(), String> {
    let ctl = Ctl {
        pg_ctl: bins.bin("pg_ctl"),
        user,
        data: dir.to_path_buf(),
        log: PathBuf::new(),
    };
    let hint = if user.is_some() {
        format!(
            " (it runs as the `postgres` user, which must be able to write to {})",
            base_dir().display()
        )
    } else {
        String::new()
    };

    let mut initdb = ctl.command(&bins.bin("initdb"));
    initdb.arg("-D").arg(dir);
    initdb.args([
        "-U",
        "postgres",
        "-A",
        "trust",
        "-E",
        "UTF8",
        "--locale=C",
        "--no-sync",
        "--wal-segsize=1",
    ]);
    let out = run(&mut initdb, None, INITDB_TIMEOUT)?;
    if !out.status.success() {
        return Err(format!(
            "`initdb` failed ({}){hint}:\n{}{}",
            out.status, out.stdout, out.stderr
        ));
    }

    let conf = dir.join("postgresql.conf");
    fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut f| f.write_all(TEMPLATE_CONF.as_bytes()))
        .map_err(|e| format!("cannot append to {}: {e}", conf.display()))?;

    // Create the test database once, in single-user mode (no port, no socket).
    let mut single = ctl.command(&bins.bin("postgres"));
    single
        .arg("--single")
        .arg("-D")
        .arg(dir)
        .args(["-F", "postgres"]);
    let sql = format!("CREATE DATABASE {DB_NAME};\n");
    let out = run(&mut single, Some(sql.as_bytes()), INITDB_TIMEOUT)?;
    if !out.status.success() || out.stdout.contains("ERROR") || out.stderr.contains("ERROR") {
        return Err(format!(
            "`postgres --single` failed to create {DB_NAME} ({}):\n{}{}",
            out.status, out.stdout, out.stderr
        ));
    }

    let marker = dir.join(TEMPLATE_MARKER);
    fs::write(&marker, b"").map_err(|e| format!("cannot write {}: {e}", marker.display()))
}

/// Removes template build directories left by killed processes (older than 10 minutes).
fn remove_stale_builds(tmp: &Path, name: &str) {
    let prefix = format!("{name}.");
    for entry in fs::read_dir(tmp).into_iter().flatten().flatten() {
        let stale = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600));
        if stale {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Copies a cluster directory, giving everything to `owner` (when set) and keeping modes.
fn copy_tree(from: &Path, to: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    fs::create_dir(to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o700))?;
    chown(to, owner)?;
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == TEMPLATE_MARKER || name == "postmaster.pid" || name == "postmaster.opts" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&src, &dst, owner)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(&dst, Some(uid), Some(gid))?;
            }
        } else {
            fs::copy(&src, &dst)?;
            chown(&dst, owner)?;
        }
    }
    Ok(())
}

fn chown(path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    match owner {
        Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid)),
        None => Ok(()),
    }
}

/// Where templates and clusters live: /dev/shm when it has at least 1 GiB free (a tmpfs; copying
/// a template there takes tens of milliseconds instead of about a second on a slow disk), else
/// the temporary directory.
fn base_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let free_kib = run(
            Command::new("df").args(["-Pk"]).arg(shm),
            None,
            Duration::from_secs(10),
        )
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            o.stdout
                .lines()
                .nth(1)?
                .split_whitespace()
                .nth(3)?
                .parse::<u64>()
                .ok()
        });
        let writable = fs::metadata(shm).is_ok_and(|m| m.is_dir() && m.mode() & 0o1777 == 0o1777);
        if writable && free_kib.is_some_and(|k| k >= 1 << 20) {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

// ------------------------------------------------------------------------------------------------
// Helpers

struct RunOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion with `input` on stdin, killing it after `timeout`.
fn run(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> Result<RunOutput, String> {
    let what = format!("{cmd:?}");
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot run {what}: {e}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(input);
    }
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let Some(status) = wait_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{what} did not finish within {timeout:?}"));
    };
    Ok(RunOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            _ => return None,
        }
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let text = fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default()).into_owned()
}

/// Runs blocking `f` on its own thread and awaits it without tokio timers (fine under a paused
/// clock, and never blocks the test's runtime). A panic in `f` is resumed here.
async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("test-postgres".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("cannot spawn a thread");
    match rx.await {
        Ok(value) => value,
        Err(_) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker thread ended without a result"),
        },
    }
}
