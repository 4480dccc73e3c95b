//! Offline sampling: `n` completions of each prompt from a policy, decoded and scored
//! by `[reward]`'s verifiers and reward model — what rejection sampling and held-out
//! evaluation both run ([`OfflineSampler`]). Multi-turn episodes go through [`tandem_env`]'s sample groups,
//! each named by its prompt's index.

use tandem_data::{Prompt, PromptBody};
use tandem_model::{ChatMessage, Pretrained, RewardModel, SamplingParams};

use tandem_env::{Env, GroupRequest, SampleGroups};

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
    tokenizer: &tandem_model::Tokenizer,
    prompts: &[Prompt],
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, pr)| {
            Ok(
                prompt_ids(tokenizer, PromptInput::from(&pr.body), chat, system)
                    .with_context(|| format!("prompt {}", i + 1))?,
            )
        })
        .collect()
}

/// How offline sampling draws and scores: `samples` completions of each prompt from
/// `model`, `batch_prompts` prompts at a time (each prefilled once, its samples
/// forked), scored by `reward`'s verifiers plus `model_weight`·RM when `reward_model`
/// is given. With a multi-turn `env`, the samples are episodes.
pub struct OfflineSampler<'a> {
    pub model: &'a Pretrained,
    pub reward_model: Option<&'a RewardModel>,
    pub samples: usize,
    pub batch_prompts: usize,
    pub params: &'a SamplingParams,
    pub reward: &'a RewardConfig,
    pub env: Option<&'a Env>,
}

impl OfflineSampler<'_> {
    /// The scored samples of each prompt `ids[i]` (answer `answers[i]`), in prompt
    /// order. Prompt i draws from the random streams of seed `params.seed + i`.
    /// `progress` is told how many prompts are done after each batch.
    pub fn sample(
        &self,
        ids: &[Vec<u32>],
        answers: &[Option<String>],
        progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<Scored>>> {
        match self.env {
            Some(env) => self.episodes(ids, answers, env, progress),
            None => self.single_turns(ids, answers, progress),
        }
    }

    /// One turn per sample: each batch through `generate_groups`.
    fn single_turns(
        &self,
        ids: &[Vec<u32>],
        answers: &[Option<String>],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<Scored>>> {
        let batch = self.batch_prompts.max(1);
        let mut out = Vec::with_capacity(ids.len());
        for (b, chunk) in ids.chunks(batch).enumerate() {
            let first = b * batch;
            let params = SamplingParams {
                seed: self.params.seed.wrapping_add(first as u64),
                ..self.params.clone()
            };
            let groups = tandem_model::generate_groups(
                &self.model.model,
                chunk.to_vec(),
                self.samples,
                params,
            )?;
            for (j, group) in groups.into_iter().enumerate() {
                let i = first + j;
                let samples = group.into_iter().map(|c| {
                    let text = self.model.tokenizer.decode(&c.tokens, true)?;
                    Ok((c.tokens, text))
                });
                out.push(self.score(&ids[i], answers[i].as_deref(), samples)?);
            }
            progress(out.len());
        }
        Ok(out)
    }

    /// Multi-turn episodes with tools (`env`): each prompt's samples run as episodes
    /// through the sampling engine (tool calls on threads), and the verifiers score each
    /// episode's final model turn. `Scored::tokens` is the whole completion (every turn).
    fn episodes(
        &self,
        ids: &[Vec<u32>],
        answers: &[Option<String>],
        env: &Env,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Vec<Scored>>> {
        let (p, batch) = (self.model, self.batch_prompts.max(1));
        let mut out: Vec<Option<Vec<Scored>>> = vec![None; ids.len()];
        let mut done_count = 0;
        for (b, chunk) in ids.chunks(batch).enumerate() {
            let first = b * batch;
            let mut engine = tandem_model::Engine::new(
                &p.model,
                crate::config::GeneratorConfig::default().engine(),
            )?;
            let mut groups = SampleGroups::default();
            for (j, prompt) in chunk.iter().enumerate() {
                let i = first + j;
                // The group of prompt i is named by i.
                let group = GroupRequest {
                    id: i as u64,
                    prompt: prompt.clone(),
                    params: SamplingParams {
                        seed: self.params.seed.wrapping_add(i as u64),
                        ..self.params.clone()
                    },
                    samples: self.samples,
                    retry: 0,
                };
                groups.start(&mut engine, &p.model, group)?;
            }
            while !groups.is_empty() {
                let mut finished =
                    groups.poll_tools(&mut engine, &p.model, env, &p.tokenizer, 0)?;
                if engine.is_idle() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                } else {
                    for f in engine.step(&p.model, 0)?.finished {
                        finished.extend(groups.finished(
                            &mut engine,
                            &p.model,
                            f,
                            env,
                            &p.tokenizer,
                        )?);
                    }
                }
                for g in finished {
                    let i = g.id as usize;
                    let s = g.samples;
                    let samples = s
                        .completions
                        .into_iter()
                        .zip(&s.finals)
                        .map(|(c, last)| Ok((c.tokens, p.tokenizer.decode(last, true)?)));
                    out[i] = Some(self.score(&ids[i], answers[i].as_deref(), samples)?);
                    done_count += 1;
                }
            }
            progress(done_count);
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Scores one prompt's samples (their tokens and the text the verifiers read):
    /// r = `reward.score(text, answer)` + `model_weight`·RM(prompt + completion).
    fn score(
        &self,
        prompt: &[u32],
        answer: Option<&str>,
        samples: impl Iterator<Item = Result<(Vec<u32>, String)>>,
    ) -> Result<Vec<Scored>> {
        let mut scored = samples
            .map(|s| {
                let (tokens, text) = s?;
                Ok(Scored {
                    reward: self.reward.score(&text, answer),
                    tokens,
                    text,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(rm) = self.reward_model {
            let toks: Vec<Vec<u32>> = scored.iter().map(|s| s.tokens.clone()).collect();
            for (s, r) in scored.iter_mut().zip(rm.score(prompt, &toks)?) {
                s.reward += self.reward.model_weight * r;
            }
        }
        Ok(scored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_env::tool_call::TurnFormat;
    use tandem_env::EnvConfig;

    /// Episodes through the engine: n scored samples per prompt, each within the token
    /// budget, the same for the same seed.
    #[test]
    fn episodes_are_sampled_and_scored_per_prompt() {
        let p = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu).unwrap();
        let env = Env {
            config: EnvConfig {
                max_turns: 3,
                tools: vec!["calculator".into()],
                ..Default::default()
            },
            format: TurnFormat::raw(),
            service: None,
            python: None,
        };
        let ids: Vec<Vec<u32>> = ["1 + 2 =", "3 * 4 =", "5 - 1 ="]
            .iter()
            .map(|t| p.tokenizer.encode(t).unwrap())
            .collect();
        let answers = vec![Some("3".to_string()), Some("12".into()), Some("4".into())];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 24,
            stop_token_ids: p.stop_token_ids(),
            seed: 3,
        };
        let reward = RewardConfig::default();
        let run = || {
            let mut seen = Vec::new();
            let sampler = OfflineSampler {
                model: &p,
                reward_model: None,
                samples: 2,
                batch_prompts: 2,
                params: &params,
                reward: &reward,
                env: Some(&env),
            };
            let out = sampler.sample(&ids, &answers, |n| seen.push(n)).unwrap();
            (out, seen)
        };
        let (a, seen) = run();
        assert_eq!(seen, vec![2, 3]);
        assert_eq!(a.len(), 3);
        for g in &a {
            assert_eq!(g.len(), 2);
            for s in g {
                assert!(!s.tokens.is_empty() && s.tokens.len() <= 24);
                assert!(s.reward.is_finite());
            }
        }
        let (b, _) = run();
        let tokens = |x: &Vec<Vec<Scored>>| -> Vec<Vec<u32>> {
            x.iter().flatten().map(|s| s.tokens.clone()).collect()
        };
        assert_eq!(tokens(&a), tokens(&b));
    }
}
