//! `tandem report RUN_DIR`: plots of a run (reward, staleness, throughput over steps)
//! as SVG, and a summary, from `RUN_DIR/metrics.jsonl` and `eval.jsonl`
//! (`tandem_report`); the latest step's samples from `samples.jsonl` on stderr.

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
    print_samples(&a.run_dir);
    eprintln!("plots and summary in {}", out.display());
    Ok(())
}

/// The latest step's samples, the model's text with control characters escaped
/// (`printable`), the prompt's end and the completion's start; a file that cannot be
/// read is a warning (the report stands without it).
fn print_samples(run_dir: &std::path::Path) {
    use tandem_proto::limits::Printable;
    let samples = tandem_report::samples::latest(run_dir).unwrap_or_else(|e| {
        eprintln!("warning: no samples shown: {e}");
        Vec::new()
    });
    for s in samples {
        let advantage = s.advantage.map_or("-".into(), |a| format!("{a:+.3}"));
        let (prompt, cut) = tandem_report::samples::cut(&s.prompt_text, 160, true);
        eprintln!(
            "step {} {} of group {}: reward {:.3} advantage {advantage} versions {}-{} staleness {}\n  prompt: {}{}\n  completion: {}",
            s.step, Printable(&s.pick, 16), Printable(&s.group, 64), s.reward, s.versions[0], s.versions[1],
            s.staleness, if cut { "…" } else { "" }, Printable(prompt, 160),
            Printable(&s.completion_text, 400)
        );
    }
}
