//! TLS for the MQTT listeners (`mqtt.tls`, shared by `mqtt.wss`): the rustls server
//! configuration built from the certificate files (ring provider, no OpenSSL), replaced as a
//! whole on reload so that open connections keep theirs; the reason a handshake failed; the
//! identity in a verified client certificate.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{IdentitySource, TlsConfig, TlsVersion};
use crate::labels::HandshakeFailure;

/// Why the TLS configuration could not be built. Each message names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A file's contents are not what the key needs.
    #[error("{key}: {}: {message}", path.display())]
    Contents {
        /// The configuration key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A key that the listener needs is not set.
    #[error("{0} is not set")]
    Missing(&'static str),
    /// rustls refused the combination (for example a key that does not match the certificate).
    #[error("{key}: {message}")]
    Rejected {
        /// The configuration key most likely at fault.
        key: &'static str,
        /// What rustls said.
        message: String,
    },
}

/// The TLS server configuration in force, and the settings to rebuild it from.
pub struct Tls {
    settings: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads the certificate files of `settings`.
    pub fn load(settings: &TlsConfig) -> Result<Self, TlsError> {
        let config = server_config(settings)?;
        Ok(Self {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on success new handshakes use them (open connections keep the
    /// configuration they started with), on failure the previous one stays in force. Reads
    /// files: call it off the async runtime.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.settings)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The configuration in force, for a new handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether a client must present a valid certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.settings.require_client_cert
    }

    /// Which part of a client certificate names the device.
    pub fn identity_source(&self) -> IdentitySource {
        self.settings.identity
    }
}

/// The rustls server configuration of `settings`.
fn server_config(settings: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let cert_file = settings
        .cert_file
        .as_deref()
        .ok_or(TlsError::Missing("mqtt.tls.cert_file"))?;
    let key_file = settings
        .key_file
        .as_deref()
        .ok_or(TlsError::Missing("mqtt.tls.key_file"))?;
    let certs = certificates("mqtt.tls.cert_file", cert_file)?;
    let key = private_key(key_file)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rejected {
            key: "mqtt.tls.min_version",
            message: e.to_string(),
        })?;
    let builder = match &settings.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("mqtt.tls.client_ca_file", path)? {
                roots.add(cert).map_err(|e| TlsError::Contents {
                    key: "mqtt.tls.client_ca_file",
                    path: path.clone(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError::Rejected {
                key: "mqtt.tls.client_ca_file",
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Rejected {
            key: "mqtt.tls.key_file",
            message: format!("the key does not fit the certificate of mqtt.tls.cert_file: {e}"),
        })
}

/// Every certificate in the PEM file at `path`; at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Contents {
            key,
            path: path.to_owned(),
            message: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Contents {
            key,
            path: path.to_owned(),
            message: "no certificate in it (expected PEM blocks BEGIN CERTIFICATE)".to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key in the PEM file at `path` (PKCS#8, PKCS#1 or SEC1).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = "mqtt.tls.key_file";
    let bytes = read(key, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Contents {
        key,
        path: path.to_owned(),
        message: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no private key in it (expected PEM BEGIN PRIVATE KEY, BEGIN RSA PRIVATE KEY or \
                 BEGIN EC PRIVATE KEY)"
                    .to_owned()
            }
            other => format!("invalid PEM: {other}"),
        },
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// Why a TLS handshake that ended with `error` failed.
pub fn failure(error: &io::Error) -> HandshakeFailure {
    use rustls::{Error as E, PeerIncompatible as P};
    if let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<E>()) {
        return match tls {
            E::InvalidMessage(_) => HandshakeFailure::NotTls,
            E::NoCertificatesPresented => HandshakeFailure::NoCertificate,
            E::InvalidCertificate(_) => HandshakeFailure::BadCertificate,
            E::AlertReceived(_) => HandshakeFailure::ClientAlert,
            E::PeerIncompatible(
                P::Tls12NotOffered
                | P::Tls12NotOfferedOrEnabled
                | P::Tls13RequiredForQuic
                | P::SupportedVersionsExtensionRequired,
            ) => HandshakeFailure::TlsVersion,
            _ => HandshakeFailure::Tls,
        };
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => HandshakeFailure::Closed,
        _ => HandshakeFailure::Tls,
    }
}

/// The identity named by the leaf of a verified client certificate chain: its subject common
/// name or its first DNS name or URI, as `source` says. `None` without a certificate or when
/// the certificate has no such name.
pub fn identity(chain: Option<&[CertificateDer<'_>]>, source: IdentitySource) -> Option<String> {
    let leaf = chain?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    match source {
        IdentitySource::CommonName => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentitySource::San => {
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                _ => None,
            })
        }
    }
}
