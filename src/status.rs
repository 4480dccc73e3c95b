//! `tandem status RUN_DIR | ADDR`: the lag table of a running run
//! (`tandem_launch::status`). Given a run folder it reads the coordinator's address
//! and scheme from `RUN_DIR/coordinator.json` and the token from `RUN_DIR/token`
//! (TANDEM_TOKEN, when set, still wins; TLS files from the flags, else the folder's
//! `config.toml [tls]`).

use std::path::Path;

use anyhow::Result;
use clap::Args;
use tandem_launch::{lag_table, read_token, CoordinatorStatus, RunAddress};

#[derive(Args)]
pub struct StatusArgs {
    /// A run folder (its coordinator.json and token), or the coordinator's gRPC
    /// address (TANDEM_TOKEN must then hold the run's token).
    #[arg(value_name = "RUN_DIR|ADDR")]
    coordinator: String,
    #[command(flatten)]
    security: crate::security::SecurityArgs,
}

pub fn run(a: StatusArgs) -> Result<()> {
    let dir = Path::new(&a.coordinator);
    let (addr, creds) = if dir.is_dir() {
        let run = RunAddress::read(dir)?;
        let token = read_token(dir)?;
        let tls = (run.scheme == "https")
            .then(|| crate::run_config::RunConfig::read(&dir.join("config.toml"), &[]).ok())
            .flatten()
            .map(|c| c.tls);
        (
            run.grpc_uri(),
            a.security.credentials(Some(&token), tls.as_ref())?,
        )
    } else {
        (a.coordinator.clone(), a.security.credentials(None, None)?)
    };
    let status = CoordinatorStatus::connect(&addr, &creds)?.get()?;
    print!("{}", lag_table(&status));
    Ok(())
}
