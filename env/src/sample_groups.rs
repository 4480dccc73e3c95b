//! The groups being sampled: each group's samples as episodes. A group's first turn is
//! one engine request (its prompt prefilled once, the samples forked); each later turn
//! of a sample is a request of its own, on the episode so far (a sample's turns draw
//! from their own random streams). A group is finished when every one of its episodes
//! has ended. Groups are named by the caller's id ([`GroupRequest`]): a lease online, a
//! prompt's index offline.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};

use tandem_model::{Completion, Engine, Finished, Model, Request, SamplingParams, Tokenizer};

use crate::environment::{Act, Env, Observation};
use crate::episode::{Episode, EpisodeStats, Next};
use crate::error::Result;
use crate::failure::Failed;

/// The Environment service's name of sample `j`'s episode of group `group`: `GROUP/J`,
/// and `GROUP/J/R` when the group is run again after a failure (`retry` R ≥ 1), so a
/// re-run's episodes are new ones.
pub fn episode_id(group: u64, retry: u32, j: usize) -> String {
    match retry {
        0 => format!("{group}/{j}"),
        r => format!("{group}/{j}/{r}"),
    }
}

/// Continuation requests take ids from here up, far from group ids.
const FIRST_TURN_ID: u64 = 1 << 62;

/// A group to sample: `samples` samples of `prompt`, as engine request `id` (unique
/// among the groups running; below 2^61, where turns' ids begin). `retry`: how often
/// the group was run before (its episodes failed); it names the episodes.
#[derive(Clone, Debug)]
pub struct GroupRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub samples: usize,
    pub retry: u32,
}

struct Live {
    retry: u32,
    prompt: Vec<u32>,
    params: SamplingParams,
    episodes: Vec<Episode>,
    running: usize,
}

/// A group's samples, ready to score: the completions (every turn, as the trainer
/// sees them), each token's version and loss mask, and each one's final model turn.
#[derive(Clone, Debug, Default)]
pub struct GroupSamples {
    pub completions: Vec<Completion>,
    /// Per completion: the policy version that sampled each token (masked tokens: the
    /// version held when they were added, never read).
    pub versions: Vec<Vec<u64>>,
    /// Per completion: 1 on model tokens, 0 on the environment's.
    pub masks: Vec<Vec<u8>>,
    /// Per completion: the last model turn (what verifiers score).
    pub finals: Vec<Vec<u32>>,
    /// Per completion: what its episode did.
    pub stats: Vec<EpisodeStats>,
    /// Per completion: the environment's rewards (an Environment service's, an agent
    /// program's), summed (0 without one).
    pub env_rewards: Vec<f64>,
}

impl GroupSamples {
    /// Single-turn samples: every token the model's.
    pub fn single_turn(finished: Finished) -> Self {
        let n = finished.completions.len();
        GroupSamples {
            masks: finished
                .completions
                .iter()
                .map(|c| vec![1; c.tokens.len()])
                .collect(),
            finals: finished
                .completions
                .iter()
                .map(|c| c.tokens.clone())
                .collect(),
            stats: vec![EpisodeStats::single_turn(); n],
            env_rewards: vec![0.0; n],
            completions: finished.completions,
            versions: finished.tags,
        }
    }

    /// Appends one sample: its episode as it ended.
    pub fn push_episode(&mut self, e: Episode) {
        self.env_rewards.push(e.env_reward);
        self.finals.push(e.final_turn().to_vec());
        self.stats.push(e.stats());
        self.completions.push(Completion {
            tokens: e.ids,
            logprobs: e.logprobs,
            finish_reason: e.finish,
        });
        self.versions.push(e.versions);
        self.masks.push(e.mask);
    }

    /// Samples in the group.
    pub fn len(&self) -> usize {
        self.completions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.completions.is_empty()
    }
}

/// A group whose every episode ended.
#[derive(Debug)]
pub struct FinishedGroup {
    /// Its [`GroupRequest::id`].
    pub id: u64,
    /// The prompt its samples share.
    pub prompt: Vec<u32>,
    pub samples: GroupSamples,
    /// Its episodes that failed through no doing of the model (`None`: none did): the
    /// group must not be trained.
    pub failed: Option<Failed>,
}

/// A tool call's result, from its thread: (group, sample, observation).
type ToolResult = (u64, usize, Observation);

/// The groups being sampled on one engine, and their tool calls in flight.
pub struct SampleGroups {
    live: HashMap<u64, Live>,
    /// Continuation request id → (group id, sample).
    turns: HashMap<u64, (u64, usize)>,
    next_id: u64,
    /// Tool calls run on threads of their own, so the engine goes on with other rows.
    results: (Sender<ToolResult>, Receiver<ToolResult>),
    tools_running: usize,
}

impl Default for SampleGroups {
    fn default() -> Self {
        SampleGroups {
            live: HashMap::new(),
            turns: HashMap::new(),
            next_id: 0,
            results: channel(),
            tools_running: 0,
        }
    }
}

impl SampleGroups {
    /// Queues the group's samples on `engine`.
    pub fn start(&mut self, engine: &mut Engine, model: &Model, group: GroupRequest) -> Result<()> {
        let GroupRequest {
            id,
            prompt,
            params,
            samples,
            retry,
        } = group;
        engine.add(
            model,
            Request {
                id,
                prompt: prompt.clone(),
                samples,
                params: params.clone(),
                first_stream: 0,
            },
        )?;
        self.live.insert(
            id,
            Live {
                retry,
                prompt,
                params,
                episodes: vec![Episode::default(); samples],
                running: samples,
            },
        );
        Ok(())
    }

    /// Takes a finished engine request: each of its samples' turn joins its episode,
    /// which ends, calls a tool (on a thread) or continues (a new request). Returns the
    /// group when its last episode ended.
    pub fn finished(
        &mut self,
        engine: &mut Engine,
        model: &Model,
        f: Finished,
        env: &Env,
        tokenizer: &Tokenizer,
    ) -> Result<Option<FinishedGroup>> {
        let (group, samples): (u64, Vec<usize>) = match self.turns.remove(&f.id) {
            Some((group, j)) => (group, vec![j]),
            None => (f.id, (0..f.completions.len()).collect()),
        };
        let Some(g) = self.live.get_mut(&group) else {
            return Ok(None);
        };
        let mut next = Vec::with_capacity(samples.len());
        for ((turn, tags), j) in f.completions.into_iter().zip(f.tags).zip(samples) {
            next.push((j, g.episodes[j].model_turn(turn, tags, env, tokenizer)?));
        }
        for (j, n) in next {
            self.advance(engine, model, group, j, n, env)?;
        }
        Ok(self.take_if_done(group))
    }

    /// Answers the episodes whose tool calls have returned; returns the groups that
    /// ended. `version` tags the environment's tokens.
    pub fn poll_tools(
        &mut self,
        engine: &mut Engine,
        model: &Model,
        env: &Env,
        tokenizer: &Tokenizer,
        version: u64,
    ) -> Result<Vec<FinishedGroup>> {
        let mut done = Vec::new();
        while let Ok((group, j, obs)) = self.results.1.try_recv() {
            self.tools_running -= 1;
            let Some(g) = self.live.get_mut(&group) else {
                continue;
            };
            let max_new = g.params.max_new_tokens;
            let next = g.episodes[j].observe(obs, env, tokenizer, &g.prompt, max_new, version)?;
            self.advance(engine, model, group, j, next, env)?;
            done.extend(self.take_if_done(group));
        }
        Ok(done)
    }

    /// Tool calls still running.
    pub fn tools_running(&self) -> usize {
        self.tools_running
    }

    /// Carries out what an episode's turn asked for.
    fn advance(
        &mut self,
        engine: &mut Engine,
        model: &Model,
        group: u64,
        j: usize,
        next: Next,
        env: &Env,
    ) -> Result<()> {
        let Some(g) = self.live.get_mut(&group) else {
            return Ok(());
        };
        match next {
            Next::Done => g.running -= 1,
            Next::Act(mut act) => {
                if let Act::Step { episode, .. } = &mut act {
                    *episode = episode_id(group, g.retry, j);
                }
                let (tx, env) = (self.results.0.clone(), env.clone());
                self.tools_running += 1;
                std::thread::spawn(move || {
                    let _ = tx.send((group, j, env.act(&act)));
                });
            }
            Next::Continue { prompt, budget } => {
                let id = FIRST_TURN_ID + self.next_id;
                self.next_id += 1;
                let k = g.episodes.len() as u64;
                engine.add(
                    model,
                    Request {
                        id,
                        prompt,
                        samples: 1,
                        params: SamplingParams {
                            max_new_tokens: budget,
                            ..g.params.clone()
                        },
                        // Turn t of sample j: its own stream, whatever else runs.
                        first_stream: j as u64 + u64::from(g.episodes[j].turns) * k,
                    },
                )?;
                self.turns.insert(id, (group, j));
            }
        }
        Ok(())
    }

    /// The group `group` when every episode of it has ended.
    fn take_if_done(&mut self, group: u64) -> Option<FinishedGroup> {
        if self.live.get(&group)?.running > 0 {
            return None;
        }
        let g = self.live.remove(&group)?;
        let failed = Failed::of(g.episodes.iter().map(|e| e.failure.as_ref()));
        let mut samples = GroupSamples::default();
        for e in g.episodes {
            samples.push_episode(e);
        }
        Some(FinishedGroup {
            id: group,
            prompt: g.prompt,
            samples,
            failed,
        })
    }

    /// Groups being sampled.
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EnvConfig;
    use crate::tool_call::TurnFormat;
    use tandem_model::preset::EOS_ID;
    use tandem_model::{EngineConfig, FinishReason};

    /// Through the real engine: a sample whose first turn called the calculator goes on
    /// from exactly its tokens plus the environment's, and its second turn is what the
    /// engine samples alone from that sequence with the turn's own random stream; the
    /// other sample, which answered, ends; the group is done when both have.
    #[test]
    fn a_tool_turn_continues_from_the_episode_so_far() {
        let m = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu).unwrap();
        let tok = &m.tokenizer;
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
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 200,
            stop_token_ids: vec![EOS_ID],
            seed: 11,
        };
        let prompt = tok.encode("What is 347*86?").unwrap();
        let mut engine = Engine::new(&m.model, EngineConfig::default()).unwrap();
        let mut groups = SampleGroups::default();
        groups.live.insert(
            5,
            Live {
                retry: 0,
                prompt: prompt.clone(),
                params: params.clone(),
                episodes: vec![Episode::default(); 2],
                running: 2,
            },
        );
        // The first turn of both samples, as if sampled: a call, and an answer.
        let turn = |text: &str| {
            let mut tokens = tok.encode(text).unwrap();
            tokens.push(EOS_ID);
            Completion {
                logprobs: vec![-1.0; tokens.len()],
                tokens,
                finish_reason: Some(FinishReason::Stop),
            }
        };
        let call = turn("<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"347*86\"}}</tool_call>");
        let answer = turn("29842");
        let first = Finished {
            id: 5,
            tags: vec![vec![0; call.tokens.len()], vec![0; answer.tokens.len()]],
            completions: vec![call.clone(), answer.clone()],
            top_logprobs: vec![Vec::new(); 2],
        };
        let none = groups.finished(&mut engine, &m.model, first, &env, tok);
        assert!(none.unwrap().is_none());
        // The call runs on its own thread; the engine steps meanwhile.
        let done = loop {
            let mut done = groups
                .poll_tools(&mut engine, &m.model, &env, tok, 1)
                .unwrap();
            let out = engine.step(&m.model, 1).unwrap();
            for f in out.finished {
                done.extend(
                    groups
                        .finished(&mut engine, &m.model, f, &env, tok)
                        .unwrap(),
                );
            }
            if let Some(d) = done.pop() {
                break d;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(groups.tools_running(), 0);
        assert!(groups.is_empty());
        let s = done.samples;
        let observed = tok.encode(&env.format.render("29842")).unwrap();
        let head = [call.tokens.clone(), observed.clone()].concat();
        // The same continuation, sampled alone: turn 1 of sample 0 of 2 → stream 2.
        let mut alone = Engine::new(&m.model, EngineConfig::default()).unwrap();
        alone
            .add(
                &m.model,
                Request {
                    id: 1,
                    prompt: [prompt.clone(), head.clone()].concat(),
                    samples: 1,
                    params: SamplingParams {
                        max_new_tokens: 200 - head.len(),
                        ..params.clone()
                    },
                    first_stream: 2,
                },
            )
            .unwrap();
        let second = loop {
            if let Some(f) = alone.step(&m.model, 1).unwrap().finished.pop() {
                break f.completions[0].clone();
            }
        };
        let c0 = &s.completions[0];
        assert_eq!(c0.tokens, [head.clone(), second.tokens.clone()].concat());
        assert_eq!(&c0.logprobs[head.len()..], &second.logprobs[..]);
        assert_eq!(s.finals[0], second.tokens);
        let mask = &s.masks[0];
        assert!(mask[..call.tokens.len()].iter().all(|&x| x == 1));
        assert!(mask[call.tokens.len()..head.len()].iter().all(|&x| x == 0));
        assert!(mask[head.len()..].iter().all(|&x| x == 1));
        assert!(s.versions[0][head.len()..].iter().all(|&v| v == 1));
        assert!(c0.tokens.len() <= 200);
        assert_eq!((s.stats[0].turns, s.stats[0].tool_calls), (2, 1));
        // The answering sample is its one turn.
        assert_eq!(s.completions[1].tokens, answer.tokens);
        assert_eq!(s.stats[1], EpisodeStats::single_turn());
    }
}
