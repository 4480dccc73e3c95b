//! What a run's processes are handed through their environment: the token their role
//! holds and the TLS files. Two roles: the coordinator and the trainer hold the run's
//! token and accept the generator token too; generators hold only the generator token,
//! which cannot publish, commit, exclude or register as the trainer.

use std::path::Path;

use rand::RngCore;
use tandem_proto::tls::TlsFiles;

use crate::{Error, Result};

/// A process's environment: (variable, value) pairs.
pub type Env = Vec<(&'static str, String)>;

/// A new random token: 16 bytes as 32 hex digits.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The environment that hands `files` to a child process (absolute paths, so the child
/// may run anywhere).
pub fn tls_env(files: &TlsFiles) -> Result<Env> {
    let abs = |p: &Path| -> Result<String> {
        let p = std::path::absolute(p)
            .map_err(|e| Error::Invalid(format!("tls file {}: {e}", p.display())))?;
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Invalid(format!("tls file {} is not UTF-8", p.display())))
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

/// The environments of the two roles: (coordinator and trainer, generators).
pub fn role_envs(tls: &TlsFiles, token: &str, generator_token: &str) -> Result<(Env, Env)> {
    let tls = tls_env(tls)?;
    let mut servers = tls.clone();
    servers.push(("TANDEM_TOKEN", token.to_string()));
    servers.push(("TANDEM_GENERATOR_TOKEN", generator_token.to_string()));
    let mut generators = tls;
    generators.push(("TANDEM_TOKEN", generator_token.to_string()));
    Ok((servers, generators))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_hold_only_their_own_token_and_paths_are_absolute() {
        let files = TlsFiles {
            ca: Some("certs/ca.pem".into()),
            cert: None,
            key: None,
            client_auth: true,
        };
        let (servers, generators) = role_envs(&files, "run-token", "gen-token").unwrap();
        let get = |env: &Env, k: &str| env.iter().find(|e| e.0 == k).map(|e| e.1.clone());
        assert_eq!(get(&servers, "TANDEM_TOKEN").as_deref(), Some("run-token"));
        assert_eq!(
            get(&servers, "TANDEM_GENERATOR_TOKEN").as_deref(),
            Some("gen-token")
        );
        assert_eq!(
            get(&generators, "TANDEM_TOKEN").as_deref(),
            Some("gen-token")
        );
        assert_eq!(get(&generators, "TANDEM_GENERATOR_TOKEN"), None);
        let ca = get(&generators, "TANDEM_TLS_CA").unwrap();
        assert!(ca.starts_with('/') && ca.ends_with("certs/ca.pem"), "{ca}");
        assert_eq!(
            get(&generators, "TANDEM_TLS_CLIENT_AUTH").as_deref(),
            Some("true")
        );
        assert_eq!(get(&servers, "TANDEM_TLS_CERT"), None);
        let (a, b) = (new_token(), new_token());
        assert!(a.len() == 32 && a.chars().all(|c| c.is_ascii_hexdigit()) && a != b);
    }
}
