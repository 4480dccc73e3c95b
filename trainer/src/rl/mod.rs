//! Online RL: one module per concept of the algorithms, each with its formula in the
//! doc comment of the function that computes it, and the training step built from them.
//!
//! - [`advantage`] — REINFORCE, RLOO, GRPO, Dr. GRPO, REINFORCE++
//! - [`policy_loss`] — PPO clip (clip-higher, dual clip), REINFORCE, GSPO, CISPO
//! - [`correction`] — behaviour weights: none, truncated IS, IcePop; token or sequence level
//! - [`kl`] — k1, k2, k3 estimators
//! - [`aggregate`] — token mean, sequence mean of token means, Dr. GRPO's constant normaliser
//! - [`proximal`] — π_prox recomputed, or AReaL's log-linear approximation by version
//! - [`gae`] — GAE(γ, λ) over tokens and PPO's clipped value loss (the critic side)
//! - [`overlong`] — DAPO's soft overlong penalty on the reward
//! - [`distill`] — on-policy distillation: the teacher's per-token reverse KL in the advantage
//! - [`tokens`] — completions' token layout and their loss mask (what is trained)
//!
//! [`rollout`] is the rollout record, [`step`] one training step (its phases in the
//! order of the algorithm) and [`step_metrics`] what it measured.

pub mod advantage;
pub mod aggregate;
pub mod correction;
pub mod distill;
pub mod gae;
pub mod kl;
pub mod overlong;
pub mod policy_loss;
pub mod proximal;
pub mod rollout;
pub mod step;
pub mod step_metrics;
pub mod tokens;
