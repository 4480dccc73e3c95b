//! What one training step measured: the fields of its `metrics.jsonl` line and of the
//! coordinator's `tandem_train_*` gauges.

use candle_core::Tensor;
use serde::Serialize;

use crate::error::Result;
use crate::rl::correction::BehaviourWeights;
use crate::rl::rollout::{EpisodeStats, Rollout};
use crate::rl::step::host;

/// What one step measured (means over its optimizer updates where there are several).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepMetrics {
    pub loss: f64,
    pub policy_loss: f64,
    pub kl: f64,
    pub entropy: f64,
    /// Clipped value loss (advantage = "gae").
    pub value_loss: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub clip_fraction_low: f64,
    pub clip_fraction_high: f64,
    /// Raw behaviour weights π_prox/μ (before truncation or masking).
    pub behaviour_weight_mean: f64,
    pub behaviour_weight_max: f64,
    pub behaviour_weight_min: f64,
    /// (Σw)² / (N·Σw²): 1 when on-policy, → 1/N when one token dominates.
    pub behaviour_weight_ess: f64,
    pub masked_fraction: f64,
    /// k3 estimate of KL(μ ‖ π_prox): how far the sampler's numbers are from the trainer's.
    pub mismatch_kl: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// On-policy distillation: mean of log μ − log π_teacher over the trained tokens
    /// (the reverse KL to the teacher, per token).
    pub distill_reverse_kl: f64,
    pub advantage_mean: f64,
    pub advantage_std: f64,
    pub zero_std_groups: usize,
    /// Completions that ended by length (`finish_reason = "length"`).
    pub truncated_sequences: usize,
    /// Completion tokens with loss mask 0 (the rollouts' `loss_mask`, `mask_truncated`).
    pub loss_masked_tokens: usize,
    /// Mean reward DAPO's overlong penalty added (≤ 0; 0 when off).
    pub overlong_penalty_mean: f64,
    /// Multi-turn episodes (`[env]`): mean model turns and tool calls per completion,
    /// failed calls and seconds in tools over the step's completions.
    pub turns_per_episode: f64,
    pub tool_calls_per_episode: f64,
    pub tool_errors: usize,
    pub tool_seconds: f64,
    pub sequences: usize,
    /// Completion tokens of the step.
    pub tokens: usize,
    /// Completions (and their completion tokens) whose loss was identically zero and
    /// whose forward, backward and π_prox pass were skipped.
    pub skipped_sequences: usize,
    pub skipped_tokens: usize,
    /// Tokens the training forwards computed (packed rows, prompts included, every
    /// epoch and minibatch): what packing, prompt sharing and skipping save.
    pub forward_tokens: usize,
    pub optimizer_steps: usize,
    /// Optimizer updates skipped because a loss or the gradient norm was not finite
    /// (the weights stay as they were; alert on it).
    pub non_finite_updates_skipped: usize,
    /// Each completion's advantage, the mean over its trained tokens (over all of
    /// them when none is trained), in the rollouts' order: for `samples.jsonl`, not a
    /// metric.
    #[serde(skip)]
    pub completion_advantages: Vec<f64>,
}

impl StepMetrics {
    /// The episode metrics of `rollouts`: turns and tool calls per completion (means),
    /// failed calls and tool seconds (sums). A rollout without episode statistics is one
    /// turn without tools.
    pub(crate) fn count_episodes(&mut self, rollouts: &[Rollout]) {
        let one_turn = EpisodeStats {
            turns: 1,
            ..Default::default()
        };
        let episodes: Vec<EpisodeStats> = rollouts
            .iter()
            .map(|r| r.episode.unwrap_or(one_turn))
            .collect();
        let n = episodes.len().max(1) as f64;
        self.turns_per_episode = episodes.iter().map(|e| f64::from(e.turns)).sum::<f64>() / n;
        self.tool_calls_per_episode = episodes
            .iter()
            .map(|e| f64::from(e.tool_calls))
            .sum::<f64>()
            / n;
        self.tool_errors = episodes.iter().map(|e| e.tool_errors as usize).sum();
        self.tool_seconds = episodes.iter().map(|e| e.tool_seconds).sum();
    }
}

/// Running sums for the behaviour-weight metrics.
#[derive(Default)]
pub(crate) struct WeightStats {
    n: usize,
    sum: f64,
    sum_sq: f64,
    max: f64,
    min: f64,
    masked: f64,
    mismatch_k3: f64,
}

impl WeightStats {
    /// Adds the trained tokens' (mask > 0) weights.
    pub(crate) fn add(
        &mut self,
        bw: &BehaviourWeights,
        prox: &Tensor,
        mu: &Tensor,
        mask: &[f64],
    ) -> Result<()> {
        let trained = |xs: Vec<f64>| -> Vec<f64> {
            xs.into_iter()
                .zip(mask)
                .filter(|(_, &m)| m > 0.0)
                .map(|(x, _)| x)
                .collect()
        };
        let raw = trained(host(&bw.raw)?);
        if self.n == 0 {
            (self.max, self.min) = (f64::NEG_INFINITY, f64::INFINITY);
        }
        for &w in &raw {
            self.sum += w;
            self.sum_sq += w * w;
            self.max = self.max.max(w);
            self.min = self.min.min(w);
        }
        self.masked += bw.masked_fraction * raw.len() as f64;
        self.mismatch_k3 += trained(host(&(prox - mu)?)?)
            .iter()
            .map(|d| d.exp() - d - 1.0)
            .sum::<f64>();
        self.n += raw.len();
        Ok(())
    }

    /// mean, max, min, ESS = (Σw)² / (N·Σw²), masked fraction and the mismatch KL
    /// k3(μ ‖ π_prox) averaged over tokens.
    pub(crate) fn finish(&self, m: &mut StepMetrics) {
        let n = self.n.max(1) as f64;
        m.behaviour_weight_mean = self.sum / n;
        m.behaviour_weight_max = self.max;
        m.behaviour_weight_min = self.min;
        m.behaviour_weight_ess = self.sum * self.sum / (n * self.sum_sq);
        m.masked_fraction = self.masked / n;
        m.mismatch_kl = self.mismatch_k3 / n;
    }
}
