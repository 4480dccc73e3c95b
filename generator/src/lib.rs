//! `tandem-generator`: the rollout worker.
//!
//! - [`worker`] — leases, batched sampling with per-token versions and scoring; its
//!   heartbeats (`heartbeat.rs`), the rollout stream to the trainer (`push.rs`) and
//!   weight swaps between batches or in flight (`weight_sync.rs`, from the
//!   [`broadcast`] inbox or the gRPC fetch)
//! - [`reward`] — built-in verifiers (math final answer, format, exact match) and
//!   the external reward service
//! - [`render`] — prompts to token ids (chat template or raw text)
//! - [`config`] — the `[generator]` section
//! - [`scored`] — offline sampling: N completions per prompt, decoded and scored
//! - [`rejection`] — rejection sampling: N completions per prompt, the best kept as SFT
//!   data
//! - [`eval`] — held-out evaluation: accuracy, pass@k, maj@k, mean length
//! - [`env`] — the `[env]` section: multi-turn episodes with tools; [`episode`] — one
//!   sample's turns as sampled plus the environment's; [`tool_call`] — the Hermes
//!   tool-call convention; [`calculator`] — the calculator tool; [`python`] — the
//!   `python` tool, run in [`tandem_sandbox`]
//! - [`agent`] — `[env] agent` programs, one process per episode; [`openai`] — the
//!   OpenAI-compatible endpoint they talk to; [`chat_episode`] — an agent's requests
//!   merged into samples, the model's tokens as sampled

#![forbid(unsafe_code)]

pub mod agent;
pub mod broadcast;
pub mod calculator;
pub mod chat_episode;
pub mod config;
pub mod env;
pub mod env_service;
pub mod episode;
pub mod error;
pub mod eval;
pub mod groups;
mod heartbeat;
pub mod openai;
mod push;
pub mod python;
pub mod rejection;
pub mod render;
pub mod reward;
pub mod scored;
mod scoring;
pub mod tool_call;
mod weight_sync;
pub mod worker;

pub use error::{Error, Result};
