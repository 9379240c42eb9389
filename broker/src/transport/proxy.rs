//! The PROXY protocol, server side: the header (v1 text or v2 binary) that a load balancer
//! sends at the start of a connection to say whose connection it forwards
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>).
//!
//! [`read_header`] consumes exactly the header's bytes and nothing after it, so that what
//! follows in the same TCP segment (a TLS ClientHello, an MQTT CONNECT) is left on the socket
//! for the next reader. It never waits on its own: the caller bounds it with a timeout.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The 12 bytes every v2 header starts with.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// What every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// The shortest header of either version ("PROXY UNKNOWN\r\n"; a v2 header has at least 16
/// bytes): reading this many bytes never reads past a valid header.
const MIN_HEADER: usize = 15;
/// The longest v2 address block (AF_UNIX: two 108-byte paths).
const V2_ADDRESSES_MAX: usize = 216;

/// Why no PROXY protocol header could be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The connection does not start with a valid header (the caller counts it and closes).
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
    /// The socket failed.
    #[error("socket error while reading the PROXY protocol header: {0}")]
    Io(io::Error),
    /// The peer closed the connection before the header was complete.
    #[error("connection closed before the PROXY protocol header was complete")]
    Closed,
}

impl From<io::Error> for ProxyError {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            Self::Closed
        } else {
            Self::Io(error)
        }
    }
}

/// Reads exactly one PROXY protocol header (v1 text or v2 binary) from the start of `stream`,
/// consuming exactly its bytes and nothing after it.
///
/// Returns the source address it carries; `None` for a v2 LOCAL header (a health check of
/// the proxy itself), a v1 UNKNOWN one, and v2 address families other than TCP or UDP over
/// IPv4 or IPv6: the caller then uses the socket's peer. v2 TLVs are skipped.
///
/// A connection whose first bytes cannot begin a header (an MQTT CONNECT, a TLS ClientHello)
/// is refused as soon as they arrive, without waiting for more.
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    let mut start = [0u8; 16];
    let seen = stream.peek(&mut start).await?;
    if seen == 0 {
        return Err(ProxyError::Closed);
    }
    let could_be_v2 = V2_SIGNATURE.starts_with(&start[..seen.min(V2_SIGNATURE.len())]);
    let could_be_v1 = V1_PREFIX.starts_with(&start[..seen.min(V1_PREFIX.len())]);
    if !could_be_v1 && !could_be_v2 {
        return Err(ProxyError::Invalid("not a PROXY protocol header"));
    }
    stream.read_exact(&mut start[..MIN_HEADER]).await?;
    if start[..V2_SIGNATURE.len()] == V2_SIGNATURE {
        stream.read_exact(&mut start[MIN_HEADER..]).await?;
        read_v2(stream, &start).await
    } else if start.starts_with(V1_PREFIX) {
        let mut line = [0u8; V1_MAX];
        line[..MIN_HEADER].copy_from_slice(&start[..MIN_HEADER]);
        let len = read_v1_line(stream, &mut line).await?;
        parse_v1(&line[..len])
    } else {
        Err(ProxyError::Invalid("not a PROXY protocol header"))
    }
}

/// Reads the rest of a v1 line whose first [`MIN_HEADER`] bytes are in `line`, up to and
/// including its CRLF; returns its length.
///
/// Peeks at what has arrived and consumes only up to the CRLF. When no CRLF has arrived, all
/// that was peeked belongs to the header and is consumed, so the next peek waits for new
/// bytes (no busy loop).
async fn read_v1_line(
    stream: &mut TcpStream,
    line: &mut [u8; V1_MAX],
) -> Result<usize, ProxyError> {
    let mut have = MIN_HEADER;
    loop {
        if let Some(at) = find_crlf(&line[..have]) {
            // Only the first read can hold a CRLF before the end (we never read past one): a
            // line shorter than the shortest header.
            return if at + 2 == have {
                Ok(have)
            } else {
                Err(ProxyError::Invalid("v1 header too short"))
            };
        }
        if have == V1_MAX {
            return Err(ProxyError::Invalid("v1 header longer than 107 bytes"));
        }
        let seen = stream.peek(&mut line[have..]).await?;
        if seen == 0 {
            return Err(ProxyError::Closed);
        }
        // A CRLF may straddle the bytes we have and the new ones.
        let window = have - 1;
        let take = match find_crlf(&line[window..have + seen]) {
            Some(at) => window + at + 2 - have,
            None => seen,
        };
        stream.read_exact(&mut line[have..have + take]).await?;
        have += take;
    }
}

/// Where the first "\r\n" in `bytes` starts.
fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

/// Parses a complete v1 line (CRLF included).
fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let text =
        std::str::from_utf8(line).map_err(|_| ProxyError::Invalid("v1 header is not text"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(ProxyError::Invalid("v1 header without CRLF"))?;
    let mut fields = text.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(ProxyError::Invalid("not a PROXY protocol header"));
    }
    let v6 = match fields.next() {
        // The specification: the receiver ignores whatever follows UNKNOWN.
        Some("UNKNOWN") => return Ok(None),
        Some("TCP4") => false,
        Some("TCP6") => true,
        _ => {
            return Err(ProxyError::Invalid(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let mut next = || {
        fields
            .next()
            .ok_or(ProxyError::Invalid("v1 header has too few fields"))
    };
    let (source, destination) = (next()?, next()?);
    let (source_port, destination_port) = (next()?, next()?);
    if fields.next().is_some() {
        return Err(ProxyError::Invalid("v1 header has too many fields"));
    }
    let address = |text: &str| -> Result<IpAddr, ProxyError> {
        let invalid = ProxyError::Invalid("v1 address is not of the protocol's family");
        if v6 {
            text.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| invalid)
        } else {
            text.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| invalid)
        }
    };
    let source = address(source)?;
    address(destination)?;
    let source_port = parse_port(source_port)?;
    parse_port(destination_port)?;
    Ok(Some(SocketAddr::new(source, source_port)))
}

/// A v1 port: 0 to 65535 in decimal, without leading zeros or signs.
fn parse_port(text: &str) -> Result<u16, ProxyError> {
    let invalid = ProxyError::Invalid("v1 port is not a number from 0 to 65535");
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(invalid);
    }
    text.parse().map_err(|_| invalid)
}

/// Reads the rest of a v2 header whose first 16 bytes are `start`.
async fn read_v2(
    stream: &mut TcpStream,
    start: &[u8; 16],
) -> Result<Option<SocketAddr>, ProxyError> {
    if start[12] >> 4 != 2 {
        return Err(ProxyError::Invalid("v2 header of an unknown version"));
    }
    let proxied = match start[12] & 0x0f {
        0 => false,
        1 => true,
        _ => return Err(ProxyError::Invalid("v2 command is neither LOCAL nor PROXY")),
    };
    let len = usize::from(u16::from_be_bytes([start[14], start[15]]));
    let mut block = [0u8; V2_ADDRESSES_MAX];
    if !proxied {
        // LOCAL: the proxy's own connection (a health check). The specification has the
        // receiver ignore the address family and discard the block.
        skip(stream, &mut block, len).await?;
        return Ok(None);
    }
    let (family, transport) = (start[13] >> 4, start[13] & 0x0f);
    let address_len = match family {
        0 => 0,
        1 => 12,
        2 => 36,
        3 => 216,
        _ => return Err(ProxyError::Invalid("v2 address family unknown")),
    };
    if transport > 2 {
        return Err(ProxyError::Invalid("v2 transport protocol unknown"));
    }
    if len < address_len {
        return Err(ProxyError::Invalid(
            "v2 address block shorter than its family's addresses",
        ));
    }
    stream.read_exact(&mut block[..address_len]).await?;
    let source = match (family, transport) {
        (1, 1 | 2) => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([block[8], block[9]]),
            ))
        }
        (2, 1 | 2) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&block[..16]);
            let ip = Ipv6Addr::from(octets);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([block[32], block[33]]),
            ))
        }
        _ => None,
    };
    // The TLVs after the addresses (TLS details, a cloud's endpoint id) are not used.
    skip(stream, &mut block, len - address_len).await?;
    Ok(source)
}

/// Reads and discards `len` bytes, through `scratch`.
async fn skip(
    stream: &mut TcpStream,
    scratch: &mut [u8],
    mut len: usize,
) -> Result<(), ProxyError> {
    while len > 0 {
        let chunk = len.min(scratch.len());
        stream.read_exact(&mut scratch[..chunk]).await?;
        len -= chunk;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A connected pair over loopback: (the client's end, the server's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), server.expect("accept").0)
    }

    /// Sends `bytes` (then closes if `close`), and reads a header on the other end.
    async fn send(
        bytes: &[u8],
        close: bool,
    ) -> (Result<Option<SocketAddr>, ProxyError>, TcpStream) {
        let (mut client, mut server) = pair().await;
        client.write_all(bytes).await.expect("write");
        if close {
            client.shutdown().await.expect("shutdown");
        }
        let result = tokio::time::timeout(LIMIT, read_header(&mut server))
            .await
            .expect("read_header timed out");
        drop(client);
        (result, server)
    }

    async fn header(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
        send(bytes, true).await.0
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().expect("socket address"))
    }

    fn v2(command: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend_from_slice(
            &u16::try_from(block.len())
                .expect("short block")
                .to_be_bytes(),
        );
        bytes.extend_from_slice(block);
        bytes
    }

    fn v2_ipv4_block() -> Vec<u8> {
        let mut block = vec![192, 0, 2, 1, 198, 51, 100, 7];
        block.extend_from_slice(&51234u16.to_be_bytes());
        block.extend_from_slice(&1883u16.to_be_bytes());
        block
    }

    #[tokio::test]
    async fn v1_tcp4() {
        let result = header(b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 1883\r\n").await;
        assert_eq!(result.expect("valid"), addr("192.0.2.1:51234"));
    }

    #[tokio::test]
    async fn v1_tcp6() {
        let result = header(b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 0\r\n").await;
        assert_eq!(result.expect("valid"), addr("[2001:db8::1]:65535"));
    }

    #[tokio::test]
    async fn v1_unknown() {
        assert_eq!(header(b"PROXY UNKNOWN\r\n").await.expect("valid"), None);
        let result = header(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").await;
        assert_eq!(result.expect("valid"), None);
    }

    #[tokio::test]
    async fn v1_invalid_lines() {
        for line in [
            &b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n"[..],
            b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n",
            b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n\r\n",
            b"PROXY TCP4\r\n and more bytes",
        ] {
            let result = header(line).await;
            assert!(
                matches!(result, Err(ProxyError::Invalid(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[tokio::test]
    async fn v1_longer_than_107_bytes() {
        let mut line = b"PROXY TCP6 ".to_vec();
        line.resize(V1_MAX + 20, b'1');
        line.extend_from_slice(b"\r\n");
        let result = header(&line).await;
        assert!(matches!(result, Err(ProxyError::Invalid(_))), "{result:?}");
    }

    #[tokio::test]
    async fn v1_longest_valid_lines() {
        let ffff = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let line = format!("PROXY TCP6 {ffff} {ffff} 65535 65535\r\n");
        let result = header(line.as_bytes()).await.expect("valid");
        assert_eq!(result, addr(&format!("[{ffff}]:65535")));
        // The specification's worst case, 107 bytes.
        let line = format!("PROXY UNKNOWN {ffff} {ffff} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX);
        assert_eq!(header(line.as_bytes()).await.expect("valid"), None);
        let line = format!("PROXY UNKNOWN {ffff} {ffff} 65535 655355\r\n");
        let result = header(line.as_bytes()).await;
        assert!(matches!(result, Err(ProxyError::Invalid(_))), "{result:?}");
    }

    #[tokio::test]
    async fn v1_sent_a_byte_at_a_time() {
        let (mut client, mut server) = pair().await;
        client.set_nodelay(true).expect("nodelay");
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 1883\r\nCONNECT";
        let reader = tokio::spawn(async move {
            let result = read_header(&mut server).await;
            let mut rest = [0u8; 7];
            server.read_exact(&mut rest).await.expect("rest");
            (result, rest)
        });
        for byte in line {
            client.write_all(&[*byte]).await.expect("write");
            tokio::task::yield_now().await;
        }
        let (result, rest) = tokio::time::timeout(LIMIT, reader)
            .await
            .expect("timed out")
            .expect("task");
        assert_eq!(result.expect("valid"), addr("192.0.2.1:51234"));
        assert_eq!(&rest, b"CONNECT");
    }

    #[tokio::test]
    async fn v2_proxy_ipv4() {
        let result = header(&v2(1, 0x11, &v2_ipv4_block())).await;
        assert_eq!(result.expect("valid"), addr("192.0.2.1:51234"));
        // UDP over IPv4 carries a source address too.
        let result = header(&v2(1, 0x12, &v2_ipv4_block())).await;
        assert_eq!(result.expect("valid"), addr("192.0.2.1:51234"));
    }

    #[tokio::test]
    async fn v2_proxy_ipv6_with_tlvs() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets());
        block.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().expect("ip").octets());
        block.extend_from_slice(&40000u16.to_be_bytes());
        block.extend_from_slice(&8883u16.to_be_bytes());
        // A TLV (PP2_TYPE_AUTHORITY) and a long one, both to be skipped.
        block.extend_from_slice(&[0x02, 0x00, 0x04, b'h', b'o', b's', b't']);
        block.extend_from_slice(&[0xE0, 0x01, 0x2C]);
        block.extend_from_slice(&[7; 300]);
        let mut bytes = v2(1, 0x21, &block);
        bytes.extend_from_slice(b"after");
        let (result, mut server) = send(&bytes, true).await;
        assert_eq!(result.expect("valid"), addr("[2001:db8::1]:40000"));
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.expect("rest");
        assert_eq!(rest, b"after");
    }

    #[tokio::test]
    async fn v2_local_and_other_families() {
        assert_eq!(header(&v2(0, 0x00, &[])).await.expect("LOCAL"), None);
        // LOCAL ignores the family and its block.
        assert_eq!(
            header(&v2(0, 0x11, &v2_ipv4_block())).await.expect("LOCAL"),
            None
        );
        assert_eq!(header(&v2(1, 0x00, &[])).await.expect("UNSPEC"), None);
        assert_eq!(header(&v2(1, 0x31, &[0; 216])).await.expect("UNIX"), None);
        assert_eq!(
            header(&v2(1, 0x10, &v2_ipv4_block()))
                .await
                .expect("IPv4, no transport"),
            None
        );
    }

    #[tokio::test]
    async fn v2_invalid() {
        let mut wrong_version = v2(1, 0x11, &v2_ipv4_block());
        wrong_version[12] = 0x11;
        let mut short_block = v2(1, 0x21, &v2_ipv4_block());
        short_block.extend_from_slice(&[0; 40]);
        for bytes in [
            wrong_version,
            v2(2, 0x11, &v2_ipv4_block()),
            v2(1, 0x41, &v2_ipv4_block()),
            v2(1, 0x13, &v2_ipv4_block()),
            short_block,
        ] {
            let result = header(&bytes).await;
            assert!(
                matches!(result, Err(ProxyError::Invalid(_))),
                "{bytes:?}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn header_and_payload_in_one_write() {
        for mut bytes in [
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 1883\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(1, 0x11, &v2_ipv4_block()),
        ] {
            // An MQTT CONNECT's first bytes, and a CRLF, which must not be taken for the
            // header's end.
            let payload = b"\x10\x0c\x00\x04MQTT\r\n\r\n";
            bytes.extend_from_slice(payload);
            let (result, mut server) = send(&bytes, true).await;
            assert!(result.is_ok(), "{result:?}");
            let mut rest = Vec::new();
            tokio::time::timeout(LIMIT, server.read_to_end(&mut rest))
                .await
                .expect("timed out")
                .expect("rest");
            assert_eq!(rest, payload);
        }
    }

    #[tokio::test]
    async fn garbage_is_refused_at_once() {
        // An MQTT CONNECT, and a TLS ClientHello, sent without a header; the client keeps
        // the connection open: the refusal must not wait for more bytes.
        for bytes in [
            &b"\x10\x0c\x00\x04MQTT"[..],
            b"\x16\x03\x01\x02\x00",
            b"PROXX",
        ] {
            let (result, _server) = send(bytes, false).await;
            assert!(
                matches!(result, Err(ProxyError::Invalid(_))),
                "{bytes:?}: {result:?}"
            );
        }
        let result = header(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(matches!(result, Err(ProxyError::Invalid(_))), "{result:?}");
    }

    #[tokio::test]
    async fn truncated_headers() {
        let full = v2(1, 0x11, &v2_ipv4_block());
        for bytes in [
            &full[..10],
            &full[..16],
            &full[..20],
            b"PROXY TCP4 192.0.2.1",
            b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 1883\r",
            b"",
        ] {
            let result = header(bytes).await;
            assert!(
                matches!(result, Err(ProxyError::Closed | ProxyError::Invalid(_))),
                "{bytes:?}: {result:?}"
            );
        }
    }
}
