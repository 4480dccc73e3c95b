//! `tandem score`: per-token logprobs and entropies of given completions
//! (`tandem_model::score`: JSONL in, JSONL out).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use tandem_model::score;

#[derive(Args)]
pub struct ScoreArgs {
    /// HF model folder, .gguf file, or `smollm2` / `gemma3-270m` (fetched on first use).
    #[arg(long)]
    model: String,
    /// Records: `{"prompt_ids", "completion_ids"}` or `{"prompt", "completion"}` lines.
    #[arg(long)]
    input: PathBuf,
    /// `{"logprobs", "entropy"}` lines, one per record, in the same order.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
}

pub fn run(a: ScoreArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(a.temperature > 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be positive, got {}", a.temperature);
    }
    let p = tandem_model::load_model(&a.model)?;
    let records = score::read_records(&a.input, &p.tokenizer, p.model.config().vocab_size)?;
    let bar = indicatif::ProgressBar::new(records.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} sequences {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    score::score_records(&p, &records, a.temperature, a.batch_size, &a.output, |n| {
        bar.inc(n as u64)
    })?;
    bar.finish_and_clear();
    tracing::info!(records = records.len(), output = %a.output.display(), "scored");
    Ok(())
}
