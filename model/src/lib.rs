//! `tandem-model`: the trainable Llama-family transformer every part of Tandem runs.
//! It depends on no other Tandem crate.
//!
//! - [`Model`] — parameters, training forward, per-token logprobs and entropies with
//!   gradients to every weight ([`Model::completion_logprobs`]).
//! - [`engine`] — the sampling engine: continuous batching over a paged KV cache,
//!   prompts prefilled once per request, a prefix cache across requests; [`generate`]
//!   runs it to completion.
//! - [`load`] / [`save_hf`] — HF folders, GGUF files, fetchable models (SmolLM2, Gemma 3 270M).
//! - [`lora`] — low-rank adapters on a frozen base: trained, sent and saved alone (PEFT's
//!   format), applied unmerged or merged.
//! - [`optim`] — AdamW (fused, state saved and restored), SGD, gradient clipping.
//! - [`preset`] — tiny random models with a real BPE tokenizer for tests and demos.
//! - [`scalar_head`] — the value head (PPO's critic) and the reward head on the final
//!   hidden state; [`reward_model`] scores completions with a trained reward model.
//! - [`score`] — per-token logprobs and entropies of given completions (`tandem score`).
//! - [`device`] — the process's device and dtype (`TANDEM_DEVICE`, `TANDEM_DTYPE`).
//!
//! Unsafe code lives in one module, `kernels`, the only one allowed it: the CPU
//! kernels (the checked strided product and the segment attention on it, the paged
//! attention, the packed and decode matmuls, the AVX2 helpers), each beside the safe
//! wrapper that checks what its contract needs. Every `unsafe fn` states its contract in
//! a `# Safety` section and every `unsafe` block says, in a `SAFETY:` comment, which
//! check makes it hold. The rest of the crate is safe code that calls the wrappers
//! (`tests/unsafe_confined.rs` checks that no other module allows `unsafe`).
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod chat_template;
pub mod checkpoint;
pub mod config;
mod cpu_storage;
pub mod decode_matmul;
pub mod decoder;
pub mod device;
pub mod durable;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
#[allow(unsafe_code)]
mod kernels;
pub mod linear;
pub mod logprob;
pub mod lora;
pub mod ops;
pub mod optim;
pub mod packed_matmul;
pub mod packing;
pub mod params;
pub mod preset;
pub mod product;
pub mod reward_model;
pub mod rope;
pub mod sampling;
pub mod scalar_head;
pub mod score;
pub mod tokenizer;
pub mod transformer;

pub use checkpoint::{
    check, load, materialize, save_hf, save_hf_sharded, save_policy, write_atomic, ModelSection,
    Pretrained, MAX_SHARD_BYTES,
};
pub use config::{Activation, Architecture, ModelConfig, SlidingWindow};
pub use device::{load_model, load_policy, process_device, process_dtype};
pub use engine::{Engine, EngineConfig, EngineStats, Finished, Request, StepOutput};
pub use error::{Error, Result};
pub use generate::{generate, generate_groups, Completion, FinishReason};
pub use kernels::simd;
pub use lora::{Adapter, LoraSection};
pub use reward_model::RewardModel;
pub use sampling::SamplingParams;
pub use scalar_head::{ScalarHead, REWARD_HEAD_FILE, VALUE_HEAD_FILE};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use transformer::{CompletionLogprobs, Model, Weights};

/// The dtype a device computes in: f32 on CPU, bf16 on CUDA.
pub fn default_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cuda() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}
