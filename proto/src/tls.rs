//! TLS and mutual TLS (rustls) for every gRPC endpoint, from PEM files on this host.
//!
//! - A **server** (coordinator, trainer) speaks TLS when it has `cert` and `key`; with
//!   `client_auth` it also requires each client to present a certificate signed by `ca`
//!   (mTLS).
//! - A **client** (every worker, `tandem status`) speaks TLS when it has `ca`, verifies
//!   the server's certificate against it (the address's host or IP must be in the
//!   certificate's subject alternative names), and presents `cert` / `key` when it has
//!   them.
//!
//! The shared token is checked as well: TLS protects it on the wire, it does not replace
//! it.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Where this process's TLS material lies. All optional: nothing set = plaintext.
///
/// Also the run config's `[tls]` section (docs/config.md): paths there are on the host
/// that reads the config (the coordinator's, or every process's under `tandem run`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate (PEM) that signed the servers' (and, for mTLS, the clients')
    /// certificates.
    pub ca: Option<PathBuf>,
    /// This process's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// Servers require client certificates signed by `ca`; clients must have one.
    pub client_auth: bool,
}

/// TLS material read and checked once; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Tls {
    ca: Option<Certificate>,
    identity: Option<Identity>,
    /// The certificate chain and key as PEM, for the servers that are not gRPC.
    pem: Option<(String, String)>,
    client_auth: bool,
}

impl TlsFiles {
    /// Reads and checks the files. Errors name the key (`ca`, `cert`, `key`,
    /// `client_auth`) and, where a file is at fault, its path.
    pub fn load(&self) -> Result<Tls, String> {
        let mut pem = None;
        let identity = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let cert_pem = read_pem(cert, "cert", "CERTIFICATE")?;
                let key_pem = read_pem(key, "key", "PRIVATE KEY")?;
                pem = Some((cert_pem.clone(), key_pem.clone()));
                Some(Identity::from_pem(cert_pem, key_pem))
            }
            (None, None) => None,
            (Some(_), None) => {
                return Err("tls cert is set but key is not: set both (or neither)".into())
            }
            (None, Some(_)) => {
                return Err("tls key is set but cert is not: set both (or neither)".into())
            }
        };
        let ca = match &self.ca {
            Some(p) => Some(Certificate::from_pem(read_pem(p, "ca", "CERTIFICATE")?)),
            None => None,
        };
        if self.client_auth && (ca.is_none() || identity.is_none()) {
            return Err(
                "tls client_auth (mTLS) needs ca, cert and key on every process: the CA checks the peer's certificate and this process presents its own"
                    .into(),
            );
        }
        Ok(Tls {
            ca,
            identity,
            pem,
            client_auth: self.client_auth,
        })
    }
}

fn read_pem(path: &Path, key: &str, label: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("tls {key}: cannot read {}: {e}", path.display()))?;
    let begin = format!("-----BEGIN {label}-----");
    let found = if label == "PRIVATE KEY" {
        // PKCS#8, SEC1 (EC) or PKCS#1 (RSA).
        text.lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.ends_with("PRIVATE KEY-----"))
    } else {
        text.contains(&begin)
    };
    if !found {
        return Err(format!(
            "tls {key}: {} holds no PEM block `{begin}`; give a PEM file",
            path.display()
        ));
    }
    Ok(text)
}

impl Tls {
    /// Plaintext.
    pub fn none() -> Self {
        Tls::default()
    }

    /// The server side: `None` when this process has no certificate.
    pub fn server(&self) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if self.client_auth {
            if let Some(ca) = &self.ca {
                cfg = cfg.client_ca_root(ca.clone());
            }
        }
        Some(cfg)
    }

    /// The server side of an HTTP endpoint (HTTP/1.1 over TLS with this process's
    /// certificate; no client certificate is asked for: what needs protecting there
    /// carries the run's token, which TLS keeps off the wire). `None` when this process
    /// has no certificate.
    pub fn https(
        &self,
    ) -> Option<Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>, String>> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert_pem, key_pem) = self.pem.as_ref()?;
        let build = || {
            let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("tls cert: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| format!("tls key: {e}"))?;
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls: {e}"))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| format!("tls cert and key: {e}"))?;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(std::sync::Arc::new(cfg))
        };
        Some(build())
    }

    /// The client side: `None` when this process has no CA to verify servers with.
    pub fn client(&self) -> Option<ClientTlsConfig> {
        let ca = self.ca.clone()?;
        let mut cfg = ClientTlsConfig::new().ca_certificate(ca);
        if let Some(id) = &self.identity {
            cfg = cfg.identity(id.clone());
        }
        Some(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_the_key_and_the_file() {
        let dir = std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let missing = dir.join("missing.pem");
        let err = |f: TlsFiles| f.load().unwrap_err();

        let e = err(TlsFiles {
            cert: Some(not_pem.clone()),
            ..Default::default()
        });
        assert!(e.contains("key is not"), "{e}");
        let e = err(TlsFiles {
            key: Some(not_pem.clone()),
            ..Default::default()
        });
        assert!(e.contains("cert is not"), "{e}");
        let e = err(TlsFiles {
            ca: Some(missing.clone()),
            ..Default::default()
        });
        assert!(e.contains("tls ca") && e.contains("missing.pem"), "{e}");
        let e = err(TlsFiles {
            ca: Some(not_pem.clone()),
            ..Default::default()
        });
        assert!(e.contains("tls ca") && e.contains("no PEM block"), "{e}");
        let e = err(TlsFiles {
            client_auth: true,
            ..Default::default()
        });
        assert!(e.contains("client_auth"), "{e}");
        assert!(TlsFiles::default().load().unwrap().server().is_none());
        assert!(TlsFiles::default().load().unwrap().client().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
