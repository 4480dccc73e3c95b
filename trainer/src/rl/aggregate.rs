//! Loss aggregation: from per-token losses of a batch of completions to one scalar.
//!
//! Tokens are flattened, completion after completion; `offsets[i]..offsets[i + 1]` are
//! completion i's tokens, and m_t is each token's loss mask. A token with m = 0 (tool
//! output, a truncated completion under `mask_truncated`) is not trained and counts in
//! no denominator; a token that a correction masked (IcePop) is trained with weight 0
//! and still counts in every denominator, so that masking never inflates the gradient
//! of the tokens that remain.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::rl::tokens::Tokens;

/// `[algorithm] loss_agg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAgg {
    /// Σ_t m_t ℓ_t / Σ_t m_t over the batch — DAPO, verl's `token-mean`.
    TokenMean,
    /// mean over the completions with Σ m > 0 of (Σ_{t∈i} m_t ℓ_t / Σ_{t∈i} m_t) — the
    /// original GRPO.
    SeqMeanTokenMean,
    /// Σ_t m_t ℓ_t / (completions × max_completion_len) — Dr. GRPO's constant normaliser.
    SeqSumNorm,
}

/// The counts of the whole batch that a loss is divided by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Denominators {
    /// Σ m: trained tokens.
    pub tokens: f64,
    /// Completions (seq_sum_norm's constant).
    pub sequences: usize,
    /// Completions with at least one trained token (seq_mean_token_mean's mean).
    pub scored: usize,
}

impl Denominators {
    /// The counts of `tokens`.
    pub fn of(tokens: Tokens) -> Self {
        Denominators {
            tokens: tokens.trained(),
            sequences: tokens.offsets.len().saturating_sub(1),
            scored: tokens
                .offsets
                .windows(2)
                .filter(|w| tokens.mask[w[0]..w[1]].iter().any(|&m| m > 0.0))
                .count(),
        }
    }
}

/// Aggregates per-token `loss` (N,) over `tokens` into a scalar.
pub fn aggregate(
    agg: LossAgg,
    loss: &Tensor,
    tokens: Tokens,
    max_completion_len: usize,
) -> Result<Tensor> {
    aggregate_part(
        agg,
        loss,
        tokens,
        Denominators::of(tokens),
        max_completion_len,
    )
}

/// What the completions `tokens` covers contribute to the aggregate of a larger batch
/// with counts `whole`: the same formula, divided by the whole batch's counts. Summed
/// over the parts of a batch (micro-batches, or the completions that were computed
/// while the others contribute exactly zero) it equals [`aggregate`] of the batch, so
/// gradients accumulate to the unsplit gradient. A batch with nothing trained
/// aggregates to 0.
pub fn aggregate_part(
    agg: LossAgg,
    loss: &Tensor,
    tokens: Tokens,
    whole: Denominators,
    max_completion_len: usize,
) -> Result<Tensor> {
    tokens.check()?;
    let n = loss.dim(0)?;
    if n != tokens.mask.len() {
        return Err(invalid(format!(
            "{n} losses for a mask of {} tokens",
            tokens.mask.len()
        )));
    }
    let part = Denominators::of(tokens);
    if whole.tokens < part.tokens || whole.sequences < part.sequences || whole.scored < part.scored
    {
        return Err(invalid(format!(
            "a part of {} trained tokens in {} completions cannot belong to a batch of {} in {}",
            part.tokens, part.sequences, whole.tokens, whole.sequences
        )));
    }
    let masked = (loss * tokens.mask_like(loss)?)?;
    Ok(match agg {
        LossAgg::TokenMean => (masked.sum_all()? / whole.tokens.max(1.0))?,
        LossAgg::SeqSumNorm => {
            let longest = tokens
                .offsets
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or(0);
            if max_completion_len < longest {
                return Err(invalid(format!(
                    "max_completion_len {max_completion_len} is shorter than a completion of {longest} tokens"
                )));
            }
            (masked.sum_all()? / (whole.sequences * max_completion_len) as f64)?
        }
        LossAgg::SeqMeanTokenMean => {
            let mut total = Tensor::zeros((), loss.dtype(), loss.device())?;
            for w in tokens.offsets.windows(2) {
                let trained: f64 = tokens.mask[w[0]..w[1]].iter().sum();
                if trained > 0.0 {
                    let seq_mean = (masked.narrow(0, w[0], w[1] - w[0])?.sum_all()? / trained)?;
                    total = (total + seq_mean)?;
                }
            }
            (total / whole.scored.max(1) as f64)?
        }
    })
}
