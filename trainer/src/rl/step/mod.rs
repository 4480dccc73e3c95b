//! One training step: rollouts in, an optimizer update and its metrics out.
//!
//! [`StepPlan::run`] goes through the phases in the order of the algorithm, each in its
//! own module with its formula in the doc comment of the function that computes it:
//!
//! 1. `batch::Batch::prepare` — the token layout, the loss mask m and the behaviour
//!    logprobs log μ.
//! 2. `prox::Proximal::before_rewards` (completed by `of_active` and
//!    `ActiveProx::of_micro`) and `prox::reference_logprobs` — π_prox, the policy the
//!    ratios are taken against: recomputed without gradient (`prox_logp = "recompute"`)
//!    or approximated per minibatch from the token versions (`"loglinear"`); fixed over
//!    `ppo_epochs`. π_old = π_prox, or μ in bypass mode. And π_ref's logprobs (when
//!    `kl_coef` > 0).
//! 3. `rewards::shaped` — rewards shaped: DAPO's overlong penalty, then the KL when it
//!    goes into the reward.
//! 4. `advantages::compute` — one per completion shared by its tokens, or per token
//!    from GAE; the distillation teacher's term added.
//! 5. `active::ActiveSet::select` — the active set: the completions that have a
//!    gradient (the others' loss is exactly 0: their forward, backward and π_prox pass
//!    are skipped).
//! 6. `minibatch::loss_and_backward` (`micro_loss`, `old_and_weights`) — for each epoch
//!    and minibatch, over micro-batches by token budget: behaviour weights w from
//!    π_prox / μ, the loss and its backward,
//!    ℓ = agg(policy loss) + β·agg(KL) (KL in the loss) + c_v·agg(value loss) − c_H·agg(H).
//! 7. `update::apply` (then `Progress::finish`) — the optimizer step of each minibatch
//!    (skipped when a loss or the gradient norm is not finite) and the step's metrics.
//!
//! Every term is masked by the tokens' loss mask m (the rollout's `loss_mask`, and 0
//! for a completion that ended by length under `mask_truncated`): a token with m = 0
//! is context only (see `aggregate`).

mod active;
mod advantages;
mod batch;
mod minibatch;
mod prox;
mod rewards;
mod update;

use candle_core::{DType, Tensor, Var};
use tandem_model::{Model, ScalarHead};

use crate::config::{AlgorithmConfig, Compute, OptimizerConfig};
use crate::error::{invalid, Result};
use crate::rl::advantage::Estimator;
use crate::rl::rollout::Rollout;

pub use crate::optimizer::Optimizer;
pub use crate::rl::step_metrics::StepMetrics;

/// The frozen models a step scores with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Frozen<'a> {
    /// The KL reference (needed when `kl_coef` > 0).
    pub reference: Option<&'a Model>,
    /// The distillation teacher (needed when `[algorithm] teacher` is set).
    pub teacher: Option<&'a Model>,
}

/// What one step needs: the models, the rollouts, the settings and where the run is.
#[derive(Clone, Copy)]
pub struct StepPlan<'a> {
    /// π_θ, updated in place.
    pub policy: &'a Model,
    /// π_ref is required when `kl_coef > 0`, the teacher when `[algorithm] teacher` is
    /// set.
    pub frozen: Frozen<'a>,
    /// The value head, required when `advantage = "gae"` (and not used otherwise).
    pub critic: Option<&'a ScalarHead>,
    pub rollouts: &'a [Rollout],
    pub algorithm: &'a AlgorithmConfig,
    pub optimizer: &'a OptimizerConfig,
    /// Drives the lr schedule (the step's first update is at `step_index`).
    pub step_index: u64,
    /// The version `policy` holds (for `prox_logp = "loglinear"`; default: the newest
    /// token version in `rollouts`).
    pub policy_version: Option<u64>,
    /// How the forward and backward are laid out and scheduled; every setting gives the
    /// same update up to float rounding (tested).
    pub compute: &'a Compute,
}

impl StepPlan<'_> {
    /// Runs one step of the configured algorithm on the rollouts, updating the policy
    /// (and the critic) in place through `opt`.
    pub fn run(&self, opt: &mut Optimizer) -> Result<StepMetrics> {
        // 1. Masks and behaviour logprobs.
        let batch = batch::Batch::prepare(self)?;
        // 2. π_prox (as far as the rewards need it) and π_ref.
        let prox = prox::Proximal::before_rewards(self, &batch)?;
        let reference = prox::reference_logprobs(self, &batch)?;
        // 3. Shaped rewards.
        let rewards = rewards::shaped(self, &batch, &prox, reference.as_ref())?;
        // 4. Advantages.
        let adv = advantages::compute(self, &batch, &prox, &rewards.values)?;
        // 5. The active set, and π_prox of its completions.
        let active = active::ActiveSet::select(self, &batch, &adv.values);
        let prox = prox.of_active(self, &batch, &active)?;
        let inputs = minibatch::Inputs {
            plan: self,
            batch: &batch,
            adv: &adv,
            active: &active,
            prox: &prox,
            reference: reference.as_ref(),
            vars: self.trained_vars(),
        };
        let mut progress = update::Progress::new(update::metrics_before(
            self, &batch, &rewards, &adv, &active,
        ));
        // 6. and 7. Per minibatch: loss and backward, then the optimizer.
        for epoch in 0..self.algorithm.ppo_epochs {
            for b in 0..self.minibatches() {
                let mb = minibatch::loss_and_backward(&inputs, &mut progress.first, epoch, b)?;
                update::apply(self, opt, &inputs.vars, mb, &mut progress)?;
            }
        }
        Ok(progress.finish())
    }

    /// The settings, the rollouts and the models the settings ask for.
    fn validate(&self) -> Result<()> {
        self.algorithm.validate()?;
        if self.rollouts.is_empty() {
            return Err(invalid("no rollouts to train on"));
        }
        let vocab = self.policy.config().vocab_size;
        for (i, r) in self.rollouts.iter().enumerate() {
            r.validate(vocab)
                .map_err(|e| invalid(format!("rollout {i}: {e}")))?;
        }
        if self.algorithm.kl_coef > 0.0 {
            self.reference()?;
        }
        if self.algorithm.teacher.is_some() {
            self.teacher()?;
        }
        if self.algorithm.advantage == Estimator::Gae && self.critic.is_none() {
            return Err(invalid("advantage = \"gae\" needs a value head"));
        }
        Ok(())
    }

    fn reference(&self) -> Result<&Model> {
        self.frozen
            .reference
            .ok_or_else(|| invalid("kl_coef > 0 needs a reference model"))
    }

    fn teacher(&self) -> Result<&Model> {
        self.frozen
            .teacher
            .ok_or_else(|| invalid("[algorithm] teacher is set: the step needs the teacher model"))
    }

    /// The value head when the advantages come from GAE.
    fn critic(&self) -> Option<&ScalarHead> {
        self.critic
            .filter(|_| self.algorithm.advantage == Estimator::Gae)
    }

    /// Minibatches per epoch (`minibatches`, at most one per completion).
    fn minibatches(&self) -> usize {
        self.algorithm.minibatches.min(self.rollouts.len())
    }

    /// The variables the optimizer updates: the policy's trainable ones (every
    /// parameter, or a LoRA adapter's A and B), then the critic's.
    fn trained_vars(&self) -> Vec<Var> {
        let mut vars: Vec<Var> = self
            .policy
            .trainable()
            .iter()
            .map(|(_, v)| v.clone())
            .collect();
        if let Some(c) = self.critic() {
            vars.extend(c.named_vars().into_iter().map(|(_, v)| v));
        }
        vars
    }
}

pub(crate) fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The elements of `xs` at `ids`, in that order.
fn pick<T: Clone>(xs: &[T], ids: &[usize]) -> Vec<T> {
    ids.iter().map(|&i| xs[i].clone()).collect()
}
