//! Phase 6: each minibatch's loss and backward, over micro-batches by token budget.
//!
//! Minibatch b of M holds completions ⌊b·n/M⌋..⌊(b+1)·n/M⌋; its active ones are split
//! into micro-batches of at most `max_tokens_per_microbatch` packed tokens
//! ([`tandem_model::packing::microbatches`]). Each micro-batch's loss is its share of
//! the minibatch's (every term divided by the whole minibatch's denominators), so the
//! micro-batches' gradients add up to the minibatch's.

use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use tandem_model::CompletionLogprobs;

use super::active::ActiveSet;
use super::advantages::Advantages;
use super::batch::Batch;
use super::prox::ActiveProx;
use super::{pick, scalar, StepPlan};
use crate::config::{CorrectionMode, KlIn};
use crate::error::Result;
use crate::rl::aggregate::{aggregate_part, Denominators};
use crate::rl::correction::behaviour_weights;
use crate::rl::step_metrics::WeightStats;
use crate::rl::tokens::Tokens;
use crate::rl::{gae, kl, policy_loss};

/// What every minibatch reads, fixed over the step.
pub(super) struct Inputs<'a> {
    pub plan: &'a StepPlan<'a>,
    pub batch: &'a Batch,
    pub adv: &'a Advantages,
    pub active: &'a ActiveSet,
    pub prox: &'a ActiveProx,
    /// log π_ref per token (when `kl_coef` > 0).
    pub reference: Option<&'a Tensor>,
    /// The variables the optimizer updates.
    pub vars: Vec<Var>,
}

/// What the first epoch leaves to the others.
#[derive(Default)]
pub(super) struct FirstEpoch {
    /// The first minibatch's π_prox, one tensor per micro-batch, when its own first
    /// forward gives it.
    pub prox: Vec<Tensor>,
    /// The behaviour-weight statistics (each token counted once).
    pub weights: WeightStats,
}

/// One micro-batch of a minibatch.
pub(super) struct Micro {
    pub epoch: usize,
    pub minibatch: usize,
    /// Its place in the minibatch.
    pub index: usize,
    /// Its completions' positions in the active set.
    pub active: Range<usize>,
    /// Its completions' token offsets, from 0.
    offsets: Vec<usize>,
    /// m of its tokens.
    mask: Vec<f64>,
    /// The layout positions of its tokens.
    tokens: Tensor,
}

impl Micro {
    /// The rows of per-token `t` (in the step's layout) for this micro-batch's tokens.
    pub fn take(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.contiguous()?.index_select(&self.tokens, 0)?)
    }

    fn part(&self) -> Tokens<'_> {
        Tokens {
            offsets: &self.offsets,
            mask: &self.mask,
        }
    }
}

/// The sums one minibatch collects over its micro-batches.
#[derive(Default)]
pub(super) struct Parts {
    pub loss: f64,
    pub policy_loss: f64,
    pub kl: f64,
    pub entropy: f64,
    pub value_loss: f64,
    /// Clipped-token counts (fraction × tokens).
    pub clip_low: f64,
    pub clip_high: f64,
    pub forward_tokens: usize,
    /// What was not finite (the loss of a micro-batch, or the gradient norm): the
    /// minibatch's update is skipped.
    pub non_finite: Option<String>,
}

/// A minibatch after its backward.
pub(super) struct Minibatch {
    pub epoch: usize,
    pub index: usize,
    /// The summed gradients of its micro-batches (zeros for a variable none reached).
    pub grads: GradStore,
    pub parts: Parts,
    /// Its denominators, every completion counted (skipped ones too).
    pub whole: Denominators,
}

impl Inputs<'_> {
    fn micro(&self, epoch: usize, b: usize, index: usize, active: Range<usize>) -> Result<Micro> {
        let ids = &self.active.ids[active.clone()];
        let o = &self.active.offsets;
        Ok(Micro {
            epoch,
            minibatch: b,
            index,
            offsets: o[active.start..=active.end]
                .iter()
                .map(|x| x - o[active.start])
                .collect(),
            mask: self.batch.mask_of(ids),
            tokens: self.batch.token_index(ids)?,
            active,
        })
    }
}

/// Forward, loss and backward of minibatch `b` in `epoch`, one micro-batch at a time:
///
///   g = Σ_micro ∇ℓ_micro
///
/// A completion left out of the active set contributes exactly zero: a variable that
/// received no gradient gets zeros, so the optimizer moves as it would have.
pub(super) fn loss_and_backward(
    inp: &Inputs,
    first: &mut FirstEpoch,
    epoch: usize,
    b: usize,
) -> Result<Minibatch> {
    let (plan, batch) = (inp.plan, inp.batch);
    let (n, m) = (batch.sequences(), plan.minibatches());
    let (s0, s1) = (b * n / m, (b + 1) * n / m);
    let whole = batch.denominators(&(s0..s1).collect::<Vec<_>>());
    let positions = inp.active.within(s0, s1);
    let lo = positions.start;
    let ids = &inp.active.ids[positions];
    let computed = batch.denominators(ids);
    let (seqs, shareable) = (pick(&batch.seqs, ids), pick(&batch.starts, ids));
    let mut grads = GradStore::default();
    let mut parts = Parts::default();
    let ranges = tandem_model::packing::microbatches(
        &seqs,
        &shareable,
        plan.compute.packing,
        plan.compute.max_tokens_per_microbatch,
    );
    for (index, range) in ranges.into_iter().enumerate() {
        let micro = inp.micro(epoch, b, index, lo + range.start..lo + range.end)?;
        let out = plan.policy.completion_logprobs_with(
            &plan.policy.weights(),
            &seqs[range.clone()],
            &shareable[range],
            plan.algorithm.temperature,
            plan.compute.forward(),
        )?;
        parts.forward_tokens += out.packed_tokens;
        let loss = micro_loss(inp, first, &micro, &out, whole, computed, &mut parts)?;
        if let Some(loss) = loss {
            accumulate(&mut grads, out.backward(&loss)?, &inp.vars)?;
        }
    }
    for v in &inp.vars {
        if grads.get(v).is_none() {
            grads.insert(v, v.zeros_like()?);
        }
    }
    Ok(Minibatch {
        epoch,
        index: b,
        grads,
        parts,
        whole,
    })
}

/// One micro-batch's share of its minibatch's loss,
///
///   ℓ = agg(policy loss) + β·agg(KL(π_θ ‖ π_ref))   (`kl_in = "loss"`)
///       + c_v·agg(value loss) − c_H·agg(entropy)
///
/// with β = `kl_coef`, c_v = `vf_coef`, c_H = `entropy_coef` and every agg over the
/// `whole` minibatch's denominators (the KL and entropy metrics: over those of its
/// `computed` completions). Adds what it measured to `parts`; `None` when
/// ℓ is not finite (no backward of anything non-finite: the minibatch's update will be
/// skipped, and the forwards go on so that π_prox stays complete for later epochs).
fn micro_loss(
    inp: &Inputs,
    first: &mut FirstEpoch,
    micro: &Micro,
    out: &CompletionLogprobs,
    whole: Denominators,
    computed: Denominators,
    parts: &mut Parts,
) -> Result<Option<Tensor>> {
    let cfg = inp.plan.algorithm;
    let part = micro.part();
    let (old, weights) = old_and_weights(inp, first, micro, &out.logprobs)?;
    let adv = micro.take(&inp.adv.tensor)?;
    let pl = policy_loss::per_token(cfg.policy_loss(), &out.logprobs, &old, &adv, &weights, part)?;
    let agg = |t: &Tensor, den: Denominators| {
        aggregate_part(cfg.loss_agg, t, part, den, cfg.max_completion_len)
    };
    let policy_term = agg(&pl.loss, whole)?;
    let mut loss = policy_term.clone();
    if let Some(rl) = inp.reference {
        let k = kl::per_token(cfg.kl_estimator, &out.logprobs, &micro.take(rl)?)?;
        parts.kl += scalar(&agg(&k, computed)?)?;
        if cfg.kl_in == KlIn::Loss {
            loss = (loss + (agg(&k, whole)? * cfg.kl_coef)?)?;
        }
    }
    if let (Some(c), Some((old_v, returns))) = (inp.plan.critic(), &inp.adv.value_targets) {
        let v = c.values(&out.hidden)?;
        let vl = gae::value_loss(
            &v,
            &micro.take(old_v)?,
            &micro.take(returns)?,
            cfg.value_clip,
        )?;
        let v_agg = agg(&vl, whole)?;
        parts.value_loss += scalar(&v_agg)?;
        loss = (loss + (v_agg * cfg.vf_coef)?)?;
    }
    parts.entropy += scalar(&agg(&out.entropy, computed)?)?;
    if cfg.entropy_coef != 0.0 {
        loss = (loss - (agg(&out.entropy, whole)? * cfg.entropy_coef)?)?;
    }
    let loss_value = scalar(&loss)?;
    if !loss_value.is_finite() {
        parts.non_finite = Some(format!("loss {loss_value}"));
        return Ok(None);
    }
    parts.loss += loss_value;
    parts.policy_loss += scalar(&policy_term)?;
    let n = part.trained();
    parts.clip_low += pl.clip_fraction_low * n;
    parts.clip_high += pl.clip_fraction_high * n;
    Ok(Some(loss))
}

/// π_old and the behaviour weights w of a micro-batch's tokens, from π_prox
/// ([`ActiveProx::of_micro`]) and μ ([`behaviour_weights`]):
///
///   decoupled: π_old = π_prox,  w = correction(π_prox / μ)
///   bypass:    π_old = μ,       w = 1
///
/// In the first epoch the raw weights join the step's statistics.
fn old_and_weights(
    inp: &Inputs,
    first: &mut FirstEpoch,
    micro: &Micro,
    logprobs: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let cfg = inp.plan.algorithm;
    let mu = micro.take(&inp.batch.mu)?;
    let prox = inp
        .prox
        .of_micro(micro, logprobs, &mu, inp.active, &mut first.prox)?;
    let bw = behaviour_weights(
        cfg.correction(),
        cfg.correction_level,
        &prox,
        &mu,
        micro.part(),
    )?;
    if micro.epoch == 0 {
        first.weights.add(&bw, &prox, &mu, &micro.mask)?;
    }
    Ok(match cfg.correction_mode {
        CorrectionMode::Decoupled => (prox, bw.weights),
        CorrectionMode::Bypass => (mu.clone(), mu.ones_like()?),
    })
}

/// acc[v] += grads[v] for every trained variable (the graph's other gradients are
/// dropped with `grads`).
fn accumulate(acc: &mut GradStore, mut grads: GradStore, vars: &[Var]) -> Result<()> {
    for v in vars {
        if let Some(g) = grads.remove(v) {
            let total = match acc.remove(v) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            acc.insert(v, total);
        }
    }
    Ok(())
}
