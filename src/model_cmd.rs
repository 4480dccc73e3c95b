//! `tandem model …`: init a preset, convert GGUF → HF, fetch a named model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a small random model with a real BPE tokenizer (for tests and demos).
    Init {
        /// Preset name: tiny (Llama, untied head), tiny-qwen2 (q/k/v biases, tied),
        /// tiny-qwen3 (per-head q/k norms, head_dim ≠ hidden / heads, tied), tiny-gemma3
        /// (local and global layers), or qwen3-0.6b / gemma3-270m (random weights in
        /// the shape of Qwen3-0.6B / Gemma-3-270M: 2.4 GB / 1.1 GB of f32, written in
        /// seconds).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Output folder (HF layout).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a GGUF file into an HF folder (f32 safetensors, tokenizer, config).
    Convert {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Fetch a named model into the cache and print its path.
    Fetch {
        /// Model name (known: smollm2, gemma3-270m).
        #[arg(default_value = "smollm2")]
        name: String,
    },
}

/// `tandem model init`: the preset's random model written as an HF folder; a spinner
/// on a terminal says which step runs (a real-size preset takes seconds).
fn init(preset: &str, out: &std::path::Path, seed: u64) -> Result<()> {
    let device = tandem_model::process_device()?;
    let config = tandem_model::preset::preset_config(preset)?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar.set_message(format!(
        "{preset}: drawing {} random parameters",
        config.num_parameters()
    ));
    let t = std::time::Instant::now();
    let p = tandem_model::preset::init(preset, seed, &device)?;
    let drawn = t.elapsed().as_secs_f64();
    bar.set_message(format!("{preset}: writing {}", out.display()));
    tandem_model::save_hf(&p, out, p.weights_dtype)
        .with_context(|| format!("writing {}", out.display()))?;
    bar.finish_and_clear();
    println!("{}", out.display());
    tracing::info!(
        preset,
        seed,
        params = p.model.params().numel(),
        init_s = drawn,
        write_s = t.elapsed().as_secs_f64() - drawn,
        "wrote model"
    );
    Ok(())
}

pub fn run(args: ModelArgs) -> Result<()> {
    match args.command {
        ModelCommand::Init { preset, out, seed } => init(&preset, &out, seed)?,
        ModelCommand::Convert { input, out } => {
            if input.extension().is_none_or(|e| e != "gguf") {
                anyhow::bail!("--input must be a .gguf file, got {}", input.display());
            }
            let p = tandem_model::load_model(&input.to_string_lossy())?;
            tandem_model::save_hf(&p, &out, p.weights_dtype)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
        }
        ModelCommand::Fetch { name } => {
            let known = tandem_model::fetch::KNOWN
                .iter()
                .find(|k| k.name == name)
                .with_context(|| {
                    format!(
                        "unknown model `{name}` (known: {})",
                        tandem_model::fetch::known_names()
                    )
                })?;
            let path = tandem_model::fetch::fetch(known, &tandem_model::fetch::cache_dir())?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
