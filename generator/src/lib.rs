//! `tandem-generator`: the rollout worker.
//!
//! - [`worker`] — leases, batched sampling with per-token versions, the rollout
//!   stream to the trainer, weight swaps (between batches or in flight)
//! - [`reward`] — built-in verifiers (math final answer, format, exact match) and
//!   the external reward service
//! - [`render`] — prompts to token ids (chat template or raw text)
//! - [`config`] — the `[generator]` section
//! - [`rejection`] — rejection sampling: N completions per prompt, the best kept as SFT
//!   data

pub mod broadcast;
pub mod config;
pub mod error;
pub mod rejection;
pub mod render;
pub mod reward;
pub mod worker;

pub use error::{Error, Result};
