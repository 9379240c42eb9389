//! Ports for servers that cannot be handed a listener bound to 127.0.0.1:0: a child process
//! told its port on the command line (a broker process, Prometheus, device-sim's metrics
//! endpoint), or PostgreSQL.

use std::net::{Ipv4Addr, TcpListener};

use crate::random_u64;

/// A free 127.0.0.1 port (free when asked: bind it soon) outside the kernel's ephemeral range,
/// so that the many `:0` binds and outgoing connections of concurrent tests do not take it
/// first, nor while its server is down for a restart. Panics if there is none.
pub fn free_port() -> u16 {
    pick_port().unwrap_or_else(|e| panic!("{e}"))
}

/// [`free_port`], or why there is none.
pub(crate) fn pick_port() -> Result<u16, String> {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (from, to) = if lo >= 12000 {
        (10000, lo)
    } else if hi <= 55000 {
        (hi + 1, 65536)
    } else {
        (0, 0)
    };
    if to > from {
        for _ in 0..100 {
            let port = from + (random_u64() % u64::from(to - from)) as u32;
            if let Ok(port) = u16::try_from(port) {
                if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                    return Ok(port);
                }
            }
        }
    }
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free port on 127.0.0.1: {e}"))
}
