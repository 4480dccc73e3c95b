//! The tokens a loss covers: completions laid out one after another, and the loss
//! mask m of every token (1 = trained, 0 = context only: tool output, a truncated
//! completion under `mask_truncated`).

use candle_core::Tensor;

use crate::error::{invalid, Result};

/// Completion i's tokens are `offsets[i]..offsets[i + 1]`; `mask[t]` is m_t.
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    pub offsets: &'a [usize],
    pub mask: &'a [f64],
}

impl<'a> Tokens<'a> {
    /// Checks that the offsets split the mask into non-empty completions.
    pub fn check(&self) -> Result<()> {
        let n = self.mask.len();
        let seqs = self.offsets.len().saturating_sub(1);
        if seqs == 0
            || self.offsets[0] != 0
            || self.offsets[seqs] != n
            || self.offsets.windows(2).any(|w| w[1] <= w[0])
        {
            return Err(invalid(format!(
                "offsets {:?} do not split {n} tokens into non-empty completions",
                self.offsets
            )));
        }
        Ok(())
    }

    /// Σ m.
    pub fn trained(&self) -> f64 {
        self.mask.iter().sum()
    }

    /// m as a tensor like `like` (its dtype and device).
    pub fn mask_like(&self, like: &Tensor) -> Result<Tensor> {
        Ok(
            Tensor::from_slice(self.mask, self.mask.len(), like.device())?
                .to_dtype(like.dtype())?,
        )
    }
}
