//! One MQTT 3.1.1 connection of the `durable` scenario, on rumqttc's packet codec over a bare
//! TCP stream. The scenario needs what rumqttc's event loop hides: the packet id of every
//! PUBLISH so that each PUBACK names the message it acknowledges, no retransmission of
//! unacknowledged messages on reconnect (the ground truth counts only PUBACKs), and the
//! CONNACK's session-present flag.

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Packet};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest packet read from the broker (1 MiB, Heartwire's default `mqtt.max_packet_size`).
const MAX_INCOMING: usize = 1024 * 1024;
/// Bound on waiting for the broker to close after a DISCONNECT.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Why a connection (or an attempt) failed.
#[derive(Debug, Error)]
pub enum WireError {
    /// TCP connect, read or write failed, or the broker closed the connection.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The broker closed the connection.
    #[error("connection closed by the broker")]
    Closed,
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The broker sent something that is not MQTT 3.1.1.
    #[error("malformed packet: {0}")]
    Malformed(#[from] rumqttc::mqttbytes::Error),
    /// CONNACK refused the connection.
    #[error("CONNACK refused: {0:?}")]
    Refused(ConnectReturnCode),
    /// A packet the exchange did not expect.
    #[error("unexpected packet: {0}")]
    Unexpected(String),
}

/// What a connection needs to dial.
#[derive(Debug, Clone)]
pub struct Dial {
    /// `host:port` of the broker.
    pub address: String,
    /// MQTT client identifier.
    pub client_id: String,
    /// Clean session flag (false: the persistent session of a device).
    pub clean: bool,
    /// User name and password, if any.
    pub login: Option<(String, String)>,
    /// Bound on TCP connect plus CONNACK, and on any later answer.
    pub timeout: Duration,
}

/// An open MQTT connection.
pub struct Conn {
    /// The socket.
    stream: TcpStream,
    /// Bytes read and not yet parsed (a packet may arrive in pieces).
    buf: BytesMut,
    /// Encoding scratch, reused for every packet written.
    out: BytesMut,
}

impl Conn {
    /// Connects and waits for a successful CONNACK; returns its session-present flag.
    pub async fn open(dial: &Dial) -> Result<(Self, bool), WireError> {
        tokio::time::timeout(dial.timeout, Self::handshake(dial))
            .await
            .map_err(|_| WireError::Timeout(dial.timeout))?
    }

    async fn handshake(dial: &Dial) -> Result<(Self, bool), WireError> {
        let stream = TcpStream::connect(&dial.address).await?;
        stream.set_nodelay(true)?;
        let mut conn = Self {
            stream,
            buf: BytesMut::with_capacity(256),
            out: BytesMut::with_capacity(256),
        };
        let mut connect = Connect::new(dial.client_id.as_str());
        // No keep-alive: every exchange is bounded by `timeout` instead.
        connect.keep_alive = 0;
        connect.clean_session = dial.clean;
        if let Some((user, password)) = &dial.login {
            connect.set_login(user, password);
        }
        conn.send(&Packet::Connect(connect)).await?;
        match conn.recv().await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                Ok((conn, ack.session_present))
            }
            Packet::ConnAck(ack) => Err(WireError::Refused(ack.code)),
            other => Err(WireError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Writes one packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<(), WireError> {
        self.out.clear();
        packet.write(&mut self.out, usize::MAX)?;
        self.stream.write_all(&self.out).await?;
        Ok(())
    }

    /// Reads the next packet. Cancel-safe: bytes read before a cancellation stay in the buffer.
    pub async fn recv(&mut self) -> Result<Packet, WireError> {
        loop {
            match Packet::read(&mut self.buf, MAX_INCOMING) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(e.into()),
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(WireError::Closed);
            }
        }
    }

    /// Sends DISCONNECT and waits (briefly) for the broker to close first, so that the
    /// broker's side, not this host's ephemeral ports, holds the TIME_WAIT.
    pub async fn close(mut self) {
        if self.send(&Packet::Disconnect).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            let mut sink = [0u8; 64];
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}
