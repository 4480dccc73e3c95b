//! Batched generation with a KV cache.
//!
//! Prompts of different lengths are left-padded into one batch; padding keys are
//! masked and each row's RoPE positions start at its first real token, so a row's
//! tokens do not depend on what else is in the batch. Finished rows leave the batch.
//! A [`Session`] advances one token per [`Session::step`] and takes the model anew at
//! every step, so weights may be replaced between decode steps (in-flight updates).

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::sampling::{self, SamplingParams};
use crate::transformer::Model;

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It produced a stop token (kept as its last token).
    Stop,
    /// It reached `max_new_tokens`.
    Length,
}

/// One sampled completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// Logprob of each token under the distribution it was sampled from.
    pub logprobs: Vec<f32>,
    pub finish_reason: Option<FinishReason>,
}

/// An in-progress batched generation.
pub struct Session {
    params: SamplingParams,
    prompts: Vec<Vec<u32>>,
    cache: Option<KvCache>,
    /// Indices (into `out`) of the rows still in the batch, in batch order.
    active: Vec<usize>,
    /// Per active row: which cache slots hold real tokens.
    key_valid: Vec<Vec<bool>>,
    /// Per active row: the RoPE position of its next token.
    next_pos: Vec<u32>,
    rngs: Vec<ChaCha8Rng>,
    out: Vec<Completion>,
}

impl Session {
    /// Checks the request and prepares an empty session; nothing runs yet.
    pub fn new(model: &Model, prompts: Vec<Vec<u32>>, params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let cfg = model.config();
        if prompts.is_empty() {
            return Err(Error::invalid("no prompts to generate from"));
        }
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::invalid(format!(
                    "prompt {i} is empty: at least one token is needed"
                )));
            }
            model.check_ids(p, &format!("prompt {i}"))?;
            if p.len() + params.max_new_tokens > cfg.max_position_embeddings {
                return Err(Error::invalid(format!(
                    "prompt {i}: {} tokens + max_new_tokens {} exceed the model's context of {}",
                    p.len(),
                    params.max_new_tokens,
                    cfg.max_position_embeddings
                )));
            }
        }
        let rngs = (0..prompts.len())
            .map(|i| {
                let mut r = ChaCha8Rng::seed_from_u64(params.seed);
                r.set_stream(i as u64);
                r
            })
            .collect();
        let n = prompts.len();
        Ok(Session {
            params,
            prompts,
            cache: None,
            active: (0..n).collect(),
            key_valid: Vec::new(),
            next_pos: Vec::new(),
            rngs,
            out: vec![
                Completion {
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    finish_reason: None
                };
                n
            ],
        })
    }

    /// True while some row is still generating.
    pub fn is_running(&self) -> bool {
        !self.active.is_empty()
    }

    /// Runs the prompt (first call) or one decode step, samples one token per active
    /// row and retires finished rows. Returns whether any row is still running.
    pub fn step(&mut self, model: &Model) -> Result<bool> {
        if self.active.is_empty() {
            return Ok(false);
        }
        let w = model.inference_weights();
        let device = model.device();
        let b = self.active.len();
        let hidden = match self.cache.as_mut() {
            None => {
                let t = self.prompts.iter().map(|p| p.len()).max().unwrap_or(0);
                let cap = t + self.params.max_new_tokens;
                let mut cache = KvCache::new(model.config(), b, cap, model.dtype(), device)?;
                let mut ids = Vec::with_capacity(b * t);
                let mut pos = Vec::with_capacity(b * t);
                for p in &self.prompts {
                    let pad = t - p.len();
                    ids.extend(std::iter::repeat_n(p[0], pad).chain(p.iter().copied()));
                    pos.extend((0..t).map(|j| j.saturating_sub(pad) as u32));
                    self.key_valid.push((0..t).map(|j| j >= pad).collect());
                    self.next_pos.push(p.len() as u32);
                }
                let ids = Tensor::from_vec(ids, (b, t), device)?;
                let pos = Tensor::from_vec(pos, (b, t), device)?;
                let mask = model.attention_mask(&self.key_valid, 0, t)?;
                let h = model.forward_hidden(&w, &ids, &pos, &mask, Some(&mut cache))?;
                self.cache = Some(cache);
                h.narrow(1, t - 1, 1)?
            }
            Some(cache) => {
                let last: Vec<u32> = self
                    .active
                    .iter()
                    .map(|&i| *self.out[i].tokens.last().unwrap_or(&0))
                    .collect();
                let offset = cache.len();
                for v in self.key_valid.iter_mut() {
                    v.push(true);
                }
                let ids = Tensor::from_vec(last, (b, 1), device)?;
                let pos = Tensor::from_vec(self.next_pos.clone(), (b, 1), device)?;
                let mask = model.attention_mask(&self.key_valid, offset, 1)?;
                for p in self.next_pos.iter_mut() {
                    *p += 1;
                }
                model.forward_hidden(&w, &ids, &pos, &mask, Some(cache))?
            }
        };
        let logits = model
            .logits(&w, &hidden.squeeze(1)?)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut keep = Vec::with_capacity(b);
        for (row, logit_row) in logits.iter().enumerate() {
            let i = self.active[row];
            let (tok, lp) = sampling::sample(logit_row, &self.params, &mut self.rngs[i]);
            let c = &mut self.out[i];
            c.tokens.push(tok);
            c.logprobs.push(lp);
            if self.params.stop_token_ids.contains(&tok) {
                c.finish_reason = Some(FinishReason::Stop);
            } else if c.tokens.len() >= self.params.max_new_tokens {
                c.finish_reason = Some(FinishReason::Length);
            } else {
                keep.push(row);
            }
        }
        if keep.len() < b && !keep.is_empty() {
            let rows = Tensor::from_vec(
                keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                keep.len(),
                device,
            )?;
            if let Some(c) = self.cache.as_mut() {
                c.retain_rows(&rows)?;
            }
            self.active = keep.iter().map(|&r| self.active[r]).collect();
            self.key_valid = keep.iter().map(|&r| self.key_valid[r].clone()).collect();
            self.next_pos = keep.iter().map(|&r| self.next_pos[r]).collect();
        } else if keep.is_empty() {
            self.active.clear();
        }
        Ok(self.is_running())
    }

    /// The completions, in prompt order (unfinished ones have no finish reason).
    /// The completions so far (tokens sampled up to the last `step`).
    pub fn completions(&self) -> &[Completion] {
        &self.out
    }

    pub fn into_completions(self) -> Vec<Completion> {
        self.out
    }
}

/// Generates completions for every prompt in one batch.
pub fn generate(
    model: &Model,
    prompts: Vec<Vec<u32>>,
    params: SamplingParams,
) -> Result<Vec<Completion>> {
    let mut s = Session::new(model, prompts, params)?;
    while s.step(model)? {}
    Ok(s.into_completions())
}
