//! A real Mosquitto (Debian's, installed by ./test.sh) for side-by-side tests: one listener on
//! a free port of 127.0.0.1, the configuration lines a test adds, stopped when dropped; and its
//! `mosquitto_passwd`, which makes the password files of the authentication tests.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{free_port, temp_dir, TempDir, WAIT};

/// Debian's Mosquitto binary: on the PATH or where the package puts it.
pub fn mosquitto_bin() -> PathBuf {
    find_mosquitto().unwrap_or_else(|| {
        panic!(
            "no mosquitto binary (on the PATH or /usr/sbin): install Debian's mosquitto \
             package (./test.sh does)"
        )
    })
}

/// [`mosquitto_bin`], or `None` when Mosquitto is not installed.
fn find_mosquitto() -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// Adds `user` with `password` to the password file at `path` (with `create`, makes the file
/// anew) with Debian's `mosquitto_passwd`: `$7$` PBKDF2-SHA512 lines, as Mosquitto writes them.
pub fn mosquitto_passwd(path: &Path, user: &str, password: &str, create: bool) {
    let mut command = std::process::Command::new("mosquitto_passwd");
    if create {
        command.arg("-c");
    }
    let status = command
        .arg("-b")
        .arg(path)
        .arg(user)
        .arg(password)
        .status()
        .expect("mosquitto_passwd runs (./test.sh installs Debian's mosquitto)");
    assert!(status.success(), "mosquitto_passwd {user}");
}

/// A running Mosquitto, killed when dropped.
pub struct Mosquitto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its configuration and log.
    dir: TempDir,
}

impl Mosquitto {
    /// Starts Mosquitto listening on 127.0.0.1 with the configuration lines `config` (for the
    /// listener: TLS files, `allow_anonymous`, `password_file`, `acl_file`, ...); waits until it
    /// accepts connections.
    pub async fn start(config: &str) -> Self {
        Self::start_with(config, None).await
    }

    /// [`start`](Self::start) with persistence on: Mosquitto reads its state from `state`
    /// (`persistence_location`) at start and saves it there when it stops cleanly (and every
    /// `autosave_interval`, 1800 s unless `config` says otherwise).
    pub async fn start_persistent(config: &str, state: &Path) -> Self {
        Self::start_with(config, Some(state)).await
    }

    async fn start_with(config: &str, state: Option<&Path>) -> Self {
        let dir = temp_dir("mosquitto");
        let port = free_port();
        let path = dir.path().join("mosquitto.conf");
        let persistence = match state {
            // Mosquitto appends the file name to the location as it is: hence the slash.
            Some(state) => format!(
                "persistence true\npersistence_location {}/",
                state.display()
            ),
            None => "persistence false".to_owned(),
        };
        // `user root` keeps a root test run as root (Mosquitto would switch to the
        // `mosquitto` account, which cannot read the temporary files); ignored otherwise.
        let body = format!(
            "listener {port} 127.0.0.1\n{config}\n{persistence}\nuser root\n\
             log_dest stderr\nlog_type error\nlog_type warning\n"
        );
        std::fs::write(&path, body).expect("writing mosquitto.conf");
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).expect("log file");
        let mut child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting mosquitto");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "mosquitto exited ({status}) during startup: {}",
                    read(&dir.path().join("mosquitto.log"))
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "mosquitto did not listen on port {port} within {WAIT:?}"
            );
            // A process that is starting: nothing to await but its port.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self { child, port, dir }
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// What it logged so far (errors and warnings).
    pub fn log(&self) -> String {
        read(&self.dir.path().join("mosquitto.log"))
    }

    /// Stops it cleanly (SIGTERM; Mosquitto saves its state on the way out) and waits for its
    /// exit, which must be a success.
    pub async fn terminate(mut self) {
        let pid = self.child.id().expect("mosquitto is running");
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("mosquitto did not stop within {WAIT:?} of SIGTERM"))
            .expect("waiting for mosquitto");
        assert!(
            status.success(),
            "mosquitto stopped with {status}: {}",
            self.log()
        );
    }

    /// Kills it (SIGKILL: it saves nothing) and waits until it is gone.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("killing mosquitto");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
