//! One sample's episode: model turns exactly as sampled (never decoded and encoded
//! again) and, between them, the environment's turns, each tokenized once. The
//! completion the trainer sees is their concatenation; environment tokens carry loss
//! mask 0, model tokens their behaviour logprobs and the version that sampled each.

use std::ops::Range;

use tandem_model::{Completion, FinishReason, Tokenizer};

use crate::environment::{Act, Env, Observation};
use crate::error::Result;
use crate::failure::Failure;
use crate::tool_call::{self, Action};

/// What to do after a model turn.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Sample the next model turn from `prompt` (the episode's prompt and every turn so
    /// far), at most `budget` tokens.
    Continue {
        prompt: Vec<u32>,
        budget: usize,
    },
    /// Ask the environment (a tool call, or the service's `Step`: the caller names the
    /// episode), then [`Episode::observe`].
    Act(Act),
    Done,
}

/// What one sample's episode did: model turns and tool calls (failed ones too), and
/// the seconds its tools took.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EpisodeStats {
    pub turns: u32,
    pub tool_calls: u32,
    pub tool_errors: u32,
    pub tool_seconds: f64,
}

impl EpisodeStats {
    /// One model turn, no tool.
    pub fn single_turn() -> Self {
        EpisodeStats {
            turns: 1,
            ..Default::default()
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Episode {
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub versions: Vec<u64>,
    /// 1 on model tokens, 0 on the environment's.
    pub mask: Vec<u8>,
    pub turns: u32,
    pub tool_calls: u32,
    pub tool_errors: u32,
    pub tool_seconds: f64,
    /// How the episode ended: the last model turn's reason, or `Length` when the
    /// environment's answer no longer fit.
    pub finish: Option<FinishReason>,
    /// The last model turn (the final answer that verifiers score).
    last_turn: Range<usize>,
    /// The environment's rewards (the service's), summed.
    pub env_reward: f64,
    /// The episode failed through no doing of the model (the service's error, a tool's
    /// infrastructure): it ended there, and its group is not trained.
    pub failure: Option<Failure>,
}

impl Episode {
    /// Appends a model turn as sampled (`tags`: each token's version) and says what
    /// comes next: the end, or the tool call to run (when turns remain).
    pub fn model_turn(
        &mut self,
        turn: Completion,
        tags: Vec<u64>,
        env: &Env,
        tokenizer: &Tokenizer,
    ) -> Result<Next> {
        self.push_model(&turn, tags);
        // A service answers (and scores) every turn, the last one included.
        if env.service.is_some() || env.config.service.is_some() {
            let text = tokenizer.decode(&turn.tokens, true)?;
            return Ok(Next::Act(Act::Step {
                episode: String::new(),
                text,
            }));
        }
        if !env.config.multi_turn()
            || self.turns >= env.config.max_turns
            || turn.finish_reason != Some(FinishReason::Stop)
        {
            return Ok(Next::Done);
        }
        let text = tokenizer.decode(&turn.tokens, true)?;
        match tool_call::parse(&text) {
            Action::Answer => Ok(Next::Done),
            action => Ok(Next::Act(Act::Tool(action))),
        }
    }

    /// Appends the environment's answer to the last turn's call, tokenized once and
    /// masked, and says what to sample next (the end when it leaves no room for another
    /// model token in `max_new_tokens`). `version` tags the environment's tokens (never
    /// read: masked). An observation that is a failure ends the episode as failed.
    pub fn observe(
        &mut self,
        obs: Observation,
        env: &Env,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        max_new_tokens: usize,
        version: u64,
    ) -> Result<Next> {
        if let Some(f) = obs.failure {
            self.failure = Some(f);
            return Ok(Next::Done);
        }
        self.env_reward += obs.reward;
        if obs.tool {
            self.tool_calls += 1;
            self.tool_errors += u32::from(obs.error);
            self.tool_seconds += obs.seconds;
        }
        if obs.done || self.turns >= env.config.max_turns || self.finish != Some(FinishReason::Stop)
        {
            return Ok(Next::Done);
        }
        let observed = tokenizer.encode(&env.format.render(&obs.text))?;
        // The environment's turn and at least one more model token must fit.
        if self.ids.len() + observed.len() >= max_new_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(Next::Done);
        }
        self.push_context(&observed, version);
        let mut next = prompt.to_vec();
        next.extend(&self.ids);
        Ok(Next::Continue {
            prompt: next,
            budget: max_new_tokens - self.ids.len(),
        })
    }

    /// Appends a model turn as sampled (`tags`: each token's version), trained, as the
    /// episode's last turn.
    pub fn push_model(&mut self, turn: &Completion, tags: Vec<u64>) {
        let start = self.ids.len();
        self.mask.extend(std::iter::repeat_n(1, turn.tokens.len()));
        self.ids.extend(&turn.tokens);
        self.logprobs.extend(&turn.logprobs);
        self.versions.extend(tags);
        self.last_turn = start..self.ids.len();
        self.turns += 1;
        self.finish = turn.finish_reason;
    }

    /// Appends tokens the model did not write: loss mask 0, logprob 0, tagged with
    /// `version` (never read).
    pub fn push_context(&mut self, ids: &[u32], version: u64) {
        self.mask.extend(std::iter::repeat_n(0, ids.len()));
        self.logprobs.extend(std::iter::repeat_n(0.0, ids.len()));
        self.versions
            .extend(std::iter::repeat_n(version, ids.len()));
        self.ids.extend(ids);
    }

    /// The last model turn's tokens (what verifiers score).
    pub fn final_turn(&self) -> &[u32] {
        &self.ids[self.last_turn.clone()]
    }

    /// What the episode did.
    pub fn stats(&self) -> EpisodeStats {
        EpisodeStats {
            turns: self.turns,
            tool_calls: self.tool_calls,
            tool_errors: self.tool_errors,
            tool_seconds: self.tool_seconds,
        }
    }

    /// Whether any token is the environment's.
    pub fn has_environment_tokens(&self) -> bool {
        self.mask.contains(&0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnvConfig;
    use crate::tool_call::TurnFormat;
    use tandem_model::preset::{tiny_tokenizer, EOS_ID};

    /// A model turn, and the environment's answer when it called a tool.
    #[allow(clippy::too_many_arguments)]
    fn step(
        e: &mut Episode,
        t: Completion,
        tags: Vec<u64>,
        env: &Env,
        tok: &Tokenizer,
        prompt: &[u32],
        max_new: usize,
        version: u64,
    ) -> Next {
        match e.model_turn(t, tags, env, tok).unwrap() {
            Next::Act(a) => {
                let obs = env.act(&a);
                e.observe(obs, env, tok, prompt, max_new, version).unwrap()
            }
            n => n,
        }
    }

    fn turn(tok: &Tokenizer, text: &str, stop: bool) -> Completion {
        let mut tokens = tok.encode(text).unwrap();
        if stop {
            tokens.push(EOS_ID);
        }
        Completion {
            logprobs: (0..tokens.len()).map(|i| -0.5 - i as f32).collect(),
            tokens,
            finish_reason: Some(if stop {
                FinishReason::Stop
            } else {
                FinishReason::Length
            }),
        }
    }

    /// Token in, token out: the completion is the sampled tokens and the environment's,
    /// byte for byte, masked exactly on the environment's span, and the next turn is
    /// sampled after exactly those tokens.
    #[test]
    fn a_two_turn_episode_keeps_the_sampled_tokens() {
        let tok = tiny_tokenizer(512).unwrap();
        let env = Env {
            config: EnvConfig {
                max_turns: 4,
                tools: vec!["calculator".into()],
                ..Default::default()
            },
            format: TurnFormat::from_template(&tok, "tool", "<|im_end|>").unwrap(),
            service: None,
            python: None,
        };
        assert_eq!(env.format.before, "\n<|im_start|>tool\n");
        assert_eq!(env.format.after, "<|im_end|>\n<|im_start|>assistant\n");
        let prompt = tok
            .encode("<|im_start|>user\n347*86?<|im_end|>\n<|im_start|>assistant\n")
            .unwrap();
        let first = turn(
            &tok,
            "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"347*86\"}}</tool_call>",
            true,
        );
        let mut e = Episode::default();
        let n1 = first.tokens.len();
        let next = step(
            &mut e,
            first.clone(),
            vec![3; n1],
            &env,
            &tok,
            &prompt,
            200,
            4,
        );
        let observed = tok
            .encode("\n<|im_start|>tool\n29842<|im_end|>\n<|im_start|>assistant\n")
            .unwrap();
        let Next::Continue { prompt: p2, budget } = next else {
            panic!("{next:?}")
        };
        assert_eq!(
            p2,
            [prompt.clone(), first.tokens.clone(), observed.clone()].concat()
        );
        assert_eq!(budget, 200 - first.tokens.len() - observed.len());
        let second = turn(&tok, "The product is 29842.", true);
        let n2 = second.tokens.len();
        let next = step(
            &mut e,
            second.clone(),
            vec![4; n2],
            &env,
            &tok,
            &prompt,
            200,
            4,
        );
        assert_eq!(next, Next::Done);
        assert_eq!(
            e.ids,
            [
                first.tokens.clone(),
                observed.clone(),
                second.tokens.clone()
            ]
            .concat()
        );
        let (a, b) = (first.tokens.len(), first.tokens.len() + observed.len());
        assert!(e.mask[..a].iter().chain(&e.mask[b..]).all(|&m| m == 1));
        assert!(e.mask[a..b].iter().all(|&m| m == 0));
        assert_eq!(&e.logprobs[..a], &first.logprobs[..]);
        assert_eq!(&e.logprobs[b..], &second.logprobs[..]);
        assert!(e.versions[..a].iter().all(|&v| v == 3) && e.versions[b..].iter().all(|&v| v == 4));
        assert_eq!(e.final_turn(), &second.tokens[..]);
        assert_eq!((e.turns, e.tool_calls, e.tool_errors), (2, 1, 0));
        assert_eq!(e.finish, Some(FinishReason::Stop));
        assert_eq!(
            tok.decode(&e.ids, false).unwrap(),
            "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"347*86\"}}</tool_call><|im_end|>\n<|im_start|>tool\n29842<|im_end|>\n<|im_start|>assistant\nThe product is 29842.<|im_end|>"
        );
    }

    #[test]
    fn episodes_end_on_an_answer_a_turn_limit_or_no_room() {
        let tok = tiny_tokenizer(512).unwrap();
        let env = |max_turns| Env {
            config: EnvConfig {
                max_turns,
                tools: vec!["calculator".into()],
                ..Default::default()
            },
            format: TurnFormat::raw(),
            service: None,
            python: None,
        };
        let call = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+\"}}</tool_call>";
        let run = |env: &Env, turns: &[(&str, bool)], max_new: usize| {
            let mut e = Episode::default();
            let mut nexts = vec![];
            for (text, stop) in turns {
                let t = turn(&tok, text, *stop);
                let n = t.tokens.len();
                nexts.push(step(&mut e, t, vec![0; n], env, &tok, &[5], max_new, 0));
            }
            (e, nexts)
        };
        // An answer without a call.
        let (e, n) = run(&env(3), &[("42", true)], 100);
        assert_eq!(
            (n[0].clone(), e.turns, e.has_environment_tokens()),
            (Next::Done, 1, false)
        );
        // A malformed call is answered with the error and counted; the turn limit ends it.
        let (e, n) = run(&env(2), &[(call, true), (call, true)], 400);
        assert!(matches!(n[0], Next::Continue { .. }) && n[1] == Next::Done);
        assert_eq!((e.tool_calls, e.tool_errors), (1, 1));
        assert!(tok
            .decode(&e.ids, false)
            .unwrap()
            .contains("\nResult: error: "));
        // A turn cut by length ends the episode; so does an observation with no room.
        let (_, n) = run(&env(3), &[(call, false)], 400);
        assert_eq!(n[0], Next::Done);
        let t = turn(&tok, call, true);
        let (e, n) = run(&env(3), &[(call, true)], t.tokens.len() + 3);
        assert_eq!(
            (n[0].clone(), e.finish),
            (Next::Done, Some(FinishReason::Length))
        );
        // One turn (the default): never a tool.
        let (e, n) = run(&env(1), &[(call, true)], 400);
        assert_eq!((n[0].clone(), e.tool_calls), (Next::Done, 0));
    }
}
