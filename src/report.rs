//! `tandem report RUN_DIR`: plots of a run (reward, staleness, throughput over steps)
//! as SVG, and a summary, from `RUN_DIR/metrics.jsonl` and `eval.jsonl`
//! (`tandem_report`).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct ReportArgs {
    /// The run's folder (holds metrics.jsonl).
    run_dir: PathBuf,
    /// Where the plots and summary go (default: RUN_DIR/report).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The summary's `time_to_target`: when the mean reward of 5 consecutive steps
    /// first reaches this value.
    #[arg(long, default_value_t = 0.9)]
    reward_target: f64,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let out = a.out.unwrap_or_else(|| a.run_dir.join("report"));
    let summary = tandem_report::write(&a.run_dir, &out, a.reward_target)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("plots and summary in {}", out.display());
    Ok(())
}
