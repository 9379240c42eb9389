//! What each packet of an established connection means: PUBLISH (routed, acknowledged, or
//! held back by a congested subscriber), the acknowledgements, SUBSCRIBE and UNSUBSCRIBE
//! (applied a slice of filters per turn), PINGREQ, DISCONNECT and the packets a client must not
//! send.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::{
    Packet, PubAck, PubComp, PubRec, PubRel, SubAck, SubscribeFilter, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;

use super::io::{Io, Transport};
use crate::auth::acl::{Access, Subscription};
use crate::labels::{AclDenial, DisconnectReason, SubscriptionRefusal};
use crate::metrics::metrics;
use crate::mqtt::codec;
use crate::mqtt::message::Message;
use crate::mqtt::retained::Cursor;
use crate::mqtt::session::Session;
use crate::mqtt::{topic, Broker};
use crate::telemetry::LogLimiter;

/// Most filters of a SUBSCRIBE or UNSUBSCRIBE handled in one turn.
const FILTER_BUDGET: usize = 256;

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
        /// The filters not handled yet.
        filters: std::vec::IntoIter<SubscribeFilter>,
        /// The SUBACK's return codes so far, one per handled filter.
        codes: Vec<SubscribeReasonCode>,
        /// Retained deliveries of the granted filters, started once the SUBACK is written.
        cursors: Vec<Cursor>,
    },
    /// An UNSUBSCRIBE.
    Unsubscribe {
        /// Its packet id, for the UNSUBACK.
        pkid: u16,
        /// Its filters.
        filters: Vec<String>,
        /// Filters handled so far.
        done: usize,
    },
}

impl Job {
    /// Applies the next slice of filters; true when the packet is done (its ack is written).
    pub fn run<S: Transport>(
        &mut self,
        io: &mut Io<S>,
        broker: &Broker,
        session: &Arc<Session>,
    ) -> bool {
        let config = &broker.config;
        match self {
            Job::Subscribe {
                pkid,
                filters,
                codes,
                cursors,
            } => {
                let mut granted = Vec::new();
                {
                    let mut st = session.state();
                    let acl = st.acl.clone();
                    for filter in filters.by_ref().take(FILTER_BUDGET) {
                        let mut decision = Subscription::Allowed;
                        let refusal =
                            if !topic::valid_topic_filter(&filter.path, config.max_topic_levels) {
                                Some(SubscriptionRefusal::InvalidFilter)
                            } else if granted.len() + cursors.len()
                                >= config.max_filters_per_subscribe
                            {
                                Some(SubscriptionRefusal::FiltersPerSubscribe)
                            } else if st.subscription_count()
                                >= config.max_subscriptions_per_session
                                && !st.is_subscribed(&filter.path)
                            {
                                Some(SubscriptionRefusal::SubscriptionsPerSession)
                            } else {
                                if let Some(acl) = &acl {
                                    decision = acl.subscription(&filter.path);
                                }
                                (decision == Subscription::Denied)
                                    .then_some(SubscriptionRefusal::NotAuthorized)
                            };
                        match refusal {
                            Some(reason) => {
                                metrics().subscriptions_refused.inc(reason);
                                if let Some(suppressed) = FILTER_REFUSED_LOG.check() {
                                    tracing::info!(
                                        client_id = &*session.client_id,
                                        filter = filter.path.as_str(),
                                        reason = reason.as_str(),
                                        suppressed,
                                        "Topic filter refused (SUBACK 0x80)."
                                    );
                                }
                                codes.push(SubscribeReasonCode::Failure);
                            }
                            None => {
                                st.add_subscription(&filter.path, filter.qos);
                                codes.push(SubscribeReasonCode::Success(filter.qos));
                                granted.push((filter, decision == Subscription::Checked));
                            }
                        }
                    }
                }
                // The session lock is never held while taking the router's.
                broker.router.subscribe_checked(
                    session,
                    granted
                        .iter()
                        .map(|(f, checked)| (f.path.as_str(), f.qos, *checked)),
                );
                cursors.extend(
                    granted
                        .into_iter()
                        .map(|(f, _)| Cursor::new(f.path.into_boxed_str(), f.qos)),
                );
                if filters.len() > 0 {
                    return false;
                }
                io.send(&Packet::SubAck(SubAck::new(*pkid, std::mem::take(codes))));
                // Retained messages follow the SUBACK, streamed as the socket takes them.
                session.state().add_retained(std::mem::take(cursors));
                true
            }
            Job::Unsubscribe {
                pkid,
                filters,
                done,
            } => {
                let end = (*done + FILTER_BUDGET).min(filters.len());
                let slice = &filters[*done..end];
                {
                    let mut st = session.state();
                    for filter in slice {
                        st.remove_subscription(filter);
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
                io.send(&Packet::UnsubAck(UnsubAck::new(*pkid)));
                true
            }
        }
    }
}

/// Handles one packet of an established connection.
pub fn handle<S: Transport>(
    io: &mut Io<S>,
    broker: &Broker,
    session: &Arc<Session>,
    packet: Packet,
) -> Result<Handled, DisconnectReason> {
    let limits = broker.router.limits();
    match packet {
        Packet::Publish(publish) => {
            if !topic::valid_topic_name(&publish.topic, broker.config.max_topic_levels) {
                tracing::info!(
                    client_id = &*session.client_id,
                    topic = publish.topic.as_str(),
                    "PUBLISH to an invalid topic name; closing."
                );
                return Err(DisconnectReason::ProtocolError);
            }
            // QoS 2: routed on first receipt; a redelivery before PUBREL is only acknowledged.
            let (first, acl) = {
                let mut st = session.state();
                let first = publish.qos != QoS::ExactlyOnce || st.receive_qos2(publish.pkid);
                (first, st.acl.clone())
            };
            if !first {
                acknowledge(io, publish.qos, publish.pkid);
                return Ok(Handled::Done);
            }
            // A topic the client may not write: acknowledged (as MQTT 3.1.1 has no way to
            // refuse a PUBLISH) and dropped.
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
                acknowledge(io, publish.qos, publish.pkid);
                return Ok(Handled::Done);
            }
            let message = Arc::new(Message {
                topic: publish.topic.into_boxed_str(),
                payload: Bytes::copy_from_slice(&publish.payload),
                qos: publish.qos,
                retain: publish.retain,
            });
            match broker.router.try_publish(message) {
                Ok(()) => acknowledge(io, publish.qos, publish.pkid),
                Err(message) => {
                    return Ok(Handled::Held(Held {
                        message,
                        qos: publish.qos,
                        pkid: publish.pkid,
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
            if !session.state().pubrec(rec.pkid) {
                tracing::debug!(pkid = rec.pkid, "PUBREC for an unknown packet id.");
            }
            io.send(&Packet::PubRel(PubRel::new(rec.pkid)));
        }
        Packet::PubRel(rel) => {
            session.state().release_qos2(rel.pkid);
            io.send(&Packet::PubComp(PubComp::new(rel.pkid)));
        }
        Packet::PubComp(comp) => {
            if !session.state().pubcomp(comp.pkid, limits) {
                tracing::debug!(pkid = comp.pkid, "PUBCOMP for an unknown packet id.");
            }
        }
        Packet::Subscribe(subscribe) => {
            let count = subscribe.filters.len();
            let mut new = Job::Subscribe {
                pkid: subscribe.pkid,
                filters: subscribe.filters.into_iter(),
                codes: Vec::with_capacity(count),
                cursors: Vec::new(),
            };
            if !new.run(io, broker, session) {
                return Ok(Handled::Started(Box::new(new)));
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            if unsubscribe.topics.is_empty() {
                tracing::info!(
                    client_id = &*session.client_id,
                    "UNSUBSCRIBE without topic filters; closing."
                );
                return Err(DisconnectReason::ProtocolError);
            }
            let mut new = Job::Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: unsubscribe.topics,
                done: 0,
            };
            if !new.run(io, broker, session) {
                return Ok(Handled::Started(Box::new(new)));
            }
        }
        Packet::PingReq => io.send(&Packet::PingResp),
        Packet::Disconnect => return Err(DisconnectReason::ClientDisconnect),
        Packet::Connect(_) => {
            tracing::info!(
                client_id = &*session.client_id,
                "Second CONNECT on one connection; closing."
            );
            return Err(DisconnectReason::ProtocolError);
        }
        other @ (Packet::ConnAck(_)
        | Packet::SubAck(_)
        | Packet::UnsubAck(_)
        | Packet::PingResp) => {
            tracing::info!(
                client_id = &*session.client_id,
                packet = codec::packet_type(&other).as_str(),
                "Server-only packet from a client; closing."
            );
            return Err(DisconnectReason::ProtocolError);
        }
    }
    Ok(Handled::Done)
}

/// Answers a routed PUBLISH: PUBACK for QoS 1, PUBREC for QoS 2.
pub fn acknowledge<S: Transport>(io: &mut Io<S>, qos: QoS, pkid: u16) {
    match qos {
        QoS::AtMostOnce => {}
        QoS::AtLeastOnce => io.send(&Packet::PubAck(PubAck::new(pkid))),
        QoS::ExactlyOnce => io.send(&Packet::PubRec(PubRec::new(pkid))),
    }
}
