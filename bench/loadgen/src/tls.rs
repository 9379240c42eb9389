//! TLS for the connections of the `idle` and `connect-rate` scenarios (`--tls`): one rustls
//! client configuration per process (ring provider), and [`Stream`], a connection that is plain
//! TCP or TLS.
//!
//! The configuration trusts only `--cafile` and presents `--cert`/`--key` when given. Session
//! resumption is off: every connection makes a full handshake, the broker's worst case and the
//! same work for every broker; a load generator that resumed would measure its own cache.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context, Result};
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::cli::Common;

/// The process's TLS client: the configuration, and the name to verify if not the host's.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    /// `--tls-server-name`, or `None` to verify each connection's `--host` entry.
    server_name: Option<ServerName<'static>>,
}

impl Tls {
    /// The TLS client of `--tls`, or `None` without it.
    pub fn from_common(common: &Common) -> Result<Option<Self>> {
        if !common.tls {
            for (flag, set) in [
                ("--cafile", common.cafile.is_some()),
                ("--cert", common.cert.is_some()),
                ("--tls-server-name", common.tls_server_name.is_some()),
            ] {
                if set {
                    bail!("{flag} needs --tls");
                }
            }
            return Ok(None);
        }
        let Some(cafile) = &common.cafile else {
            bail!("--tls needs --cafile PATH, the PEM CA certificate that signed the broker's");
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certs(cafile)?);
        if added == 0 {
            bail!("{}: no usable CA certificate", cafile.display());
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
        let mut config = match (&common.cert, &common.key) {
            (Some(cert), Some(key)) => {
                let der = PrivateKeyDer::from_pem_file(key)
                    .with_context(|| format!("reading the private key {}", key.display()))?;
                builder
                    .with_client_auth_cert(certs(cert)?, der)
                    .with_context(|| {
                        format!(
                            "client certificate {} with key {}",
                            cert.display(),
                            key.display()
                        )
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        let server_name = common
            .tls_server_name
            .as_deref()
            .map(|n| {
                ServerName::try_from(n)
                    .map(|n| n.to_owned())
                    .with_context(|| {
                        format!("--tls-server-name {n:?} is not a DNS name or IP address")
                    })
            })
            .transpose()?;
        Ok(Some(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        }))
    }

    /// The TLS handshake over `tcp`, verifying `host` (an IP address or a DNS name) unless
    /// `--tls-server-name` names another.
    pub async fn handshake(&self, tcp: TcpStream, host: &str) -> Result<Stream> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::try_from(host)
                .with_context(|| format!("host {host:?} is not a DNS name or IP address"))?
                .to_owned(),
        };
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// Every certificate of a PEM file (at least one).
fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate in the file", path.display());
    }
    Ok(certs)
}

/// A connection to the broker: plain TCP or TLS over TCP.
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: a TLS session is far larger than a TCP stream.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
