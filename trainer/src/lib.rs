//! `tandem-trainer`: the learner, in three parts.
//!
//! - [`rl`] — online RL: the algorithms' concepts (advantages, policy losses,
//!   behaviour corrections, KL, aggregation, π_prox, GAE, overlong penalty,
//!   distillation), the rollout record and the training step built from them.
//! - [`node`] — the trainer process: the Trainer gRPC service (rollouts in, weight
//!   buckets out), the checks and the buffer rollouts pass, the learner loop that turns
//!   batches into versions, checkpoints, the held-out evaluation, the weight broadcast.
//! - [`offline`] — the stages `tandem sft | rm | dpo`, each with its data and loss, and
//!   the loop they share.
//!
//! Shared by all three: [`config`] (`[algorithm]`, `[optimizer]`, `[trainer]`),
//! [`optimizer`] and [`error`].
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod node;
pub mod offline;
pub mod optimizer;
pub mod rl;

pub use error::{Error, Result};
