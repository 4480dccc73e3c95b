//! The packed training forward: one decoder block per [`decoder_layer`] over a packed
//! row ([`PackedBatch`]), built from the fused ops of [`crate::ops`], and activation
//! checkpointing ([`Recompute`]: the layers replayed one at a time in the backward).

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::config::{Activation, ModelConfig};
use crate::error::{Error, Result};
use crate::lora::layer::project_adapted;
use crate::lora::Target;
use crate::ops::attention::{attention, Heads};
use crate::ops::gated::gated;
use crate::ops::rms_norm::rms_norm;
use crate::ops::rotary::rotary;
use crate::packing::{PackedBatch, Packing};
use crate::transformer::{LayerWeights, Model, Rotations, Weights};

/// What every decoder layer of one packed forward shares.
#[derive(Clone, Debug)]
struct LayerContext {
    /// cos and sin at each packed token's position, per kind of layer.
    rotations: Rotations,
    segments: std::sync::Arc<Vec<crate::ops::attention::Segment>>,
    block: Block,
}

/// One decoder block on a packed row x (T, d) with the training attention over the
/// row's segments (within its window when layer `li` is local).
fn decoder_layer(li: usize, lw: &LayerWeights, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
    let window = ctx.block.windows.get(li).copied().flatten();
    let (cos, sin) = ctx.rotations.of(window);
    let heads = ctx.block.heads;
    decoder_block(lw, x, (cos, sin), &ctx.block, |q, k, v| {
        attention(q, k, v, &ctx.segments, heads, window)
    })
}

/// The shape of a model's decoder blocks: what [`decoder_block`] needs besides the
/// weights.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub heads: Heads,
    pub eps: f64,
    pub fused: bool,
    /// c in the RMSNorm's (c + w): 1 for Gemma 3.
    pub norm_offset: f64,
    pub activation: Activation,
    /// √head_dim / √query_pre_attn_scalar: with the attention's 1/√head_dim, scores
    /// are scaled by query_pre_attn_scalar^(−1/2); 1 for the other families.
    pub q_scale: f64,
    /// Each layer's attention window; `None`: global.
    pub windows: Vec<Option<usize>>,
}

impl Block {
    pub(crate) fn of(cfg: &ModelConfig, fused: bool) -> Self {
        Block {
            heads: Heads {
                query: cfg.num_attention_heads,
                kv: cfg.num_key_value_heads,
                dim: cfg.head_dim,
            },
            eps: cfg.rms_norm_eps,
            fused,
            norm_offset: cfg.architecture.norm_offset(),
            activation: cfg.architecture.activation(),
            q_scale: cfg
                .query_pre_attn_scalar
                .map_or(1.0, |s| (cfg.head_dim as f64 / s).sqrt()),
            windows: (0..cfg.num_hidden_layers)
                .map(|l| cfg.window_of(l))
                .collect(),
        }
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        offset_rms_norm(x, w, self.eps, self.norm_offset, self.fused)
    }
}

/// RMSNorm of x's last dimension with weight (c + w): y = x / √(mean(x²) + ε) · (c + w).
pub(crate) fn offset_rms_norm(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    offset: f64,
    fused: bool,
) -> Result<Tensor> {
    if offset == 0.0 {
        return rms_norm(x, w, eps, fused);
    }
    rms_norm(x, &w.affine(1.0, offset)?, eps, fused)
}

/// RMSNorm over each head of x (T, heads·head_dim) with weight w (head_dim): the
/// fused op over the last dimension of the (T, heads, head_dim) view.
fn head_norm(x: &Tensor, w: &Tensor, heads: usize, b: &Block) -> Result<Tensor> {
    let (t, width) = x.dims2()?;
    let y = b.norm(&x.reshape((t, heads, width / heads))?, w)?;
    Ok(y.reshape((t, width))?)
}

/// One decoder block on token rows x (T, d), `rope` = (cos, sin) at each row's
/// position, with `attend(q, k, v)` the attention of the rotated rows:
/// h = x + ρ₁(O·attn(s · rope(ν_q(Q·n₁(x))), rope(ν_k(K·n₁(x))), V·n₁(x)));
/// y = h + ρ₂(D·(act(G·n₂(h)) ∘ U·n₂(h))), where ν_q, ν_k are the RMSNorm over each
/// head (Qwen3, Gemma 3), ρ₁, ρ₂ Gemma 3's norms of each branch's output, s its
/// query scale (the identity and 1 for the families without them) and act silu or
/// Gemma 3's tanh GELU.
pub(crate) fn decoder_block(
    lw: &LayerWeights,
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    b: &Block,
    attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (f, heads) = (b.fused, b.heads);
    let xn = b.norm(x, &lw.input_norm)?;
    let (qb, kb, vb) = match &lw.qkv_bias {
        Some((q, k, v)) => (Some(q), Some(k), Some(v)),
        None => (None, None, None),
    };
    let pk = lw.packed.as_deref();
    let ad = lw.lora.as_ref();
    let [q, k, v] = project_adapted(
        &xn,
        [&lw.q, &lw.k, &lw.v],
        [qb, kb, vb],
        pk.map(|p| [&p.q, &p.k, &p.v]),
        f,
        ad,
        [Target::Q, Target::K, Target::V],
    )?;
    let (q, k) = match &lw.qk_norm {
        Some((qn, kn)) => (
            head_norm(&q, qn, heads.query, b)?,
            head_norm(&k, kn, heads.kv, b)?,
        ),
        None => (q, k),
    };
    let q = rotary(&q, cos, sin, heads.query)?;
    let q = if b.q_scale == 1.0 {
        q
    } else {
        q.affine(b.q_scale, 0.0)?
    };
    let k = rotary(&k, cos, sin, heads.kv)?;
    let attended = attend(&q, &k, &v)?;
    let [a] = project_adapted(
        &attended,
        [&lw.o],
        [None],
        pk.map(|p| [&p.o]),
        f,
        ad,
        [Target::O],
    )?;
    let a = match &lw.sandwich {
        Some((after_attention, _)) => b.norm(&a, after_attention)?,
        None => a,
    };
    let h = (a + x)?;
    let hn = b.norm(&h, &lw.post_norm)?;
    let [gate, up] = project_adapted(
        &hn,
        [&lw.gate, &lw.up],
        [None, None],
        pk.map(|p| [&p.gate, &p.up]),
        f,
        ad,
        [Target::Gate, Target::Up],
    )?;
    let mlp = gated(&gate, &up, b.activation)?;
    let [m] = project_adapted(
        &mlp,
        [&lw.down],
        [None],
        pk.map(|p| [&p.down]),
        f,
        ad,
        [Target::Down],
    )?;
    let m = match &lw.sandwich {
        Some((_, after_mlp)) => b.norm(&m, after_mlp)?,
        None => m,
    };
    Ok((m + h)?)
}

/// The decoder layers of a checkpointed forward, replayed during the backward.
#[derive(Debug)]
pub struct Recompute {
    /// The model (its embedding scale).
    model: Model,
    /// The tracked weights (gradients go to the model's parameters).
    weights: Weights,
    ids: Tensor,
    ctx: LayerContext,
    /// Each layer's input, without graph.
    inputs: Vec<Tensor>,
    /// The last layer's output as a leaf: the graph above it was recorded.
    top: candle_core::Var,
}

impl Recompute {
    /// Completes a backward whose recorded part has run: from ∂L/∂top in `grads`,
    /// each layer (last first) is run again with a graph, and
    /// backward(Σ layer(x) ∘ ∂L/∂y) gives ∂L/∂x and the layer's weight gradients, which
    /// are added into `grads`; the embedding lookup last.
    pub fn finish(&self, grads: &mut GradStore) -> Result<()> {
        let mut g = match grads.remove(self.top.as_tensor()) {
            Some(g) => g,
            // The loss does not depend on the layers: nothing to add.
            None => return Ok(()),
        };
        for (li, (lw, x)) in self
            .weights
            .layers
            .iter()
            .zip(&self.inputs)
            .enumerate()
            .rev()
        {
            let xv = candle_core::Var::from_tensor(x)?;
            let y = decoder_layer(li, lw, xv.as_tensor(), &self.ctx)?;
            let mut layer_grads = (y * &g)?.sum_all()?.backward()?;
            g = layer_grads
                .remove(xv.as_tensor())
                .ok_or_else(|| Error::invalid("checkpointed layer: no input gradient"))?;
            let LayerWeights {
                input_norm,
                q,
                k,
                v,
                qkv_bias,
                qk_norm,
                o,
                post_norm,
                sandwich,
                gate,
                up,
                down,
                packed: _,
                lora,
            } = lw;
            let mut params = vec![input_norm, q, k, v, o, post_norm, gate, up, down];
            if let Some((qb, kb, vb)) = qkv_bias {
                params.extend([qb, kb, vb]);
            }
            if let Some((qn, kn)) = qk_norm {
                params.extend([qn, kn]);
            }
            if let Some((a, m)) = sandwich {
                params.extend([a, m]);
            }
            if let Some(l) = lora {
                params.extend(l.pairs.iter().flatten().flat_map(|(a, b)| [a, b]));
            }
            for p in params {
                add_grad(grads, p, layer_grads.remove(p))?;
            }
        }
        let e = self.model.embed(&self.weights.embed, &self.ids)?;
        let mut eg = (e * g)?.sum_all()?.backward()?;
        add_grad(grads, &self.weights.embed, eg.remove(&self.weights.embed))
    }
}

/// grads[p] += g.
fn add_grad(grads: &mut GradStore, p: &Tensor, g: Option<Tensor>) -> Result<()> {
    let Some(g) = g else { return Ok(()) };
    let total = match grads.remove(p) {
        Some(prev) => (prev + g)?,
        None => g,
    };
    grads.insert(p, total);
    Ok(())
}

impl Model {
    /// Hidden states after the final norm, (T, d), of a packed row (training and
    /// scoring). Every op is differentiable and fused (one autograd node each): RMSNorm,
    /// rotary embeddings, attention over the row's segments, the gated MLP's activation.
    pub fn forward_packed(&self, w: &Weights, batch: &PackedBatch) -> Result<Tensor> {
        Ok(self.forward_packed_with(w, batch, false)?.0)
    }

    /// [`Model::forward_packed`], optionally with activation checkpointing: the
    /// decoder layers run without recording a graph, keeping only each layer's input;
    /// the returned [`Recompute`] replays them one at a time during the backward.
    pub fn forward_packed_with(
        &self,
        w: &Weights,
        batch: &PackedBatch,
        checkpoint: bool,
    ) -> Result<(Tensor, Option<Recompute>)> {
        let cfg = self.config();
        let t = batch.len();
        if t == 0 {
            return Err(Error::invalid(
                "empty batch: at least one non-empty sequence is needed",
            ));
        }
        let ids = Tensor::from_vec(batch.ids.clone(), t, self.device())?;
        let positions = Tensor::from_vec(batch.positions.clone(), (1, t), self.device())?;
        let ctx = LayerContext {
            rotations: self.rotations(&positions)?,
            segments: batch.segments.clone(),
            block: Block::of(cfg, w.fused),
        };
        if !checkpoint {
            let mut x = self.embed(&w.embed, &ids)?;
            for (li, lw) in w.layers.iter().enumerate() {
                x = decoder_layer(li, lw, &x, &ctx)?;
            }
            return Ok((self.norm(&x, &w.norm, w.fused)?, None));
        }
        // The same ops on detached views of the same weights: identical numbers, no graph.
        let detached = self.collect_weights(false, w.fused);
        let mut x = self.embed(&detached.embed, &ids)?;
        let mut inputs = Vec::with_capacity(detached.layers.len());
        for (li, lw) in detached.layers.iter().enumerate() {
            inputs.push(x.clone());
            x = decoder_layer(li, lw, &x, &ctx)?;
        }
        let top = candle_core::Var::from_tensor(&x)?;
        let hidden = self.norm(top.as_tensor(), &w.norm, w.fused)?;
        Ok((
            hidden,
            Some(Recompute {
                model: self.clone(),
                weights: w.clone(),
                ids,
                ctx,
                inputs,
                top,
            }),
        ))
    }

    /// Lays `seqs` out for [`Model::forward_packed`], checking ids and lengths.
    pub fn pack_batch(
        &self,
        seqs: &[Vec<u32>],
        shareable: &[usize],
        packing: Packing,
    ) -> Result<PackedBatch> {
        for (i, s) in seqs.iter().enumerate() {
            self.check_ids(s, &format!("sequence {i}"))?;
            if s.len() > self.config().max_position_embeddings {
                return Err(Error::invalid(format!(
                    "sequence {i} has {} tokens, more than the model's context of {} (`max_position_embeddings`)",
                    s.len(),
                    self.config().max_position_embeddings
                )));
            }
        }
        if seqs.is_empty() {
            return Err(Error::invalid(
                "empty batch: at least one non-empty sequence is needed",
            ));
        }
        let pad = self
            .config()
            .pad_token_id
            .unwrap_or(0)
            .min(self.config().vocab_size as u32 - 1);
        PackedBatch::build(seqs, shareable, packing, pad)
    }
}
