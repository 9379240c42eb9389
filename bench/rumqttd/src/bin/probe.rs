//! Black-box MQTT 3.1.1 checks against any broker, with raw packets (rumqttc's v4 codec over
//! a plain TcpStream) for exact control of what each client sends and when.
//!
//! Each scenario is bounded in time and prints exactly one result line on stdout:
//! the first `key=value` is the verdict, further ones are details. Exit status 0 means the
//! check ran (whether the broker passed or not); 2 means the probe itself could not run
//! (broker unreachable, a setup client was refused, ...), with the reason on stderr.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use clap::{Parser, Subcommand};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, Publish, Subscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, Protocol, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};

const MAX_PACKET: usize = 1024 * 1024;
/// Bound for TCP connect, CONNACK and SUBACK of every client.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(about = "Black-box MQTT 3.1.1 broker checks")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 1883)]
    port: u16,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// A subscriber goes silent while a publisher keeps sending to its topic: when is it
    /// closed? A correct broker closes it 1.5 x keep-alive after its last packet.
    KeepaliveWhileReceiving {
        #[arg(long, default_value_t = 5)]
        keepalive: u16,
        #[arg(long, default_value_t = 2)]
        publish_every: u64,
        #[arg(long, default_value_t = 30)]
        max_wait: u64,
    },
    /// A client goes silent after subscribing (no traffic to it): when is it closed?
    KeepaliveSilent {
        #[arg(long, default_value_t = 5)]
        keepalive: u16,
        #[arg(long, default_value_t = 30)]
        max_wait: u64,
    },
    /// Session takeover: which will is published on takeover, and which when the new
    /// connection later dies without DISCONNECT? Correct per MQTT 3.1.1: A, then B.
    TakeoverWill,
    /// Two CONNECTs with client id `bad/id`, then one with a fresh ordinary id: is the
    /// broker still accepting connections?
    DuplicateBadId,
}

// --- a raw MQTT connection -----------------------------------------------------------------

/// What a read produced.
#[derive(Debug)]
enum Read {
    Packet(Packet),
    /// The broker closed the connection (EOF) or it was reset.
    Closed(String),
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn tcp(addr: SocketAddr) -> Result<Conn> {
        let stream = timeout(STEP_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("TCP connect to {addr} timed out"))?
            .with_context(|| format!("TCP connect to {addr}"))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(4096),
        })
    }

    async fn send(&mut self, packet: Packet) -> Result<()> {
        let mut out = BytesMut::new();
        packet
            .write(&mut out, MAX_PACKET)
            .map_err(|e| anyhow!("encoding {packet:?}: {e}"))?;
        self.stream.write_all(&out).await.context("write")?;
        Ok(())
    }

    /// Next packet, or the connection's end. Cancel-safe: bytes already read stay in `buf`.
    async fn recv(&mut self) -> Result<Read> {
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(p) => return Ok(Read::Packet(p)),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(e) => bail!("undecodable packet from broker: {e}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Ok(Read::Closed("eof".to_owned())),
                Ok(_) => {}
                Err(e) => return Ok(Read::Closed(format!("{:?}", e.kind()))),
            }
        }
    }

    /// Next packet other than PUBLISH/PINGRESP (those are skipped), bounded by STEP_TIMEOUT.
    async fn expect(&mut self, what: &str) -> Result<Read> {
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            match timeout_at(deadline, self.recv()).await {
                Err(_) => bail!("no {what} within {STEP_TIMEOUT:?}"),
                Ok(r) => match r? {
                    Read::Packet(Packet::Publish(_) | Packet::PingResp) => continue,
                    other => return Ok(other),
                },
            }
        }
    }
}

/// How a CONNECT attempt ended, as a token without spaces.
enum ConnectOutcome {
    Accepted(Conn),
    Failed(String),
}

fn connect_packet(client_id: &str, keep_alive: u16, will: Option<(&str, &str)>) -> Packet {
    Packet::Connect(Connect {
        protocol: Protocol::V4,
        keep_alive,
        client_id: client_id.to_owned(),
        clean_session: true,
        last_will: will.map(|(topic, payload)| {
            LastWill::new(topic, payload.as_bytes().to_vec(), QoS::AtMostOnce, false)
        }),
        login: None,
    })
}

/// TCP connect + CONNECT + wait for CONNACK; every way it can go wrong becomes `Failed`.
async fn try_connect(addr: SocketAddr, connect: Packet) -> ConnectOutcome {
    let mut conn = match Conn::tcp(addr).await {
        Ok(c) => c,
        Err(e) => return ConnectOutcome::Failed(token(&format!("tcp: {e:#}"))),
    };
    if let Err(e) = conn.send(connect).await {
        return ConnectOutcome::Failed(token(&format!("send_connect: {e:#}")));
    }
    match timeout(STEP_TIMEOUT, conn.recv()).await {
        Err(_) => ConnectOutcome::Failed(format!("no_connack_within_{}s", STEP_TIMEOUT.as_secs())),
        Ok(Err(e)) => ConnectOutcome::Failed(token(&format!("{e:#}"))),
        Ok(Ok(Read::Closed(how))) => {
            ConnectOutcome::Failed(format!("closed_without_connack({how})"))
        }
        Ok(Ok(Read::Packet(Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        })))) => ConnectOutcome::Accepted(conn),
        Ok(Ok(Read::Packet(Packet::ConnAck(ack)))) => {
            ConnectOutcome::Failed(format!("connack_{:?}", ack.code))
        }
        Ok(Ok(Read::Packet(p))) => ConnectOutcome::Failed(token(&format!("unexpected_{p:?}"))),
    }
}

/// A client the scenario needs in order to run at all: any failure is a probe error.
async fn setup_client(
    addr: SocketAddr,
    client_id: &str,
    keep_alive: u16,
    will: Option<(&str, &str)>,
) -> Result<Conn> {
    match try_connect(addr, connect_packet(client_id, keep_alive, will)).await {
        ConnectOutcome::Accepted(c) => Ok(c),
        ConnectOutcome::Failed(why) => bail!("setup client {client_id} could not connect: {why}"),
    }
}

async fn subscribe(conn: &mut Conn, filter: &str) -> Result<()> {
    let mut sub = Subscribe::new(filter, QoS::AtMostOnce);
    sub.pkid = 1;
    conn.send(Packet::Subscribe(sub)).await?;
    match conn.expect("SUBACK").await? {
        Read::Packet(Packet::SubAck(_)) => Ok(()),
        other => bail!("expected SUBACK for {filter}, got {other:?}"),
    }
}

/// Spaces and '=' would break the `key=value` result line.
fn token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos:x}", std::process::id())
}

// --- scenarios -------------------------------------------------------------------------------

async fn keepalive(
    addr: SocketAddr,
    keep_alive: u16,
    publish_every: Option<u64>,
    max_wait: u64,
) -> Result<String> {
    let n = nonce();
    let topic = format!("probe/ka/{n}");
    let mut s = setup_client(addr, &format!("probe-ka-s-{n}"), keep_alive, None).await?;
    let mut sub = Subscribe::new(topic.clone(), QoS::AtMostOnce);
    sub.pkid = 1;
    s.send(Packet::Subscribe(sub)).await?;
    // From here on S sends nothing: its last packet left now.
    let last_sent = Instant::now();
    match s.expect("SUBACK").await? {
        Read::Packet(Packet::SubAck(_)) => {}
        other => bail!("expected SUBACK, got {other:?}"),
    }

    let publisher = match publish_every {
        None => None,
        Some(every) => {
            let mut p = setup_client(addr, &format!("probe-ka-p-{n}"), 120, None).await?;
            let topic = topic.clone();
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(every));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                for i in 0u64.. {
                    tick.tick().await;
                    let publish = Publish::new(topic.as_str(), QoS::AtMostOnce, format!("{i}"));
                    if let Err(e) = p.send(Packet::Publish(publish)).await {
                        eprintln!("publisher stopped: {e:#}");
                        return;
                    }
                }
            }))
        }
    };

    let deadline = tokio::time::Instant::from_std(last_sent + Duration::from_secs(max_wait));
    let mut received = 0u32;
    let verdict = loop {
        match timeout_at(deadline, s.recv()).await {
            Err(_) => break format!("not_closed_within_s={max_wait}"),
            Ok(Err(e)) => {
                break format!(
                    "closed_after_s={:.2} how={}",
                    last_sent.elapsed().as_secs_f64(),
                    token(&format!("{e:#}"))
                )
            }
            Ok(Ok(Read::Closed(how))) => {
                break format!(
                    "closed_after_s={:.2} how={how}",
                    last_sent.elapsed().as_secs_f64()
                )
            }
            Ok(Ok(Read::Packet(Packet::Publish(_)))) => received += 1,
            Ok(Ok(Read::Packet(_))) => {}
        }
    };
    if let Some(p) = publisher {
        p.abort();
    }
    let mut line = format!("{verdict} keepalive={keep_alive}");
    if let Some(every) = publish_every {
        line.push_str(&format!(
            " publish_every_s={every} publishes_received={received}"
        ));
    }
    Ok(line)
}

/// Collects will payloads on `topic` arriving at `w` until `deadline`; "none" if there were none.
async fn collect_wills(
    w: &mut Conn,
    topic: &str,
    deadline: tokio::time::Instant,
) -> Result<String> {
    let mut got = Vec::new();
    loop {
        match timeout_at(deadline, w.recv()).await {
            Err(_) => break,
            Ok(r) => match r? {
                Read::Closed(how) => bail!("watcher connection closed by the broker ({how})"),
                Read::Packet(Packet::Publish(p)) if p.topic == topic => {
                    got.push(token(&String::from_utf8_lossy(&p.payload)))
                }
                Read::Packet(_) => {}
            },
        }
    }
    Ok(if got.is_empty() {
        "none".to_owned()
    } else {
        got.join("+")
    })
}

async fn takeover_will(addr: SocketAddr) -> Result<String> {
    let n = nonce();
    let id = format!("probe-takeover-{n}");
    let will_topic = format!("probe/will/{id}");

    let mut w = setup_client(addr, &format!("probe-watcher-{n}"), 120, None).await?;
    subscribe(&mut w, "probe/will/#").await?;

    let mut a = setup_client(addr, &id, 120, Some((&will_topic, "A"))).await?;
    let b = setup_client(addr, &id, 120, Some((&will_topic, "B"))).await?;
    let takeover_at = tokio::time::Instant::now();

    // Watch W for wills and A for being closed, for 3 s after B's CONNACK.
    let deadline = takeover_at + Duration::from_secs(3);
    let mut a_closed = "no".to_owned();
    let wills_fut = collect_wills(&mut w, &will_topic, deadline);
    let a_fut = async {
        loop {
            match timeout_at(deadline, a.recv()).await {
                Err(_) => return,
                Ok(Ok(Read::Packet(_))) => {}
                Ok(Ok(Read::Closed(_)) | Err(_)) => {
                    a_closed = format!("{:.2}s", takeover_at.elapsed().as_secs_f64());
                    return;
                }
            }
        }
    };
    let (on_takeover, ()) = tokio::join!(wills_fut, a_fut);
    let on_takeover = on_takeover?;

    // B dies without DISCONNECT (the socket is closed, as when its process is killed).
    drop(b);
    let on_close = collect_wills(
        &mut w,
        &will_topic,
        tokio::time::Instant::now() + Duration::from_secs(5),
    )
    .await?;
    drop(a);
    Ok(format!(
        "will_on_takeover={on_takeover} will_on_abrupt_close={on_close} old_connection_closed={a_closed}"
    ))
}

async fn duplicate_bad_id(addr: SocketAddr) -> Result<String> {
    let describe = |o: &ConnectOutcome| match o {
        ConnectOutcome::Accepted(_) => "accepted".to_owned(),
        ConnectOutcome::Failed(why) => why.clone(),
    };
    // Both kept open (when the broker accepted them) until the end of the scenario.
    let first = try_connect(addr, connect_packet("bad/id", 120, None)).await;
    let second = try_connect(addr, connect_packet("bad/id", 120, None)).await;
    let later_id = format!("normal-{}", nonce());
    let later = try_connect(addr, connect_packet(&later_id, 120, None)).await;
    let verdict = match &later {
        ConnectOutcome::Accepted(_) => "ok".to_owned(),
        ConnectOutcome::Failed(why) => format!("failed({why})"),
    };
    Ok(format!(
        "later_connect={verdict} first_bad_id={} second_bad_id={}",
        describe(&first),
        describe(&second)
    ))
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} resolves to no address"))
}

async fn run(args: Args) -> Result<String> {
    let addr = resolve(&args.host, args.port).await?;
    // Fail early (as a probe error) when nothing listens at all.
    drop(Conn::tcp(addr).await?);
    match args.scenario {
        Scenario::KeepaliveWhileReceiving {
            keepalive: k,
            publish_every,
            max_wait,
        } => {
            if publish_every == 0 {
                bail!("--publish-every must be at least 1");
            }
            keepalive(addr, k, Some(publish_every), max_wait).await
        }
        Scenario::KeepaliveSilent {
            keepalive: k,
            max_wait,
        } => keepalive(addr, k, None, max_wait).await,
        Scenario::TakeoverWill => takeover_will(addr).await,
        Scenario::DuplicateBadId => duplicate_bad_id(addr).await,
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("probe error: {e:#}");
            std::process::exit(2);
        }
    }
}
