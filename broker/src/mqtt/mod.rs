//! The MQTT 3.1.1 side of the broker: the listener, one task per connection, sessions, topic
//! matching, subscriptions, retained messages and fan-out.
//!
//! Data flows one way: [`listener`] accepts sockets and spawns a [`connection`] task each; the
//! connection decodes packets ([`codec`]), attaches to its [`session`] in the [`sessions`] table
//! and hands [`message`]s to the [`router`] (subscriptions, [`retained`] messages, fan-out);
//! connection lifecycle events go out on the event channel ([`crate::event`]). What every
//! connection shares is the [`Broker`]; [`budget`]s bound its memory, [`limits`] its clients'
//! rates (accepting, publishing), connections per address and flapping client ids, [`expiry`]
//! ends abandoned persistent sessions, [`topic`] validates and matches names and filters.

pub mod broker;
pub mod budget;
pub mod codec;
pub mod connection;
pub mod expiry;
pub mod limits;
pub mod listener;
pub mod message;
pub mod packet;
pub mod retained;
pub mod router;
pub mod session;
pub mod sessions;
pub mod topic;

pub use broker::{AclReload, Broker};
pub use listener::serve;
pub use sessions::LiveSessions;
