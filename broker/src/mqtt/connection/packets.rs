//! What each packet of an established connection means: PUBLISH (routed, acknowledged, or
//! held back by a congested subscriber), the acknowledgements, SUBSCRIBE and UNSUBSCRIBE
//! (applied a slice of filters per turn), PINGREQ, DISCONNECT and the packets a client must not
//! send.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;

use super::handshake::{max_session_expiry, receive_maximum, Established, TOPIC_ALIAS_MAXIMUM};
use super::io::{Io, Transport};
use crate::auth::acl::{Access, Subscription};
use crate::labels::{AclDenial, DisconnectReason, PacketType, SubscriptionRefusal};
use crate::metrics::metrics;
use crate::mqtt::codec::encode;
use crate::mqtt::message::{Message, SubOptions};
use crate::mqtt::packet::{reason, Filter, Packet, Protocol, Publish};
use crate::mqtt::retained::Cursor;
use crate::mqtt::router::NotRouted;
use crate::mqtt::session::Session;
use crate::mqtt::{router, topic, Broker};
use crate::state::Ticket;
use crate::telemetry::LogLimiter;

/// Most filters of a SUBSCRIBE or UNSUBSCRIBE handled in one turn.
const FILTER_BUDGET: usize = 256;
/// Most bytes of topic names an MQTT 5 client's topic aliases may stand for together.
const TOPIC_ALIAS_BYTES: usize = 64 * 1024;

/// What handling a packet left to do.
pub enum Handled {
    /// Nothing: the packet is done (and answered, if it calls for an answer).
    Done,
    /// A SUBSCRIBE or UNSUBSCRIBE with filters left for the next turns; no other packet is
    /// handled until it is done.
    Started(Box<Job>),
    /// A PUBLISH that a congested subscriber holds back: to be routed (and acknowledged) later;
    /// nothing more is read from the client until then.
    Held(Held),
}

/// A PUBLISH received whole but not routed yet.
pub struct Held {
    /// The message.
    pub message: Arc<Message>,
    /// The PUBLISH's QoS, for its acknowledgement once routed.
    pub qos: QoS,
    /// The PUBLISH's packet id, likewise.
    pub pkid: u16,
    /// The durable state's ticket its acknowledgement waits for already (a QoS 2 receipt).
    pub ticket: Option<Ticket>,
    /// Held back because the durable state is over its disk budget (not for a subscriber).
    pub disk_full: bool,
}

/// An acknowledgement that waits until what it promises is durable.
pub struct Deferred {
    /// The durable state's ticket it waits for.
    ticket: Ticket,
    ack: Ack,
}

/// An acknowledgement of the client's packet.
pub enum Ack {
    /// PUBACK, PUBREC or PUBCOMP: packet type, packet id, reason code.
    Publish(PacketType, u16, u8),
    /// SUBACK: packet id and reason codes.
    Subscribe(u16, Vec<u8>),
    /// UNSUBACK: packet id and reason codes.
    Unsubscribe(u16, Vec<u8>),
}

impl Ack {
    fn write<S: Transport>(self, io: &mut Io<S>) {
        match self {
            Ack::Publish(kind, pkid, code) => io.ack(kind, pkid, code),
            Ack::Subscribe(pkid, codes) => io.send(PacketType::SubAck, |buf, level| {
                encode::write_suback(buf, level, pkid, &codes)
            }),
            Ack::Unsubscribe(pkid, codes) => io.send(PacketType::UnsubAck, |buf, level| {
                encode::write_unsuback(buf, level, pkid, &codes)
            }),
        }
    }
}

/// Sends `ack` now, or once `ticket` is durable (in `persistence.mode = "sync"`, an
/// acknowledgement never promises what a crash could lose). Acknowledgements keep their order:
/// while some wait, the next ones wait behind them.
pub fn reply<S: Transport>(
    io: &mut Io<S>,
    conn: &mut Established,
    ticket: Option<Ticket>,
    ack: Ack,
) {
    let waiting = conn.extras.as_ref().and_then(|e| e.acks.back());
    let ticket = match (ticket, waiting) {
        (None, None) => return ack.write(io),
        (t, w) => t.max(w.map(|w| w.ticket)).unwrap_or_default(),
    };
    conn.extras
        .get_or_insert_with(Box::default)
        .acks
        .push_back(Deferred { ticket, ack });
}

/// Writes the acknowledgements whose tickets are durable now; registers for a wake-up when
/// some still wait. Returns how many still wait.
pub fn release_acks<S: Transport>(
    cx: &mut std::task::Context<'_>,
    io: &mut Io<S>,
    broker: &Broker,
    conn: &mut Established,
) -> usize {
    let Some(extras) = conn.extras.as_mut() else {
        return 0;
    };
    let Some(store) = broker.router.store() else {
        // No durable state (never the case while acknowledgements wait): send them.
        for deferred in extras.acks.drain(..) {
            deferred.ack.write(io);
        }
        return 0;
    };
    while let Some(front) = extras.acks.front() {
        if store.poll_durable(front.ticket, cx.waker()).is_pending() {
            break;
        }
        if let Some(deferred) = extras.acks.pop_front() {
            deferred.ack.write(io);
        }
    }
    if extras.acks.is_empty() && extras.acks.capacity() > 16 {
        extras.acks = VecDeque::new();
    }
    extras.acks.len()
}

/// PUBLISHes the ACL refused: one line per interval for the whole broker.
static PUBLISH_DENIED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// Refused topic filters: one line per interval for the whole broker.
static FILTER_REFUSED_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));

/// A SUBSCRIBE or UNSUBSCRIBE applied a slice of filters per turn, so that one packet of
/// thousands of filters does not hold a runtime thread (or the router's lock) for long.
pub enum Job {
    /// A SUBSCRIBE.
    Subscribe {
        /// Its packet id, for the SUBACK.
        pkid: u16,
        /// Its MQTT 5 subscription identifier, 0 for none.
        id: u32,
        /// The filters not handled yet.
        filters: std::vec::IntoIter<Filter>,
        /// The SUBACK's reason codes so far, one per handled filter.
        codes: Vec<u8>,
        /// Retained deliveries of the granted filters, started once the SUBACK is written.
        cursors: Vec<Cursor>,
        /// The durable state's ticket the SUBACK waits for.
        ticket: Option<Ticket>,
    },
    /// An UNSUBSCRIBE.
    Unsubscribe {
        /// Its packet id, for the UNSUBACK.
        pkid: u16,
        /// Its filters.
        filters: Vec<String>,
        /// Filters handled so far.
        done: usize,
        /// The UNSUBACK's reason codes so far (MQTT 5).
        codes: Vec<u8>,
        /// The durable state's ticket the UNSUBACK waits for.
        ticket: Option<Ticket>,
    },
}

impl Job {
    /// Applies the next slice of filters; true when the packet is done (its ack is written).
    pub fn run<S: Transport>(
        &mut self,
        io: &mut Io<S>,
        broker: &Broker,
        conn: &mut Established,
    ) -> bool {
        let config = &broker.config;
        let limits = broker.router.limits();
        let session = &Arc::clone(&conn.session);
        match self {
            Job::Subscribe {
                pkid,
                id,
                filters,
                codes,
                cursors,
                ticket,
            } => {
                let mut granted = Vec::new();
                let mut retained = Vec::new();
                {
                    let mut st = session.state();
                    let acl = st.acl.clone();
                    for filter in filters.by_ref().take(FILTER_BUDGET) {
                        let mut decision = Subscription::Allowed;
                        let refusal = if !valid_filter(&filter.path, config.max_topic_levels) {
                            Some(SubscriptionRefusal::InvalidFilter)
                        } else if granted.len() + cursors.len() >= config.max_filters_per_subscribe
                        {
                            Some(SubscriptionRefusal::FiltersPerSubscribe)
                        } else if st.subscription_count() >= config.max_subscriptions_per_session
                            && !st.is_subscribed(&filter.path)
                        {
                            Some(SubscriptionRefusal::SubscriptionsPerSession)
                        } else {
                            if let Some(acl) = &acl {
                                // A shared subscription reads the topics of its filter.
                                decision = acl.subscription(router::unshared(&filter.path));
                            }
                            (decision == Subscription::Denied)
                                .then_some(SubscriptionRefusal::NotAuthorized)
                        };
                        match refusal {
                            Some(refused) => {
                                metrics().subscriptions_refused.inc(refused);
                                let code = suback_code(refused);
                                if let Some(suppressed) = FILTER_REFUSED_LOG.check() {
                                    tracing::info!(
                                        client_id = &*session.client_id,
                                        filter = filter.path.as_str(),
                                        reason = refused.as_str(),
                                        code,
                                        suppressed,
                                        "Topic filter refused (SUBACK 0x80 in 3.1.1, code in 5)."
                                    );
                                }
                                codes.push(code);
                            }
                            None => {
                                // Retained messages: always (retain handling 0), for a new
                                // subscription only (1), or never (2).
                                let send_retained = match filter.retain_handling {
                                    0 => true,
                                    1 => !st.is_subscribed(&filter.path),
                                    _ => false,
                                };
                                let options = SubOptions {
                                    qos: filter.qos,
                                    no_local: filter.no_local,
                                    retain_as_published: filter.retain_as_published,
                                    id: *id,
                                };
                                *ticket = (*ticket).max(st.add_subscription(
                                    &filter.path,
                                    options,
                                    limits,
                                ));
                                codes.push(filter.qos as u8);
                                if send_retained {
                                    retained.push(granted.len());
                                }
                                granted.push((filter, options, decision == Subscription::Checked));
                            }
                        }
                    }
                }
                // The session lock is never held while taking the router's.
                broker.router.subscribe_checked(
                    session,
                    granted
                        .iter()
                        .map(|(f, options, checked)| (f.path.as_str(), *options, *checked)),
                );
                // A shared subscription gets no retained messages (MQTT 5 section 4.8.2).
                cursors.extend(
                    retained
                        .into_iter()
                        .map(|i| &granted[i])
                        .filter(|(f, ..)| !f.path.starts_with("$share/"))
                        .map(|(f, options, _)| {
                            Cursor::new(f.path.as_str().into(), f.qos).with_id(options.id)
                        }),
                );
                if filters.len() > 0 {
                    return false;
                }
                let (pkid, codes) = (*pkid, std::mem::take(codes));
                reply(io, conn, *ticket, Ack::Subscribe(pkid, codes));
                // Retained messages follow the SUBACK, streamed as the socket takes them.
                session.state().add_retained(std::mem::take(cursors));
                true
            }
            Job::Unsubscribe {
                pkid,
                filters,
                done,
                codes,
                ticket,
            } => {
                let end = (*done + FILTER_BUDGET).min(filters.len());
                let slice = &filters[*done..end];
                {
                    let mut st = session.state();
                    for filter in slice {
                        let (removed, t) = st.remove_subscription(filter, limits);
                        *ticket = (*ticket).max(t);
                        codes.push(if removed {
                            reason::SUCCESS
                        } else {
                            reason::NO_SUBSCRIPTION_EXISTED
                        });
                    }
                    st.remove_retained(slice);
                }
                broker
                    .router
                    .unsubscribe(session.incarnation, slice.iter().map(String::as_str));
                *done = end;
                if *done < filters.len() {
                    return false;
                }
                let (pkid, codes) = (*pkid, std::mem::take(codes));
                reply(io, conn, *ticket, Ack::Unsubscribe(pkid, codes));
                true
            }
        }
    }
}

/// The MQTT 5 SUBACK reason code of a refused filter (a 3.1.1 SUBACK says 0x80 for all).
/// A filter the ACL refuses gets 0x80 too: the Eclipse Paho conformance client accepts no other
/// failure code in a SUBACK (and neither do clients built on it).
fn suback_code(refused: SubscriptionRefusal) -> u8 {
    match refused {
        SubscriptionRefusal::InvalidFilter => reason::TOPIC_FILTER_INVALID,
        SubscriptionRefusal::FiltersPerSubscribe | SubscriptionRefusal::SubscriptionsPerSession => {
            reason::QUOTA_EXCEEDED
        }
        SubscriptionRefusal::NotAuthorized => reason::UNSPECIFIED_ERROR,
    }
}

/// A valid topic filter; a shared subscription `$share/{group}/{filter}` needs a group name
/// of at least one character and no wildcard, and a valid filter (MQTT 5 section 4.8.2).
fn valid_filter(filter: &str, max_levels: usize) -> bool {
    if !filter.starts_with("$share/") {
        return topic::valid_topic_filter(filter, max_levels);
    }
    router::shared(filter).is_some_and(|(group, filter)| {
        !group.is_empty()
            && !group.contains(['+', '#'])
            && topic::valid_topic_filter(filter, max_levels)
    })
}

/// Ends the connection for a protocol violation: an MQTT 5 client is told `code` (and why) in
/// a DISCONNECT first.
fn violation<S: Transport>(
    io: &mut Io<S>,
    session: &Session,
    code: u8,
    what: &'static str,
) -> DisconnectReason {
    tracing::info!(
        client_id = &*session.client_id,
        code,
        "Protocol violation ({what}); closing."
    );
    io.disconnect(code, Some(what));
    DisconnectReason::ProtocolError
}

/// Handles one packet of an established connection.
pub fn handle<S: Transport>(
    io: &mut Io<S>,
    broker: &Broker,
    conn: &mut Established,
    packet: Packet,
) -> Result<Handled, DisconnectReason> {
    let session = &conn.session;
    let limits = broker.router.limits();
    let v5 = io.level() == Protocol::V5;
    match packet {
        Packet::Publish(mut publish) => {
            if v5 {
                resolve_alias(io, conn, &mut publish)?;
            }
            let session = &conn.session;
            if !topic::valid_topic_name(&publish.topic, broker.config.max_topic_levels) {
                tracing::info!(
                    client_id = &*session.client_id,
                    topic = publish.topic.as_str(),
                    "PUBLISH to an invalid topic name."
                );
                return Err(violation(
                    io,
                    session,
                    reason::TOPIC_NAME_INVALID,
                    "PUBLISH to an invalid topic name",
                ));
            }
            // QoS 2: routed on first receipt; a redelivery before PUBREL is only acknowledged.
            let (first, received, acl) = {
                let mut st = session.state();
                if v5
                    && publish.qos == QoS::ExactlyOnce
                    && st.unreleased_qos2() >= usize::from(receive_maximum(&broker.config))
                {
                    drop(st);
                    return Err(violation(
                        io,
                        session,
                        reason::RECEIVE_MAXIMUM_EXCEEDED,
                        "more unreleased QoS 2 PUBLISHes than the receive maximum",
                    ));
                }
                let (first, received) = if publish.qos == QoS::ExactlyOnce {
                    st.receive_qos2(publish.pkid, limits)
                } else {
                    (true, None)
                };
                (first, received, st.acl.clone())
            };
            if !first {
                acknowledge(io, conn, None, publish.qos, publish.pkid, reason::SUCCESS);
                return Ok(Handled::Done);
            }
            // A topic the client may not write: dropped, and acknowledged (an MQTT 5 client
            // is told 0x87, a 3.1.1 client has no way to be told).
            if acl.is_some_and(|acl| !acl.allows(Access::Write, &publish.topic)) {
                metrics().acl_denied.inc(AclDenial::Publish);
                if let Some(suppressed) = PUBLISH_DENIED_LOG.check() {
                    tracing::info!(
                        client_id = &*session.client_id,
                        topic = publish.topic.as_str(),
                        suppressed,
                        "PUBLISH to a topic the ACL does not let the client write: acknowledged \
                         and dropped (counted in heartwire_acl_denied_total, this line at most \
                         every 10 s)."
                    );
                }
                acknowledge(
                    io,
                    conn,
                    received,
                    publish.qos,
                    publish.pkid,
                    reason::NOT_AUTHORIZED,
                );
                return Ok(Handled::Done);
            }
            let message = Arc::new(
                Message::new(
                    publish.topic.into_boxed_str(),
                    Bytes::copy_from_slice(&publish.payload),
                    publish.qos,
                    publish.retain,
                    publish.properties.as_deref(),
                    tokio::time::Instant::now(),
                )
                .from_session(session.incarnation, &session.client_id),
            );
            match broker.router.try_publish(message) {
                Ok(ticket) => acknowledge(
                    io,
                    conn,
                    ticket.max(received),
                    publish.qos,
                    publish.pkid,
                    reason::SUCCESS,
                ),
                Err(NotRouted::DiskFull(_)) if v5 => {
                    // An MQTT 5 client is told, and may try again later.
                    disk_full();
                    acknowledge(
                        io,
                        conn,
                        received,
                        publish.qos,
                        publish.pkid,
                        reason::QUOTA_EXCEEDED,
                    );
                }
                Err(not_routed) => {
                    return Ok(Handled::Held(Held {
                        disk_full: matches!(not_routed, NotRouted::DiskFull(_)),
                        message: not_routed.into_message(),
                        qos: publish.qos,
                        pkid: publish.pkid,
                        ticket: received,
                    }))
                }
            }
        }
        Packet::PubAck(ack) => {
            if !session.state().puback(ack.pkid, limits) {
                tracing::debug!(pkid = ack.pkid, "PUBACK for an unknown packet id.");
            }
        }
        Packet::PubRec(rec) => {
            let known = session.state().pubrec(rec.pkid, limits);
            if !known {
                tracing::debug!(pkid = rec.pkid, "PUBREC for an unknown packet id.");
            }
            // A PUBREC with an error code ends the exchange (MQTT 5 section 4.3.3).
            if rec.reason >= 0x80 {
                session.state().pubcomp(rec.pkid, limits);
            } else {
                let code = if known {
                    reason::SUCCESS
                } else {
                    reason::PACKET_IDENTIFIER_NOT_FOUND
                };
                io.ack(PacketType::PubRel, rec.pkid, code);
            }
        }
        Packet::PubRel(rel) => {
            let (released, ticket) = session.state().release_qos2(rel.pkid, limits);
            let code = if released {
                reason::SUCCESS
            } else {
                reason::PACKET_IDENTIFIER_NOT_FOUND
            };
            reply(
                io,
                conn,
                ticket,
                Ack::Publish(PacketType::PubComp, rel.pkid, code),
            );
        }
        Packet::PubComp(comp) => {
            if !session.state().pubcomp(comp.pkid, limits) {
                tracing::debug!(pkid = comp.pkid, "PUBCOMP for an unknown packet id.");
            }
        }
        Packet::Subscribe(subscribe) => {
            if subscribe
                .filters
                .iter()
                .any(|f| f.no_local && f.path.starts_with("$share/"))
            {
                return Err(violation(
                    io,
                    session,
                    reason::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                ));
            }
            let count = subscribe.filters.len();
            let mut new = Job::Subscribe {
                pkid: subscribe.pkid,
                id: subscribe.id.unwrap_or(0),
                filters: subscribe.filters.into_iter(),
                codes: Vec::with_capacity(count),
                cursors: Vec::new(),
                ticket: None,
            };
            if !new.run(io, broker, conn) {
                return Ok(Handled::Started(Box::new(new)));
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.filters.is_empty() {
                return Err(violation(
                    io,
                    session,
                    reason::PROTOCOL_ERROR,
                    "UNSUBSCRIBE without topic filters",
                ));
            }
            let mut new = Job::Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: unsubscribe.filters,
                done: 0,
                codes: Vec::new(),
                ticket: None,
            };
            if !new.run(io, broker, conn) {
                return Ok(Handled::Started(Box::new(new)));
            }
        }
        Packet::PingReq => io.send(PacketType::PingResp, |buf, _| encode::write_pingresp(buf)),
        Packet::Disconnect(disconnect) => {
            if let Some(secs) = disconnect.session_expiry {
                let mut st = session.state();
                // A session that was to end with the connection cannot be kept at its end
                // (MQTT 5 section 3.14.2.2.2).
                if !st.persistent && secs > 0 {
                    drop(st);
                    return Err(violation(
                        io,
                        session,
                        reason::PROTOCOL_ERROR,
                        "session expiry set on DISCONNECT after 0 on CONNECT",
                    ));
                }
                let secs = secs.min(max_session_expiry(&broker.config));
                st.set_expiry(secs > 0, Some(Duration::from_secs(u64::from(secs))), limits);
                st.journal_session(&session.client_id, limits);
            }
            // The will is published only on "disconnect with will message".
            if disconnect.reason != reason::DISCONNECT_WITH_WILL {
                if let Some(extras) = &mut conn.extras {
                    extras.will = None;
                }
            }
            if disconnect.reason != reason::SUCCESS || disconnect.reason_string.is_some() {
                tracing::debug!(
                    code = disconnect.reason,
                    reason_string = disconnect.reason_string.as_deref().unwrap_or(""),
                    "Client DISCONNECT with a reason."
                );
            }
            if v5 {
                conn.extras.get_or_insert_with(Box::default).goodbye =
                    Some((disconnect.reason, disconnect.reason_string));
            }
            return Err(DisconnectReason::ClientDisconnect);
        }
        Packet::Auth(_) => {
            return Err(violation(
                io,
                session,
                reason::PROTOCOL_ERROR,
                "AUTH after the CONNACK: re-authentication is not offered",
            ));
        }
        Packet::Connect(_) => {
            return Err(violation(
                io,
                session,
                reason::PROTOCOL_ERROR,
                "second CONNECT on one connection",
            ));
        }
        Packet::ServerOnly(kind) => {
            tracing::info!(
                client_id = &*session.client_id,
                packet = kind.as_str(),
                "Server-only packet from a client."
            );
            return Err(violation(
                io,
                session,
                reason::PROTOCOL_ERROR,
                "a packet only a server sends",
            ));
        }
    }
    Ok(Handled::Done)
}

/// MQTT 5 topic aliases: a PUBLISH with a topic and an alias sets the alias, one with an alias
/// and no topic uses it.
fn resolve_alias<S: Transport>(
    io: &mut Io<S>,
    conn: &mut Established,
    publish: &mut Publish,
) -> Result<(), DisconnectReason> {
    let Some(alias) = publish.topic_alias else {
        return Ok(());
    };
    if alias == 0 || alias > TOPIC_ALIAS_MAXIMUM {
        return Err(violation(
            io,
            &conn.session,
            reason::TOPIC_ALIAS_INVALID,
            "topic alias 0 or above the topic alias maximum",
        ));
    }
    let slot = usize::from(alias - 1);
    let aliases = &mut conn.extras.get_or_insert_with(Box::default).aliases;
    if publish.topic.is_empty() {
        match aliases.get(slot).and_then(Option::as_deref) {
            Some(topic) => publish.topic = topic.to_owned(),
            None => {
                return Err(violation(
                    io,
                    &conn.session,
                    reason::PROTOCOL_ERROR,
                    "PUBLISH with an unknown topic alias and no topic",
                ))
            }
        }
        return Ok(());
    }
    if aliases.len() <= slot {
        aliases.resize(slot + 1, None);
    }
    aliases[slot] = Some(publish.topic.as_str().into());
    let bytes: usize = aliases.iter().flatten().map(|t| t.len()).sum();
    if bytes > TOPIC_ALIAS_BYTES {
        return Err(violation(
            io,
            &conn.session,
            reason::QUOTA_EXCEEDED,
            "topic aliases stand for too many bytes of topic names",
        ));
    }
    Ok(())
}

/// Answers a routed PUBLISH: PUBACK for QoS 1, PUBREC for QoS 2, with an MQTT 5 reason code,
/// once `ticket` (what routing stored) is durable.
pub fn acknowledge<S: Transport>(
    io: &mut Io<S>,
    conn: &mut Established,
    ticket: Option<Ticket>,
    qos: QoS,
    pkid: u16,
    code: u8,
) {
    let kind = match qos {
        QoS::AtMostOnce => return,
        QoS::AtLeastOnce => PacketType::PubAck,
        QoS::ExactlyOnce => PacketType::PubRec,
    };
    reply(io, conn, ticket, Ack::Publish(kind, pkid, code));
}

/// Counts (and logs, rate-limited) a PUBLISH the durable state's disk budget held back or
/// refused.
pub fn disk_full() {
    metrics().state_disk_full.inc();
    if let Some(suppressed) = DISK_FULL_LOG.check() {
        tracing::warn!(
            suppressed,
            "PUBLISH held back (MQTT 3.1.1) or refused with 0x97 (MQTT 5): the broker state is \
             over persistence.max_disk (counted in heartwire_state_disk_full_total)."
        );
    }
}

/// PUBLISHes held back or refused for the disk budget: one line per interval.
static DISK_FULL_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(10));
