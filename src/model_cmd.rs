//! `tandem model …`: init a preset, convert GGUF → HF, fetch a named model, merge a
//! LoRA adapter into its base.

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
    /// Fold a LoRA adapter (PEFT's format: a run's `final/` or a checkpoint) into its
    /// base, W + s·B·A, and write the merged HF model (a value or reward head beside
    /// the adapter is copied along).
    Merge {
        /// The base model (as `[model] path`: HF folder, .gguf, fetchable name, preset).
        #[arg(long)]
        base: String,
        /// The adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
        #[arg(long)]
        adapter: PathBuf,
        /// Output folder (HF layout).
        #[arg(long)]
        out: PathBuf,
        /// The merged weights' dtype: f32, bf16 or f16 (default: the base's).
        #[arg(long)]
        dtype: Option<String>,
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

/// `tandem model merge`: the base with the adapter folded in, as an HF folder.
fn merge(
    base: &str,
    adapter: &std::path::Path,
    out: &std::path::Path,
    dtype: Option<&str>,
) -> Result<()> {
    let mut p = tandem_model::load_model(&tandem_model::materialize(base)?)?;
    let dtype = match dtype {
        Some(d) => tandem_model::checkpoint::parse_dtype(d)
            .with_context(|| format!("--dtype {d:?}: expected f32, bf16 or f16"))?,
        None => p.weights_dtype,
    };
    let a =
        tandem_model::lora::load_peft(adapter, p.model.config(), p.model.dtype(), p.model.device())
            .with_context(|| format!("--adapter {}", adapter.display()))?;
    let (rank, targets) = (a.spec().rank, a.spec().targets.len());
    p.model = p.model.with_adapter(a)?.merged()?;
    tandem_model::save_hf(&p, out, dtype).with_context(|| format!("writing {}", out.display()))?;
    for head in [
        tandem_model::VALUE_HEAD_FILE,
        tandem_model::REWARD_HEAD_FILE,
    ] {
        let from = adapter.join(head);
        if from.is_file() {
            std::fs::copy(&from, out.join(head))
                .with_context(|| format!("copying {} into {}", from.display(), out.display()))?;
        }
    }
    tracing::info!(base, adapter = %adapter.display(), rank, targets, out = %out.display(), "merged");
    println!("{}", out.display());
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
        ModelCommand::Merge {
            base,
            adapter,
            out,
            dtype,
        } => merge(&base, &adapter, &out, dtype.as_deref())?,
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
