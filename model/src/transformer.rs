//! The Llama-family decoder, written with differentiable candle ops.
//!
//! One forward serves training (full sequences, gradients to every parameter) and
//! decoding (a KV cache, candle's fused inference kernels). The fused kernels have no
//! backward, so they are only used on detached weights (`Model::inference_weights`);
//! a test checks that both paths give the same logits.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::decode_matmul;
use crate::decoder::Recompute;
use crate::error::{Error, Result};
use crate::logprob;
use crate::lora::{Adapter, LayerLora, Target};
use crate::packed_matmul::{PackedLayer, PackedMatrix};
use crate::packing::{ForwardOptions, Packing};
use crate::params::{expected_params, ParamStore};
use crate::rope::Rope;

/// Added to attention scores of keys a query must not see. Finite, so that a fully
/// masked row (a padding query) yields a uniform softmax instead of NaN.
pub const MASKED: f64 = -1e9;

/// The tensors of one decoder block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub input_norm: Tensor,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Qwen3's per-head RMSNorm weights of q and k, (head_dim) each.
    pub qk_norm: Option<(Tensor, Tensor)>,
    pub o: Tensor,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma 3's
    /// `pre_feedforward_layernorm`).
    pub post_norm: Tensor,
    /// Gemma 3's norms of the attention and MLP outputs before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    pub sandwich: Option<(Tensor, Tensor)>,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    /// The projections packed for the batch decode kernel (inference on CPU, f32).
    pub packed: Option<Arc<PackedLayer>>,
    /// The layer's LoRA adapters, applied unmerged beside the projections.
    pub lora: Option<LayerLora>,
}

/// The RoPE tables gathered at a forward's positions: (cos, sin) of the global layers
/// and of the local ones.
#[derive(Clone, Debug)]
pub(crate) struct Rotations {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

impl Rotations {
    /// (cos, sin) of a layer with attention `window` (a local layer's own tables).
    pub(crate) fn of(&self, window: Option<usize>) -> (&Tensor, &Tensor) {
        let (cos, sin) = match (window, &self.local) {
            (Some(_), Some(local)) => local,
            _ => &self.global,
        };
        (cos, sin)
    }
}

/// Views of the parameters for one forward pass: tracked (training) or detached
/// (inference). Cheap to build: tensors share storage with the parameters.
#[derive(Clone, Debug)]
pub struct Weights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    /// `None` when the head is tied to the embeddings.
    pub lm_head: Option<Tensor>,
    /// Use candle's fused (non-differentiable) kernels.
    pub fused: bool,
    /// The output projection packed for the batch decode kernel.
    pub head_packed: Option<PackedMatrix>,
}

impl Weights {
    /// The output projection (V, d).
    pub fn head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// A loaded model: configuration, parameters and RoPE tables on one device.
#[derive(Clone, Debug)]
pub struct Model {
    pub(crate) config: ModelConfig,
    pub(crate) params: ParamStore,
    pub(crate) rope: Rope,
    /// The local layers' tables (Gemma 3), `None` when every layer is global.
    pub(crate) rope_local: Option<Rope>,
    /// Gemma 3's √hidden on the embeddings, rounded to f32 and then to the model's
    /// dtype as transformers does (its scale is an f32 buffer).
    embed_scale: Option<f64>,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    /// LoRA adapters on the (then frozen) parameters (`lora/model.rs`).
    pub(crate) adapter: Option<Adapter>,
    /// For inference with the adapter folded into the parameters: the targeted
    /// projections' base values W₀ by name ([`Model::fold_adapter`]).
    pub(crate) folded: Option<Arc<HashMap<String, Tensor>>>,
}

/// x (..., d) @ wᵀ (+ b): on the packed batch kernel when `packed` (W packed) is
/// given, else `fused` lets a decode-sized input take the bandwidth-bound kernel of
/// [`decode_matmul`], else the differentiable [`crate::linear::linear`].
pub(crate) fn project(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    packed: Option<&PackedMatrix>,
    fused: bool,
) -> Result<Tensor> {
    if let Some(p) = packed {
        let [y] = project_each(x, [w], [b], Some([p]), fused)?;
        return Ok(y);
    }
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, d))?;
    let y = if fused && decode_matmul::applies(&x2, w) {
        decode_matmul::matmul_t(&x2, w)?
    } else {
        crate::linear::linear(&x2.contiguous()?, w)?
    };
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().unwrap() = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// [`project`] of one input by several weights `ws` (biases `bs`): on the packed
/// kernel, one pass over all their panels ([`PackedMatrix::matmul_each`]); otherwise
/// each weight alone.
pub(crate) fn project_each<const N: usize>(
    x: &Tensor,
    ws: [&Tensor; N],
    bs: [Option<&Tensor>; N],
    packed: Option<[&PackedMatrix; N]>,
    fused: bool,
) -> Result<[Tensor; N]> {
    let mut out = Vec::with_capacity(N);
    match packed {
        None => {
            for (w, b) in ws.into_iter().zip(bs) {
                out.push(project(x, w, b, None, fused)?);
            }
        }
        Some(mats) => {
            let dims = x.dims().to_vec();
            let d = *dims.last().unwrap_or(&0);
            let rows: usize = dims[..dims.len() - 1].iter().product();
            let ys = PackedMatrix::matmul_each(mats, &x.reshape((rows, d))?)?;
            for ((y, b), m) in ys.into_iter().zip(bs).zip(mats) {
                let y = match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let mut shape = dims.clone();
                *shape.last_mut().unwrap() = m.out_dim();
                out.push(y.reshape(shape)?);
            }
        }
    }
    Ok(out.try_into().expect("one output per weight"))
}

impl Model {
    /// Builds a model from named tensors (HF names), checking names and shapes.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let params = ParamStore::from_tensors(&config, tensors, dtype, device)?;
        let rope = Rope::new(&config, dtype, device)?;
        let rope_local = Rope::local(&config, dtype, device)?;
        let embed_scale = match config.architecture {
            crate::config::Architecture::Gemma3 => Some(
                Tensor::new(&[(config.hidden_size as f64).sqrt() as f32], &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?[0],
            ),
            _ => None,
        };
        Ok(Model {
            config,
            params,
            rope,
            rope_local,
            embed_scale,
            dtype,
            device: device.clone(),
            adapter: None,
            folded: None,
        })
    }

    /// Random initialisation as `transformers` does for Llama: N(0, 0.02) matrices,
    /// norms at one (Gemma 3's offsets from one at zero), biases at zero.
    /// Deterministic for a seed on any machine.
    pub fn random(config: ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::invalid(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, shape) in expected_params(&config) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0 - config.architecture.norm_offset() as f32; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(config, tensors, dtype, device)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    /// The base parameters (every weight of the model; frozen under an adapter).
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Views of the parameters: `track`ed ones record the autograd graph, except the
    /// base's under an adapter (frozen: no gradient is computed for them).
    pub(crate) fn collect_weights(&self, track: bool, fused: bool) -> Weights {
        let view = |t: &Tensor, trainable: bool| match track && trainable {
            true => t.clone(),
            false => t.detach(),
        };
        let base_trainable = self.adapter.is_none();
        let get = |name: &str| -> Tensor {
            // Every expected name is present: `ParamStore::from_tensors` checked it.
            view(
                self.params
                    .get(name)
                    .expect("parameter checked at load")
                    .as_tensor(),
                base_trainable,
            )
        };
        // A folded adapter is in the parameters already.
        let lora = |layer: usize| {
            let unfolded = self.adapter.as_ref().filter(|_| self.folded.is_none());
            unfolded.map(|a| LayerLora {
                scale: a.scale(),
                pairs: Target::ALL.map(|t| {
                    a.pair(layer, t)
                        .map(|(x, y)| (view(x.as_tensor(), true), view(y.as_tensor(), true)))
                }),
            })
        };
        let sandwich = self.config.architecture.sandwich_norms();
        let layers = (0..self.config.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                LayerWeights {
                    input_norm: get(&format!("{p}.input_layernorm.weight")),
                    q: get(&format!("{p}.self_attn.q_proj.weight")),
                    k: get(&format!("{p}.self_attn.k_proj.weight")),
                    v: get(&format!("{p}.self_attn.v_proj.weight")),
                    qkv_bias: self.config.attention_bias.then(|| {
                        (
                            get(&format!("{p}.self_attn.q_proj.bias")),
                            get(&format!("{p}.self_attn.k_proj.bias")),
                            get(&format!("{p}.self_attn.v_proj.bias")),
                        )
                    }),
                    qk_norm: self.config.architecture.qk_norm().then(|| {
                        (
                            get(&format!("{p}.self_attn.q_norm.weight")),
                            get(&format!("{p}.self_attn.k_norm.weight")),
                        )
                    }),
                    o: get(&format!("{p}.self_attn.o_proj.weight")),
                    post_norm: match sandwich {
                        true => get(&format!("{p}.pre_feedforward_layernorm.weight")),
                        false => get(&format!("{p}.post_attention_layernorm.weight")),
                    },
                    sandwich: sandwich.then(|| {
                        (
                            get(&format!("{p}.post_attention_layernorm.weight")),
                            get(&format!("{p}.post_feedforward_layernorm.weight")),
                        )
                    }),
                    gate: get(&format!("{p}.mlp.gate_proj.weight")),
                    up: get(&format!("{p}.mlp.up_proj.weight")),
                    down: get(&format!("{p}.mlp.down_proj.weight")),
                    packed: None,
                    lora: lora(i),
                }
            })
            .collect();
        Weights {
            embed: get("model.embed_tokens.weight"),
            layers,
            norm: get("model.norm.weight"),
            lm_head: (!self.config.tie_word_embeddings).then(|| get("lm_head.weight")),
            fused,
            head_packed: None,
        }
    }

    /// Weights whose use records the autograd graph (for training).
    pub fn weights(&self) -> Weights {
        self.collect_weights(true, false)
    }

    /// Detached weights and fused kernels (for sampling and scoring without gradients).
    /// They share storage with the parameters: an in-place weight update is visible to
    /// the next forward that builds its views again.
    pub fn inference_weights(&self) -> Weights {
        self.collect_weights(false, true)
    }

    /// Every id below the vocabulary size; `what` names the sequence in the error.
    pub(crate) fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        if let Some((pos, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(format!(
                "{what}: token id {id} at position {pos} is not below the vocabulary size {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Logits of hidden states (..., d) → (..., V), soft-capped as c · tanh(z / c)
    /// when the config sets `final_logit_softcapping` c.
    pub fn logits(&self, w: &Weights, hidden: &Tensor) -> Result<Tensor> {
        let z = project(hidden, w.head(), None, w.head_packed.as_ref(), w.fused)?;
        match self.config.final_logit_softcapping {
            Some(c) => Ok(z.affine(1.0 / c, 0.0)?.tanh()?.affine(c, 0.0)?),
            None => Ok(z),
        }
    }

    /// cos and sin, (T, head_dim / 2) each, at `positions` (1, T) for the global layers
    /// and, when the model has them, for the local ones (their own RoPE base).
    pub(crate) fn rotations(&self, positions: &Tensor) -> Result<Rotations> {
        let at = |rope: &Rope| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rope.at(positions)?;
            Ok((cos.squeeze(0)?, sin.squeeze(0)?))
        };
        Ok(Rotations {
            global: at(&self.rope)?,
            local: self.rope_local.as_ref().map(at).transpose()?,
        })
    }

    /// The embeddings of `ids` (N,) → (N, d), times √d for Gemma 3.
    pub(crate) fn embed(&self, embed: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let e = embed.index_select(ids, 0)?;
        match self.embed_scale {
            Some(s) => Ok(e.affine(s, 0.0)?),
            None => Ok(e),
        }
    }

    /// RMSNorm with the family's weight offset: x / rms(x) · (c + w) (c = 1 for
    /// Gemma 3, else 0).
    pub(crate) fn norm(&self, x: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
        crate::decoder::offset_rms_norm(
            x,
            w,
            self.config.rms_norm_eps,
            self.config.architecture.norm_offset(),
            fused,
        )
    }

    /// Full logits (B, T, V) of `seqs`, right-padded with zeros to the longest (the
    /// packed forward, every position through the LM head).
    pub fn sequence_logits(&self, w: &Weights, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let batch = self.pack_batch(seqs, &vec![0; seqs.len()], Packing::Packed)?;
        let logits = self.logits(w, &self.forward_packed(w, &batch)?)?;
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let v = self.config.vocab_size;
        let rows = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = logits.narrow(0, batch.row(i, 0), s.len())?;
                Ok(if s.len() < t {
                    {
                        let pad = Tensor::zeros((t - s.len(), v), r.dtype(), r.device())?;
                        Tensor::cat(&[r, pad], 0)?
                    }
                } else {
                    r
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }

    /// Log-probabilities and entropies of the completion tokens of each sequence.
    ///
    /// `seqs[i]` is prompt + completion; its completion starts at `completion_start[i]`
    /// (≥ 1). For every completion token at index t the result holds
    /// log softmax(logits[t − 1] / τ)[seqs[i][t]] and the entropy of that distribution,
    /// concatenated in order: sequence i occupies `offsets[i]..offsets[i + 1]`.
    /// Only the positions that predict completion tokens go through the LM head.
    /// Completions of one prompt share its forward ([`Packing::SharedPrefix`]).
    pub fn completion_logprobs(
        &self,
        w: &Weights,
        seqs: &[Vec<u32>],
        completion_start: &[usize],
        temperature: f64,
    ) -> Result<CompletionLogprobs> {
        self.completion_logprobs_with(
            w,
            seqs,
            completion_start,
            temperature,
            ForwardOptions::default(),
        )
    }

    /// [`Model::completion_logprobs`] in a chosen layout (all give the same values),
    /// optionally checkpointed (then run the backward with
    /// [`CompletionLogprobs::backward`]).
    pub fn completion_logprobs_with(
        &self,
        w: &Weights,
        seqs: &[Vec<u32>],
        completion_start: &[usize],
        temperature: f64,
        options: impl Into<ForwardOptions>,
    ) -> Result<CompletionLogprobs> {
        if seqs.len() != completion_start.len() {
            return Err(Error::invalid(
                "one completion start is needed per sequence",
            ));
        }
        let mut targets = Vec::with_capacity(seqs.len());
        for (i, (s, &start)) in seqs.iter().zip(completion_start).enumerate() {
            if start == 0 || start > s.len() {
                return Err(Error::invalid(format!(
                    "sequence {i}: completion start {start} must be in 1..={} (a prompt token must precede it)",
                    s.len()
                )));
            }
            targets.push((start..s.len()).collect());
        }
        self.target_logprobs_with(w, seqs, &targets, temperature, options)
    }

    /// The final hidden state (after the last norm) at each sequence's last token,
    /// (B, d): what a scalar head (a reward model) reads.
    pub fn last_hidden(&self, w: &Weights, seqs: &[Vec<u32>]) -> Result<Tensor> {
        if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
            return Err(Error::invalid(format!("sequence {i} is empty")));
        }
        let batch = self.pack_batch(seqs, &vec![0; seqs.len()], Packing::Packed)?;
        let rows: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| batch.row(i, s.len() - 1) as u32)
            .collect();
        let hidden = self.forward_packed(w, &batch)?;
        let rows = Tensor::from_vec(rows, seqs.len(), &self.device)?;
        Ok(hidden.index_select(&rows, 0)?)
    }

    /// Log-probabilities and entropies of chosen tokens: `targets[i]` lists, in
    /// increasing order, the indices t ≥ 1 of `seqs[i]` whose token is scored as
    /// log softmax(logits[t − 1] / τ)[seqs[i][t]] (the positions a loss trains: a
    /// completion, or every assistant turn of a conversation). Layout as in
    /// [`Model::completion_logprobs`]; the tokens before a sequence's first target are
    /// shared with sequences that begin the same way.
    pub fn target_logprobs(
        &self,
        w: &Weights,
        seqs: &[Vec<u32>],
        targets: &[Vec<usize>],
        temperature: f64,
    ) -> Result<CompletionLogprobs> {
        self.target_logprobs_with(w, seqs, targets, temperature, ForwardOptions::default())
    }

    /// [`Model::target_logprobs`] with [`Model::completion_logprobs_with`]'s options.
    pub fn target_logprobs_with(
        &self,
        w: &Weights,
        seqs: &[Vec<u32>],
        targets: &[Vec<usize>],
        temperature: f64,
        options: impl Into<ForwardOptions>,
    ) -> Result<CompletionLogprobs> {
        let options = options.into();
        if seqs.len() != targets.len() {
            return Err(Error::invalid("one target list is needed per sequence"));
        }
        for (i, (s, tg)) in seqs.iter().zip(targets).enumerate() {
            let mut last = 0;
            for &j in tg {
                if j <= last || j >= s.len() {
                    return Err(Error::invalid(format!(
                        "sequence {i}: target index {j} must be in 1..{} and increasing",
                        s.len()
                    )));
                }
                last = j;
            }
        }
        // A sequence's tokens before its first target are the same for every sequence
        // that begins with them: that prefix can be shared.
        let shareable: Vec<usize> = targets
            .iter()
            .map(|tg| tg.first().copied().unwrap_or(0))
            .collect();
        let batch = self.pack_batch(seqs, &shareable, options.packing)?;
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        let mut offsets = vec![0];
        for (i, (s, tg)) in seqs.iter().zip(targets).enumerate() {
            for &j in tg {
                rows.push(batch.row(i, j - 1) as u32);
                tokens.push(s[j]);
            }
            offsets.push(tokens.len());
        }
        let (hidden, recompute) = self.forward_packed_with(w, &batch, options.checkpoint_layers)?;
        let n = rows.len();
        let rows = Tensor::from_vec(rows, n, &self.device)?;
        let picked = hidden.index_select(&rows, 0)?;
        let logits = self.logits(w, &picked)?;
        let targets = Tensor::from_vec(tokens, n, &self.device)?;
        let (logprobs, entropy) = logprob::token_logprobs(&logits, &targets, temperature)?;
        Ok(CompletionLogprobs {
            logprobs,
            entropy,
            hidden: picked,
            offsets,
            packed_tokens: batch.len(),
            recompute: recompute.map(std::sync::Arc::new),
        })
    }
}

/// Result of [`Model::completion_logprobs`].
#[derive(Debug, Clone)]
pub struct CompletionLogprobs {
    /// (N,) log π(token) for every completion token of every sequence.
    pub logprobs: Tensor,
    /// (N,) entropy of the distribution that predicted it.
    pub entropy: Tensor,
    /// (N, d) final hidden state at the position that predicts each token: the state
    /// before the token is emitted, which a value head reads.
    pub hidden: Tensor,
    /// Sequence i's tokens are `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
    /// Tokens the forward computed (the packed row: prompts once per micro-batch
    /// when shared, padding when padded).
    pub packed_tokens: usize,
    /// The layers to replay in the backward of a checkpointed forward.
    pub recompute: Option<std::sync::Arc<Recompute>>,
}

impl CompletionLogprobs {
    /// Gradients of `loss` (a function of these logprobs, entropies or hidden states)
    /// with respect to every parameter, checkpointed forward or not.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        if let Some(r) = &self.recompute {
            r.finish(&mut grads)?;
        }
        Ok(grads)
    }

    /// Per-sequence values of a (N,) tensor, as host vectors.
    pub fn split(&self, t: &Tensor) -> Result<Vec<Vec<f32>>> {
        let all = t.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(self
            .offsets
            .windows(2)
            .map(|w| all[w[0]..w[1]].to_vec())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bf16 model (the CUDA default, here on CPU) of every family scores like its
    /// f32 original to bf16 accuracy on both paths (the composed ops bf16 takes: the
    /// q/k norms, Gemma 3's offset norms and GeGLU, the windowed mask), and every
    /// parameter gets a gradient.
    #[test]
    fn bf16_scores_close_to_f32_and_trains() {
        for name in crate::preset::TINY_PRESETS {
            bf16_close_to_f32(name);
        }
    }

    fn bf16_close_to_f32(preset: &str) {
        let d = &Device::Cpu;
        let m32 = crate::preset::init(preset, 3, d).unwrap().model;
        let m16 = Model::from_tensors(
            m32.config().clone(),
            m32.params()
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
                .collect(),
            DType::BF16,
            d,
        )
        .unwrap();
        let seqs: Vec<Vec<u32>> = vec![(1..200).collect(), (50..90).collect()];
        let starts = [100, 20];
        let lp = |m: &Model, w: &Weights| {
            let out = m.completion_logprobs(w, &seqs, &starts, 1.0).unwrap();
            out.split(&out.logprobs).unwrap().concat()
        };
        let reference = lp(&m32, &m32.weights());
        for w in [m16.weights(), m16.inference_weights()] {
            let got = lp(&m16, &w);
            let max = reference
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                max < 0.1,
                "{preset} fused {}: max |Δ logprob| {max}",
                w.fused
            );
        }
        let out = m16
            .completion_logprobs(&m16.weights(), &seqs, &starts, 1.0)
            .unwrap();
        let grads = out.logprobs.mean_all().unwrap().backward().unwrap();
        for (name, v) in m16.params().iter() {
            let g = grads
                .get(v)
                .unwrap_or_else(|| panic!("{preset} {name}: no gradient"));
            assert_eq!(g.dtype(), DType::BF16, "{name}");
            let norm = g
                .to_dtype(DType::F32)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{preset} {name}: zero gradient");
        }
    }
}
