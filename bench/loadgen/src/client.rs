//! One client connection: TCP connect and the CONNECT/CONNACK handshake, the connection split
//! into a frame reader and a raw writer, and the list of broker addresses connections are
//! spread over. [`open`] and [`hold`] serve the `idle` and `connect-rate` scenarios, over TCP
//! or TLS ([`Stream`]).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpSocket;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use crate::mqtt::{self, FrameReader, Protocol};
use crate::tls::{Stream, Tls};

/// How long a connection that is told to stop gets to write its DISCONNECT.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The broker's addresses, one per `--host` entry, handed out round-robin.
#[derive(Debug, Clone)]
pub struct Targets {
    addrs: Vec<SocketAddr>,
    /// The `--host` entries as written: the names TLS verifies by default.
    hosts: Vec<String>,
}

impl Targets {
    /// Resolves each comma-separated host (an IP address or a name) with `port`.
    pub async fn resolve(hosts: &str, port: u16) -> Result<Self> {
        let mut addrs = Vec::new();
        let mut names = Vec::new();
        for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            names.push(host.to_owned());
            let addr = tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("cannot resolve host {host:?}"))?
                .next()
                .with_context(|| format!("host {host:?} has no address"))?;
            addrs.push(addr);
        }
        if addrs.is_empty() {
            bail!("--host names no host");
        }
        Ok(Self {
            addrs,
            hosts: names,
        })
    }

    /// The address for the `i`-th connection.
    pub fn get(&self, i: usize) -> SocketAddr {
        self.addrs[i % self.addrs.len()]
    }

    /// The `--host` entry of the `i`-th connection.
    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i % self.hosts.len()]
    }
}

/// The local addresses connections are made from (`--source`), handed out round-robin; empty:
/// the kernel chooses.
#[derive(Debug, Clone, Default)]
pub struct Sources(Vec<IpAddr>);

impl Sources {
    /// Parses a comma-separated list of IP addresses; `None` or an empty list: the kernel's
    /// choice.
    pub fn parse(list: Option<&str>) -> Result<Self> {
        let mut addrs = Vec::new();
        for entry in list.unwrap_or("").split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            let addr: IpAddr = entry
                .parse()
                .with_context(|| format!("source address {entry:?} is not an IP address"))?;
            addrs.push(addr);
        }
        Ok(Self(addrs))
    }

    /// The source of the `i`-th connection.
    pub fn get(&self, i: usize) -> Option<IpAddr> {
        (!self.0.is_empty()).then(|| self.0[i % self.0.len()])
    }
}

/// The broker answered CONNECT with a non-zero CONNACK return code (e.g. 4: bad user name or
/// password, 5: not authorised), after `after`.
#[derive(Debug)]
pub struct Refused {
    pub code: u8,
    pub after: Duration,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CONNECT refused with return code {}", self.code)
    }
}

impl std::error::Error for Refused {}

/// How a connection of the `idle` and `connect-rate` scenarios reaches the broker and logs in.
#[derive(Debug, Clone, Copy)]
pub struct Hello<'a> {
    /// The broker's address.
    pub addr: SocketAddr,
    /// The `--host` entry of `addr` (the name TLS verifies by default).
    pub host: &'a str,
    /// The local address to connect from (port chosen by the kernel), or the kernel's choice.
    pub source: Option<IpAddr>,
    pub client_id: &'a str,
    /// User name and password of the CONNECT, if any.
    pub login: Option<(&'a str, &'a str)>,
    pub keep_alive_s: u16,
    pub protocol: Protocol,
}

/// Opens a connection of the `idle` and `connect-rate` scenarios: TCP connect, the TLS
/// handshake with `tls` (verifying `host` or `--tls-server-name`), CONNECT, CONNACK; each step
/// bounded by `step_timeout`. The reader's buffer is small: these clients only ever read
/// CONNACK and PINGRESP. A CONNACK with a non-zero return code fails with [`Refused`].
pub async fn open(
    hello: Hello<'_>,
    tls: Option<&Tls>,
    step_timeout: Duration,
) -> Result<FrameReader<Stream>> {
    let Hello {
        addr,
        host,
        source,
        client_id,
        login,
        keep_alive_s,
        protocol,
    } = hello;
    let began = Instant::now();
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        // The port is picked at connect time, unique per 4-tuple: without this, each source
        // address has one set of ephemeral ports for every destination, and the TIME_WAIT of
        // a run's closed connections would use it up for the next run.
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        )
        .context("setting IP_BIND_ADDRESS_NO_PORT")?;
        socket
            .bind(SocketAddr::new(source, 0))
            .with_context(|| format!("binding the source address {source}"))?;
    }
    let tcp = timeout(step_timeout, socket.connect(addr))
        .await
        .with_context(|| format!("TCP connect to {addr} timed out"))?
        .with_context(|| format!("TCP connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let mut stream = match tls {
        Some(tls) => timeout(step_timeout, tls.handshake(tcp, host))
            .await
            .with_context(|| format!("TLS handshake with {addr} timed out"))?
            .with_context(|| format!("with {addr}"))?,
        None => Stream::Plain(tcp),
    };
    stream
        .write_all(&mqtt::connect_with_login(
            protocol,
            client_id,
            keep_alive_s,
            login,
        ))
        .await?;
    stream.flush().await?;
    let mut reader = FrameReader::new(stream, 64).with_protocol(protocol);
    let frame = timeout(step_timeout, reader.next())
        .await
        .with_context(|| format!("no CONNACK for {client_id} within {step_timeout:?}"))?
        .with_context(|| format!("reading the CONNACK of {client_id}"))?
        .with_context(|| format!("connection closed before CONNACK for {client_id}"))?;
    match frame.connack_code() {
        Some(0) => Ok(reader),
        Some(code) => Err(anyhow::Error::new(Refused {
            code,
            after: began.elapsed(),
        })
        .context(format!("CONNECT of {client_id}"))),
        None => bail!(
            "expected CONNACK for {client_id}, got packet type {}",
            frame.kind()
        ),
    }
}

/// Holds an [`open`]ed connection until `stop`: a PINGREQ every half keep-alive, whatever the
/// broker sends read and dropped; on `stop` a DISCONNECT (TLS: then close_notify). Returns
/// `true` if the broker closed the connection first.
pub async fn hold(
    mut conn: FrameReader<Stream>,
    keep_alive_s: u16,
    stop: &CancellationToken,
) -> bool {
    enum Wake {
        Stop,
        Ping,
        Read(bool),
    }
    let every = Duration::from_secs(u64::from(keep_alive_s.max(2))) / 2;
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        let wake = tokio::select! {
            _ = stop.cancelled() => Wake::Stop,
            _ = tick.tick(), if keep_alive_s > 0 => Wake::Ping,
            frame = conn.next() => Wake::Read(matches!(frame, Ok(Some(_)))),
        };
        match wake {
            Wake::Stop => {
                let stream = conn.get_mut();
                let _ = timeout(DISCONNECT_TIMEOUT, async {
                    stream.write_all(&mqtt::DISCONNECT).await?;
                    stream.shutdown().await
                })
                .await;
                return false;
            }
            Wake::Ping => {
                if conn.get_mut().write_all(&mqtt::PINGREQ).await.is_err() {
                    return true;
                }
            }
            Wake::Read(true) => {}
            Wake::Read(false) => return true,
        }
    }
}

/// A connected MQTT client (CONNACK received, return code 0).
pub struct Client {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    pub protocol: Protocol,
}

/// Connects and completes the MQTT handshake, each step bounded by `step_timeout`.
/// `read_capacity` sizes the receive buffer (small for clients that only ever get a CONNACK);
/// `send_buffer`, if given, caps the kernel's send buffer (SO_SNDBUF) of the socket.
pub async fn connect(
    protocol: Protocol,
    addr: SocketAddr,
    client_id: &str,
    keep_alive_s: u16,
    step_timeout: Duration,
    read_capacity: usize,
    send_buffer: Option<u32>,
) -> Result<Client> {
    let packet = mqtt::connect(protocol, client_id, keep_alive_s);
    let sizes = (read_capacity, send_buffer);
    let (client, _) = handshake(protocol, addr, &packet, client_id, step_timeout, sizes).await?;
    Ok(client)
}

/// Like [`connect`], with an MQTT 3.1.1 persistent session (clean session 0); also returns
/// CONNACK's session present flag.
pub async fn connect_persistent(
    addr: SocketAddr,
    client_id: &str,
    keep_alive_s: u16,
    step_timeout: Duration,
    read_capacity: usize,
) -> Result<(Client, bool)> {
    let packet = mqtt::connect_persistent(client_id, keep_alive_s);
    let sizes = (read_capacity, None);
    handshake(
        Protocol::V311,
        addr,
        &packet,
        client_id,
        step_timeout,
        sizes,
    )
    .await
}

/// TCP connect, `connect_packet`, CONNACK; `sizes` are the read capacity and SO_SNDBUF.
async fn handshake(
    protocol: Protocol,
    addr: SocketAddr,
    connect_packet: &[u8],
    client_id: &str,
    step_timeout: Duration,
    (read_capacity, send_buffer): (usize, Option<u32>),
) -> Result<(Client, bool)> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(bytes) = send_buffer {
        socket.set_send_buffer_size(bytes)?;
    }
    let stream = timeout(step_timeout, socket.connect(addr))
        .await
        .with_context(|| format!("TCP connect to {addr} timed out"))?
        .with_context(|| format!("TCP connect to {addr}"))?;
    // Round-trip timings must not wait for Nagle's algorithm.
    stream.set_nodelay(true)?;
    let (read, mut writer) = stream.into_split();
    writer.write_all(connect_packet).await?;
    let mut reader = FrameReader::new(read, read_capacity).with_protocol(protocol);
    let frame = timeout(step_timeout, reader.next())
        .await
        .with_context(|| format!("no CONNACK for {client_id} within {step_timeout:?}"))??
        .with_context(|| format!("connection closed before CONNACK for {client_id}"))?;
    let session_present = frame.connack_session_present().unwrap_or(false);
    match frame.connack_code() {
        Some(0) => Ok((
            Client {
                reader,
                writer,
                protocol,
            },
            session_present,
        )),
        Some(code) => bail!("CONNECT of {client_id} refused with return code {code}"),
        None => bail!(
            "expected CONNACK for {client_id}, got packet type {}",
            frame.kind()
        ),
    }
}

impl Client {
    /// Subscribes to a few filters at `qos` and waits (bounded) for the SUBACK, which must
    /// grant every one (at any QoS). Packets other than the SUBACK are skipped.
    pub async fn subscribe(
        &mut self,
        filters: &[&str],
        qos: u8,
        step_timeout: Duration,
    ) -> Result<()> {
        self.writer
            .write_all(&mqtt::subscribe(
                self.protocol,
                1,
                filters.iter().copied(),
                qos,
            ))
            .await?;
        let wait = async {
            loop {
                let frame = self
                    .reader
                    .next()
                    .await?
                    .context("connection closed before SUBACK")?;
                if let Some((_, codes)) = frame.suback() {
                    if codes.iter().any(|&c| c > 2) {
                        bail!("SUBSCRIBE to {filters:?} refused: return codes {codes:?}");
                    }
                    return Ok(());
                }
            }
        };
        timeout(step_timeout, wait)
            .await
            .with_context(|| format!("no SUBACK for {filters:?} within {step_timeout:?}"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_handed_out_round_robin() {
        let none = Sources::parse(None).expect("no sources");
        assert_eq!(none.get(3), None);
        let two = Sources::parse(Some("127.0.0.2, 127.0.0.3,")).expect("two sources");
        let [a, b] = ["127.0.0.2", "127.0.0.3"].map(|s| s.parse::<IpAddr>().ok());
        assert_eq!((two.get(0), two.get(1), two.get(2)), (a, b, a));
        assert!(Sources::parse(Some("127.0.0.2,localhost")).is_err());
    }
}
