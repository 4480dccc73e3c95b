//! A private certificate authority for a run's hosts (`tandem tls-certs`): TLS and mTLS
//! without an external PKI.
//!
//! The first [`issue`] into a folder creates the CA (`ca.pem`, `ca.key`); every call
//! issues one certificate (`NAME.pem`, `NAME.key`) for the given hosts, valid for both
//! server and client authentication, signed by that CA. Private keys are written
//! readable by their owner only ([`crate::secret::write_private`]).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The common name of every CA this module creates.
pub const CA_NAME: &str = "Tandem run CA";

/// What can go wrong issuing a certificate; messages name the field (and its flag) or
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A field of the [`Request`] cannot be used.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("{what} {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The key or certificate could not be made (or the CA key could not be read).
    #[error("{0}")]
    Certificate(String),
}

/// One certificate to issue.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// Base name of its files, `NAME.pem` and `NAME.key`: a plain file name other than
    /// `ca`.
    pub name: &'a str,
    /// The DNS names and IP addresses it is valid for (at least one).
    pub hosts: &'a [String],
    /// Days it (and a CA created now) stays valid (at least 1).
    pub days: u32,
}

/// The files [`issue`] wrote or used.
#[derive(Clone, Debug, PartialEq)]
pub struct Issued {
    /// Whether this call created the CA (else an existing `ca.key` signed).
    pub ca_created: bool,
    pub ca_pem: PathBuf,
    pub ca_key: PathBuf,
    /// The certificate and its private key.
    pub pem: PathBuf,
    pub key: PathBuf,
}

impl Request<'_> {
    fn validate(&self) -> Result<(), CaError> {
        let invalid = |m: String| Err(CaError::Invalid(m));
        if self.hosts.is_empty() || self.hosts.iter().any(|h| h.trim().is_empty()) {
            return invalid(
                "hosts (--host): give at least one non-empty DNS name or IP address".into(),
            );
        }
        if self.days == 0 {
            return invalid("days (--days) must be at least 1".into());
        }
        let n = self.name;
        if n.is_empty() || n.contains(['/', '\\']) || n == "ca" {
            return invalid(format!(
                "name (--name) {n:?}: a plain file name other than `ca`"
            ));
        }
        Ok(())
    }
}

/// Issues `req`'s certificate into `dir` (created if missing), signed by the CA there,
/// which is created first when `dir` holds no `ca.key`. An existing `NAME.pem` or
/// `NAME.key` is never overwritten.
pub fn issue(dir: &Path, req: &Request) -> Result<Issued, CaError> {
    req.validate()?;
    std::fs::create_dir_all(dir).map_err(|cause| io("creating", dir, cause))?;
    let issued = Issued {
        ca_created: false,
        ca_pem: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        pem: dir.join(format!("{}.pem", req.name)),
        key: dir.join(format!("{}.key", req.name)),
    };
    for p in [&issued.pem, &issued.key] {
        if p.exists() {
            return Err(CaError::Invalid(format!(
                "{} exists; pick another name (--name) or remove it",
                p.display()
            )));
        }
    }
    let (ca_key, ca_created) = ca_key(&issued, req.days)?;
    let issuer = Issuer::new(ca_params(req.days)?, ca_key);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = leaf_params(req)?
        .signed_by(&key, &issuer)
        .map_err(cert_err)?;
    crate::secret::write_private(&issued.key, &key.serialize_pem())
        .map_err(|cause| io("writing", &issued.key, cause))?;
    std::fs::write(&issued.pem, cert.pem()).map_err(|cause| io("writing", &issued.pem, cause))?;
    tracing::debug!(cert = %issued.pem.display(), hosts = ?req.hosts, "issued a certificate");
    Ok(Issued {
        ca_created,
        ..issued
    })
}

/// The CA's key: read from `ca.key`, or made now with its certificate `ca.pem`.
fn ca_key(files: &Issued, days: u32) -> Result<(KeyPair, bool), CaError> {
    if files.ca_key.exists() {
        let text = std::fs::read_to_string(&files.ca_key)
            .map_err(|cause| io("reading", &files.ca_key, cause))?;
        let key = KeyPair::from_pem(&text)
            .map_err(|e| CaError::Certificate(format!("{}: {e}", files.ca_key.display())))?;
        return Ok((key, false));
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = ca_params(days)?.self_signed(&key).map_err(cert_err)?;
    crate::secret::write_private(&files.ca_key, &key.serialize_pem())
        .map_err(|cause| io("writing", &files.ca_key, cause))?;
    std::fs::write(&files.ca_pem, cert.pem())
        .map_err(|cause| io("writing", &files.ca_pem, cause))?;
    Ok((key, true))
}

/// The CA's parameters; rebuilt identically to sign with an existing CA key.
fn ca_params(days: u32) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, days);
    Ok(p)
}

/// A host's certificate: its names, server and client authentication.
fn leaf_params(req: &Request) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::new(req.hosts.to_vec())
        .map_err(|e| CaError::Invalid(format!("hosts (--host): {e}")))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, req.name);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut p, req.days);
    Ok(p)
}

/// Valid from an hour ago (clocks differ between hosts) for `days`.
fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days as i64);
}

fn io(what: &'static str, path: &Path, cause: std::io::Error) -> CaError {
    CaError::Io {
        what,
        path: path.to_path_buf(),
        cause,
    }
}

fn cert_err(e: rcgen::Error) -> CaError {
    CaError::Certificate(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio_rustls::rustls;
    use tokio_rustls::rustls::client::danger::ServerCertVerifier;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-ca-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn hosts() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into()]
    }

    /// Whether `cert` verifies against `ca` as a server named `host`, and as a client.
    fn verifies(ca: &Path, cert: &Path, host: &str) -> (bool, bool) {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(ca).unwrap())
            .unwrap();
        let roots = Arc::new(roots);
        let leaf = CertificateDer::from_pem_file(cert).unwrap();
        let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap()
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(host.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .is_ok();
        let client = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .unwrap()
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .is_ok();
        (server, client)
    }

    #[test]
    fn certificates_chain_to_the_ca_for_their_hosts_only() {
        let dir = tempdir("chain");
        let hosts = hosts();
        let req = |name| Request {
            name,
            hosts: &hosts,
            days: 30,
        };
        let first = issue(&dir, &req("node")).unwrap();
        assert!(first.ca_created);
        let ca_pem = std::fs::read_to_string(&first.ca_pem).unwrap();
        let second = issue(&dir, &req("second")).unwrap();
        assert!(!second.ca_created, "a second certificate made a new CA");
        assert_eq!(std::fs::read_to_string(&second.ca_pem).unwrap(), ca_pem);
        for issued in [&first, &second] {
            assert_eq!(
                verifies(&issued.ca_pem, &issued.pem, "localhost"),
                (true, true)
            );
            assert!(verifies(&issued.ca_pem, &issued.pem, "127.0.0.1").0);
            assert!(!verifies(&issued.ca_pem, &issued.pem, "example.com").0);
        }
        // Another folder's CA does not vouch for these certificates.
        let other = tempdir("other");
        let foreign = issue(&other, &req("node")).unwrap();
        assert_eq!(
            verifies(&foreign.ca_pem, &first.pem, "localhost"),
            (false, false)
        );
        // The files load as a process's TLS material, mTLS included.
        let tls = crate::tls::TlsFiles {
            ca: Some(first.ca_pem.clone()),
            cert: Some(first.pem.clone()),
            key: Some(first.key.clone()),
            client_auth: true,
        }
        .load()
        .unwrap();
        assert!(tls.server().is_some() && tls.client().is_some());
        #[cfg(unix)]
        for key in [&first.ca_key, &first.key, &second.key] {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                std::fs::metadata(key).unwrap().mode() & 0o777,
                0o600,
                "{}",
                key.display()
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn bad_requests_name_the_field_and_nothing_is_overwritten() {
        let dir = tempdir("bad");
        let hosts = hosts();
        let err = |name: &str, hosts: &[String], days| {
            issue(&dir, &Request { name, hosts, days })
                .unwrap_err()
                .to_string()
        };
        assert!(err("node", &[], 1).contains("--host"));
        assert!(err("node", &[" ".into()], 1).contains("--host"));
        assert!(err("node", &hosts, 0).contains("--days"));
        for name in ["", "ca", "a/b", "a\\b"] {
            assert!(err(name, &hosts, 1).contains("--name"), "{name:?}");
        }
        assert!(!dir.exists(), "a refused request wrote files");
        let first = issue(
            &dir,
            &Request {
                name: "node",
                hosts: &hosts,
                days: 1,
            },
        )
        .unwrap();
        let before = std::fs::read_to_string(&first.pem).unwrap();
        let e = err("node", &hosts, 1);
        assert!(e.contains("node.pem exists") && e.contains("--name"), "{e}");
        assert_eq!(std::fs::read_to_string(&first.pem).unwrap(), before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
