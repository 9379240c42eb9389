//! Authentication end to end: `device-sim provision` prints the `user:password` lines of a
//! run's devices, they are hashed into a password file as `broker passwd --bulk FILE` does
//! (with the broker library's own functions: Cargo gives device-sim's tests only device-sim's
//! binary), and the whole broker runs in-process on that file with the client id bound to the
//! user name. Devices that log in with the seed's passwords play their scenario and `verify`
//! agrees; with another seed every CONNECT is refused with 0x04.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use broker::auth::password_file::{parse_bulk, Hash, PasswordFileEditor};
use broker::config::ClientIdBinding;

use common::{
    args, clean_abrupt_churn, count_events, run, sim, timing, verify, verify_with, SIM_WAIT,
};
use testkit::{sqlite_url, temp_dir, FullBroker, TempDir};

/// Devices of these tests: enough for a fleet, few enough to hash (argon2id) in a second.
const COUNT: &str = "12";
/// The seed the accounts are provisioned from.
const SEED: &str = "auth-test-seed";

/// `device-sim provision --count COUNT --password-seed seed`, hashed into the password file
/// `dir/passwords` as by `broker passwd --bulk`; returns the file.
async fn provision(dir: &Path, seed: &str) -> PathBuf {
    let out = tokio::time::timeout(
        SIM_WAIT,
        sim()
            .args(["provision", "--count", COUNT, "--password-seed", seed])
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("provision ends in time")
    .expect("provision runs");
    assert!(
        out.status.success(),
        "provision failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 lines");
    let users = parse_bulk(&text, Path::new("<provision>")).expect("broker passwd --bulk input");
    assert_eq!(users.len().to_string(), COUNT, "{text}");
    assert!(users.iter().all(|(user, _)| user.starts_with("dev-")));
    let mut editor = PasswordFileEditor::new();
    for (user, password) in &users {
        let hash = Hash::new_argon2id(password.as_bytes()).expect("hash");
        editor.set(user, &hash).expect("add user");
    }
    let file = dir.join("passwords");
    editor.save(&file).expect("save password file");
    file
}

/// The whole broker on a fresh SQLite file in `dir`, authenticating against `password_file`
/// with client ids bound to user names; returns once it is ready.
async fn start_broker(
    dir: &TempDir,
    password_file: PathBuf,
    adjust: impl FnOnce(&mut broker::config::Config),
) -> FullBroker {
    let mut config = FullBroker::config(&sqlite_url(dir), dir, "test-node");
    config.auth.password_file = Some(password_file);
    config.auth.bind_client_id = ClientIdBinding::Username;
    adjust(&mut config);
    let broker = FullBroker::start(config).await;
    broker.ready().await;
    broker
}

/// The run options of the provisioned devices, logging in with passwords from `seed`.
fn login(seed: &str) -> Vec<String> {
    args([
        "--count",
        COUNT,
        "--username-from-client-id",
        "--password-seed",
        seed,
    ])
}

/// Churn over two workers with every device logging in as itself: all connect and come back,
/// none is refused, and verify agrees with the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioned_devices_churn_with_auth_on_and_verify_passes() {
    let dir = temp_dir("auth");
    let file = provision(dir.path(), SEED).await;
    let broker = start_broker(&dir, file, |_| {}).await;
    let truth = dir.path().join("truth.jsonl");
    let options = [
        login(SEED),
        timing("3"),
        clean_abrupt_churn("1200", "0.1"),
        args(["--workers", "2", "--truth", &truth.display().to_string()]),
    ]
    .concat();
    let run = run(broker.mqtt.port(), dir.path(), "churn", &options).await;
    run.churned();
    verify(&broker.api(), &truth, "1").await;
    broker.stop().await;
}

/// Takeover, flap and storm, each on a broker of its own, with every device logging in as
/// itself: the connection that takes a device over logs in too, and the devices that come back
/// at once after a storm are let in again; verify agrees after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_flap_and_storm_work_with_auth_on() {
    for (scenario, extra, event) in [
        ("takeover", ["--churn-percent", "900"], "takeover_connected"),
        ("flap", ["--flappers", "4"], "connected"),
        ("storm", ["--storm-every", "30"], "connected"),
    ] {
        let dir = temp_dir("auth");
        let file = provision(dir.path(), SEED).await;
        let broker = start_broker(&dir, file, |_| {}).await;
        let truth = dir.path().join("truth.jsonl");
        let options = [
            login(SEED),
            timing("3"),
            args([
                "--scenario",
                scenario,
                "--truth",
                &truth.display().to_string(),
            ]),
            args(extra),
        ]
        .concat();
        let run = run(broker.mqtt.port(), dir.path(), scenario, &options).await;
        run.no_connect_failed();
        // Beyond the first connect of each device: someone came back or took over.
        let first = if event == "connected" { 12 } else { 0 };
        assert!(
            count_events(&truth, event) > first,
            "{scenario}: no {event} beyond the first connects:\n{}",
            run.output
        );
        verify(&broker.api(), &truth, "0.5").await;
        broker.stop().await;
    }
}

/// `device-sim provision --api`: the accounts go into the broker's database through the admin
/// API (twice: the second time every one exists and has its password set again), and the
/// devices log in with them, bound to their client ids; verify agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_provisioned_through_the_api_connect() {
    use broker::http::tokens::{line, new_token, Role};

    let dir = temp_dir("auth-api");
    let mut config = FullBroker::config(&sqlite_url(&dir), &dir, "test-node");
    config.auth.database = true;
    config.auth.bind_client_id = ClientIdBinding::Username;
    // A protected API: provisioning needs an admin token, verify a read one.
    let (admin, read) = (new_token().expect("token"), new_token().expect("token"));
    let tokens = dir.path().join("api-tokens");
    std::fs::write(
        &tokens,
        format!(
            "{}\n{}\n",
            line("provisioning", Role::Admin, &admin),
            line("checks", Role::Read, &read)
        ),
    )
    .expect("write the tokens file");
    config.http.api_tokens_file = Some(tokens);
    let broker = FullBroker::start(config).await;
    broker.ready().await;
    // Without a token, or with a read one, the admin API refuses and provision says so.
    for token in [None, Some(&read)] {
        let mut command = sim();
        command
            .args(["provision", "--count", COUNT, "--password-seed", SEED])
            .args(["--api", &broker.api()]);
        if let Some(token) = token {
            command.args(["--api-token", token]);
        }
        let out = tokio::time::timeout(SIM_WAIT, command.stderr(Stdio::piped()).output())
            .await
            .expect("provision ends in time")
            .expect("provision runs");
        assert!(!out.status.success(), "provision without an admin token");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(if token.is_some() { "403" } else { "401" }),
            "{stderr}"
        );
    }
    for said in ["12 created, 0 updated", "0 created, 12 updated"] {
        let out = tokio::time::timeout(
            SIM_WAIT,
            sim()
                .args(["provision", "--count", COUNT, "--password-seed", SEED])
                .args(["--api", &broker.api(), "--api-token", &admin])
                .stderr(Stdio::piped())
                .output(),
        )
        .await
        .expect("provision ends in time")
        .expect("provision runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "provision failed: {stderr}");
        assert!(stderr.contains(said), "{stderr}");
        assert!(out.stdout.is_empty(), "no lines printed with --api");
    }
    let truth = dir.path().join("truth.jsonl");
    let options = [
        login(SEED),
        timing("3"),
        clean_abrupt_churn("1200", "0.1"),
        args(["--truth", &truth.display().to_string()]),
    ]
    .concat();
    let run = run(broker.mqtt.port(), dir.path(), "api", &options).await;
    run.churned();
    let (status, text) = verify_with(&broker.api(), &truth, "1", &["--api-token", &read]).await;
    assert!(status.success(), "verify disagrees:\n{text}");
    broker.stop().await;
}

/// Passwords from another seed: every CONNECT is refused with 0x04 (bad user name or password),
/// counted as failed connects, and the run ends with exit code 3 (no device ever connected).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_seed_is_refused_with_bad_credentials() {
    let dir = temp_dir("auth");
    let file = provision(dir.path(), SEED).await;
    // Twelve devices refused from one address in a row would wait longer and longer for their
    // answers (auth.failure_delay_max, tested in broker/tests/auth.rs); here every one must be
    // answered within the short run.
    let broker = start_broker(&dir, file, |c| {
        c.auth.failure_delay_max = std::time::Duration::ZERO;
    })
    .await;
    let options = [login("another-seed"), timing("2")].concat();
    let run = run(broker.mqtt.port(), dir.path(), "wrong", &options).await;
    assert_eq!(run.code, Some(3), "{}", run.output);
    assert_eq!(run.summary["connected"], 0, "{}", run.output);
    let failed = run.errors("connect_failed");
    assert!(
        failed >= 12,
        "every device failed at least once: {}",
        run.output
    );
    assert_eq!(run.errors("total"), failed, "{}", run.output);
    let first = run.summary["errors"]["first"]["connect_failed"]
        .as_str()
        .unwrap_or_default();
    assert!(first.contains("BadUserNamePassword"), "{}", run.output);
    broker.stop().await;
}
