//! Where a client finds a running run from its folder: the coordinator's addresses in
//! `RUN_DIR/coordinator.json` (`{"grpc", "http", "scheme"}`, written by `tandem
//! coordinator --addr-file` once it listens) and the shared token in `RUN_DIR/token`
//! (written private by `tandem run`); and what a wrong port's refusal means.

use std::path::Path;

use crate::{Error, Result};

/// The coordinator's addresses as `RUN_DIR/coordinator.json` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAddress {
    /// `host:port` of the gRPC services.
    pub grpc: String,
    /// `host:port` of `/metrics`, `/healthz`, `/readyz`.
    pub http: String,
    /// "https" when the run speaks TLS (gRPC and HTTP alike), else "http".
    pub scheme: String,
}

impl RunAddress {
    /// Reads `run_dir/coordinator.json`; the error names the file and what to do.
    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("coordinator.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Invalid(format!(
                "{}: {e} (is {} a run folder whose coordinator has started? `tandem run` writes it once the coordinator listens; or give the coordinator's gRPC address instead)",
                path.display(),
                run_dir.display()
            ))
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not JSON: {e}", path.display())))?;
        let field = |k: &str| -> Result<String> {
            v[k].as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: no \"{k}\" (a string): the file is not a coordinator's address file",
                        path.display()
                    ))
                })
        };
        let scheme = v["scheme"].as_str().unwrap_or("http").to_string();
        if scheme != "http" && scheme != "https" {
            return Err(Error::Invalid(format!(
                "{}: \"scheme\" is {scheme:?}; expected \"http\" or \"https\"",
                path.display()
            )));
        }
        Ok(RunAddress {
            grpc: field("grpc")?,
            http: field("http")?,
            scheme,
        })
    }

    /// The gRPC address with its scheme, so the client speaks TLS exactly when the
    /// run does.
    pub fn grpc_uri(&self) -> String {
        format!("{}://{}", self.scheme, self.grpc)
    }
}

/// The run's shared token from `run_dir/token` (trailing whitespace dropped).
pub fn read_token(run_dir: &Path) -> Result<String> {
    let path = run_dir.join("token");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::Invalid(format!(
            "{}: {e} (`tandem run` writes it; or set TANDEM_TOKEN to the run's token)",
            path.display()
        ))
    })?;
    Ok(text.trim_end().to_string())
}

/// What a refused `Status` call at `addr` means when the port is the wrong one, from
/// the refusal's gRPC `code` (its `Debug` name) and `message`: an HTTP server's answer
/// (the coordinator's HTTP port, whose 404 tonic maps to `Unimplemented`), or a gRPC
/// server without the Coordinator service (a trainer's or a generator's port).
pub fn wrong_port_hint(addr: &str, code: &str, message: &str) -> Option<String> {
    if code != "Unimplemented" && code != "Unknown" && code != "Internal" {
        return None;
    }
    if message.contains("HTTP status code") || message.contains("content-type") {
        return Some(format!(
            "{addr} answers HTTP, not gRPC: it is an HTTP port (the coordinator's serves /metrics, /healthz, /readyz). `tandem status` needs the coordinator's gRPC port: the \"grpc\" address in RUN_DIR/coordinator.json, or pass RUN_DIR itself"
        ));
    }
    (code == "Unimplemented").then(|| {
        format!(
            "{addr} is a gRPC server without the Coordinator service (a trainer's or a generator's port?). `tandem status` needs the coordinator's gRPC port: the \"grpc\" address in RUN_DIR/coordinator.json, or pass RUN_DIR itself"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_file_is_read_and_its_faults_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = RunAddress::read(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("coordinator.json") && e.contains("run folder"),
            "{e}"
        );
        let file = dir.path().join("coordinator.json");
        std::fs::write(
            &file,
            r#"{"grpc":"127.0.0.1:5","http":"127.0.0.1:6","scheme":"https"}"#,
        )
        .unwrap();
        let a = RunAddress::read(dir.path()).unwrap();
        assert_eq!(a.grpc_uri(), "https://127.0.0.1:5");
        assert_eq!(a.http, "127.0.0.1:6");
        // An older file without a scheme is plaintext.
        std::fs::write(&file, r#"{"grpc":"127.0.0.1:5","http":"127.0.0.1:6"}"#).unwrap();
        assert_eq!(
            RunAddress::read(dir.path()).unwrap().grpc_uri(),
            "http://127.0.0.1:5"
        );
        std::fs::write(&file, r#"{"http":"127.0.0.1:6"}"#).unwrap();
        let e = RunAddress::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no \"grpc\""), "{e}");
        std::fs::write(&file, r#"{"grpc":"a:1","http":"a:2","scheme":"ftp"}"#).unwrap();
        let e = RunAddress::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("\"scheme\"") && e.contains("ftp"), "{e}");
        let e = read_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("token") && e.contains("TANDEM_TOKEN"), "{e}");
        std::fs::write(dir.path().join("token"), "abc\n").unwrap();
        assert_eq!(read_token(dir.path()).unwrap(), "abc");
    }

    #[test]
    fn a_wrong_port_is_named_and_other_refusals_are_not() {
        let http = wrong_port_hint(
            "h:1",
            "Unimplemented",
            "grpc-status header missing, mapped from HTTP status code 404",
        )
        .unwrap();
        assert!(
            http.contains("h:1 answers HTTP") && http.contains("\"grpc\""),
            "{http}"
        );
        let other = wrong_port_hint("h:2", "Unimplemented", "").unwrap();
        assert!(other.contains("without the Coordinator service"), "{other}");
        assert_eq!(wrong_port_hint("h:3", "Unauthenticated", "bad token"), None);
    }
}
