//! KL divergence to the reference policy, per token, from log-probabilities of the
//! sampled tokens (Schulman, "Approximating KL divergence", 2020). With
//! δ = log π − log π_ref:
//!
//!   k1 = δ                       unbiased, high variance, can be negative
//!   k2 = ½ δ²                    biased, low variance
//!   k3 = exp(−δ) + δ − 1         unbiased, ≥ 0 (GRPO's choice, TRL's default)

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// The frozen reference the KL is taken to when `kl_coef` > 0: under LoRA the
/// policy's base itself (the same weights, no copy), else the starting model `base`
/// loaded again.
pub fn reference(
    policy: &tandem_model::Model,
    base: &str,
    kl_coef: f64,
) -> Result<Option<tandem_model::Model>> {
    Ok(match (kl_coef > 0.0, policy.adapter()) {
        (false, _) => None,
        (true, Some(_)) => Some(policy.without_adapter()),
        (true, None) => Some(tandem_model::load_model(base)?.model),
    })
}

/// `[algorithm] kl_estimator`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    K1,
    K2,
    K3,
}

/// Per-token KL estimate from `logp` (π, may carry gradients) and `ref_logp` (π_ref).
pub fn per_token(estimator: KlEstimator, logp: &Tensor, ref_logp: &Tensor) -> Result<Tensor> {
    let delta = (logp - ref_logp)?;
    Ok(match estimator {
        KlEstimator::K1 => delta,
        KlEstimator::K2 => (delta.sqr()? * 0.5)?,
        KlEstimator::K3 => ((delta.neg()?.exp()? + &delta)? - 1.0)?,
    })
}
