//! Phase 4: the advantage of every completion token.

use std::collections::HashMap;

use candle_core::Tensor;
use tandem_model::ScalarHead;

use super::batch::Batch;
use super::prox::Proximal;
use super::{host, StepPlan};
use crate::error::{invalid, Result};
use crate::rl::{advantage, distill, gae};

/// The step's advantages, per token.
pub(super) struct Advantages {
    /// A per token.
    pub values: Vec<f64>,
    /// The same as a tensor of the loss's dtype.
    pub tensor: Tensor,
    /// Groups whose rewards were all equal.
    pub zero_std_groups: usize,
    /// GAE: the critic's values at the step's start V and the returns, per token.
    pub value_targets: Option<(Tensor, Tensor)>,
    /// Distillation: the mean reverse KL to the teacher (0 without one).
    pub distill_reverse_kl: f64,
}

/// Advantages per token: GAE(γ, λ) from the critic's starting values
/// ([`gae::gae`]), or one per completion from its group's rewards
/// ([`advantage::compute`]) shared by its tokens; then, with a teacher,
///
///   Aₜ ← Aₜ + λ_d·(log π_teacher,t − log μₜ)   on the trained tokens
///
/// ([`distill::add_teacher_term`], λ_d = `distill_coef`).
pub(super) fn compute(
    plan: &StepPlan,
    batch: &Batch,
    prox: &Proximal,
    rewards: &[f64],
) -> Result<Advantages> {
    let (mut values, zero_std_groups, value_targets) = match plan.critic() {
        Some(critic) => {
            let (values, targets) = from_critic(plan, critic, batch, prox, rewards)?;
            (values, 0, Some(targets))
        }
        None => {
            let (values, zero_std_groups) = from_groups(plan, rewards)?;
            (values, zero_std_groups, None)
        }
    };
    let distill_reverse_kl = if plan.algorithm.teacher.is_some() {
        teacher_term(plan, batch, &mut values)?
    } else {
        0.0
    };
    Ok(Advantages {
        tensor: batch.tensor(values.clone())?,
        values,
        zero_std_groups,
        value_targets,
        distill_reverse_kl,
    })
}

/// GAE over each completion's tokens from the critic's values V of the starting pass;
/// the per-token advantages, and V and the returns as tensors (the value loss's
/// targets).
fn from_critic(
    plan: &StepPlan,
    critic: &ScalarHead,
    batch: &Batch,
    prox: &Proximal,
    rewards: &[f64],
) -> Result<(Vec<f64>, (Tensor, Tensor))> {
    let hidden = prox
        .hidden
        .as_ref()
        .ok_or_else(|| invalid("the critic needs the starting forward pass"))?;
    let old_values = host(&critic.values(hidden)?)?;
    let cfg = plan.algorithm;
    let (adv, returns) = gae::gae(&old_values, rewards, &batch.offsets, cfg.gamma, cfg.lambda)?;
    Ok((adv, (batch.tensor(old_values)?, batch.tensor(returns)?)))
}

/// The configured estimator over the groups (rollouts of one `group` key), each
/// completion's advantage repeated over its tokens; and the groups of equal rewards.
fn from_groups(plan: &StepPlan, rewards: &[f64]) -> Result<(Vec<f64>, usize)> {
    let mut group_ids: HashMap<&str, usize> = HashMap::new();
    let group_of: Vec<usize> = plan
        .rollouts
        .iter()
        .map(|r| {
            let next = group_ids.len();
            *group_ids.entry(r.group.as_str()).or_insert(next)
        })
        .collect();
    let adv = advantage::compute(plan.algorithm.advantage, rewards, &group_of)?;
    let per_token = plan
        .rollouts
        .iter()
        .zip(&adv.values)
        .flat_map(|(r, &a)| std::iter::repeat_n(a, r.completion_ids.len()))
        .collect();
    Ok((per_token, adv.zero_std_groups))
}

/// Adds the teacher's term to `adv`; returns the mean reverse KL to the teacher.
fn teacher_term(plan: &StepPlan, batch: &Batch, adv: &mut [f64]) -> Result<f64> {
    let teacher = plan.teacher()?;
    let t = teacher.completion_logprobs_with(
        &teacher.inference_weights(),
        &batch.seqs,
        &batch.starts,
        plan.algorithm.temperature,
        plan.compute.packing,
    )?;
    distill::add_teacher_term(
        adv,
        &host(&t.logprobs)?,
        &host(&batch.mu)?,
        &batch.mask,
        plan.algorithm.distill_coef,
    )
}
