//! `tandem-trainer`: the learner. One module per concept of the algorithms, each with
//! its formula in the doc comment of the function that computes it:
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
//! [`config`] holds the `[algorithm]`, `[optimizer]` and `[trainer]` sections,
//! [`rollout`] the rollout record, [`step`] one training step and [`step_metrics`]
//! what it measured.
//!
//! The service side: [`ingest`] checks incoming groups, [`buffer`] holds them,
//! [`service`] is the Trainer gRPC service (rollouts in, weight buckets out) and
//! [`learner`] the loop that turns batches into versions; [`checkpoint`] saves and
//! restores it; [`evaluate`] runs the held-out evaluation between steps; [`publisher`] pushes each version to the generators of the broadcast
//! group (`tandem_weights::broadcast`); [`node`] assembles the trainer process.
//!
//! The offline side: [`sft`] (records, masking and the SFT loss), [`comparison`],
//! [`preference`], [`reward_model`] and [`dpo`] (preference records and their losses),
//! and [`offline`], the stages `tandem sft | rm | dpo` and the loop they share.
#![forbid(unsafe_code)]

pub mod advantage;
pub mod aggregate;
pub mod buffer;
pub mod checkpoint;
pub mod comparison;
pub mod config;
pub mod correction;
pub mod distill;
pub mod dpo;
pub mod error;
pub mod evaluate;
pub mod gae;
pub mod ingest;
pub mod kl;
pub mod learner;
pub mod node;
pub mod offline;
pub mod overlong;
pub mod policy_loss;
pub mod preference;
pub mod proximal;
pub mod publisher;
pub mod reward_model;
pub mod rollout;
pub mod service;
pub mod sft;
pub mod step;
pub mod step_metrics;
pub mod tokens;

pub use error::{Error, Result};
