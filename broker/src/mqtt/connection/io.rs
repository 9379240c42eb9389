//! A connection's byte stream and its on-demand buffers: reading packets (within the
//! broker-wide read budget), writing what is queued, and nothing about what packets mean.
//!
//! Generic over the [`Transport`], so that TLS and WebSocket streams plug in next to TCP
//! without touching the rest of the connection.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use crate::labels::PacketType;
use crate::metrics::metrics;
use crate::mqtt::budget::ByteBudget;
use crate::mqtt::codec::{self, encode, CodecError, ConnackCode};
use crate::mqtt::packet::{Packet, Protocol};

/// Bytes asked of the stream per read call while no large packet is arriving.
pub const READ_CHUNK: usize = 4096;
/// Longest wait for the stream's closing bytes (TLS close_notify, WebSocket close frame).
const SHUTDOWN_WAIT: Duration = Duration::from_millis(500);
/// Largest single read while a large packet arrives.
const READ_MAX: usize = 64 * 1024;

/// A byte stream a client connects over: TCP, or TLS or WebSocket over it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for S {}

/// Why reading a packet failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The client closed the stream.
    #[error("connection closed by peer")]
    Closed,
    /// The stream failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a valid packet.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The stream with its on-demand buffers.
pub struct Io<S> {
    stream: S,
    /// Received bytes not yet decoded; empty (unallocated) while idle.
    pub rbuf: BytesMut,
    /// Encoded packets not yet written; empty (unallocated) while idle.
    pub wbuf: BytesMut,
    /// u32 (`mqtt.max_packet_size` is at most 268,435,455): every byte of an idle connection
    /// counts.
    max_packet_size: u32,
    /// Bytes of `mqtt.max_buffered_read_bytes` held for the large packet now arriving.
    reserved: u32,
    /// The protocol level, once the CONNECT said it.
    pub protocol: Option<Protocol>,
    /// A DISCONNECT is queued: the connection ends once it is written.
    pub said_goodbye: bool,
    /// The reason code of that DISCONNECT, recorded on the connection's history row.
    pub goodbye_code: Option<u8>,
}

impl<S: Transport> Io<S> {
    /// `stream` with empty buffers, decoding packets of at most `max_packet_size`.
    pub fn new(stream: S, max_packet_size: usize) -> Self {
        Self {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            max_packet_size: u32::try_from(max_packet_size).unwrap_or(u32::MAX),
            reserved: 0,
            protocol: None,
            said_goodbye: false,
            goodbye_code: None,
        }
    }

    /// The connection's protocol level (3.1.1 until the CONNECT said otherwise).
    pub fn level(&self) -> Protocol {
        self.protocol.unwrap_or_default()
    }

    /// Total size of the packet at the start of the read buffer, once its fixed header is in.
    pub fn frame_len(&self) -> Option<usize> {
        codec::frame_length(&self.rbuf)
    }

    /// Holds read budget for the packet now arriving when it is larger than one read chunk, and
    /// gives back what a completed packet no longer needs. False when the budget is exhausted:
    /// the connection must not read until some is released.
    pub fn settle_budget(&mut self, budget: &ByteBudget, freed: &Notify) -> bool {
        let need = self
            .frame_len()
            .filter(|f| *f > READ_CHUNK && *f <= self.max_packet_size as usize + 5)
            .unwrap_or(0);
        let reserved = self.reserved as usize;
        if need > reserved {
            if !budget.try_reserve(need - reserved) {
                return false;
            }
        } else if need < reserved {
            budget.release(reserved - need);
            freed.notify_waiters();
        }
        // At most max_packet_size + 5, which fits.
        self.reserved = u32::try_from(need).unwrap_or(u32::MAX);
        true
    }

    /// Gives back the read budget held (the connection is closing).
    pub fn release_budget(&mut self, budget: &ByteBudget, freed: &Notify) {
        if self.reserved > 0 {
            budget.release(self.reserved as usize);
            self.reserved = 0;
            freed.notify_waiters();
        }
    }

    /// One read into the read buffer. `Ready(Ok(0))` is the end of the stream.
    pub fn poll_read_once(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rbuf.is_empty() {
            // Nothing buffered: read into the stack, so that waiting for bytes holds no buffer
            // (an idle connection spends most of its life here).
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            return match Pin::new(&mut self.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    // A whole chunk, as a read into the buffer would take: exact-size copies
                    // of small packets fragment the heap (about 0.1 KiB more RSS per idle
                    // connection in bench/idle-connections.sh).
                    self.rbuf.reserve(READ_CHUNK);
                    self.rbuf.extend_from_slice(buf.filled());
                    Poll::Ready(Ok(buf.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            };
        }
        let missing = self
            .frame_len()
            .map_or(0, |frame| frame.saturating_sub(self.rbuf.len()));
        let want = missing.clamp(READ_CHUNK, READ_MAX);
        if self.rbuf.capacity() - self.rbuf.len() < want / 4 {
            self.rbuf.reserve(want);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.rbuf)
    }

    /// The next complete packet in the read buffer, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, CodecError> {
        let before = self.rbuf.len();
        let packet = codec::read_packet(
            &mut self.rbuf,
            self.max_packet_size as usize,
            &mut self.protocol,
        )?;
        if let Some(p) = &packet {
            let size = before - self.rbuf.len();
            metrics().received.count(p.packet_type(), 1, size);
        }
        if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
            // Give the buffer back while the connection is idle.
            self.rbuf = BytesMut::new();
        }
        Ok(packet)
    }

    /// Reads until one packet is complete (used for CONNECT), within the read budget.
    pub async fn read_packet(
        &mut self,
        budget: &ByteBudget,
        freed: &Notify,
    ) -> Result<Packet, ReadError> {
        loop {
            if let Some(packet) = self.next_packet()? {
                return Ok(packet);
            }
            while !self.settle_budget(budget, freed) {
                let released = freed.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if self.settle_budget(budget, freed) {
                    break;
                }
                metrics().read_budget_waits.inc();
                released.await;
            }
            if poll_fn(|cx| self.poll_read_once(cx)).await? == 0 {
                return match self.next_packet()? {
                    Some(packet) => Ok(packet),
                    None => Err(ReadError::Closed),
                };
            }
        }
    }

    /// Writes as much of the write buffer as the stream takes now. `Ready(Ok(n))` once it is
    /// all out (n bytes this call); `Pending` (registered for writability) with bytes left, `n`
    /// of them written meanwhile in `written`.
    pub fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        written: &mut usize,
    ) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            match Pin::new(&mut self.stream).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    let _ = self.wbuf.split_to(n);
                    *written += n;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.wbuf = BytesMut::new();
        // A stream that buffers (TLS) pushes its records out here; TCP has nothing to do.
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Writes the whole write buffer, waiting for the stream as needed.
    pub async fn write_all(&mut self) -> io::Result<()> {
        let mut written = 0;
        poll_fn(|cx| self.poll_write_out(cx, &mut written)).await
    }

    /// Closes the stream the way its protocol does (TLS close_notify, WebSocket close frame,
    /// TCP FIN), then reads and discards until the peer has closed its side too (its WebSocket
    /// close frame or end of stream), so that the peer's last writes are not answered with a
    /// reset. Gives up after [`SHUTDOWN_WAIT`] in all (a peer that neither reads nor closes).
    pub async fn shutdown(&mut self) {
        self.rbuf = BytesMut::new();
        if !self.said_goodbye {
            self.wbuf = BytesMut::new();
        }
        let goodbye = async {
            // A server DISCONNECT still buffered goes out first.
            self.write_all().await?;
            poll_fn(|cx| Pin::new(&mut self.stream).poll_shutdown(cx)).await?;
            let mut sink = [0u8; 512];
            loop {
                let mut buf = ReadBuf::new(&mut sink);
                poll_fn(|cx| Pin::new(&mut self.stream).poll_read(cx, &mut buf)).await?;
                if buf.filled().is_empty() {
                    return Ok::<(), io::Error>(());
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, goodbye).await;
    }

    /// Queues a packet of type `kind` that `write` encodes at the connection's level.
    pub fn send(&mut self, kind: PacketType, write: impl FnOnce(&mut BytesMut, Protocol)) {
        let before = self.wbuf.len();
        let level = self.level();
        write(&mut self.wbuf, level);
        let size = self.wbuf.len() - before;
        metrics().sent.count(kind, 1, size);
    }

    /// Queues a PUBACK, PUBREC, PUBREL or PUBCOMP with an MQTT 5 reason code.
    pub fn ack(&mut self, kind: PacketType, pkid: u16, code: u8) {
        self.send(kind, |buf, level| {
            encode::write_ack(buf, level, kind, pkid, code)
        });
    }

    /// Queues a server DISCONNECT with `code` (MQTT 5 only: a 3.1.1 connection is just
    /// closed).
    pub fn disconnect(&mut self, code: u8, reason_string: Option<&str>) {
        if self.level() == Protocol::V5 && !self.said_goodbye {
            self.said_goodbye = true;
            self.goodbye_code = Some(code);
            self.send(PacketType::Disconnect, |buf, _| {
                encode::write_disconnect(buf, code, reason_string)
            });
        }
    }

    /// Writes a refusal CONNACK and gives the peer a moment to read it before closing.
    pub async fn refuse(&mut self, code: ConnackCode, reason_string: Option<&str>) {
        let mut properties = encode::Properties::default();
        if let Some(text) = reason_string {
            properties.string(encode::property::REASON_STRING, text);
        }
        self.send(PacketType::ConnAck, |buf, level| {
            encode::write_connack(buf, level, code, false, &properties)
        });
        self.flush_before_close().await;
    }

    /// Gives the peer a moment to read what is buffered (a refusal, a DISCONNECT) before the
    /// connection closes.
    pub async fn flush_before_close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.write_all()).await;
    }
}
