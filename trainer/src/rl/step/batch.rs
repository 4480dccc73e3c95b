//! Phase 1: the rollouts as tokens — each completion's place in one flattened token
//! layout, the loss mask m and the behaviour logprobs log μ.

use candle_core::{DType, Device, Tensor};

use super::StepPlan;
use crate::error::Result;
use crate::rl::aggregate::Denominators;
use crate::rl::rollout::{FinishReason, Rollout};
use crate::rl::tokens::Tokens;

/// The step's completions as tokens: completion i's are `offsets[i]..offsets[i + 1]`
/// of the flattened layout every per-token vector and tensor of the step follows.
pub(super) struct Batch {
    /// Prompt + completion of each rollout.
    pub seqs: Vec<Vec<u32>>,
    /// Where each completion starts in its sequence (its prompt's length).
    pub starts: Vec<usize>,
    pub offsets: Vec<usize>,
    /// m per token.
    pub mask: Vec<f64>,
    /// log μ per token.
    pub mu: Tensor,
    /// The loss's dtype: f32 (f64 for an f64 model): logprobs come out of the model
    /// in f32 for a bf16 policy, and so do the critic's values.
    pub dtype: DType,
    pub device: Device,
}

/// Whether `r` ended by length.
pub(super) fn truncated(r: &Rollout) -> bool {
    r.finish_reason == Some(FinishReason::Length)
}

impl Batch {
    /// Checks the plan (see [`StepPlan::validate`]), then per completion token t
    ///
    ///   mₜ = 0 when the completion ended by length under `mask_truncated`,
    ///        else the rollout's `loss_mask`ₜ (1 without one)
    ///   log μₜ = the rollout's behaviour logprob where mₜ = 1, 0 where mₜ = 0
    ///
    /// (a masked token's μ is never used: 0 stands in, so nothing non-finite enters a
    /// product).
    pub fn prepare(plan: &StepPlan) -> Result<Self> {
        plan.validate()?;
        let (cfg, rollouts) = (plan.algorithm, plan.rollouts);
        let dtype = if plan.policy.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let seqs: Vec<Vec<u32>> = rollouts
            .iter()
            .map(|r| [r.prompt_ids.as_slice(), r.completion_ids.as_slice()].concat())
            .collect();
        let starts: Vec<usize> = rollouts.iter().map(|r| r.prompt_ids.len()).collect();
        let mut offsets = vec![0usize];
        for r in rollouts {
            offsets.push(offsets.last().copied().unwrap_or(0) + r.completion_ids.len());
        }
        let mask: Vec<f64> = rollouts
            .iter()
            .flat_map(|r| {
                let drop = cfg.mask_truncated && truncated(r);
                (0..r.completion_ids.len())
                    .map(move |t| f64::from(u8::from(!drop && r.is_trained(t))))
            })
            .collect();
        let mu: Vec<f64> = rollouts
            .iter()
            .flat_map(|r| r.behavior_logprobs.iter().copied())
            .zip(&mask)
            .map(|(lp, &m)| if m > 0.0 { lp } else { 0.0 })
            .collect();
        let device = plan.policy.device().clone();
        let n = mu.len();
        let mu = Tensor::from_vec(mu, n, &device)?.to_dtype(dtype)?;
        Ok(Batch {
            seqs,
            starts,
            offsets,
            mask,
            mu,
            dtype,
            device,
        })
    }

    /// Completions in the step.
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Completion tokens in the step.
    pub fn tokens(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// A per-token (or per-completion) vector as a tensor of the loss's dtype.
    pub fn tensor(&self, v: Vec<f64>) -> Result<Tensor> {
        let n = v.len();
        Ok(Tensor::from_vec(v, n, &self.device)?.to_dtype(self.dtype)?)
    }

    /// The layout positions of the tokens of completions `ids`, in that order.
    pub fn token_index(&self, ids: &[usize]) -> Result<Tensor> {
        let idx: Vec<u32> = ids
            .iter()
            .flat_map(|&i| (self.offsets[i] as u32)..(self.offsets[i + 1] as u32))
            .collect();
        let n = idx.len();
        Ok(Tensor::from_vec(idx, n, &self.device)?)
    }

    /// m of the tokens of completions `ids`, in that order.
    pub fn mask_of(&self, ids: &[usize]) -> Vec<f64> {
        ids.iter()
            .flat_map(|&i| {
                self.mask[self.offsets[i]..self.offsets[i + 1]]
                    .iter()
                    .copied()
            })
            .collect()
    }

    /// The loss denominators of completions `ids`.
    pub fn denominators(&self, ids: &[usize]) -> Denominators {
        let (mut o, mut mk) = (vec![0usize], Vec::new());
        for &i in ids {
            mk.extend_from_slice(&self.mask[self.offsets[i]..self.offsets[i + 1]]);
            o.push(mk.len());
        }
        Denominators::of(Tokens {
            offsets: &o,
            mask: &mk,
        })
    }
}
