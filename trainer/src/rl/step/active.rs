//! Phase 5: the active set, the completions that have a gradient.

use std::ops::Range;

use super::batch::Batch;
use super::StepPlan;
use crate::config::KlIn;

/// The completions that get a forward, a backward and a π_prox pass, in order.
pub(super) struct ActiveSet {
    /// Their indices in the batch.
    pub ids: Vec<usize>,
    /// Their tokens laid out one after the other: completion `ids[j]`'s are
    /// `offsets[j]..offsets[j + 1]`.
    pub offsets: Vec<usize>,
}

impl ActiveSet {
    /// With `skip_zero_gradient`, completion i is left out when its loss is exactly 0:
    ///
    ///   Σₜ mₜ = 0   (no trained token), or
    ///   Aₜ = 0 for every trained t, and the loss has no KL, entropy or value term
    ///
    /// (a left-out completion's gradient is zero, so the update is the same).
    pub fn select(plan: &StepPlan, batch: &Batch, adv: &[f64]) -> Self {
        let cfg = plan.algorithm;
        let other_terms = (cfg.kl_coef > 0.0 && cfg.kl_in == KlIn::Loss)
            || cfg.entropy_coef != 0.0
            || plan.critic().is_some();
        let mask = &batch.mask;
        let ids: Vec<usize> = batch
            .offsets
            .windows(2)
            .enumerate()
            .filter(|(_, w)| {
                let trained = || (w[0]..w[1]).filter(|&t| mask[t] > 0.0);
                !plan.compute.skip_zero_gradient
                    || (trained().next().is_some()
                        && (other_terms || trained().any(|t| adv[t] != 0.0)))
            })
            .map(|(i, _)| i)
            .collect();
        let mut offsets = vec![0usize];
        for &i in &ids {
            offsets.push(
                offsets.last().copied().unwrap_or(0) + batch.offsets[i + 1] - batch.offsets[i],
            );
        }
        ActiveSet { ids, offsets }
    }

    /// Positions in `ids` of the active completions among `first..end`.
    pub fn within(&self, first: usize, end: usize) -> Range<usize> {
        self.ids.partition_point(|&i| i < first)..self.ids.partition_point(|&i| i < end)
    }

    /// Tokens of the active completions.
    pub fn tokens(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }
}
