//! Sampled completions and [`generate`], the one-call use of the [`Engine`].

use serde::{Deserialize, Serialize};

use crate::engine::{Engine, EngineConfig, Request};
use crate::error::Result;
use crate::sampling::SamplingParams;
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

/// Samples one completion of every prompt: prompt i draws from random stream i of
/// `params.seed` (see [`generate_groups`]).
pub fn generate(
    model: &Model,
    prompts: Vec<Vec<u32>>,
    params: SamplingParams,
) -> Result<Vec<Completion>> {
    Ok(generate_groups(model, prompts, 1, params)?
        .into_iter()
        .flatten()
        .collect())
}

/// Samples `samples` completions of every prompt, each prompt prefilled once: prompt
/// i is request i, its sample j draws from random stream i·samples + j of
/// `params.seed`; all run together by one [`Engine`] until done.
pub fn generate_groups(
    model: &Model,
    prompts: Vec<Vec<u32>>,
    samples: usize,
    params: SamplingParams,
) -> Result<Vec<Vec<Completion>>> {
    // Sized for what may run (`add` refuses anything past the context).
    let longest = (prompts.iter().map(|p| p.len()).max().unwrap_or(0) + params.max_new_tokens)
        .min(model.config().max_position_embeddings);
    let n = prompts.len();
    let mut engine = Engine::new(model, EngineConfig::fitting(n, samples, longest))?;
    for (i, prompt) in prompts.into_iter().enumerate() {
        engine.add(
            model,
            Request {
                id: i as u64,
                prompt,
                samples,
                params: params.clone(),
                first_stream: (i * samples) as u64,
            },
        )?;
    }
    let mut out = vec![Vec::new(); n];
    for f in engine.run_to_completion(model, 0)? {
        out[f.id as usize] = f.completions;
    }
    Ok(out)
}
