//! The Eclipse Paho MQTT 3.1.1 interoperability suite (`client_test.py`, unmodified, in
//! ../shared/paho-interop beside the checkout: see its ABOUT.md) passes in full against the
//! broker, with the ACL its subscribe-failure test needs: everything may be read and
//! written but `test/nosubscribe`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use broker::config::AuthConfig;
use testkit::{temp_dir, TestBroker};

/// Where the suite is: `../shared/paho-interop` next to the repository.
fn suite_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/paho-interop");
    assert!(
        dir.join("client_test.py").is_file(),
        "the Paho interoperability suite is not at {} (CI and the development machine have \
         ../shared beside the checkout)",
        dir.display()
    );
    dir
}

/// Runs `client_test.py` against 127.0.0.1:`port`. The script reads its options with getopt
/// and then hands `sys.argv` to `unittest.main`, which refuses them: the runner below gives
/// unittest the program name only.
const RUNNER: &str = "\
import runpy, sys, unittest
port = sys.argv[1]
main = unittest.main
unittest.main = lambda *a, **k: main(*a, argv=['client_test.py'], **k)
sys.argv = ['client_test.py', '--hostname=127.0.0.1', '--port=' + port]
sys.path.insert(0, '.')
runpy.run_path('client_test.py', run_name='__main__')
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_interoperability_suite_passes_in_full() {
    let dir = temp_dir("paho");
    let acl_file = dir.path().join("acl");
    std::fs::write(
        &acl_file,
        "topic readwrite #\ntopic deny test/nosubscribe\n",
    )
    .expect("write the ACL file");
    let broker = TestBroker::start_with_auth(
        |_| {},
        AuthConfig {
            allow_anonymous: true,
            acl_file: Some(acl_file),
            ..AuthConfig::default()
        },
    )
    .await;
    let run = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(RUNNER)
        .arg(broker.addr.port().to_string())
        .current_dir(suite_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // The suite waits with sleeps of its own (about 40 s in all).
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the Paho suite finishes within 240 s")
        .expect("python3 runs (./test.sh needs Python 3)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "Paho suite failed:\n{text}");
    assert!(text.contains("Ran 10 tests"), "all ten tests ran:\n{text}");
    for test in [
        "Subscribe failure test succeeded",
        "Retained message test succeeded",
        "Zero length clientid test succeeded",
    ] {
        assert!(text.contains(test), "{test}:\n{text}");
    }
}
