//! The operators' stack as shipped (`docker-compose.yml`, `prometheus/`, `grafana/`), checked
//! without Docker:
//!
//! * the compose file, the Prometheus config, Grafana's provisioning and the dashboards parse, and
//!   every file, service, datasource and dashboard path they refer to exists; the image copies
//!   every workspace member; the TLS certificate the broker and the demo fleets read is the one
//!   the one-shot `certs` service makes, in a volume they share;
//! * `scripts/dev-certs.sh` (the `certs` service) keeps what it made, refuses a partial set and
//!   replaces it with `--force`;
//! * against a live system — the broker on a real PostgreSQL with the stack's TLS, WebSocket and
//!   WSS listeners and the script's certificate, device-sim runs over TCP (with
//!   `--metrics-listen`), TLS and WSS, one failed TLS handshake, and a real Prometheus (Debian's
//!   `prometheus`, or `PROMETHEUS_BIN`) scraping with the repository's scrape jobs — every PromQL
//!   expression of every dashboard (variables substituted) is valid and returns at least one
//!   series, and every SQL query (Grafana macros expanded) runs and returns at least one row.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::{Connection, Row};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};

use common::{holding, sim_run, SIM_WAIT};
use testkit::{free_port, http_get, http_response, pg, temp_dir, FullBroker, TempDir};

/// Datasource uids the dashboards may use, as provisioned.
const PROMETHEUS_UID: &str = "heartwire-prometheus";
const POSTGRES_UID: &str = "heartwire-postgres";
/// What the dashboard variables of PromQL expressions become.
const PROM_VARIABLES: [(&str, &str); 4] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "15s"),
    ("$__range", "1h"),
    ("$instance", ".*"),
];
/// Samples each scrape job must have before rates are meaningful.
const MIN_SCRAPES: u64 = 4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

/// Every dashboard file with its parsed JSON.
fn dashboards() -> Vec<(PathBuf, Value)> {
    let dir = repo().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the three dashboards in {}",
        dir.display()
    );
    files
        .into_iter()
        .map(|p| {
            let v =
                serde_json::from_str(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, v)
        })
        .collect()
}

/// A query found in a dashboard.
#[derive(Debug, Clone)]
struct Query {
    /// "dashboard / panel (refId)".
    at: String,
    uid: String,
    text: String,
}

fn datasource_uid(v: &Value) -> Option<String> {
    v.get("datasource")?.get("uid")?.as_str().map(str::to_owned)
}

/// Every panel target (rows' nested panels included) and every query variable of `dash`.
fn queries(name: &str, dash: &Value) -> Vec<Query> {
    fn walk(name: &str, panels: &[Value], out: &mut Vec<Query>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            let panel_uid = datasource_uid(panel);
            for t in panel["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                let uid = datasource_uid(t)
                    .or_else(|| panel_uid.clone())
                    .unwrap_or_else(|| panic!("{name} / {title}: target without a datasource"));
                let text = t
                    .get("expr")
                    .or_else(|| t.get("rawSql"))
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| panic!("{name} / {title}: target without expr or rawSql"));
                out.push(Query {
                    at: format!("{name} / {title} ({})", t["refId"].as_str().unwrap_or("?")),
                    uid,
                    text: text.to_owned(),
                });
            }
            if let Some(inner) = panel["panels"].as_array() {
                walk(name, inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        name,
        dash["panels"].as_array().map(Vec::as_slice).unwrap_or(&[]),
        &mut out,
    );
    for var in dash["templating"]["list"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        if var["type"] != "query" {
            continue;
        }
        let query = match &var["query"] {
            Value::String(s) => s.clone(),
            q => q["query"]
                .as_str()
                .or_else(|| q["rawSql"].as_str())
                .unwrap_or_default()
                .to_owned(),
        };
        out.push(Query {
            at: format!("{name} / variable {}", var["name"].as_str().unwrap_or("?")),
            uid: datasource_uid(var).unwrap_or_default(),
            text: query,
        });
    }
    out
}

/// The source of a volume "SOURCE:TARGET[:ro]" whose target is `target`.
fn volume_source<'a>(service: &'a Value, target: &str) -> Option<&'a str> {
    service["volumes"].as_array()?.iter().find_map(|v| {
        let v = v.as_str()?;
        let mut parts = v.split(':');
        let (src, dst) = (parts.next()?, parts.next()?);
        (dst == target).then_some(src)
    })
}

/// The compose file, Prometheus config, provisioning and dashboards agree with each other and
/// with the repository.
#[test]
fn stack_files_parse_and_reference_what_exists() {
    let root = repo();
    let compose = yaml(&root.join("docker-compose.yml"));
    let services = compose["services"]
        .as_object()
        .expect("docker-compose.yml: services");
    for name in [
        "postgres",
        "broker",
        "prometheus",
        "grafana",
        "demo-devices",
        "device-sim",
    ] {
        assert!(services.contains_key(name), "compose: no service {name}");
    }
    assert_eq!(
        services["device-sim"]["profiles"],
        serde_json::json!(["soak"]),
        "device-sim runs under the soak profile"
    );
    // Build contexts, Dockerfiles and every COPY source in them; bind-mount sources.
    for (name, svc) in services {
        if let Some(build) = svc.get("build") {
            let (context, dockerfile) = match build {
                Value::String(c) => (c.as_str(), "Dockerfile"),
                b => (
                    b["context"].as_str().unwrap_or("."),
                    b["dockerfile"].as_str().unwrap_or("Dockerfile"),
                ),
            };
            let context = root.join(context);
            let dockerfile = context.join(dockerfile);
            for line in read(&dockerfile).lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if words.first() != Some(&"COPY") || words.iter().any(|w| w.starts_with("--from")) {
                    continue;
                }
                let sources = words[1..words.len() - 1]
                    .iter()
                    .filter(|w| !w.starts_with("--"));
                for src in sources {
                    assert!(
                        context.join(src).exists(),
                        "{}: COPY source {src} does not exist",
                        dockerfile.display()
                    );
                }
            }
            assert!(
                svc["image"].is_string(),
                "compose: {name} builds but names no image for the others to reuse"
            );
        }
        for v in svc["volumes"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let Some(src) = v.as_str().and_then(|v| v.split(':').next()) else {
                continue;
            };
            if src.starts_with('.') || src.starts_with('/') {
                assert!(
                    root.join(src).exists(),
                    "compose: {name} mounts {src}, which does not exist"
                );
            }
        }
    }
    // The image builds the workspace: cargo loads every member's manifest, dev-only ones too.
    let manifest = read(&root.join("Cargo.toml"));
    let members = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = ["))
        .expect("Cargo.toml: workspace members on one line");
    let dockerfile = read(&root.join("Dockerfile"));
    for member in members.split(',').map(|m| m.trim_matches([' ', '"', ']'])) {
        let copied = dockerfile.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&"COPY") && words.contains(&member)
        });
        assert!(
            copied,
            "Dockerfile: workspace member {member} is not copied"
        );
    }

    tls_wiring(services);

    let grafana = &services["grafana"];
    let env = serde_json::to_string(&grafana["environment"]).expect("json");
    assert!(
        env.contains("${GRAFANA_ADMIN_PASSWORD:-"),
        "grafana's admin password comes from GRAFANA_ADMIN_PASSWORD with a default: {env}"
    );

    // Prometheus scrapes the compose services on ports they expose inside the network.
    let prom_src = volume_source(&services["prometheus"], "/etc/prometheus/prometheus.yml")
        .expect("compose: prometheus mounts its config");
    let prom = yaml(&root.join(prom_src));
    let mut jobs = BTreeSet::new();
    for job in prom["scrape_configs"].as_array().expect("scrape_configs") {
        jobs.insert(str_of(&job["job_name"], "job_name").to_owned());
        for sc in job["static_configs"].as_array().expect("static_configs") {
            for t in sc["targets"].as_array().expect("targets") {
                let host = str_of(t, "target").split(':').next().unwrap_or_default();
                assert!(
                    services.contains_key(host),
                    "prometheus target {t} is no compose service"
                );
            }
        }
    }
    assert!(
        jobs.contains("heartwire") && jobs.contains("device-sim"),
        "{jobs:?}"
    );

    // Grafana: provisioning and dashboards are mounted, datasources have the uids dashboards use.
    let provisioning = volume_source(grafana, "/etc/grafana/provisioning")
        .expect("compose: grafana mounts provisioning");
    let provisioning = root.join(provisioning);
    let ds = yaml(&provisioning.join("datasources/datasources.yml"));
    let mut uids = BTreeMap::new();
    for d in ds["datasources"].as_array().expect("datasources") {
        uids.insert(
            str_of(&d["uid"], "uid").to_owned(),
            str_of(&d["url"], "url").to_owned(),
        );
    }
    for (uid, service) in [(PROMETHEUS_UID, "prometheus"), (POSTGRES_UID, "postgres")] {
        let url = uids
            .get(uid)
            .unwrap_or_else(|| panic!("no datasource {uid}"));
        assert!(
            url.contains(service),
            "{uid} points at {url}, not {service}"
        );
    }
    let providers = yaml(&provisioning.join("dashboards/dashboards.yml"));
    let path = str_of(
        &providers["providers"][0]["options"]["path"],
        "dashboard provider path",
    );
    let mounted = volume_source(grafana, path)
        .unwrap_or_else(|| panic!("compose: grafana mounts nothing at {path}"));
    assert!(root.join(mounted).join("broker-overview.json").exists());

    let mut dashboard_uids = BTreeSet::new();
    for (file, dash) in dashboards() {
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            dashboard_uids.insert(str_of(&dash["uid"], "dashboard uid").to_owned()),
            "{name}: duplicate uid"
        );
        let qs = queries(&name, &dash);
        assert!(!qs.is_empty(), "{name}: no queries");
        for q in qs {
            assert!(
                uids.contains_key(&q.uid),
                "{}: unknown datasource {}",
                q.at,
                q.uid
            );
        }
    }
}

/// The stack's TLS: the broker's certificate and key, and every `--cafile` of a service, are in
/// the named volume that the `certs` service fills, and the broker starts after it succeeded.
fn tls_wiring(services: &serde_json::Map<String, Value>) {
    let broker = &services["broker"];
    let env = |key: &str| {
        broker["environment"][key]
            .as_str()
            .unwrap_or_else(|| panic!("compose: broker sets no {key}"))
            .to_owned()
    };
    for key in [
        "BROKER_MQTT__TLS__LISTEN",
        "BROKER_MQTT__WS__LISTEN",
        "BROKER_MQTT__WSS__LISTEN",
    ] {
        let port = env(key).rsplit(':').next().unwrap_or_default().to_owned();
        let published = broker["ports"]
            .as_array()
            .expect("compose: broker ports")
            .iter()
            .any(|p| p.as_str() == Some(&format!("{port}:{port}")));
        assert!(
            published,
            "compose: broker does not publish {key}'s port {port}"
        );
    }
    let cert = env("BROKER_MQTT__TLS__CERT_FILE");
    let key = env("BROKER_MQTT__TLS__KEY_FILE");
    let dir = Path::new(&cert).parent().expect("cert directory");
    assert_eq!(
        Path::new(&key).parent(),
        Some(dir),
        "certificate and key in one directory"
    );
    let dir = dir.to_str().expect("utf-8");

    let certs = &services["certs"];
    let volume = volume_source(certs, dir)
        .unwrap_or_else(|| panic!("compose: the certs service mounts nothing at {dir}"));
    assert!(
        !volume.starts_with('.') && !volume.starts_with('/'),
        "compose: certificates in a named volume, not on the host: {volume}"
    );
    assert!(
        certs["command"]
            .as_array()
            .is_some_and(|c| c.iter().any(|a| a == dir)),
        "compose: the certs service writes to {dir}: {}",
        certs["command"]
    );
    assert_eq!(
        broker["depends_on"]["certs"]["condition"], "service_completed_successfully",
        "compose: the broker starts once the certificates exist"
    );
    for (name, svc) in services {
        let mounts_at = |path: &str| {
            svc["volumes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .filter_map(Value::as_str)
                .any(|v| {
                    let mut parts = v.split(':');
                    parts.next() == Some(volume)
                        && parts.next().is_some_and(|t| Path::new(path).starts_with(t))
                })
        };
        if name == "broker" {
            assert!(
                mounts_at(&cert),
                "compose: broker does not mount {volume} at {dir}"
            );
        }
        let args = svc["command"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        for cafile in args
            .iter()
            .filter_map(|a| a.as_str()?.strip_prefix("--cafile="))
        {
            assert!(
                mounts_at(cafile),
                "compose: {name} reads {cafile} from no {volume} mount"
            );
        }
    }
}

/// `scripts/dev-certs.sh ARGS` to its end: success, and what it printed.
fn dev_certs(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("sh")
        .arg(repo().join("scripts/dev-certs.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sh scripts/dev-certs.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The certificate generator of the stack keeps what it made (so `up` after `down` changes
/// nothing), refuses to complete a partial set, and starts over with `--force`.
#[test]
fn dev_certs_keeps_refuses_and_forces() {
    let dir = temp_dir("dev-certs");
    let path = dir.path().join("certs");
    let target = path.to_str().expect("utf-8");
    let files = ["ca.crt", "server.crt", "server.key"].map(|f| path.join(f));
    let contents = || {
        files
            .each_ref()
            .map(|f| std::fs::read(f).unwrap_or_default())
    };

    let (ok, out) = dev_certs(&[target]);
    assert!(ok, "{out}");
    let made = contents();
    assert!(made.iter().all(|c| !c.is_empty()), "{out}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files[2])
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "server.key is private");
    }
    let left: Vec<_> = std::fs::read_dir(&path)
        .expect("certs")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(left.len(), 3, "only the three files, no CA key: {left:?}");

    let (ok, out) = dev_certs(&[target]);
    assert!(ok && out.contains("keeping"), "{out}");
    assert_eq!(contents(), made, "a second run changes nothing");

    std::fs::remove_file(&files[0]).expect("remove ca.crt");
    let (ok, out) = dev_certs(&[target]);
    assert!(!ok && out.contains("--force"), "{out}");
    assert!(!files[0].exists(), "a refused run writes nothing");

    let (ok, out) = dev_certs(&["--force", target]);
    assert!(ok, "{out}");
    let remade = contents();
    assert!(remade.iter().all(|c| !c.is_empty()), "{out}");
    assert_ne!(remade[1], made[1], "--force makes a new certificate");
}

/// Expands the Grafana macros and `$device` in `sql`; panics on anything else starting with `$`.
fn expand_sql(sql: &str, from: &str, to: &str, device: &str) -> String {
    let mut out = sql
        .replace("$__timeFrom()", &format!("'{from}'"))
        .replace("$__timeTo()", &format!("'{to}'"))
        .replace("${device}", device)
        .replace("$device", device);
    while let Some(start) = out.find("$__timeFilter(") {
        let args = start + "$__timeFilter(".len();
        let end = args + out[args..].find(')').expect("closing parenthesis");
        let column = out[args..end].trim().to_owned();
        out.replace_range(
            start..=end,
            &format!("{column} BETWEEN '{from}' AND '{to}'"),
        );
    }
    assert!(!out.contains('$'), "unexpanded variable or macro in: {out}");
    out
}

/// Substitutes the dashboard variables of a PromQL expression.
fn expand_promql(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (var, value) in PROM_VARIABLES {
        out = out.replace(&format!("${{{}}}", &var[1..]), value);
        out = out.replace(var, value);
    }
    assert!(!out.contains('$'), "unexpanded variable in: {out}");
    out
}

/// `label_values(METRIC, LABEL)` (a Grafana function) as the PromQL `METRIC`.
fn variable_promql(query: &str) -> String {
    query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|rest| rest.rsplit_once(','))
        .map(|(metric, _)| metric.trim().to_owned())
        .unwrap_or_else(|| query.to_owned())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server. It runs under a small shell that kills it as soon as our end of its
/// stdin closes, so it never outlives the test, however the test ends.
struct Prometheus {
    addr: String,
    guard: Option<ChildStdin>,
    child: Child,
    _dir: TempDir,
}

impl Drop for Prometheus {
    /// Closes the shell's stdin (it then stops Prometheus) and waits, bounded, for both to end
    /// before the data directory goes.
    fn drop(&mut self) {
        drop(self.guard.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Prometheus {
    fn binary() -> PathBuf {
        if let Some(p) = std::env::var_os("PROMETHEUS_BIN") {
            return PathBuf::from(p);
        }
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("prometheus"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no prometheus binary: install Debian's prometheus package (./test.sh does) or \
                     set PROMETHEUS_BIN"
                )
            })
    }

    /// Starts Prometheus with the repository's scrape jobs, each pointed at `targets[job]`, at a
    /// 1 s scrape interval.
    async fn start(targets: &BTreeMap<&str, String>) -> Self {
        let dir = temp_dir("prometheus");
        let mut config = yaml(&repo().join("prometheus/prometheus.yml"));
        config["global"]["scrape_interval"] = "1s".into();
        config["global"]["evaluation_interval"] = "1s".into();
        for job in config["scrape_configs"]
            .as_array_mut()
            .expect("scrape_configs")
        {
            let name = str_of(&job["job_name"], "job_name").to_owned();
            let target = targets
                .get(name.as_str())
                .unwrap_or_else(|| panic!("no local target for job {name}"));
            job["static_configs"] = serde_json::json!([{ "targets": [target] }]);
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(
            &config_path,
            serde_norway::to_string(&config).expect("yaml"),
        )
        .expect("write config");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.path().join("prometheus.log");
        let mut child = tokio::process::Command::new("sh")
            .args([
                "-c",
                r#"log="$1"; shift; "$0" "$@" >"$log" 2>&1 & p=$!; cat >/dev/null; kill $p; wait $p"#,
            ])
            .arg(Self::binary())
            .arg(&log)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::piped())
            .spawn()
            .expect("start prometheus");
        let guard = child.stdin.take().expect("stdin");
        let prometheus = Self {
            addr,
            guard: Some(guard),
            child,
            _dir: dir,
        };
        // From here on, Drop stops it, also when the wait below panics.
        let deadline = Instant::now() + SIM_WAIT;
        while http_get(&prometheus.addr, "/-/ready").await.is_none() {
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    /// Runs an instant query; the API's JSON answer.
    async fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", percent_encode(promql));
        let body = http_response(&self.addr, &path)
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        serde_json::from_str(&body).unwrap_or_else(|_| serde_json::json!({ "error": body }))
    }
}

/// Each series' value of an instant query answer, by the value of `label`.
fn by_label(answer: &Value, label: &str) -> BTreeMap<String, f64> {
    answer["data"]["result"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|s| {
            let value = s["value"][1].as_str()?.parse().ok()?;
            Some((s["metric"][label].as_str()?.to_owned(), value))
        })
        .collect()
}

/// Number of series in a successful query answer.
fn series(answer: &Value) -> Option<usize> {
    (answer["status"] == "success").then(|| answer["data"]["result"].as_array().map_or(0, Vec::len))
}

/// The live check: every dashboard query answers with data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data() {
    let db = pg::TestPostgres::start().await;
    // The listeners of the compose stack (TLS, WebSocket, WSS besides TCP) with the certificate
    // its `certs` service makes.
    let cert_dir = temp_dir("dev-certs");
    let certs = cert_dir.path().to_str().expect("utf-8").to_owned();
    let (ok, out) = dev_certs(&[&certs]);
    assert!(ok, "{out}");
    let data = temp_dir("broker");
    let mut config = FullBroker::config(db.url(), data.path(), "test-node");
    let any = Some("127.0.0.1:0".parse().expect("address"));
    config.mqtt.tls.listen = any;
    config.mqtt.tls.cert_file = Some(Path::new(&certs).join("server.crt"));
    config.mqtt.tls.key_file = Some(Path::new(&certs).join("server.key"));
    config.mqtt.ws.listen = any;
    config.mqtt.wss.listen = any;
    let broker = FullBroker::start(config).await;
    broker.ready().await;
    let sim_metrics = format!("127.0.0.1:{}", free_port());
    let targets = BTreeMap::from([
        ("heartwire", broker.http.to_string()),
        ("device-sim", sim_metrics.clone()),
    ]);
    let prometheus = Prometheus::start(&targets).await;

    // Churn with every way of leaving (keep-alive 1 s: silent deaths end as keep-alive
    // timeouts), QoS 1 telemetry; the survivors stay connected, so the simulator keeps serving
    // its metrics while the queries run.
    let mut run = sim_run(broker.mqtt.port())
        .args([
            "--count",
            "60",
            "--keepalive",
            "1",
            "--scenario",
            "churn",
            "--churn-percent",
            "300",
            "--churn-pause",
            "0.2",
            "--publish-interval",
            "0.5",
            "--qos",
            "1",
            "--duration",
            "5",
            "--end-state",
            "keep",
            "--metrics-listen",
            &sim_metrics,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("device-sim runs");
    // A few devices over TLS and over WSS, as the stack's demo-devices-tls and -wss run them:
    // trusting the script's CA, and checking the name the certificate gives the compose service.
    let mut secure = Vec::new();
    for (transport, listener) in [("tls", broker.tls), ("wss", broker.wss)] {
        let port = listener.expect("listener").port();
        let cafile = format!("{certs}/ca.crt");
        let prefix = format!("{transport}-");
        let mut child = sim_run(port)
            .args(["--cafile", &cafile])
            .args([&format!("--{transport}"), "--tls-server-name", "broker"])
            .args(["--prefix", &prefix, "--count", "5", "--keepalive", "5"])
            .args(["--duration", "1", "--end-state", "keep"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("device-sim runs");
        let (_, lines) = holding(&mut child).await;
        secure.push((child, lines));
    }
    let (_, _lines) = holding(&mut run).await;

    // Enough scrapes of both jobs for rates over the substituted $__rate_interval.
    let deadline = Instant::now() + SIM_WAIT;
    loop {
        let answer = prometheus
            .query("min by (job) (count_over_time(up[1m])) and min by (job) (up) == 1")
            .await;
        let scraped: Vec<u64> = answer["data"]["result"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
                    .map(|v| v as u64)
                    .collect()
            })
            .unwrap_or_default();
        if scraped.len() == targets.len() && scraped.iter().all(|&n| n >= MIN_SCRAPES) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scrapes not up in time: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A client that speaks MQTT to the TLS port: one failed handshake (`not_tls`) for the
    // handshake failures panel, whose per-reason series shows only pairs that failed. After the
    // scrapes began, so that Prometheus sees the counter rise from 0.
    let mut plain = tokio::net::TcpStream::connect(broker.tls.expect("tls"))
        .await
        .expect("connect");
    // CONNECT, MQTT 3.1.1, clean session, keep-alive 30 s, client id "p".
    let connect = b"\x10\x0d\x00\x04MQTT\x04\x02\x00\x1e\x00\x01p";
    plain.write_all(connect).await.expect("write");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(SIM_WAIT, plain.read_to_end(&mut answer)).await;

    // Prometheus has seen every transport's connections and the failed handshake.
    let deadline = Instant::now() + SIM_WAIT;
    loop {
        let open = prometheus
            .query("sum by (listener) (heartwire_listener_connections)")
            .await;
        let failed = prometheus
            .query(concat!(
                "sum by (listener, reason) ",
                "(rate(heartwire_transport_handshake_failures_total[1m])) > 0"
            ))
            .await;
        let open = by_label(&open, "listener");
        let failed = by_label(&failed, "reason");
        let held = [("tls", 5.0), ("wss", 5.0)];
        if open.get("tcp").is_some_and(|&n| n > 0.0)
            && held.iter().all(|(l, n)| open.get(*l) == Some(n))
            && open.get("ws") == Some(&0.0)
            && failed.contains_key("not_tls")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "transports not scraped in time: open {open:?}, failed {failed:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut conn = sqlx::PgConnection::connect(db.url())
        .await
        .expect("connect");
    let to = chrono::Utc::now() + chrono::Duration::seconds(5);
    let from = to - chrono::Duration::hours(1);
    let (from, to) = (
        from.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        to.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
    );

    let mut failures = Vec::new();
    let (mut promql_checked, mut sql_checked) = (0, 0);
    for (file, dash) in dashboards() {
        let name = file
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let all = queries(&name, &dash);
        // The device variable first: the first device it lists is what the panels get.
        let mut device = String::new();
        if let Some(q) = all.iter().find(|q| q.at.ends_with("variable device")) {
            let sql = expand_sql(&q.text, &from, &to, "");
            if let Ok(Some(row)) = sqlx::query(&sql).fetch_optional(&mut conn).await {
                device = row.try_get::<String, _>(0).unwrap_or_default();
            }
        }
        for q in all {
            if q.uid == PROMETHEUS_UID {
                promql_checked += 1;
                let expr = if q.at.contains("/ variable ") {
                    variable_promql(&q.text)
                } else {
                    expand_promql(&q.text)
                };
                let answer = prometheus.query(&expr).await;
                match series(&answer) {
                    Some(n) if n > 0 => {}
                    Some(_) => failures.push(format!("{}: no series for {expr}", q.at)),
                    None => failures.push(format!("{}: {expr}: {answer}", q.at)),
                }
            } else {
                sql_checked += 1;
                let sql = expand_sql(&q.text, &from, &to, &device);
                match sqlx::query(&sql).fetch_all(&mut conn).await {
                    Ok(rows) if !rows.is_empty() => {}
                    Ok(_) => failures.push(format!("{}: no rows for {sql}", q.at)),
                    Err(e) => failures.push(format!("{}: {e}: {sql}", q.at)),
                }
            }
        }
    }
    eprintln!("checked {promql_checked} PromQL expressions and {sql_checked} SQL queries");
    assert!(
        promql_checked >= 20 && sql_checked >= 5,
        "{promql_checked} PromQL, {sql_checked} SQL"
    );
    assert!(
        failures.is_empty(),
        "{} of {} queries failed:\n{}",
        failures.len(),
        promql_checked + sql_checked,
        failures.join("\n")
    );

    // A fresh database: nothing may have failed (the heartbeat once ran before the migrations,
    // which turned the dashboards' "store errors" stat red on every first start).
    let errors = prometheus
        .query("sum(heartwire_store_errors_total) + sum(heartwire_bridge_lost_events_total)")
        .await;
    assert_eq!(errors["data"]["result"][0]["value"][1], "0", "{errors}");

    for mut child in secure.into_iter().map(|(c, _)| c).chain([run]) {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    broker.stop().await;
}
