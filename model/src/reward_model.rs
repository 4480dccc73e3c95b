//! A trained reward model, scoring: r = head(h_last(prompt + completion)), the
//! completion ending with its stop token when it stopped (as `tandem rm` trained it).
//! Training it lives with the trainer; this is what every stage that scores with one
//! (generators, rejection sampling) loads.

use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::scalar_head::{ScalarHead, REWARD_HEAD_FILE};
use crate::transformer::Model;

/// A reward model: the transformer and its reward head.
pub struct RewardModel {
    model: Model,
    head: ScalarHead,
}

impl RewardModel {
    /// Loads `dir` (an HF folder with `reward_head.safetensors`) as `policy` is loaded:
    /// on its device, in its dtype. It must share the policy's tokenizer (the same
    /// vocabulary size). Errors start with `[reward] model`.
    pub fn load(dir: &str, policy: &Model) -> Result<Self> {
        let invalid = |e: &dyn std::fmt::Display| Error::invalid(format!("[reward] model: {e}"));
        let (device, policy_vocab) = (policy.device(), policy.config().vocab_size);
        let p = crate::load(dir, policy.dtype(), device).map_err(|e| invalid(&e))?;
        let c = p.model.config();
        let head = ScalarHead::load(
            Path::new(dir),
            REWARD_HEAD_FILE,
            c.hidden_size,
            p.model.dtype(),
            device,
        )
        .map_err(|e| invalid(&e))?
        .ok_or_else(|| {
            invalid(&format!(
                "{dir} has no {REWARD_HEAD_FILE} (train it with `tandem rm`)"
            ))
        })?;
        if c.vocab_size != policy_vocab {
            return Err(invalid(&format!(
                "its vocabulary has {} tokens, the policy's {policy_vocab}; the reward model must share the policy's tokenizer",
                c.vocab_size
            )));
        }
        Ok(RewardModel {
            model: p.model,
            head,
        })
    }

    /// Rewards of `prompt` followed by each completion; errors start with `[reward] model`.
    pub fn score(&self, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f64>> {
        self.score_sequences(prompt, completions)
            .map_err(|e| Error::invalid(format!("[reward] model: {e}")))
    }

    fn score_sequences(&self, prompt: &[u32], completions: &[Vec<u32>]) -> Result<Vec<f64>> {
        let seqs: Vec<Vec<u32>> = completions
            .iter()
            .map(|c| prompt.iter().chain(c).copied().collect())
            .collect();
        let w = self.model.inference_weights();
        let r = self.head.sequence_scores(&self.model, &w, &seqs)?;
        Ok(r.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }
}
