//! `tandem tls-certs DIR`: a private CA and certificates for a run's hosts
//! (`tandem_proto::ca`). The first call creates the CA (`ca.pem`, `ca.key`); each call
//! issues one certificate (`NAME.pem`, `NAME.key`) for the given hosts, valid for both
//! server and client authentication, signed by that CA.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tandem_proto::ca;

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

pub fn run(a: CertsArgs) -> Result<()> {
    let request = ca::Request {
        name: &a.name,
        hosts: &a.hosts,
        days: a.days,
    };
    let issued =
        ca::issue(&a.out, &request).with_context(|| format!("tls-certs {}", a.out.display()))?;
    if issued.ca_created {
        eprintln!(
            "created the CA: {} (keep {} private)",
            issued.ca_pem.display(),
            issued.ca_key.display()
        );
    }
    eprintln!(
        "issued {} for {} (valid {} days)",
        issued.pem.display(),
        a.hosts.join(", "),
        a.days
    );
    Ok(())
}
