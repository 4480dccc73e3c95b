//! `tandem tls-certs DIR`: a private CA and certificates for a run's hosts, for TLS and
//! mTLS without an external PKI. The first call creates the CA (`ca.pem`, `ca.key`);
//! each call issues one certificate (`NAME.pem`, `NAME.key`) for the given hosts, valid
//! for both server and client authentication, signed by that CA.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Args)]
pub struct CertsArgs {
    /// Folder for the CA and the certificates (created if missing).
    out: PathBuf,
    /// Base name of the certificate files: NAME.pem and NAME.key.
    #[arg(long, default_value = "node")]
    name: String,
    /// A DNS name or IP address the certificate is valid for (repeatable).
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    hosts: Vec<String>,
    /// Days the certificate (and a new CA) stays valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

const CA_NAME: &str = "Tandem run CA";

/// The CA's parameters; rebuilt identically to sign with an existing CA key.
fn ca_params(days: u32) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
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

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days as i64);
}

pub fn run(a: CertsArgs) -> Result<()> {
    if a.hosts.is_empty() || a.hosts.iter().any(|h| h.trim().is_empty()) {
        bail!("--host: give at least one non-empty DNS name or IP address");
    }
    if a.days == 0 {
        bail!("--days must be at least 1");
    }
    if a.name.is_empty() || a.name.contains(['/', '\\']) || a.name == "ca" {
        bail!("--name {:?}: a plain file name other than `ca`", a.name);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (leaf_pem, leaf_key) = (
        a.out.join(format!("{}.pem", a.name)),
        a.out.join(format!("{}.key", a.name)),
    );
    for p in [&leaf_pem, &leaf_key] {
        if p.exists() {
            bail!("{} exists; pick another --name or remove it", p.display());
        }
    }
    let (ca_pem, ca_key) = (a.out.join("ca.pem"), a.out.join("ca.key"));
    let ca_key_pair = if ca_key.exists() {
        let text = std::fs::read_to_string(&ca_key)
            .with_context(|| format!("reading {}", ca_key.display()))?;
        KeyPair::from_pem(&text).map_err(|e| anyhow!("{}: {e}", ca_key.display()))?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params(a.days)?.self_signed(&key)?;
        crate::security::write_private(&ca_key, &key.serialize_pem())?;
        std::fs::write(&ca_pem, cert.pem())
            .with_context(|| format!("writing {}", ca_pem.display()))?;
        eprintln!(
            "created the CA: {} (keep {} private)",
            ca_pem.display(),
            ca_key.display()
        );
        key
    };
    let issuer = Issuer::new(ca_params(a.days)?, ca_key_pair);

    let mut p = CertificateParams::new(a.hosts.clone()).map_err(|e| anyhow!("--host: {e}"))?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, a.name.as_str());
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut p, a.days);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    crate::security::write_private(&leaf_key, &key.serialize_pem())?;
    std::fs::write(&leaf_pem, cert.pem())
        .with_context(|| format!("writing {}", leaf_pem.display()))?;
    eprintln!(
        "issued {} for {} (valid {} days)",
        leaf_pem.display(),
        a.hosts.join(", "),
        a.days
    );
    Ok(())
}
