//! One training step: rollouts in, an optimizer update and its metrics out.
//!
//! 1. π_prox = the current policy's logprobs of the completions, without gradient
//!    (`prox_logp = "recompute"`), or per minibatch log μ + α(log π_θ − log μ) from the
//!    token versions (`"loglinear"`); π_old = π_prox, or μ in bypass mode.
//! 2. With a KL in the reward: rᵢ ← rᵢ − β·Σₜ KLₜ(π_old ‖ π_ref) (π_old = μ with
//!    `loglinear`, which has no π_prox before the minibatches).
//! 3. Advantages per completion, shared by its tokens (or per token from GAE).
//! 4. Behaviour weights w from π_prox / μ (decoupled mode).
//! 5. For each epoch and minibatch: ℓ = agg(policy loss) + β·agg(KL) (KL in the loss)
//!    − entropy_coef·agg(entropy); backward; clip; optimizer step.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::Serialize;
use tandem_model::optim::{AdamW, AdamWConfig, Sgd, StepStats};
use tandem_model::Model;

use crate::advantage::{self, Estimator};
use crate::aggregate::aggregate;
use crate::config::{AlgorithmConfig, CorrectionMode, KlIn, OptimizerConfig, OptimizerName};
use crate::correction::{behaviour_weights, BehaviourWeights};
use crate::error::{invalid, Result};
use crate::gae;
use crate::kl;
use crate::policy_loss;
use crate::proximal::{self, ProxLogp};
use crate::rollout::Rollout;
use tandem_model::ScalarHead;

/// The configured optimizer.
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// An optimizer over the model's parameters and `extra` ones (a value head).
    pub fn new(cfg: &OptimizerConfig, model: &Model, extra: Vec<(String, Var)>) -> Result<Self> {
        let mut params: Vec<(String, Var)> = model
            .params()
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        params.extend(extra);
        Ok(match cfg.name {
            OptimizerName::Adamw => Optimizer::AdamW(AdamW::new(
                params,
                AdamWConfig {
                    lr: cfg.lr,
                    beta1: cfg.betas[0],
                    beta2: cfg.betas[1],
                    eps: cfg.eps,
                    weight_decay: cfg.weight_decay,
                },
            )?),
            OptimizerName::Sgd => Optimizer::Sgd(Sgd::new(params, cfg.lr)),
        })
    }

    /// Saves the optimizer state into `dir` (SGD has none).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => Ok(o.save(dir)?),
            Optimizer::Sgd(_) => Ok(()),
        }
    }

    /// Restores what [`Optimizer::save`] wrote.
    pub fn load(&mut self, dir: &std::path::Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => Ok(o.load(dir)?),
            Optimizer::Sgd(_) => Ok(()),
        }
    }

    /// One update with learning rate `lr`, clipping the global gradient norm first.
    pub fn apply(
        &mut self,
        grads: &GradStore,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<StepStats> {
        Ok(match self {
            Optimizer::AdamW(o) => {
                o.config.lr = lr;
                o.step(grads, max_grad_norm)?
            }
            Optimizer::Sgd(o) => {
                o.lr = lr;
                o.step(grads, max_grad_norm)?
            }
        })
    }
}

/// What one step measured (means over its optimizer updates where there are several).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepMetrics {
    pub loss: f64,
    pub policy_loss: f64,
    pub kl: f64,
    pub entropy: f64,
    /// Clipped value loss (advantage = "gae").
    pub value_loss: f64,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub clip_fraction_low: f64,
    pub clip_fraction_high: f64,
    /// Raw behaviour weights π_prox/μ (before truncation or masking).
    pub behaviour_weight_mean: f64,
    pub behaviour_weight_max: f64,
    pub behaviour_weight_min: f64,
    /// (Σw)² / (N·Σw²): 1 when on-policy, → 1/N when one token dominates.
    pub behaviour_weight_ess: f64,
    pub masked_fraction: f64,
    /// k3 estimate of KL(μ ‖ π_prox): how far the sampler's numbers are from the trainer's.
    pub mismatch_kl: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub advantage_mean: f64,
    pub advantage_std: f64,
    pub zero_std_groups: usize,
    pub sequences: usize,
    pub tokens: usize,
    pub optimizer_steps: usize,
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len().max(1) as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len().max(1) as f64;
    (m, v.sqrt())
}

/// Runs one step of the configured algorithm on `rollouts`, updating `policy` in place.
/// `reference` is required when `kl_coef > 0`, `critic` when `advantage = "gae"`.
/// `step_index` drives the lr schedule; `policy_version` is the version `policy` holds
/// (for `prox_logp = "loglinear"`; default: the newest token version in `rollouts`).
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    policy: &Model,
    reference: Option<&Model>,
    critic: Option<&ScalarHead>,
    rollouts: &[Rollout],
    cfg: &AlgorithmConfig,
    opt_cfg: &OptimizerConfig,
    opt: &mut Optimizer,
    step_index: u64,
    policy_version: Option<u64>,
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
        Ok(Tensor::from_vec(v, n_tokens, device)?.to_dtype(dtype)?)
    };
    let mu = to_tensor(
        rollouts
            .iter()
            .flat_map(|r| r.behavior_logprobs.iter().copied())
            .collect(),
    )?;

    // 1. π_prox without gradient: recomputed here, or approximated per minibatch from
    //    the versions (log-linear). The pass also gives the critic's starting values.
    let loglinear = cfg.prox_logp == ProxLogp::Loglinear;
    let alpha = if loglinear {
        Some(to_tensor(loglinear_alpha_of(rollouts, policy_version)?)?)
    } else {
        None
    };
    let start = if !loglinear || cfg.advantage == Estimator::Gae {
        Some(policy.completion_logprobs(
            &policy.inference_weights(),
            &seqs,
            &starts,
            cfg.temperature,
        )?)
    } else {
        None
    };
    // The logprobs the reward's KL is taken from: π_old, or μ when π_prox is only
    // known per minibatch.
    let old_for_reward = match (&start, cfg.correction_mode) {
        (Some(s), CorrectionMode::Decoupled) if !loglinear => s.logprobs.clone(),
        _ => mu.clone(),
    };
    let ref_logp = if cfg.kl_coef > 0.0 {
        let reference = reference.ok_or_else(|| invalid("kl_coef > 0 needs a reference model"))?;
        Some(
            reference
                .completion_logprobs(
                    &reference.inference_weights(),
                    &seqs,
                    &starts,
                    cfg.temperature,
                )?
                .logprobs,
        )
    } else {
        None
    };

    // 2. Rewards, with the KL penalty when it goes into the reward.
    let mut rewards: Vec<f64> = rollouts.iter().map(|r| r.reward).collect();
    if let (Some(rl), KlIn::Reward) = (&ref_logp, cfg.kl_in) {
        let k = host(&kl::per_token(cfg.kl_estimator, &old_for_reward, rl)?)?;
        for (i, w) in offsets.windows(2).enumerate() {
            rewards[i] -= cfg.kl_coef * k[w[0]..w[1]].iter().sum::<f64>();
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
            let hidden = &start
                .as_ref()
                .ok_or_else(|| invalid("the critic needs the starting forward pass"))?
                .hidden;
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
    let adv_tokens = to_tensor(adv_values.clone())?;

    let (reward_mean, reward_std) = mean_std(&rewards);
    let (advantage_mean, advantage_std) = mean_std(&adv_values);
    let mut m = StepMetrics {
        reward_mean,
        reward_std,
        advantage_mean,
        advantage_std,
        zero_std_groups,
        sequences: rollouts.len(),
        tokens: n_tokens,
        ..Default::default()
    };
    // Behaviour-weight statistics over the first pass (each token once).
    let mut seen = WeightStats::default();

    // 5. Epochs × minibatches of whole completions.
    let n_seq = rollouts.len();
    let mb = cfg.minibatches.min(n_seq);
    let policy_kind = cfg.policy_loss();
    let mut updates = 0usize;
    for epoch in 0..cfg.ppo_epochs {
        for b in 0..mb {
            let (s0, s1) = (b * n_seq / mb, (b + 1) * n_seq / mb);
            let (t0, t1) = (offsets[s0], offsets[s1]);
            let local: Vec<usize> = offsets[s0..=s1].iter().map(|o| o - t0).collect();
            let slice = |t: &Tensor| t.narrow(0, t0, t1 - t0);
            let out = policy.completion_logprobs(
                &policy.weights(),
                &seqs[s0..s1],
                &starts[s0..s1],
                cfg.temperature,
            )?;
            // 4. π_prox and the behaviour weights w = π_prox/μ of this minibatch.
            let mu_mb = slice(&mu)?;
            let prox = match (&alpha, &start) {
                (Some(a), _) => proximal::loglinear(&mu_mb, &out.logprobs, &slice(a)?)?,
                (None, Some(s)) => slice(&s.logprobs)?,
                (None, None) => return Err(invalid("no proximal logprobs")),
            };
            let bw = behaviour_weights(
                cfg.correction(),
                cfg.correction_level,
                &prox,
                &mu_mb,
                &local,
            )?;
            if epoch == 0 {
                seen.add(&bw, &prox, &mu_mb)?;
            }
            let (old, weights) = match cfg.correction_mode {
                CorrectionMode::Decoupled => (prox, bw.weights),
                CorrectionMode::Bypass => (mu_mb.clone(), mu_mb.ones_like()?),
            };
            let pl = policy_loss::per_token(
                policy_kind,
                &out.logprobs,
                &old,
                &slice(&adv_tokens)?,
                &weights,
            )?;
            let policy_term = aggregate(cfg.loss_agg, &pl.loss, &local, cfg.max_completion_len)?;
            let mut loss = policy_term.clone();
            let mut kl_value = 0.0;
            if let Some(rl) = &ref_logp {
                let k = kl::per_token(cfg.kl_estimator, &out.logprobs, &slice(rl)?)?;
                let k_agg = aggregate(cfg.loss_agg, &k, &local, cfg.max_completion_len)?;
                kl_value = k_agg.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if cfg.kl_in == KlIn::Loss {
                    loss = (loss + (k_agg * cfg.kl_coef)?)?;
                }
            }
            if let (Some(c), Some((old_v, returns))) = (critic, &value_targets) {
                let v = c.values(&out.hidden)?;
                let vl = gae::value_loss(&v, &slice(old_v)?, &slice(returns)?, cfg.value_clip)?;
                let v_agg = aggregate(cfg.loss_agg, &vl, &local, cfg.max_completion_len)?;
                m.value_loss += v_agg.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                loss = (loss + (v_agg * cfg.vf_coef)?)?;
            }
            let ent = aggregate(cfg.loss_agg, &out.entropy, &local, cfg.max_completion_len)?;
            if cfg.entropy_coef != 0.0 {
                loss = (loss - (&ent * cfg.entropy_coef)?)?;
            }
            let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !loss_value.is_finite() {
                return Err(invalid(format!("loss is {loss_value}: refusing to update")));
            }
            let grads = loss.backward()?;
            let lr = opt_cfg.lr_at(step_index + updates as u64);
            let stats = opt.apply(&grads, lr, opt_cfg.max_grad_norm())?;
            updates += 1;
            m.loss += loss_value;
            m.policy_loss += policy_term.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            m.kl += kl_value;
            m.entropy += ent.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            m.grad_norm += stats.grad_norm;
            m.lr = lr;
            m.clip_fraction_low += pl.clip_fraction_low;
            m.clip_fraction_high += pl.clip_fraction_high;
        }
    }
    let k = updates as f64;
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

/// α of every completion token, from the rollouts' `versions`; the policy's version
/// defaults to the newest token version.
fn loglinear_alpha_of(rollouts: &[Rollout], policy_version: Option<u64>) -> Result<Vec<f64>> {
    let mut versions = Vec::new();
    for (i, r) in rollouts.iter().enumerate() {
        let v = r.versions.as_ref().ok_or_else(|| {
            invalid(format!(
                "rollout {i}: prox_logp = \"loglinear\" needs `versions` on every rollout"
            ))
        })?;
        versions.extend_from_slice(v);
    }
    let current = policy_version.unwrap_or_else(|| versions.iter().copied().max().unwrap_or(0));
    proximal::loglinear_alpha(&versions, current)
}

/// Running sums for the behaviour-weight metrics.
#[derive(Default)]
struct WeightStats {
    n: usize,
    sum: f64,
    sum_sq: f64,
    max: f64,
    min: f64,
    masked: f64,
    mismatch_k3: f64,
}

impl WeightStats {
    fn add(&mut self, bw: &BehaviourWeights, prox: &Tensor, mu: &Tensor) -> Result<()> {
        let raw = host(&bw.raw)?;
        if self.n == 0 {
            (self.max, self.min) = (f64::NEG_INFINITY, f64::INFINITY);
        }
        for &w in &raw {
            self.sum += w;
            self.sum_sq += w * w;
            self.max = self.max.max(w);
            self.min = self.min.min(w);
        }
        self.masked += bw.masked_fraction * raw.len() as f64;
        self.mismatch_k3 += host(&(prox - mu)?)?
            .iter()
            .map(|d| d.exp() - d - 1.0)
            .sum::<f64>();
        self.n += raw.len();
        Ok(())
    }

    /// mean, max, min, ESS = (Σw)² / (N·Σw²), masked fraction and the mismatch KL
    /// k3(μ ‖ π_prox) averaged over tokens.
    fn finish(&self, m: &mut StepMetrics) {
        let n = self.n.max(1) as f64;
        m.behaviour_weight_mean = self.sum / n;
        m.behaviour_weight_max = self.max;
        m.behaviour_weight_min = self.min;
        m.behaviour_weight_ess = self.sum * self.sum / (n * self.sum_sq);
        m.masked_fraction = self.masked / n;
        m.mismatch_kl = self.mismatch_k3 / n;
    }
}
