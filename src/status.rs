//! `tandem status ADDR`: the lag table of a running run (`tandem_launch::status`).

use anyhow::Result;
use clap::Args;
use tandem_launch::{lag_table, CoordinatorStatus};

#[derive(Args)]
pub struct StatusArgs {
    /// The coordinator's gRPC address (TANDEM_TOKEN must hold the run's token).
    coordinator: String,
    #[command(flatten)]
    security: crate::security::SecurityArgs,
}

pub fn run(a: StatusArgs) -> Result<()> {
    let creds = a.security.credentials(None, None)?;
    let status = CoordinatorStatus::connect(&a.coordinator, &creds)?.get()?;
    print!("{}", lag_table(&status));
    Ok(())
}
