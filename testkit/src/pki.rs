//! A throwaway certificate authority for TLS tests, as files: a CA, server certificates for the
//! names a test connects to, and client certificates (the client id as common name), written
//! as PEM files into a temporary directory. Built on [`crate::tls::Ca`].

use std::path::{Path, PathBuf};

use crate::temp::{temp_dir, TempDir};
use crate::tls::{Ca, Validity};

/// A test CA and the directory its PEM files go to (removed on drop).
pub struct TestPki {
    /// Holds `ca.crt` and every certificate and key written without another directory.
    dir: TempDir,
    /// Signs everything else.
    ca: Ca,
}

/// The PEM files of one certificate and its private key.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA named `label`, with its certificate written to [`TestPki::ca_file`].
    pub fn new(label: &str) -> Self {
        let dir = temp_dir(&format!("pki-{label}"));
        let ca = Ca::new(&format!("Heartwire test CA {label}"));
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write ca.crt");
        Self { dir, ca }
    }

    /// The directory of the CA's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate (PEM), what clients and servers trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A server certificate for `names` (DNS names or IP addresses), as `server.crt` and
    /// `server.key` in [`TestPki::dir`].
    pub fn server(&self, names: &[&str]) -> CertFiles {
        let (cert, key) = self
            .ca
            .server(names, Validity::Now)
            .write(self.dir.path(), "server");
        CertFiles { cert, key }
    }

    /// A client certificate with common name `name`, as `<name>.crt` and `<name>.key` in `dir`
    /// (the layout of device-sim's `--cert-dir`).
    pub fn client_in(&self, dir: &Path, name: &str) -> CertFiles {
        let (cert, key) = self.ca.client(name, &[], Validity::Now).write(dir, name);
        CertFiles { cert, key }
    }

    /// A client certificate with common name `name` in [`TestPki::dir`].
    pub fn client(&self, name: &str) -> CertFiles {
        self.client_in(self.dir.path(), name)
    }
}
