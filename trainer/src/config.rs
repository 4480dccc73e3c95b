//! The `[algorithm]` and `[optimizer]` sections of a run's TOML config: every field with
//! its default, unknown keys rejected by name.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::rl::advantage::Estimator;
use crate::rl::aggregate::LossAgg;
use crate::rl::correction::{Correction, Level};
use crate::rl::kl::KlEstimator;
use crate::rl::policy_loss::PolicyLoss;
use crate::rl::proximal::ProxLogp;
use tandem_model::packing::{ForwardOptions, Packing};
use tandem_weights::BroadcastPlane;

/// Which policy π_old the ratio is taken against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionMode {
    /// Three-policy (AReaL): ratio against π_prox, recomputed by the trainer at the start
    /// of the step, times the behaviour weight π_prox/μ.
    Decoupled,
    /// Two-policy: ratio against the generator's μ directly; no behaviour weight.
    Bypass,
}

/// Where the KL penalty to the reference model goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlIn {
    /// + β·KL aggregated like the policy loss (GRPO).
    Loss,
    /// r − β·Σₜ KLₜ per sequence (InstructGPT's regularised reward).
    Reward,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLossKind {
    PpoClip,
    Reinforce,
    Gspo,
    Cispo,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorrectionKind {
    None,
    Tis,
    Icepop,
}

/// `[algorithm]`: how rollouts become a loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlgorithmConfig {
    /// reinforce | reinforce_no_baseline | rloo | grpo | drgrpo | reinforce_pp | gae.
    pub advantage: Estimator,
    /// GAE discount γ (advantage = "gae").
    pub gamma: f64,
    /// GAE λ.
    pub lambda: f64,
    /// Value-loss clip ε_v around the step's starting values.
    pub value_clip: f64,
    /// Weight of the value loss in the total loss.
    pub vf_coef: f64,
    /// ppo_clip | reinforce | gspo (sequence-level ratio) | cispo (clipped IS weight).
    pub policy_loss: PolicyLossKind,
    /// PPO ε below 1 (Schulman et al. 2017); GSPO's too (its paper uses 3e-4).
    pub clip_eps_low: f64,
    /// PPO ε above 1; raise it for clip-higher (DAPO uses 0.28); GSPO's paper uses 4e-4.
    pub clip_eps_high: f64,
    /// CISPO's weight clip below 1: the weight is at least 1 − ε (1.0 = no lower bound).
    pub cispo_eps_low: f64,
    /// CISPO's weight clip above 1: the weight is at most 1 + ε.
    pub cispo_eps_high: f64,
    /// Dual-clip bound c > 1 for negative advantages (Ye et al. 2020); unset = off.
    pub clip_c: Option<f64>,
    /// decoupled (π_prox recomputed, AReaL) | bypass (ratio against μ).
    pub correction_mode: CorrectionMode,
    /// recompute (a forward pass at the step's start) | loglinear (AReaL's
    /// interpolation by token version, no extra pass); decoupled mode only.
    pub prox_logp: ProxLogp,
    /// none | tis (truncated IS) | icepop (mask outside a band); decoupled mode only.
    pub correction: CorrectionKind,
    /// token | sequence (geometric mean of the token weights).
    pub correction_level: Level,
    /// TIS truncation C.
    pub tis_cap: f64,
    /// IcePop band.
    pub icepop_low: f64,
    pub icepop_high: f64,
    /// token_mean | seq_mean_token_mean | seq_sum_norm.
    pub loss_agg: LossAgg,
    /// Normaliser of seq_sum_norm (Dr. GRPO) and L_max of the overlong penalty: the
    /// generation length limit.
    pub max_completion_len: usize,
    /// Give no loss to completions that ended by length (`finish_reason = "length"`);
    /// their reward still enters the group's advantage statistics (DAPO's overlong
    /// filtering, TRL's `mask_truncated_completions`).
    pub mask_truncated: bool,
    /// L_c of DAPO's soft overlong punishment (0 = off): a completion longer than
    /// max_completion_len − L_c trained tokens loses up to `overlong_penalty` reward.
    pub overlong_buffer_len: usize,
    /// p: the reward taken from a completion at or past max_completion_len.
    pub overlong_penalty: f64,
    /// β of the KL to the reference model (0 = off, no reference model needed).
    pub kl_coef: f64,
    /// k1 | k2 | k3 (Schulman 2020).
    pub kl_estimator: KlEstimator,
    /// loss | reward.
    pub kl_in: KlIn,
    /// Entropy bonus coefficient (subtracted from the loss).
    pub entropy_coef: f64,
    /// On-policy distillation: a frozen teacher model (a model path, sharing the
    /// policy's tokenizer) whose per-token reverse KL enters the advantages.
    pub teacher: Option<String>,
    /// λ of the distillation term λ·(log π_teacher − log μ) added to each token's
    /// advantage.
    pub distill_coef: f64,
    /// Softmax temperature, the generator's.
    pub temperature: f64,
    /// Passes over the batch per step.
    pub ppo_epochs: usize,
    /// Optimizer steps per pass (the batch split into this many minibatches).
    pub minibatches: usize,
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        AlgorithmConfig {
            advantage: Estimator::Grpo,
            gamma: 1.0,
            lambda: 0.95,
            value_clip: 0.2,
            vf_coef: 0.5,
            policy_loss: PolicyLossKind::PpoClip,
            clip_eps_low: 0.2,
            clip_eps_high: 0.2,
            cispo_eps_low: 1.0,
            cispo_eps_high: 0.28,
            clip_c: None,
            correction_mode: CorrectionMode::Decoupled,
            prox_logp: ProxLogp::Recompute,
            correction: CorrectionKind::None,
            correction_level: Level::Token,
            tis_cap: 2.0,
            icepop_low: 0.5,
            icepop_high: 2.0,
            loss_agg: LossAgg::TokenMean,
            max_completion_len: 1024,
            mask_truncated: false,
            overlong_buffer_len: 0,
            overlong_penalty: 1.0,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            kl_in: KlIn::Loss,
            entropy_coef: 0.0,
            teacher: None,
            distill_coef: 1.0,
            temperature: 1.0,
            ppo_epochs: 1,
            minibatches: 1,
        }
    }
}

impl AlgorithmConfig {
    pub fn policy_loss(&self) -> PolicyLoss {
        match self.policy_loss {
            PolicyLossKind::PpoClip => PolicyLoss::PpoClip {
                eps_low: self.clip_eps_low,
                eps_high: self.clip_eps_high,
                dual_clip: self.clip_c,
            },
            PolicyLossKind::Reinforce => PolicyLoss::Reinforce,
            PolicyLossKind::Gspo => PolicyLoss::Gspo {
                eps_low: self.clip_eps_low,
                eps_high: self.clip_eps_high,
            },
            PolicyLossKind::Cispo => PolicyLoss::Cispo {
                eps_low: self.cispo_eps_low,
                eps_high: self.cispo_eps_high,
            },
        }
    }

    pub fn correction(&self) -> Correction {
        match self.correction {
            CorrectionKind::None => Correction::None,
            CorrectionKind::Tis => Correction::Tis { cap: self.tis_cap },
            CorrectionKind::Icepop => Correction::Icepop {
                low: self.icepop_low,
                high: self.icepop_high,
            },
        }
    }

    /// Checks ranges and combinations; the message names the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[algorithm] {key}: {why}")));
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return bad("temperature", "must be > 0");
        }
        if self.kl_coef.is_nan() || self.kl_coef < 0.0 {
            return bad("kl_coef", "must be ≥ 0");
        }
        if !(self.distill_coef.is_finite() && self.distill_coef >= 0.0) {
            return bad("distill_coef", "must be a number ≥ 0");
        }
        if self.teacher.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return bad("teacher", "must be a model path (or left out)");
        }
        if self.entropy_coef.is_nan() {
            return bad("entropy_coef", "must be a number");
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lambda) {
            return bad("gamma", "gamma and lambda must be in [0, 1]");
        }
        if self.value_clip.is_nan() || self.value_clip <= 0.0 {
            return bad("value_clip", "must be > 0");
        }
        if self.vf_coef.is_nan() || self.vf_coef < 0.0 {
            return bad("vf_coef", "must be ≥ 0");
        }
        if self.ppo_epochs == 0 {
            return bad("ppo_epochs", "must be ≥ 1");
        }
        if self.minibatches == 0 {
            return bad("minibatches", "must be ≥ 1");
        }
        if self.loss_agg == LossAgg::SeqSumNorm && self.max_completion_len == 0 {
            return bad(
                "max_completion_len",
                "must be ≥ 1 with loss_agg = \"seq_sum_norm\"",
            );
        }
        if self.correction_mode == CorrectionMode::Bypass && self.correction != CorrectionKind::None
        {
            return bad(
                "correction",
                "needs correction_mode = \"decoupled\" (bypass takes the ratio against μ directly)",
            );
        }
        if self.correction_mode == CorrectionMode::Bypass && self.prox_logp == ProxLogp::Loglinear {
            return bad(
                "prox_logp",
                "\"loglinear\" needs correction_mode = \"decoupled\" (bypass has no π_prox)",
            );
        }
        if !(0.0..1.0).contains(&self.clip_eps_low)
            || self.clip_eps_high.is_nan()
            || self.clip_eps_high < 0.0
        {
            return bad("clip_eps_low", "must be in [0, 1), and clip_eps_high ≥ 0");
        }
        if !(0.0..=1.0).contains(&self.cispo_eps_low)
            || self.cispo_eps_high.is_nan()
            || self.cispo_eps_high < 0.0
        {
            return bad(
                "cispo_eps_low",
                "must be in [0, 1] (1 = no lower bound), and cispo_eps_high ≥ 0",
            );
        }
        if self.overlong_buffer_len > self.max_completion_len {
            return bad(
                "overlong_buffer_len",
                "must be ≤ max_completion_len (0 turns the penalty off)",
            );
        }
        if !(self.overlong_penalty.is_finite() && self.overlong_penalty >= 0.0) {
            return bad("overlong_penalty", "must be a number ≥ 0");
        }
        if self.clip_c.is_some() && self.policy_loss != PolicyLossKind::PpoClip {
            return bad(
                "clip_c",
                "dual clip applies to policy_loss = \"ppo_clip\" only",
            );
        }
        if let Some(c) = self.clip_c {
            if c.is_nan() || c <= 1.0 {
                return bad("clip_c", "must be > 1");
            }
        }
        if self.tis_cap.is_nan() || self.tis_cap <= 0.0 {
            return bad("tis_cap", "must be > 0");
        }
        if self.icepop_low.is_nan()
            || self.icepop_high.is_nan()
            || self.icepop_low < 0.0
            || self.icepop_low > self.icepop_high
        {
            return bad("icepop_low", "must be in [0, icepop_high]");
        }
        Ok(())
    }
}

/// `[optimizer]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    /// adamw | sgd.
    pub name: OptimizerName,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Decoupled weight decay (matrices only).
    pub weight_decay: f64,
    /// Global-norm clipping threshold; 0 = off.
    pub max_grad_norm: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// constant | cosine (to `min_lr_ratio`·lr at `total_steps`).
    pub schedule: Schedule,
    pub total_steps: u64,
    pub min_lr_ratio: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Cosine,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            name: OptimizerName::Adamw,
            lr: 1e-6,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            total_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

impl OptimizerConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[optimizer] {key}: {why}")));
        if self.lr.is_nan() || self.lr < 0.0 {
            return bad("lr", "must be ≥ 0");
        }
        if self.max_grad_norm.is_nan() || self.max_grad_norm < 0.0 {
            return bad("max_grad_norm", "must be ≥ 0 (0 = off)");
        }
        if self.schedule == Schedule::Cosine && self.total_steps == 0 {
            return bad("total_steps", "must be set with schedule = \"cosine\"");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "must be in [0, 1]");
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based): linear warm-up, then constant
    /// or cosine decay lr·(r + (1 − r)·½(1 + cos(π·progress))).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let r = self.min_lr_ratio;
                self.lr * (r + (1.0 - r) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()))
            }
        }
    }

    pub fn max_grad_norm(&self) -> Option<f64> {
        (self.max_grad_norm > 0.0).then_some(self.max_grad_norm)
    }
}

/// `[trainer]`: the trainer service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainerConfig {
    /// Groups the buffer holds before it stops reading from generators (back-pressure).
    pub buffer_capacity: usize,
    /// Write each consumed batch as rollouts JSONL (`RUN_DIR/batches/step-N.jsonl`),
    /// replayable with `tandem train-step`.
    pub dump_batches: bool,
    /// Payload size of one weight bucket, MiB.
    pub bucket_mib: usize,
    /// Write a checkpoint every this many steps (0 = only the final model).
    pub checkpoint_every: u64,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Benchmarks only: sleep this long per step instead of training (the weights stay
    /// as they are, versions still advance and are published; 0 = train for real).
    pub mock_train_ms: u64,
    /// How new versions reach generators beside the gRPC fetch (`tandem_weights::broadcast`).
    pub broadcast: BroadcastPlane,
    /// A broadcast member that has not acknowledged a version this long after it was
    /// sent is excluded from the group (it fetches over gRPC); generators wait this
    /// long for a broadcast before fetching.
    pub broadcast_timeout_s: f64,
    /// Layout of the training forward: shared_prefix (sequences packed without
    /// padding, each group's prompt computed once), packed (no padding, every prompt
    /// computed per completion) or padded (every sequence padded to the longest).
    pub packing: Packing,
    /// Token budget of one micro-batch: a minibatch is cut into packed rows of at most
    /// this many tokens whose gradients are accumulated before the optimizer step, so a
    /// step's memory is bounded by tokens, not by batch × longest sequence. A sequence
    /// longer than the budget is a micro-batch of its own.
    pub max_tokens_per_microbatch: usize,
    /// Completions whose per-token loss is identically zero (zero advantage and no KL,
    /// entropy or value term) skip the forward, the backward and the π_prox pass; they
    /// still count in every loss denominator.
    pub skip_zero_gradient: bool,
    /// Recompute each decoder layer in the backward instead of keeping its activations
    /// (about one more forward of compute for a fraction of the memory).
    pub activation_checkpointing: bool,
}

/// The compute part of `[trainer]`: how a step lays out and schedules its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compute {
    pub packing: Packing,
    pub max_tokens_per_microbatch: usize,
    pub skip_zero_gradient: bool,
    pub activation_checkpointing: bool,
}

impl Default for Compute {
    fn default() -> Self {
        TrainerConfig::default().compute()
    }
}

impl Compute {
    /// The model's options for one training forward.
    pub fn forward(&self) -> ForwardOptions {
        ForwardOptions {
            packing: self.packing,
            checkpoint_layers: self.activation_checkpointing,
        }
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            buffer_capacity: 64,
            dump_batches: false,
            bucket_mib: tandem_proto::WEIGHT_BUCKET_BYTES >> 20,
            checkpoint_every: 20,
            keep_checkpoints: 2,
            mock_train_ms: 0,
            broadcast: BroadcastPlane::Off,
            broadcast_timeout_s: 30.0,
            packing: Packing::SharedPrefix,
            max_tokens_per_microbatch: 8192,
            skip_zero_gradient: true,
            activation_checkpointing: false,
        }
    }
}

impl TrainerConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[trainer] {key}: {why}")));
        if self.buffer_capacity == 0 {
            return bad("buffer_capacity", "must be ≥ 1");
        }
        if self.keep_checkpoints == 0 {
            return bad("keep_checkpoints", "must be ≥ 1");
        }
        if self.bucket_mib == 0 || self.bucket_mib > 48 {
            return bad(
                "bucket_mib",
                "must be in 1..=48 (a bucket is one gRPC message)",
            );
        }
        if !(self.broadcast_timeout_s.is_finite() && self.broadcast_timeout_s > 0.0) {
            return bad("broadcast_timeout_s", "must be a number of seconds > 0");
        }
        if self.max_tokens_per_microbatch == 0 {
            return bad(
                "max_tokens_per_microbatch",
                "must be ≥ 1 (tokens of one packed micro-batch; 8192 is the default)",
            );
        }
        Ok(())
    }

    /// The settings a training step uses.
    pub fn compute(&self) -> Compute {
        Compute {
            packing: self.packing,
            max_tokens_per_microbatch: self.max_tokens_per_microbatch,
            skip_zero_gradient: self.skip_zero_gradient,
            activation_checkpointing: self.activation_checkpointing,
        }
    }
}

/// The sections of a config file the trainer reads; other sections are other parts'.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub algorithm: AlgorithmConfig,
    pub optimizer: OptimizerConfig,
    pub trainer: TrainerConfig,
    /// `[lora]`: the step trains adapters on the frozen model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<tandem_model::LoraSection>,
}

impl TrainConfig {
    /// Parses TOML text; unknown keys and bad values are errors naming the key.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| invalid(format!("config: {e}")))?;
        cfg.algorithm.validate()?;
        cfg.optimizer.validate()?;
        cfg.trainer.validate()?;
        if let Some(l) = &cfg.lora {
            l.validate()?;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_from_empty_text() {
        assert_eq!(TrainConfig::from_toml("").unwrap(), TrainConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = TrainConfig::from_toml("[algorithm]\nclip_eps = 0.2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("clip_eps"), "{e}");
        let e = TrainConfig::from_toml("[algorithm]\nadvantage = \"ppo\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("advantage") || e.contains("ppo"), "{e}");
        let e = TrainConfig::from_toml(
            "[algorithm]\ncorrection_mode = \"bypass\"\ncorrection = \"tis\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[algorithm] correction"), "{e}");
        let e = TrainConfig::from_toml("[optimizer]\nschedule = \"cosine\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("total_steps"), "{e}");
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = OptimizerConfig {
            lr: 1.0,
            warmup_steps: 2,
            schedule: Schedule::Cosine,
            total_steps: 12,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert_eq!(c.lr_at(0), 0.5);
        assert_eq!(c.lr_at(1), 1.0);
        assert!((c.lr_at(2) - 1.0).abs() < 1e-12);
        assert!((c.lr_at(7) - 0.55).abs() < 1e-12);
        assert!((c.lr_at(12) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(100) - 0.1).abs() < 1e-12);
    }
}
