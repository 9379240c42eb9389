//! A throwaway certificate authority for TLS tests: a CA, server certificates for the names a
//! test connects to, and client certificates (the client id as common name), written as PEM
//! files into a temporary directory. Keys are ECDSA P-256 (rcgen's default, ring).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::temp::{temp_dir, TempDir};

/// A test CA and the directory its PEM files go to (removed on drop).
pub struct TestPki {
    /// Holds `ca.crt` and every certificate and key written without another directory.
    dir: TempDir,
    /// The CA's certificate and key, which sign everything else.
    ca: CertifiedIssuer<'static, KeyPair>,
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
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail(e));
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Heartwire test CA {label}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap_or_else(|e| fail(e));
        let ca = CertifiedIssuer::self_signed(params, key).unwrap_or_else(|e| fail(e));
        write(&dir.path().join("ca.crt"), &ca.pem());
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
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap_or_else(|e| fail(e));
        params
            .distinguished_name
            .push(DnType::CommonName, "heartwire test server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(&params, self.dir.path(), "server")
    }

    /// A client certificate with common name `name`, as `<name>.crt` and `<name>.key` in `dir`
    /// (the layout of device-sim's `--cert-dir`).
    pub fn client_in(&self, dir: &Path, name: &str) -> CertFiles {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| fail(e));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&params, dir, name)
    }

    /// A client certificate with common name `name` in [`TestPki::dir`].
    pub fn client(&self, name: &str) -> CertFiles {
        self.client_in(self.dir.path(), name)
    }

    fn issue(&self, params: &CertificateParams, dir: &Path, stem: &str) -> CertFiles {
        let key = KeyPair::generate().unwrap_or_else(|e| fail(e));
        let cert = params.signed_by(&key, &self.ca).unwrap_or_else(|e| fail(e));
        let files = CertFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        write(&files.cert, &cert.pem());
        write(&files.key, &key.serialize_pem());
        files
    }
}

fn write(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

fn fail(e: rcgen::Error) -> ! {
    panic!("generating a test certificate: {e}")
}
