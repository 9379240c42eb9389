//! The handshake: CONNECT within `mqtt.connect_timeout`, its validation (client id, keep-alive
//! bounds, will topic), attaching to the session (taking it over from the connection that holds
//! it), the Connected event and the CONNACK.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::io::{Io, ReadError, Transport};
use super::packets::Deferred;
use super::Hello;
use crate::auth::acl::Access;
use crate::auth::scram;
use crate::auth::{self, Refusal};
use crate::config::{KeepAlivePolicy, MqttConfig};
use crate::event::{ConnectionEvent, SessionId};
use crate::labels::{AuthMethod, Listener, PacketType, RefusalReason};
use crate::metrics::metrics;
use crate::mqtt::codec::encode::{self, property};
use crate::mqtt::codec::{CodecError, ConnackCode};
use crate::mqtt::limits::{Flap, Throttle};
use crate::mqtt::packet::{reason, Connect, Packet, Protocol, Will};
use crate::mqtt::session::{Login, Peer, Session};
use crate::mqtt::sessions::Attach;
use crate::mqtt::{topic, Broker};
use crate::telemetry::LogLimiter;

/// One line per 10 s about refused credentials; each refusal is counted.
static AUTH_REFUSED: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// One line per 10 s about connections refused at `mqtt.max_connections`.
static MAX_CONNECTIONS: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// One line per 10 s about connections refused at `mqtt.max_connections_per_address`.
static PER_ADDRESS: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// One line per 10 s about CONNECTs of banned client ids.
static BANNED: LogLimiter = LogLimiter::new(Duration::from_secs(10));
/// One line per 10 s about client ids banned for flapping.
static NEW_BAN: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// What the handshake settled and the rest of the connection needs.
pub struct Established {
    /// The session the connection uses.
    pub session: Arc<Session>,
    /// The connection's id.
    pub session_id: SessionId,
    /// The connection's sequence number.
    pub seq: u64,
    /// The listener it came in on.
    pub listener: Listener,
    /// keep-alive x multiplier in milliseconds (rounded up), 0 when the client asked for no
    /// keep-alive: a u32 rather than an `Option<Duration>`, as this lives as long as the
    /// connection (at most 65,535 s x 10 fits). See [`Established::keep_alive`].
    keep_alive_ms: u32,
    /// The will, the counted address and the publish rates: what only some connections need,
    /// boxed so that the others carry one pointer for all of them.
    pub extras: Option<Box<Extras>>,
}

/// The parts of an [`Established`] connection that only some connections have.
#[derive(Default)]
pub struct Extras {
    /// Published if the connection ends without DISCONNECT (or with MQTT 5's 0x04).
    pub will: Option<Will>,
    /// MQTT 5 topic aliases the client set (index alias - 1), up to [`TOPIC_ALIAS_MAXIMUM`].
    pub aliases: Vec<Option<Box<str>>>,
    /// The source address counted in [`Broker::addresses`](crate::mqtt::Broker), given back
    /// when the connection closes.
    pub address: Option<IpAddr>,
    /// The publish rates (`mqtt.max_publish_rate`, `mqtt.max_publish_bytes_rate`).
    pub throttle: Option<Throttle>,
    /// The reason code and reason string of the client's MQTT 5 DISCONNECT, for its
    /// Disconnected event.
    pub goodbye: Option<(u8, Option<String>)>,
    /// Acknowledgements waiting for the durable state, in the order they were decided
    /// ([`super::packets::reply`]).
    pub acks: VecDeque<Deferred>,
}

impl Established {
    /// keep-alive x multiplier; `None` when the client asked for no keep-alive.
    pub fn keep_alive(&self) -> Option<Duration> {
        (self.keep_alive_ms > 0).then(|| Duration::from_millis(u64::from(self.keep_alive_ms)))
    }

    /// Until when the broker holds this client's reads back for its publish rates, if it does.
    pub fn paused_until(&self) -> Option<tokio::time::Instant> {
        self.extras.as_ref()?.throttle.as_ref()?.paused_until()
    }
}

/// CONNECT within the timeout, validation, session attach (with takeover), the Connected event
/// and the CONNACK. `None` when the connection was refused (and already answered).
pub async fn handshake<S: Transport>(
    io: &mut Io<S>,
    hello: Box<Hello>,
    broker: &Broker,
    shutdown: &CancellationToken,
) -> Option<Established> {
    let config = &broker.config;
    let Hello {
        peer,
        listener,
        identity,
        deadline,
    } = *hello;
    let first = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            refused(RefusalReason::BrokerShutdown);
            return None;
        }
        first = tokio::time::timeout_at(
            deadline,
            io.read_packet(&broker.read_budget, &broker.read_budget_freed),
        ) => first,
    };
    let connect = match first {
        Ok(Ok(Packet::Connect(connect))) => connect,
        Ok(Ok(other)) => {
            tracing::info!(%peer,
                packet = other.packet_type().as_str(),
                "First packet is not CONNECT; closing."
            );
            refused(RefusalReason::ProtocolError);
            return None;
        }
        Ok(Err(ReadError::Codec(CodecError::UnsupportedProtocol { name, level }))) => {
            tracing::info!(%peer, name = name.as_str(), level, "Unsupported protocol version; CONNACK 0x01.");
            refused(RefusalReason::UnsupportedProtocolVersion);
            io.refuse(ConnackCode::UnacceptableProtocolVersion, None)
                .await;
            return None;
        }
        Ok(Err(ReadError::Codec(error))) => {
            tracing::info!(%peer, %error, "Invalid packet before CONNECT; closing.");
            refused(RefusalReason::ProtocolError);
            // An MQTT 5 CONNECT that got as far as its level is told what is wrong.
            if io.protocol == Some(Protocol::V5) {
                let code = match error.reason_code() {
                    reason::PACKET_TOO_LARGE => ConnackCode::PacketTooLarge,
                    reason::PROTOCOL_ERROR => ConnackCode::ProtocolError,
                    _ => ConnackCode::MalformedPacket,
                };
                io.refuse(code, None).await;
            }
            return None;
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "Connection closed before CONNECT.");
            refused(RefusalReason::ConnectionLost);
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?config.connect_timeout, "No CONNECT within the connect timeout; closing.");
            refused(RefusalReason::ConnectTimeout);
            return None;
        }
    };

    let (client_id, assigned) = match client_id(&connect, config) {
        Ok(id) => id,
        Err(why) => {
            tracing::info!(%peer, client_id = connect.client_id.as_str(), why, "Client identifier rejected; CONNACK 0x02.");
            refused(RefusalReason::IdentifierRejected);
            io.refuse(ConnackCode::IdentifierRejected, Some(why)).await;
            return None;
        }
    };
    tracing::Span::current().record("client_id", client_id.as_str());
    let keep_alive = match keep_alive(connect.keep_alive, config) {
        Ok(ka) => ka,
        Err(why) => {
            tracing::info!(%peer,
                keep_alive = connect.keep_alive,
                why,
                "Keep-alive refused; CONNACK 0x02."
            );
            refused(RefusalReason::KeepaliveRejected);
            io.refuse(ConnackCode::KeepAliveRejected, Some(why)).await;
            return None;
        }
    };
    if let Some(will) = &connect.will {
        if !topic::valid_topic_name(&will.topic, config.max_topic_levels) {
            tracing::info!(%peer, topic = will.topic.as_str(), "Invalid will topic; closing.");
            refused(RefusalReason::ProtocolError);
            if io.protocol == Some(Protocol::V5) {
                io.refuse(ConnackCode::TopicNameInvalid, Some("invalid will topic"))
                    .await;
            }
            return None;
        }
    }
    // Enhanced authentication: SCRAM-SHA-256 when the password file is a provider.
    if let Some(method) = &connect.authentication_method {
        if method != scram::METHOD || !broker.auth.offers_scram() {
            tracing::info!(%peer, method = method.as_str(), "Enhanced authentication method not offered; CONNACK 0x8C.");
            refused(RefusalReason::BadCredentials);
            io.refuse(
                ConnackCode::BadAuthenticationMethod,
                Some("the enhanced authentication method offered is SCRAM-SHA-256"),
            )
            .await;
            return None;
        }
    }

    // A banned client id is refused before its credentials cost anything, and without
    // touching the device connected under it.
    if broker
        .flapping
        .is_banned(&client_id, tokio::time::Instant::now())
    {
        refuse_banned(io, &peer, &client_id, false).await;
        return None;
    }

    // Credentials, before anything of the session is touched: a refused client never
    // disturbs the device connected under the id it claims. A SCRAM exchange proves the user
    // name it gives; otherwise the providers check the CONNECT's user name and password.
    let scram = if connect.authentication_method.is_some() {
        let exchange = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                refused(RefusalReason::BrokerShutdown);
                return None;
            }
            done = tokio::time::timeout_at(deadline, Box::pin(scram_exchange(io, &connect, broker))) => done,
        };
        match exchange {
            Ok(Ok(outcome)) => Some(outcome),
            Ok(Err(reason)) => {
                tracing::info!(%peer, reason = reason.as_str(), "SCRAM exchange broken off; closing.");
                refused(reason);
                return None;
            }
            Err(_) => {
                tracing::info!(%peer, timeout = ?config.connect_timeout, "SCRAM exchange not done within the connect timeout; closing.");
                refused(RefusalReason::ConnectTimeout);
                return None;
            }
        }
    } else {
        None
    };
    let request = auth::Request {
        peer: peer.ip(),
        client_id: &client_id,
        username: match &scram {
            Some((user, _)) => Some(user.as_str()),
            None => connect.username.as_deref(),
        },
        password: connect.password.as_deref().filter(|_| scram.is_none()),
        identity: identity.as_deref(),
    };
    let checked = match &scram {
        Some((_, outcome)) => Ok(outcome
            .clone()
            .and_then(|_| broker.auth.authenticated_by_scram(request))),
        None => tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                refused(RefusalReason::BrokerShutdown);
                return None;
            }
            checked = tokio::time::timeout_at(deadline, broker.auth.authenticate(request)) => checked,
        },
    };
    let (method, grants) = match checked {
        Ok(Ok(authenticated)) => {
            broker.auth.accepted(&request);
            (authenticated.method, authenticated.grants)
        }
        Ok(Err(refusal)) => {
            let (reason, code) = match refusal {
                Refusal::BadCredentials => (
                    RefusalReason::BadCredentials,
                    ConnackCode::BadUsernamePassword,
                ),
                Refusal::NotAuthorized => {
                    (RefusalReason::NotAuthorized, ConnackCode::NotAuthorized)
                }
                Refusal::Unavailable => (
                    RefusalReason::AuthUnavailable,
                    ConnackCode::ServerUnavailable,
                ),
            };
            refused(reason);
            if let Some(suppressed) = AUTH_REFUSED.check() {
                tracing::info!(
                    %peer,
                    client_id = client_id.as_str(),
                    username = connect.username.as_deref().unwrap_or(""),
                    reason = reason.as_str(),
                    suppressed,
                    "Connection refused by authentication; counted by reason in \
                     heartwire_connections_refused_total, this line at most every 10 s."
                );
            }
            // Refusals in a row are answered later and later (within the connect timeout);
            // not a store that cannot answer, which is no client's doing.
            let delay = match refusal {
                Refusal::Unavailable => Duration::ZERO,
                _ => broker.auth.refused(&request),
            };
            if !delay.is_zero() {
                metrics().auth_refusals_delayed.inc();
                let until = (tokio::time::Instant::now() + delay).min(deadline);
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep_until(until) => {}
                }
            }
            io.refuse(code, None).await;
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?config.connect_timeout, "Credentials not checked within the connect timeout; closing.");
            refused(RefusalReason::ConnectTimeout);
            return None;
        }
    };
    tracing::debug!(method = ?method, "Authenticated.");

    // What it may read and write; a will it may not write refuses the CONNECT (as Mosquitto
    // 2 does) before the session is touched.
    // User rules apply to a verified user name only: an anonymous client's name is a claim.
    let verified_user = match method {
        AuthMethod::Password | AuthMethod::Database | AuthMethod::Scram => request.username,
        // A verified client certificate's identity is the user name its rules are under (as
        // Mosquitto's use_identity_as_username).
        AuthMethod::Certificate => request.identity,
        _ => None,
    };
    // The topics its credentials grant (JWT claims, its database row) join the file's rules.
    let (publish, subscribe) = grants
        .as_deref()
        .map_or((&[][..], &[][..]), |g| (&g.publish[..], &g.subscribe[..]));
    let acl = broker
        .acl
        .client(&client_id, verified_user, publish, subscribe);
    if let (Some(acl), Some(will)) = (&acl, &connect.will) {
        if !acl.allows(Access::Write, &will.topic) {
            refused(RefusalReason::WillNotAuthorized);
            if let Some(suppressed) = AUTH_REFUSED.check() {
                tracing::info!(
                    %peer,
                    client_id = client_id.as_str(),
                    topic = will.topic.as_str(),
                    suppressed,
                    "Will on a topic the ACL does not let the client write: CONNACK 0x05; \
                     counted in heartwire_connections_refused_total (reason \
                     will_not_authorized), this line at most every 10 s."
                );
            }
            io.refuse(
                ConnackCode::NotAuthorized,
                Some("will topic not authorized"),
            )
            .await;
            return None;
        }
    }

    // Counted once authenticated, so that nobody can get someone else's id banned.
    match broker
        .flapping
        .connected(&client_id, tokio::time::Instant::now())
    {
        Flap::Allowed => {}
        flap => {
            refuse_banned(io, &peer, &client_id, flap == Flap::NewBan).await;
            return None;
        }
    }

    // A place among `mqtt.max_connections` (given back by `close`, or below if the handshake
    // ends before the session starts).
    let open = broker.open_connections.fetch_add(1, Ordering::AcqRel);
    if config.max_connections > 0 && open >= config.max_connections {
        broker.open_connections.fetch_sub(1, Ordering::AcqRel);
        refused(RefusalReason::MaxConnections);
        if let Some(suppressed) = MAX_CONNECTIONS.check() {
            tracing::warn!(
                limit = config.max_connections,
                suppressed,
                "mqtt.max_connections reached: connection refused with CONNACK 0x03; counted in \
                 heartwire_connections_refused_total (reason max_connections), this line at \
                 most every 10 s."
            );
        }
        io.refuse(ConnackCode::ServerBusy, None).await;
        return None;
    }
    // And a place among `mqtt.max_connections_per_address` from the client's address.
    let address = (config.max_connections_per_address > 0).then_some(peer.ip());
    if let Some(ip) = address {
        if !broker
            .addresses
            .acquire(ip, config.max_connections_per_address)
        {
            broker.open_connections.fetch_sub(1, Ordering::AcqRel);
            refused(RefusalReason::MaxConnectionsPerAddress);
            if let Some(suppressed) = PER_ADDRESS.check() {
                tracing::warn!(
                    %peer,
                    limit = config.max_connections_per_address,
                    suppressed,
                    "mqtt.max_connections_per_address reached: connection refused with CONNACK \
                     0x03; counted in heartwire_connections_refused_total (reason \
                     max_connections_per_address), this line at most every 10 s."
                );
            }
            io.refuse(ConnackCode::QuotaExceeded, None).await;
            return None;
        }
    }

    // How long the session outlives the connection: an MQTT 5 client's session expiry interval
    // (at most `mqtt.max_session_expiry`), or for 3.1.1 `mqtt.persistent_session_expiry` when
    // clean session is off.
    let (expiry, expiry_cut) = match connect.protocol {
        Protocol::V311 => ((!connect.clean_start, None), None),
        Protocol::V5 => {
            let secs = connect.session_expiry.min(max_session_expiry(config));
            let expiry = Duration::from_secs(u64::from(secs));
            (
                (secs > 0, Some(expiry)),
                (secs != connect.session_expiry).then_some(secs),
            )
        }
    };

    // Attach, taking the session over from the connection that holds it, if any.
    let attach = async {
        let mut session = broker.sessions.get_or_create(&client_id);
        loop {
            let current = Arc::clone(&session);
            let released = broker.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match broker.sessions.attach(
                &current,
                connect.clean_start,
                expiry,
                broker.router.limits(),
            ) {
                Attach::Attached(attached) => return (session, attached),
                Attach::Wait => released.await,
                Attach::Retry => session = broker.sessions.get_or_create(&client_id),
            }
        }
    };
    let (session, attached) = tokio::select! {
        biased;
        _ = shutdown.cancelled() => {
            broker.open_connections.fetch_sub(1, Ordering::AcqRel);
            if let Some(ip) = address {
                broker.addresses.release(ip);
            }
            refused(RefusalReason::BrokerShutdown);
            return None;
        }
        attached = attach => attached,
    };
    broker.forget(&session, attached.dropped);
    {
        let mut st = session.state();
        st.login = verified_user
            .filter(|_| method != AuthMethod::Certificate)
            .map(|username| {
                Box::new(Login {
                    username: username.into(),
                    // A SCRAM verifier is a password file entry: revoked with the file.
                    method: match method {
                        AuthMethod::Scram => AuthMethod::Password,
                        other => other,
                    },
                })
            });
        st.set_peer(Peer {
            protocol: connect.protocol,
            receive_maximum: connect.receive_maximum,
            maximum_packet_size: connect.maximum_packet_size.unwrap_or(0),
            topic_alias_maximum: connect.topic_alias_maximum,
        });
    }
    // A resumed session's subscriptions obey the rules of the client that resumes it.
    let revoked = broker.apply_acl(&session, acl);
    if revoked > 0 {
        tracing::info!(
            revoked,
            "Subscriptions of the resumed session that the ACL no longer allows were removed."
        );
    }

    // From here on exactly one Disconnected event is owed (sent by `close`).
    let (session_id, seq) = (attached.session_id, attached.seq);
    broker
        .send_event(ConnectionEvent::Connected {
            client_id,
            session_id,
            seq,
            peer,
            listener,
            identity,
            username: match method {
                AuthMethod::Password | AuthMethod::Database => connect.username.clone(),
                AuthMethod::Scram => scram.as_ref().map(|(user, _)| user.clone()),
                _ => None,
            },
            auth_method: method,
            keep_alive,
            clean_session: connect.clean_start,
            protocol: connect.protocol,
            time: SystemTime::now(),
        })
        .await;
    session.touch();
    metrics().connections_accepted.inc();
    metrics().connections_current.inc();
    metrics().listener_connections.inc(listener);
    tracing::debug!(%session_id, seq, keep_alive, clean_start = connect.clean_start, ?expiry, protocol = connect.protocol.as_str(), "Connected.");

    let mut properties = encode::Properties::default();
    if let Some((_, Ok(server_final))) = &scram {
        properties
            .string(property::AUTHENTICATION_METHOD, scram::METHOD)
            .bytes(property::AUTHENTICATION_DATA, server_final.as_bytes());
    }
    if connect.protocol == Protocol::V5 {
        // What the broker decided of the client's requests, and the limits it sets.
        if assigned {
            properties.string(property::ASSIGNED_CLIENT_IDENTIFIER, &session.client_id);
        }
        if let Some(secs) = expiry_cut {
            properties.u32(property::SESSION_EXPIRY_INTERVAL, secs);
        }
        if keep_alive != connect.keep_alive {
            properties.u16(property::SERVER_KEEP_ALIVE, keep_alive);
        }
        properties
            .u16(property::RECEIVE_MAXIMUM, receive_maximum(config))
            .u32(
                property::MAXIMUM_PACKET_SIZE,
                u32::try_from(config.max_packet_size).unwrap_or(u32::MAX),
            )
            .u16(property::TOPIC_ALIAS_MAXIMUM, TOPIC_ALIAS_MAXIMUM);
    }
    // What the CONNACK says of the session (present, or begun or discarded) is durable first:
    // a persistent session is recorded with who its client logged in as (its access rules are
    // made again from that should it be restored before the client is back).
    let recorded = session
        .state()
        .journal_session(&session.client_id, broker.router.limits());
    if let (Some(ticket), Some(store)) = (attached.ticket.max(recorded), broker.router.store()) {
        std::future::poll_fn(|cx| store.poll_durable(ticket, cx.waker())).await;
    }
    io.send(PacketType::ConnAck, |buf, level| {
        encode::write_connack(
            buf,
            level,
            ConnackCode::Accepted,
            attached.session_present,
            &properties,
        )
    });
    if attached.session_present {
        let resent = session.state().write_inflight(&mut io.wbuf);
        if resent > 0 {
            tracing::debug!(resent, "Redelivering in-flight messages.");
        }
    }
    Some(Established {
        session,
        session_id,
        seq,
        listener,
        keep_alive_ms: if keep_alive == 0 {
            0
        } else {
            let limit =
                Duration::from_secs(u64::from(keep_alive)).mul_f64(config.keepalive_multiplier);
            u32::try_from(limit.as_micros().div_ceil(1000)).unwrap_or(u32::MAX)
        },
        extras: {
            let extras = Extras {
                will: connect.will,
                aliases: Vec::new(),
                address,
                throttle: Throttle::new(config, tokio::time::Instant::now()),
                goodbye: None,
                acks: VecDeque::new(),
            };
            let needed =
                extras.will.is_some() || extras.address.is_some() || extras.throttle.is_some();
            needed.then(|| Box::new(extras))
        },
    })
}

/// SCRAM-SHA-256 over CONNECT and AUTH: reads the client-first message from the CONNECT,
/// answers AUTH 0x18 with the server-first message, reads the client's AUTH 0x18 with the
/// client-final message and checks its proof. The user name it gave, and the server-final
/// message (for the CONNACK) when the proof is right; `Err` with the reason when the client
/// broke the exchange off or broke the protocol (closed without a CONNACK of success).
async fn scram_exchange<S: Transport>(
    io: &mut Io<S>,
    connect: &Connect,
    broker: &Broker,
) -> Result<(String, Result<String, Refusal>), RefusalReason> {
    let first = connect.authentication_data.as_deref().unwrap_or_default();
    let Some(nonce) = scram::server_nonce() else {
        return Ok((String::new(), Err(Refusal::Unavailable)));
    };
    let (exchange, server_first) = match scram::Exchange::start(
        first,
        &nonce,
        |user| broker.auth.scram_verifier(user),
        |user| broker.auth.scram_unknown_salt(user),
    ) {
        Ok(started) => started,
        Err(error) => {
            tracing::info!(%error, "SCRAM client-first message refused.");
            return Ok((String::new(), Err(Refusal::NotAuthorized)));
        }
    };
    let mut properties = encode::Properties::default();
    properties
        .string(property::AUTHENTICATION_METHOD, scram::METHOD)
        .bytes(property::AUTHENTICATION_DATA, server_first.as_bytes());
    io.send(PacketType::Auth, |buf, _| {
        encode::write_auth(buf, reason::CONTINUE_AUTHENTICATION, &properties)
    });
    if io.write_all().await.is_err() {
        return Err(RefusalReason::ConnectionLost);
    }
    let auth = match io
        .read_packet(&broker.read_budget, &broker.read_budget_freed)
        .await
    {
        Ok(Packet::Auth(auth))
            if auth.reason == reason::CONTINUE_AUTHENTICATION
                && auth.method.as_deref() == Some(scram::METHOD) =>
        {
            auth
        }
        Ok(_) | Err(ReadError::Codec(_)) => {
            io.refuse(
                ConnackCode::ProtocolError,
                Some("expected AUTH 0x18 with SCRAM-SHA-256"),
            )
            .await;
            return Err(RefusalReason::ProtocolError);
        }
        Err(_) => return Err(RefusalReason::ConnectionLost),
    };
    let user = exchange.user.clone();
    let outcome = match exchange.finish(auth.data.as_deref().unwrap_or_default()) {
        Ok(server_final) => Ok(server_final),
        Err(scram::ScramError::BadProof) => Err(Refusal::BadCredentials),
        Err(error) => {
            tracing::info!(%error, "SCRAM client-final message refused.");
            Err(Refusal::NotAuthorized)
        }
    };
    Ok((user, outcome))
}

/// Refuses the CONNECT of a client id banned by flapping detection (CONNACK 0x05); `now`
/// when this CONNECT is the one that got it banned.
async fn refuse_banned<S: Transport>(
    io: &mut Io<S>,
    peer: &std::net::SocketAddr,
    client_id: &str,
    now: bool,
) {
    refused(RefusalReason::Banned);
    if now {
        if let Some(suppressed) = NEW_BAN.check() {
            tracing::warn!(
                %peer,
                client_id,
                suppressed,
                "Client id connects too often (mqtt.flapping): banned for \
                 mqtt.flapping.ban_time and listed at GET /api/v1/admin/bans; counted in \
                 heartwire_flapping_bans_total, this line at most every 10 s."
            );
        }
    } else if let Some(suppressed) = BANNED.check() {
        tracing::info!(
            %peer,
            client_id,
            suppressed,
            "Banned client id refused with CONNACK 0x05; counted in \
             heartwire_connections_refused_total (reason banned), this line at most every 10 s."
        );
    }
    io.refuse(ConnackCode::Banned, None).await;
}

fn refused(reason: RefusalReason) {
    metrics().connections_refused.inc(reason);
}

/// Most topic aliases an MQTT 5 client may set (CONNACK's topic alias maximum).
pub const TOPIC_ALIAS_MAXIMUM: u16 = 16;

/// The receive maximum the broker gives MQTT 5 clients: QoS 1 and 2 PUBLISHes a client may
/// have unacknowledged (`mqtt.max_inflight`, as for the other direction).
pub fn receive_maximum(config: &MqttConfig) -> u16 {
    u16::try_from(config.max_inflight).unwrap_or(u16::MAX)
}

/// `mqtt.max_session_expiry` in seconds (validated to fit below 0xFFFFFFFF, "never").
pub fn max_session_expiry(config: &MqttConfig) -> u32 {
    u32::try_from(config.max_session_expiry.as_secs()).unwrap_or(u32::MAX - 1)
}

/// The client id to use and whether the broker assigned it, or why the CONNECT's one is
/// refused.
fn client_id(connect: &Connect, config: &MqttConfig) -> Result<(String, bool), &'static str> {
    let id = &connect.client_id;
    if id.is_empty() {
        // MQTT 3.1.1 allows an empty client id only with clean session; MQTT 5 always, and
        // says which id the broker assigned.
        if !connect.clean_start && connect.protocol == Protocol::V311 {
            return Err("an empty client id requires clean session");
        }
        return Ok((format!("hw-{}", uuid::Uuid::now_v7().simple()), true));
    }
    if id.len() > config.max_client_id_len {
        return Err("client id longer than mqtt.max_client_id_len");
    }
    if id.chars().any(char::is_control) {
        return Err("client id contains control characters");
    }
    Ok((id.clone(), false))
}

/// The keep-alive in force after applying `min_keepalive`/`max_keepalive`. A client's 0 means
/// "never expires", which is above any `max_keepalive` (0 there: no upper bound).
fn keep_alive(requested: u16, config: &MqttConfig) -> Result<u16, &'static str> {
    let too_low = config
        .min_keepalive
        .filter(|min| requested != 0 && requested < *min);
    let too_high =
        Some(config.max_keepalive).filter(|max| *max != 0 && (requested == 0 || requested > *max));
    match (too_low.or(too_high), config.keepalive_policy) {
        (None, _) => Ok(requested),
        (Some(bound), KeepAlivePolicy::Clamp) => Ok(bound),
        (Some(_), KeepAlivePolicy::Reject) => {
            Err("keep-alive outside mqtt.min_keepalive..mqtt.max_keepalive")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_bounds() {
        let mut c = MqttConfig::default();
        assert_eq!(keep_alive(30, &c), Ok(30));
        // The default bound: a client's 0 ("never") becomes 65535 s.
        assert_eq!(keep_alive(0, &c), Ok(65_535));
        c.max_keepalive = 0;
        assert_eq!(keep_alive(0, &c), Ok(0), "0: no upper bound");
        c.min_keepalive = Some(10);
        c.max_keepalive = 60;
        assert_eq!(keep_alive(5, &c), Ok(10));
        assert_eq!(keep_alive(0, &c), Ok(60));
        assert_eq!(keep_alive(61, &c), Ok(60));
        assert_eq!(keep_alive(30, &c), Ok(30));
        c.keepalive_policy = KeepAlivePolicy::Reject;
        assert!(keep_alive(5, &c).is_err());
        assert!(keep_alive(0, &c).is_err());
        assert_eq!(keep_alive(10, &c), Ok(10));
    }

    #[test]
    fn client_ids() {
        let c = MqttConfig::default();
        let mut connect = Connect::new(Protocol::V311, "bad/id");
        assert_eq!(client_id(&connect, &c), Ok(("bad/id".into(), false)));
        connect.client_id = String::new();
        assert!(
            client_id(&connect, &c).is_ok_and(|(id, assigned)| id.starts_with("hw-") && assigned)
        );
        connect.clean_start = false;
        assert!(client_id(&connect, &c).is_err());
        connect.protocol = Protocol::V5;
        assert!(client_id(&connect, &c).is_ok_and(|(_, assigned)| assigned));
        connect.protocol = Protocol::V311;
        connect.client_id = "a\u{1}b".into();
        assert!(client_id(&connect, &c).is_err());
        connect.client_id = "x".repeat(c.max_client_id_len + 1);
        assert!(client_id(&connect, &c).is_err());
    }
}
