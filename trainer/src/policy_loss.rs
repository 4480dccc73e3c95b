//! Policy-gradient losses per token.
//!
//! With ratio ρ = exp(log π_θ − log π_old), advantage A and behaviour weight w (a
//! constant, see `correction`):
//!
//!   ppo_clip:   ℓ = −w · min(ρA, clip(ρ, 1 − ε_low, 1 + ε_high)·A)       (Schulman et al. 2017;
//!               clip-higher ε_high from DAPO)
//!   dual clip:  for A < 0, ℓ ← min(ℓ, −w·c·A)                            (Ye et al. 2020; verl `clip_ratio_c`)
//!   reinforce:  ℓ = −w · A · exp(log π_θ − sg(log π_θ))                   (value −w·A, gradient −w·A·∇log π_θ)
//!
//! π_old is μ (two-policy, `bypass`) or π_prox (decoupled, three-policy).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// `[algorithm] policy_loss` with its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyLoss {
    PpoClip {
        eps_low: f64,
        eps_high: f64,
        dual_clip: Option<f64>,
    },
    Reinforce,
}

/// Per-token losses and the fractions of tokens clipped at each side.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    pub loss: Tensor,
    /// Tokens with A < 0 and ρ < 1 − ε_low (their gradient is zero).
    pub clip_fraction_low: f64,
    /// Tokens with A > 0 and ρ > 1 + ε_high (their gradient is zero).
    pub clip_fraction_high: f64,
}

/// Per-token loss (N,) from `logp` (π_θ, with gradients), `old_logp`, advantages and
/// behaviour weights, all (N,).
pub fn per_token(
    kind: PolicyLoss,
    logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    w: &Tensor,
) -> Result<PolicyLossOutput> {
    let n = logp.dim(0)?.max(1) as f64;
    let w = w.detach();
    match kind {
        PolicyLoss::Reinforce => {
            let surrogate = (logp - logp.detach())?.exp()?;
            let loss = (surrogate * adv)?.neg()?.mul(&w)?;
            Ok(PolicyLossOutput {
                loss,
                clip_fraction_low: 0.0,
                clip_fraction_high: 0.0,
            })
        }
        PolicyLoss::PpoClip {
            eps_low,
            eps_high,
            dual_clip,
        } => {
            if eps_low.is_nan()
                || eps_high.is_nan()
                || !(0.0..1.0).contains(&eps_low)
                || eps_high < 0.0
            {
                return Err(invalid(format!("`clip_eps_low` must be in [0, 1) and `clip_eps_high` ≥ 0 (got {eps_low}, {eps_high})")));
            }
            let ratio = (logp - old_logp.detach())?.exp()?;
            let surr1 = (&ratio * adv)?;
            let surr2 = (ratio.clamp(1.0 - eps_low, 1.0 + eps_high)? * adv)?;
            let mut loss = surr1.minimum(&surr2)?.neg()?;
            if let Some(c) = dual_clip {
                if c.is_nan() || c <= 1.0 {
                    return Err(invalid(format!("`clip_c` must be > 1, got {c}")));
                }
                let cap = (adv * (-c))?;
                let capped = loss.minimum(&cap)?;
                let negative = adv.lt(0.0)?;
                loss = negative.where_cond(&capped, &loss)?;
            }
            let frac = |mask: Tensor| -> Result<f64> {
                Ok(mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? / n)
            };
            let low = frac(
                (adv.lt(0.0)?.to_dtype(DType::F32)?
                    * ratio.lt(1.0 - eps_low)?.to_dtype(DType::F32)?)?,
            )?;
            let high = frac(
                (adv.gt(0.0)?.to_dtype(DType::F32)?
                    * ratio.gt(1.0 + eps_high)?.to_dtype(DType::F32)?)?,
            )?;
            Ok(PolicyLossOutput {
                loss: loss.mul(&w)?,
                clip_fraction_low: low,
                clip_fraction_high: high,
            })
        }
    }
}
