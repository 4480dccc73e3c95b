//! Phase 3: the rewards the advantages are computed from.

use candle_core::Tensor;

use super::batch::Batch;
use super::prox::Proximal;
use super::{host, StepPlan};
use crate::config::KlIn;
use crate::error::Result;
use crate::rl::kl;
use crate::rl::overlong::overlong_penalty;

/// The shaped reward of each completion and the overlong penalty it includes.
pub(super) struct Rewards {
    pub values: Vec<f64>,
    pub penalties: Vec<f64>,
}

/// Each completion's reward, shaped:
///
///   rᵢ ← rᵢ + overlong(|yᵢ|)                        (DAPO, `overlong_buffer_len`)
///   rᵢ ← rᵢ − β · Σₜ mₜ · KLₜ(π_old ‖ π_ref)         (`kl_in = "reward"`)
///
/// with |yᵢ| the rollout's trained tokens, β = `kl_coef` and π_old = π_prox in
/// decoupled mode, μ otherwise ([`Proximal::old_for_reward`]).
pub(super) fn shaped(
    plan: &StepPlan,
    batch: &Batch,
    prox: &Proximal,
    reference: Option<&Tensor>,
) -> Result<Rewards> {
    let cfg = plan.algorithm;
    let penalties = plan
        .rollouts
        .iter()
        .map(|r| {
            overlong_penalty(
                r.trained_tokens(),
                cfg.max_completion_len,
                cfg.overlong_buffer_len,
                cfg.overlong_penalty,
            )
        })
        .collect::<Result<Vec<f64>>>()?;
    let mut values: Vec<f64> = plan
        .rollouts
        .iter()
        .zip(&penalties)
        .map(|(r, p)| r.reward + p)
        .collect();
    let kl_in_reward = cfg.kl_coef > 0.0 && cfg.kl_in == KlIn::Reward;
    if let (Some(rl), true) = (reference, kl_in_reward) {
        let old = prox.old_for_reward(plan, batch);
        let k = host(&kl::per_token(cfg.kl_estimator, &old, rl)?)?;
        for (i, w) in batch.offsets.windows(2).enumerate() {
            let masked: f64 = (w[0]..w[1]).map(|t| batch.mask[t] * k[t]).sum();
            values[i] -= cfg.kl_coef * masked;
        }
    }
    Ok(Rewards { values, penalties })
}
