//! The lines a `--workers` child prints on stdout for its parent: each starts with one of these
//! prefixes, and the parent ([`crate::workers`]) relays every other line to its own output.
//! Kept apart from both sides so that the child ([`crate::fleet`], [`crate::run`]) and the
//! parent point down at one definition.

/// A worker's per-second status: the prefix, then its [`crate::report::Live`] numbers as JSON.
pub const STATUS: &str = "status ";
/// Printed once all the worker's devices are connected at once: the prefix, then
/// `connected=N`.
pub const READY: &str = "ready ";
/// A worker's final result: the prefix, then its [`crate::report::Summary`] (with the CONNACK
/// histogram) as JSON.
pub const RESULT: &str = "result ";
/// With `--end-state keep`, once the final states are recorded: the prefix, then
/// `N until SIGINT/SIGTERM` (a line for people too: a process without `--workers` prints it).
pub const HOLDING: &str = "holding connected=";
