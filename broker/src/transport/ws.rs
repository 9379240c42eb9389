//! MQTT over WebSocket (RFC 6455), server side: the opening handshake ([`accept`]) and the
//! byte stream carried in binary frames ([`WsStream`]).
//!
//! MQTT over WebSocket is a byte stream: an MQTT packet may span frames and a frame may hold
//! several packets, so the stream ignores frame boundaries. The design goal is memory per
//! idle connection: a [`WsStream`] holds no heap buffer while idle. Received payload is
//! read straight into the caller's buffer and unmasked there (frame headers are parsed from
//! a 14-byte inline array, control frames' payloads go to a small box that exists only while
//! one is handled); a written frame is sent from the caller's buffer when the socket takes it
//! whole, and only an unsent remainder is copied aside, until it is out.
//!
//! `tungstenite` supplies the primitives (frame header coding, close codes, the accept key);
//! its `WebSocket` and tokio-tungstenite's `WebSocketStream` are not used because their read
//! buffer stays allocated for the connection's life.
//!
//! The client's address behind reverse proxies comes from `X-Forwarded-For` ([`client_addr`]);
//! the `Forwarded` header (RFC 7239) is not read.

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tungstenite::protocol::frame::coding::{CloseCode, Control as ControlOp, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Where the WebSocket endpoint is and how large a request it reads.
#[derive(Debug, Clone)]
pub struct WsOptions {
    /// The request path of the endpoint (e.g. "/mqtt"); the query string is ignored.
    pub path: String,
    /// The largest request head read (request line and header fields); larger requests are
    /// refused with 431.
    pub max_request_bytes: usize,
}

impl Default for WsOptions {
    fn default() -> Self {
        Self {
            path: "/mqtt".to_owned(),
            max_request_bytes: 8 * 1024,
        }
    }
}

/// What the handshake learnt about the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    /// The subprotocol agreed on: "mqtt" (preferred) or "mqttv3.1".
    pub subprotocol: &'static str,
    /// The addresses of `X-Forwarded-For` (all such header fields, in order), parsed. When an
    /// entry does not parse, it and every entry left of it are dropped: those right of it were
    /// appended by proxies nearer to us, and only they can be trusted (see [`client_addr`]).
    /// At most [`MAX_FORWARDED`] entries, the rightmost ones.
    pub forwarded_for: Vec<IpAddr>,
}

/// The most `X-Forwarded-For` entries kept (the rightmost ones).
pub const MAX_FORWARDED: usize = 64;

/// Why a connection did not become a WebSocket. Each refusal has been answered with an HTTP
/// error response (`Connection: close`) before it is returned.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// Not a valid WebSocket upgrade request (answered 400, 405, 426 or 431).
    #[error("not a valid WebSocket upgrade request: {0}")]
    Request(&'static str),
    /// The request was for another path (answered 404). Truncated to 100 characters.
    #[error("no WebSocket endpoint at path {0:?}")]
    Path(String),
    /// The client offered neither the `mqtt` nor the `mqttv3.1` subprotocol, or none at all
    /// (answered 400).
    #[error("the client did not offer the WebSocket subprotocol `mqtt` (or `mqttv3.1`)")]
    Subprotocol,
    /// The socket failed.
    #[error("socket error during the WebSocket handshake: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection before its request was complete.
    #[error("connection closed during the WebSocket handshake")]
    Closed,
}

/// Header fields read from a request; more are refused (400).
const MAX_HEADERS: usize = 64;
/// Bytes asked of the stream per read while the request head arrives.
const HEAD_CHUNK: usize = 1024;
/// The largest payload of one written frame.
const MAX_WRITE_FRAME: usize = 64 * 1024;
/// Reads in one `poll_read` that yield no payload (headers and control frames only) before
/// it yields to the scheduler.
const MAX_EMPTY_READS: usize = 16;

/// Close codes we send (RFC 6455 section 7.4.1).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_PROTOCOL: u16 = 1002;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_INVALID: u16 = 1007;

/// Performs the server side of the WebSocket opening handshake on `stream`: reads the HTTP
/// upgrade request, checks it, and answers `101 Switching Protocols`, or an HTTP error
/// response and an error.
///
/// The subprotocol `mqtt` (or the older `mqttv3.1`) is required, as in Mosquitto: a client
/// that offers none is refused with 400, as is one that offers only others. Refusals: 405
/// (not GET), 404 (another path), 426 (`Sec-WebSocket-Version` other than 13), 431 (head
/// larger than `max_request_bytes`), 400 (anything else). Bytes that arrive after the
/// request head are kept for the [`WsStream`]. `Host` and `Origin` are not checked: an MQTT
/// client authenticates in its CONNECT, not with cookies. The caller bounds the whole with a
/// timeout.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    options: &WsOptions,
) -> Result<(WsStream<S>, Upgraded), WsError> {
    let mut head = Vec::with_capacity(options.max_request_bytes.min(HEAD_CHUNK));
    let (request, used) = loop {
        if head.len() >= options.max_request_bytes {
            return Err(refuse(&mut stream, Refusal::TooLarge).await);
        }
        let want = (options.max_request_bytes - head.len()).min(HEAD_CHUNK);
        head.reserve(want);
        let read = (&mut stream).take(want as u64).read_buf(&mut head).await?;
        if read == 0 {
            return Err(WsError::Closed);
        }
        match parse_request(&head, options) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) => {}
            Err(refusal) => return Err(refuse(&mut stream, refusal).await),
        }
    };
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\
         Sec-WebSocket-Protocol: {}\r\n\r\n",
        request.accept_key, request.subprotocol
    );
    stream.write_all(response.as_bytes()).await?;
    stream.flush().await?;
    let stream = WsStream::new(stream, head[used..].into());
    let upgraded = Upgraded {
        subprotocol: request.subprotocol,
        forwarded_for: request.forwarded_for,
    };
    Ok((stream, upgraded))
}

/// A request that may be upgraded.
struct Request {
    accept_key: String,
    subprotocol: &'static str,
    forwarded_for: Vec<IpAddr>,
}

/// Why a request is refused, and so how it is answered.
#[derive(Debug)]
enum Refusal {
    /// 400.
    BadRequest(&'static str),
    /// 405.
    Method,
    /// 404.
    Path(String),
    /// 426.
    Version,
    /// 431.
    TooLarge,
    /// 400, saying that the subprotocol `mqtt` is required.
    Subprotocol,
}

/// Answers a refused request (with bounded effort: a small response, errors ignored, as the
/// connection is closed next anyway) and returns the matching error.
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, refusal: Refusal) -> WsError {
    let (status, extra, body, error) = match refusal {
        Refusal::BadRequest(why) => ("400 Bad Request", "", why, WsError::Request(why)),
        Refusal::Method => (
            "405 Method Not Allowed",
            "Allow: GET\r\n",
            "a WebSocket upgrade is a GET request",
            WsError::Request("method is not GET"),
        ),
        Refusal::Path(path) => (
            "404 Not Found",
            "",
            "no WebSocket endpoint at this path",
            WsError::Path(path),
        ),
        Refusal::Version => (
            "426 Upgrade Required",
            "Sec-WebSocket-Version: 13\r\n",
            "WebSocket version 13 is required",
            WsError::Request("Sec-WebSocket-Version is not 13"),
        ),
        Refusal::TooLarge => (
            "431 Request Header Fields Too Large",
            "",
            "request head too large",
            WsError::Request("request head larger than max_request_bytes"),
        ),
        Refusal::Subprotocol => (
            "400 Bad Request",
            "",
            "the WebSocket subprotocol `mqtt` is required",
            WsError::Subprotocol,
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\n{extra}Connection: close\r\nContent-Type: text/plain\r\n\
         Content-Length: {}\r\n\r\n{body}\n",
        body.len() + 1
    );
    if stream.write_all(response.as_bytes()).await.is_ok() && stream.flush().await.is_ok() {
        let _ = stream.shutdown().await;
    }
    error
}

/// Parses and checks the request head at the start of `head`: `Ok(None)` while it is
/// incomplete, else the request and the length of its head.
fn parse_request(head: &[u8], options: &WsOptions) -> Result<Option<(Request, usize)>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let len = match parsed.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::BadRequest("too many header fields"))
        }
        Err(_) => return Err(Refusal::BadRequest("not an HTTP request")),
    };
    if parsed.method != Some("GET") {
        return Err(Refusal::Method);
    }
    if parsed.version != Some(1) {
        return Err(Refusal::BadRequest("HTTP/1.1 is required"));
    }
    let target = parsed.path.unwrap_or_default();
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    if path != options.path {
        return Err(Refusal::Path(path.chars().take(100).collect()));
    }

    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut version = None;
    let mut keys = 0;
    let mut key = "";
    let mut mqtt = false;
    let mut mqtt31 = false;
    let mut forwarded = Vec::new();
    for header in parsed.headers.iter() {
        let name = header.name;
        // Values that are not text cannot hold what we look for.
        let value = std::str::from_utf8(header.value).unwrap_or_default();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            version = Some(value.trim());
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            keys += 1;
            key = value.trim();
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            // Subprotocol names are case-sensitive (RFC 6455 section 4.1).
            for protocol in tokens(value) {
                mqtt |= protocol == "mqtt";
                mqtt31 |= protocol == "mqttv3.1";
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded.extend(value.split(',').map(str::trim));
        }
    }
    if !upgrade {
        return Err(Refusal::BadRequest("no `Upgrade: websocket` header field"));
    }
    if !connection_upgrade {
        return Err(Refusal::BadRequest("no `Connection: upgrade` header field"));
    }
    match version {
        None => return Err(Refusal::BadRequest("no Sec-WebSocket-Version header field")),
        Some("13") => {}
        Some(_) => return Err(Refusal::Version),
    }
    if keys != 1 || !valid_key(key) {
        return Err(Refusal::BadRequest("Sec-WebSocket-Key missing or invalid"));
    }
    let subprotocol = match (mqtt, mqtt31) {
        (true, _) => "mqtt",
        (false, true) => "mqttv3.1",
        (false, false) => return Err(Refusal::Subprotocol),
    };
    let accept_key = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let request = Request {
        accept_key,
        subprotocol,
        forwarded_for: forwarded_addresses(&forwarded),
    };
    Ok(Some((request, len)))
}

/// The non-empty elements of a comma-separated header field value.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Whether `key` is the base64 encoding of 16 bytes (RFC 6455 section 4.1): 22 characters of
/// the alphabet, the last of them carrying 2 bits (one of A, Q, g, w), then "==".
fn valid_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    bytes.len() == 24
        && bytes[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        && matches!(bytes[21], b'A' | b'Q' | b'g' | b'w')
        && &bytes[22..] == b"=="
}

/// The addresses of `X-Forwarded-For` entries, walking from the right and stopping at the
/// first that does not parse (see [`Upgraded::forwarded_for`]).
fn forwarded_addresses(entries: &[&str]) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = entries
        .iter()
        .rev()
        .map_while(|entry| forwarded_address(entry))
        .take(MAX_FORWARDED)
        .collect();
    addresses.reverse();
    addresses
}

/// One `X-Forwarded-For` entry: an address, or an address with a port as some proxies write
/// them ("192.0.2.1:4711", "[2001:db8::1]:4711", "[2001:db8::1]").
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .or_else(|| {
            let inner = entry.strip_prefix('[')?.strip_suffix(']')?;
            inner.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)
        })
}

/// The client's address: `socket_peer`, unless that is a trusted proxy, in which case
/// `X-Forwarded-For` is walked from the right, skipping trusted proxies, and the first
/// untrusted address is the client (each proxy appends the address it got the connection
/// from, so only the entries right of the first untrusted one are known to be true). When all
/// are trusted, the leftmost entry; when there are none, the socket peer. IPv4-mapped IPv6
/// addresses count as IPv4.
pub fn client_addr(socket_peer: IpAddr, forwarded_for: &[IpAddr], trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let peer = socket_peer.to_canonical();
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain = forwarded_for.iter().map(IpAddr::to_canonical);
    chain
        .clone()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or_else(|| chain.next())
        .unwrap_or(peer)
}

/// An established WebSocket connection as a byte stream: reads yield the payload of the
/// client's binary frames (and their continuation frames), writes go out as binary frames.
///
/// Pings are answered with pongs (when a second ping comes before the first pong went out,
/// only the latest is answered; a pong is dropped if one is half-written); pongs are ignored;
/// a close frame is answered with a close frame echoing its status code, after which reads
/// return end of stream. A protocol violation (an unmasked frame, RSV bits, a reserved
/// opcode, a malformed control frame, a continuation out of place) sends close 1002, a text
/// frame close 1003, and fails the read with [`io::ErrorKind::InvalidData`]. Frames of any
/// length are accepted, as their payload is streamed, not buffered: the MQTT layer's packet
/// size limit is what bounds a client. Extensions are never agreed on (RSV bits stay zero).
///
/// Reads also send the control frames owed (pongs, close replies), so those go out even when
/// nothing is written; a read may thus register the task for writability. Read and write
/// from one task (as the broker's connection task does), not from two tasks over a split.
#[derive(Debug)]
pub struct WsStream<S> {
    inner: S,
    /// Bytes that came with the request head (a client that did not wait for our 101):
    /// read before the socket. Empty (unallocated) almost always.
    early: Box<[u8]>,
    /// The unsent rest of the data frame being written; empty (unallocated) when there is
    /// none. A frame is copied here only when the socket did not take it whole.
    out: BytesMut,
    /// The control frame being read and the one owed to the peer; allocated only while there
    /// is one of either.
    control: Option<Box<ControlFrames>>,
    /// Payload bytes left in the frame being read.
    remaining: u64,
    /// The header of the frame being read, as far as it has arrived.
    header: [u8; 14],
    /// How much of `header` has arrived.
    header_len: u8,
    /// The masking key of the frame being read.
    mask: [u8; 4],
    /// Where in the masking key the next payload byte is (payload offset mod 4).
    mask_offset: u8,
    /// What the reader is in the middle of.
    phase: Phase,
    /// A fragmented binary message is open: continuation frames are expected.
    fragmented: bool,
    /// Our side of the closing handshake.
    close: CloseState,
}

/// What the reader is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A frame header.
    Header,
    /// The payload of a binary or continuation frame (goes to the reader).
    Data,
    /// The payload of a control frame (collected in `control`).
    Control(ControlKind),
    /// The peer's close frame came: reads answer it, then return end of stream.
    PeerClosed,
    /// The peer broke the protocol (close code sent): reads fail.
    Failed(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlKind {
    Ping,
    Pong,
    Close,
}

/// Our side of the closing handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CloseState {
    /// No close frame owed or sent: data may be written.
    Open,
    /// A close frame with this status code (none: an empty one) is to be sent, after the
    /// frames before it.
    Owed(Option<u16>),
    /// The close frame is in `control.outgoing`.
    Sending,
    /// The close frame is out.
    Sent,
}

/// Control frames in flight; boxed, and only while there are any.
#[derive(Debug)]
struct ControlFrames {
    /// The payload of the control frame being read (at most 125 bytes).
    incoming: [u8; 125],
    /// How much of `incoming` has arrived.
    incoming_len: u8,
    /// The control frame owed to the peer (a pong or a close), encoded.
    outgoing: [u8; 127],
    /// The length of the frame in `outgoing`; 0 when none is owed.
    outgoing_len: u8,
    /// How much of `outgoing` is written. A frame begun must be finished before another.
    outgoing_written: u8,
}

impl ControlFrames {
    fn new() -> Box<Self> {
        Box::new(Self {
            incoming: [0; 125],
            incoming_len: 0,
            outgoing: [0; 127],
            outgoing_len: 0,
            outgoing_written: 0,
        })
    }

    /// Queues a pong echoing the ping in `incoming`.
    fn queue_pong(&mut self) -> io::Result<()> {
        let payload = self.incoming;
        self.queue(ControlOp::Pong, &payload[..usize::from(self.incoming_len)])
    }

    /// Queues the control frame `opcode` with `payload` (at most 125 bytes).
    fn queue(&mut self, opcode: ControlOp, payload: &[u8]) -> io::Result<()> {
        let len = encode_header(OpCode::Control(opcode), payload.len(), &mut self.outgoing)?;
        let end = len + payload.len();
        self.outgoing
            .get_mut(len..end)
            .ok_or_else(|| io::Error::other("control frame payload too long"))?
            .copy_from_slice(payload);
        // At most 2 + 125 bytes: fits.
        self.outgoing_len = end as u8;
        self.outgoing_written = 0;
        Ok(())
    }
}

/// Writes an unmasked, final frame header for `opcode` and `len` payload bytes into `out`;
/// returns its length.
fn encode_header(opcode: OpCode, len: usize, out: &mut [u8]) -> io::Result<usize> {
    let header = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode,
        mask: None,
    };
    let mut cursor = io::Cursor::new(out);
    header
        .format(len as u64, &mut cursor)
        .map_err(io::Error::other)?;
    Ok(cursor.position() as usize)
}

/// The length of a client frame header whose first bytes are `header` (2 until they are in).
fn header_size(header: &[u8]) -> usize {
    match header {
        [_, second, ..] => {
            let extended = match second & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if second & 0x80 != 0 { 4 } else { 0 };
            2 + extended + mask
        }
        _ => 2,
    }
}

/// Unmasks `payload`, whose first byte is at `offset` (mod 4) in its frame.
fn unmask(payload: &mut [u8], mask: [u8; 4], offset: u8) {
    let mut key = mask;
    key.rotate_left(usize::from(offset));
    let key = u32::from_ne_bytes(key);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let mut word = [0u8; 4];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u32::from_ne_bytes(word) ^ key).to_ne_bytes());
    }
    for (byte, k) in chunks.into_remainder().iter_mut().zip(key.to_ne_bytes()) {
        *byte ^= k;
    }
}

/// The read error of a protocol violation answered with close `code`.
fn protocol_error(code: u16) -> io::Error {
    let what = match code {
        CLOSE_UNSUPPORTED => "WebSocket text frame (MQTT needs binary frames)",
        CLOSE_INVALID => "WebSocket close frame with a reason that is not UTF-8",
        _ => "WebSocket protocol violation",
    };
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl<S> WsStream<S> {
    fn new(inner: S, early: Box<[u8]>) -> Self {
        Self {
            inner,
            early,
            out: BytesMut::new(),
            control: None,
            remaining: 0,
            header: [0; 14],
            header_len: 0,
            mask: [0; 4],
            mask_offset: 0,
            phase: Phase::Header,
            fragmented: false,
            close: CloseState::Open,
        }
    }

    /// The underlying stream (for its addresses; reading or writing it would break framing).
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Runs the frame reader over `data`, bytes just read: payload is unmasked and moved to
    /// the front, headers and control frames are taken out. Returns the payload's length, or
    /// the close code of a protocol violation.
    fn absorb(&mut self, data: &mut [u8]) -> Result<usize, u16> {
        let mut read = 0;
        let mut payload = 0;
        while read < data.len() {
            let available = data.len() - read;
            match self.phase {
                Phase::Header => {
                    let have = usize::from(self.header_len);
                    let take = (header_size(&self.header[..have]) - have).min(available);
                    self.header[have..have + take].copy_from_slice(&data[read..read + take]);
                    read += take;
                    let have = have + take;
                    self.header_len = have as u8;
                    if have == header_size(&self.header[..have]) && have >= 2 {
                        self.start_frame()?;
                    }
                }
                Phase::Data => {
                    let take = available.min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                    let chunk = &mut data[read..read + take];
                    unmask(chunk, self.mask, self.mask_offset);
                    data.copy_within(read..read + take, payload);
                    read += take;
                    payload += take;
                    self.consumed(take);
                    if self.remaining == 0 {
                        self.phase = Phase::Header;
                    }
                }
                Phase::Control(kind) => {
                    let take = available.min(self.remaining as usize);
                    let (mask, offset) = (self.mask, self.mask_offset);
                    let Some(control) = self.control.as_deref_mut() else {
                        return Err(CLOSE_PROTOCOL);
                    };
                    let have = usize::from(control.incoming_len);
                    let chunk = &mut control.incoming[have..have + take];
                    chunk.copy_from_slice(&data[read..read + take]);
                    unmask(chunk, mask, offset);
                    control.incoming_len = (have + take) as u8;
                    read += take;
                    self.consumed(take);
                    if self.remaining == 0 {
                        self.finish_control(kind)?;
                    }
                }
                // Nothing the peer sends after its close frame (or a violation) counts.
                Phase::PeerClosed | Phase::Failed(_) => break,
            }
        }
        Ok(payload)
    }

    /// Accounts for `n` payload bytes of the current frame.
    fn consumed(&mut self, n: usize) {
        self.remaining -= n as u64;
        self.mask_offset = ((usize::from(self.mask_offset) + n) % 4) as u8;
    }

    /// Checks the complete header in `header` and starts its frame.
    fn start_frame(&mut self) -> Result<(), u16> {
        let len = usize::from(self.header_len);
        self.header_len = 0;
        let parsed = FrameHeader::parse(&mut io::Cursor::new(&self.header[..len]));
        // Err: a reserved opcode. None cannot happen: the header is complete.
        let Ok(Some((header, length))) = parsed else {
            return Err(CLOSE_PROTOCOL);
        };
        if header.rsv1 || header.rsv2 || header.rsv3 || length >> 63 != 0 {
            return Err(CLOSE_PROTOCOL);
        }
        // Client frames must be masked (RFC 6455 section 5.1).
        let Some(mask) = header.mask else {
            return Err(CLOSE_PROTOCOL);
        };
        self.mask = mask;
        self.mask_offset = 0;
        self.remaining = length;
        match header.opcode {
            OpCode::Data(Data::Binary) if !self.fragmented => {
                self.fragmented = !header.is_final;
                self.phase = Phase::Data;
            }
            OpCode::Data(Data::Continue) if self.fragmented => {
                self.fragmented = !header.is_final;
                self.phase = Phase::Data;
            }
            OpCode::Data(Data::Text) if !self.fragmented => return Err(CLOSE_UNSUPPORTED),
            OpCode::Control(op) if header.is_final && length <= 125 => {
                let kind = match op {
                    ControlOp::Ping => ControlKind::Ping,
                    ControlOp::Pong => ControlKind::Pong,
                    ControlOp::Close => ControlKind::Close,
                    ControlOp::Reserved(_) => return Err(CLOSE_PROTOCOL),
                };
                self.control
                    .get_or_insert_with(ControlFrames::new)
                    .incoming_len = 0;
                self.phase = Phase::Control(kind);
                if length == 0 {
                    return self.finish_control(kind);
                }
            }
            _ => return Err(CLOSE_PROTOCOL),
        }
        if self.phase == Phase::Data && length == 0 {
            self.phase = Phase::Header;
        }
        Ok(())
    }

    /// Acts on a complete control frame.
    fn finish_control(&mut self, kind: ControlKind) -> Result<(), u16> {
        self.phase = Phase::Header;
        let Some(control) = self.control.as_deref_mut() else {
            return Err(CLOSE_PROTOCOL);
        };
        let payload = &control.incoming[..usize::from(control.incoming_len)];
        match kind {
            ControlKind::Ping => {
                let half_written = control.outgoing_written > 0;
                if self.close == CloseState::Open && !half_written {
                    // Replaces a pong not yet begun: only the latest ping needs one.
                    control.queue_pong().map_err(|_| CLOSE_PROTOCOL)?;
                }
            }
            ControlKind::Pong => {}
            ControlKind::Close => {
                let code = match payload {
                    [] => None,
                    [_] => return Err(CLOSE_PROTOCOL),
                    [high, low, reason @ ..] => {
                        let code = u16::from_be_bytes([*high, *low]);
                        if !CloseCode::from(code).is_allowed() {
                            return Err(CLOSE_PROTOCOL);
                        }
                        if std::str::from_utf8(reason).is_err() {
                            return Err(CLOSE_INVALID);
                        }
                        Some(code)
                    }
                };
                self.phase = Phase::PeerClosed;
                if self.close == CloseState::Open {
                    self.close = CloseState::Owed(code);
                }
            }
        }
        control.incoming_len = 0;
        self.release_control();
        Ok(())
    }

    /// Drops the control box when nothing is in it.
    fn release_control(&mut self) {
        let idle = self.control.as_ref().is_some_and(|c| c.outgoing_len == 0)
            && !matches!(self.phase, Phase::Control(_));
        if idle {
            self.control = None;
        }
    }
}

impl<S: AsyncWrite + Unpin> WsStream<S> {
    /// Writes what is owed, in order: the rest of the data frame begun, the control frame
    /// owed, the close frame owed. `Ready(Ok)` once all is out (the inner stream not flushed).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.out.is_empty() {
                let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.out.advance(n);
                if self.out.is_empty() {
                    // Give the buffer back while idle.
                    self.out = BytesMut::new();
                }
                continue;
            }
            if let Some(control) = self.control.as_deref_mut() {
                let (written, len) = (control.outgoing_written, control.outgoing_len);
                if written < len {
                    let rest = &control.outgoing[usize::from(written)..usize::from(len)];
                    let n = ready!(Pin::new(&mut self.inner).poll_write(cx, rest))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    // n <= rest.len() <= 127.
                    control.outgoing_written += n as u8;
                    if control.outgoing_written == len {
                        control.outgoing_len = 0;
                        control.outgoing_written = 0;
                        if self.close == CloseState::Sending {
                            self.close = CloseState::Sent;
                        }
                        self.release_control();
                    }
                    continue;
                }
            }
            if let CloseState::Owed(code) = self.close {
                let code = code.map(u16::to_be_bytes);
                let payload = code.as_ref().map_or(&[][..], |c| &c[..]);
                self.control
                    .get_or_insert_with(ControlFrames::new)
                    .queue(ControlOp::Close, payload)?;
                self.close = CloseState::Sending;
                continue;
            }
            return Poll::Ready(Ok(()));
        }
    }

    /// Sends what is owed if the stream takes it now (for the read side, which must not wait
    /// on writes). Errors are returned; `Pending` is not.
    fn try_drain(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => match Pin::new(&mut self.inner).poll_flush(cx) {
                Poll::Ready(result) => result,
                Poll::Pending => Ok(()),
            },
            Poll::Ready(Err(error)) => Err(error),
            Poll::Pending => Ok(()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        for _ in 0..MAX_EMPTY_READS {
            match this.phase {
                Phase::PeerClosed => {
                    // Our close reply goes out before the reader hears of the end; if the
                    // peer is gone meanwhile, the end is the end all the same.
                    return match this.poll_drain(cx) {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(_) => {
                            let _ = Pin::new(&mut this.inner).poll_flush(cx);
                            Poll::Ready(Ok(()))
                        }
                    };
                }
                Phase::Failed(code) => {
                    let _ = this.try_drain(cx);
                    return Poll::Ready(Err(protocol_error(code)));
                }
                _ => {}
            }
            this.try_drain(cx)?;
            let start = buf.filled().len();
            if this.early.is_empty() {
                ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            } else {
                let n = this.early.len().min(buf.remaining());
                buf.put_slice(&this.early[..n]);
                this.early = this.early[n..].into();
            }
            let read = buf.filled().len() - start;
            if read == 0 {
                // The TCP stream ended without a close frame: the end, unless mid-frame.
                let between_frames = this.phase == Phase::Header && this.header_len == 0;
                return Poll::Ready(if between_frames {
                    Ok(())
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                });
            }
            match this.absorb(&mut buf.filled_mut()[start..]) {
                Ok(payload) => {
                    buf.set_filled(start + payload);
                    if payload > 0 {
                        // Pongs or a close reply this read queued go out now if they can.
                        this.try_drain(cx)?;
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(code) => {
                    buf.set_filled(start);
                    this.phase = Phase::Failed(code);
                    this.fragmented = false;
                    if this.close == CloseState::Open {
                        this.close = CloseState::Owed(Some(code));
                    }
                }
            }
        }
        // Only headers and control frames so far: let other tasks run, then go on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    /// Sends (a prefix of, at most 64 KiB of) `buf` as one binary frame.
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close != CloseState::Open {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "WebSocket is closing",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(this.poll_drain(cx))?;
        let payload = &buf[..buf.len().min(MAX_WRITE_FRAME)];
        let mut header = [0u8; 10];
        let header_len = encode_header(OpCode::Data(Data::Binary), payload.len(), &mut header)?;
        let header = &header[..header_len];
        let frame_len = header_len + payload.len();
        // Straight from the caller's buffer when the stream takes the frame whole; only an
        // unsent rest is copied aside (a frame once begun must be finished).
        let sent = if this.inner.is_write_vectored() {
            let slices = [IoSlice::new(header), IoSlice::new(payload)];
            ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, &slices))?
        } else {
            0
        };
        if sent == frame_len {
            return Poll::Ready(Ok(payload.len()));
        }
        let mut out = BytesMut::with_capacity(frame_len - sent);
        if sent < header_len {
            out.put_slice(&header[sent..]);
            out.put_slice(payload);
        } else {
            out.put_slice(&payload[sent - header_len..]);
        }
        this.out = out;
        // The frame is ours now; what the stream does not take yet goes on flush or the next
        // write.
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(payload.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    /// Sends a close frame (1000) unless one was sent, then shuts the stream down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.close == CloseState::Open {
            this.close = CloseState::Owed(Some(CLOSE_NORMAL));
        }
        ready!(this.poll_drain(cx))?;
        ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use tokio::io::DuplexStream;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A valid upgrade request (the key is RFC 6455's example).
    const REQUEST: &str = "GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";

    type Accepted<S> = Result<(WsStream<S>, Upgraded), WsError>;

    async fn within<F: std::future::Future>(future: F) -> F::Output {
        tokio::time::timeout(LIMIT, future)
            .await
            .expect("timed out")
    }

    async fn joined<T>(handle: JoinHandle<T>) -> T {
        within(handle).await.expect("task panicked")
    }

    /// A listener on port 0 whose first connection goes through [`accept`].
    async fn serve_one(options: WsOptions) -> (SocketAddr, JoinHandle<Accepted<TcpStream>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            accept(stream, &options).await
        });
        (addr, server)
    }

    /// A tungstenite client connected through [`accept`] over TCP, offering `protocols`.
    async fn connect(
        protocols: &'static str,
    ) -> (
        WebSocketStream<TcpStream>,
        Option<String>,
        WsStream<TcpStream>,
        Upgraded,
    ) {
        let (addr, server) = serve_one(WsOptions::default()).await;
        let mut request = format!("ws://{addr}/mqtt?client=1")
            .into_client_request()
            .expect("request");
        let headers = request.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(protocols),
        );
        headers.append(
            "X-Forwarded-For",
            HeaderValue::from_static("203.0.113.9, 10.0.0.1"),
        );
        headers.append(
            "X-Forwarded-For",
            HeaderValue::from_static("[2001:db8::7]:4711"),
        );
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (client, response) = within(tokio_tungstenite::client_async(request, tcp))
            .await
            .expect("client handshake");
        let agreed = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().expect("text").to_owned());
        let (server, upgraded) = joined(server).await.expect("server handshake");
        (client, agreed, server, upgraded)
    }

    /// A tungstenite client and the server end over an in-memory pipe of `capacity` bytes.
    async fn connect_duplex(
        capacity: usize,
    ) -> (WebSocketStream<DuplexStream>, WsStream<DuplexStream>) {
        let (near, far) = tokio::io::duplex(capacity);
        let server = tokio::spawn(async move { accept(far, &WsOptions::default()).await });
        let mut request = "ws://localhost/mqtt"
            .into_client_request()
            .expect("request");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        let (client, _) = within(tokio_tungstenite::client_async(request, near))
            .await
            .expect("client handshake");
        let (server, _) = joined(server).await.expect("server handshake");
        (client, server)
    }

    /// The next message that is not a pong.
    async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(
        client: &mut WebSocketStream<S>,
    ) -> Message {
        loop {
            match within(client.next()).await {
                Some(Ok(Message::Pong(_))) => {}
                Some(Ok(message)) => return message,
                other => panic!("no message: {other:?}"),
            }
        }
    }

    fn close_code(message: &Message) -> Option<u16> {
        match message {
            Message::Close(Some(CloseFrame { code, .. })) => Some(u16::from(*code)),
            _ => None,
        }
    }

    /// Sends `request` raw to a server with `options`; returns the response and the result.
    async fn raw_request(options: WsOptions, request: &[u8]) -> (String, Accepted<TcpStream>) {
        let (addr, server) = serve_one(options).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(request).await.expect("write");
        let mut response = Vec::new();
        within(client.read_to_end(&mut response))
            .await
            .expect("read response");
        let result = joined(server).await;
        (String::from_utf8_lossy(&response).into_owned(), result)
    }

    /// A client frame: `first` is FIN, RSV and opcode; masked unless `mask` is None.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut bytes = vec![first];
        let bit = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => bytes.push(bit | n as u8),
            n @ 126..=65535 => {
                bytes.push(bit | 126);
                bytes.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                bytes.push(bit | 127);
                bytes.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                bytes.extend_from_slice(&key);
                bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => bytes.extend_from_slice(payload),
        }
        bytes
    }

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        frame(first, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    /// Reads the 101 response head byte by byte (nothing after it).
    async fn read_response_head<S: AsyncRead + Unpin>(stream: &mut S) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            within(stream.read_exact(&mut byte))
                .await
                .expect("response head");
            head.push(byte[0]);
        }
        String::from_utf8(head).expect("text")
    }

    /// Reads one server frame: (first byte, payload).
    async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        within(stream.read_exact(&mut head))
            .await
            .expect("frame header");
        assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
        let len = match head[1] & 0x7f {
            126 => {
                let mut len = [0u8; 2];
                stream.read_exact(&mut len).await.expect("length");
                usize::from(u16::from_be_bytes(len))
            }
            127 => {
                let mut len = [0u8; 8];
                stream.read_exact(&mut len).await.expect("length");
                usize::try_from(u64::from_be_bytes(len)).expect("length")
            }
            n => usize::from(n),
        };
        let mut payload = vec![0; len];
        within(stream.read_exact(&mut payload))
            .await
            .expect("payload");
        (head[0], payload)
    }

    /// A raw client upgraded over an in-memory pipe (`early`: bytes sent with the request),
    /// and the server end.
    async fn raw_upgrade(early: &[u8]) -> (DuplexStream, WsStream<DuplexStream>) {
        let (mut near, far) = tokio::io::duplex(64 * 1024);
        let mut request = REQUEST.as_bytes().to_vec();
        request.extend_from_slice(early);
        near.write_all(&request).await.expect("write");
        let (server, upgraded) = within(accept(far, &WsOptions::default()))
            .await
            .expect("handshake");
        assert_eq!(upgraded.subprotocol, "mqtt");
        let head = read_response_head(&mut near).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{head}"
        );
        (near, server)
    }

    /// Sends `frames` raw; expects the server's read to fail as a protocol error and a close
    /// frame with `code` to reach the client.
    async fn violation(frames: &[u8], code: u16) {
        let (mut client, mut server) = raw_upgrade(&[]).await;
        client.write_all(frames).await.expect("write");
        let mut buf = [0u8; 64];
        let error = loop {
            match within(server.read(&mut buf)).await {
                Ok(0) => panic!("end of stream instead of an error for {frames:02x?}"),
                Ok(_) => {}
                Err(error) => break error,
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{frames:02x?}");
        let (first, payload) = read_frame(&mut client).await;
        assert_eq!(first, 0x88, "{frames:02x?}");
        assert_eq!(payload, code.to_be_bytes(), "{frames:02x?}");
        // Writing after that is refused.
        assert!(server.write_all(b"x").await.is_err());
    }

    #[tokio::test]
    async fn handshake_agrees_on_mqtt() {
        let (_client, agreed, server, upgraded) = connect("mqtt").await;
        assert_eq!(agreed.as_deref(), Some("mqtt"));
        assert_eq!(upgraded.subprotocol, "mqtt");
        // Nothing on the heap once upgraded.
        assert!(server.early.is_empty() && server.out.capacity() == 0);
        assert!(server.control.is_none());
        let expected: Vec<IpAddr> = ["203.0.113.9", "10.0.0.1", "2001:db8::7"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        assert_eq!(upgraded.forwarded_for, expected);

        let (_client, agreed, _server, upgraded) = connect("mqttv3.1").await;
        assert_eq!(agreed.as_deref(), Some("mqttv3.1"));
        assert_eq!(upgraded.subprotocol, "mqttv3.1");

        let (_client, agreed, _server, _) = connect("chat, mqttv3.1, mqtt").await;
        assert_eq!(agreed.as_deref(), Some("mqtt"));
    }

    #[tokio::test]
    async fn refusals() {
        let request = |from: &str, to: &str| {
            assert!(REQUEST.contains(from), "{from}");
            REQUEST.replacen(from, to, 1).into_bytes()
        };
        /// A request, the status it gets, and the error it is refused with.
        type Case = (Vec<u8>, &'static str, fn(&WsError) -> bool);
        let cases: Vec<Case> = vec![
            (
                request("GET /mqtt ", "GET /other?mqtt "),
                "404 ",
                |e| matches!(e, WsError::Path(p) if p == "/other"),
            ),
            (
                request("Sec-WebSocket-Protocol: mqtt\r\n", ""),
                "400 ",
                |e| matches!(e, WsError::Subprotocol),
            ),
            (
                request(
                    "Sec-WebSocket-Protocol: mqtt",
                    "Sec-WebSocket-Protocol: chat, MQTT",
                ),
                "400 ",
                |e| matches!(e, WsError::Subprotocol),
            ),
            (request("GET ", "POST "), "405 ", |e| {
                matches!(e, WsError::Request(_))
            }),
            (
                request("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                "426 ",
                |e| matches!(e, WsError::Request(_)),
            ),
            (
                request("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                "400 ",
                |e| matches!(e, WsError::Request(_)),
            ),
            (
                request("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZR=="),
                "400 ",
                |e| matches!(e, WsError::Request(_)),
            ),
            (request("Upgrade: websocket\r\n", ""), "400 ", |e| {
                matches!(e, WsError::Request(_))
            }),
            (request("keep-alive, Upgrade", "keep-alive"), "400 ", |e| {
                matches!(e, WsError::Request(_))
            }),
            (request("HTTP/1.1", "HTTP/1.0"), "400 ", |e| {
                matches!(e, WsError::Request(_))
            }),
            (
                b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c".to_vec(),
                "400 ",
                |e| matches!(e, WsError::Request(_)),
            ),
        ];
        for (bytes, status, expected) in cases {
            let (response, result) = raw_request(WsOptions::default(), &bytes).await;
            let shown = String::from_utf8_lossy(&bytes);
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status}")),
                "{shown}: {response}"
            );
            assert!(response.contains("\r\nConnection: close\r\n"), "{response}");
            let error = result.expect_err("refused");
            assert!(expected(&error), "{shown}: {error:?}");
            if status == "426 " {
                assert!(
                    response.contains("\r\nSec-WebSocket-Version: 13\r\n"),
                    "{response}"
                );
            }
            if matches!(error, WsError::Subprotocol) {
                assert!(
                    response.ends_with("subprotocol `mqtt` is required\n"),
                    "{response}"
                );
            }
        }
    }

    #[tokio::test]
    async fn oversized_and_unfinished_requests() {
        let options = WsOptions {
            max_request_bytes: 512,
            ..WsOptions::default()
        };
        // Exactly the limit, without the end of the head: all read, then refused.
        let mut head = REQUEST.trim_end().as_bytes().to_vec();
        head.extend_from_slice(b"\r\nX-Padding: ");
        head.resize(512, b'a');
        let (response, result) = raw_request(options, &head).await;
        assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
        assert!(matches!(result, Err(WsError::Request(_))), "{result:?}");

        // The peer closes before the end of its head.
        let (addr, server) = serve_one(WsOptions::default()).await;
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client
            .write_all(&REQUEST.as_bytes()[..40])
            .await
            .expect("write");
        client.shutdown().await.expect("shutdown");
        assert!(matches!(joined(server).await, Err(WsError::Closed)));
    }

    #[tokio::test]
    async fn binary_messages_arrive_as_bytes() {
        let (mut client, _, mut server, _) = connect("mqtt").await;
        // Two packets in one message.
        let two = b"\xc0\x00\x30\x05\x00\x01tx".to_vec();
        client
            .send(Message::binary(two.clone()))
            .await
            .expect("send");
        let mut got = vec![0; two.len()];
        within(server.read_exact(&mut got)).await.expect("read");
        assert_eq!(got, two);

        // One packet in three messages.
        let packet = b"\x30\x0a\x00\x03a/bhello".to_vec();
        for part in [&packet[..1], &packet[1..5], &packet[5..]] {
            client
                .send(Message::binary(part.to_vec()))
                .await
                .expect("send");
        }
        let mut got = vec![0; packet.len()];
        within(server.read_exact(&mut got)).await.expect("read");
        assert_eq!(got, packet);

        // One message in three frames, a ping between them.
        let parts: [(&[u8], OpCode, bool); 3] = [
            (&packet[..3], OpCode::Data(Data::Binary), false),
            (&packet[3..4], OpCode::Data(Data::Continue), false),
            (&packet[4..], OpCode::Data(Data::Continue), true),
        ];
        for (i, (part, opcode, last)) in parts.into_iter().enumerate() {
            let frame = Frame::message(part.to_vec(), opcode, last);
            client.send(Message::Frame(frame)).await.expect("send");
            if i == 1 {
                client
                    .send(Message::Ping(b"between".to_vec().into()))
                    .await
                    .expect("ping");
            }
        }
        let mut got = vec![0; packet.len()];
        within(server.read_exact(&mut got)).await.expect("read");
        assert_eq!(got, packet);
        match within(client.next()).await {
            Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"between"),
            other => panic!("no pong: {other:?}"),
        }

        // Frames of the 16-bit and 64-bit length forms, read through small buffers.
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        client
            .send(Message::binary(big[..300].to_vec()))
            .await
            .expect("send");
        client
            .send(Message::binary(big[300..].to_vec()))
            .await
            .expect("send");
        let mut got = Vec::new();
        let mut sizes = [1usize, 2, 3, 5, 7, 4096].iter().cycle();
        while got.len() < big.len() {
            let mut buf = vec![0; *sizes.next().expect("cycle")];
            let n = within(server.read(&mut buf)).await.expect("read");
            assert!(n > 0, "end of stream after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, big);
    }

    #[tokio::test]
    async fn ping_is_answered_without_writes() {
        let (mut client, _, mut server, _) = connect("mqtt").await;
        // The server only reads, as an MQTT connection waiting for a packet does.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let n = server.read(&mut buf).await.expect("read");
            buf[..n].to_vec()
        });
        client
            .send(Message::Ping(b"are you there".to_vec().into()))
            .await
            .expect("ping");
        match within(client.next()).await {
            Some(Ok(Message::Pong(payload))) => assert_eq!(&payload[..], b"are you there"),
            other => panic!("no pong: {other:?}"),
        }
        client
            .send(Message::Ping(Vec::new().into()))
            .await
            .expect("ping");
        match within(client.next()).await {
            Some(Ok(Message::Pong(payload))) => assert!(payload.is_empty()),
            other => panic!("no pong: {other:?}"),
        }
        client
            .send(Message::binary(b"\xc0\x00".to_vec()))
            .await
            .expect("send");
        assert_eq!(joined(reader).await, b"\xc0\x00");
    }

    #[tokio::test]
    async fn only_the_latest_ping_is_answered() {
        let (mut client, mut server) = raw_upgrade(&[]).await;
        let mut bytes = masked(0x89, b"first");
        bytes.extend(masked(0x89, b"second"));
        bytes.extend(masked(0x82, b"\xd0\x00"));
        client.write_all(&bytes).await.expect("write");
        // One read takes all three frames (a pipe hands over all it holds).
        let mut buf = [0u8; 64];
        let n = within(server.read(&mut buf)).await.expect("read");
        assert_eq!(&buf[..n], b"\xd0\x00");
        // The pong went out during the read, and its box with it.
        assert!(server.control.is_none());
        assert_eq!(read_frame(&mut client).await, (0x8a, b"second".to_vec()));
        // Nothing else was sent before the close reply.
        client
            .write_all(&masked(0x88, &1000u16.to_be_bytes()))
            .await
            .expect("write");
        assert_eq!(within(server.read(&mut buf)).await.expect("read"), 0);
        assert_eq!(
            read_frame(&mut client).await,
            (0x88, 1000u16.to_be_bytes().to_vec())
        );
    }

    #[tokio::test]
    async fn close_is_answered_then_end_of_stream() {
        let (mut client, _, mut server, _) = connect("mqtt").await;
        client
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "bye".into(),
            })))
            .await
            .expect("close");
        let mut buf = [0u8; 16];
        assert_eq!(within(server.read(&mut buf)).await.expect("read"), 0);
        assert_eq!(within(server.read(&mut buf)).await.expect("read"), 0);
        let reply = next_message(&mut client).await;
        assert_eq!(close_code(&reply), Some(1001), "{reply:?}");
        assert!(server.write_all(b"late").await.is_err());
        server.shutdown().await.expect("shutdown");
        assert!(within(client.next()).await.is_none_or(|m| m.is_err()));
    }

    #[tokio::test]
    async fn data_before_a_close_is_read_first() {
        let (mut client, mut server) = raw_upgrade(&[]).await;
        let mut bytes = masked(0x82, b"\xe0\x00");
        bytes.extend(masked(0x88, &[]));
        client.write_all(&bytes).await.expect("write");
        let mut buf = [0u8; 8];
        let n = within(server.read(&mut buf)).await.expect("read");
        assert_eq!(&buf[..n], b"\xe0\x00");
        assert_eq!(within(server.read(&mut buf)).await.expect("read"), 0);
        // An empty close is answered with an empty close.
        assert_eq!(read_frame(&mut client).await, (0x88, Vec::new()));
    }

    #[tokio::test]
    async fn text_frame_closes_with_1003() {
        let (mut client, _, mut server, _) = connect("mqtt").await;
        client
            .send(Message::text("{\"mqtt\": 3}"))
            .await
            .expect("send");
        let mut buf = [0u8; 16];
        let error = within(server.read(&mut buf))
            .await
            .expect_err("text refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        let reply = next_message(&mut client).await;
        assert_eq!(close_code(&reply), Some(1003), "{reply:?}");
    }

    #[tokio::test]
    async fn protocol_violations_close_with_1002() {
        let mut fragmented_ping = masked(0x09, b"a");
        fragmented_ping.extend(masked(0x80, b"b"));
        let mut long_length = vec![0x82, 0xff];
        long_length.extend_from_slice(&(1u64 << 63).to_be_bytes());
        long_length.extend_from_slice(&[1, 2, 3, 4]);
        let mut binary_in_binary = masked(0x02, b"a");
        binary_in_binary.extend(masked(0x82, b"b"));
        for frames in [
            frame(0x82, b"\xc0\x00", None),
            masked(0xc2, b"\xc0\x00"),
            masked(0x83, b"x"),
            masked(0x8b, b""),
            masked(0x80, b"x"),
            fragmented_ping,
            masked(0x89, &[0; 126]),
            masked(0x88, &[0x03]),
            masked(0x88, &1005u16.to_be_bytes()),
            masked(0x88, &999u16.to_be_bytes()),
            long_length,
            binary_in_binary,
        ] {
            violation(&frames, 1002).await;
        }
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.extend_from_slice(b"\xff\xfe");
        violation(&masked(0x88, &bad_reason), 1007).await;
    }

    #[tokio::test]
    async fn bytes_sent_with_the_request_are_kept() {
        let mut early = masked(0x82, b"\x10\x02ab");
        early.extend(masked(0x89, b"p"));
        let (mut client, mut server) = raw_upgrade(&early).await;
        let mut buf = [0u8; 4];
        within(server.read_exact(&mut buf)).await.expect("read");
        assert_eq!(&buf, b"\x10\x02ab");
        client.write_all(&masked(0x82, b"cd")).await.expect("write");
        within(server.read_exact(&mut buf[..2]))
            .await
            .expect("read");
        assert_eq!(&buf[..2], b"cd");
        assert_eq!(read_frame(&mut client).await, (0x8a, b"p".to_vec()));
    }

    #[tokio::test]
    async fn writes_arrive_as_binary_messages() {
        let (mut client, _, mut server, _) = connect("mqtt").await;
        server.write_all(b"\x20\x02\x00\x00").await.expect("write");
        server.flush().await.expect("flush");
        assert_eq!(
            next_message(&mut client).await,
            Message::binary(b"\x20\x02\x00\x00".to_vec())
        );

        // Larger than the socket takes at once: vectored writes taken in part.
        let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.expect("write");
            server.shutdown().await.expect("shutdown");
            server
        });
        let mut got = Vec::new();
        loop {
            match next_message(&mut client).await {
                Message::Binary(payload) => {
                    assert!(payload.len() <= MAX_WRITE_FRAME);
                    got.extend_from_slice(&payload);
                }
                message => {
                    assert_eq!(close_code(&message), Some(1000), "{message:?}");
                    break;
                }
            }
        }
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
        let server = joined(writer).await;
        assert!(server.out.is_empty() && server.out.capacity() == 0);
        assert!(server.control.is_none());
    }

    #[tokio::test]
    async fn partial_writes_keep_frames_intact() {
        // A pipe that takes at most 1000 bytes at a time.
        let (mut client, mut server) = connect_duplex(1000).await;
        let big: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 241) as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.expect("write");
            server.flush().await.expect("flush");
            assert!(server.out.capacity() == 0, "buffer given back");
            server.write_all(b"end").await.expect("write");
            server.flush().await.expect("flush");
            server
        });
        let mut got = Vec::new();
        let mut frames = 0;
        while got.len() < expected.len() + 3 {
            match next_message(&mut client).await {
                Message::Binary(payload) => {
                    frames += 1;
                    got.extend_from_slice(&payload);
                }
                message => panic!("unexpected {message:?}"),
            }
        }
        assert_eq!(frames, 5, "four frames of at most 64 KiB, then one");
        assert_eq!(&got[expected.len()..], b"end");
        got.truncate(expected.len());
        assert!(got == expected);
        joined(writer).await;
    }

    /// A stream that takes at most `limit` bytes per write, and says it writes vectored.
    struct Trickle {
        inner: DuplexStream,
        limit: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut joined = Vec::new();
            for buf in bufs {
                let room = self.limit - joined.len();
                joined.extend_from_slice(&buf[..buf.len().min(room)]);
            }
            Pin::new(&mut self.inner).poll_write(cx, &joined)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn vectored_writes_taken_in_part() {
        // 3: the first write ends inside a frame header; 1000: inside a payload.
        for limit in [3, 1000] {
            let (mut client, far) = tokio::io::duplex(4096);
            client.write_all(REQUEST.as_bytes()).await.expect("write");
            let far = Trickle { inner: far, limit };
            let (mut server, _) = within(accept(far, &WsOptions::default()))
                .await
                .expect("handshake");
            read_response_head(&mut client).await;
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 239) as u8).collect();
            let expected = data.clone();
            let writer = tokio::spawn(async move {
                for chunk in data.chunks(30_000) {
                    server.write_all(chunk).await.expect("write");
                }
                server.flush().await.expect("flush");
                server
            });
            let mut got = Vec::new();
            while got.len() < expected.len() {
                let (first, payload) = read_frame(&mut client).await;
                assert_eq!(first, 0x82, "limit {limit}");
                got.extend_from_slice(&payload);
            }
            assert!(got == expected, "limit {limit}");
            let server = joined(writer).await;
            assert_eq!(server.out.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn shutdown_sends_close_1000() {
        let (mut client, _, mut server, _) = connect("mqtt").await;
        server.shutdown().await.expect("shutdown");
        let message = next_message(&mut client).await;
        assert_eq!(close_code(&message), Some(1000), "{message:?}");
    }

    #[tokio::test]
    async fn end_of_tcp_stream() {
        let (mut client, mut server) = raw_upgrade(&[]).await;
        client
            .write_all(&masked(0x82, b"ab")[..4])
            .await
            .expect("write");
        drop(client);
        let mut buf = [0u8; 8];
        let error = within(server.read(&mut buf)).await.expect_err("mid-frame");
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        let (client, mut server) = raw_upgrade(&[]).await;
        drop(client);
        assert_eq!(within(server.read(&mut buf)).await.expect("read"), 0);
    }

    #[test]
    fn an_idle_stream_is_small() {
        let tcp = std::mem::size_of::<TcpStream>();
        let ws = std::mem::size_of::<WsStream<TcpStream>>();
        println!("size_of TcpStream = {tcp}, WsStream<TcpStream> = {ws}");
        assert!(
            ws <= tcp + 100,
            "TcpStream {tcp} bytes, WsStream<TcpStream> {ws} bytes"
        );
    }

    #[test]
    fn keys() {
        assert!(valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(valid_key("AAAAAAAAAAAAAAAAAAAAAA=="));
        assert!(!valid_key("dGhlIHNhbXBsZSBub25jZR=="), "bits past 16 bytes");
        assert!(!valid_key("dGhlIHNhbXBsZSBub25jZQ="));
        assert!(!valid_key("dGhlIHNhbXBsZSBub25j*Q=="));
        assert!(!valid_key(""));
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().expect("ip")).collect()
    }

    #[test]
    fn forwarded_for_entries() {
        let parsed = forwarded_addresses(&[
            "garbage",
            "203.0.113.1",
            "10.0.0.1:80",
            "[2001:db8::1]:4711",
            "[2001:db8::2]",
        ]);
        assert_eq!(
            parsed,
            ips(&["203.0.113.1", "10.0.0.1", "2001:db8::1", "2001:db8::2"])
        );
        assert_eq!(
            forwarded_addresses(&["1.2.3.4", "unknown", "5.6.7.8"]),
            ips(&["5.6.7.8"])
        );
        assert!(forwarded_addresses(&["5.6.7.8", ""]).is_empty());
        let many: Vec<String> = (0..100).map(|i| format!("10.0.0.{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let parsed = forwarded_addresses(&many);
        assert_eq!(parsed.len(), MAX_FORWARDED);
        assert_eq!(parsed.last(), Some(&"10.0.0.99".parse().expect("ip")));
    }

    #[test]
    fn client_address_rules() {
        let trusted: Vec<IpNet> = ["10.0.0.0/8", "2001:db8:1::/48"]
            .iter()
            .map(|n| n.parse().expect("net"))
            .collect();
        let ip = |a: &str| -> IpAddr { a.parse().expect("ip") };
        // An untrusted peer: its header is not believed.
        assert_eq!(
            client_addr(ip("198.51.100.1"), &ips(&["203.0.113.5"]), &trusted),
            ip("198.51.100.1")
        );
        // A trusted proxy without a header.
        assert_eq!(client_addr(ip("10.1.1.1"), &[], &trusted), ip("10.1.1.1"));
        // A trusted proxy: the rightmost untrusted entry, however much the client made up.
        assert_eq!(
            client_addr(ip("10.1.1.1"), &ips(&["203.0.113.5"]), &trusted),
            ip("203.0.113.5")
        );
        assert_eq!(
            client_addr(
                ip("10.1.1.1"),
                &ips(&["1.1.1.1", "203.0.113.5", "2001:db8:1::9", "10.2.2.2"]),
                &trusted
            ),
            ip("203.0.113.5")
        );
        // All trusted: the leftmost.
        assert_eq!(
            client_addr(ip("10.1.1.1"), &ips(&["10.3.3.3", "10.2.2.2"]), &trusted),
            ip("10.3.3.3")
        );
        // An IPv4-mapped peer (a dual-stack listener) counts as IPv4.
        assert_eq!(
            client_addr(
                ip("::ffff:10.1.1.1"),
                &ips(&["::ffff:203.0.113.5"]),
                &trusted
            ),
            ip("203.0.113.5")
        );
        // Nothing trusted.
        assert_eq!(
            client_addr(ip("10.1.1.1"), &ips(&["203.0.113.5"]), &[]),
            ip("10.1.1.1")
        );
    }
}
