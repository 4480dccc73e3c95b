//! `tandem train-step`: one optimizer step of the configured algorithm on a rollout
//! file — how a run's dumped batches are replayed and debugged.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tandem_model::{ScalarHead, VALUE_HEAD_FILE};
use tandem_trainer::config::TrainConfig;
use tandem_trainer::rl::advantage::Estimator;
use tandem_trainer::rl::rollout;
use tandem_trainer::rl::step::{Frozen, Optimizer, StepPlan};

#[derive(Args)]
pub struct TrainStepArgs {
    /// The policy to start from (HF folder or .gguf); also the KL reference. With
    /// `[lora]` in the config, the frozen base the adapter is trained on.
    #[arg(long)]
    model: String,
    /// With `[lora]`: the PEFT adapter folder to go on from (a run's checkpoint or
    /// `final/`, or an earlier `train-step --out`); else the section's adapter.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Rollout JSONL: {"group", "prompt_ids", "completion_ids", "behavior_logprobs", "reward"[, "versions"]}.
    #[arg(long)]
    rollouts: PathBuf,
    /// TOML with [algorithm], [optimizer] and [trainer] sections (every key optional;
    /// [trainer] sets the step's layout: packing, max_tokens_per_microbatch, …).
    #[arg(long)]
    config: PathBuf,
    /// Output HF folder (with `[lora]`, the adapter in PEFT's format); metrics go to
    /// OUT/metrics.json.
    #[arg(long)]
    out: PathBuf,
    /// The policy version the model holds, for `prox_logp = "loglinear"`
    /// (default: the newest of the rollouts' `versions`).
    #[arg(long)]
    policy_version: Option<u64>,
}

pub fn run(a: TrainStepArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg =
        TrainConfig::from_toml(&text).with_context(|| format!("in {}", a.config.display()))?;
    if a.adapter.is_some() && cfg.lora.is_none() {
        anyhow::bail!(
            "--adapter: the config has no [lora]; add one (its keys may stay at their defaults)"
        );
    }
    let p = tandem_model::load_policy(&a.model, cfg.lora.as_ref(), a.adapter.as_deref())?;
    let text = std::fs::read_to_string(&a.rollouts)
        .with_context(|| format!("reading {}", a.rollouts.display()))?;
    let rollouts = rollout::parse_jsonl(
        &text,
        &a.rollouts.display().to_string(),
        p.model.config().vocab_size,
    )?;
    // The reference is a frozen copy of the starting weights (under LoRA the base
    // itself: the same weights without the adapter).
    let reference = tandem_trainer::rl::kl::reference(&p.model, &a.model, cfg.algorithm.kl_coef)?;
    let teacher = match &cfg.algorithm.teacher {
        Some(path) => Some(tandem_trainer::rl::distill::load_teacher(path, &p)?),
        None => None,
    };
    // PPO with GAE trains a value head that lives beside the model (zeros when new).
    let critic = if cfg.algorithm.advantage == Estimator::Gae {
        // Under LoRA it goes on from the adapter's folder when one is given.
        let from = cfg.lora.as_ref().and_then(|l| l.from.as_ref());
        let beside = match (&a.adapter, from) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) => dir.into(),
            (None, None) => a.model.clone().into(),
        };
        Some(ScalarHead::load_or_zeros(
            &beside,
            VALUE_HEAD_FILE,
            &p.model,
        )?)
    } else {
        None
    };
    let extra = critic.as_ref().map(|c| c.named_vars()).unwrap_or_default();
    let mut opt = Optimizer::new(&cfg.optimizer, &p.model, extra)?;
    let metrics = StepPlan {
        policy: &p.model,
        frozen: Frozen {
            reference: reference.as_ref(),
            teacher: teacher.as_ref().map(|t| &t.model),
        },
        critic: critic.as_ref(),
        rollouts: &rollouts,
        algorithm: &cfg.algorithm,
        optimizer: &cfg.optimizer,
        step_index: 0,
        policy_version: a.policy_version,
        compute: &cfg.trainer.compute(),
    }
    .run(&mut opt)?;
    tandem_model::save_policy(&p, &a.out, p.trained_dtype(), &a.model)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if let Some(c) = &critic {
        c.save(&a.out, VALUE_HEAD_FILE)
            .with_context(|| format!("writing the value head into {}", a.out.display()))?;
    }
    let path = a.out.join("metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&metrics)?)
        .with_context(|| format!("writing {}", path.display()))?;
    tracing::info!(loss = metrics.loss, grad_norm = metrics.grad_norm, out = %a.out.display(), "step done");
    Ok(())
}
