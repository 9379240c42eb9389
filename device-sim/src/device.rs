//! One simulated device: an MQTT 3.1.1 or 5 client ([`crate::client`]) that connects, stays
//! connected (its event loop keeps running so keep-alive PINGREQs go out), retries with
//! jittered exponential backoff after errors, and obeys scenario [`Command`]s: leave (cleanly,
//! abruptly or by dying silently) and come back, drop in a storm, or be taken over by a second
//! connection with its client id. Every change is written to the ground truth
//! ([`crate::truth`]), and with MQTT 5 every DISCONNECT the broker sends before closing a
//! connection (its reason code; a silently dead connection is read for it once the broker must
//! have closed it). With `--publish-interval` a connected device also publishes telemetry
//! ([`Telemetry`]). When the run ends it disconnects cleanly, or with `--end-state keep` stays
//! connected until the process is signalled.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rumqttc::{Outgoing, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Client, Error, Event, Protocol};
use crate::credentials::Credentials;
use crate::report::Stats;
use crate::transport::{Link, Transport};
use crate::truth::{self, Record, TruthWriter};

/// First retry delay after an error.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Upper bound of the retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Largest MQTT packet a simulated device accepts, in bytes (it sends up to its telemetry
/// message size when that is larger).
const MAX_PACKET_SIZE: usize = 4096;
/// Room for a PUBLISH's fixed header, topic length and packet id beyond topic and payload.
const PUBLISH_OVERHEAD: usize = 16;
/// How long a device waits for its DISCONNECT to be written (at least; with QoS 1/2 telemetry
/// up to the connect timeout, as an unacknowledged message holds the DISCONNECT back).
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Extra time a silently dead device stays away beyond the broker's keep-alive deadline, so
/// that the broker (not a takeover by the device's comeback) ends the dead session.
const SILENT_MARGIN: Duration = Duration::from_secs(1);
/// Extra time a takeover waits for the first connection to be closed, beyond the connect timeout.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(5);
/// How long an MQTT 5 device reads a silently dead connection, once the broker must have
/// closed it, for the DISCONNECT (0x8D) the broker sent before closing.
const DEAD_READ: Duration = Duration::from_millis(200);

/// The broker's keep-alive multiplier (MQTT 3.1.1: 1.5, Heartwire's default
/// `mqtt.keepalive_multiplier`): the default of `run` and `verify --keepalive-multiplier`.
pub const KEEPALIVE_MULTIPLIER: f64 = 1.5;

/// What a device does when the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EndState {
    /// Send DISCONNECT and close (the truth's final state is offline for every device).
    Disconnect,
    /// Stay connected until SIGINT/SIGTERM, then disconnect; the truth file records the
    /// state at the end of `--duration` first.
    Keep,
}

/// Settings shared by every device of a run.
#[derive(Debug, Clone)]
pub struct Profile {
    /// MQTT keep-alive interval; zero disables PINGREQs.
    pub keepalive: Duration,
    /// The broker's keep-alive multiplier (`run --keepalive-multiplier`).
    pub keepalive_multiplier: f64,
    /// MQTT clean-session flag.
    pub clean_session: bool,
    /// Bound on TCP connect plus CONNECT/CONNACK exchange, in whole seconds.
    pub connect_timeout_s: u64,
    /// What to do at the end of the run.
    pub end_state: EndState,
    /// Where each device's MQTT user name and password (sent in CONNECT) come from.
    pub credentials: Credentials,
    /// Periodic publishing while connected, if any.
    pub telemetry: Option<Telemetry>,
    /// How devices reach the broker (TCP, TLS, WebSocket); built once per process.
    pub transport: Arc<Transport>,
    /// MQTT 3.1.1 or 5 (`--protocol`).
    pub protocol: Protocol,
}

/// Telemetry a connected device publishes (`--publish-interval`, `--qos`, `--payload-size`,
/// `--topic`).
#[derive(Debug, Clone)]
pub struct Telemetry {
    /// Time between two messages of one device (the first comes at a random point of the first
    /// interval after CONNACK, so a fleet does not publish in lockstep).
    pub interval: Duration,
    /// Quality of service of every message.
    pub qos: QoS,
    /// Exact payload size in bytes.
    pub payload_size: usize,
    /// Topic template: `%c` becomes the client id, `%i` the device number.
    pub topic: String,
}

impl Telemetry {
    /// The topic of device `number` with client id `client_id`.
    pub fn topic_for(&self, client_id: &str, number: u64) -> String {
        self.topic
            .replace("%c", client_id)
            .replace("%i", &number.to_string())
    }

    /// Message `seq` of `client_id`: a JSON object `{"id":…,"seq":…,"ts":…,"pad":"…"}` padded to
    /// exactly `payload_size` bytes, or that JSON cut to `payload_size` when it does not fit.
    pub fn payload(&self, client_id: &str, seq: u64) -> Vec<u8> {
        let ts = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let head = format!("{{\"id\":\"{client_id}\",\"seq\":{seq},\"ts\":{ts},\"pad\":\"");
        let mut body = head.into_bytes();
        let tail = b"\"}";
        if body.len() + tail.len() <= self.payload_size {
            body.resize(self.payload_size - tail.len(), b'x');
            body.extend_from_slice(tail);
        } else {
            body.truncate(self.payload_size);
        }
        body
    }

    /// Largest PUBLISH packet this telemetry produces with a topic of `topic_len` bytes.
    pub fn packet_size(&self, topic_len: usize) -> usize {
        self.payload_size + topic_len + PUBLISH_OVERHEAD
    }
}

impl Profile {
    /// How long after a silent death the broker must have closed the connection:
    /// keep-alive × the broker's multiplier (the deadline counts from the last packet the
    /// broker received, which is earlier still).
    pub fn detection_window(&self) -> Duration {
        self.keepalive.mul_f64(self.keepalive_multiplier)
    }

    /// The shortest time away after a silent death.
    pub fn silent_pause(&self) -> Duration {
        self.detection_window() + SILENT_MARGIN
    }
}

/// Identity and target broker of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// MQTT client identifier.
    pub client_id: String,
    /// Broker host name or address.
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// Device number (the client id's suffix).
    pub number: u64,
}

/// How a device leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveKind {
    /// DISCONNECT, then close (broker reason `client_disconnect`).
    Clean,
    /// Close the socket without DISCONNECT (`connection_lost`).
    Abrupt,
    /// Stop sending, keep the socket open (`keepalive_timeout`).
    Silent,
}

/// An order from the scenario scheduler; ignored unless the device is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Leave, and come back after `pause` (at least [`Profile::silent_pause`] for a silent death).
    Leave {
        /// How.
        kind: LeaveKind,
        /// Time away.
        pause: Duration,
        /// Recorded as the truth's `cause`.
        cause: &'static str,
    },
    /// Close abruptly and reconnect after a jittered [`backoff`].
    Storm,
    /// Open a second connection with the same client id; it replaces the first.
    Takeover,
}

/// Phases published in [`Control::phase`] for schedulers.
pub mod phase {
    /// Dialling or backing off.
    pub const CONNECTING: u8 = 0;
    /// Holds a session.
    pub const CONNECTED: u8 = 1;
    /// Left on purpose; coming back later.
    pub const AWAY: u8 = 2;
    /// The run ended for this device.
    pub const ENDED: u8 = 3;
}

/// How the rest of the simulator talks to one device.
pub struct Control {
    /// Scenario commands.
    pub commands: mpsc::Receiver<Command>,
    /// The device's phase (see [`phase`]).
    pub phase: Arc<AtomicU8>,
    /// Cancelled when the run ends.
    pub end: CancellationToken,
    /// Cancelled when a `--end-state keep` hold ends (signal).
    pub stop: CancellationToken,
    /// Receives one message once the device has recorded its state at the end of the run.
    pub ended: mpsc::UnboundedSender<()>,
}

/// One MQTT connection of a device.
struct Conn {
    mqtt: Client,
    /// When the device last sent CONNECT, PINGREQ or PUBLISH.
    last_sent: SystemTime,
    /// When this connection received its CONNACK: identifies its session in the broker's
    /// history (recorded with a DISCONNECT from the broker).
    connected_at: SystemTime,
}

impl Conn {
    /// A connection of `device` over `link`, whose telemetry topic (if any) is `topic_len`
    /// bytes long.
    fn new(device: &Device, profile: &Profile, link: &Link, topic_len: usize) -> Self {
        let max_outgoing = profile.telemetry.as_ref().map_or(MAX_PACKET_SIZE, |t| {
            t.packet_size(topic_len).max(MAX_PACKET_SIZE)
        });
        let mqtt = Client::new(&client::Options {
            protocol: profile.protocol,
            client_id: &device.client_id,
            host: &device.host,
            port: device.port,
            link,
            keepalive: profile.keepalive,
            clean: profile.clean_session,
            max_incoming: MAX_PACKET_SIZE,
            max_outgoing,
            credentials: profile.credentials.for_device(&device.client_id),
            connect_timeout_s: profile.connect_timeout_s,
        });
        let now = SystemTime::now();
        Self {
            mqtt,
            last_sent: now,
            connected_at: now,
        }
    }

    /// Reads a silently dead connection, which the broker must have closed by now, for the
    /// DISCONNECT it sent first (MQTT 5; its reason code), for at most `within`. Never used on
    /// a 3.1.1 connection: the broker sends it nothing before closing.
    ///
    /// The event loop may write a PINGREQ first (its timer ran out long ago); the broker has
    /// closed the connection, so that changes nothing there.
    async fn last_words(mut self, within: Duration) -> Option<u8> {
        if self.mqtt.protocol() != Protocol::V5 {
            return None;
        }
        tokio::time::timeout(within, async {
            loop {
                if let Err(error) = self.mqtt.poll().await {
                    return error.server_disconnect();
                }
            }
        })
        .await
        .unwrap_or(None)
    }

    /// Queues a DISCONNECT, drives the event loop until it is written, then keeps reading until
    /// the broker closes the connection; `true` if the DISCONNECT was written.
    ///
    /// Closing a socket with unread bytes (say, a PINGRESP) makes the kernel send RST instead of
    /// FIN, and the broker may then see a reset before the DISCONNECT (`connection_lost`);
    /// reading to the end avoids that.
    ///
    /// The request channel holds one request: when a telemetry message still waits in it, the
    /// DISCONNECT is queued as soon as the event loop has taken that message.
    ///
    /// Telemetry written and acknowledged meanwhile is counted in `stats`.
    async fn disconnect(mut self, stats: &Stats, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            let (mut queued, mut sent) = (false, false);
            loop {
                if !queued {
                    // Fails only while the channel is full: the event loop owns the receiver.
                    queued = self.mqtt.try_disconnect();
                }
                match self.mqtt.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => sent = true,
                    Ok(event) => count_telemetry(stats, &event),
                    // After the DISCONNECT, an error is the broker's close (never poll again:
                    // rumqttc would redial).
                    Err(_) => return sent,
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Polls until CONNACK; returns the connected connection.
    async fn connect(mut self) -> Result<Self, Error> {
        loop {
            let event = self.mqtt.poll().await?;
            self.saw(&event);
            if event == Event::ConnAck {
                return Ok(self);
            }
        }
    }

    /// Notes outgoing traffic (what resets the broker's keep-alive deadline) and the CONNACK.
    fn saw(&mut self, event: &Event) {
        let sent = match event {
            Event::Outgoing(o) => !matches!(o, Outgoing::AwaitAck(_)),
            Event::ConnAck => true,
            Event::Acked | Event::Incoming => false,
        };
        if sent {
            self.last_sent = SystemTime::now();
        }
        if *event == Event::ConnAck {
            self.connected_at = self.last_sent;
        }
    }
}

/// Polls `conn`, or never resolves without one.
async fn poll(conn: Option<&mut Conn>) -> Result<Event, Error> {
    match conn {
        Some(c) => c.mqtt.poll().await,
        None => std::future::pending().await,
    }
}

/// What woke the device's loop.
enum Step {
    End,
    Closed,
    Command(Command),
    Wake,
    Publish,
    Net(Result<Event, Error>),
}

/// A device's whole state.
struct Sim {
    device: Device,
    profile: Arc<Profile>,
    stats: Arc<Stats>,
    truth: Arc<TruthWriter>,
    phase: Arc<AtomicU8>,
    /// The device's way to the broker (its TLS configuration, if any), for every dial.
    link: Link,
    /// The current connection (dialling, backing off or connected).
    conn: Option<Conn>,
    connected: bool,
    ever_connected: bool,
    failures: u32,
    attempt_start: Instant,
    backoff_until: Option<Instant>,
    /// Set while away; the device dials again then.
    away_until: Option<Instant>,
    /// A silently dead connection, held open (never polled) until the device comes back,
    /// with the time by which the broker must have closed it.
    dead: Option<(Conn, Instant)>,
    /// When the next telemetry message is due (connected devices with telemetry only).
    next_publish: Option<Instant>,
    /// Telemetry messages queued so far (the payload's `seq`).
    seq: u64,
    /// The telemetry topic, expanded once.
    topic: String,
}

impl Sim {
    fn record(&self, event: &str, observed: bool, cause: Option<&str>) {
        let mut r = Record::now(&self.device.client_id, event, observed);
        r.cause = cause.map(str::to_owned);
        self.truth.record(&r);
    }

    /// An error of this device's connection for the summary: what happened and to which broker.
    fn describe(&self, error: &Error) -> String {
        format!("{error} (to {}:{})", self.device.host, self.device.port)
    }

    /// A new connection (not dialled until polled).
    fn dial(&self) -> Conn {
        Conn::new(&self.device, &self.profile, &self.link, self.topic.len())
    }

    fn set_phase(&self, p: u8) {
        self.phase.store(p, Ordering::Relaxed);
    }

    /// Records the DISCONNECT the broker sent before ending a connection that received its
    /// CONNACK at `connected_at`, if `code` says it sent one (MQTT 5).
    fn goodbye(&self, code: Option<u8>, connected_at: SystemTime) {
        let Some(code) = code else { return };
        let mut r = Record::now(&self.device.client_id, truth::SERVER_DISCONNECT, true);
        r.reason_code = Some(code);
        r.connected_at = Some(truth::utc(connected_at));
        self.truth.record(&r);
        self.stats.server_disconnect(code);
    }

    /// Records what a connection ended by `error` was told by the broker (see [`Self::goodbye`]).
    fn lost(&self, error: &Error) {
        if let Some(conn) = &self.conn {
            self.goodbye(error.server_disconnect(), conn.connected_at);
        }
    }

    /// Reads a silently dead connection for the broker's DISCONNECT, then closes it.
    async fn bury(&mut self, dead: Conn) {
        let connected_at = dead.connected_at;
        let code = dead.last_words(DEAD_READ).await;
        self.goodbye(code, connected_at);
    }

    fn on_net(&mut self, event: Result<Event, Error>) {
        match event {
            Ok(event) => {
                self.saw(&event);
                if event == Event::ConnAck {
                    self.stats
                        .connected(self.attempt_start.elapsed(), self.ever_connected);
                    self.connected = true;
                    self.ever_connected = true;
                    self.failures = 0;
                    self.record(truth::CONNECTED, true, None);
                    self.set_phase(phase::CONNECTED);
                    self.next_publish = self.profile.telemetry.as_ref().map(|t| {
                        let offset = random_u64() % (t.interval.as_millis().max(1) as u64);
                        Instant::now() + Duration::from_millis(offset)
                    });
                }
            }
            Err(error) => {
                if self.connected {
                    self.record(truth::CONNECTION_LOST, true, None);
                    self.lost(&error);
                }
                self.stats.error(self.connected, || self.describe(&error));
                self.connected = false;
                self.set_phase(phase::CONNECTING);
                self.backoff_until = Some(Instant::now() + backoff(self.failures));
                self.failures = self.failures.saturating_add(1);
            }
        }
    }

    /// Notes an event of the current connection: keep-alive traffic and telemetry counters.
    fn saw(&mut self, event: &Event) {
        if let Some(c) = self.conn.as_mut() {
            c.saw(event);
        }
        count_telemetry(&self.stats, event);
    }

    /// Queues the next telemetry message; when the previous one still waits for the event
    /// loop (QoS 1/2 in flight, or a slow socket) this one is skipped and counted.
    fn publish(&mut self) {
        let (Some(t), Some(due)) = (self.profile.telemetry.as_ref(), self.next_publish) else {
            return;
        };
        let now = Instant::now();
        let next = due + t.interval;
        self.next_publish = Some(if next <= now { now + t.interval } else { next });
        let Some(conn) = self.conn.as_ref() else {
            return;
        };
        let payload = t.payload(&self.device.client_id, self.seq);
        if conn.mqtt.try_publish(self.topic.as_str(), t.qos, payload) {
            self.seq += 1;
        } else {
            self.stats.publish_skipped();
        }
    }

    async fn on_wake(&mut self) {
        if self.backoff_until.take().is_some() {
            self.attempt_start = Instant::now();
        } else if self.away_until.take().is_some() {
            if let Some((dead, _)) = self.dead.take() {
                self.bury(dead).await;
            }
            self.conn = Some(self.dial());
            self.stats.returned();
            self.failures = 0;
            self.attempt_start = Instant::now();
            self.set_phase(phase::CONNECTING);
        }
    }

    /// Sends DISCONNECT and closes; recorded as a clean disconnect, or as an abrupt close when
    /// the DISCONNECT could not be written in time (the broker then sees a lost connection).
    async fn leave_cleanly(&mut self, conn: Conn, cause: &str) {
        let mut r =
            Record::now(&self.device.client_id, truth::DISCONNECT_CLEAN, false).cause(cause);
        let timeout = match &self.profile.telemetry {
            Some(t) if t.qos != QoS::AtMostOnce => {
                DISCONNECT_TIMEOUT.max(Duration::from_secs(self.profile.connect_timeout_s))
            }
            _ => DISCONNECT_TIMEOUT,
        };
        if !conn.disconnect(&self.stats, timeout).await {
            eprintln!(
                "device-sim: {}: DISCONNECT not written within {timeout:?}; closed abruptly",
                self.device.client_id
            );
            r.event = truth::CLOSE_ABRUPT.to_owned();
        }
        self.truth.record(&r);
    }

    /// Leaves the connected state; the device dials again after `pause`.
    fn gone(&mut self, pause: Duration) {
        self.connected = false;
        self.stats.left();
        self.away_until = Some(Instant::now() + pause);
        self.set_phase(phase::AWAY);
    }

    async fn on_command(&mut self, command: Command) {
        if !self.connected {
            return;
        }
        let Some(conn) = self.conn.take() else { return };
        match command {
            Command::Leave { kind, pause, cause } => {
                let kind = if kind == LeaveKind::Silent && self.profile.keepalive.is_zero() {
                    LeaveKind::Abrupt // never detected without keep-alive
                } else {
                    kind
                };
                match kind {
                    LeaveKind::Clean => {
                        self.leave_cleanly(conn, cause).await;
                        self.gone(pause);
                    }
                    LeaveKind::Abrupt => {
                        self.record(truth::CLOSE_ABRUPT, false, Some(cause));
                        drop(conn);
                        self.gone(pause);
                    }
                    LeaveKind::Silent => {
                        let mut r = Record::now(&self.device.client_id, truth::SILENT_DEATH, false)
                            .cause(cause);
                        r.last_sent = Some(truth::utc(conn.last_sent));
                        r.keepalive = u16::try_from(self.profile.keepalive.as_secs()).ok();
                        self.truth.record(&r);
                        let now = Instant::now();
                        self.dead = Some((conn, now + self.profile.detection_window()));
                        self.gone(pause.max(self.profile.silent_pause()));
                    }
                }
            }
            Command::Storm => {
                self.record(truth::CLOSE_ABRUPT, false, Some("storm"));
                drop(conn);
                self.gone(backoff(0));
            }
            Command::Takeover => self.takeover(conn).await,
        }
    }

    /// Opens a second connection with the same client id while still polling `old`, until the
    /// new one is connected and the broker closed the old one. The end of the run does not
    /// interrupt it (the limit below bounds it): the truth already says `takeover`, and
    /// dropping both connections would make the broker see the old one lost instead.
    ///
    /// rumqttc's `poll` is not cancel-safe while it connects (a dropped future abandons the
    /// half-open connection), so each connection is driven by one future that lives until it
    /// completes instead of a fresh `poll` per `select!` round.
    async fn takeover(&mut self, old: Conn) {
        self.record(truth::TAKEOVER, false, Some("takeover"));
        let stats = Arc::clone(&self.stats);
        let old_connected_at = old.connected_at;
        let old_fut = async move {
            let mut old = old;
            loop {
                match old.mqtt.poll().await {
                    Ok(event) => count_telemetry(&stats, &event),
                    Err(error) => return error.server_disconnect(),
                }
            }
        };
        let new_fut = self.dial().connect();
        let limit = Duration::from_secs(self.profile.connect_timeout_s) + TAKEOVER_MARGIN;
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(old_fut, new_fut, deadline);
        let (mut new, mut new_done, mut old_closed) = (None::<Conn>, false, false);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                res = &mut new_fut, if !new_done => {
                    new_done = true;
                    match res {
                        Ok(conn) => {
                            self.record(truth::TAKEOVER_CONNECTED, true, None);
                            new = Some(conn);
                        }
                        Err(_) => break,
                    }
                }
                code = &mut old_fut, if !old_closed => {
                    old_closed = true;
                    self.record(truth::TAKEN_OVER, true, None);
                    self.goodbye(code, old_connected_at);
                }
                ev = poll(new.as_mut()), if new.is_some() => match ev {
                    Ok(event) => {
                        if let Some(c) = new.as_mut() {
                            c.saw(&event);
                        }
                    }
                    Err(error) => {
                        if let Some(c) = new.take() {
                            self.goodbye(error.server_disconnect(), c.connected_at);
                        }
                        break;
                    }
                },
            }
            if new.is_some() && old_closed {
                break;
            }
        }
        match new {
            Some(conn) => {
                if !old_closed {
                    eprintln!(
                        "device-sim: {}: the first connection was not closed after a takeover",
                        self.device.client_id
                    );
                }
                self.stats.took_over();
                self.conn = Some(conn);
            }
            None => {
                // The takeover failed: drop whatever is left and redial like after any loss.
                self.conn = Some(self.dial());
                self.on_net(Err(Error::Abandoned));
            }
        }
    }

    /// Main loop until the run ends.
    async fn live(&mut self, ctl: &mut Control) {
        let mut commands_open = true;
        loop {
            let wake = self.backoff_until.or(self.away_until);
            let polling = self.conn.is_some() && self.backoff_until.is_none();
            let dialling = polling && !self.connected;
            let publish = self
                .next_publish
                .filter(|_| self.connected && self.conn.is_some());
            let step = tokio::select! {
                biased;
                _ = ctl.end.cancelled() => Step::End,
                // Not while dialling: dropping rumqttc's poll mid-connect abandons the attempt.
                cmd = ctl.commands.recv(), if commands_open && !dialling => match cmd {
                    Some(c) => Step::Command(c),
                    None => Step::Closed,
                },
                _ = sleep_until_opt(wake), if wake.is_some() => Step::Wake,
                _ = sleep_until_opt(publish), if publish.is_some() => Step::Publish,
                ev = poll(self.conn.as_mut()), if polling => Step::Net(ev),
            };
            match step {
                Step::End => return,
                Step::Closed => commands_open = false,
                Step::Command(c) => self.on_command(c).await,
                Step::Wake => self.on_wake().await,
                Step::Publish => self.publish(),
                Step::Net(ev) => self.on_net(ev),
            }
        }
    }

    /// With `--end-state keep`: keeps a connected device connected (polling, so it pings)
    /// until `stop`; everything else stops trying and waits (a dead socket stays open).
    async fn hold(&mut self, stop: &CancellationToken) {
        if !self.connected {
            self.drop_attempt();
            stop.cancelled().await;
            return;
        }
        loop {
            let publish = self.next_publish;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = sleep_until_opt(publish), if publish.is_some() => self.publish(),
                ev = poll(self.conn.as_mut()) => match ev {
                    Ok(event) => self.saw(&event),
                    Err(error) => {
                        // Not redialled: the truth already says what the broker should show.
                        self.record(truth::CONNECTION_LOST, true, None);
                        self.lost(&error);
                        self.stats.error(true, || self.describe(&error));
                        self.connected = false;
                        self.drop_attempt();
                        stop.cancelled().await;
                        return;
                    }
                },
            }
        }
    }

    /// Abandons a connection that is not established (dialling or backing off).
    fn drop_attempt(&mut self) {
        if !self.connected && self.conn.take().is_some() {
            self.backoff_until = None;
        }
    }

    /// Disconnects cleanly if connected, lets a dead connection reach its keep-alive deadline,
    /// and records the final offline state.
    async fn finish(&mut self) {
        if self.connected {
            if let Some(conn) = self.conn.take() {
                self.leave_cleanly(conn, "end").await;
            }
        }
        if let Some((conn, deadline)) = self.dead.take() {
            // Closing now would end the session as connection_lost; wait for the broker.
            if self.profile.protocol == Protocol::V5 {
                // Reading it could send a PINGREQ: not before the broker must have closed it.
                tokio::time::sleep_until((deadline + SILENT_MARGIN).into()).await;
                self.bury(conn).await;
            } else {
                tokio::time::sleep_until(deadline.into()).await;
                drop(conn);
            }
        }
        self.truth.final_state(&self.device.client_id, false);
        if self.away_until.take().is_some() {
            self.stats.returned();
        }
        self.stats.device_stopped(self.connected);
        self.connected = false;
        self.conn = None;
    }
}

/// Counts telemetry written and acknowledged.
fn count_telemetry(stats: &Stats, event: &Event) {
    match event {
        Event::Outgoing(Outgoing::Publish(_)) => stats.published(),
        Event::Acked => stats.acknowledged(),
        _ => {}
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Runs one device until the run ends (and, with `--end-state keep`, until `ctl.stop`),
/// reporting into `stats` and `truth`.
pub async fn run(
    device: Device,
    profile: Arc<Profile>,
    stats: Arc<Stats>,
    truth: Arc<TruthWriter>,
    mut ctl: Control,
) {
    stats.device_started();
    let link = match profile.transport.link(&device.client_id).await {
        Ok(link) => link,
        Err(error) => return never_connects(&device, &profile, &stats, &truth, ctl, &error).await,
    };
    let topic = profile
        .telemetry
        .as_ref()
        .map(|t| t.topic_for(&device.client_id, device.number))
        .unwrap_or_default();
    let mut sim = Sim {
        link,
        conn: None,
        next_publish: None,
        seq: 0,
        topic,
        device,
        profile,
        stats,
        truth,
        phase: Arc::clone(&ctl.phase),
        connected: false,
        ever_connected: false,
        failures: 0,
        attempt_start: Instant::now(),
        backoff_until: None,
        away_until: None,
        dead: None,
    };
    sim.conn = Some(sim.dial());
    sim.set_phase(phase::CONNECTING);
    sim.live(&mut ctl).await;
    sim.set_phase(phase::ENDED);
    if sim.profile.end_state == EndState::Keep {
        sim.drop_attempt();
        sim.truth.final_state(&sim.device.client_id, sim.connected);
        let _ = ctl.ended.send(());
        sim.hold(&ctl.stop).await;
    } else {
        let _ = ctl.ended.send(());
    }
    sim.finish().await;
}

/// A device whose transport could not be set up (its certificate is unreadable, say): counted
/// as a failed connect (the error names the file), it never dials and ends offline.
async fn never_connects(
    device: &Device,
    profile: &Profile,
    stats: &Stats,
    truth: &TruthWriter,
    ctl: Control,
    error: &crate::transport::TransportError,
) {
    stats.error(false, || format!("{}: {error}", device.client_id));
    ctl.end.cancelled().await;
    ctl.phase.store(phase::ENDED, Ordering::Relaxed);
    truth.final_state(&device.client_id, false);
    let _ = ctl.ended.send(());
    if profile.end_state == EndState::Keep {
        ctl.stop.cancelled().await;
    }
    stats.device_stopped(false);
}

/// Delay before retry number `failures` (0-based): exponential from
/// [`BACKOFF_MIN`] up to [`BACKOFF_MAX`], with "equal jitter" (uniform in the
/// upper half of the step) so that a mass disconnect does not reconnect in lockstep.
pub fn backoff(failures: u32) -> Duration {
    let step = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    let half = step / 2;
    let jitter_ms = random_u64() % (u64::try_from(half.as_millis()).unwrap_or(1).max(1) + 1);
    half + Duration::from_millis(jitter_ms)
}

/// A random number from std's per-instance randomly keyed hasher; plenty for jitter.
pub fn random_u64() -> u64 {
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        for _ in 0..100 {
            let first = backoff(0);
            assert!(
                first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN,
                "{first:?}"
            );
            let late = backoff(40);
            assert!(late >= BACKOFF_MAX / 2 && late <= BACKOFF_MAX, "{late:?}");
        }
        assert!(backoff(3) >= Duration::from_millis(400));
    }

    #[test]
    fn telemetry_payload_has_the_exact_size_and_topic_is_expanded() {
        let mut t = Telemetry {
            interval: Duration::from_secs(1),
            qos: QoS::AtMostOnce,
            payload_size: 100,
            topic: "d/%c/n%i".to_owned(),
        };
        assert_eq!(t.topic_for("dev-7", 7), "d/dev-7/n7");
        let p = t.payload("dev-7", 3);
        assert_eq!(p.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("JSON");
        assert_eq!(
            (v["id"].as_str(), v["seq"].as_u64()),
            (Some("dev-7"), Some(3))
        );
        t.payload_size = 5;
        assert_eq!(t.payload("dev-7", 3), b"{\"id\"");
        assert!(t.packet_size(10) > 15);
    }

    /// Reads one short MQTT packet (remaining length below 128) from `socket`; its first byte.
    async fn read_packet(socket: &mut TcpStream, what: &str) -> u8 {
        let mut head = [0u8; 2];
        let read = tokio::time::timeout(testkit::WAIT, socket.read_exact(&mut head)).await;
        assert!(matches!(read, Ok(Ok(_))), "no {what}: {read:?}");
        let mut body = vec![0u8; usize::from(head[1])];
        socket.read_exact(&mut body).await.expect("packet body");
        head[0]
    }

    /// A takeover under way when the run ends is completed, not abandoned: abandoning it
    /// dropped both connections, so the broker saw the first one lost (`connection_lost`)
    /// where the truth said `takeover`, and the run counted an error.
    #[tokio::test]
    async fn a_takeover_under_way_when_the_run_ends_is_completed() {
        const CONNECT: u8 = 0x10;
        const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
        const DISCONNECT: u8 = 0xE0;
        let broker = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = broker.local_addr().expect("address").port();
        let accept = || async {
            let accepted = tokio::time::timeout(testkit::WAIT, broker.accept()).await;
            accepted.expect("the device dials").expect("accept").0
        };
        let dir = testkit::temp_dir("takeover-end");
        let path = dir.path().join("truth.jsonl");
        let truth = Arc::new(TruthWriter::create(&path).expect("truth file"));
        let stats = Arc::new(Stats::new(1).expect("stats"));
        let profile = Arc::new(Profile {
            keepalive: Duration::from_secs(30),
            keepalive_multiplier: KEEPALIVE_MULTIPLIER,
            clean_session: true,
            connect_timeout_s: 5,
            end_state: EndState::Disconnect,
            credentials: Credentials::none(),
            telemetry: None,
            transport: Arc::new(Transport::tcp()),
            protocol: Protocol::V311,
        });
        let (commands, commands_rx) = mpsc::channel(1);
        let (ended, _ended_rx) = mpsc::unbounded_channel();
        let (end, phase) = (CancellationToken::new(), Arc::new(AtomicU8::new(0)));
        let ctl = Control {
            commands: commands_rx,
            phase: Arc::clone(&phase),
            end: end.clone(),
            stop: CancellationToken::new(),
            ended,
        };
        let device = Device {
            client_id: "dev-0".to_owned(),
            host: "127.0.0.1".to_owned(),
            port,
            number: 0,
        };
        let task = tokio::spawn(run(
            device,
            profile,
            Arc::clone(&stats),
            Arc::clone(&truth),
            ctl,
        ));

        let mut first = accept().await;
        assert_eq!(read_packet(&mut first, "CONNECT").await, CONNECT);
        first.write_all(&CONNACK).await.expect("CONNACK");
        testkit::eventually("the device is connected", || async {
            (phase.load(Ordering::Relaxed) == phase::CONNECTED).then_some(())
        })
        .await;
        commands.send(Command::Takeover).await.expect("command");
        let mut second = accept().await;
        assert_eq!(read_packet(&mut second, "second CONNECT").await, CONNECT);
        // The run ends while the second connection waits for its CONNACK. On this
        // single-threaded runtime, yielding lets the woken device task see the end first.
        end.cancel();
        tokio::task::yield_now().await;
        second.write_all(&CONNACK).await.expect("second CONNACK");
        drop(first); // as a broker closes the connection taken over
        assert_eq!(
            read_packet(&mut second, "DISCONNECT on the second connection").await,
            DISCONNECT
        );
        drop(second); // as a broker closes after DISCONNECT
        tokio::time::timeout(testkit::WAIT, task)
            .await
            .expect("the device ends")
            .expect("device task");

        truth.flush().expect("flush");
        let events: Vec<String> = truth::read(&path)
            .expect("truth")
            .into_iter()
            .map(|r| r.event)
            .collect();
        for event in [truth::TAKEOVER_CONNECTED, truth::TAKEN_OVER] {
            assert!(events.iter().any(|e| e == event), "{events:?}");
        }
        assert!(
            events.ends_with(&[truth::DISCONNECT_CLEAN.to_owned(), truth::FINAL.to_owned()]),
            "{events:?}"
        );
        assert_eq!(stats.snapshot().errors, 0, "{events:?}");
    }

    #[test]
    fn silent_pause_outlasts_the_keepalive_deadline() {
        let p = Profile {
            keepalive: Duration::from_secs(2),
            keepalive_multiplier: KEEPALIVE_MULTIPLIER,
            clean_session: true,
            connect_timeout_s: 5,
            end_state: EndState::Disconnect,
            credentials: Credentials::none(),
            telemetry: None,
            transport: Arc::new(Transport::tcp()),
            protocol: Protocol::V311,
        };
        assert_eq!(p.detection_window(), Duration::from_secs(3));
        assert!(p.silent_pause() > p.detection_window());
    }
}
