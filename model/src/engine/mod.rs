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
//! Three parts, as vLLM and mistral.rs keep them: the scheduler (`scheduler.rs`)
//! decides which sequences run each step over slot and page accounting alone (no model,
//! no tensors), the paged KV cache ([`pages`]) holds their keys and values, and the
//! runner (`runner.rs`) executes one step for what the scheduler chose (one forward with
//! the paged [`attention`]); this module checks requests, samples from the step's
//! logits and collects the completions.
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
//! - **Prefix cache** (`prefix.rs`): the full pages sequences computed stay indexed by
//!   their tokens (a hash chain) and the weights they were computed under, up to
//!   `prefix_cache_tokens` of them held by no sequence; a request starts from its
//!   longest cached prefix in whole pages (never its last token), so a conversation's
//!   next turn prefills only its new tokens. New weights (a full or adapter version)
//!   empty it; its idle pages are given back before a running sequence is preempted.
//!   Models with local layers cache nothing.
//! - **First come, first served.** Requests start in the order they were added: the
//!   queue is admitted from its front and stops at the first sequence that does not
//!   fit, and a preempted sequence goes back to the front (the scheduler's tests).
//! - **Batch-independent results.** Every row's arithmetic is its own (the paged
//!   attention reads only its sequence's keys), and sample j of a request draws from
//!   random stream `first_stream + j` of the request's seed, so a completion does not
//!   depend on what else was in the batch (tested: greedy and T > 0).
//! - **Weights may change between steps.** Each step takes
//!   [`Model::inference_weights`] anew, and every sampled token records the caller's
//!   `tag` (the generator passes its weights' version).

pub mod attention;
mod config;
pub mod local;
pub mod pages;
mod prefix;
mod runner;
mod scheduler;

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

pub use attention::{paged_attention, PagedLayout};
pub use config::EngineConfig;
pub use pages::{KvPages, PagePool};

use crate::error::{Error, Result};
use crate::generate::{Completion, FinishReason};
use crate::sampling::{self, SamplingParams};
use crate::transformer::Model;
use runner::{Runner, StepRows};
use scheduler::{Scheduler, Seq};

/// Top logprobs a request may ask to be recorded per token at most (vLLM's default
/// `max_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

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
    /// Per completion, per token: the most likely tokens and their logprobs under the
    /// distribution it was drawn from ([`sampling::top_logprobs`]); empty unless the
    /// request was added with [`Engine::add_with_top_logprobs`].
    pub top_logprobs: Vec<Vec<Vec<(u32, f32)>>>,
}

/// What one step did.
#[derive(Clone, Debug, Default)]
pub struct StepOutput {
    pub finished: Vec<Finished>,
    /// Sequences that fed a token they sampled this step.
    pub decoded: usize,
    /// Context tokens fed this step: prompts (or a preempted sequence's tokens,
    /// recomputed), their last token included.
    pub prefilled: usize,
    /// Slots in use while the step ran (samples of unforked prompts counted).
    pub running: usize,
}

/// Counters over the engine's life.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub steps: u64,
    pub decoded_tokens: u64,
    /// Prompts queued: each request's, once per group of its samples that share the
    /// prefill (an episode's later turn is a request of its own).
    pub prompts: u64,
    /// Context tokens computed: each admitted sequence's tokens up to its first new
    /// sample (a request's prompt, once for its samples when they share it; a
    /// preempted sequence's tokens again), less those the prefix cache served.
    pub prefilled_tokens: u64,
    /// Context tokens admitted sequences took from the prefix cache instead.
    pub prefix_cache_hit_tokens: u64,
    /// Idle pages the prefix cache gave back (for room, or to stay within its bound).
    pub prefix_cache_evictions: u64,
    pub preemptions: u64,
    /// Peak pages held by sequences (the prefix cache's idle pages not counted).
    pub peak_pages: usize,
    /// Peak pages of the local layers' pool (0 without local layers).
    pub peak_local_pages: usize,
    pub peak_running: usize,
}

/// A finished sample: its completion, tags and top logprobs.
type SampleOut = (Completion, Vec<u64>, Vec<Vec<(u32, f32)>>);

struct RequestState {
    params: SamplingParams,
    /// Top logprobs recorded per token (0: none).
    top: usize,
    out: Vec<Option<SampleOut>>,
    left: usize,
}

/// Continuous batching over a paged KV cache (see the module doc): the scheduler picks
/// each step's work, the runner computes it, and the engine samples and collects the
/// completions.
pub struct Engine {
    cfg: EngineConfig,
    sched: Scheduler,
    runner: Runner,
    requests: HashMap<u64, RequestState>,
}

impl Engine {
    /// An engine for `model` with its KV pool allocated (lazily touched on CPU).
    pub fn new(model: &Model, cfg: EngineConfig) -> Result<Self> {
        cfg.validate()?;
        let sched = Scheduler::with_local(&cfg, local::LocalLayers::of(model.config()));
        Ok(Engine {
            runner: Runner::new(model, sched.pool(), sched.local(), cfg.max_running)?,
            sched,
            cfg,
            requests: HashMap::new(),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }
    pub fn stats(&self) -> &EngineStats {
        self.sched.stats()
    }
    /// Requests not finished yet.
    pub fn pending_requests(&self) -> usize {
        self.requests.len()
    }
    /// Requests none of whose sequences has started.
    pub fn queued_requests(&self) -> usize {
        self.sched.queued_requests()
    }
    /// Whether no request is pending.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }
    /// Pages held by sequences now (the prefix cache's idle pages, given back on
    /// demand, not counted).
    pub fn used_pages(&self) -> usize {
        self.sched.pool().held_pages()
    }
    /// Pages the prefix cache keeps that no sequence holds.
    pub fn cached_pages(&self) -> usize {
        self.sched.pool().idle_cached()
    }

    /// Checks and queues a request; nothing runs until [`Engine::step`].
    pub fn add(&mut self, model: &Model, r: Request) -> Result<()> {
        self.add_with_top_logprobs(model, r, 0)
    }

    /// [`Engine::add`], recording with every sampled token its `top` most likely tokens
    /// and their logprobs ([`Finished::top_logprobs`]; at most [`MAX_TOP_LOGPROBS`]).
    pub fn add_with_top_logprobs(&mut self, model: &Model, r: Request, top: usize) -> Result<()> {
        r.params.validate()?;
        if top > MAX_TOP_LOGPROBS {
            return Err(Error::invalid(format!(
                "request {}: {top} top logprobs asked, at most {MAX_TOP_LOGPROBS}",
                r.id
            )));
        }
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
        self.sched.check_fits(r.prompt.len(), longest, group)?;
        let indices: Vec<usize> = (0..r.samples).collect();
        for chunk in indices.chunks(group) {
            let rngs = chunk
                .iter()
                .map(|&j| {
                    let mut rng = ChaCha8Rng::seed_from_u64(r.params.seed);
                    rng.set_stream(r.first_stream + j as u64);
                    rng
                })
                .collect();
            self.sched
                .enqueue(Seq::prompt(r.id, &r.prompt, chunk.to_vec(), rngs));
        }
        self.requests.insert(
            r.id,
            RequestState {
                params: r.params,
                top,
                out: vec![None; r.samples],
                left: r.samples,
            },
        );
        Ok(())
    }

    /// Lets the scheduler pick this step's work (admitting waiting requests, preempting
    /// where pages run out), runs one forward over it with the model's current weights,
    /// samples where a sequence's tokens are all computed, and retires finished
    /// sequences. `tag` is recorded with every sampled token.
    pub fn step(&mut self, model: &Model, tag: u64) -> Result<StepOutput> {
        // Keys and values cached under other weights are never read again.
        self.sched
            .set_weights([model.params().identity(), model.trainable().identity()]);
        let plan = self.sched.schedule();
        let mut out = StepOutput {
            running: self.sched.running_slots(),
            ..Default::default()
        };
        if plan.is_empty() {
            return Ok(out);
        }
        (out.prefilled, out.decoded) = self.sched.fed(&plan);
        let rows = StepRows::new(
            &plan,
            self.sched.running(),
            self.sched.pool(),
            self.sched.local(),
        );
        let logits = self.runner.run(model, &rows)?;
        self.sched.advance(&plan);
        if !rows.sample.is_empty() {
            self.sample(&rows.sample, &logits, tag, &mut out)?;
        }
        self.sched.record(&out);
        Ok(out)
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
        let mut picked = self.draw(rows, logits);
        let mut done = vec![false; self.sched.running().len()];
        let mut forks = Vec::new();
        for &(i, _) in rows {
            let (picks, tops) = std::mem::take(&mut picked[i]);
            if picks.len() > 1 {
                // Samples 1.. share the full pages and copy the partly filled last one,
                // now, while the prompt still holds them (it may finish this step).
                for mut f in self.sched.fork(i, &picks, tag) {
                    if let Some(copy) = f.copy {
                        self.runner.copy_page(copy, false)?;
                    }
                    if let Some(copy) = f.local_copy {
                        self.runner.copy_page(copy, true)?;
                    }
                    if let Some(t) = &tops {
                        f.seq.tops.push(t.clone());
                    }
                    forks.push(f);
                }
            }
            let s = &mut self.sched.running_mut()[i];
            s.push(picks[0], tag);
            if let Some(t) = tops {
                s.tops.push(t);
            }
            done[i] = finished(s, &self.requests[&s.request].params).is_some();
        }
        // Retire finished sequences (highest index first keeps indices valid).
        for i in (0..done.len()).rev() {
            if done[i] {
                let s = self.sched.finish(i);
                self.complete(s, out);
            }
        }
        for f in forks {
            if finished(&f.seq, &self.requests[&f.seq.request].params).is_some() {
                let mut seq = f.seq;
                self.sched.release(&mut seq);
                self.complete(seq, out);
            } else if f.whole {
                self.sched.resume(f.seq);
            } else {
                // No page for the copy: recompute this sample later.
                self.sched.preempt(f.seq);
            }
        }
        Ok(())
    }

    /// Every row's draws at once (each sequence owns its random streams): per running
    /// sequence, one (token, logprob) per sample for those with a row, none otherwise,
    /// and the row's top logprobs when its request asked for them (the same for every
    /// sample: they depend on the row's logits alone).
    #[allow(clippy::type_complexity)]
    fn draw(
        &mut self,
        rows: &[(usize, usize)],
        logits: &[Vec<f32>],
    ) -> Vec<(Vec<(u32, f32)>, Option<Vec<(u32, f32)>>)> {
        let running = self.sched.running_mut();
        let mut row_of = vec![None; running.len()];
        for (&(i, _), row) in rows.iter().zip(logits) {
            row_of[i] = Some(row.as_slice());
        }
        let requests = &self.requests;
        running
            .par_iter_mut()
            .zip(row_of.par_iter())
            .map(|(s, row)| match row {
                Some(row) => {
                    let st = &requests[&s.request];
                    let picks = s
                        .rngs
                        .iter_mut()
                        .map(|rng| sampling::sample(row, &st.params, rng))
                        .collect();
                    let tops =
                        (st.top > 0).then(|| sampling::top_logprobs(row, &st.params, st.top));
                    (picks, tops)
                }
                None => (Vec::new(), None),
            })
            .collect()
    }

    /// Stores a finished sequence's completion (its pages already freed); a request
    /// whose samples are all done is returned.
    fn complete(&mut self, s: Seq, out: &mut StepOutput) {
        let st = self.requests.get_mut(&s.request).expect("pending request");
        let reason = finished(&s, &st.params);
        st.out[s.samples[0]] = Some((
            Completion {
                tokens: s.tokens[s.prompt_len..].to_vec(),
                logprobs: s.logprobs,
                finish_reason: reason,
            },
            s.tags,
            s.tops,
        ));
        st.left -= 1;
        if st.left == 0 {
            let st = self.requests.remove(&s.request).expect("pending request");
            let (mut completions, mut tags, mut top_logprobs) =
                (Vec::new(), Vec::new(), Vec::new());
            for (c, t, tops) in st.out.into_iter().map(|o| o.expect("all done")) {
                completions.push(c);
                tags.push(t);
                top_logprobs.push(tops);
            }
            out.finished.push(Finished {
                id: s.request,
                completions,
                tags,
                top_logprobs,
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
