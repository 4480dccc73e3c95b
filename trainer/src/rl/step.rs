//! One training step: rollouts in, an optimizer update and its metrics out.
//!
//! 1. π_prox = the current policy's logprobs of the completions, without gradient
//!    (`prox_logp = "recompute"`: the first minibatch's come from its own training
//!    forward in the first epoch, the others' from a pass before the updates), or per
//!    minibatch log μ + α(log π_θ − log μ) from the token versions (`"loglinear"`);
//!    π_old = π_prox, or μ in bypass mode. π_prox stays fixed over `ppo_epochs`.
//! 2. Rewards shaped: DAPO's overlong penalty (`overlong_buffer_len`), then with a KL
//!    in the reward rᵢ ← rᵢ − β·Σₜ mₜ·KLₜ(π_old ‖ π_ref) (π_old = μ with `loglinear`,
//!    which has no π_prox before the minibatches).
//! 3. Advantages per completion, shared by its tokens (or per token from GAE).
//! 4. Behaviour weights w from π_prox / μ (decoupled mode).
//! 5. For each epoch and minibatch: ℓ = agg(policy loss) + β·agg(KL) (KL in the loss)
//!    − entropy_coef·agg(entropy); backward; clip; optimizer step.
//!
//! Every term is masked by the tokens' loss mask m (the rollout's `loss_mask`, and 0
//! for a completion that ended by length under `mask_truncated`): a token with m = 0
//! is context only (see `aggregate`).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use tandem_model::Model;

use crate::config::{AlgorithmConfig, Compute, CorrectionMode, KlIn, OptimizerConfig};
use crate::error::{invalid, Result};
pub use crate::optimizer::Optimizer;
use crate::rl::advantage::{self, Estimator};
use crate::rl::aggregate::{aggregate_part, Denominators};
use crate::rl::correction::behaviour_weights;
use crate::rl::gae;
use crate::rl::kl;
use crate::rl::overlong::overlong_penalty;
use crate::rl::policy_loss;
use crate::rl::proximal::{self, ProxLogp};
use crate::rl::rollout::FinishReason;
use crate::rl::rollout::Rollout;
pub use crate::rl::step_metrics::StepMetrics;
use crate::rl::step_metrics::WeightStats;
use crate::rl::tokens::Tokens;
use tandem_model::ScalarHead;

/// The frozen models a step scores with.
#[derive(Clone, Copy, Debug, Default)]
pub struct Frozen<'a> {
    /// The KL reference (needed when `kl_coef` > 0).
    pub reference: Option<&'a Model>,
    /// The distillation teacher (needed when `[algorithm] teacher` is set).
    pub teacher: Option<&'a Model>,
}

pub(crate) fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len().max(1) as f64;
    (m, v.sqrt())
}

/// Runs one step of the configured algorithm on `rollouts`, updating `policy` in place.
/// `frozen.reference` is required when `kl_coef > 0`, `frozen.teacher` when
/// `[algorithm] teacher` is set, `critic` when `advantage = "gae"`.
/// `step_index` drives the lr schedule; `policy_version` is the version `policy` holds
/// (for `prox_logp = "loglinear"`; default: the newest token version in `rollouts`).
/// `compute` says how the forward and backward are laid out and scheduled; every
/// setting gives the same update up to float rounding (tested).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    policy: &Model,
    frozen: Frozen,
    critic: Option<&ScalarHead>,
    rollouts: &[Rollout],
    cfg: &AlgorithmConfig,
    opt_cfg: &OptimizerConfig,
    opt: &mut Optimizer,
    step_index: u64,
    policy_version: Option<u64>,
    compute: &Compute,
) -> Result<StepMetrics> {
    cfg.validate()?;
    if rollouts.is_empty() {
        return Err(invalid("no rollouts to train on"));
    }
    let vocab = policy.config().vocab_size;
    for (i, r) in rollouts.iter().enumerate() {
        r.validate(vocab)
            .map_err(|e| invalid(format!("rollout {i}: {e}")))?;
    }
    let device = policy.device();
    // The loss is computed in f32 (f64 for an f64 model): logprobs come out of the
    // model in f32 for a bf16 policy, and so do the critic's values.
    let dtype = if policy.dtype() == DType::F64 {
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
    let n_tokens = *offsets.last().unwrap_or(&0);
    let to_tensor = |v: Vec<f64>| -> Result<Tensor> {
        let n = v.len();
        Ok(Tensor::from_vec(v, n, device)?.to_dtype(dtype)?)
    };
    // m per token; a masked token's μ is not used (0 stands in, so nothing non-finite
    // enters a product).
    let truncated = |r: &Rollout| r.finish_reason == Some(FinishReason::Length);
    let mask: Vec<f64> = rollouts
        .iter()
        .flat_map(|r| {
            let drop = cfg.mask_truncated && truncated(r);
            (0..r.completion_ids.len()).map(move |t| f64::from(u8::from(!drop && r.is_trained(t))))
        })
        .collect();
    let mu_host: Vec<f64> = rollouts
        .iter()
        .flat_map(|r| r.behavior_logprobs.iter().copied())
        .zip(&mask)
        .map(|(lp, &m)| if m > 0.0 { lp } else { 0.0 })
        .collect();
    let mu = to_tensor(mu_host)?;
    let forward = compute.forward();

    // 1. π_prox without gradient: recomputed here, or approximated per minibatch from
    //    the versions (log-linear). The pass also gives the critic's starting values.
    //    With the KL in the reward the pass covers every completion (the rewards need
    //    it); otherwise it waits for the advantages and covers only the completions
    //    that get a gradient.
    let loglinear = cfg.prox_logp == ProxLogp::Loglinear;
    let alpha = if loglinear {
        Some(to_tensor(loglinear_alpha_of(rollouts, policy_version)?)?)
    } else {
        None
    };
    let needs_start = !loglinear || cfg.advantage == Estimator::Gae;
    let kl_in_reward = cfg.kl_coef > 0.0 && cfg.kl_in == KlIn::Reward;
    let start_pass = |seqs: &[Vec<u32>], starts: &[usize]| {
        policy.completion_logprobs_with(
            &policy.inference_weights(),
            seqs,
            starts,
            cfg.temperature,
            forward.packing,
        )
    };
    // π_prox of every completion, when computed before the advantages.
    let mut start_all = None;
    let mut start_hidden = None;
    if needs_start && (kl_in_reward || cfg.advantage == Estimator::Gae) {
        let out = start_pass(&seqs, &starts)?;
        start_hidden = Some(out.hidden);
        start_all = Some(out.logprobs);
    }
    let ref_logp = if cfg.kl_coef > 0.0 {
        let reference = frozen
            .reference
            .ok_or_else(|| invalid("kl_coef > 0 needs a reference model"))?;
        Some(
            reference
                .completion_logprobs_with(
                    &reference.inference_weights(),
                    &seqs,
                    &starts,
                    cfg.temperature,
                    forward.packing,
                )?
                .logprobs,
        )
    } else {
        None
    };

    // 2. Rewards: the overlong penalty on |y| = the rollout's trained tokens, then the
    //    KL penalty when it goes into the reward: KL(π_old ‖ π_ref) with π_old = π_prox
    //    in decoupled mode, μ otherwise.
    let penalties = rollouts
        .iter()
        .map(|r| {
            overlong_penalty(
                r.trained_tokens(),
                cfg.max_completion_len,
                cfg.overlong_buffer_len,
                cfg.overlong_penalty,
            )
        })
        .collect::<Result<Vec<f64>>>()?;
    let mut rewards: Vec<f64> = rollouts
        .iter()
        .zip(&penalties)
        .map(|(r, p)| r.reward + p)
        .collect();
    if let (Some(rl), true) = (&ref_logp, kl_in_reward) {
        let old = match (&start_all, cfg.correction_mode) {
            (Some(s), CorrectionMode::Decoupled) if !loglinear => s.clone(),
            _ => mu.clone(),
        };
        let k = host(&kl::per_token(cfg.kl_estimator, &old, rl)?)?;
        for (i, w) in offsets.windows(2).enumerate() {
            let masked: f64 = (w[0]..w[1]).map(|t| mask[t] * k[t]).sum();
            rewards[i] -= cfg.kl_coef * masked;
        }
    }

    // 3. Advantages per token: GAE from the critic's starting values, or one per
    //    completion shared by its tokens.
    let critic = match (cfg.advantage, critic) {
        (Estimator::Gae, Some(c)) => Some(c),
        (Estimator::Gae, None) => return Err(invalid("advantage = \"gae\" needs a value head")),
        _ => None,
    };
    let (adv_values, zero_std_groups, value_targets) = match critic {
        Some(c) => {
            let hidden = start_hidden
                .as_ref()
                .ok_or_else(|| invalid("the critic needs the starting forward pass"))?;
            let old_values = host(&c.values(hidden)?)?;
            let (a, returns) = gae::gae(&old_values, &rewards, &offsets, cfg.gamma, cfg.lambda)?;
            (a, 0, Some((to_tensor(old_values)?, to_tensor(returns)?)))
        }
        None => {
            let mut group_ids: HashMap<&str, usize> = HashMap::new();
            let group_of: Vec<usize> = rollouts
                .iter()
                .map(|r| {
                    let next = group_ids.len();
                    *group_ids.entry(r.group.as_str()).or_insert(next)
                })
                .collect();
            let adv = advantage::compute(cfg.advantage, &rewards, &group_of)?;
            let per_token = rollouts
                .iter()
                .zip(&adv.values)
                .flat_map(|(r, &a)| std::iter::repeat_n(a, r.completion_ids.len()))
                .collect();
            (per_token, adv.zero_std_groups, None)
        }
    };
    // On-policy distillation: the teacher's per-token term joins the advantages.
    let mut adv_values = adv_values;
    let mut distill_reverse_kl = 0.0;
    if cfg.teacher.is_some() {
        let teacher = frozen.teacher.ok_or_else(|| {
            invalid("[algorithm] teacher is set: the step needs the teacher model")
        })?;
        let t = teacher.completion_logprobs_with(
            &teacher.inference_weights(),
            &seqs,
            &starts,
            cfg.temperature,
            forward.packing,
        )?;
        distill_reverse_kl = crate::rl::distill::add_teacher_term(
            &mut adv_values,
            &host(&t.logprobs)?,
            &host(&mu)?,
            &mask,
            cfg.distill_coef,
        )?;
    }
    let adv_tokens = to_tensor(adv_values.clone())?;

    // Which completions get a gradient: one with no trained token has a loss of exactly
    // 0; so has one whose trained tokens' advantages are all zero, when the loss has no
    // KL, entropy or value term.
    let other_terms = (cfg.kl_coef > 0.0 && cfg.kl_in == KlIn::Loss)
        || cfg.entropy_coef != 0.0
        || critic.is_some();
    let active: Vec<bool> = offsets
        .windows(2)
        .map(|w| {
            let trained = || (w[0]..w[1]).filter(|&t| mask[t] > 0.0);
            !compute.skip_zero_gradient
                || (trained().next().is_some()
                    && (other_terms || trained().any(|t| adv_values[t] != 0.0)))
        })
        .collect();
    let active_ids: Vec<usize> = (0..rollouts.len()).filter(|&i| active[i]).collect();
    // π_prox of the active completions, in the order of `active_ids` (token layout of
    // `active_offsets`).
    let mut active_offsets = vec![0usize];
    for &i in &active_ids {
        active_offsets
            .push(active_offsets.last().copied().unwrap_or(0) + offsets[i + 1] - offsets[i]);
    }
    let token_index = |ids: &[usize]| -> Result<Tensor> {
        let idx: Vec<u32> = ids
            .iter()
            .flat_map(|&i| (offsets[i] as u32)..(offsets[i + 1] as u32))
            .collect();
        let n = idx.len();
        Ok(Tensor::from_vec(idx, n, device)?)
    };
    // The first minibatch of the first epoch runs on the step's starting weights: its
    // training forward's logprobs, detached, are π_prox, so no pass computes them
    // beforehand (one forward fewer, and there the ratio is exactly 1 in any dtype;
    // later epochs reuse them). The start pass covers the other minibatches.
    let n_seq = rollouts.len();
    let mb = cfg.minibatches.min(n_seq);
    let prox_from_forward = needs_start && !loglinear && start_all.is_none();
    let first_active = if prox_from_forward {
        active_ids.partition_point(|&i| i < n_seq / mb)
    } else {
        0
    };
    // π_prox of active_ids[first_active..], token-aligned from active_offsets[first_active].
    let prox_active = match (&start_all, needs_start && !loglinear) {
        (_, false) => None,
        (Some(all), true) => Some(
            all.contiguous()?
                .index_select(&token_index(&active_ids)?, 0)?,
        ),
        (None, true) if active_ids.len() == first_active => None,
        (None, true) => {
            let later = &active_ids[first_active..];
            Some(start_pass(&pick(&seqs, later), &pick(&starts, later))?.logprobs)
        }
    };
    let mut first_prox: Vec<Tensor> = Vec::new();

    let (reward_mean, reward_std) = mean_std(&rewards);
    let (advantage_mean, advantage_std) = mean_std(&adv_values);
    let mut m = StepMetrics {
        reward_mean,
        reward_std,
        distill_reverse_kl,
        advantage_mean,
        advantage_std,
        zero_std_groups,
        truncated_sequences: rollouts.iter().filter(|r| truncated(r)).count(),
        loss_masked_tokens: mask.iter().filter(|&&x| x == 0.0).count(),
        overlong_penalty_mean: penalties.iter().sum::<f64>() / penalties.len() as f64,
        sequences: rollouts.len(),
        tokens: n_tokens,
        skipped_sequences: rollouts.len() - active_ids.len(),
        skipped_tokens: n_tokens - active_offsets.last().copied().unwrap_or(0),
        ..Default::default()
    };
    m.count_episodes(rollouts);
    // Behaviour-weight statistics over the first pass (each computed token once).
    let mut seen = WeightStats::default();
    let mut vars: Vec<Var> = policy.params().iter().map(|(_, v)| v.clone()).collect();
    if let Some(c) = critic {
        vars.extend(c.named_vars().into_iter().map(|(_, v)| v));
    }

    // 5. Epochs × minibatches of whole completions; each minibatch's active
    //    completions in token-bounded micro-batches whose gradients add up.
    let policy_kind = cfg.policy_loss();
    // The loss denominators of the completions `ids`.
    let counts = |ids: &[usize]| {
        let (mut o, mut mk) = (vec![0usize], Vec::new());
        for &i in ids {
            mk.extend_from_slice(&mask[offsets[i]..offsets[i + 1]]);
            o.push(mk.len());
        }
        Denominators::of(Tokens {
            offsets: &o,
            mask: &mk,
        })
    };
    let mut updates = 0usize;
    for epoch in 0..cfg.ppo_epochs {
        for b in 0..mb {
            let (s0, s1) = (b * n_seq / mb, (b + 1) * n_seq / mb);
            let whole = counts(&(s0..s1).collect::<Vec<_>>());
            // Positions in `active_ids` of this minibatch's active completions.
            let lo = active_ids.partition_point(|&i| i < s0);
            let hi = active_ids.partition_point(|&i| i < s1);
            let mb_ids = &active_ids[lo..hi];
            let computed = counts(mb_ids);
            let mut acc = GradStore::default();
            let mut parts = Parts::default();
            let mb_seqs = pick(&seqs, mb_ids);
            let shareable = pick(&starts, mb_ids);
            for (micro, range) in tandem_model::packing::microbatches(
                &mb_seqs,
                &shareable,
                forward.packing,
                compute.max_tokens_per_microbatch,
            )
            .into_iter()
            .enumerate()
            {
                let ids = &mb_ids[range.clone()];
                let (a0, a1) = (lo + range.start, lo + range.end);
                let local: Vec<usize> = active_offsets[a0..=a1]
                    .iter()
                    .map(|o| o - active_offsets[a0])
                    .collect();
                let tokens = token_index(ids)?;
                let take = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.contiguous()?.index_select(&tokens, 0)?)
                };
                let local_mask: Vec<f64> = ids
                    .iter()
                    .flat_map(|&i| mask[offsets[i]..offsets[i + 1]].iter().copied())
                    .collect();
                let part = Tokens {
                    offsets: &local,
                    mask: &local_mask,
                };
                let out = policy.completion_logprobs_with(
                    &policy.weights(),
                    &mb_seqs[range.clone()],
                    &shareable[range.clone()],
                    cfg.temperature,
                    forward,
                )?;
                parts.forward_tokens += out.packed_tokens;
                // 4. π_prox and the behaviour weights w = π_prox/μ of these completions.
                let mu_mb = take(&mu)?;
                let prox = match (&alpha, &prox_active) {
                    (Some(a), _) => proximal::loglinear(&mu_mb, &out.logprobs, &take(a)?)?,
                    (None, _) if prox_from_forward && b == 0 => {
                        if epoch == 0 {
                            first_prox.push(out.logprobs.detach());
                        }
                        first_prox
                            .get(micro)
                            .cloned()
                            .ok_or_else(|| invalid("no proximal logprobs"))?
                    }
                    (None, Some(p)) => p.narrow(
                        0,
                        active_offsets[a0] - active_offsets[first_active],
                        active_offsets[a1] - active_offsets[a0],
                    )?,
                    (None, None) => return Err(invalid("no proximal logprobs")),
                };
                let bw =
                    behaviour_weights(cfg.correction(), cfg.correction_level, &prox, &mu_mb, part)?;
                if epoch == 0 {
                    seen.add(&bw, &prox, &mu_mb, &local_mask)?;
                }
                let (old, weights) = match cfg.correction_mode {
                    CorrectionMode::Decoupled => (prox, bw.weights),
                    CorrectionMode::Bypass => (mu_mb.clone(), mu_mb.ones_like()?),
                };
                let pl = policy_loss::per_token(
                    policy_kind,
                    &out.logprobs,
                    &old,
                    &take(&adv_tokens)?,
                    &weights,
                    part,
                )?;
                let agg = |t: &Tensor, den: Denominators| {
                    aggregate_part(cfg.loss_agg, t, part, den, cfg.max_completion_len)
                };
                let policy_term = agg(&pl.loss, whole)?;
                let mut loss = policy_term.clone();
                if let Some(rl) = &ref_logp {
                    let k = kl::per_token(cfg.kl_estimator, &out.logprobs, &take(rl)?)?;
                    parts.kl += scalar(&agg(&k, computed)?)?;
                    if cfg.kl_in == KlIn::Loss {
                        loss = (loss + (agg(&k, whole)? * cfg.kl_coef)?)?;
                    }
                }
                if let (Some(c), Some((old_v, returns))) = (critic, &value_targets) {
                    let v = c.values(&out.hidden)?;
                    let vl = gae::value_loss(&v, &take(old_v)?, &take(returns)?, cfg.value_clip)?;
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
                    // The update is skipped (no backward of anything non-finite); the
                    // forwards go on so π_prox stays complete for later epochs.
                    parts.non_finite = Some(format!("loss {loss_value}"));
                    continue;
                }
                parts.loss += loss_value;
                parts.policy_loss += scalar(&policy_term)?;
                let n = part.trained();
                parts.clip_low += pl.clip_fraction_low * n;
                parts.clip_high += pl.clip_fraction_high * n;
                accumulate(&mut acc, out.backward(&loss)?, &vars)?;
            }
            // Skipped completions contribute exactly zero: a parameter that received
            // no gradient gets zeros, so the optimizer moves as it would have.
            for v in &vars {
                if acc.get(v).is_none() {
                    acc.insert(v, v.zeros_like()?);
                }
            }
            m.forward_tokens += parts.forward_tokens;
            if parts.non_finite.is_none() {
                let norm = global_norm(&acc, &vars)?;
                if !norm.is_finite() {
                    parts.non_finite = Some(format!("gradient norm {norm}"));
                }
            }
            if let Some(what) = &parts.non_finite {
                // Skip-instead-of-stop: this update leaves the weights (and the
                // optimizer's moments) as they were; the step goes on.
                tracing::warn!(
                    epoch,
                    minibatch = b,
                    "{what}: optimizer update skipped (an extreme reward or a diverging policy?)"
                );
                m.non_finite_updates_skipped += 1;
                continue;
            }
            let lr = opt_cfg.lr_at(step_index + updates as u64);
            let stats = opt.apply(&acc, lr, opt_cfg.max_grad_norm())?;
            updates += 1;
            m.loss += parts.loss;
            m.policy_loss += parts.policy_loss;
            m.kl += parts.kl;
            m.entropy += parts.entropy;
            m.value_loss += parts.value_loss;
            m.grad_norm += stats.grad_norm;
            m.lr = lr;
            // Shares of the minibatch's trained tokens (a skipped completion has A = 0:
            // none of its tokens is clipped).
            let trained = whole.tokens.max(1.0);
            m.clip_fraction_low += parts.clip_low / trained;
            m.clip_fraction_high += parts.clip_high / trained;
        }
    }
    let k = updates.max(1) as f64;
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
    m.optimizer_steps = updates;
    seen.finish(&mut m);
    Ok(m)
}

/// The sums one minibatch collects over its micro-batches.
#[derive(Default)]
struct Parts {
    loss: f64,
    policy_loss: f64,
    kl: f64,
    entropy: f64,
    value_loss: f64,
    /// Clipped-token counts (fraction × tokens).
    clip_low: f64,
    clip_high: f64,
    forward_tokens: usize,
    /// What was not finite (the loss of a micro-batch, or the gradient norm): the
    /// minibatch's update is skipped.
    non_finite: Option<String>,
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

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The elements of `xs` at `ids`, in that order.
fn pick<T: Clone>(xs: &[T], ids: &[usize]) -> Vec<T> {
    ids.iter().map(|&i| xs[i].clone()).collect()
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

/// α of every completion token, from the rollouts' `versions`; the policy's version
/// defaults to the newest trained token's version. A token the rollout's `loss_mask`
/// leaves out is not trained: its version is not read (α = 0).
fn loglinear_alpha_of(rollouts: &[Rollout], policy_version: Option<u64>) -> Result<Vec<f64>> {
    let mut versions = Vec::new();
    for (i, r) in rollouts.iter().enumerate() {
        let v = r.versions.as_ref().ok_or_else(|| {
            invalid(format!(
                "rollout {i}: prox_logp = \"loglinear\" needs `versions` on every rollout"
            ))
        })?;
        versions.extend(
            v.iter()
                .enumerate()
                .map(|(t, &x)| r.is_trained(t).then_some(x)),
        );
    }
    let current =
        policy_version.unwrap_or_else(|| versions.iter().flatten().copied().max().unwrap_or(0));
    let versions: Vec<u64> = versions.iter().map(|v| v.unwrap_or(current)).collect();
    proximal::loglinear_alpha(&versions, current)
}
