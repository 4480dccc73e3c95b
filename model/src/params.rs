//! The parameters of a model: named, ordered, trainable tensors.
//!
//! Names are the Hugging Face ones (`model.layers.3.self_attn.q_proj.weight`), so a
//! checkpoint is a plain `model.safetensors` that `transformers` loads. The order is
//! stable (embeddings, layers in order, final norm, head): weight buckets, optimizer
//! state and checksums rely on it.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Name and shape of every parameter the config implies, in the stable order.
pub fn expected_params(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q_out, kv_out) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q_out, d]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv_out, d]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv_out, d]));
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q_out]));
            out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv_out]));
            out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv_out]));
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, q_out]));
        if cfg.architecture.qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        if cfg.architecture.sandwich_norms() {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![d]));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![d]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    out
}

/// Ordered, named trainable tensors.
#[derive(Clone, Debug)]
pub struct ParamStore {
    names: Vec<String>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    /// Bumped by every [`ParamStore::assign`] (shared by clones, like the values), so
    /// that derived copies of the weights (the engine's packed matrices) know when to
    /// rebuild.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl ParamStore {
    /// Builds the store from loaded tensors, checking that every expected tensor is
    /// present with the right shape, and converting to `dtype` on `device`.
    /// `lm_head.weight` in a tied model is ignored (some exporters write it).
    pub fn from_tensors(
        cfg: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if cfg.tie_word_embeddings {
            tensors.remove("lm_head.weight");
        }
        // Rotary caches some exporters include are derived, not parameters.
        tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        Self::from_expected(&expected_params(cfg), tensors, dtype, device, "weights")
    }

    /// Builds a store holding exactly the `expected` (name, shape) tensors of
    /// `tensors`, in that order, converted to `dtype` on `device`; `what` names the set
    /// in errors (a missing, misshapen or unexpected tensor).
    pub(crate) fn from_expected(
        expected: &[(String, Vec<usize>)],
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        what: &str,
    ) -> Result<Self> {
        let mut names = Vec::with_capacity(expected.len());
        let mut vars = Vec::with_capacity(expected.len());
        for (name, shape) in expected {
            let t = tensors
                .remove(name)
                .ok_or_else(|| Error::invalid(format!("{what}: missing tensor `{name}`")))?;
            if t.dims() != shape.as_slice() {
                return Err(Error::invalid(format!(
                    "{what}: tensor `{name}` has shape {:?}, the config implies {:?}",
                    t.dims(),
                    shape
                )));
            }
            let t = t.to_dtype(dtype)?.to_device(device)?;
            names.push(name.clone());
            vars.push(Var::from_tensor(&t)?);
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::invalid(format!(
                "{what}: unexpected tensor `{extra}` ({} unexpected in all); does the config match the weights?",
                tensors.len()
            )));
        }
        Ok(Self::from_parts(names, vars))
    }

    fn from_parts(names: Vec<String>, vars: Vec<Var>) -> Self {
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        ParamStore {
            names,
            vars,
            index,
            generation: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
    pub fn names(&self) -> &[String] {
        &self.names
    }
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(|s| s.as_str()).zip(self.vars.iter())
    }
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.vars[i])
    }
    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Copies `tensors` into the existing parameters in place (same storage, so every
    /// holder of these parameters sees the new values). Every name must be known and
    /// every shape must match; nothing is written unless all are valid.
    pub fn assign(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, t) in tensors {
            let var = self
                .get(name)
                .ok_or_else(|| Error::invalid(format!("weights: unknown tensor `{name}`")))?;
            if var.dims() != t.dims() {
                return Err(Error::invalid(format!(
                    "weights: tensor `{name}` has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        self.touch();
        for (name, t) in tensors {
            let var = &self.vars[self.index[name]];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// How many times the values were replaced through [`ParamStore::assign`] (or
    /// marked by [`ParamStore::touch`]); an engine's packed copies of the weights are
    /// rebuilt when it changes. The optimizer updates the `Var`s in place without
    /// counting, so code that samples after training steps builds a new engine (the
    /// trainer's held-out evaluation and the offline stages do); code that changes the
    /// `Var`s directly and keeps an engine must call [`ParamStore::touch`].
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Which store this is (clones share it) and its [`ParamStore::generation`]: equal
    /// across two calls only when no value was assigned in between. An engine's prefix
    /// cache is keyed on it.
    pub fn identity(&self) -> (usize, u64) {
        (
            std::sync::Arc::as_ptr(&self.generation) as usize,
            self.generation(),
        )
    }

    /// Marks the values as changed.
    pub fn touch(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every parameter's values, concatenated in parameter order as little-endian bytes
    /// of their dtype (how weights travel between processes), and the dtype's name.
    pub fn to_bytes(&self) -> Result<(Vec<u8>, &'static str)> {
        let dtype = self.vars.first().map_or(DType::F32, |v| v.dtype());
        let mut out = Vec::with_capacity(self.numel() * dtype.size_in_bytes());
        for v in &self.vars {
            let flat = v.as_tensor().flatten_all()?;
            match dtype {
                DType::F32 => flat
                    .to_vec1::<f32>()?
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                DType::BF16 => flat
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                DType::F16 => flat
                    .to_vec1::<half::f16>()?
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                other => {
                    return Err(Error::invalid(format!(
                        "weights: cannot serialise parameters of dtype {other:?}"
                    )))
                }
            }
        }
        Ok((out, dtype_name(dtype)))
    }

    /// A fingerprint of the parameters (which model, which values): the CRC-32 of
    /// every name, shape and dtype in the high 32 bits, the CRC-32 of every value's
    /// little-endian bytes (in [`Self::to_bytes`]'s order) in the low 32. Two processes
    /// that loaded the same base the same way agree on it; a LoRA version names its base
    /// by it. One pass over the values, one tensor's copy at a time.
    pub fn fingerprint(&self) -> Result<u64> {
        let (mut shape, mut values) = (crc32fast::Hasher::new(), crc32fast::Hasher::new());
        for (name, v) in self.iter() {
            shape.update(name.as_bytes());
            shape.update(format!("{:?}{:?}", v.dims(), v.dtype()).as_bytes());
            let flat = v.as_tensor().flatten_all()?;
            match v.dtype() {
                DType::F32 => flat
                    .to_vec1::<f32>()?
                    .iter()
                    .for_each(|x| values.update(&x.to_le_bytes())),
                DType::F64 => flat
                    .to_vec1::<f64>()?
                    .iter()
                    .for_each(|x| values.update(&x.to_le_bytes())),
                DType::BF16 => flat
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .for_each(|x| values.update(&x.to_le_bytes())),
                DType::F16 => flat
                    .to_vec1::<half::f16>()?
                    .iter()
                    .for_each(|x| values.update(&x.to_le_bytes())),
                other => {
                    return Err(Error::invalid(format!(
                        "fingerprint: parameters of dtype {other:?}"
                    )))
                }
            }
        }
        Ok(((shape.finalize() as u64) << 32) | values.finalize() as u64)
    }

    /// Assigns weights from [`Self::to_bytes`]'s form in place. The length must match
    /// this model's parameters exactly; nothing is written otherwise.
    pub fn assign_bytes(&self, bytes: &[u8], dtype: &str) -> Result<()> {
        self.assign_chunks(&[bytes], dtype)
    }

    /// Like [`Self::assign_bytes`] for the concatenation of `chunks` (received buckets),
    /// without first copying them into one buffer.
    pub fn assign_chunks(&self, chunks: &[&[u8]], dtype: &str) -> Result<()> {
        let dt = match dtype {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => {
                return Err(Error::invalid(format!(
                    "weights: unknown dtype {other:?} (expected f32, bf16 or f16)"
                )))
            }
        };
        let need = self.numel() * dt.size_in_bytes();
        let got: usize = chunks.iter().map(|c| c.len()).sum();
        if got != need {
            return Err(Error::invalid(format!(
                "weights: {got} bytes of {dtype}, but this model's {} parameters need {need}",
                self.numel()
            )));
        }
        let mut tensors = HashMap::with_capacity(self.vars.len());
        let (mut chunk, mut at) = (0usize, 0usize);
        let mut scratch = Vec::new();
        for (name, v) in self.iter() {
            let n = v.elem_count() * dt.size_in_bytes();
            // Skip exhausted chunks; a tensor inside one chunk is read in place,
            // one that straddles chunks is gathered first.
            while chunk < chunks.len() && at == chunks[chunk].len() {
                chunk += 1;
                at = 0;
            }
            let t = if n == 0 || (chunk < chunks.len() && at + n <= chunks[chunk].len()) {
                let slice = if n == 0 {
                    &[][..]
                } else {
                    &chunks[chunk][at..at + n]
                };
                at += n;
                Tensor::from_raw_buffer(slice, dt, v.dims(), &Device::Cpu)?
            } else {
                scratch.clear();
                while scratch.len() < n {
                    let take = (n - scratch.len()).min(chunks[chunk].len() - at);
                    scratch.extend_from_slice(&chunks[chunk][at..at + take]);
                    at += take;
                    if at == chunks[chunk].len() && scratch.len() < n {
                        chunk += 1;
                        at = 0;
                    }
                }
                Tensor::from_raw_buffer(&scratch, dt, v.dims(), &Device::Cpu)?
            };
            tensors.insert(name.to_string(), t);
        }
        self.assign(&tensors)
    }

    /// A copy of the current values (new storage), detached from autograd.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.iter()
            .map(|(n, v)| Ok((n.to_string(), v.as_tensor().detach().copy()?)))
            .collect()
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}
