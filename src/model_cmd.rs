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
        /// Preset name: tiny (Llama, untied head), tiny-qwen2 (q/k/v biases, tied) or
        /// tiny-qwen3 (per-head q/k norms, head_dim ≠ hidden / heads, tied).
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

pub fn run(args: ModelArgs) -> Result<()> {
    match args.command {
        ModelCommand::Init { preset, out, seed } => {
            let device = tandem_model::process_device()?;
            let p = tandem_model::preset::init(&preset, seed, &device)?;
            tandem_model::save_hf(&p, &out, p.weights_dtype)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
            tracing::info!(
                preset,
                seed,
                params = p.model.params().numel(),
                "wrote model"
            );
        }
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
