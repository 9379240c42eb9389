//! A server-side TLS stream on rustls' unbuffered API, so that an idle TLS connection holds no
//! buffer: rustls' buffered `ServerConnection` (what tokio-rustls wraps) keeps a 4 KiB read
//! buffer for the connection's whole life, about 40 % of what an idle TLS connection costs.
//!
//! Here every buffer exists only while bytes are in it: TLS bytes are read into the stack and
//! kept on the heap only when a record arrives in parts; decrypted bytes the reader has not
//! taken yet, and encrypted bytes the socket has not taken yet, are kept until they are gone.
//! [`accept`] runs the handshake; the [`TlsStream`] it returns is read and written by one task.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;
/// Most plaintext put into one TLS record by one write (TLS records carry at most 16 KiB).
const WRITE_CHUNK: usize = 16 * 1024;
/// Encrypted bytes held for the socket before a write waits for them to go out.
const OUTGOING_MAX: usize = 64 * 1024;

/// A TLS connection over `S` whose handshake is complete.
pub struct TlsStream<S> {
    io: S,
    conn: UnbufferedServerConnection,
    /// TLS bytes received and not yet processed (a record in parts); empty while idle.
    incoming: Vec<u8>,
    /// Decrypted bytes the reader has not taken yet; empty while idle.
    plain: BytesMut,
    /// Encrypted bytes the socket has not taken yet; empty while idle.
    outgoing: BytesMut,
    /// The peer has closed its side (close_notify or end of stream).
    read_closed: bool,
    /// Our close_notify is queued.
    close_sent: bool,
    /// rustls failed: it must not be asked to process anything again (it would panic on a
    /// second fatal alert); only what it queued before is still written.
    failed: bool,
}

/// Runs the TLS handshake of `io` with `config`. Failures are `InvalidData` errors carrying the
/// `rustls::Error`, or the socket's own errors (`UnexpectedEof` when the peer left).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    config: Arc<ServerConfig>,
) -> io::Result<TlsStream<S>> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid)?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Vec::new(),
        plain: BytesMut::new(),
        outgoing: BytesMut::new(),
        read_closed: false,
        close_sent: false,
        failed: false,
    };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// Appends what `encode` writes to `out`, asking it first how much room it needs.
fn encode_into(
    out: &mut BytesMut,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> io::Result<()> {
    let start = out.len();
    let size = match encode(&mut []) {
        // Nothing to write (an empty record).
        Ok(_) => return Ok(()),
        Err(EncodeError::InsufficientSize(e)) => e.required_size,
        Err(error) => return Err(io::Error::other(error.to_string())),
    };
    out.resize(start + size, 0);
    match encode(&mut out[start..]) {
        Ok(written) => {
            out.truncate(start + written);
            Ok(())
        }
        Err(error) => {
            out.truncate(start);
            Err(io::Error::other(error.to_string()))
        }
    }
}

/// The error of every operation after rustls failed.
fn failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the TLS connection failed earlier",
    )
}

fn invalid(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

impl<S> TlsStream<S> {
    /// The socket under it.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The rustls connection (peer certificates, protocol version, ...).
    pub fn connection(&self) -> &UnbufferedServerConnection {
        &self.conn
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream<S> {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(error) = self.process() {
                // The alert rustls queued for the peer, if the socket takes it now.
                let _ = self.poll_write_outgoing(cx);
                return Poll::Ready(Err(error));
            }
            ready!(self.poll_write_outgoing(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read_closed || ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Runs rustls over the received bytes until it needs more: decrypted data goes to
    /// `plain`, what it has to send to `outgoing`; a peer's close sets `read_closed`.
    fn process(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(failed());
        }
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let done = match state {
                Err(error) => {
                    self.failed = true;
                    self.encode_alert();
                    return Err(invalid(error));
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        self.plain
                            .extend_from_slice(record.map_err(invalid)?.payload);
                    }
                    false
                }
                // Early data is not enabled; should a client send some anyway, it is the
                // start of the stream.
                Ok(ConnectionState::ReadEarlyData(mut early)) => {
                    while let Some(record) = early.next_record() {
                        self.plain
                            .extend_from_slice(record.map_err(invalid)?.payload);
                    }
                    false
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    encode_into(&mut self.outgoing, |out| encode.encode(out))?;
                    false
                }
                // The records are in `outgoing`, which is written before anything else.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    false
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    self.read_closed = true;
                    true
                }
                // BlockedHandshake (more bytes needed), WriteTraffic (nothing to do).
                Ok(_) => true,
            };
            self.incoming.drain(..discard);
            if done {
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
                return Ok(());
            }
        }
    }

    /// After an error: the alert rustls queued for the peer, into `outgoing`. Only while it has
    /// something queued: called again, rustls would process the offending bytes again and
    /// panic on a second fatal alert.
    fn encode_alert(&mut self) {
        while self.conn.wants_write() {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming);
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = state else {
                return;
            };
            if encode_into(&mut self.outgoing, |out| encode.encode(out)).is_err() {
                return;
            }
        }
    }

    /// Reads what the socket has into `incoming`; `Ready(Ok(0))` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        self.incoming.extend_from_slice(buf.filled());
        Poll::Ready(Ok(buf.filled().len()))
    }

    /// Writes `outgoing` until it is empty (`Ready`) or the socket is full (`Pending`).
    fn poll_write_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.outgoing.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing.advance(n);
        }
        self.outgoing = BytesMut::new();
        Poll::Ready(Ok(()))
    }

    /// Encrypts `data` (at most [`WRITE_CHUNK`] of it) into `outgoing`; how much was taken.
    fn encrypt(&mut self, data: &[u8], close: bool) -> io::Result<usize> {
        let data = &data[..data.len().min(WRITE_CHUNK)];
        if self.failed {
            return Err(failed());
        }
        // Whatever rustls has queued first (a key update it owes, ...). Most writes find
        // nothing: the received bytes were all processed when they were read.
        if self.conn.wants_write() {
            self.process()?;
        }
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        let taken = match state.map_err(invalid)? {
            ConnectionState::WriteTraffic(mut traffic) => {
                let start = self.outgoing.len();
                // Record header, padding and tag: a few dozen bytes; asked for when more.
                let mut size = data.len() + 64;
                loop {
                    self.outgoing.resize(start + size, 0);
                    let out = &mut self.outgoing[start..];
                    let result = if close {
                        traffic.queue_close_notify(out)
                    } else {
                        traffic.encrypt(data, out)
                    };
                    match result {
                        Ok(written) => {
                            self.outgoing.truncate(start + written);
                            break data.len();
                        }
                        Err(EncryptError::InsufficientSize(e)) if e.required_size > size => {
                            size = e.required_size;
                        }
                        Err(error) => {
                            self.outgoing.truncate(start);
                            return Err(io::Error::other(error.to_string()));
                        }
                    }
                }
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS connection not ready for application data",
                ))
            }
        };
        self.incoming.drain(..discard);
        Ok(taken)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plain.is_empty() {
                let n = this.plain.len().min(buf.remaining());
                buf.put_slice(&this.plain[..n]);
                this.plain.advance(n);
                if this.plain.is_empty() {
                    this.plain = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            this.process()?;
            // Whatever rustls answered (a key update, an alert), if the socket takes it now;
            // a full socket is the writer's business.
            if let Poll::Ready(Err(error)) = this.poll_write_outgoing(cx) {
                return Poll::Ready(Err(error));
            }
            if !this.plain.is_empty() || this.read_closed {
                continue;
            }
            if ready!(this.poll_fill(cx))? == 0 {
                this.read_closed = true;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() >= OUTGOING_MAX {
            ready!(this.poll_write_outgoing(cx))?;
        }
        let taken = this.encrypt(data, false)?;
        if let Poll::Ready(Err(error)) = this.poll_write_outgoing(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(taken))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && !this.failed {
            this.close_sent = true;
            this.encrypt(&[], true)?;
        }
        ready!(this.poll_write_outgoing(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use testkit::tls::{client_config, Ca, Validity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn server_config(ca: &Ca) -> Arc<ServerConfig> {
        let leaf = ca.server(&["localhost"], Validity::Now);
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .expect("server config");
        Arc::new(config)
    }

    type Client = tokio_rustls::client::TlsStream<tokio::io::DuplexStream>;

    /// A server stream and a client whose handshake completed, over a pipe that takes 1 KiB
    /// at a time.
    async fn connected_pair() -> (TlsStream<tokio::io::DuplexStream>, Client) {
        let ca = Ca::new("tls_stream test CA");
        let (client_io, server_io) = tokio::io::duplex(1024);
        let connector = tokio_rustls::TlsConnector::from(client_config(&ca.pem(), None));
        let name = ServerName::try_from("localhost").expect("name");
        let (server, client) = tokio::join!(
            accept(server_io, server_config(&ca)),
            connector.connect(name, client_io)
        );
        (server.expect("server"), client.expect("client"))
    }

    /// Large writes both ways through a pipe that takes 1 KiB at a time (partial writes of
    /// every record), then nothing held while idle, then close_notify seen by the client.
    #[tokio::test]
    async fn carries_large_writes_and_holds_no_buffer_while_idle() {
        let (mut server, mut client) = connected_pair().await;

        let down: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let up: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
        let (mut got_down, mut got_up) = (vec![0u8; down.len()], vec![0u8; up.len()]);
        let (a, b) = tokio::join!(
            async {
                server.write_all(&down).await?;
                server.flush().await
            },
            client.read_exact(&mut got_down),
        );
        a.expect("server write");
        b.expect("client read");
        let (c, d) = tokio::join!(
            async {
                client.write_all(&up).await?;
                client.flush().await
            },
            server.read_exact(&mut got_up),
        );
        c.expect("client write");
        d.expect("server read");
        assert!(got_down == down, "server to client intact");
        assert!(got_up == up, "client to server intact");
        assert_eq!(
            (
                server.incoming.capacity(),
                server.plain.capacity(),
                server.outgoing.capacity()
            ),
            (0, 0, 0),
            "an idle TLS stream holds no buffer"
        );

        server.shutdown().await.expect("close_notify");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("clean end");
        assert!(rest.is_empty());
        eprintln!(
            "TlsStream<TcpStream>: {} bytes",
            std::mem::size_of::<TlsStream<tokio::net::TcpStream>>()
        );
    }

    /// Garbage after the handshake: the read fails, and everything after (reads, writes, the
    /// shutdown that sends close_notify) fails or ends cleanly without asking rustls again.
    #[tokio::test]
    async fn garbage_after_the_handshake_fails_once_and_for_all() {
        let (mut server, mut client) = connected_pair().await;
        client
            .get_mut()
            .0
            .write_all(&[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5])
            .await
            .expect("garbage record");
        let mut buf = [0u8; 64];
        let error = server
            .read(&mut buf)
            .await
            .expect_err("undecryptable record");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(server.read(&mut buf).await.is_err());
        assert!(server.write(b"x").await.is_err());
        server
            .shutdown()
            .await
            .expect("shutdown without close_notify");
    }

    /// Garbage instead of a ClientHello: an InvalidData error carrying rustls' error (the
    /// listener counts it by reason), and no panic.
    #[tokio::test]
    async fn garbage_fails_the_handshake_with_the_rustls_error() {
        let ca = Ca::new("tls_stream test CA");
        let (mut client_io, server_io) = tokio::io::duplex(1024);
        client_io
            .write_all(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
            .await
            .expect("write");
        let error = accept(server_io, server_config(&ca))
            .await
            .err()
            .expect("not TLS");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .is_some());
    }
}
