//! LoRA: low-rank adapters on a frozen base. A targeted projection W (out, in) becomes
//!
//!   y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ,   A (r, in), B (out, r), s = α/r (α/√r with rsLoRA)
//!
//! as PEFT computes it. Only A and B are trained (the base has no gradient and no
//! optimizer state), only they travel between trainer and generators, and they are
//! saved in PEFT's format. A generator applies them unmerged (the base stays packed;
//! the adapter costs r·(in + out) per row); [`crate::Model::merged`] folds them into the
//! base (W + s·B·A) for a saved model.
//!
//! - `config.rs`: `[lora]`, the targets, the spec (rank, α, scaling).
//! - `adapter.rs`: `Adapter`, the (A, B) pairs as a `ParamStore` under PEFT's names.
//! - `layer.rs`: `LayerLora`, a layer's adapters in a forward, and `adapted`, the
//!   projection with its adapter added.
//! - `model.rs`: `Model`'s LoRA methods: `with_adapter` (the base frozen, its
//!   fingerprint taken), `trainable`, `without_adapter`, `merged`, `fold_adapter` /
//!   `refold` (generators).
//! - `op.rs`: `lora_linear`, a projection with its adapter as one autograd node (the
//!   training path: no (rows, out) activations of its own).
//! - `peft.rs`: PEFT's `adapter_config.json` and `adapter_model.safetensors`.

pub mod adapter;
pub mod config;
pub mod layer;
mod model;
pub mod op;
pub mod peft;

pub use adapter::{expected_adapter_params, Adapter, PEFT_PREFIX};
pub use config::{LoraInit, LoraSection, LoraSpec, Target};
pub use layer::LayerLora;
pub use peft::{load_peft, read_spec, save_peft, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
