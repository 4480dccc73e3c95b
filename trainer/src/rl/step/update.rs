//! Phase 7: one optimizer update per minibatch, and the step's metrics.

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use super::active::ActiveSet;
use super::advantages::Advantages;
use super::batch::{truncated, Batch};
use super::minibatch::{FirstEpoch, Minibatch};
use super::rewards::Rewards;
use super::{Optimizer, StepMetrics, StepPlan};
use crate::error::Result;

/// The step's metrics as they build up over its updates.
pub(super) struct Progress {
    metrics: StepMetrics,
    /// Optimizer updates applied.
    updates: usize,
    pub first: FirstEpoch,
}

impl Progress {
    pub fn new(metrics: StepMetrics) -> Self {
        Progress {
            metrics,
            updates: 0,
            first: FirstEpoch::default(),
        }
    }

    /// The metrics: means over the updates applied, the behaviour-weight statistics of
    /// the first epoch.
    pub fn finish(self) -> StepMetrics {
        let mut m = self.metrics;
        let k = self.updates.max(1) as f64;
        for x in [
            &mut m.loss,
            &mut m.policy_loss,
            &mut m.kl,
            &mut m.entropy,
            &mut m.value_loss,
            &mut m.grad_norm,
            &mut m.clip_fraction_low,
            &mut m.clip_fraction_high,
        ] {
            *x /= k;
        }
        m.optimizer_steps = self.updates;
        self.first.weights.finish(&mut m);
        m
    }
}

/// What the step knows before its updates: rewards, advantages, masks, skips.
pub(super) fn metrics_before(
    plan: &StepPlan,
    batch: &Batch,
    rewards: &Rewards,
    adv: &Advantages,
    active: &ActiveSet,
) -> StepMetrics {
    let (reward_mean, reward_std) = mean_std(&rewards.values);
    let (advantage_mean, advantage_std) = mean_std(&adv.values);
    let penalties = &rewards.penalties;
    let mut m = StepMetrics {
        reward_mean,
        reward_std,
        distill_reverse_kl: adv.distill_reverse_kl,
        advantage_mean,
        advantage_std,
        zero_std_groups: adv.zero_std_groups,
        truncated_sequences: plan.rollouts.iter().filter(|r| truncated(r)).count(),
        loss_masked_tokens: batch.mask.iter().filter(|&&x| x == 0.0).count(),
        overlong_penalty_mean: penalties.iter().sum::<f64>() / penalties.len() as f64,
        sequences: batch.sequences(),
        tokens: batch.tokens(),
        skipped_sequences: batch.sequences() - active.ids.len(),
        skipped_tokens: batch.tokens() - active.tokens(),
        completion_advantages: completion_advantages(batch, &adv.values),
        ..Default::default()
    };
    m.count_episodes(plan.rollouts);
    m
}

/// Each completion's advantage: the mean of Aₜ over its trained tokens (mₜ = 1), or
/// over all its tokens when none is trained.
fn completion_advantages(batch: &Batch, values: &[f64]) -> Vec<f64> {
    batch
        .offsets
        .windows(2)
        .map(|w| {
            let (a, m) = (&values[w[0]..w[1]], &batch.mask[w[0]..w[1]]);
            let trained: Vec<f64> = a
                .iter()
                .zip(m)
                .filter(|(_, &m)| m > 0.0)
                .map(|(&x, _)| x)
                .collect();
            let xs = if trained.is_empty() {
                a.to_vec()
            } else {
                trained
            };
            xs.iter().sum::<f64>() / xs.len().max(1) as f64
        })
        .collect()
}

/// The minibatch's update,
///
///   θ ← opt(θ, clip(g, `max_grad_norm`), lr_at(step_index + updates so far))
///
/// skipped (weights and optimizer moments left as they were; the step goes on) when a
/// micro-batch's loss or ‖g‖ is not finite.
pub(super) fn apply(
    plan: &StepPlan,
    opt: &mut Optimizer,
    vars: &[Var],
    mb: Minibatch,
    p: &mut Progress,
) -> Result<()> {
    let Minibatch {
        epoch,
        index,
        grads,
        mut parts,
        whole,
    } = mb;
    let m = &mut p.metrics;
    m.forward_tokens += parts.forward_tokens;
    if parts.non_finite.is_none() {
        let norm = global_norm(&grads, vars)?;
        if !norm.is_finite() {
            parts.non_finite = Some(format!("gradient norm {norm}"));
        }
    }
    if let Some(what) = &parts.non_finite {
        tracing::warn!(
            epoch,
            minibatch = index,
            "{what}: optimizer update skipped (an extreme reward or a diverging policy?)"
        );
        m.non_finite_updates_skipped += 1;
        return Ok(());
    }
    let lr = plan.optimizer.lr_at(plan.step_index + p.updates as u64);
    let stats = opt.apply(&grads, lr, plan.optimizer.max_grad_norm())?;
    p.updates += 1;
    m.loss += parts.loss;
    m.policy_loss += parts.policy_loss;
    m.kl += parts.kl;
    m.entropy += parts.entropy;
    m.value_loss += parts.value_loss;
    m.grad_norm += stats.grad_norm;
    m.lr = lr;
    // Shares of the minibatch's trained tokens (a skipped completion has A = 0: none of
    // its tokens is clipped).
    let trained = whole.tokens.max(1.0);
    m.clip_fraction_low += parts.clip_low / trained;
    m.clip_fraction_high += parts.clip_high / trained;
    Ok(())
}

/// The global L2 norm of the accumulated gradients of `vars`.
fn global_norm(acc: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sq = 0.0;
    for v in vars {
        if let Some(g) = acc.get(v) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len().max(1) as f64;
    (m, v.sqrt())
}
