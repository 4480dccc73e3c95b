//! Phase 2: π_prox, the policy the ratios are taken against, fixed over `ppo_epochs`;
//! and π_ref's logprobs.
//!
//! `prox_logp = "recompute"`: π_prox = π_θ at the step's start, without gradient. When
//! the rewards need it (the KL in the reward) or the critic does (GAE's starting values
//! read the same pass), one pass before the rewards covers every completion. Otherwise
//! it waits for the active set and covers only the completions with a gradient: the
//! first minibatch's π_prox is its own training forward of the first epoch, detached
//! (one forward fewer, and there the ratio is exactly 1 in any dtype; later epochs
//! reuse it), the other minibatches' come from one pass before the updates.
//!
//! `prox_logp = "loglinear"`: AReaL's approximation from the token versions, per
//! minibatch (see [`crate::rl::proximal`]).

use candle_core::Tensor;
use tandem_model::CompletionLogprobs;

use super::active::ActiveSet;
use super::batch::Batch;
use super::minibatch::Micro;
use super::{pick, StepPlan};
use crate::config::{CorrectionMode, KlIn};
use crate::error::{invalid, Result};
use crate::rl::advantage::Estimator;
use crate::rl::proximal::{self, ProxLogp};
use crate::rl::rollout::Rollout;

/// π_prox as far as it is known before the rewards.
pub(super) struct Proximal {
    /// α per token (`loglinear`).
    alpha: Option<Tensor>,
    /// Every completion's π_prox (`recompute`), when the pass ran before the rewards.
    all: Option<Tensor>,
    /// The final hidden states of that pass (the critic's starting values read them).
    pub hidden: Option<Tensor>,
}

/// π_prox of the active completions, as the minibatches read it.
pub(super) enum ActiveProx {
    /// log π_prox = log μ + α(log π_θ − log μ), α per token.
    Loglinear(Tensor),
    Recomputed {
        /// The first minibatch's π_prox is its own first forward, detached.
        from_forward: bool,
        /// Where in the active set `later` starts.
        first_active: usize,
        /// π_prox of the active completions from `first_active` on, token-aligned from
        /// `active.offsets[first_active]`.
        later: Option<Tensor>,
    },
}

impl Proximal {
    /// α from the token versions (`loglinear`, [`proximal::loglinear_alpha`]); or, when
    /// the rewards or the critic need it before the minibatches, one pass over every
    /// completion: log π_prox = log π_θ(y | x) at the step's start, without gradient.
    pub fn before_rewards(plan: &StepPlan, batch: &Batch) -> Result<Self> {
        let cfg = plan.algorithm;
        let loglinear = cfg.prox_logp == ProxLogp::Loglinear;
        let alpha = if loglinear {
            Some(batch.tensor(loglinear_alpha_of(plan.rollouts, plan.policy_version)?)?)
        } else {
            None
        };
        let kl_in_reward = cfg.kl_coef > 0.0 && cfg.kl_in == KlIn::Reward;
        let gae = cfg.advantage == Estimator::Gae;
        let (mut all, mut hidden) = (None, None);
        if (!loglinear && kl_in_reward) || gae {
            let out = start_pass(plan, &batch.seqs, &batch.starts)?;
            hidden = Some(out.hidden);
            all = (!loglinear).then_some(out.logprobs);
        }
        Ok(Proximal { alpha, all, hidden })
    }

    /// π_old of the KL in the reward: π_prox in decoupled mode, μ in bypass mode or
    /// with `loglinear` (which has no π_prox before the minibatches).
    pub fn old_for_reward(&self, plan: &StepPlan, batch: &Batch) -> Tensor {
        match (&self.all, plan.algorithm.correction_mode) {
            (Some(all), CorrectionMode::Decoupled) => all.clone(),
            _ => batch.mu.clone(),
        }
    }

    /// π_prox of the active completions: α as it is (`loglinear`); the rows of the
    /// pass before the rewards; or a pass over the active completions after the first
    /// minibatch's, whose π_prox its own first forward gives.
    pub fn of_active(
        self,
        plan: &StepPlan,
        batch: &Batch,
        active: &ActiveSet,
    ) -> Result<ActiveProx> {
        if let Some(alpha) = self.alpha {
            return Ok(ActiveProx::Loglinear(alpha));
        }
        let from_forward = self.all.is_none();
        let first_active = if from_forward {
            let first_end = batch.sequences() / plan.minibatches();
            active.ids.partition_point(|&i| i < first_end)
        } else {
            0
        };
        let later = match &self.all {
            Some(all) => Some(
                all.contiguous()?
                    .index_select(&batch.token_index(&active.ids)?, 0)?,
            ),
            None if active.ids.len() == first_active => None,
            None => {
                let later = &active.ids[first_active..];
                let (seqs, starts) = (pick(&batch.seqs, later), pick(&batch.starts, later));
                Some(start_pass(plan, &seqs, &starts)?.logprobs)
            }
        };
        Ok(ActiveProx::Recomputed {
            from_forward,
            first_active,
            later,
        })
    }
}

impl ActiveProx {
    /// π_prox of micro-batch `micro`, whose training forward gave `logprobs`:
    ///
    ///   loglinear: log π_prox = log μ + α(log π_θ − log μ)
    ///   recompute: the first minibatch's own first forward, detached (kept in `first`
    ///   for the later epochs), or the rows of the pass over the others
    pub fn of_micro(
        &self,
        micro: &Micro,
        logprobs: &Tensor,
        mu: &Tensor,
        active: &ActiveSet,
        first: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        match self {
            ActiveProx::Loglinear(alpha) => proximal::loglinear(mu, logprobs, &micro.take(alpha)?),
            ActiveProx::Recomputed {
                from_forward: true, ..
            } if micro.minibatch == 0 => {
                if micro.epoch == 0 {
                    first.push(logprobs.detach());
                }
                first
                    .get(micro.index)
                    .cloned()
                    .ok_or_else(|| invalid("no proximal logprobs"))
            }
            ActiveProx::Recomputed {
                later: Some(p),
                first_active,
                ..
            } => {
                let o = &active.offsets;
                let (a0, a1) = (micro.active.start, micro.active.end);
                Ok(p.narrow(0, o[a0] - o[*first_active], o[a1] - o[a0])?)
            }
            ActiveProx::Recomputed { later: None, .. } => Err(invalid("no proximal logprobs")),
        }
    }
}

/// log π_ref of every completion token (when `kl_coef` > 0).
pub(super) fn reference_logprobs(plan: &StepPlan, batch: &Batch) -> Result<Option<Tensor>> {
    if plan.algorithm.kl_coef > 0.0 {
        let reference = plan.reference()?;
        let out = reference.completion_logprobs_with(
            &reference.inference_weights(),
            &batch.seqs,
            &batch.starts,
            plan.algorithm.temperature,
            plan.compute.packing,
        )?;
        Ok(Some(out.logprobs))
    } else {
        Ok(None)
    }
}

/// The policy at the step's start, without gradient, on `seqs`.
fn start_pass(plan: &StepPlan, seqs: &[Vec<u32>], starts: &[usize]) -> Result<CompletionLogprobs> {
    Ok(plan.policy.completion_logprobs_with(
        &plan.policy.inference_weights(),
        seqs,
        starts,
        plan.algorithm.temperature,
        plan.compute.packing,
    )?)
}

/// α of every completion token, from the rollouts' `versions`; the policy's version
/// defaults to the newest trained token's version. A token the rollout's `loss_mask`
/// leaves out is not trained: its version is not read (α = 0).
fn loglinear_alpha_of(rollouts: &[Rollout], policy_version: Option<u64>) -> Result<Vec<f64>> {
    let mut versions = Vec::new();
    for (i, r) in rollouts.iter().enumerate() {
        let v = r.versions.as_ref().ok_or_else(|| {
            invalid(format!(
                "rollout {i}: prox_logp = \"loglinear\" needs `versions` on every rollout"
            ))
        })?;
        versions.extend(
            v.iter()
                .enumerate()
                .map(|(t, &x)| r.is_trained(t).then_some(x)),
        );
    }
    let current =
        policy_version.unwrap_or_else(|| versions.iter().flatten().copied().max().unwrap_or(0));
    let versions: Vec<u64> = versions.iter().map(|v| v.unwrap_or(current)).collect();
    proximal::loglinear_alpha(&versions, current)
}
