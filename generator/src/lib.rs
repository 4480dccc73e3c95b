//! `tandem-generator`: the rollout worker, and offline sampling on the same engine.
//!
//! The worker is a loop over components that own their state:
//! - [`worker`] — the loop and its wiring: lease groups ahead of the engine, step it,
//!   hand finished groups to the scorer; `Settings`, `Registration`
//! - `sampler.rs` — the engine driver: the `Engine`, the policy, the groups being
//!   sampled as episodes ([`tandem_env`]) and agent programs, the leases in flight
//! - `scorer.rs` — the scorer stage, a thread fed by a channel: verifiers, the judge
//!   ([`judge`]), the reward service (`reward_service.rs`, retried, the lease given back
//!   when it keeps failing), environment rewards and the reward model, then the push
//!   through `outbox.rs` (the rollout stream: groups pending until acknowledged)
//! - `failure.rs` — failures are retried, never zeroed: a group whose episode failed
//!   through no doing of the model (or whose scoring failed) runs again up to
//!   `[env] max_retries` times, then its lease is given back; most of the recent groups
//!   given back stops the generator
//! - `leases.rs` — leasing, giving leases back, leaving; `weight_sync.rs` — versions
//!   from the [`broadcast`] inbox or the gRPC fetch, assigned in place;
//!   `heartbeat.rs` — the heartbeat task and the `Beat` the components report to
//! - [`reward`] — the `[reward]` section and the built-in verifiers (math final answer,
//!   format, exact match)
//! - [`render`] — prompts to token ids (chat template or raw text)
//! - [`config`] — the `[generator]` section
//! - [`offline`] — offline sampling: N completions per prompt, decoded and scored
//! - [`rejection`] — rejection sampling: N completions per prompt, the best kept as SFT
//!   data
//! - [`eval`] — held-out evaluation: accuracy, pass@k, maj@k, mean length
//!
//! Environments (episodes, tools, the Environment service, agent programs and their
//! OpenAI-compatible endpoint) live in [`tandem_env`].

#![forbid(unsafe_code)]

pub mod broadcast;
pub mod config;
pub mod error;
pub mod eval;
mod failure;
mod heartbeat;
pub mod judge;
mod leases;
pub mod offline;
mod outbox;
pub mod rejection;
pub mod render;
pub mod reward;
mod reward_service;
mod sampler;
mod scorer;
mod weight_sync;
pub mod worker;

pub use error::{Error, Result};
