//! Bytes waiting in the kernel between the generator and the broker, from `/proc/net/tcp` and
//! `/proc/net/tcp6`.
//!
//! A publisher's write completes once the kernel has the bytes, not once the broker read them.
//! On loopback each connection can park a few hundred KiB (the generator's send queue plus the
//! broker's receive queue), so with a thousand publishers "written" runs ahead of what a slow
//! broker reads by hundreds of megabytes. Subtracting the growth of these two queues over a
//! window turns "written" into "read by the broker".

use std::fs;

use anyhow::{Context, Result};
use serde::Serialize;

/// Queued bytes on the connections to one broker port, at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Queues {
    /// Sent by clients, not yet acknowledged by the broker's kernel (the clients' send queues).
    pub client_send: u64,
    /// Received by the broker's kernel, not yet read by the broker (its receive queues).
    pub broker_receive: u64,
}

impl Queues {
    /// Sums the queues of every established TCP connection to or from `port`.
    pub fn read(port: u16) -> Result<Self> {
        let mut total = Self::default();
        for path in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let table = match fs::read_to_string(path) {
                Ok(t) => t,
                // No IPv6 on this kernel: nothing to add.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("reading {path}")),
            };
            let q = parse(&table, port);
            total.client_send += q.client_send;
            total.broker_receive += q.broker_receive;
        }
        Ok(total)
    }

    /// All bytes in flight between clients and broker.
    pub fn total(self) -> u64 {
        self.client_send + self.broker_receive
    }
}

/// One table's queues. Lines look like
/// `0: 0100007F:0BB8 0100007F:D2F4 01 00000000:0001A2B0 00:00000000 00000000 0 0 123 ...`:
/// local and remote address (hex IP, hex port), state (01 = established), tx:rx queue (hex).
fn parse(table: &str, port: u16) -> Queues {
    let mut q = Queues::default();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(remote), Some(&"01"), Some(queues)) =
            (fields.get(1), fields.get(2), fields.get(3), fields.get(4))
        else {
            continue;
        };
        let Some((tx, rx)) = queues.split_once(':') else {
            continue;
        };
        let (tx, rx) = (hex(tx), hex(rx));
        if port_of(local) == Some(port) {
            q.broker_receive += rx;
        } else if port_of(remote) == Some(port) {
            q.client_send += tx;
        }
    }
    q
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt: ListenOverflows` in `/proc/net/netstat`, for the whole network namespace): a
/// dropped SYN or handshake ACK costs the client a retransmission, a second or more.
pub fn listen_overflows() -> Option<u64> {
    parse_listen_overflows(&fs::read_to_string("/proc/net/netstat").ok()?)
}

/// `/proc/net/netstat` holds pairs of lines: `TcpExt: <names>` then `TcpExt: <values>`.
fn parse_listen_overflows(netstat: &str) -> Option<u64> {
    let mut lines = netstat.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let at = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

fn port_of(address: &str) -> Option<u16> {
    u16::from_str_radix(address.rsplit_once(':')?.1, 16).ok()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_of_one_port_are_summed_by_side() {
        // Port 0x0BB8 = 3000: two client sockets (remote 3000), one broker socket (local
        // 3000), one listening socket (state 0A) and one unrelated connection.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0BB8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:D2F4 0100007F:0BB8 01 00000100:00000000 00:00000000 00000000     0        0 2 1
   2: 0200007F:D2F5 0100007F:0BB8 01 00000010:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:0BB8 0100007F:D2F4 01 00000000:00001000 00:00000000 00000000     0        0 4 1
   4: 0100007F:1F90 0100007F:D2F6 01 00000FFF:00000FFF 00:00000000 00000000     0        0 5 1
";
        assert_eq!(
            parse(table, 3000),
            Queues {
                client_send: 0x110,
                broker_receive: 0x1000
            }
        );
    }

    #[test]
    fn listen_overflows_are_found_by_name() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\n\
                       TcpExt: 0 42 43\n\
                       IpExt: InNoRoutes\n\
                       IpExt: 0\n";
        assert_eq!(parse_listen_overflows(netstat), Some(42));
        assert_eq!(parse_listen_overflows("IpExt: x\nIpExt: 1\n"), None);
    }

    #[test]
    fn ipv6_addresses_give_their_port() {
        assert_eq!(port_of("00000000000000000000000001000000:0BB8"), Some(3000));
    }
}
