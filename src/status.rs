//! `tandem status ADDR`: the lag table of a running run.

use anyhow::{anyhow, Result};
use clap::Args;
use tandem_proto::client;
use tandem_proto::v1::{Role, StatusRequest};

#[derive(Args)]
pub struct StatusArgs {
    /// The coordinator's gRPC address (TANDEM_TOKEN must hold the run's token).
    coordinator: String,
    #[command(flatten)]
    security: crate::security::SecurityArgs,
}

pub fn run(a: StatusArgs) -> Result<()> {
    let creds = a.security.credentials(None, None)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(async {
        let ch = client::connect(&a.coordinator, &creds)
            .await
            .map_err(|e| anyhow!("{e}"))?;
        client::coordinator(ch, &creds)
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| anyhow!("status from {}: {}", a.coordinator, client::describe(&e)))
    })?;
    println!(
        "version {}  step {}/{}  {}  accepted {}  leases {}  buffer {}  {:.0} tok/s",
        s.policy_version,
        s.step,
        s.total_steps,
        if s.finished { "finished" } else { "running" },
        s.groups_accepted,
        s.leases_running,
        s.buffer_groups,
        s.tokens_per_second
    );
    println!(
        "{:<6} {:<16} {:<10} {:>8} {:>4} {:>12} {:>7} {:>10}",
        "id", "name", "role", "version", "lag", "tokens", "leases", "last seen"
    );
    for w in &s.workers {
        let role = if w.role == Role::Trainer as i32 {
            "trainer"
        } else {
            "generator"
        };
        println!(
            "{:<6} {:<16} {:<10} {:>8} {:>4} {:>12} {:>7} {:>8}ms",
            w.worker_id,
            w.name,
            role,
            w.policy_version,
            w.lag,
            w.generated_tokens,
            w.leases,
            w.last_seen_ms
        );
    }
    if !s.dropped.is_empty() {
        let mut d: Vec<_> = s.dropped.iter().collect();
        d.sort();
        println!(
            "dropped: {}",
            d.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let mut m: Vec<_> = s.metrics.iter().collect();
    m.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in m {
        println!("  {k:<28} {v:.6}");
    }
    Ok(())
}
