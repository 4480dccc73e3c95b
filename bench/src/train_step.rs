//! `tandem bench train-step`: one GRPO training step (forward, backward, AdamW) of
//! SmolLM2 on a realistic RL batch, beside a PyTorch reference that does the same math
//! the way TRL does (tools/bench_train_step.py: a padded batch, every completion with
//! its own copy of the prompt, every completion computed).
//!
//! The batch (fixed seed): `prompts` prompts of `prompt_tokens` random tokens, each
//! with `group_size` completions of lengths drawn uniformly in
//! `min_completion..=max_completion`; behaviour logprobs drawn in [−3, −0.05]; binary
//! rewards with a per-group pass rate, two groups solved by all or none of their
//! completions (zero advantage), as happens in any run. The same batch goes to the
//! reference as JSON.
//!
//! Tandem runs its default layout (packed, prompts shared, zero-gradient completions
//! skipped) and, each in its own process so that its peak RSS is its own, the same
//! step with one of them switched off, and with activation checkpointing on; with
//! `--lora`, the default layout again training LoRA adapters (rank `--lora-rank`, every
//! projection) on the frozen model: its step time and peak RSS beside the full step's.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};
use tandem_model::packing::Packing;
use tandem_trainer::config::{Compute, TrainConfig};
use tandem_trainer::rl::rollout::Rollout;

use crate::error::{bail, Context, Result};
use crate::reference::TrainStepReference;
use crate::timing::{median, peak_rss_mib, run_child};

#[derive(Args, Clone)]
pub struct TrainStepBench {
    /// Model: `smollm2`, a .gguf file or an HF folder.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    #[arg(long, default_value_t = 8)]
    group_size: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    min_completion: usize,
    #[arg(long, default_value_t = 256)]
    max_completion: usize,
    /// Seed of the batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tandem's token budget per micro-batch (`[trainer] max_tokens_per_microbatch`).
    #[arg(long, default_value_t = 8192)]
    max_tokens_per_microbatch: usize,
    /// The reference's sequences per micro-batch (TRL's per-device batch size).
    #[arg(long, default_value_t = 8)]
    reference_microbatch: usize,
    /// Timed steps per variant (median reported), after `warmup` untimed ones; each
    /// step starts from the same weights with a fresh optimizer on the same batch.
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Untimed steps before the timed ones (both engines): a trainer runs many steps,
    /// and the first pays for touching its working set once.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Threads for both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Tandem variants to run, comma-separated (default, no_packing,
    /// no_prefix_sharing, no_skipping, checkpointing, lora).
    #[arg(
        long,
        default_value = "default,no_packing,no_prefix_sharing,no_skipping,checkpointing"
    )]
    variants: String,
    /// Add the `lora` variant: the default layout training LoRA adapters only.
    #[arg(long)]
    lora: bool,
    /// The `lora` variant's rank (α = 2·rank, every projection targeted).
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// Reference script to run side by side (tools/bench_train_step.py; its output
    /// format: tools/bench_protocol.py).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Python interpreter with torch + transformers for --reference.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the combined JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one variant in this process on this batch file.
    #[arg(long, hide = true)]
    variant: Option<String>,
    #[arg(long, hide = true)]
    batch: Option<PathBuf>,
}

/// Runs the benchmark, or (with the hidden `--variant`) one variant in this process.
pub fn run(b: TrainStepBench) -> Result<()> {
    match (&b.variant, &b.batch) {
        (Some(v), Some(batch)) => run_variant(&b, v, batch),
        _ => run_all(&b),
    }
}

/// Pass rates of the groups: the first solved by none, the second by all.
fn pass_rate(group: usize, groups: usize) -> f64 {
    match group {
        0 => 0.0,
        1 => 1.0,
        g => (g - 1) as f64 / (groups - 1).max(2) as f64,
    }
}

/// The benchmark's batch, deterministic for a seed.
fn batch(b: &TrainStepBench, vocab: usize) -> Result<Vec<Rollout>> {
    use rand::{Rng, SeedableRng};
    if b.min_completion == 0 || b.min_completion > b.max_completion {
        bail!("--min-completion must be in 1..=--max-completion");
    }
    if b.prompts == 0 || b.group_size < 2 || b.prompt_tokens == 0 {
        bail!("--prompts ≥ 1, --group-size ≥ 2 and --prompt-tokens ≥ 1 are needed");
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(b.seed);
    let mut out = Vec::new();
    for g in 0..b.prompts {
        let prompt: Vec<u32> = (0..b.prompt_tokens)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let solved = (pass_rate(g, b.prompts) * b.group_size as f64).round() as usize;
        for k in 0..b.group_size {
            let len = rng.random_range(b.min_completion..=b.max_completion);
            out.push(Rollout {
                group: format!("g{g}"),
                prompt_ids: prompt.clone(),
                completion_ids: (0..len)
                    .map(|_| rng.random_range(0..vocab as u32))
                    .collect(),
                behavior_logprobs: (0..len).map(|_| -rng.random_range(0.05..3.0)).collect(),
                reward: if k < solved { 1.0 } else { 0.0 },
                versions: None,
                loss_mask: None,
                finish_reason: None,
                episode: None,
            });
        }
    }
    Ok(out)
}

/// GRPO as the reference computes it: ratio against the behaviour logprobs (one
/// forward per completion, as TRL's on-policy step), PPO clip, token-mean loss,
/// AdamW with gradient clipping.
fn config() -> TrainConfig {
    let mut cfg = TrainConfig::default();
    cfg.algorithm.correction_mode = tandem_trainer::config::CorrectionMode::Bypass;
    cfg.algorithm.loss_agg = tandem_trainer::rl::aggregate::LossAgg::TokenMean;
    cfg.algorithm.temperature = 1.0;
    cfg.optimizer.lr = 1e-6;
    cfg.optimizer.warmup_steps = 0;
    cfg
}

fn compute_of(variant: &str, budget: usize) -> Result<Compute> {
    let base = Compute {
        max_tokens_per_microbatch: budget,
        ..Compute::default()
    };
    Ok(match variant {
        "default" | "lora" => base,
        "no_packing" => Compute {
            packing: Packing::Padded,
            ..base
        },
        "no_prefix_sharing" => Compute {
            packing: Packing::Packed,
            ..base
        },
        "no_skipping" => Compute {
            skip_zero_gradient: false,
            ..base
        },
        "checkpointing" => Compute {
            activation_checkpointing: true,
            ..base
        },
        other => bail!(
            "unknown variant `{other}` (default, no_packing, no_prefix_sharing, no_skipping, checkpointing, lora)"
        ),
    })
}

fn run_variant(b: &TrainStepBench, variant: &str, batch_file: &PathBuf) -> Result<()> {
    let compute = compute_of(variant, b.max_tokens_per_microbatch)?;
    let lora = (variant == "lora").then(|| tandem_model::LoraSection {
        rank: b.lora_rank,
        alpha: 2.0 * b.lora_rank as f64,
        ..Default::default()
    });
    let p = tandem_model::load_policy(&b.model, lora.as_ref(), None)?;
    let text = std::fs::read_to_string(batch_file)
        .with_context(|| format!("reading {}", batch_file.display()))?;
    let batch: Value = serde_json::from_str(&text)?;
    let rollouts: Vec<Rollout> = serde_json::from_value(batch["rollouts"].clone())?;
    let cfg = config();
    let snapshot = p.model.trainable().snapshot()?;
    let mut times = Vec::new();
    let mut metrics = None;
    for rep in 0..b.warmup + b.reps.max(1) {
        // Every repetition starts from the same weights and a fresh optimizer.
        for (name, var) in p.model.trainable().iter() {
            var.set(&snapshot[&name.to_string()])?;
        }
        let mut opt = tandem_trainer::rl::step::Optimizer::new(&cfg.optimizer, &p.model, vec![])?;
        let t0 = Instant::now();
        let m = tandem_trainer::rl::step::StepPlan {
            policy: &p.model,
            frozen: tandem_trainer::rl::step::Frozen::default(),
            critic: None,
            rollouts: &rollouts,
            algorithm: &cfg.algorithm,
            optimizer: &cfg.optimizer,
            step_index: 0,
            policy_version: None,
            compute: &compute,
        }
        .run(&mut opt)?;
        p.model.device().synchronize()?;
        if rep >= b.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
        metrics = Some(m);
    }
    let m = metrics.unwrap_or_default();
    println!(
        "{}",
        json!({
            "seconds": median(times),
            "tokens": m.forward_tokens,
            "completion_tokens": m.tokens,
            "skipped_tokens": m.skipped_tokens,
            "loss": m.loss,
            "grad_norm": m.grad_norm,
            "peak_rss_mib": peak_rss_mib(),
            "trainable_parameters": p.model.trainable().numel(),
        })
    );
    Ok(())
}

fn run_all(b: &TrainStepBench) -> Result<()> {
    let mut variants: Vec<String> = b
        .variants
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if b.lora && !variants.iter().any(|v| v == "lora") {
        variants.push("lora".into());
    }
    for v in &variants {
        compute_of(v, 1)?;
    }
    let p = tandem_model::load_model(&b.model)?;
    let rollouts = batch(b, p.model.config().vocab_size)?;
    drop(p);
    // Every prompt and completion token, each once: what any layout computes at least.
    let rollouts_tokens: u64 = rollouts
        .iter()
        .map(|r| (r.prompt_ids.len() + r.completion_ids.len()) as u64)
        .sum();
    let dir = tempfile::tempdir()?;
    let batch_file = dir.path().join("batch.json");
    let cfg = config();
    std::fs::write(
        &batch_file,
        serde_json::to_string(&json!({
            "rollouts": rollouts,
            "clip_eps_low": cfg.algorithm.clip_eps_low,
            "clip_eps_high": cfg.algorithm.clip_eps_high,
            "lr": cfg.optimizer.lr,
            "betas": cfg.optimizer.betas,
            "eps": cfg.optimizer.eps,
            "weight_decay": cfg.optimizer.weight_decay,
            "max_grad_norm": cfg.optimizer.max_grad_norm,
        }))?,
    )?;
    let exe = std::env::current_exe()?;
    let threads = b.threads.to_string();
    let bar = indicatif::ProgressBar::new(variants.len() as u64 + u64::from(b.reference.is_some()));
    let mut tandem = serde_json::Map::new();
    for v in &variants {
        bar.set_message(format!("tandem {v}"));
        let mut cmd = Command::new(&exe);
        cmd.env("RAYON_NUM_THREADS", &threads)
            .args(["bench", "train-step", "--model", &b.model, "--variant", v])
            .arg("--batch")
            .arg(&batch_file)
            .args(["--reps", &b.reps.to_string()])
            .args(["--warmup", &b.warmup.to_string()])
            .args(["--lora-rank", &b.lora_rank.to_string()])
            .args([
                "--max-tokens-per-microbatch",
                &b.max_tokens_per_microbatch.to_string(),
            ]);
        tandem.insert(v.clone(), run_child(cmd, &format!("tandem variant {v}"))?);
        bar.inc(1);
    }
    let mut result = json!({
        "threads": b.threads,
        "model": b.model,
        "reps": b.reps,
        "warmup": b.warmup,
        "batch": {
            "prompts": b.prompts, "group_size": b.group_size, "prompt_tokens": b.prompt_tokens,
            "completion_tokens": [b.min_completion, b.max_completion], "seed": b.seed,
        },
        "variants": tandem,
    });
    if let Some(first) = variants.first() {
        result["tandem"] = result["variants"][first].clone();
    }
    if let Some(script) = &b.reference {
        bar.set_message("reference");
        let gguf = tandem_model::fetch::resolve(&b.model)?;
        let mut cmd = Command::new(&b.python);
        cmd.arg(script)
            .arg("--gguf")
            .arg(&gguf)
            .arg("--batch")
            .arg(&batch_file)
            .args(["--threads", &threads])
            .args(["--reps", &b.reps.to_string()])
            .args(["--warmup", &b.warmup.to_string()])
            .args(["--microbatch", &b.reference_microbatch.to_string()]);
        let (reference, printed) = crate::reference::run::<TrainStepReference>(cmd)?;
        if reference.tokens < rollouts_tokens {
            bail!(
                "the reference script computed {} tokens, fewer than the batch's {rollouts_tokens}",
                reference.tokens
            );
        }
        result["reference"] = printed;
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_table(&result, &variants);
    result["cpu"] = crate::timing::cpu();
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(result: &Value, variants: &[String]) {
    let reference = result["reference"]["seconds"].as_f64();
    println!("| variant | seconds | tokens computed | peak RSS MiB | reference / variant |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, v: &Value| {
        let s = v["seconds"].as_f64();
        let speedup = match (reference, s) {
            (Some(r), Some(s)) if s > 0.0 => format!("{:.2}×", r / s),
            _ => "–".into(),
        };
        println!(
            "| {name} | {} | {} | {} | {speedup} |",
            s.map_or("–".into(), |s| format!("{s:.2}")),
            v["tokens"].as_u64().map_or("–".into(), |t| t.to_string()),
            v["peak_rss_mib"]
                .as_f64()
                .map_or("–".into(), |m| format!("{m:.0}")),
        );
    };
    for v in variants {
        row(&format!("tandem {v}"), &result["variants"][v]);
    }
    if !result["reference"].is_null() {
        row("reference (PyTorch, TRL-style)", &result["reference"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        b: TrainStepBench,
    }

    #[test]
    fn the_batch_is_deterministic_and_has_two_zero_advantage_groups() {
        let b = Cli::parse_from(["x", "--prompts", "4", "--group-size", "3"]).b;
        let (x, y) = (batch(&b, 1000).unwrap(), batch(&b, 1000).unwrap());
        assert_eq!(
            serde_json::to_string(&x).unwrap(),
            serde_json::to_string(&y).unwrap()
        );
        assert_eq!(x.len(), 12);
        let rewards =
            |g: usize| -> Vec<f64> { x[g * 3..g * 3 + 3].iter().map(|r| r.reward).collect() };
        assert_eq!(rewards(0), vec![0.0; 3]);
        assert_eq!(rewards(1), vec![1.0; 3]);
        assert!(x
            .iter()
            .all(|r| (16..=256).contains(&r.completion_ids.len())));
        for v in [
            "default",
            "no_packing",
            "no_prefix_sharing",
            "no_skipping",
            "checkpointing",
            "lora",
        ] {
            compute_of(v, 8).unwrap();
        }
        let e = compute_of("fast", 8).unwrap_err().to_string();
        assert!(e.contains("unknown variant `fast`"), "{e}");
    }
}
