//! The `broker` binary as an operator runs it: JSON logs, running out of file descriptors and
//! recovering, SIGTERM shutdown, and configuration errors (exit code 2 naming the key).
//!
//! Kept in its own test binary because it starts processes.

use std::process::Stdio;
use std::time::Duration;

use rumqttc::mqttbytes::v4::Packet;
use testkit::{ConnectOpts, RawClient, WAIT};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const BROKER: &str = env!("CARGO_BIN_EXE_broker");

/// Starts the broker binary with `nofile` as its open-file limit; returns the child, its MQTT
/// address and its stderr lines.
async fn start(
    nofile: u32,
    data: &testkit::TempDir,
) -> (Child, std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    let (child, mut lines) = spawn(nofile, data, &[]);
    let ready = wait_for_line(&mut lines, "MQTT listener ready").await;
    let value: serde_json::Value = serde_json::from_str(&ready).expect("JSON log line");
    let addr = value["listen"]
        .as_str()
        .expect("listen field")
        .parse()
        .expect("address");
    (child, addr, lines)
}

/// Starts the broker binary (ports 0, SQLite in `data`, JSON logs) with `env` added; returns
/// the child and its stderr lines.
fn spawn(
    nofile: u32,
    data: &testkit::TempDir,
    env: &[(&str, &str)],
) -> (Child, mpsc::UnboundedReceiver<String>) {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\""))
        .arg(BROKER)
        .env("BROKER_MQTT__LISTEN", "127.0.0.1:0")
        .env("BROKER_HTTP__LISTEN", "127.0.0.1:0")
        .env("BROKER_DATABASE__URL", testkit::sqlite_url(data))
        .env("BROKER_PERSISTENCE__DIR", data.path().join("state"))
        .env("BROKER_PERSISTENCE__SEGMENT_BYTES", "1048576")
        .env(
            "BROKER_BRIDGE__JOURNAL_PATH",
            data.path().join("presence.journal"),
        )
        .env("BROKER_LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn broker");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, lines)
}

/// A broker binary started by [`start_with`].
struct Started {
    child: Child,
    mqtt: std::net::SocketAddr,
    http: std::net::SocketAddr,
    lines: mpsc::UnboundedReceiver<String>,
}

/// As [`start`], with `env` added; also returns the HTTP address.
async fn start_with(nofile: u32, data: &testkit::TempDir, env: &[(&str, &str)]) -> Started {
    let (child, mut lines) = spawn(nofile, data, env);
    let listen = |line: &str| -> std::net::SocketAddr {
        let value: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
        value["listen"]
            .as_str()
            .expect("listen field")
            .parse()
            .expect("address")
    };
    let http = listen(&wait_for_line(&mut lines, "HTTP listener ready").await);
    let mqtt = listen(&wait_for_line(&mut lines, "MQTT listener ready").await);
    Started {
        child,
        mqtt,
        http,
        lines,
    }
}

async fn wait_for_line(lines: &mut mpsc::UnboundedReceiver<String>, needle: &str) -> String {
    tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.recv().await.expect("broker still logging");
            if line.contains(needle) {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line containing {needle:?}"))
}

#[tokio::test]
async fn out_of_file_descriptors_backs_off_and_recovers() {
    let data = testkit::temp_dir("fd-limit");
    let (mut child, addr, mut lines) = start(64, &data).await;

    // Far more clients than 64 descriptors allow; each reports its CONNACK.
    let (acked_tx, mut acked) = mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut c = RawClient::tcp(addr).await;
        c.send(&testkit::connect_packet(&ConnectOpts::new(&format!(
            "fd-{i}"
        ))))
        .await;
        let tx = acked_tx.clone();
        clients.push(tokio::spawn(async move {
            if let Some(Packet::ConnAck(_)) = c.recv_untimed().await {
                let _ = tx.send(i);
                // Hold the connection until the test drops this task.
                std::future::pending::<()>().await;
            }
        }));
    }
    wait_for_line(&mut lines, "Out of file descriptors").await;
    let mut first = Vec::new();
    while let Ok(Some(i)) = tokio::time::timeout(Duration::from_millis(500), acked.recv()).await {
        first.push(i);
    }
    assert!(
        !first.is_empty() && first.len() < 100,
        "some but not all clients accepted ({})",
        first.len()
    );

    // Closing connections frees descriptors: the waiting clients get in by themselves.
    for &i in first.iter().take(30) {
        clients[i].abort();
    }
    let mut later = 0;
    tokio::time::timeout(WAIT, async {
        while later < 25 {
            acked.recv().await.expect("clients alive");
            later += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {later} clients accepted after descriptors were freed"));
    wait_for_line(&mut lines, "File descriptors available again").await;

    // SIGTERM: graceful shutdown, exit 0.
    let pid = child.id().expect("pid");
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    wait_for_line(&mut lines, "Broker stopped").await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

/// More idle HTTP connections than the process has file descriptors: the HTTP listener holds
/// at most `http.max_connections` of them (the rest wait in the kernel's backlog), so an MQTT
/// client still connects and gets its CONNACK.
#[tokio::test]
async fn idle_http_connections_cannot_lock_mqtt_out() {
    let data = testkit::temp_dir("http-fds");
    let Started {
        mut child,
        mqtt,
        http,
        mut lines,
    } = start_with(64, &data, &[("BROKER_HTTP__MAX_CONNECTIONS", "8")]).await;

    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(http).await.expect("connect"));
    }
    wait_for_line(&mut lines, "HTTP connection limit reached").await;

    let mut client = RawClient::tcp(mqtt).await;
    client
        .send(&testkit::connect_packet(&ConnectOpts::new(
            "after-http-flood",
        )))
        .await;
    let started = std::time::Instant::now();
    let ack = tokio::time::timeout(Duration::from_secs(5), client.recv_untimed()).await;
    eprintln!(
        "MQTT CONNACK with 100 idle HTTP connections: {:?} after {:?}",
        ack.as_ref().map(|p| matches!(p, Some(Packet::ConnAck(_)))),
        started.elapsed()
    );
    assert!(
        matches!(ack, Ok(Some(Packet::ConnAck(_)))),
        "no CONNACK within 5 s: {ack:?}"
    );
    // Once the idle clients leave, the connections that waited in the backlog are served and
    // closed too, and HTTP answers again.
    drop(idle);
    let metrics = testkit::eventually("HTTP answers again", || async {
        testkit::http_get(http, "/metrics").await
    })
    .await;
    let limit_waits = metrics
        .lines()
        .find_map(|l| l.strip_prefix("heartwire_http_connection_limit_waits_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(limit_waits.is_some_and(|n| n > 0), "{limit_waits:?}");
    let _ = child.start_kill();
}

#[tokio::test]
async fn bad_configuration_exits_2_naming_the_key() {
    let out = Command::new(BROKER)
        .env("BROKER_MQTT__KEEPALIVE_MULTIPLIER", "0.5")
        .output()
        .await
        .expect("run broker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mqtt.keepalive_multiplier"), "{stderr}");

    // A bad word names the valid ones, not the Rust type.
    let out = Command::new(BROKER)
        .env("BROKER_LOG__FORMAT", "xml")
        .output()
        .await
        .expect("run broker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("expected one of pretty, json"), "{stderr}");

    let out = Command::new(BROKER)
        .env("BROKER_MQTT__LISTEN", "127.0.0.1:1883")
        .arg("--print-config")
        .output()
        .await
        .expect("run broker");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listen = \"127.0.0.1:1883\""));
}

/// Kubernetes sets BROKER_PORT, BROKER_SERVICE_HOST, ... in every pod of a namespace with a
/// Service named broker: the broker runs and names them in one warning. An unknown key in the
/// TOML file still stops it with exit code 2.
#[tokio::test]
async fn stray_broker_environment_variables_are_ignored_with_one_warning() {
    let data = testkit::temp_dir("stray-env");
    let (mut child, mut lines) = spawn(
        1024,
        &data,
        &[
            ("BROKER_PORT", "tcp://10.0.0.1:1883"),
            ("BROKER_SERVICE_HOST", "10.0.0.1"),
        ],
    );
    let warning = wait_for_line(&mut lines, "Ignoring environment variables").await;
    let value: serde_json::Value = serde_json::from_str(&warning).expect("JSON log line");
    assert_eq!(value["level"], "WARN", "{warning}");
    assert_eq!(
        value["variables"], "BROKER_PORT, BROKER_SERVICE_HOST",
        "{warning}"
    );
    let ready = wait_for_line(&mut lines, "MQTT listener ready").await;
    assert!(
        !ready.contains("Ignoring environment variables"),
        "one warning only"
    );
    let pid = child.id().expect("pid");
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    let mut rest = Vec::new();
    while let Ok(line) = lines.try_recv() {
        rest.push(line);
    }
    assert!(
        !rest
            .iter()
            .any(|l| l.contains("Ignoring environment variables")),
        "warned twice: {rest:?}"
    );

    let file = data.path().join("broker.toml");
    std::fs::write(&file, "[mqtt]\nport = 1883\n").expect("write config");
    let out = Command::new(BROKER)
        .arg("--config")
        .arg(&file)
        .output()
        .await
        .expect("run broker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `port`"), "{stderr}");
}

/// Issue: colour codes reached log files and pipes. The pretty format writes them only to a
/// terminal (and never with NO_COLOR).
#[tokio::test]
async fn pretty_logs_to_a_pipe_have_no_colour_codes() {
    let data = testkit::temp_dir("no-colour");
    let (mut child, mut lines) = spawn(1024, &data, &[("BROKER_LOG__FORMAT", "pretty")]);
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.recv().await {
            let ready = line.contains("MQTT listener ready");
            seen.push(line);
            if ready {
                return;
            }
        }
    })
    .await
    .expect("the broker gets ready");
    assert!(seen.len() > 2, "{seen:?}");
    for line in &seen {
        assert!(
            !line.contains('\x1b'),
            "colour code in a piped log: {line:?}"
        );
    }
    child.kill().await.expect("kill");
}

/// The address of the listener named `listener` in an "MQTT listener ready" line.
async fn listener_addr(
    lines: &mut mpsc::UnboundedReceiver<String>,
    listener: &str,
) -> std::net::SocketAddr {
    tokio::time::timeout(WAIT, async {
        loop {
            let line = wait_for_line(lines, "MQTT listener ready").await;
            let value: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if value["listener"] == listener {
                return value["listen"]
                    .as_str()
                    .expect("listen field")
                    .parse()
                    .expect("address");
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {listener} listener ready"))
}

async fn kill(child: &Child, signal: &str) {
    let pid = child.id().expect("pid");
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("kill");
    assert!(status.success());
}

/// An operator renews the certificate: SIGHUP makes new connections use it and keeps the
/// connections made before; a bad file on reload keeps the certificate in force. A certificate
/// file that cannot be read at start stops the broker, naming the key.
#[tokio::test]
async fn sighup_reloads_the_tls_certificate_without_dropping_a_connection() {
    use testkit::tls::{client_config, tls_connect, Ca, Validity};
    let data = testkit::temp_dir("tls-reload");
    let ca = Ca::new("Heartwire test CA");
    let (cert, key) = ca
        .server(&["localhost"], Validity::Now)
        .write(data.path(), "server");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let env = [
        ("BROKER_MQTT__TLS__LISTEN", "127.0.0.1:0"),
        ("BROKER_MQTT__TLS__CERT_FILE", cert.as_str()),
        ("BROKER_MQTT__TLS__KEY_FILE", key.as_str()),
    ];
    let (mut child, mut lines) = spawn(1024, &data, &env);
    let tls = listener_addr(&mut lines, "tls").await;

    let stream = tls_connect(tls, "localhost", client_config(&ca.pem(), None))
        .await
        .expect("TLS handshake");
    let (mut old, _) = RawClient::over(stream)
        .handshake(ConnectOpts::new("before-reload"))
        .await;

    let renewed = Ca::new("Heartwire renewed CA");
    renewed
        .server(&["localhost"], Validity::Now)
        .write(data.path(), "server");
    kill(&child, "HUP").await;
    wait_for_line(&mut lines, "TLS certificate files reloaded").await;
    tls_connect(tls, "localhost", client_config(&renewed.pem(), None))
        .await
        .expect("the renewed certificate is presented");

    std::fs::write(data.path().join("server.key"), "garbage").expect("write");
    kill(&child, "HUP").await;
    let line = wait_for_line(&mut lines, "not reloaded").await;
    assert!(line.contains("mqtt.tls.key_file"), "{line}");
    tls_connect(tls, "localhost", client_config(&renewed.pem(), None))
        .await
        .expect("still the renewed certificate");

    old.send(&Packet::PingReq).await;
    assert!(matches!(old.recv().await, Some(Packet::PingResp)));
    kill(&child, "TERM").await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");

    // At start, an unreadable certificate stops the broker with the key in the message.
    let out = Command::new(BROKER)
        .env("BROKER_MQTT__LISTEN", "127.0.0.1:0")
        .env("BROKER_HTTP__LISTEN", "127.0.0.1:0")
        .env("BROKER_DATABASE__URL", testkit::sqlite_url(&data))
        .env("BROKER_MQTT__TLS__LISTEN", "127.0.0.1:0")
        .env(
            "BROKER_MQTT__TLS__CERT_FILE",
            data.path().join("missing.crt"),
        )
        .env("BROKER_MQTT__TLS__KEY_FILE", &key)
        .output()
        .await
        .expect("run broker");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mqtt.tls.cert_file"), "{stderr}");
    assert!(stderr.contains("missing.crt"), "{stderr}");

    // A TLS listener without a certificate is a configuration error.
    let out = Command::new(BROKER)
        .env("BROKER_MQTT__TLS__LISTEN", "127.0.0.1:0")
        .output()
        .await
        .expect("run broker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mqtt.tls.cert_file"), "{stderr}");
}

/// `broker token NAME ROLE`: the token on the first line of its output, the tokens-file line on
/// the second.
async fn broker_token(name: &str, role: &str) -> (String, String) {
    let out = Command::new(BROKER)
        .args(["token", name, role])
        .output()
        .await
        .expect("run broker token");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    let mut lines = stdout.lines();
    let token = lines.next().expect("the token").to_owned();
    let line = lines.next().expect("the file line").to_owned();
    assert_eq!(lines.next(), None);
    (token, line)
}

/// Waits until /readyz at `http` answers 200 (the store is migrated).
async fn ready(http: std::net::SocketAddr) {
    testkit::eventually("broker ready", || testkit::http_get(http, "/readyz")).await;
}

/// GET `path` from `http` with `token` as bearer token; the status.
async fn status_with(http: std::net::SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    testkit::http_request(http, "GET", path, &headers, None)
        .await
        .expect("an HTTP answer")
        .status
}

/// An operator makes tokens with `broker token`, puts their lines in the tokens file and
/// starts the broker: each token works for its role; a token added later works after SIGHUP.
#[tokio::test]
async fn tokens_made_by_broker_token_protect_the_api_and_reload_on_sighup() {
    let data = testkit::temp_dir("api-tokens-bin");
    let (token, line) = broker_token("grafana", "read").await;
    assert!(token.len() >= 43, "32 random bytes: {token}");
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert!(line.starts_with("grafana read "), "{line}");
    assert!(!line.contains(&token), "the file never holds the token");
    let (other, _) = broker_token("grafana", "read").await;
    assert_ne!(token, other, "every token is new");
    let tokens = data.path().join("api-tokens");
    std::fs::write(&tokens, format!("{line}\n")).expect("write");
    let tokens_path = tokens.display().to_string();
    let mut started = start_with(
        1024,
        &data,
        &[("BROKER_HTTP__API_TOKENS_FILE", tokens_path.as_str())],
    )
    .await;
    let http = started.http;
    ready(http).await;
    assert_eq!(status_with(http, "/api/v1/stats", Some(&token)).await, 200);
    // A refusal is logged (at most once per interval), without the token.
    assert_eq!(
        status_with(http, "/api/v1/devices", Some("wrong-token")).await,
        401
    );
    let refused = wait_for_line(&mut started.lines, "API request refused").await;
    assert!(refused.contains("/api/v1/devices"), "{refused}");
    assert!(!refused.contains("wrong-token"), "{refused}");
    assert_eq!(status_with(http, "/api/v1/stats", None).await, 401);
    assert_eq!(status_with(http, "/metrics", None).await, 401);
    assert_eq!(status_with(http, "/healthz", None).await, 200);

    let (admin, admin_line) = broker_token("ops", "admin").await;
    assert_eq!(status_with(http, "/api/v1/stats", Some(&admin)).await, 401);
    std::fs::write(&tokens, format!("{line}\n{admin_line}\n")).expect("write");
    kill(&started.child, "HUP").await;
    wait_for_line(&mut started.lines, "API tokens file reloaded").await;
    assert_eq!(status_with(http, "/api/v1/stats", Some(&admin)).await, 200);
    let reload = testkit::http_request(
        http,
        "POST",
        "/api/v1/admin/reload",
        &[("Authorization", &format!("Bearer {admin}"))],
        None,
    )
    .await
    .expect("answer");
    assert_eq!(reload.status, 200, "{}", reload.body);
    kill(&started.child, "TERM").await;
    let status = tokio::time::timeout(WAIT, started.child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn broker_token_refuses_bad_names_and_roles() {
    for (name, role, want) in [
        ("two words", "read", "token name"),
        ("", "read", "token name"),
        ("ops", "write", "expected one of read, admin"),
    ] {
        let out = Command::new(BROKER)
            .args(["token", name, role])
            .output()
            .await
            .expect("run broker token");
        assert_eq!(out.status.code(), Some(1), "{name:?} {role:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{name:?} {role:?}: {stderr}");
        assert!(out.stdout.is_empty(), "no token printed");
    }
}

/// A tokens file with a line that does not parse stops the broker, naming the key, the file,
/// the line and what is valid.
#[tokio::test]
async fn a_malformed_tokens_file_line_stops_the_start() {
    let data = testkit::temp_dir("api-tokens-bad");
    let (_, line) = broker_token("ok", "read").await;
    let tokens = data.path().join("api-tokens");
    let hex = line.rsplit(' ').next().expect("hex");
    for (bad, want) in [
        (
            format!("ops superuser {}", hex.replace('0', "1")),
            "expected one of read, admin",
        ),
        ("ops admin".to_owned(), "expected 3 fields"),
        (
            format!("ok admin {}", hex.replace('1', "2")),
            "duplicate token name ok",
        ),
        ("ops admin 1234".to_owned(), "64 lowercase hex"),
    ] {
        std::fs::write(&tokens, format!("# tokens\n{line}\n{bad}\n")).expect("write");
        let out = Command::new(BROKER)
            .env("BROKER_MQTT__LISTEN", "127.0.0.1:0")
            .env("BROKER_HTTP__LISTEN", "127.0.0.1:0")
            .env("BROKER_DATABASE__URL", testkit::sqlite_url(&data))
            .env("BROKER_PERSISTENCE__DIR", data.path().join("state"))
            .env("BROKER_PERSISTENCE__SEGMENT_BYTES", "1048576")
            .env("BROKER_PERSISTENCE__SEGMENT_BYTES", "1048576")
            .env(
                "BROKER_BRIDGE__JOURNAL_PATH",
                data.path().join("presence.journal"),
            )
            .env("BROKER_HTTP__API_TOKENS_FILE", &tokens)
            .output()
            .await
            .expect("run broker");
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("http.api_tokens_file"), "{stderr}");
        assert!(stderr.contains("line 3"), "{bad}: {stderr}");
        assert!(stderr.contains(want), "{bad}: want {want:?} in {stderr}");
    }
}

/// An HTTP listener other machines can reach needs a tokens file, or says explicitly that
/// anyone may use the API.
#[tokio::test]
async fn an_api_open_to_the_network_needs_tokens_or_allow_anonymous() {
    let data = testkit::temp_dir("api-open");
    let out = Command::new(BROKER)
        .env("BROKER_HTTP__LISTEN", "0.0.0.0:0")
        .output()
        .await
        .expect("run broker");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        "http.listen",
        "http.api_tokens_file",
        "http.allow_anonymous",
    ] {
        assert!(stderr.contains(key), "{key} in: {stderr}");
    }

    let mut started = start_with(
        1024,
        &data,
        &[
            ("BROKER_HTTP__LISTEN", "0.0.0.0:0"),
            ("BROKER_HTTP__ALLOW_ANONYMOUS", "true"),
        ],
    )
    .await;
    assert!(started.http.ip().is_unspecified(), "{}", started.http);
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], started.http.port()));
    ready(local).await;
    assert_eq!(status_with(local, "/api/v1/stats", None).await, 200);
    let _ = started.child.start_kill();
    let _ = started.child.wait().await;
}
