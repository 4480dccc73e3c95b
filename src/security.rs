//! A process's credentials: the run's shared token and its TLS material, from the
//! command line, the environment, or the config file's `[run] token` and `[tls]`
//! section — in that order of precedence. Workers must know them before they can reach
//! the coordinator, so `tandem trainer | generator | status` take them from flags or
//! the environment only.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tandem_proto::auth::Credentials;
use tandem_proto::tls::TlsFiles;

/// `[tls]`: TLS / mTLS on every gRPC endpoint (docs/config.md). Paths are on the host
/// that reads the config (the coordinator's, or every process's under `tandem run`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// CA certificate (PEM): clients verify servers with it; with `client_auth`, servers
    /// verify clients with it too.
    pub ca: Option<PathBuf>,
    /// This process's certificate chain (PEM); servers need one to speak TLS.
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of `cert`.
    pub key: Option<PathBuf>,
    /// Mutual TLS: servers refuse clients without a certificate signed by `ca`.
    pub client_auth: bool,
}

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
    /// key; `client_auth` is on when either asks for it.
    pub fn tls_files(&self, cfg: Option<&TlsSection>) -> TlsFiles {
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
        cfg_tls: Option<&TlsSection>,
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
                check_token(&g, "TANDEM_GENERATOR_TOKEN")?;
                creds
                    .with_generator_token(&g)
                    .map_err(|e| anyhow!("TANDEM_GENERATOR_TOKEN: {e}"))
            }
            None => Ok(creds),
        }
    }
}

/// The shortest token a process accepts.
pub const MIN_TOKEN_LEN: usize = 16;
/// Tokens the project ships as placeholders (deploy/k8s/secret.yaml): refused as is.
const PLACEHOLDER_TOKENS: &[&str] = &[
    "change-me-to-a-random-secret",
    "change-me-to-another-random-secret",
];

/// The shared token: TANDEM_TOKEN, else `[run] token`; refused when shorter than
/// [`MIN_TOKEN_LEN`] or a shipped placeholder.
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
    check_token(&token, from)?;
    Ok(token)
}

/// Refuses a token shorter than [`MIN_TOKEN_LEN`] or a shipped placeholder; `from`
/// names where it came from.
fn check_token(token: &str, from: &str) -> Result<()> {
    if PLACEHOLDER_TOKENS.contains(&token) {
        anyhow::bail!(
            "{from} is the placeholder shipped in deploy/k8s/secret.yaml: replace it with a random secret (openssl rand -hex 32)"
        );
    }
    if token.chars().count() < MIN_TOKEN_LEN {
        anyhow::bail!(
            "{from} has {} characters: a token needs at least {MIN_TOKEN_LEN} (openssl rand -hex 32 makes one)",
            token.chars().count()
        );
    }
    Ok(())
}

/// The environment that hands `files` to a child process (absolute paths, so the child
/// may run anywhere).
pub fn tls_env(files: &TlsFiles) -> Result<Vec<(&'static str, String)>> {
    let abs = |p: &Path| -> Result<String> {
        let p = std::path::absolute(p).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{} is not UTF-8", p.display()))
    };
    let mut env = Vec::new();
    for (name, path) in [
        ("TANDEM_TLS_CA", &files.ca),
        ("TANDEM_TLS_CERT", &files.cert),
        ("TANDEM_TLS_KEY", &files.key),
    ] {
        if let Some(p) = path {
            env.push((name, abs(p)?));
        }
    }
    if files.client_auth {
        env.push(("TANDEM_TLS_CLIENT_AUTH", "true".to_string()));
    }
    Ok(env)
}

/// Writes a secret (a token, a private key): readable by this user only, replacing
/// any older file.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
