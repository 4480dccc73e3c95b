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

pub mod broadcast;
pub mod config;
pub mod error;
pub mod eval;
mod heartbeat;
mod push;
pub mod rejection;
pub mod render;
pub mod reward;
pub mod scored;
mod weight_sync;
pub mod worker;

pub use error::{Error, Result};
