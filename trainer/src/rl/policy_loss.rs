//! Policy-gradient losses per token.
//!
//! With ratio r = exp(log π_θ − log π_old), advantage A, behaviour weight w (a
//! constant, see `correction`) and loss mask m (0 = the token gets no loss; sg = stop
//! gradient):
//!
//!   ppo_clip:   ℓ = −w · min(rA, clip(r, 1 − ε_low, 1 + ε_high)·A)       (Schulman et al. 2017;
//!               clip-higher ε_high from DAPO)
//!   dual clip:  for A < 0, ℓ ← min(ℓ, −w·c·A)                            (Ye et al. 2020; verl `clip_ratio_c`)
//!   reinforce:  ℓ = −w · A · exp(log π_θ − sg(log π_θ))                   (value −w·A, gradient −w·A·∇log π_θ)
//!   gspo:       s_i = exp(Σ_t m_t (log π_θ,t − log π_old,t) / Σ_t m_t) per completion,
//!               s_it = sg(s_i)·exp(log π_θ,t − sg(log π_θ,t)),
//!               ℓ = −w · min(s_it·A, clip(s_it, 1 − ε_low, 1 + ε_high)·A)  (Zheng et al. 2025, token form)
//!   cispo:      ℓ = −w · sg(clip(r, 1 − ε_low, 1 + ε_high)) · A · log π_θ  (MiniMax-M1: the weight is
//!               clipped, never the gradient; its own ε, `cispo_eps_*`)
//!
//! and every ℓ is multiplied by m. π_old is μ (two-policy, `bypass`) or π_prox
//! (decoupled, three-policy).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
pub use crate::rl::tokens::Tokens;

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
    Gspo {
        eps_low: f64,
        eps_high: f64,
    },
    Cispo {
        eps_low: f64,
        eps_high: f64,
    },
}

/// Per-token losses and the fractions of trained tokens clipped at each side.
#[derive(Debug, Clone)]
pub struct PolicyLossOutput {
    /// ℓ·m, (N,).
    pub loss: Tensor,
    /// ppo_clip, gspo: tokens with A < 0 and ratio < 1 − ε_low (their gradient is zero);
    /// cispo: tokens whose weight was clipped below (the gradient stays).
    pub clip_fraction_low: f64,
    /// ppo_clip, gspo: tokens with A > 0 and ratio > 1 + ε_high; cispo: weights clipped
    /// above.
    pub clip_fraction_high: f64,
}

/// Per-token loss (N,) from `logp` (π_θ, with gradients), `old_logp`, advantages and
/// behaviour weights, all (N,), over `tokens`.
pub fn per_token(
    kind: PolicyLoss,
    logp: &Tensor,
    old_logp: &Tensor,
    adv: &Tensor,
    w: &Tensor,
    tokens: Tokens,
) -> Result<PolicyLossOutput> {
    tokens.check()?;
    if logp.dim(0)? != tokens.mask.len() {
        return Err(invalid(format!(
            "{} logprobs for a mask of {}",
            logp.dim(0)?,
            tokens.mask.len()
        )));
    }
    let m = tokens.mask_like(logp)?;
    let trained = tokens.trained().max(1.0);
    let w = (w.detach() * &m)?;
    // Fraction of trained tokens where `mask` (0/1) holds.
    let frac = |mask: Tensor| -> Result<f64> {
        Ok((mask.to_dtype(m.dtype())? * &m)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?
            / trained)
    };
    // ε below 1 in [0, 1) (or [0, 1] where 1 means "no lower bound"), ε above ≥ 0.
    let check_eps = |low_key: &str, high_key: &str, low: f64, high: f64, one_ok: bool| {
        let low_ok = (0.0..1.0).contains(&low) || (one_ok && low == 1.0);
        if !low_ok || high.is_nan() || high < 0.0 {
            let upper = if one_ok { "1]" } else { "1)" };
            return Err(invalid(format!(
                "`{low_key}` must be in [0, {upper} and `{high_key}` ≥ 0 (got {low}, {high})"
            )));
        }
        Ok(())
    };
    // ppo_clip's and gspo's surrogate for a ratio (value and gradient as given).
    let clipped = |ratio: &Tensor, eps_low: f64, eps_high: f64| -> Result<PolicyLossOutput> {
        let surr1 = (ratio * adv)?;
        let surr2 = (ratio.clamp(1.0 - eps_low, 1.0 + eps_high)? * adv)?;
        let loss = surr1.minimum(&surr2)?.neg()?;
        Ok(PolicyLossOutput {
            loss,
            clip_fraction_low: frac(
                (adv.lt(0.0)?.to_dtype(DType::F32)?
                    * ratio.lt(1.0 - eps_low)?.to_dtype(DType::F32)?)?,
            )?,
            clip_fraction_high: frac(
                (adv.gt(0.0)?.to_dtype(DType::F32)?
                    * ratio.gt(1.0 + eps_high)?.to_dtype(DType::F32)?)?,
            )?,
        })
    };
    let mut out = match kind {
        PolicyLoss::Reinforce => {
            let surrogate = (logp - logp.detach())?.exp()?;
            PolicyLossOutput {
                loss: (surrogate * adv)?.neg()?,
                clip_fraction_low: 0.0,
                clip_fraction_high: 0.0,
            }
        }
        PolicyLoss::PpoClip {
            eps_low,
            eps_high,
            dual_clip,
        } => {
            check_eps("clip_eps_low", "clip_eps_high", eps_low, eps_high, false)?;
            let ratio = (logp - old_logp.detach())?.exp()?;
            let mut out = clipped(&ratio, eps_low, eps_high)?;
            if let Some(c) = dual_clip {
                if c.is_nan() || c <= 1.0 {
                    return Err(invalid(format!("`clip_c` must be > 1, got {c}")));
                }
                let cap = (adv * (-c))?;
                let capped = out.loss.minimum(&cap)?;
                let negative = adv.lt(0.0)?;
                out.loss = negative.where_cond(&capped, &out.loss)?;
            }
            out
        }
        PolicyLoss::Gspo { eps_low, eps_high } => {
            check_eps("clip_eps_low", "clip_eps_high", eps_low, eps_high, false)?;
            // log s_i: the masked mean log-ratio of completion i (a constant: sg).
            let d: Vec<f64> = (logp.detach() - old_logp.detach())?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            let mut log_s = Vec::with_capacity(d.len());
            for o in tokens.offsets.windows(2) {
                let (num, den) = (o[0]..o[1]).fold((0.0, 0.0), |(n, c), t| {
                    (n + tokens.mask[t] * d[t], c + tokens.mask[t])
                });
                let mean = if den > 0.0 { num / den } else { 0.0 };
                log_s.extend(std::iter::repeat_n(mean, o[1] - o[0]));
            }
            let log_s = Tensor::from_vec(log_s, d.len(), logp.device())?.to_dtype(logp.dtype())?;
            let ratio = ((logp - logp.detach())? + log_s)?.exp()?;
            clipped(&ratio, eps_low, eps_high)?
        }
        PolicyLoss::Cispo { eps_low, eps_high } => {
            check_eps("cispo_eps_low", "cispo_eps_high", eps_low, eps_high, true)?;
            let ratio = (logp.detach() - old_logp.detach())?.exp()?;
            let weight = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)?;
            PolicyLossOutput {
                loss: ((weight * adv)? * logp)?.neg()?,
                clip_fraction_low: frac(ratio.lt(1.0 - eps_low)?)?,
                clip_fraction_high: frac(ratio.gt(1.0 + eps_high)?)?,
            }
        }
    };
    out.loss = out.loss.mul(&w)?;
    Ok(out)
}
