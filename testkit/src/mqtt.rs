//! The MQTT layer alone ([`mqtt::serve`] with its connection events on a channel), in-process
//! on the test's runtime: no bridge, no store, no HTTP. Tests read the events it emits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker::auth::acl::Acl;
use broker::auth::Auth;
use broker::config::{AuthConfig, MqttConfig};
use broker::event::{self, ConnectionEvent, EventReceiver};
use broker::labels::DisconnectReason;
use broker::mqtt;
use broker::state::StateStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::WAIT;

/// The MQTT layer serving on an ephemeral port, with its event stream.
pub struct TestBroker {
    /// Where clients connect (127.0.0.1, port chosen by the kernel).
    pub addr: SocketAddr,
    /// The TLS listener's address, when the configuration sets `tls.listen` (any address: a
    /// free loopback port is bound instead).
    pub tls: Option<SocketAddr>,
    /// The WebSocket listener's address, likewise.
    pub ws: Option<SocketAddr>,
    /// The WebSocket-over-TLS listener's address, likewise.
    pub wss: Option<SocketAddr>,
    /// The TLS configuration the TLS and WSS listeners share, to reload it.
    pub tls_config: Option<Arc<broker::transport::tls::Tls>>,
    /// The authentication in force, to reload it.
    pub auth: Arc<Auth>,
    /// The state the connections share (sessions, ACL, address counts, flapping bans, ...).
    pub mqtt: Arc<mqtt::Broker>,
    /// The connection events, as the bridge would receive them; a test that reads them itself
    /// may take the receiver out.
    pub events: EventReceiver,
    /// Cancelled by [`stop`](Self::stop): the graceful shutdown (`broker_shutdown` for each
    /// connection).
    pub shutdown: CancellationToken,
    /// The serve task, awaited by [`stop`](Self::stop).
    pub handle: JoinHandle<()>,
}

impl TestBroker {
    /// The MQTT layer with the default [`MqttConfig`].
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// The MQTT layer with the defaults changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut MqttConfig)) -> Self {
        Self::start_with_auth(adjust, AuthConfig::default()).await
    }

    /// As [`start_with`](Self::start_with), checking credentials as `auth` says.
    pub async fn start_with_auth(adjust: impl FnOnce(&mut MqttConfig), auth: AuthConfig) -> Self {
        Self::start_full(adjust, auth, None).await
    }

    /// The MQTT layer with the default [`MqttConfig`], keeping its state durable in `store`
    /// (a test's own [`StateStore`], such as one that decides when records are durable).
    pub async fn start_with_state(store: Arc<dyn StateStore>) -> Self {
        Self::start_full(|_| {}, AuthConfig::default(), Some(store)).await
    }

    async fn start_full(
        adjust: impl FnOnce(&mut MqttConfig),
        auth: AuthConfig,
        store: Option<Arc<dyn StateStore>>,
    ) -> Self {
        let mut config = MqttConfig::default();
        adjust(&mut config);
        let acl = Arc::new(Acl::new(auth.acl_file.as_deref()).expect("the ACL file loads"));
        let auth = Arc::new(Auth::new(&auth).expect("the auth configuration loads"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tls, tls_addr) = bind_if(config.tls.listen).await;
        let (ws, ws_addr) = bind_if(config.ws.listen).await;
        let (wss, wss_addr) = bind_if(config.wss.listen).await;
        let sockets = mqtt::listener::Sockets {
            tcp: listener,
            tls,
            ws,
            wss,
        };
        let (endpoints, tls_config) = sockets
            .endpoints(&config)
            .expect("the TLS configuration loads");
        let (tx, events) = event::channel(1024);
        let shutdown = CancellationToken::new();
        let mut broker = mqtt::Broker::new(config, tx)
            .with_auth(Arc::clone(&auth))
            .with_acl(acl);
        if let Some(store) = store {
            broker.set_state(store);
        }
        let broker = Arc::new(broker);
        let handle = tokio::spawn(mqtt::serve(
            endpoints,
            Arc::clone(&broker),
            shutdown.clone(),
            Duration::from_secs(5),
        ));
        Self {
            addr,
            tls: tls_addr,
            ws: ws_addr,
            wss: wss_addr,
            tls_config,
            auth,
            mqtt: broker,
            events,
            shutdown,
            handle,
        }
    }

    /// The next connection event, failing after [`WAIT`].
    pub async fn next_event(&mut self) -> ConnectionEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event within the deadline")
            .expect("event channel open")
    }

    /// Waits for the next event, which must be the Connected event of `client_id`, and returns it.
    pub async fn connected(&mut self, client_id: &str) -> ConnectionEvent {
        let event = self.next_event().await;
        match &event {
            ConnectionEvent::Connected { client_id: id, .. } if id == client_id => event,
            other => panic!("expected Connected for {client_id}, got {other:?}"),
        }
    }

    /// Waits for the next event, which must be the Disconnected event of `client_id`, and checks
    /// its reason.
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

/// A listener on a free loopback port when `configured` is set.
async fn bind_if(configured: Option<SocketAddr>) -> (Option<TcpListener>, Option<SocketAddr>) {
    if configured.is_none() {
        return (None, None);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    (Some(listener), Some(addr))
}
