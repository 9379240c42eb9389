//! device-sim over `--ws` and `--wss` against Heartwire before it has WebSocket listeners: a
//! WebSocket-to-TCP bridge in the test accepts `ws://…/mqtt` with the `mqtt` subprotocol (for
//! `wss`, behind a rustls acceptor with a `localhost` certificate from [`TestPki`]) and relays
//! the MQTT bytes to the in-process broker's TCP listener. Each run checks what device-sim
//! sends (path, subprotocol, TLS name) and that every device connects; a churn over wss is
//! checked by `device-sim verify` against the broker's presence API.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use async_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use async_tungstenite::tungstenite::http::{self, HeaderValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use ws_stream_tungstenite::WsStream;

use common::{sim, SIM_WAIT};
use testkit::{temp_dir, FullBroker, TestPki};

/// The WebSocket path the bridge serves (Heartwire's default `mqtt.ws.path`).
const PATH: &str = "/mqtt";

/// A WebSocket endpoint relaying to a broker's MQTT TCP listener; stops when dropped.
struct Bridge {
    addr: SocketAddr,
    /// The accept loop, which owns the relays (dropping it aborts them all).
    _tasks: JoinSet<()>,
}

impl Bridge {
    async fn start(broker: SocketAddr, tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut relays = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let tls = tls.clone();
                relays.spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                relay(stream, broker).await;
                            }
                        }
                        None => relay(tcp, broker).await,
                    }
                });
                // Reap finished relays so the set does not grow with every connection.
                while relays.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            _tasks: tasks,
        }
    }
}

/// The WebSocket handshake (path and subprotocol checked, `mqtt` answered), then the bytes of
/// the binary messages both ways until either side closes.
async fn relay<S>(stream: S, broker: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The Result type is tungstenite's handshake callback signature.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        let refuse = |status: u16, why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_owned()));
            *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
            r
        };
        if request.uri().path() != PATH {
            return Err(refuse(404, "no WebSocket endpoint at this path"));
        }
        let offered = request
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|p| p.trim() == "mqtt"));
        if !offered {
            return Err(refuse(400, "subprotocol mqtt required"));
        }
        response
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        Ok(response)
    };
    let Ok(ws) = async_tungstenite::tokio::accept_hdr_async(stream, check).await else {
        return;
    };
    let Ok(mut upstream) = TcpStream::connect(broker).await else {
        return;
    };
    let mut ws = WsStream::new(ws);
    let _ = tokio::io::copy_bidirectional(&mut ws, &mut upstream).await;
}

/// A TLS acceptor with the PKI's `localhost` server certificate.
fn acceptor(pki: &TestPki) -> TlsAcceptor {
    let server = pki.server(&["localhost"]);
    let chain = CertificateDer::pem_file_iter(&server.cert)
        .expect("server cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("server cert");
    let key = PrivateKeyDer::from_pem_file(&server.key).expect("server key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("server config");
    TlsAcceptor::from(Arc::new(config))
}

/// One device-sim run: exit code, `--json` summary, and output.
struct Run {
    code: Option<i32>,
    summary: serde_json::Value,
    output: String,
}

/// Runs `device-sim run` for 2 s on port `port` with `args` after the common ones.
async fn run(port: u16, dir: &Path, name: &str, args: &[&str]) -> Run {
    let json = dir.join(format!("{name}.json"));
    let out = tokio::time::timeout(
        SIM_WAIT,
        sim()
            .args(["run", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--duration",
                "2",
                "--keepalive",
                "5",
                "--connect-timeout",
                "3",
            ])
            .arg("--json")
            .arg(&json)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .expect("device-sim ends in time")
    .expect("device-sim runs");
    Run {
        code: out.status.code(),
        summary: std::fs::read_to_string(&json)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_connect_over_ws_and_wss_and_verify_agrees() {
    let broker = FullBroker::start_sqlite().await;
    let pki = TestPki::new("wss");
    let ws = Bridge::start(broker.mqtt, None).await;
    let wss = Bridge::start(broker.mqtt, Some(acceptor(&pki))).await;
    let dir = temp_dir("websocket");
    let truth = dir.path().join("truth.jsonl");
    let (ca, truth_arg) = (
        pki.ca_file().display().to_string(),
        truth.display().to_string(),
    );
    let wss_args = [
        "--wss",
        "--cafile",
        &ca,
        "--tls-server-name",
        "localhost",
        "--count",
        "6",
        "--prefix",
        "wss-",
        "--scenario",
        "churn",
        "--churn-mix",
        "clean,abrupt",
        "--churn-percent",
        "1200",
        "--churn-pause",
        "0.1",
        "--truth",
        &truth_arg,
    ];
    let no_name_args = [
        "--wss", "--cafile", &ca, "--count", "1", "--prefix", "name-",
    ];
    let (plain, secure, wrong_path, no_name) = tokio::join!(
        run(
            ws.addr.port(),
            dir.path(),
            "ws",
            &["--ws", "--count", "4", "--prefix", "ws-"]
        ),
        run(wss.addr.port(), dir.path(), "wss", &wss_args),
        run(
            ws.addr.port(),
            dir.path(),
            "path",
            &[
                "--ws",
                "--ws-path",
                "/elsewhere",
                "--count",
                "1",
                "--prefix",
                "path-"
            ],
        ),
        run(wss.addr.port(), dir.path(), "name", &no_name_args,),
    );

    assert_eq!(plain.code, Some(0), "{}", plain.output);
    assert_eq!(plain.summary["connected"], 4, "{}", plain.output);
    assert_eq!(plain.summary["errors"]["total"], 0, "{}", plain.output);

    assert_eq!(secure.code, Some(0), "{}", secure.output);
    assert_eq!(
        secure.summary["errors"]["connect_failed"], 0,
        "{}",
        secure.output
    );
    assert!(
        secure.summary["reconnects"].as_u64() > Some(0),
        "{}",
        secure.output
    );

    // The bridge answers 404 elsewhere than /mqtt; the certificate names localhost, not
    // 127.0.0.1, so without --tls-server-name the TLS handshake fails.
    assert_eq!(wrong_path.code, Some(3), "{}", wrong_path.output);
    assert!(wrong_path.output.contains("404"), "{}", wrong_path.output);
    assert_eq!(no_name.code, Some(3), "{}", no_name.output);
    assert!(no_name.output.contains("certificate"), "{}", no_name.output);

    // What the broker recorded for the wss churn matches the truth.
    let out = tokio::time::timeout(
        SIM_WAIT,
        sim()
            .args(["verify", "--api", &broker.api(), "--settle", "1", "--truth"])
            .arg(&truth)
            .output(),
    )
    .await
    .expect("verify ends in time")
    .expect("verify runs");
    assert!(
        out.status.success(),
        "verify disagrees: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
