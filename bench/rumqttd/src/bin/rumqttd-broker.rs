//! rumqttd 0.20.0 as a standalone MQTT 3.1.1 broker, for the comparison benchmarks.
//!
//! Settings follow rumqttd's own example `rumqttd.toml` (router segments, connection timeout,
//! inflight window) with three changes: `max_connections` and `max_payload_size` are raised so
//! that 10,000+ clients and 1 MiB packets fit (Heartwire's default packet limit), and
//! `next_connection_delay_ms` is 0 instead of 1, rumqttd's fastest accept setting (with 1, 2,000
//! connects at 1,000/s get CONNACK p50 ~1.3 s instead of ~145 ms). No console, Prometheus,
//! websocket, v5 or TLS listener is started, so the only port used is `--listen`.
//!
//! `Broker::start()` blocks forever (and returns `Ok(())` when its listener failed), so it runs
//! on its own thread; the main thread prints `rumqttd listening on ADDR` once the port accepts
//! TCP and exits the process on SIGINT/SIGTERM, or with an error if the broker thread ends.
//! Logging: `RUST_LOG` (default `warn`); note that rumqttd logs every ordinary disconnect at
//! ERROR level.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

#[derive(Debug, Parser)]
#[command(about = "rumqttd 0.20.0 with one MQTT 3.1.1 (v4) TCP listener")]
struct Args {
    /// Address of the MQTT 3.1.1 listener.
    #[arg(long, default_value = "0.0.0.0:1883")]
    listen: SocketAddr,
    /// Router connection limit (rumqttd's example config: 10010).
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// Largest accepted payload in bytes (rumqttd's example config: 20480).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_payload_size: usize,
    /// Sleep after every accepted connection, in ms (rumqttd's example config: 1). Even 0
    /// waits for the next 1 ms tokio timer tick.
    #[arg(long, default_value_t = 0)]
    next_connection_delay_ms: u64,
    /// Time a new connection has to send CONNECT, in ms (rumqttd's example config: 60000).
    #[arg(long, default_value_t = 60_000)]
    connection_timeout_ms: u16,
    /// Seconds to wait for the listener to accept TCP before giving up.
    #[arg(long, default_value_t = 20)]
    start_timeout_s: u64,
}

fn config(args: &Args) -> Config {
    let server = ServerSettings {
        name: "v4-1".to_owned(),
        listen: args.listen,
        tls: None,
        next_connection_delay_ms: args.next_connection_delay_ms,
        connections: ConnectionSettings {
            connection_timeout_ms: args.connection_timeout_ms,
            max_payload_size: args.max_payload_size,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: args.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    }
}

/// The address to connect to for the readiness check (an unspecified IP means loopback).
fn probe_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    // rumqttd only logs a failed bind and then returns Ok(()) from start(): check up front so
    // that a taken port is a clear error.
    drop(
        std::net::TcpListener::bind(args.listen)
            .with_context(|| format!("cannot bind {}", args.listen))?,
    );

    let mut broker = Broker::new(config(&args));
    let (done_tx, mut done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("rumqttd".to_owned())
        .spawn(move || {
            let result = broker.start();
            let _ = done_tx.send(result);
        })
        .context("spawning the broker thread")?;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;

    // Readiness: the listener is bound inside the broker thread; wait until it accepts TCP.
    // (rumqttd logs this connection as "Error while handling MQTT connect packet".)
    let target = probe_addr(args.listen);
    let ready = async {
        loop {
            if tokio::net::TcpStream::connect(target).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(args.start_timeout_s), ready) => {
            r.map_err(|_| anyhow::anyhow!(
                "rumqttd did not accept TCP on {target} within {}s", args.start_timeout_s))?;
        }
        r = &mut done_rx => bail!("rumqttd stopped during startup: {r:?}"),
        _ = sigint.recv() => return Ok(()),
        _ = sigterm.recv() => return Ok(()),
    }
    println!("rumqttd listening on {}", args.listen);

    tokio::select! {
        r = &mut done_rx => bail!("rumqttd stopped: {r:?}"),
        _ = sigint.recv() => eprintln!("SIGINT: exiting"),
        _ = sigterm.recv() => eprintln!("SIGTERM: exiting"),
    }
    // The broker thread never returns; exiting the process is the only way to stop it.
    std::process::exit(0)
}
