//! Offline sampling: `n` completions of each prompt from a policy, decoded and scored
//! by `[reward]`'s verifiers and reward model — what rejection sampling and held-out
//! evaluation both run.

use tandem_data::{Prompt, PromptBody};
use tandem_model::{ChatMessage, Pretrained, RewardModel, SamplingParams};

use crate::error::{Context, Result};
use crate::render::{prompt_ids, PromptInput};
use crate::reward::RewardConfig;

/// One scored completion.
#[derive(Clone, Debug)]
pub struct Scored {
    pub tokens: Vec<u32>,
    pub text: String,
    pub reward: f64,
}

impl<'a> From<&'a PromptBody> for PromptInput<'a> {
    fn from(body: &'a PromptBody) -> Self {
        match body {
            PromptBody::Text(t) => PromptInput::Text(t),
            PromptBody::Messages(m) => PromptInput::Messages(
                m.iter()
                    .map(|t| ChatMessage {
                        role: t.role.clone(),
                        content: t.content.clone(),
                    })
                    .collect(),
            ),
        }
    }
}

/// The token ids of every prompt (chat template or raw text); errors name the prompt.
pub fn render_all(
    p: &Pretrained,
    prompts: &[Prompt],
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, pr)| {
            Ok(
                prompt_ids(&p.tokenizer, PromptInput::from(&pr.body), chat, system)
                    .with_context(|| format!("prompt {}", i + 1))?,
            )
        })
        .collect()
}

/// Samples `n` completions of each prompt `ids[i]` (answer `answers[i]`), `batch`
/// prompts at a time (each prefilled once, its samples forked), and scores them:
/// `reward.score` plus `model_weight`·RM when `rm` is given. Prompt i draws from the
/// random streams of seed `params.seed + i`. `progress` is told how many prompts are
/// done after each batch.
#[allow(clippy::too_many_arguments)]
pub fn sample_scored(
    p: &Pretrained,
    rm: Option<&RewardModel>,
    ids: &[Vec<u32>],
    answers: &[Option<String>],
    n: usize,
    batch: usize,
    params: &SamplingParams,
    reward: &RewardConfig,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<Scored>>> {
    let mut out = Vec::with_capacity(ids.len());
    for (b, chunk) in ids.chunks(batch.max(1)).enumerate() {
        let first = b * batch.max(1);
        let params = SamplingParams {
            seed: params.seed.wrapping_add(first as u64),
            ..params.clone()
        };
        let groups = tandem_model::generate_groups(&p.model, chunk.to_vec(), n, params)?;
        for (j, group) in groups.into_iter().enumerate() {
            let i = first + j;
            let answer = answers[i].as_deref();
            let mut scored: Vec<Scored> = group
                .into_iter()
                .map(|c| {
                    let text = p.tokenizer.decode(&c.tokens, true)?;
                    Ok(Scored {
                        reward: reward.score(&text, answer),
                        tokens: c.tokens,
                        text,
                    })
                })
                .collect::<Result<_>>()?;
            if let Some(rm) = rm {
                let toks: Vec<Vec<u32>> = scored.iter().map(|s| s.tokens.clone()).collect();
                for (s, r) in scored.iter_mut().zip(rm.score(&ids[i], &toks)?) {
                    s.reward += reward.model_weight * r;
                }
            }
            out.push(scored);
        }
        progress(out.len());
    }
    Ok(out)
}
