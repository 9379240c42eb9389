//! Test harness: the broker in-process on 127.0.0.1:0, a raw-bytes MQTT client and a rumqttc
//! client, and helpers that wait on conditions with a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker::config::MqttConfig;
use broker::event::{self, ConnectionEvent, EventReceiver};
use broker::labels::DisconnectReason;
use broker::mqtt;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, LastWill, Packet};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Longest any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A broker serving on an ephemeral port, with its event stream.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub events: EventReceiver,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<()>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut MqttConfig)) -> Self {
        let mut config = MqttConfig::default();
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, events) = event::channel(1024);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(mqtt::serve(
            listener,
            Arc::new(mqtt::Broker::new(config, tx)),
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        Self {
            addr,
            events,
            shutdown,
            handle,
        }
    }

    pub async fn next_event(&mut self) -> ConnectionEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event within the deadline")
            .expect("event channel open")
    }

    /// Waits for the Connected event of `client_id` and returns its session id.
    pub async fn connected(&mut self, client_id: &str) -> ConnectionEvent {
        let event = self.next_event().await;
        match &event {
            ConnectionEvent::Connected { client_id: id, .. } if id == client_id => event,
            other => panic!("expected Connected for {client_id}, got {other:?}"),
        }
    }

    /// Waits for the Disconnected event of `client_id` and checks its reason.
    pub async fn disconnected(&mut self, client_id: &str, reason: DisconnectReason) {
        match self.next_event().await {
            ConnectionEvent::Disconnected {
                client_id: id,
                reason: r,
                ..
            } if id == client_id => assert_eq!(r, reason, "disconnect reason of {client_id}"),
            other => panic!("expected Disconnected({reason}) for {client_id}, got {other:?}"),
        }
    }

    /// Asserts that no event is waiting right now.
    pub fn no_event_pending(&mut self) {
        if let Ok(event) = self.events.try_recv() {
            panic!("unexpected event {event:?}");
        }
    }

    /// Shuts the broker down and returns the events emitted meanwhile.
    pub async fn stop(mut self) -> Vec<ConnectionEvent> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, &mut self.handle)
            .await
            .expect("broker stops within the deadline")
            .expect("broker task");
        let mut rest = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            rest.push(event);
        }
        rest
    }
}

/// A client that speaks raw MQTT bytes.
pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub struct ConnectOpts<'a> {
    pub client_id: &'a str,
    pub keep_alive: u16,
    pub clean_session: bool,
    pub will: Option<(&'a str, &'a [u8], QoS, bool)>,
}

impl<'a> ConnectOpts<'a> {
    pub fn new(client_id: &'a str) -> Self {
        Self {
            client_id,
            keep_alive: 60,
            clean_session: true,
            will: None,
        }
    }
}

pub fn encode(packet: &Packet) -> BytesMut {
    let mut buf = BytesMut::new();
    packet.write(&mut buf, usize::MAX).expect("encode");
    buf
}

pub fn connect_packet(opts: &ConnectOpts<'_>) -> Packet {
    let mut connect = Connect::new(opts.client_id);
    connect.keep_alive = opts.keep_alive;
    connect.clean_session = opts.clean_session;
    connect.last_will = opts
        .will
        .map(|(topic, payload, qos, retain)| LastWill::new(topic, payload.to_vec(), qos, retain));
    Packet::Connect(connect)
}

impl RawClient {
    pub async fn tcp(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Connects and expects CONNACK 0; returns the session-present flag.
    pub async fn connect(addr: SocketAddr, opts: ConnectOpts<'_>) -> (Self, bool) {
        let mut c = Self::tcp(addr).await;
        c.send(&connect_packet(&opts)).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => {
                assert_eq!(ack.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
                (c, ack.session_present)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn send(&mut self, packet: &Packet) {
        self.send_bytes(&encode(packet)).await;
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next packet, or `None` once the broker closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, self.recv_untimed())
            .await
            .expect("a packet or a close within the deadline")
    }

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

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, qos);
        sub.pkid = 1;
        self.send(&Packet::Subscribe(sub)).await;
        match self.recv().await {
            Some(Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

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

    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect).await;
        let _ = self.stream.shutdown().await;
    }
}

/// A rumqttc client whose incoming packets arrive on a channel.
pub struct Client {
    pub client: rumqttc::AsyncClient,
    pub incoming: mpsc::UnboundedReceiver<rumqttc::Packet>,
    pub task: JoinHandle<()>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, client_id: &str) -> Self {
        Self::connect_with(addr, client_id, |_| {}).await
    }

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

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.client.subscribe(filter, qos).await.expect("subscribe");
        self.expect(|p| matches!(p, rumqttc::Packet::SubAck(_)))
            .await;
    }
}

/// A directory removed when dropped.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "heartwire-{label}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A whole broker (MQTT, bridge, store, HTTP) on ephemeral ports, on its own runtime thread so
/// that a test can also kill it abruptly (a crash: no shutdown, no Disconnected events).
pub struct FullBroker {
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    pub shutdown: CancellationToken,
    runtime: Option<tokio::runtime::Runtime>,
    done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl FullBroker {
    pub fn config(database_url: &str, data: &TempDir, node_id: &str) -> broker::config::Config {
        let mut config = broker::config::Config::default();
        config.database.url = database_url.to_owned();
        config.bridge.journal_path = data.path().join("presence.journal");
        config.bridge.batch_interval = Duration::from_millis(20);
        config.bridge.retry_backoff_max = Duration::from_millis(500);
        config.node.id = node_id.to_owned();
        config.node.heartbeat_interval = Duration::from_millis(200);
        config.shutdown.grace_period = Duration::from_secs(5);
        config
    }

    pub async fn start(config: broker::config::Config) -> Self {
        // Logs when asked for (RUST_LOG=broker=debug cargo nextest run ...).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mqtt = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let (mqtt_addr, http_addr) = (
            mqtt.local_addr().expect("addr"),
            http.local_addr().expect("addr"),
        );
        mqtt.set_nonblocking(true).expect("nonblocking");
        http.set_nonblocking(true).expect("nonblocking");
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        runtime.spawn(async move {
            let listeners = broker::Listeners {
                mqtt: TcpListener::from_std(mqtt).expect("listener"),
                http: TcpListener::from_std(http).expect("listener"),
            };
            // (from_std registers with this runtime's reactor, so it runs inside the task.)
            broker::run_with(config, listeners, token)
                .await
                .expect("broker runs");
            let _ = done_tx.send(());
        });
        Self {
            mqtt: mqtt_addr,
            http: http_addr,
            shutdown,
            runtime: Some(runtime),
            done: Some(done),
        }
    }

    /// Graceful shutdown; waits until the broker has drained.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(Duration::from_secs(30), done)
                .await
                .expect("broker stops in time")
                .expect("broker finished");
        }
    }

    /// Kills the broker without any shutdown: its tasks are dropped where they stand.
    pub fn crash(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for FullBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime inside another one's task would panic; this does not block.
            rt.shutdown_background();
        }
    }
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A minimal HTTP/1.1 GET; returns the body of a 200 answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8(response).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}
