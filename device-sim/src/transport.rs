//! How devices reach the broker: plain MQTT over TCP, MQTT over TLS (`--tls`), over WebSocket
//! (`--ws`) or over WebSocket on TLS (`--wss`).
//!
//! A [`Transport`] is built once per process from the [`Settings`] of the command line: for TLS
//! it reads the CA (`--cafile`) and, with `--cert`/`--key`, the one client certificate of every
//! device, into one shared rustls [`ClientConfig`] (ring provider). With `--cert-dir` each
//! device has its own certificate: [`Transport::link`] reads `<client_id>.crt` and
//! `<client_id>.key` when the device starts and gives the device a copy of the shared
//! configuration with only the client certificate changed; the device keeps that [`Link`] for
//! its reconnections and nothing else is cached.
//!
//! TLS session resumption is off: every connect is a full handshake (the broker's worst case,
//! what a storm should measure), and a cache shared by the devices of a process would let one
//! device resume a session opened with another device's certificate.
//!
//! `--tls-server-name` changes the name the broker's certificate is verified against (by
//! default the `--host` a device connects to, an IP address or a DNS name). rumqttc derives the
//! TLS server name from the host, so the name is swapped in by a verifier that wraps webpki's
//! ([`FixedName`]); the SNI extension still carries the host when it is a DNS name (none is
//! sent for an IP address).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::TlsConfiguration;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// What can go wrong while setting up a transport or a device's link.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why (I/O or PEM syntax).
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{path}: no PEM certificate in the file")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// `--cafile` holds nothing rustls accepts as a trust anchor.
    #[error("{path}: no usable CA certificate ({rejected} rejected)")]
    NoCa {
        /// The file.
        path: PathBuf,
        /// Certificates in the file that could not be parsed.
        rejected: usize,
    },
    /// A client certificate and its key do not form a usable pair.
    #[error("client certificate {cert} with key {key}: {source}")]
    ClientCert {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason (unsupported key type, key does not match the certificate, ...).
        source: rustls::Error,
    },
    /// `--tls-server-name` is neither a DNS name nor an IP address.
    #[error("--tls-server-name {0:?} is not a valid DNS name or IP address")]
    ServerName(String),
    /// `--cert-dir` is not a readable directory.
    #[error("--cert-dir {path}: {source}")]
    CertDir {
        /// The directory.
        path: PathBuf,
        /// Why it is unusable.
        source: std::io::Error,
    },
    /// rustls refused the configuration (no usable protocol version, verifier error).
    #[error("building the TLS configuration: {0}")]
    Config(String),
    /// The blocking task that reads a device's certificate did not complete.
    #[error("loading a device certificate: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The way to the broker (`--tls`, `--ws`, `--wss`, or none of them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// MQTT over TCP.
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Kind {
    /// Whether the transport uses TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Kind::Tls | Kind::Wss)
    }

    /// Whether the transport is a WebSocket.
    pub fn is_ws(self) -> bool {
        matches!(self, Kind::Ws | Kind::Wss)
    }
}

/// The client certificate the devices present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCert {
    /// None (the broker does not ask for one, or the run tests a refusal).
    None,
    /// One certificate for every device (`--cert`, `--key`).
    Shared {
        /// PEM certificate chain, the device's certificate first.
        cert: PathBuf,
        /// PEM private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// One per device (`--cert-dir`): `<client_id>.crt` and `<client_id>.key` in this directory.
    PerDevice(PathBuf),
}

/// The transport options of the command line, checked ([`crate::cli::RunArgs::transport`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Which transport.
    pub kind: Kind,
    /// HTTP path of the WebSocket endpoint (`--ws-path`).
    pub ws_path: String,
    /// PEM CA certificates that verify the broker (required with TLS: no system roots).
    pub cafile: Option<PathBuf>,
    /// The client certificate, if any.
    pub client_cert: ClientCert,
    /// The name the broker's certificate must carry, if not the host connected to.
    pub server_name: Option<String>,
}

/// The TLS part of a [`Transport`].
#[derive(Debug)]
struct Tls {
    /// The process's configuration: trust anchors, verifier, the shared client certificate.
    config: Arc<ClientConfig>,
    /// `--cert-dir`, when every device has its own certificate.
    cert_dir: Option<PathBuf>,
    /// The crypto provider, which parses per-device keys.
    provider: Arc<CryptoProvider>,
}

/// The transport proper, with the TLS configuration where it has one.
#[derive(Debug)]
enum Way {
    Tcp,
    Ws,
    Tls(Tls),
    Wss(Tls),
}

/// How this process's devices connect; built once per process, shared by its devices.
#[derive(Debug)]
pub struct Transport {
    way: Way,
    /// The WebSocket path, shared by every device's [`Link`].
    ws_path: Arc<str>,
}

/// One device's way to the broker: what its rumqttc options need at each connect.
#[derive(Clone)]
pub struct Link {
    /// rumqttc's transport, with the process's TLS configuration or this device's copy.
    transport: rumqttc::Transport,
    ws_path: Arc<str>,
}

impl Transport {
    /// Reads the CA and the shared client certificate and builds the TLS configuration, if the
    /// transport uses TLS; checks that `--cert-dir` is a readable directory.
    pub fn new(settings: &Settings) -> Result<Self, TransportError> {
        let way = match settings.kind {
            Kind::Tcp => Way::Tcp,
            Kind::Ws => Way::Ws,
            Kind::Tls => Way::Tls(Tls::new(settings)?),
            Kind::Wss => Way::Wss(Tls::new(settings)?),
        };
        Ok(Self {
            way,
            ws_path: Arc::from(settings.ws_path.as_str()),
        })
    }

    /// A plain TCP transport.
    #[cfg(test)]
    pub fn tcp() -> Self {
        Self {
            way: Way::Tcp,
            ws_path: Arc::from(""),
        }
    }

    /// The link of device `client_id`: with `--cert-dir`, reads its certificate and key (on a
    /// blocking thread) into a copy of the process's TLS configuration.
    pub async fn link(&self, client_id: &str) -> Result<Link, TransportError> {
        let transport = match &self.way {
            Way::Tcp => rumqttc::Transport::Tcp,
            Way::Ws => rumqttc::Transport::Ws,
            Way::Tls(tls) => rumqttc::Transport::Tls(tls.for_device(client_id).await?),
            Way::Wss(tls) => rumqttc::Transport::Wss(tls.for_device(client_id).await?),
        };
        Ok(Link {
            transport,
            ws_path: Arc::clone(&self.ws_path),
        })
    }
}

impl Link {
    /// The broker address rumqttc's options (3.1.1 or 5) take for `host:port` over this link:
    /// the host, or for a WebSocket the URL.
    pub fn address(&self, host: &str, port: u16) -> String {
        match &self.transport {
            rumqttc::Transport::Ws => url("ws", host, port, &self.ws_path),
            rumqttc::Transport::Wss(_) => url("wss", host, port, &self.ws_path),
            _ => host.to_owned(),
        }
    }

    /// rumqttc's transport (both protocol levels take the same one).
    pub fn transport(&self) -> rumqttc::Transport {
        self.transport.clone()
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.transport {
            rumqttc::Transport::Tls(_) => "tls",
            rumqttc::Transport::Ws => "ws",
            rumqttc::Transport::Wss(_) => "wss",
            _ => "tcp",
        };
        f.debug_struct("Link").field("transport", &kind).finish()
    }
}

/// The WebSocket URL of `host:port` with `path` (an IPv6 address goes in brackets).
pub fn url(scheme: &str, host: &str, port: u16, path: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("{scheme}://[{host}]:{port}{path}")
    } else {
        format!("{scheme}://{host}:{port}{path}")
    }
}

/// The certificate and key files of device `client_id` in `dir`.
pub fn device_files(dir: &Path, client_id: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{client_id}.crt")),
        dir.join(format!("{client_id}.key")),
    )
}

impl Tls {
    /// The configuration of device `client_id`: the process's, or with `--cert-dir` a copy
    /// with the device's own certificate (read on a blocking thread).
    async fn for_device(&self, client_id: &str) -> Result<TlsConfiguration, TransportError> {
        let Some(dir) = &self.cert_dir else {
            return Ok(TlsConfiguration::Rustls(Arc::clone(&self.config)));
        };
        let (dir, id, provider) = (
            dir.clone(),
            client_id.to_owned(),
            Arc::clone(&self.provider),
        );
        let key = tokio::task::spawn_blocking(move || {
            let (cert, key) = device_files(&dir, &id);
            certified_key(&cert, &key, &provider)
        })
        .await??;
        let mut own = ClientConfig::clone(&self.config);
        own.client_auth_cert_resolver = Arc::new(SingleCertAndKey::from(key));
        Ok(TlsConfiguration::Rustls(Arc::new(own)))
    }

    fn new(settings: &Settings) -> Result<Self, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let Some(cafile) = &settings.cafile else {
            // RunArgs::check makes --cafile required with TLS.
            return Err(TransportError::Config(
                "TLS needs --cafile (the PEM CA that signed the broker's certificate)".into(),
            ));
        };
        let roots = Arc::new(roots(cafile)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &settings.server_name {
            None => webpki,
            Some(name) => Arc::new(FixedName {
                name: ServerName::try_from(name.as_str())
                    .map_err(|_| TransportError::ServerName(name.clone()))?
                    .to_owned(),
                inner: webpki,
            }),
        };
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let (mut config, cert_dir) = match &settings.client_cert {
            ClientCert::None => (builder.with_no_client_auth(), None),
            ClientCert::Shared { cert, key } => {
                let key = certified_key(cert, key, &provider)?;
                (
                    builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key))),
                    None,
                )
            }
            ClientCert::PerDevice(dir) => {
                std::fs::read_dir(dir).map_err(|source| TransportError::CertDir {
                    path: dir.clone(),
                    source,
                })?;
                // Each device's link replaces the resolver with its own certificate.
                (builder.with_no_client_auth(), Some(dir.clone()))
            }
        };
        config.resumption = Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            cert_dir,
            provider,
        })
    }
}

/// The trust anchors of `cafile`.
fn roots(cafile: &Path) -> Result<RootCertStore, TransportError> {
    let certs = read_certs(cafile)?;
    let mut roots = RootCertStore::empty();
    let (added, rejected) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TransportError::NoCa {
            path: cafile.to_owned(),
            rejected,
        });
    }
    Ok(roots)
}

/// Every certificate of a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let pem = |source| TransportError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TransportError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// A client certificate chain and its private key, checked to belong together.
fn certified_key(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TransportError> {
    let chain = read_certs(cert)?;
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TransportError::Pem {
        path: key.to_owned(),
        source,
    })?;
    CertifiedKey::from_der(chain, der, provider).map_err(|source| TransportError::ClientCert {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })
}

/// Verifies the broker's certificate against a fixed name (`--tls-server-name`) instead of the
/// host the device connected to; everything else is webpki's verification.
struct FixedName {
    /// The name the certificate must carry.
    name: ServerName<'static>,
    /// webpki's verifier with the `--cafile` roots.
    inner: Arc<WebPkiServerVerifier>,
}

impl fmt::Debug for FixedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FixedName")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rustls::server::WebPkiClientVerifier;
    use rustls::ServerConfig;
    use testkit::{CertFiles, TestPki};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    impl Link {
        /// The TLS configuration of this link, if it has one.
        fn tls_config(&self) -> Option<Arc<ClientConfig>> {
            match &self.transport {
                rumqttc::Transport::Tls(TlsConfiguration::Rustls(c))
                | rumqttc::Transport::Wss(TlsConfiguration::Rustls(c)) => Some(Arc::clone(c)),
                _ => None,
            }
        }
    }

    fn settings(kind: Kind, pki: &TestPki) -> Settings {
        Settings {
            kind,
            ws_path: "/mqtt".to_owned(),
            cafile: Some(pki.ca_file()),
            client_cert: ClientCert::None,
            server_name: None,
        }
    }

    fn error_of(result: Result<Transport, TransportError>) -> String {
        match result {
            Ok(t) => panic!("expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[tokio::test]
    async fn options_carry_the_transport_and_the_broker_address() {
        let pki = TestPki::new("options");
        for (kind, addr) in [
            (Kind::Tcp, "127.0.0.1"),
            (Kind::Tls, "127.0.0.1"),
            (Kind::Ws, "ws://127.0.0.1:8083/mqtt"),
            (Kind::Wss, "wss://127.0.0.1:8083/mqtt"),
        ] {
            let transport = Transport::new(&settings(kind, &pki)).expect("transport");
            let link = transport.link("dev-1").await.expect("link");
            assert_eq!(link.address("127.0.0.1", 8083), addr, "{kind:?}");
            assert_eq!(link.tls_config().is_some(), kind.is_tls(), "{kind:?}");
        }
        assert_eq!(url("ws", "::1", 80, "/m"), "ws://[::1]:80/m");
        assert_eq!(url("wss", "broker", 443, "/"), "wss://broker:443/");
    }

    #[tokio::test]
    async fn one_configuration_per_process_and_a_copy_per_device_with_cert_dir() {
        let pki = TestPki::new("share");
        let shared = pki.client("everyone");
        let mut s = settings(Kind::Tls, &pki);
        s.client_cert = ClientCert::Shared {
            cert: shared.cert,
            key: shared.key,
        };
        let transport = Transport::new(&s).expect("transport");
        let (a, b) = (
            transport.link("dev-1").await.expect("link"),
            transport.link("dev-2").await.expect("link"),
        );
        let (a, b) = (a.tls_config().expect("tls"), b.tls_config().expect("tls"));
        assert!(Arc::ptr_eq(&a, &b), "--cert: one configuration for all");
        assert!(a.client_auth_cert_resolver.has_certs());
        let resumption = format!("{:?}", a.resumption);
        assert!(
            resumption.contains("NoClientSessionStorage") && resumption.contains("Disabled"),
            "{resumption}"
        );

        let devices = testkit::temp_dir("certs");
        pki.client_in(devices.path(), "dev-1");
        s.client_cert = ClientCert::PerDevice(devices.path().to_owned());
        let transport = Transport::new(&s).expect("transport");
        let own = transport.link("dev-1").await.expect("dev-1 has files");
        let own = own.tls_config().expect("tls");
        assert!(own.client_auth_cert_resolver.has_certs());
        let Err(missing) = transport.link("dev-2").await else {
            panic!("dev-2 has no certificate");
        };
        assert!(missing.to_string().contains("dev-2.crt"), "{missing}");
    }

    #[test]
    fn bad_files_and_names_are_reported_with_the_file() {
        let pki = TestPki::new("bad");
        let mut s = settings(Kind::Wss, &pki);
        s.cafile = Some(pki.dir().join("nowhere.pem"));
        assert!(error_of(Transport::new(&s)).contains("nowhere.pem"));

        let client = pki.client("c");
        s.cafile = Some(client.key.clone());
        assert!(error_of(Transport::new(&s)).contains("no PEM certificate"));

        let other = pki.client("other");
        let mut s = settings(Kind::Tls, &pki);
        s.client_cert = ClientCert::Shared {
            cert: client.cert.clone(),
            key: other.key,
        };
        let e = error_of(Transport::new(&s));
        assert!(e.contains("c.crt") && e.contains("other.key"), "{e}");

        let mut s = settings(Kind::Tls, &pki);
        s.server_name = Some("not a name".to_owned());
        assert!(error_of(Transport::new(&s)).contains("--tls-server-name"));

        let mut s = settings(Kind::Tls, &pki);
        s.client_cert = ClientCert::PerDevice(pki.dir().join("missing-dir"));
        assert!(error_of(Transport::new(&s)).contains("--cert-dir"));
    }

    /// A TLS server on one end of an in-memory pipe: its certificate is for `localhost` only,
    /// and with `client_ca` it requires a client certificate from that CA. Returns the
    /// client certificate it saw, if any.
    async fn serve(
        stream: tokio::io::DuplexStream,
        server: CertFiles,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<CertificateDer<'static>>, std::io::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = read_certs(&server.cert).expect("server cert");
        let key = PrivateKeyDer::from_pem_file(&server.key).expect("server key");
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(&ca).expect("roots")),
                    provider,
                )
                .build()
                .expect("client verifier"),
            ),
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(chain, key).expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let mut tls = acceptor.accept(stream).await?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first().cloned());
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        tls.write_all(&byte).await?;
        tls.flush().await?;
        Ok(peer)
    }

    /// Connects like rumqttc does (the server name is the host, here 127.0.0.1) and exchanges
    /// one byte; returns the client certificate the server saw.
    async fn handshake(
        link: &Link,
        server: CertFiles,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<CertificateDer<'static>>, String> {
        let (client_end, server_end) = tokio::io::duplex(64 * 1024);
        let server_task = tokio::spawn(serve(server_end, server, client_ca));
        let config = link.tls_config().expect("a TLS link");
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::try_from("127.0.0.1").expect("IP address");
        let client = async {
            let mut tls = connector.connect(name, client_end).await?;
            tls.write_all(b"x").await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            Ok::<_, std::io::Error>(())
        };
        let result = tokio::time::timeout(testkit::WAIT, client)
            .await
            .map_err(|_| "handshake timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let served = server_task.await.map_err(|e| e.to_string())?;
        result?;
        served.map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn the_server_name_option_verifies_a_localhost_certificate_at_127_0_0_1() {
        let pki = TestPki::new("name");
        let server = pki.server(&["localhost"]);
        let plain = Transport::new(&settings(Kind::Tls, &pki)).expect("transport");
        let link = plain.link("dev-1").await.expect("link");
        let refused = handshake(&link, server.clone(), None).await;
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("certificate")),
            "{refused:?}"
        );

        let mut s = settings(Kind::Tls, &pki);
        s.server_name = Some("localhost".to_owned());
        let named = Transport::new(&s).expect("transport");
        let link = named.link("dev-1").await.expect("link");
        assert_eq!(handshake(&link, server, None).await, Ok(None));

        // A broker certificate from another CA is refused whatever the name.
        let stranger = TestPki::new("stranger").server(&["localhost"]);
        assert!(handshake(&link, stranger, None).await.is_err());
    }

    #[tokio::test]
    async fn each_device_presents_its_own_certificate_from_cert_dir() {
        let pki = TestPki::new("mutual");
        let server = pki.server(&["127.0.0.1"]);
        let devices = testkit::temp_dir("device-certs");
        let mine = pki.client_in(devices.path(), "dev-7");
        pki.client_in(devices.path(), "dev-8");
        let mut s = settings(Kind::Tls, &pki);
        s.client_cert = ClientCert::PerDevice(devices.path().to_owned());
        let transport = Transport::new(&s).expect("transport");
        let link = transport.link("dev-7").await.expect("link");
        let seen = handshake(&link, server.clone(), Some(pki.ca_file()))
            .await
            .expect("mutual TLS handshake");
        assert_eq!(seen, Some(read_certs(&mine.cert).expect("cert").remove(0)));

        // Without a client certificate the server refuses the handshake.
        let anonymous = Transport::new(&settings(Kind::Tls, &pki)).expect("transport");
        let link = anonymous.link("dev-7").await.expect("link");
        assert!(handshake(&link, server, Some(pki.ca_file())).await.is_err());
    }
}
