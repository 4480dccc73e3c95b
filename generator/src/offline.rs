//! Offline sampling: `n` completions of each prompt from a policy, decoded and scored
//! by `[reward]`'s verifiers and reward model — what rejection sampling and held-out
//! evaluation both run. Multi-turn episodes go through [`tandem_env`]'s sample groups,
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
/// done after each batch. With a multi-turn `env`, the samples are episodes
/// ([`sample_episodes`]).
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
    env: Option<&Env>,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<Scored>>> {
    if let Some(env) = env {
        return sample_episodes(p, rm, ids, answers, n, batch, params, reward, env, progress);
    }
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
            add_model_rewards(rm, reward, &ids[i], &mut scored)?;
            out.push(scored);
        }
        progress(out.len());
    }
    Ok(out)
}

/// Adds `model_weight`·RM(prompt + completion) to each sample's reward, with `rm`.
fn add_model_rewards(
    rm: Option<&RewardModel>,
    reward: &RewardConfig,
    prompt: &[u32],
    scored: &mut [Scored],
) -> Result<()> {
    if let Some(rm) = rm {
        let toks: Vec<Vec<u32>> = scored.iter().map(|s| s.tokens.clone()).collect();
        for (s, r) in scored.iter_mut().zip(rm.score(prompt, &toks)?) {
            s.reward += reward.model_weight * r;
        }
    }
    Ok(())
}

/// [`sample_scored`] for multi-turn episodes with tools (`env`): each prompt's `n`
/// samples run as episodes through the sampling engine (tool calls on threads), and
/// the verifiers score each episode's final model turn. `Scored::tokens` is the whole
/// completion (every turn). Prompt i's samples draw from the streams of seed
/// `params.seed + i`.
#[allow(clippy::too_many_arguments)]
pub fn sample_episodes(
    p: &Pretrained,
    rm: Option<&RewardModel>,
    ids: &[Vec<u32>],
    answers: &[Option<String>],
    n: usize,
    batch: usize,
    params: &SamplingParams,
    reward: &RewardConfig,
    env: &Env,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Vec<Scored>>> {
    let mut out: Vec<Option<Vec<Scored>>> = vec![None; ids.len()];
    let mut done_count = 0;
    for (b, chunk) in ids.chunks(batch.max(1)).enumerate() {
        let first = b * batch.max(1);
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
                    seed: params.seed.wrapping_add(i as u64),
                    ..params.clone()
                },
                samples: n,
            };
            groups.start(&mut engine, &p.model, group)?;
        }
        while !groups.is_empty() {
            let mut finished = groups.poll_tools(&mut engine, &p.model, env, &p.tokenizer, 0)?;
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
                let answer = answers[i].as_deref();
                let s = g.samples;
                let mut scored = s
                    .completions
                    .into_iter()
                    .zip(&s.finals)
                    .map(|(c, last)| {
                        let text = p.tokenizer.decode(last, true)?;
                        Ok(Scored {
                            reward: reward.score(&text, answer),
                            tokens: c.tokens,
                            text,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                add_model_rewards(rm, reward, &ids[i], &mut scored)?;
                out[i] = Some(scored);
                done_count += 1;
            }
        }
        progress(done_count);
    }
    Ok(out.into_iter().map(Option::unwrap_or_default).collect())
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
            let out = sample_episodes(
                &p,
                None,
                &ids,
                &answers,
                2,
                2,
                &params,
                &reward,
                &env,
                |n| seen.push(n),
            )
            .unwrap();
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
