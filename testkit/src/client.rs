//! MQTT test clients: one that speaks raw bytes (any packet, any byte, in any order) and a
//! rumqttc client whose incoming packets arrive on a channel. Every receive is bounded by
//! [`WAIT`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::WAIT;

/// A client that speaks raw MQTT bytes, over TCP or any other byte stream (TLS, WebSocket).
pub struct RawClient<S = TcpStream> {
    /// The connection, for tests that write or inspect it directly.
    pub stream: S,
    /// Bytes read but not yet decoded into a packet.
    buf: BytesMut,
}

/// What a CONNECT says.
pub struct ConnectOpts<'a> {
    /// The client id.
    pub client_id: &'a str,
    /// Keep-alive in seconds (60 by default).
    pub keep_alive: u16,
    /// `clean_session` (true by default).
    pub clean_session: bool,
    /// The last will: topic, payload, QoS, retain.
    pub will: Option<(&'a str, &'a [u8], QoS, bool)>,
    /// User name and password (none by default).
    pub login: Option<(&'a str, &'a str)>,
}

impl<'a> ConnectOpts<'a> {
    /// A clean session with keep-alive 60 and no will.
    pub fn new(client_id: &'a str) -> Self {
        Self {
            client_id,
            keep_alive: 60,
            clean_session: true,
            will: None,
            login: None,
        }
    }

    /// The same, logging in as `user` with `password`.
    pub fn login(mut self, user: &'a str, password: &'a str) -> Self {
        self.login = Some((user, password));
        self
    }
}

/// The bytes of `packet` on the wire.
pub fn encode(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.write(&mut buf, usize::MAX).expect("encode");
    buf
}

/// The CONNECT packet `opts` describe.
pub fn connect_packet(opts: &ConnectOpts<'_>) -> Packet {
    let mut connect = Connect::new(opts.client_id);
    connect.keep_alive = opts.keep_alive;
    connect.clean_session = opts.clean_session;
    connect.last_will = opts
        .will
        .map(|(topic, payload, qos, retain)| LastWill::new(topic, payload.to_vec(), qos, retain));
    if let Some((user, password)) = opts.login {
        connect.set_login(user, password);
    }
    Packet::Connect(connect)
}

impl RawClient {
    /// A TCP connection to `addr`, nothing sent yet.
    pub async fn tcp(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self::over(stream)
    }

    /// Connects and expects CONNACK 0; returns the session-present flag.
    pub async fn connect(addr: SocketAddr, opts: ConnectOpts<'_>) -> (Self, bool) {
        Self::tcp(addr).await.handshake(opts).await
    }

    /// Connects with `opts` and reads the answer: the CONNACK's return code, `None` when the
    /// broker closed the connection without one.
    pub async fn connack(
        addr: SocketAddr,
        opts: ConnectOpts<'_>,
    ) -> (Self, Option<rumqttc::mqttbytes::v4::ConnectReturnCode>) {
        let mut c = Self::tcp(addr).await;
        c.send(&connect_packet(&opts)).await;
        let code = match c.recv().await {
            Some(Packet::ConnAck(ack)) => Some(ack.code),
            Some(other) => panic!("expected CONNACK, got {other:?}"),
            None => None,
        };
        (c, code)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    /// A client on an established `stream`, nothing sent yet.
    pub fn over(stream: S) -> Self {
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Sends CONNECT and expects CONNACK 0; returns the session-present flag.
    pub async fn handshake(self, opts: ConnectOpts<'_>) -> (Self, bool) {
        let mut c = self;
        c.send(&connect_packet(&opts)).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
                (c, ack.session_present)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Sends `packet`.
    pub async fn send(&mut self, packet: &Packet) {
        self.send_bytes(&encode(packet)).await;
    }

    /// Sends `bytes` as they are.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next packet, or `None` once the broker closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, self.recv_untimed())
            .await
            .expect("a packet or a close within the deadline")
    }

    /// [`recv`](Self::recv) without its deadline, for a test that sets its own.
    pub async fn recv_untimed(&mut self) -> Option<Packet> {
        loop {
            match Packet::read(&mut self.buf, usize::MAX) {
                Ok(packet) => return Some(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed packet: {e}"),
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Reads until the broker closes the connection, returning what came before.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }

    /// Subscribes to `filter` (packet id 1) and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, qos);
        sub.pkid = 1;
        self.send(&Packet::Subscribe(sub)).await;
        match self.recv().await {
            Some(Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Sends a PUBLISH; waits for nothing.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
        pkid: u16,
    ) {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(topic, qos, payload.to_vec());
        p.retain = retain;
        p.pkid = pkid;
        self.send(&Packet::Publish(p)).await;
    }

    /// Sends DISCONNECT and closes the connection.
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A rumqttc client whose incoming packets arrive on a channel.
pub struct Client {
    /// The rumqttc handle, to publish, subscribe and disconnect.
    pub client: rumqttc::AsyncClient,
    /// Every packet the broker sent, in order.
    pub incoming: mpsc::UnboundedReceiver<rumqttc::Packet>,
    /// Drives the event loop; ends when the connection does or `incoming` is dropped.
    pub task: JoinHandle<()>,
}

impl Client {
    /// Connects as `client_id` (keep-alive 30 s) and waits for the CONNACK.
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        Self::connect_with(addr, client_id, |_| {}).await
    }

    /// [`connect`](Self::connect) with the options changed by `adjust`.
    pub async fn connect_with(
        addr: SocketAddr,
        client_id: &str,
        adjust: impl FnOnce(&mut rumqttc::MqttOptions),
    ) -> Self {
        let mut opts = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        adjust(&mut opts);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(packet)) => {
                        if tx.send(packet).is_err() {
                            return;
                        }
                    }
                    Ok(rumqttc::Event::Outgoing(_)) => {}
                    Err(_) => return,
                }
            }
        });
        let mut c = Self {
            client,
            incoming,
            task,
        };
        c.expect(|p| matches!(p, rumqttc::Packet::ConnAck(_))).await;
        c
    }

    /// Waits for the first incoming packet that satisfies `pred`, skipping others.
    pub async fn expect(&mut self, pred: impl Fn(&rumqttc::Packet) -> bool) -> rumqttc::Packet {
        tokio::time::timeout(WAIT, async {
            loop {
                let p = self.incoming.recv().await.expect("client event loop alive");
                if pred(&p) {
                    return p;
                }
            }
        })
        .await
        .expect("expected packet within the deadline")
    }

    /// The next PUBLISH received.
    pub async fn publish_received(&mut self) -> rumqttc::mqttbytes::v4::Publish {
        match self
            .expect(|p| matches!(p, rumqttc::Packet::Publish(_)))
            .await
        {
            rumqttc::Packet::Publish(p) => p,
            _ => unreachable!(),
        }
    }

    /// Subscribes to `filter` and waits for the SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        self.expect(|p| matches!(p, rumqttc::Packet::SubAck(_)))
            .await;
    }
}
