//! Password files against the real `mosquitto_passwd` (Debian package `mosquitto`, which
//! ./test.sh installs): files it writes load and verify, and `broker passwd` edits them keeping
//! its users intact.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use broker::auth::password_file::{Hash, PasswordFile};

const MOSQUITTO_PASSWD: &str = "mosquitto_passwd";

/// Runs Debian's `mosquitto_passwd` with `args`; it must succeed.
fn mosquitto_passwd(args: &[&str]) {
    let output = Command::new(MOSQUITTO_PASSWD)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run {MOSQUITTO_PASSWD} ({error}): install the Debian package \
                 `mosquitto` (./test.sh does)"
            )
        });
    assert!(
        output.status.success(),
        "mosquitto_passwd {args:?}: {output:?}"
    );
}

/// Runs `broker passwd` with `args`, `stdin` on its standard input.
fn broker_passwd(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn load(path: &Path) -> PasswordFile {
    PasswordFile::load(path).unwrap()
}

/// Asserts that `user` is in `file` and verifies `password` but not a wrong one.
fn assert_verifies(file: &PasswordFile, user: &str, password: &str) {
    let hash = file
        .lookup(user)
        .unwrap_or_else(|| panic!("no user {user}"));
    assert!(
        hash.verify(password.as_bytes()),
        "{user} with the right password"
    );
    assert!(!hash.verify(b"wrong"), "{user} with a wrong password");
}

/// A file made by mosquitto_passwd: alice and bob with -c -b, carol added later, dave added and
/// deleted with -D, erin in the old $6$ format.
fn mosquitto_file(dir: &Path) -> PathBuf {
    let path = dir.join("passwd");
    let file = path.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", file, "alice", "alice-pw"]);
    mosquitto_passwd(&["-b", file, "bob", "b:o b"]);
    mosquitto_passwd(&["-b", file, "dave", "dave-pw"]);
    mosquitto_passwd(&["-b", file, "carol", "carol-pw"]);
    mosquitto_passwd(&["-D", file, "dave"]);
    mosquitto_passwd(&["-H", "sha512", "-b", file, "erin", "erin-pw"]);
    path
}

#[test]
fn files_made_by_mosquitto_passwd_load_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let path = mosquitto_file(dir.path());
    let text = fs::read_to_string(&path).unwrap();
    // The layout this module reads: $7$<iterations>$<salt>$<hash> with Mosquitto's defaults.
    let alice = text.lines().next().unwrap();
    assert!(alice.starts_with("alice:$7$101$"), "{alice}");
    assert!(text.contains("erin:$6$"), "{text}");

    let file = load(&path);
    assert_eq!(file.len(), 4);
    assert_verifies(&file, "alice", "alice-pw");
    assert_verifies(&file, "bob", "b:o b");
    assert_verifies(&file, "carol", "carol-pw");
    assert_verifies(&file, "erin", "erin-pw");
    assert!(matches!(
        file.lookup("alice"),
        Some(Hash::Pbkdf2Sha512 { iterations: 101, salt, .. }) if salt.len() == 12
    ));
    assert!(matches!(file.lookup("erin"), Some(Hash::Sha512 { .. })));
    assert!(file.lookup("dave").is_none());
    assert!(!file.lookup("alice").unwrap().verify(b"carol-pw"));
}

#[test]
fn broker_passwd_adds_changes_and_deletes_keeping_mosquitto_users() {
    let dir = tempfile::tempdir().unwrap();
    let path = mosquitto_file(dir.path());
    let file = path.to_str().unwrap();
    let before = fs::read_to_string(&path).unwrap();

    let output = broker_passwd(&["-b", file, "frank", "frank-pw"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let after = fs::read_to_string(&path).unwrap();
    // Every mosquitto line is kept byte for byte; frank is appended as argon2id.
    assert!(after.starts_with(&before), "{after}");
    assert!(after[before.len()..].starts_with("frank:$argon2id$v=19$m=19456,t=2,p=1$"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let loaded = load(&path);
    assert_eq!(loaded.len(), 5);
    assert_verifies(&loaded, "frank", "frank-pw");
    assert_verifies(&loaded, "alice", "alice-pw");
    assert_verifies(&loaded, "erin", "erin-pw");

    // Changing a mosquitto user: its line becomes argon2id in place, the others stay.
    let output = broker_passwd(&["-b", file, "bob", "new-bob"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let loaded = load(&path);
    assert!(matches!(loaded.lookup("bob"), Some(Hash::Argon2id(_))));
    assert_verifies(&loaded, "bob", "new-bob");
    assert!(!loaded.lookup("bob").unwrap().verify(b"b:o b"));
    assert_verifies(&loaded, "carol", "carol-pw");

    // Without -b, the password is a line of standard input (not a terminal here).
    let output = broker_passwd(&[file, "gina"], "gina-pw\n");
    assert!(output.status.success(), "{}", stderr(&output));
    assert_verifies(&load(&path), "gina", "gina-pw");

    // -D removes; the others still verify.
    let output = broker_passwd(&["-D", file, "alice"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let loaded = load(&path);
    assert!(loaded.lookup("alice").is_none());
    assert_verifies(&loaded, "carol", "carol-pw");
    assert_verifies(&loaded, "frank", "frank-pw");
    // Deleting someone absent is an error naming the file.
    let output = broker_passwd(&["-D", file, "alice"], "");
    assert!(!output.status.success());
    assert!(stderr(&output).contains(file), "{}", stderr(&output));

    // mosquitto_passwd still edits the file (it keeps the argon2id lines as they are).
    mosquitto_passwd(&["-b", file, "hank", "hank-pw"]);
    let loaded = load(&path);
    assert_verifies(&loaded, "hank", "hank-pw");
    assert_verifies(&loaded, "frank", "frank-pw");
}

#[test]
fn create_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new");
    let file = path.to_str().unwrap();
    // Without -c, a missing file is an error that says to use -c.
    let output = broker_passwd(&["-b", file, "u", "p"], "");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("-c"), "{}", stderr(&output));
    assert!(!path.exists());

    let output = broker_passwd(&["-c", "-b", file, "u", "p"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let output = broker_passwd(&["-c", "-b", file, "v", "q"], "");
    assert!(output.status.success(), "{}", stderr(&output));
    let loaded = load(&path);
    assert_eq!(loaded.len(), 1, "-c overwrites");
    assert_verifies(&loaded, "v", "q");

    // A user name with ':' is refused; the file is unchanged.
    let before = fs::read(&path).unwrap();
    let output = broker_passwd(&["-b", file, "a:b", "p"], "");
    assert!(!output.status.success());
    assert!(stderr(&output).contains("':'"), "{}", stderr(&output));
    assert_eq!(fs::read(&path).unwrap(), before);

    // A malformed file is not edited; the error names the file and the line, not its text.
    fs::write(&path, "v:$7$0$AAAA$BBBB\n").unwrap();
    let output = broker_passwd(&["-b", file, "w", "p"], "");
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains(&format!("{file}: line 1:")), "{message}");
    assert!(!message.contains("AAAA"), "{message}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "v:$7$0$AAAA$BBBB\n");
}

/// Users added in one `--bulk` run. Each costs one argon2id hash (about 20 ms here: the dev
/// profile optimises argon2), so 100 take about 2 s and a fleet of 10,000 a few minutes.
const BULK_USERS: usize = 100;

#[test]
fn bulk_adds_many_users_and_a_malformed_line_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = mosquitto_file(dir.path());
    let file = path.to_str().unwrap();

    let mut input = String::from("# fleet\n\n");
    for i in 0..BULK_USERS {
        input.push_str(&format!("device-{i}:secret-{i}\n"));
    }
    // Replacing a mosquitto user too.
    input.push_str("carol:carol-new\n");
    let output = broker_passwd(&["--bulk", file], &input);
    assert!(output.status.success(), "{}", stderr(&output));
    let loaded = load(&path);
    assert_eq!(loaded.len(), 4 + BULK_USERS);
    for i in (0..BULK_USERS).step_by(17) {
        assert_verifies(&loaded, &format!("device-{i}"), &format!("secret-{i}"));
    }
    assert_verifies(&loaded, "carol", "carol-new");
    assert_verifies(&loaded, "alice", "alice-pw");

    // A malformed line (no ':' on line 3) stops everything: the file is unchanged.
    let before = fs::read(&path).unwrap();
    let output = broker_passwd(&["--bulk", file], "new-1:pw\nnew-2:pw\nnew-3-no-colon\n");
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(message.contains("<stdin>: line 3:"), "{message}");
    assert!(!message.contains("new-3-no-colon"), "{message}");
    assert_eq!(fs::read(&path).unwrap(), before);
}
