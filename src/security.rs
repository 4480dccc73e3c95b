//! A process's credentials: the run's shared token and its TLS material, from the
//! command line, the environment, or the config file's `[run] token` and `[tls]`
//! section — in that order of precedence. Workers must know them before they can reach
//! the coordinator, so `tandem trainer | generator | status` take them from flags or
//! the environment only.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Args;
use tandem_proto::auth::{check_strength, Credentials};
use tandem_proto::tls::TlsFiles;

/// The flags every service and client command shares.
#[derive(Args, Clone, Debug, Default)]
pub struct SecurityArgs {
    /// CA certificate (PEM) that verifies the servers (and, with mTLS, the clients).
    #[arg(long = "tls-ca", env = "TANDEM_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate chain (PEM).
    #[arg(long = "tls-cert", env = "TANDEM_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long = "tls-key", env = "TANDEM_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: servers require client certificates signed by the CA.
    /// `TANDEM_TLS_CLIENT_AUTH` takes 1/true/yes/on or 0/false/no/off.
    #[arg(
        long = "tls-client-auth",
        env = "TANDEM_TLS_CLIENT_AUTH",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub tls_client_auth: bool,
}

impl SecurityArgs {
    /// The TLS files: each flag (or its environment variable) overrides the config's
    /// `[tls]` key; `client_auth` is on when either asks for it.
    pub fn tls_files(&self, cfg: Option<&TlsFiles>) -> TlsFiles {
        let cfg = cfg.cloned().unwrap_or_default();
        TlsFiles {
            ca: self.tls_ca.clone().or(cfg.ca),
            cert: self.tls_cert.clone().or(cfg.cert),
            key: self.tls_key.clone().or(cfg.key),
            client_auth: self.tls_client_auth || cfg.client_auth,
        }
    }

    /// The credentials of this process: the token (TANDEM_TOKEN, else `cfg_token`) and
    /// the TLS material, read and checked now.
    pub fn credentials(
        &self,
        cfg_token: Option<&str>,
        cfg_tls: Option<&TlsFiles>,
    ) -> Result<Credentials> {
        let token = token(cfg_token)?;
        let tls = self
            .tls_files(cfg_tls)
            .load()
            .map_err(|e| anyhow!("{e} (--tls-* flags, TANDEM_TLS_* or [tls])"))?;
        let creds = Credentials::new(&token, tls).map_err(|e| anyhow!("TANDEM_TOKEN: {e}"))?;
        // A server of a run with split roles also accepts the generator token.
        match std::env::var("TANDEM_GENERATOR_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            Some(g) => {
                check_strength(&g, "TANDEM_GENERATOR_TOKEN").map_err(anyhow::Error::msg)?;
                creds
                    .with_generator_token(&g)
                    .map_err(|e| anyhow!("TANDEM_GENERATOR_TOKEN: {e}"))
            }
            None => Ok(creds),
        }
    }
}

/// The shared token: TANDEM_TOKEN, else `[run] token`; refused when shorter than
/// `tandem_proto::auth::MIN_TOKEN_LEN` or a shipped placeholder.
pub fn token(cfg_token: Option<&str>) -> Result<String> {
    let (token, from) = match std::env::var("TANDEM_TOKEN").ok().filter(|t| !t.is_empty()) {
        Some(t) => (t, "TANDEM_TOKEN"),
        None => (
            cfg_token.map(str::to_string).ok_or_else(|| {
                anyhow!("no token: set TANDEM_TOKEN (or [run] token) to the run's shared secret")
            })?,
            "[run] token",
        ),
    };
    check_strength(&token, from).map_err(anyhow::Error::msg)?;
    Ok(token)
}
