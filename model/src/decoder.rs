//! The packed training forward: one decoder block per [`decoder_layer`] over a packed
//! row ([`PackedBatch`]), built from the fused ops of [`crate::ops`], and activation
//! checkpointing ([`Recompute`]: the layers replayed one at a time in the backward).

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::ops::attention::{attention, Heads};
use crate::ops::rms_norm::rms_norm;
use crate::ops::rotary::rotary;
use crate::ops::swiglu::swiglu;
use crate::packing::{PackedBatch, Packing};
use crate::transformer::{project, project_each, LayerWeights, Model, Weights};

/// What every decoder layer of one packed forward shares.
#[derive(Clone, Debug)]
struct LayerContext {
    /// cos and sin at each packed token's position, (T, head_dim / 2).
    cos: Tensor,
    sin: Tensor,
    segments: std::sync::Arc<Vec<crate::ops::attention::Segment>>,
    heads: Heads,
    eps: f64,
    fused: bool,
}

/// One decoder block on a packed row x (T, d) with the training attention over the
/// row's segments.
fn decoder_layer(lw: &LayerWeights, x: &Tensor, ctx: &LayerContext) -> Result<Tensor> {
    let rope = (&ctx.cos, &ctx.sin);
    decoder_block(lw, x, rope, ctx.heads, ctx.eps, ctx.fused, |q, k, v| {
        attention(q, k, v, &ctx.segments, ctx.heads)
    })
}

/// RMSNorm over each head of x (T, heads·head_dim) with weight w (head_dim): the
/// fused op over the last dimension of the (T, heads, head_dim) view.
fn head_norm(x: &Tensor, w: &Tensor, heads: usize, eps: f64, fused: bool) -> Result<Tensor> {
    let (t, width) = x.dims2()?;
    let y = rms_norm(&x.reshape((t, heads, width / heads))?, w, eps, fused)?;
    Ok(y.reshape((t, width))?)
}

/// One decoder block on token rows x (T, d), `rope` = (cos, sin) at each row's
/// position, with `attend(q, k, v)` the attention of the rotated rows:
/// h = x + O·attn(rope(ν_q(Q·n₁(x))), rope(ν_k(K·n₁(x))), V·n₁(x));
/// y = h + D·(silu(G·n₂(h)) ∘ U·n₂(h)), where ν_q, ν_k are Qwen3's RMSNorm over each
/// head (the identity for the other families).
pub(crate) fn decoder_block(
    lw: &LayerWeights,
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: Heads,
    eps: f64,
    fused: bool,
    attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let f = fused;
    let xn = rms_norm(x, &lw.input_norm, eps, f)?;
    let (qb, kb, vb) = match &lw.qkv_bias {
        Some((q, k, v)) => (Some(q), Some(k), Some(v)),
        None => (None, None, None),
    };
    let pk = lw.packed.as_deref();
    let [q, k, v] = project_each(
        &xn,
        [&lw.q, &lw.k, &lw.v],
        [qb, kb, vb],
        pk.map(|p| [&p.q, &p.k, &p.v]),
        f,
    )?;
    let (q, k) = match &lw.qk_norm {
        Some((qn, kn)) => (
            head_norm(&q, qn, heads.query, eps, f)?,
            head_norm(&k, kn, heads.kv, eps, f)?,
        ),
        None => (q, k),
    };
    let q = rotary(&q, cos, sin, heads.query)?;
    let k = rotary(&k, cos, sin, heads.kv)?;
    let a = attend(&q, &k, &v)?;
    let h = (project(&a, &lw.o, None, pk.map(|p| &p.o), f)? + x)?;
    let hn = rms_norm(&h, &lw.post_norm, eps, f)?;
    let [gate, up] = project_each(
        &hn,
        [&lw.gate, &lw.up],
        [None, None],
        pk.map(|p| [&p.gate, &p.up]),
        f,
    )?;
    let mlp = swiglu(&gate, &up)?;
    Ok((project(&mlp, &lw.down, None, pk.map(|p| &p.down), f)? + h)?)
}

/// The decoder layers of a checkpointed forward, replayed during the backward.
#[derive(Debug)]
pub struct Recompute {
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
        for (lw, x) in self.weights.layers.iter().zip(&self.inputs).rev() {
            let xv = candle_core::Var::from_tensor(x)?;
            let y = decoder_layer(lw, xv.as_tensor(), &self.ctx)?;
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
                gate,
                up,
                down,
                packed: _,
            } = lw;
            let mut params = vec![input_norm, q, k, v, o, post_norm, gate, up, down];
            if let Some((qb, kb, vb)) = qkv_bias {
                params.extend([qb, kb, vb]);
            }
            if let Some((qn, kn)) = qk_norm {
                params.extend([qn, kn]);
            }
            for p in params {
                add_grad(grads, p, layer_grads.remove(p))?;
            }
        }
        let e = self.weights.embed.index_select(&self.ids, 0)?;
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
    /// rotary embeddings, attention over the row's segments, the SwiGLU gate.
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
        let (cos, sin) = self.rope.at(&positions)?;
        let ctx = LayerContext {
            cos: cos.squeeze(0)?,
            sin: sin.squeeze(0)?,
            segments: batch.segments.clone(),
            heads: Heads {
                query: cfg.num_attention_heads,
                kv: cfg.num_key_value_heads,
                dim: cfg.head_dim,
            },
            eps: cfg.rms_norm_eps,
            fused: w.fused,
        };
        if !checkpoint {
            let mut x = w.embed.index_select(&ids, 0)?;
            for lw in &w.layers {
                x = decoder_layer(lw, &x, &ctx)?;
            }
            return Ok((rms_norm(&x, &w.norm, ctx.eps, w.fused)?, None));
        }
        // The same ops on detached views of the same weights: identical numbers, no graph.
        let detached = self.collect_weights(|t| t.detach(), w.fused);
        let mut x = detached.embed.index_select(&ids, 0)?;
        let mut inputs = Vec::with_capacity(detached.layers.len());
        for lw in &detached.layers {
            inputs.push(x.clone());
            x = decoder_layer(lw, &x, &ctx)?;
        }
        let top = candle_core::Var::from_tensor(&x)?;
        let hidden = rms_norm(top.as_tensor(), &w.norm, ctx.eps, w.fused)?;
        Ok((
            hidden,
            Some(Recompute {
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
