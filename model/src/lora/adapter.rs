//! A LoRA adapter: the (A, B) pair of every targeted projection of every layer, as a
//! [`ParamStore`] under the names PEFT saves them with, so that the optimizer, the
//! weight transfer and checkpoints treat an adapter as they treat a model.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::config::{LoraInit, LoraSpec, Target};
use crate::params::ParamStore;

/// The prefix PEFT gives a causal LM's tensors (`base_model.model.` + the HF name).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// (out, in) of projection `t` in `cfg`'s decoder block.
pub fn target_shape(cfg: &ModelConfig, t: Target) -> (usize, usize) {
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.num_key_value_heads * cfg.head_dim;
    match t {
        Target::Q => (q_out, d),
        Target::K | Target::V => (kv_out, d),
        Target::O => (d, q_out),
        Target::Gate | Target::Up => (f, d),
        Target::Down => (d, f),
    }
}

/// The HF name of layer `layer`'s projection `t` (`model.layers.3.self_attn.q_proj`).
pub fn module_name(layer: usize, t: Target) -> String {
    format!("model.layers.{layer}.{}", t.path())
}

/// Name and shape of every adapter tensor, in the adapter's stable order: layer by
/// layer, the targets in the block's order, A (r, in) then B (out, r) of each.
pub fn expected_adapter_params(cfg: &ModelConfig, spec: &LoraSpec) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for &t in &spec.targets {
            let (o, i) = target_shape(cfg, t);
            let m = module_name(layer, t);
            out.push((
                format!("{PEFT_PREFIX}{m}.lora_A.weight"),
                vec![spec.rank, i],
            ));
            out.push((
                format!("{PEFT_PREFIX}{m}.lora_B.weight"),
                vec![o, spec.rank],
            ));
        }
    }
    out
}

/// Low-rank adapters ΔW = s·B·A on the targeted projections of a model's layers.
#[derive(Clone, Debug)]
pub struct Adapter {
    spec: LoraSpec,
    params: ParamStore,
    /// (A, B) index in `params` per layer and target (`None`: not targeted).
    pairs: Vec<[Option<usize>; 7]>,
    /// The fingerprint of the base it is applied to ([`ParamStore::fingerprint`]),
    /// set when it is attached (the base is frozen from then on).
    base: Option<u64>,
}

impl Adapter {
    /// A fresh adapter: A from `init` (seeded, the same on any machine), B zero, so the
    /// adapted model starts as the base.
    pub fn init(
        cfg: &ModelConfig,
        spec: LoraSpec,
        init: LoraInit,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal, Uniform};
        spec.validate("[lora]")?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape) in expected_adapter_params(cfg, &spec) {
            let n: usize = shape.iter().product();
            let data: Vec<f64> = if name.ends_with("lora_B.weight") {
                vec![0.0; n]
            } else {
                match init {
                    // kaiming_uniform_(a = √5): bound = √(6 / ((1 + a²)·in)) = 1/√in.
                    LoraInit::Kaiming => {
                        let bound = 1.0 / (shape[1] as f64).sqrt();
                        let u = Uniform::new(-bound, bound)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        (0..n).map(|_| u.sample(&mut rng)).collect()
                    }
                    LoraInit::Gaussian => {
                        let g = Normal::new(0.0, 1.0 / spec.rank as f64)
                            .map_err(|e| Error::invalid(e.to_string()))?;
                        (0..n).map(|_| g.sample(&mut rng)).collect()
                    }
                }
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg, spec, tensors, dtype, device)
    }

    /// An adapter from named tensors (PEFT's names, with or without PEFT's prefix),
    /// every expected one present with its shape and nothing else.
    pub fn from_tensors(
        cfg: &ModelConfig,
        spec: LoraSpec,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        spec.validate("adapter")?;
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| match k.starts_with(PEFT_PREFIX) {
                true => (k, v),
                false => (format!("{PEFT_PREFIX}{k}"), v),
            })
            .collect();
        let expected = expected_adapter_params(cfg, &spec);
        let params = ParamStore::from_expected(&expected, tensors, dtype, device, "adapter")?;
        let mut pairs = vec![[None; 7]; cfg.num_hidden_layers];
        let mut at = 0;
        for layer in pairs.iter_mut() {
            for &t in &spec.targets {
                layer[t as usize] = Some(at);
                at += 2;
            }
        }
        Ok(Adapter {
            spec,
            params,
            pairs,
            base: None,
        })
    }

    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// The A and B tensors (trainable, transferred, saved).
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The scale s of ΔW = s·B·A.
    pub fn scale(&self) -> f64 {
        self.spec.scale()
    }

    /// Layer `layer`'s (A, B) on projection `t`, if targeted.
    pub fn pair(&self, layer: usize, t: Target) -> Option<(&Var, &Var)> {
        let i = self.pairs.get(layer)?[t as usize]?;
        Some((&self.params.vars()[i], &self.params.vars()[i + 1]))
    }

    /// ΔW = s·B·A (out, in) of layer `layer`'s projection `t`, if targeted.
    pub fn delta(&self, layer: usize, t: Target) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.pair(layer, t) else {
            return Ok(None);
        };
        let d = b.as_tensor().detach().matmul(&a.as_tensor().detach())?;
        Ok(Some(d.affine(self.scale(), 0.0)?))
    }

    /// The fingerprint of the base this adapter is attached to (`None` before it is):
    /// a LoRA version names its base by it.
    pub fn base_fingerprint(&self) -> Option<u64> {
        self.base
    }

    pub(crate) fn set_base(&mut self, fingerprint: u64) {
        self.base = Some(fingerprint);
    }

    /// The number of layers the adapter covers.
    pub fn layers(&self) -> usize {
        self.pairs.len()
    }
}
