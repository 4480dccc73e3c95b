//! The sampling engine: continuous batching over a paged KV cache.
//!
//! Requests (a prompt and how many samples of it) wait in a queue; every
//! [`Engine::step`] runs one forward over the tokens of many sequences at once: one
//! token of each decoding sequence plus up to `prefill_chunk` prompt tokens of the
//! sequences being prefilled, laid out as one row of tokens (no padding). A finished
//! sequence frees its slot and its pages at once, and the next waiting request takes
//! them in the same step, so the batch stays full while completions of very different
//! lengths run.
//!
//! - **A prompt is prefilled once per request.** Its samples fork from the prompt's
//!   last logits: each sample draws its first token from them with its own random
//!   stream, then shares the prompt's full pages (reference-counted) and gets a copy
//!   of the partly filled last one.
//! - **Paged KV cache** ([`pages`]): memory is `kv_cache_tokens`, split into pages of
//!   `kv_page_size` tokens. A request is admitted when its prompt's pages (and one per
//!   sample) are free; a decoding sequence that needs a page when none is free
//!   preempts the most recently admitted sequence, which frees its pages and later
//!   recomputes its tokens (its sampled tokens and random stream are kept, so the
//!   result does not change).
//! - **Batch-independent results.** Every row's arithmetic is its own (the paged
//!   attention reads only its sequence's keys), and sample j of a request draws from
//!   random stream `first_stream + j` of the request's seed, so a completion does not
//!   depend on what else was in the batch (tested: greedy and T > 0).
//! - **Weights may change between steps.** Each step takes
//!   [`Model::inference_weights`] anew, and every sampled token records the caller's
//!   `tag` (the generator passes its weights' version).

pub mod attention;
mod config;
pub mod pages;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

pub use attention::{paged_attention, PagedLayout};
pub use config::EngineConfig;
pub use pages::{KvPages, PagePool};

use crate::decoder::decoder_block;
use crate::error::{Error, Result};
use crate::generate::{Completion, FinishReason};
use crate::ops::attention::Heads;
use crate::ops::rms_norm::rms_norm;
use crate::packed_matmul::PackedWeights;
use crate::sampling::{self, SamplingParams};
use crate::transformer::{Model, Weights};

/// A prompt to sample `samples` completions of.
#[derive(Clone, Debug)]
pub struct Request {
    /// The caller's id, returned with the completions (unique among live requests).
    pub id: u64,
    pub prompt: Vec<u32>,
    pub samples: usize,
    pub params: SamplingParams,
    /// Sample j draws from random stream `first_stream + j` of `params.seed`.
    pub first_stream: u64,
}

/// A request whose samples have all finished, in sample order.
#[derive(Clone, Debug)]
pub struct Finished {
    pub id: u64,
    pub completions: Vec<Completion>,
    /// Per completion: the `tag` of the step that sampled each token.
    pub tags: Vec<Vec<u64>>,
}

/// What one step did.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub finished: Vec<Finished>,
    /// Sequences that decoded one token this step.
    pub decoded: usize,
    /// Prompt (or recomputed) tokens fed this step.
    pub prefilled: usize,
    /// Slots in use while the step ran (samples of unforked prompts counted).
    pub running: usize,
}

/// Counters over the engine's life.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub steps: u64,
    pub decoded_tokens: u64,
    pub prefilled_tokens: u64,
    pub preemptions: u64,
    pub peak_pages: usize,
    pub peak_running: usize,
}

/// One sequence: a sample, or a prompt not yet forked into its samples.
#[derive(Debug)]
struct Seq {
    request: u64,
    /// The sample indices it stands for (several only before the fork).
    samples: Vec<usize>,
    /// One random stream per sample.
    rngs: Vec<ChaCha8Rng>,
    /// Prompt, then sampled tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    pages: Vec<u32>,
    logprobs: Vec<f32>,
    tags: Vec<u64>,
}

impl Seq {
    fn unfed(&self) -> usize {
        self.tokens.len() - self.computed
    }
}

struct RequestState {
    params: SamplingParams,
    out: Vec<Option<(Completion, Vec<u64>)>>,
    left: usize,
}

/// Continuous batching over a paged KV cache (see the module doc).
pub struct Engine {
    cfg: EngineConfig,
    pool: PagePool,
    kv: KvPages,
    heads: Heads,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    requests: HashMap<u64, RequestState>,
    stats: EngineStats,
    /// The projections packed for the batch kernel (CPU f32, more than 16 slots).
    packed: Option<PackedWeights>,
}

impl Engine {
    /// An engine for `model` with its KV pool allocated (lazily touched on CPU).
    pub fn new(model: &Model, cfg: EngineConfig) -> Result<Self> {
        cfg.validate()?;
        let pages = cfg.kv_cache_tokens.div_ceil(cfg.kv_page_size);
        let cfg_rows = cfg.max_running;
        let mc = model.config();
        Ok(Engine {
            kv: KvPages::new(mc, pages * cfg.kv_page_size, model.dtype(), model.device())?,
            pool: PagePool::new(pages, cfg.kv_page_size),
            heads: Heads {
                query: mc.num_attention_heads,
                kv: mc.num_key_value_heads,
                dim: mc.head_dim,
            },
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            requests: HashMap::new(),
            stats: EngineStats::default(),
            // Small batches stay on the bandwidth-bound kernel: no packed copy.
            packed: (cfg_rows > crate::decode_matmul::MAX_ROWS).then(PackedWeights::default),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }
    /// Requests not finished yet.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }
    /// Requests none of whose sequences has started.
    pub fn queued_requests(&self) -> usize {
        let started: std::collections::HashSet<u64> =
            self.running.iter().map(|s| s.request).collect();
        let mut queued: Vec<u64> = self
            .waiting
            .iter()
            .map(|s| s.request)
            .filter(|r| !started.contains(r))
            .collect();
        queued.dedup();
        queued.len()
    }
    /// Whether no request is pending.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }
    /// Pages in use now.
    pub fn used_pages(&self) -> usize {
        self.pool.used_pages()
    }

    /// Checks and queues a request; nothing runs until [`Engine::step`].
    pub fn add(&mut self, model: &Model, r: Request) -> Result<()> {
        r.params.validate()?;
        let cfg = model.config();
        if r.prompt.is_empty() {
            return Err(Error::invalid(format!(
                "request {}: the prompt is empty: at least one token is needed",
                r.id
            )));
        }
        if r.samples == 0 {
            return Err(Error::invalid(format!(
                "request {}: samples must be ≥ 1",
                r.id
            )));
        }
        if self.requests.contains_key(&r.id) {
            return Err(Error::invalid(format!(
                "request {} is already pending",
                r.id
            )));
        }
        model.check_ids(&r.prompt, &format!("request {}", r.id))?;
        let longest = r.prompt.len() + r.params.max_new_tokens;
        if longest > cfg.max_position_embeddings {
            return Err(Error::invalid(format!(
                "request {}: {} prompt tokens + max_new_tokens {} exceed the model's context of {}",
                r.id,
                r.prompt.len(),
                r.params.max_new_tokens,
                cfg.max_position_embeddings
            )));
        }
        // One sequence must be able to finish alone, and a forked prompt to fork.
        let group = if self.cfg.share_prefix {
            r.samples.min(self.cfg.max_running)
        } else {
            1
        };
        let needed = self
            .pool
            .pages_for(longest)
            .max(self.pool.pages_for(r.prompt.len()) + group);
        if needed > self.pool.capacity() {
            return Err(pages::too_small(
                needed * self.cfg.kv_page_size,
                self.pool.capacity(),
                self.cfg.kv_page_size,
            ));
        }
        let indices: Vec<usize> = (0..r.samples).collect();
        for chunk in indices.chunks(group) {
            self.waiting.push_back(Seq {
                request: r.id,
                samples: chunk.to_vec(),
                rngs: chunk
                    .iter()
                    .map(|&j| {
                        let mut rng = ChaCha8Rng::seed_from_u64(r.params.seed);
                        rng.set_stream(r.first_stream + j as u64);
                        rng
                    })
                    .collect(),
                tokens: r.prompt.clone(),
                prompt_len: r.prompt.len(),
                computed: 0,
                pages: Vec::new(),
                logprobs: Vec::new(),
                tags: Vec::new(),
            });
        }
        self.requests.insert(
            r.id,
            RequestState {
                params: r.params,
                out: vec![None; r.samples],
                left: r.samples,
            },
        );
        Ok(())
    }

    fn running_slots(&self) -> usize {
        self.running.iter().map(|s| s.samples.len()).sum()
    }

    /// Moves waiting sequences (oldest first) into the batch while slots and pages
    /// allow: a sequence needs pages for all its tokens plus one per sample. Static
    /// batching admits only into an empty batch.
    fn admit(&mut self) {
        if !self.cfg.continuous && !self.running.is_empty() {
            return;
        }
        while let Some(s) = self.waiting.front() {
            let slots = s.samples.len();
            let pages = self.pool.pages_for(s.tokens.len()) + slots;
            if self.running_slots() + slots > self.cfg.max_running || pages > self.pool.free_pages()
            {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            for _ in 0..self.pool.pages_for(s.tokens.len()) {
                s.pages.push(self.pool.alloc().expect("free pages counted"));
            }
            self.running.push(s);
        }
    }

    /// Returns a running sequence's pages and queues it to recompute its tokens.
    fn preempt(&mut self, mut s: Seq) {
        self.pool.release(&s.pages);
        s.pages.clear();
        s.computed = 0;
        self.stats.preemptions += 1;
        tracing::debug!(
            request = s.request,
            tokens = s.tokens.len(),
            "KV cache full: sequence preempted"
        );
        self.waiting.push_front(s);
    }

    /// Gives every decoding sequence whose next token starts a page a new page,
    /// preempting the most recently admitted sequences while none is free.
    fn grow(&mut self) {
        let ps = self.cfg.kv_page_size;
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.unfed() == 1 && s.computed == s.pages.len() * ps {
                match self.pool.alloc() {
                    Some(p) => {
                        self.running[i].pages.push(p);
                        i += 1;
                    }
                    None => {
                        let victim = self.running.pop().expect("i < len");
                        self.preempt(victim);
                    }
                }
            } else {
                i += 1;
            }
        }
    }

    /// This step's work: (running index, tokens to feed). Every decoding sequence
    /// feeds its one token; prefilling ones share `prefill_chunk` tokens, oldest first.
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut plan: Vec<(usize, usize)> = self
            .running
            .iter()
            .enumerate()
            .filter(|(_, s)| s.unfed() == 1)
            .map(|(i, _)| (i, 1))
            .collect();
        let mut budget = self.cfg.prefill_chunk;
        for (i, s) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.unfed() > 1 {
                let n = s.unfed().min(budget);
                budget -= n;
                plan.push((i, n));
            }
        }
        plan.sort_unstable();
        plan
    }

    /// Admits waiting requests, runs one forward over the planned tokens with the
    /// model's current weights, samples where a sequence's tokens are all computed,
    /// and retires finished sequences. `tag` is recorded with every sampled token.
    pub fn step(&mut self, model: &Model, tag: u64) -> Result<StepOutput> {
        self.admit();
        self.grow();
        // Preemption may have freed room for someone else.
        self.admit();
        let plan = self.plan();
        let mut out = StepOutput {
            running: self.running_slots(),
            ..Default::default()
        };
        if plan.is_empty() {
            return Ok(out);
        }
        // The step's tokens as one row: ids, positions, cache slots, attention layout.
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut write = Vec::new();
        let mut layout = PagedLayout::default();
        let mut sample_rows = Vec::new();
        for (li, &(i, n)) in plan.iter().enumerate() {
            let s = &self.running[i];
            let end = s.computed + n;
            layout
                .slots
                .push((0..end).map(|t| self.pool.slot(&s.pages, t)).collect());
            for t in s.computed..end {
                ids.push(s.tokens[t]);
                positions.push(t as u32);
                write.push(self.pool.slot(&s.pages, t));
                layout.queries.push((li as u32, t as u32 + 1));
            }
            if end == s.tokens.len() {
                sample_rows.push((i, ids.len() - 1));
            }
            if n == 1 {
                out.decoded += 1;
            } else {
                out.prefilled += n;
            }
        }
        let w = match self.packed.as_mut() {
            Some(p) => p.attach(model, model.inference_weights())?,
            None => model.inference_weights(),
        };
        let hidden = self.forward(model, &w, &ids, &positions, &write, Arc::new(layout))?;
        for &(i, n) in &plan {
            self.running[i].computed += n;
        }
        if !sample_rows.is_empty() {
            let rows: Vec<u32> = sample_rows.iter().map(|&(_, r)| r as u32).collect();
            let rows = Tensor::from_vec(rows, sample_rows.len(), model.device())?;
            let logits = model
                .logits(&w, &hidden.index_select(&rows, 0)?)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?;
            self.sample(&sample_rows, &logits, tag, &mut out)?;
        }
        self.stats.steps += 1;
        self.stats.decoded_tokens += out.decoded as u64;
        self.stats.prefilled_tokens += out.prefilled as u64;
        self.stats.peak_pages = self.stats.peak_pages.max(self.pool.used_pages());
        self.stats.peak_running = self.stats.peak_running.max(out.running);
        Ok(out)
    }

    /// Hidden states (N, d) of the step's tokens; their keys and values are written
    /// to the cache at `write` before each layer's attention reads it.
    fn forward(
        &self,
        model: &Model,
        w: &Weights,
        ids: &[u32],
        positions: &[u32],
        write: &[u32],
        layout: Arc<PagedLayout>,
    ) -> Result<Tensor> {
        let mc = model.config();
        let dev = model.device();
        let n = ids.len();
        let width = self.heads.kv * self.heads.dim;
        let ids = Tensor::from_slice(ids, n, dev)?;
        let pos = Tensor::from_slice(positions, (1, n), dev)?;
        let (cos, sin) = model.rope.at(&pos)?;
        let (cos, sin) = (cos.squeeze(0)?, sin.squeeze(0)?);
        let slots: Vec<u32> = write
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, width))
            .collect();
        let slots = Tensor::from_vec(slots, (n, width), dev)?;
        let mut x = w.embed.index_select(&ids, 0)?;
        for (li, lw) in w.layers.iter().enumerate() {
            x = decoder_block(
                lw,
                &x,
                (&cos, &sin),
                self.heads,
                mc.rms_norm_eps,
                true,
                |q, k, v| {
                    self.kv.write(li, &slots, k, v)?;
                    let (kp, vp) = &self.kv.layers[li];
                    paged_attention(q, kp, vp, &layout, self.heads)
                },
            )?;
        }
        rms_norm(&x, &w.norm, mc.rms_norm_eps, true)
    }

    /// Samples the next token of each (running index, hidden row) from `logits`,
    /// forking unforked prompts into their samples, and retires finished samples.
    fn sample(
        &mut self,
        rows: &[(usize, usize)],
        logits: &[Vec<f32>],
        tag: u64,
        out: &mut StepOutput,
    ) -> Result<()> {
        let ps = self.cfg.kv_page_size;
        // Every row's draws at once (each sequence owns its random streams).
        let mut row_of = vec![None; self.running.len()];
        for (&(i, _), row) in rows.iter().zip(logits) {
            row_of[i] = Some(row.as_slice());
        }
        let requests = &self.requests;
        let mut picked: Vec<Vec<(u32, f32)>> = self
            .running
            .par_iter_mut()
            .zip(row_of.par_iter())
            .map(|(s, row)| match row {
                Some(row) => {
                    let params = &requests[&s.request].params;
                    s.rngs
                        .iter_mut()
                        .map(|rng| sampling::sample(row, params, rng))
                        .collect()
                }
                None => Vec::new(),
            })
            .collect();
        let mut done = vec![false; self.running.len()];
        // Forked samples, and whether each got its private copy of the partial page.
        let mut forks = Vec::new();
        let Engine {
            running,
            pool,
            kv,
            requests,
            ..
        } = self;
        for &(i, _) in rows {
            let s = &mut running[i];
            let params = &requests[&s.request].params;
            let picks = std::mem::take(&mut picked[i]);
            if picks.len() > 1 {
                // Samples 1.. share the full pages and copy the partly filled last one,
                // now, while the prompt still holds them (it may finish this step).
                let full = s.tokens.len() / ps;
                let partial = s.tokens.len() % ps;
                for (j, &(tok, lp)) in picks.iter().enumerate().skip(1) {
                    let mut f = Seq {
                        request: s.request,
                        samples: vec![s.samples[j]],
                        rngs: vec![s.rngs[j].clone()],
                        tokens: s.tokens.clone(),
                        prompt_len: s.prompt_len,
                        computed: s.computed,
                        pages: s.pages[..full].to_vec(),
                        logprobs: vec![lp],
                        tags: vec![tag],
                    };
                    f.tokens.push(tok);
                    for &p in &f.pages {
                        pool.share(p);
                    }
                    let mut copied = true;
                    if partial > 0 {
                        match pool.alloc() {
                            Some(p) => {
                                kv.copy_page(s.pages[full], p, partial, ps)?;
                                f.pages.push(p);
                            }
                            None => copied = false,
                        }
                    }
                    forks.push((f, copied));
                }
                s.samples.truncate(1);
                s.rngs.truncate(1);
            }
            let (tok, lp) = picks[0];
            s.tokens.push(tok);
            s.logprobs.push(lp);
            s.tags.push(tag);
            done[i] = finished(s, params).is_some();
        }
        // Retire finished sequences (highest index first keeps indices valid).
        for i in (0..self.running.len()).rev() {
            if done[i] {
                let s = self.running.remove(i);
                self.retire(s, out);
            }
        }
        for (f, copied) in forks {
            if finished(&f, &self.requests[&f.request].params).is_some() {
                self.retire(f, out);
            } else if copied {
                self.running.push(f);
            } else {
                // No page for the copy: recompute this sample later.
                self.preempt(f);
            }
        }
        Ok(())
    }

    /// Frees a finished sequence's pages and stores its completion; a request whose
    /// samples are all done is returned.
    fn retire(&mut self, s: Seq, out: &mut StepOutput) {
        self.pool.release(&s.pages);
        let st = self.requests.get_mut(&s.request).expect("pending request");
        let reason = finished(&s, &st.params);
        st.out[s.samples[0]] = Some((
            Completion {
                tokens: s.tokens[s.prompt_len..].to_vec(),
                logprobs: s.logprobs,
                finish_reason: reason,
            },
            s.tags,
        ));
        st.left -= 1;
        if st.left == 0 {
            let st = self.requests.remove(&s.request).expect("pending request");
            let (completions, tags) = st.out.into_iter().map(|o| o.expect("all done")).unzip();
            out.finished.push(Finished {
                id: s.request,
                completions,
                tags,
            });
        }
    }

    /// Steps until every pending request has finished; returns them in finishing order.
    pub fn run_to_completion(&mut self, model: &Model, tag: u64) -> Result<Vec<Finished>> {
        let mut done = Vec::new();
        while !self.is_idle() {
            done.extend(self.step(model, tag)?.finished);
        }
        Ok(done)
    }
}

/// Why `s` has finished, if it has: its last token is a stop token, or it reached
/// `max_new_tokens`.
fn finished(s: &Seq, params: &SamplingParams) -> Option<FinishReason> {
    let generated = s.tokens.len() - s.prompt_len;
    if generated == 0 {
        return None;
    }
    if params.stop_token_ids.contains(s.tokens.last()?) {
        Some(FinishReason::Stop)
    } else if generated >= params.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    }
}
