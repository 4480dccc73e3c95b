//! Loss aggregation: from per-token losses of a batch of completions to one scalar.
//!
//! Tokens are flattened, completion after completion; `offsets[i]..offsets[i + 1]` are
//! completion i's tokens. A token that a correction masked still counts in every
//! denominator (its loss is simply 0), so masking never inflates the gradient of the
//! tokens that remain.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// `[algorithm] loss_agg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAgg {
    /// Σ_tokens ℓ / (total tokens in the batch) — DAPO, verl's `token-mean`.
    TokenMean,
    /// mean over completions of (Σ_{t∈i} ℓ / |i|) — the original GRPO.
    SeqMeanTokenMean,
    /// Σ_tokens ℓ / (completions × max_completion_len) — Dr. GRPO's constant normaliser.
    SeqSumNorm,
}

/// The counts of the whole batch that a loss is divided by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denominators {
    pub tokens: usize,
    pub sequences: usize,
}

impl Denominators {
    /// The counts of the completions `offsets` delimit.
    pub fn of(offsets: &[usize]) -> Self {
        Denominators {
            tokens: offsets.last().copied().unwrap_or(0),
            sequences: offsets.len().saturating_sub(1),
        }
    }
}

/// Aggregates per-token `loss` (N,) into a scalar.
pub fn aggregate(
    agg: LossAgg,
    loss: &Tensor,
    offsets: &[usize],
    max_completion_len: usize,
) -> Result<Tensor> {
    aggregate_part(
        agg,
        loss,
        offsets,
        Denominators::of(offsets),
        max_completion_len,
    )
}

/// What the completions `offsets` delimit contribute to the aggregate of a larger
/// batch with counts `whole`: the same formula, divided by the whole batch's counts.
/// Summed over the parts of a batch (micro-batches, or the completions that were
/// computed while the others contribute exactly zero) it equals [`aggregate`] of the
/// batch, so gradients accumulate to the unsplit gradient.
pub fn aggregate_part(
    agg: LossAgg,
    loss: &Tensor,
    offsets: &[usize],
    whole: Denominators,
    max_completion_len: usize,
) -> Result<Tensor> {
    let n = loss.dim(0)?;
    let seqs = offsets.len().saturating_sub(1);
    if seqs == 0
        || offsets[0] != 0
        || offsets[seqs] != n
        || offsets.windows(2).any(|w| w[1] <= w[0])
    {
        return Err(invalid(format!(
            "offsets {offsets:?} do not split {n} tokens into non-empty completions"
        )));
    }
    if whole.tokens < n || whole.sequences < seqs {
        return Err(invalid(format!(
            "a part of {n} tokens in {seqs} completions cannot belong to a batch of {} in {}",
            whole.tokens, whole.sequences
        )));
    }
    Ok(match agg {
        LossAgg::TokenMean => (loss.sum_all()? / whole.tokens as f64)?,
        LossAgg::SeqSumNorm => {
            let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            if max_completion_len < longest {
                return Err(invalid(format!(
                    "max_completion_len {max_completion_len} is shorter than a completion of {longest} tokens"
                )));
            }
            (loss.sum_all()? / (whole.sequences * max_completion_len) as f64)?
        }
        LossAgg::SeqMeanTokenMean => {
            let mut total = Tensor::zeros((), loss.dtype(), loss.device())?;
            for w in offsets.windows(2) {
                let seq_mean =
                    (loss.narrow(0, w[0], w[1] - w[0])?.sum_all()? / (w[1] - w[0]) as f64)?;
                total = (total + seq_mean)?;
            }
            (total / whole.sequences as f64)?
        }
    })
}
