//! The model runner: executes one engine step for what the scheduler chose. The
//! step's tokens are laid out as one row ([`StepRows`]: ids, positions, the cache slot
//! each token's key and value go to, which cached tokens each query sees), one forward
//! runs over it with the model's current weights, writing keys and values into the
//! paged cache ([`KvPages`]) before each layer's attention reads them, and the logits
//! of the rows that sample come back.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::attention::{paged_attention, PagedLayout};
use super::local::LocalPool;
use super::pages::{KvPages, PageCopy, PagePool};
use super::scheduler::Seq;
use crate::decoder::{decoder_block, Block};
use crate::error::Result;
use crate::ops::attention::Heads;
use crate::packed_matmul::PackedWeights;
use crate::transformer::{Model, Weights};

/// One step's tokens as one row.
#[derive(Debug, Default)]
pub(crate) struct StepRows {
    pub ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// The cache slot each token's key and value are written to.
    pub write: Vec<u32>,
    pub layout: Arc<PagedLayout>,
    /// The same in the local layers' pool (models with local layers): the slot each
    /// token is written to, and the slots of every token a local query may read (a
    /// released token's entry is never read: its query's window starts after it).
    pub local_write: Vec<u32>,
    pub local_layout: Arc<PagedLayout>,
    /// (running index, row) of each sequence whose tokens are all computed after the
    /// step: it samples from that row's logits.
    pub sample: Vec<(usize, usize)>,
}

impl StepRows {
    /// The rows of `plan` ((running index, tokens to feed), by index) over the running
    /// sequences, whose tokens live in `pool`'s pages.
    pub fn new(
        plan: &[(usize, usize)],
        running: &[Seq],
        pool: &PagePool,
        local: Option<&LocalPool>,
    ) -> Self {
        let mut r = StepRows::default();
        let mut layout = PagedLayout::default();
        let mut local_layout = PagedLayout::default();
        for (li, &(i, n)) in plan.iter().enumerate() {
            let s = &running[i];
            let end = s.computed + n;
            layout
                .slots
                .push((0..end).map(|t| pool.slot(&s.pages, t)).collect());
            if let Some(l) = local {
                let slot = |t| l.slot(&s.local, t).unwrap_or(0);
                local_layout.slots.push((0..end).map(slot).collect());
                r.local_write.extend((s.computed..end).map(slot));
            }
            for t in s.computed..end {
                r.ids.push(s.tokens[t]);
                r.positions.push(t as u32);
                r.write.push(pool.slot(&s.pages, t));
                layout.queries.push((li as u32, t as u32 + 1));
            }
            if end == s.tokens.len() {
                r.sample.push((i, r.ids.len() - 1));
            }
        }
        if local.is_some() {
            local_layout.queries = layout.queries.clone();
        }
        r.layout = Arc::new(layout);
        r.local_layout = Arc::new(local_layout);
        r
    }
}

/// The paged KV cache and what the forward of a step needs beside the model.
pub(crate) struct Runner {
    kv: KvPages,
    page_size: usize,
    heads: Heads,
    /// The projections packed for the batch kernel (CPU f32, more than 16 slots).
    packed: Option<PackedWeights>,
}

impl Runner {
    /// A runner for `model` with a KV pool for every page of `pool` (lazily touched on
    /// CPU), for batches of up to `max_running` decoding sequences.
    pub fn new(
        model: &Model,
        pool: &PagePool,
        local: Option<&LocalPool>,
        max_running: usize,
    ) -> Result<Self> {
        let mc = model.config();
        let page_size = pool.page_size();
        let slots = pool.capacity() * page_size;
        let local_slots = local.map_or(0, |l| l.pool.capacity() * page_size);
        Ok(Runner {
            kv: KvPages::new(mc, (slots, local_slots), model.dtype(), model.device())?,
            page_size,
            heads: Heads {
                query: mc.num_attention_heads,
                kv: mc.num_key_value_heads,
                dim: mc.head_dim,
            },
            // Small batches stay on the bandwidth-bound kernel: no packed copy.
            packed: (max_running > crate::decode_matmul::MAX_ROWS).then(PackedWeights::default),
        })
    }

    /// Runs the forward over `rows` with the model's current weights and returns the
    /// f32 logits of each row of `rows.sample`, in order.
    pub fn run(&mut self, model: &Model, rows: &StepRows) -> Result<Vec<Vec<f32>>> {
        let w = match self.packed.as_mut() {
            Some(p) => p.attach(model, model.inference_weights())?,
            None => model.inference_weights(),
        };
        let hidden = self.forward(model, &w, rows)?;
        if rows.sample.is_empty() {
            return Ok(Vec::new());
        }
        let sample: Vec<u32> = rows.sample.iter().map(|&(_, r)| r as u32).collect();
        let sample = Tensor::from_vec(sample, rows.sample.len(), model.device())?;
        Ok(model
            .logits(&w, &hidden.index_select(&sample, 0)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?)
    }

    /// Hidden states (N, d) of the step's tokens; their keys and values are written
    /// to the cache at `rows.write` before each layer's attention reads it.
    fn forward(&self, model: &Model, w: &Weights, rows: &StepRows) -> Result<Tensor> {
        let mc = model.config();
        let dev = model.device();
        let n = rows.ids.len();
        let width = self.heads.kv * self.heads.dim;
        let ids = Tensor::from_slice(&rows.ids, n, dev)?;
        let pos = Tensor::from_slice(&rows.positions, (1, n), dev)?;
        let rotations = model.rotations(&pos)?;
        let block = Block::of(mc, true);
        let slots: Vec<u32> = rows
            .write
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, width))
            .collect();
        let slots = Tensor::from_vec(slots, (n, width), dev)?;
        let local_slots: Vec<u32> = rows
            .local_write
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, width))
            .collect();
        let local_slots = Tensor::from_vec(local_slots, (rows.local_write.len(), width), dev)?;
        let mut x = model.embed(&w.embed, &ids)?;
        for (li, lw) in w.layers.iter().enumerate() {
            let window = block.windows[li];
            let (cos, sin) = rotations.of(window);
            // A local layer's keys live in the local pool (when the model has one).
            let (slots, layout) = match self.kv.is_local(li) {
                true => (&local_slots, &rows.local_layout),
                false => (&slots, &rows.layout),
            };
            x = decoder_block(lw, &x, (cos, sin), &block, |q, k, v| {
                self.kv.write(li, slots, k, v)?;
                let (kp, vp) = &self.kv.layers[li];
                paged_attention(q, kp, vp, layout, self.heads, window)
            })?;
        }
        model.norm(&x, &w.norm, true)
    }

    /// Copies the first `tokens` slots of page `from` into page `to` in every layer of
    /// the global pool, or of the `local` one (a fork's own copy of its prompt's partly
    /// filled last page).
    pub fn copy_page(&self, copy: PageCopy, local: bool) -> Result<()> {
        self.kv.copy_page(copy, self.page_size, local)
    }
}
