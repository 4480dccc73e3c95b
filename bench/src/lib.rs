//! `tandem-bench`: the benchmarks behind `tandem bench`, each figure beside its
//! reference in the same run (docs/benchmarks.md records them).
//!
//! - [`model`] — the engine: decode, fwd+bwd and optimizer step beside transformers
//! - [`generate`] — the sampling engine (continuous batching, shared prefill, paged
//!   KV) beside the machine's GEMM ceiling and transformers' `generate`
//! - [`system`] — the distributed loop: weight sync beside raw TCP, rollout ingest
//!   beside a training step, async beside sync steps/hour
//! - `nccl` (feature `nccl`) — NCCL broadcast beside a device-to-device copy
//! - [`train_step`] — one GRPO step on a realistic RL batch beside a TRL-style
//!   PyTorch step, with each of packing, prompt sharing and skipping switched off
//! - [`timing`] — medians of timed repetitions, peak RSS, measurements in child
//!   processes
//! - [`reference`] — what the Python reference scripts must print
//!
//! It drives every other crate, so nothing depends on it but the binary.
#![forbid(unsafe_code)]

pub mod error;
pub mod generate;
pub mod model;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod reference;
pub mod system;
pub mod timing;
pub mod train_step;

use clap::{Args, Subcommand};

pub use error::{Error, Result};

/// `tandem bench …`.
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchWhat,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// The model engine: decode tok/s, fwd+bwd time, optimizer step time, peak RSS.
    Model(model::ModelBench),
    /// The distributed loop: weight sync vs raw TCP, rollout ingest, async vs sync.
    System(system::SystemBench),
    /// The sampling engine's tok/s vs the GEMM ceiling and transformers' generate.
    Generate(generate::GenerateBench),
    /// One GRPO training step on a realistic RL batch vs a TRL-style PyTorch step.
    TrainStep(train_step::TrainStepBench),
    /// NCCL broadcast (world size 1) of a model's weights vs a device-to-device copy.
    #[cfg(feature = "nccl")]
    Nccl(nccl::NcclBench),
}

/// Runs the benchmark `a` names.
pub fn run(a: BenchArgs) -> Result<()> {
    match a.what {
        BenchWhat::Model(m) => model::run(m),
        BenchWhat::System(s) => system::run(s),
        BenchWhat::TrainStep(t) => train_step::run(t),
        BenchWhat::Generate(g) => generate::run(g),
        #[cfg(feature = "nccl")]
        BenchWhat::Nccl(n) => nccl::run(n),
    }
}
