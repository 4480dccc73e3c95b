//! Off-policy correction: the behaviour weight that reweights tokens sampled by a
//! stale policy μ toward the proximal policy π_prox (decoupled PPO, AReaL; truncated
//! importance sampling, verl / slime; IcePop masking).
//!
//!   token level:     wₜ = exp(log π_prox(t) − log μ(t))
//!   sequence level:  w = exp(Σ_t m_t (log π_prox(t) − log μ(t)) / Σ_t m_t)   (geometric mean over
//!                    the trained tokens), for every token
//!   tis:             w ← min(w, tis_cap)
//!   icepop:          w ← w if icepop_low ≤ w ≤ icepop_high, else 0 (token masked)
//!
//! The weight is a constant of the loss (no gradient flows through it). A token with
//! loss mask m = 0 gets w = 1 and counts in no statistic: its μ is not used.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::rl::tokens::Tokens;

/// `[algorithm] correction`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Correction {
    /// w = 1.
    None,
    /// Truncated importance sampling: min(w, cap).
    Tis { cap: f64 },
    /// Keep w inside [low, high]; zero outside.
    Icepop { low: f64, high: f64 },
}

/// `[algorithm] correction_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Token,
    Sequence,
}

/// Behaviour weights (N,) and the fraction of tokens the correction masked.
#[derive(Debug, Clone)]
pub struct BehaviourWeights {
    pub weights: Tensor,
    /// Raw w before truncation or masking (for metrics: mean, max, min, ESS).
    pub raw: Tensor,
    pub masked_fraction: f64,
}

/// Computes behaviour weights from π_prox (`prox_logp`) and μ (`behaviour_logp`), both (N,).
pub fn behaviour_weights(
    correction: Correction,
    level: Level,
    prox_logp: &Tensor,
    behaviour_logp: &Tensor,
    tokens: Tokens,
) -> Result<BehaviourWeights> {
    tokens.check()?;
    let m = tokens.mask_like(prox_logp)?;
    if prox_logp.dim(0)? != tokens.mask.len() {
        return Err(invalid(format!(
            "{} logprobs for a mask of {} tokens",
            prox_logp.dim(0)?,
            tokens.mask.len()
        )));
    }
    let log_ratio = ((prox_logp.detach() - behaviour_logp.detach())? * &m)?;
    let log_w = match level {
        Level::Token => log_ratio,
        Level::Sequence => {
            let lr: Vec<f64> = log_ratio.to_dtype(DType::F64)?.to_vec1()?;
            let mut per_token = Vec::with_capacity(lr.len());
            for w in tokens.offsets.windows(2) {
                let trained: f64 = tokens.mask[w[0]..w[1]].iter().sum();
                let mean = lr[w[0]..w[1]].iter().sum::<f64>() / trained.max(1.0);
                per_token
                    .extend((w[0]..w[1]).map(|t| if tokens.mask[t] > 0.0 { mean } else { 0.0 }));
            }
            Tensor::from_vec(per_token, lr.len(), log_ratio.device())?
                .to_dtype(log_ratio.dtype())?
        }
    };
    let raw = log_w.exp()?;
    let n = tokens.trained().max(1.0);
    let (weights, masked) = match correction {
        Correction::None => (raw.ones_like()?, 0.0),
        Correction::Tis { cap } => {
            if cap.is_nan() || cap <= 0.0 {
                return Err(invalid(format!("`tis_cap` must be positive, got {cap}")));
            }
            (raw.clamp(0.0, cap)?, 0.0)
        }
        Correction::Icepop { low, high } => {
            if low.is_nan() || high.is_nan() || low < 0.0 || low > high {
                return Err(invalid(format!(
                    "`icepop_low` ({low}) must be in [0, icepop_high ({high})]"
                )));
            }
            let keep = (raw.ge(low)? * raw.le(high)?)?.to_dtype(raw.dtype())?;
            let kept = (&keep * &m)?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            ((&raw * keep)?, 1.0 - kept / n)
        }
    };
    Ok(BehaviourWeights {
        weights,
        raw,
        masked_fraction: masked,
    })
}
