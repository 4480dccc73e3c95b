//! Agent programs (`[env] agent`): one process per episode, talking to the policy
//! through the generator's OpenAI-compatible endpoint ([`crate::openai`]).
//!
//! For each task (a leased prompt) the generator starts `group_size` agents. Each
//! gets its task as one JSON object on stdin ([`task_input`]: `episode_id`, `messages`,
//! `prompt`, `answer`, `info` (the dataset record's info as an object, `{}` when it has
//! none), `prompt_index`, `sample`, `max_turns`, `model`) and, in its environment,
//! `OPENAI_BASE_URL`, `OPENAI_API_KEY` (its episode's own key: the endpoint serves an
//! episode only to a request that carries it) and `TANDEM_EPISODE_ID`; the run's
//! `TANDEM_*` secrets are not passed on.
//!
//! An agent runs in the sandbox of [`tandem_sandbox`] with the host's files and
//! network (it is the user's program and reads the user's files) but its own PID,
//! mount, IPC and user namespaces: it cannot see or signal the generator or any other
//! process (`/proc/$PPID/environ` does not exist for it), the generator's own files
//! (the run folder, the model cache, the credentials: [`Agents::new`]'s `private`) are
//! hidden from it, and whatever it starts ends with it. It may print `{"reward": r}` as
//! its last line. When the
//! last agent of a group has exited, the group's samples (all its episodes' turns,
//! [`crate::chat_episode`]) are scored like any other group: verifiers on each
//! episode's final model turn, plus `[env] reward_weight` × the agent's reward. An
//! agent that exited non-zero, was killed at `[env] agent_timeout_s` or printed a
//! reward that is not a number failed ([`crate::failure`]): its group is not scored
//! but [`Ended::Failed`], for the generator to run again.
//!
//! The group's prompt is the longest token prefix its samples' first prompts share;
//! the rest of each sample's prompt is part of its completion, with loss mask 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_model::{Completion, Engine, Finished, Model, Pretrained, Request, SamplingParams};
use tandem_sandbox::run::User;
use tandem_sandbox::{Call, End, Keep, Limits, Network, Sandbox, View};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::chat_episode::ChatEpisode;
use crate::config::EnvConfig;
use crate::error::{Error, Result};
use crate::failure::{Failed, Failure, FailureKind};
use crate::openai::{self, Endpoint, Held, Policy, Slot, TurnRequest};
use crate::sample_groups::{FinishedGroup, GroupSamples};
use crate::task::Task;

/// The JSON object sample `sample`'s agent reads on stdin for episode `episode_id` of
/// `task`: `episode_id`, `messages` (the `system` turn, then the task's conversation or
/// its text as a user turn), `prompt`, `answer`, `info` (the dataset record's info, an
/// object: `{}` when it has none), `prompt_index`, `sample`, `max_turns`, `model`.
pub fn task_input(
    task: &Task,
    system: Option<&str>,
    episode_id: &str,
    sample: usize,
    max_turns: u32,
) -> Value {
    let mut messages: Vec<Value> = system
        .map(|s| json!({"role": "system", "content": s}))
        .into_iter()
        .collect();
    if task.messages.is_empty() {
        messages.push(json!({"role": "user", "content": task.text}));
    }
    for m in &task.messages {
        messages.push(json!({"role": m.role, "content": m.content}));
    }
    json!({
        "episode_id": episode_id,
        "messages": messages,
        "prompt": task.prompt_text(),
        "answer": task.answer,
        "info": task.info(),
        "prompt_index": task.prompt_index,
        "sample": sample,
        "max_turns": max_turns,
        "model": MODEL,
    })
}

/// Agent turns take engine request ids from here up, apart from groups and the
/// built-in episodes' turns.
const FIRST_AGENT_ID: u64 = 1 << 61;

/// The model's name on the endpoint (`/v1/models`, the task's `model`).
const MODEL: &str = "tandem";

/// Output kept of an agent's stdout and stderr (the end of it).
const KEEP_BYTES: usize = 64 << 10;

/// Size of an agent's own `/dev/shm`.
const SHM_BYTES: u64 = 64 << 20;

/// How an agent process ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    /// The reward it printed as its last line.
    pub reward: Option<f64>,
    /// Why it failed (exit status, killed at the timeout, a last line that is not a
    /// reward), with the end of its stderr: its group is not trained.
    pub failure: Option<String>,
}

/// An agent that ended: (group, sample, how).
type Exited = (u64, usize, Exit);

struct Live {
    /// The group's id (its task's).
    id: u64,
    params: SamplingParams,
    /// Episode ids, by sample.
    episodes: Vec<String>,
    exits: Vec<Option<Exit>>,
}

/// A group that ended: ready to score, or failed (its id, and its failed episodes: an
/// agent failed, or none sampled a turn).
pub enum Ended {
    Done(FinishedGroup),
    Failed(u64, Failed),
}

pub struct Agents {
    endpoint: Arc<Endpoint>,
    /// The endpoint's address.
    pub addr: std::net::SocketAddr,
    config: EnvConfig,
    sandbox: Arc<Sandbox>,
    turns: Receiver<TurnRequest>,
    exits: (Sender<Exited>, Receiver<Exited>),
    /// Engine request id → where its turn goes.
    pending: HashMap<u64, oneshot::Sender<openai::TurnResult>>,
    live: HashMap<u64, Live>,
    next_id: u64,
}

impl Agents {
    /// The agents of `[env] agent` (`None` when unset), their endpoint served on `rt`
    /// at `openai` (any free loopback port when unset). `private`: the generator's own
    /// files and folders, hidden from every agent.
    pub fn new(
        rt: &Handle,
        config: &EnvConfig,
        openai: Option<&str>,
        model: &Pretrained,
        max_new_tokens: usize,
        held: Held,
        private: &[PathBuf],
    ) -> Result<Option<Self>> {
        if config.agent.is_empty() {
            return match openai {
                Some(addr) => Err(Error::Invalid(format!(
                    "--openai {addr}: the endpoint serves the episodes of [env] agent programs; set [env] agent"
                ))),
                None => Ok(None),
            };
        }
        let probe = [tandem_model::ChatMessage::user("x")];
        if let Err(e) = model.tokenizer.apply_chat_template(&probe, true) {
            return Err(Error::Invalid(format!(
                "[env] agent: the endpoint renders conversations with the model's chat template: {e}"
            )));
        }
        let sandbox = Sandbox::new(
            View::Host {
                hidden: private.to_vec(),
            },
            Network::Host,
            User::Caller,
        )
        .map_err(|e| Error::Invalid(format!("[env] agent: {e}")))?;
        let policy = Policy {
            tokenizer: model.tokenizer.clone(),
            stop: model.stop_token_ids(),
            max_turns: config.max_turns,
            budget: max_new_tokens,
            context: model.model.config().max_position_embeddings,
            vocab: model
                .model
                .config()
                .vocab_size
                .min(model.tokenizer.vocab_size()),
            held,
            model: MODEL.into(),
        };
        let (tx, turns) = channel();
        let endpoint = Arc::new(Endpoint::new(tx, policy));
        let addr = openai.unwrap_or("127.0.0.1:0");
        let listening = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let local = listener.local_addr()?;
            Ok::<_, std::io::Error>((listener, local))
        });
        let (listener, local) =
            listening.map_err(|e| Error::Rpc(format!("--openai {addr}: cannot listen: {e}")))?;
        rt.spawn(openai::serve(listener, endpoint.clone()));
        tracing::info!(addr = %local, "OpenAI-compatible endpoint for [env] agent programs");
        let agents = Agents {
            endpoint,
            addr: local,
            config: config.clone(),
            sandbox: Arc::new(sandbox),
            turns,
            exits: channel(),
            pending: HashMap::new(),
            live: HashMap::new(),
            next_id: 0,
        };
        // The sandbox is tried once here: a clear error at start-up, not per episode.
        let probe = agents.run_one(
            &["/bin/sh".into(), "-c".into(), "exit 0".into()],
            &json!({}),
            "",
            "",
            "",
        );
        if let Some(why) = probe.failure {
            return Err(Error::Invalid(format!("[env] agent: {why}")));
        }
        Ok(Some(agents))
    }

    /// Runs one agent program in the agents' sandbox.
    fn run_one(
        &self,
        argv: &[String],
        task: &Value,
        base_url: &str,
        episode: &str,
        key: &str,
    ) -> Exit {
        run(
            &self.sandbox,
            argv,
            task,
            &AgentEnv {
                base_url,
                episode,
                key,
            },
            Duration::from_secs_f64(self.config.agent_timeout_s),
        )
    }

    /// Starts `samples` agents on `task`: its conversation after the `system` turn
    /// (`[data] system`), when there is one. The group is named by the task's id.
    pub fn start(
        &mut self,
        task: &Task,
        system: Option<&str>,
        params: SamplingParams,
        samples: usize,
    ) {
        let mut episodes = Vec::with_capacity(samples);
        for j in 0..samples {
            // The id names the episode; the key, which only its agent holds, lets it in.
            let id = format!("{}-{j}-{:016x}", task.id, rand::random::<u64>());
            let key = format!("tandem-{:032x}", rand::random::<u128>());
            self.endpoint
                .insert(id.clone(), Slot::new(task.id, j, samples, key.clone()));
            let input = task_input(task, system, &id, j, self.config.max_turns);
            self.spawn(task.id, j, input, id.clone(), key);
            episodes.push(id);
        }
        self.live.insert(
            task.id,
            Live {
                id: task.id,
                params,
                episodes,
                exits: vec![None; samples],
            },
        );
    }

    /// Runs sample `j`'s agent of group `group` on a thread of its own; its exit comes
    /// back through `exits`.
    fn spawn(&self, group: u64, j: usize, input: Value, episode: String, key: String) {
        let (argv, timeout) = (
            self.config.agent.clone(),
            Duration::from_secs_f64(self.config.agent_timeout_s),
        );
        let base_url = format!("http://{}/v1", self.addr);
        let (tx, sandbox) = (self.exits.0.clone(), self.sandbox.clone());
        std::thread::spawn(move || {
            let env = AgentEnv {
                base_url: &base_url,
                episode: &episode,
                key: &key,
            };
            let exit = run(&sandbox, &argv, &input, &env, timeout);
            let _ = tx.send((group, j, exit));
        });
    }

    /// Queues the agents' requested turns on the engine and collects the groups whose
    /// last agent exited.
    pub fn poll(&mut self, engine: &mut Engine, model: &Model) -> Vec<Ended> {
        while let Ok(t) = self.turns.try_recv() {
            let Some(g) = self.live.get(&t.group) else {
                continue; // The group ended; the handler answers 503.
            };
            let id = FIRST_AGENT_ID + self.next_id;
            self.next_id += 1;
            let added = engine.add_with_top_logprobs(
                model,
                Request {
                    id,
                    prompt: t.prompt,
                    samples: 1,
                    params: SamplingParams {
                        max_new_tokens: t.max_new,
                        ..g.params.clone()
                    },
                    first_stream: t.stream,
                },
                t.top_logprobs,
            );
            match added {
                Ok(()) => {
                    self.pending.insert(id, t.reply);
                }
                // A request the engine cannot take (a conversation longer than the
                // model's context) is the agent's error, not the generator's.
                Err(e) => {
                    let _ = t.reply.send(Err(format!("messages: {e}")));
                }
            }
        }
        let mut ended = Vec::new();
        while let Ok((group, j, exit)) = self.exits.1.try_recv() {
            if let Some(why) = &exit.failure {
                tracing::warn!(group, sample = j, "[env] agent: {why}");
            }
            let Some(g) = self.live.get_mut(&group) else {
                continue;
            };
            g.exits[j] = Some(exit);
            if g.exits.iter().all(Option::is_some) {
                let Some(g) = self.live.remove(&group) else {
                    continue;
                };
                ended.push(self.assemble(g));
            }
        }
        ended
    }

    /// Hands a finished engine request to its agent's turn; returns the others.
    pub fn finished(&mut self, f: Finished) -> Option<Finished> {
        match self.pending.remove(&f.id) {
            Some(reply) => {
                let turn = f.completions.into_iter().next();
                let tags = f.tags.into_iter().next().unwrap_or_default();
                let tops = f.top_logprobs.into_iter().next().unwrap_or_default();
                if let Some(completion) = turn {
                    // The agent may have gone (killed at its timeout): nothing to answer.
                    let _ = reply.send(Ok(openai::Turn {
                        completion,
                        tags,
                        tops,
                    }));
                }
                None
            }
            None => Some(f),
        }
    }

    /// Groups whose agents are running.
    pub fn groups(&self) -> usize {
        self.live.len()
    }

    /// The group of `g`, from its episodes' samples; failed when an agent failed (its
    /// turns are not trained on a reward it never gave) or no episode sampled a turn.
    fn assemble(&mut self, g: Live) -> Ended {
        let episodes: Vec<ChatEpisode> = g
            .episodes
            .iter()
            .map(|id| self.endpoint.remove(id).unwrap_or_default())
            .collect();
        let failures: Vec<Option<Failure>> = g
            .exits
            .iter()
            .map(|e| {
                let why = e.as_ref().and_then(|e| e.failure.as_ref())?;
                Some(Failure {
                    kind: FailureKind::Agent,
                    why: format!("[env] agent: an agent {why}"),
                })
            })
            .collect();
        if let Some(failed) = Failed::of(failures.iter().map(Option::as_ref)) {
            return Ended::Failed(g.id, failed);
        }
        // An agent that exited 0 without a reward line leaves the score to the verifiers.
        let rewards: Vec<f64> = g
            .exits
            .iter()
            .map(|e| e.as_ref().and_then(|e| e.reward).unwrap_or(0.0))
            .collect();
        match group(&episodes, &rewards) {
            Some((prompt, samples)) => Ended::Done(FinishedGroup {
                id: g.id,
                prompt,
                samples,
                failed: None,
            }),
            None => Ended::Failed(
                g.id,
                Failed {
                    episodes: g.exits.len() as u32,
                    first: Failure {
                        kind: FailureKind::Agent,
                        why: "[env] agent: no episode of the group sampled a turn (every agent exited without a request)".into(),
                    },
                },
            ),
        }
    }
}

/// A group's prompt and samples from its episodes (`rewards`: each agent's): the
/// prompt is the longest token prefix the samples' first prompts share, each sample's
/// completion the rest of its tokens. `None` when no episode sampled a turn.
pub fn group(episodes: &[ChatEpisode], rewards: &[f64]) -> Option<(Vec<u32>, GroupSamples)> {
    let samples: Vec<_> = episodes
        .iter()
        .zip(rewards)
        .flat_map(|(e, &r)| e.samples.iter().map(move |s| (e, s, r)))
        .collect();
    let first = samples.first()?.1;
    let mut shared = first.prompt_len;
    for (_, s, _) in &samples {
        shared = shared.min(
            first.tokens.ids[..shared]
                .iter()
                .zip(&s.tokens.ids[..s.prompt_len])
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    if shared == 0 {
        return None;
    }
    let mut out = GroupSamples::default();
    for (e, s, reward) in samples {
        let s = &s.tokens;
        out.completions.push(Completion {
            tokens: s.ids[shared..].to_vec(),
            logprobs: s.logprobs[shared..].to_vec(),
            finish_reason: s.finish,
        });
        out.versions.push(s.versions[shared..].to_vec());
        out.masks.push(s.mask[shared..].to_vec());
        out.finals.push(e.final_turn().to_vec());
        out.stats.push(s.stats());
        out.env_rewards.push(reward);
    }
    Some((first.tokens.ids[..shared].to_vec(), out))
}

/// What an agent finds in its environment beside the generator's own (less `TANDEM_*`).
struct AgentEnv<'a> {
    base_url: &'a str,
    episode: &'a str,
    /// The episode's key (`OPENAI_API_KEY`).
    key: &'a str,
}

/// Runs one agent to its end in `sandbox` (or kills it, with everything it started, at
/// `timeout`).
fn run(
    sandbox: &Sandbox,
    argv: &[String],
    task: &Value,
    agent: &AgentEnv,
    timeout: Duration,
) -> Exit {
    let fail = |why: String| Exit {
        reward: None,
        failure: Some(why),
    };
    // The run's secrets stay with the generator.
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("TANDEM_") && !k.starts_with("OPENAI_"))
        .collect();
    env.extend(
        [
            ("OPENAI_BASE_URL", agent.base_url),
            ("OPENAI_API_KEY", agent.key),
            ("TANDEM_EPISODE_ID", agent.episode),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let limits = Limits {
        wall: timeout,
        tmpfs: SHM_BYTES,
        ..Limits::default()
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let input = format!("{task}\n");
    let ran = sandbox.run(&Call {
        program: Path::new(&argv[0]),
        args: &argv[1..],
        env: &env,
        files: &[],
        stdin: input.as_bytes(),
        cwd: Some(&cwd),
        limits: &limits,
        stdout: Keep::Tail(KEEP_BYTES),
        stderr: Keep::Tail(KEEP_BYTES),
    });
    let ran = match ran {
        Ok(r) => r,
        Err(e) => return fail(format!("{:?} could not start: {e}", argv[0])),
    };
    let stderr_tail: String = {
        let lines: Vec<&str> = ran.stderr.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    };
    let last = ran.stdout.lines().rev().find(|l| !l.trim().is_empty());
    let reported = last
        .and_then(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .and_then(|v| v.get("reward").cloned());
    let reward = reported
        .as_ref()
        .and_then(Value::as_f64)
        .filter(|r| r.is_finite());
    let mut why = Vec::new();
    match ran.end {
        End::WallTime => why.push(format!(
            "was killed at [env] agent_timeout_s = {}",
            timeout.as_secs_f64()
        )),
        End::Exited(0) => {}
        // Exec failed in the sandbox: the program is not there (or not executable).
        End::Exited(127) if ran.stdout.is_empty() && ran.stderr.is_empty() => {
            why.push(format!("{:?} could not start (exit status 127: not found or not executable where the agent runs)", argv[0]))
        }
        End::Exited(code) => why.push(format!("exited with exit status: {code}")),
        End::Signaled(sig) => why.push(format!("was killed by signal {sig}")),
    }
    if reported.is_some() && reward.is_none() {
        why.push("printed a \"reward\" that is not a finite number".into());
    }
    if !why.is_empty() && !stderr_tail.is_empty() {
        why.push(format!("stderr: {stderr_tail}"));
    }
    Exit {
        reward,
        failure: (!why.is_empty()).then(|| why.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An episode of one sample: `prompt`, then one model turn `turn`.
    fn episode(tok: &tandem_model::Tokenizer, prompt: &[u32], turn: &[u32]) -> ChatEpisode {
        let mut e = ChatEpisode::default();
        let plan = crate::chat_episode::TurnPlan {
            extends: None,
            text: String::new(),
            new_ids: prompt.to_vec(),
            prompt: prompt.to_vec(),
            max_new: 8,
        };
        let c = Completion {
            tokens: turn.to_vec(),
            logprobs: vec![-1.0; turn.len()],
            finish_reason: Some(tandem_model::FinishReason::Stop),
        };
        e.record(plan, c, vec![4; turn.len()], 3, tok, &[]).unwrap();
        e
    }

    /// The group's prompt is what every sample's first prompt shares; the rest of a
    /// prompt is masked context in its completion; each sample gets its episode's reward.
    #[test]
    fn a_group_shares_the_common_prompt_prefix() {
        let tok = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu)
            .unwrap()
            .tokenizer;
        let a = episode(&tok, &[5, 6, 7, 8], &[20, 21]);
        let b = episode(&tok, &[5, 6, 9], &[30]);
        let (prompt, s) = group(&[a, b, ChatEpisode::default()], &[1.0, 0.0, 0.5]).unwrap();
        assert_eq!(prompt, [5, 6]);
        let c = &s.completions;
        assert_eq!(c.len(), 2, "an episode without a turn has no sample");
        assert_eq!(
            (c[0].tokens.as_slice(), s.masks[0].as_slice()),
            (&[7, 8, 20, 21][..], &[0, 0, 1, 1][..])
        );
        assert_eq!(
            (c[1].tokens.as_slice(), s.masks[1].as_slice()),
            (&[9, 30][..], &[0, 1][..])
        );
        assert_eq!(c[0].logprobs, [0.0, 0.0, -1.0, -1.0]);
        assert_eq!(s.versions[1], [3, 4]);
        assert_eq!(s.finals, [vec![20, 21], vec![30]]);
        assert_eq!(s.env_rewards, [1.0, 0.0]);
        assert!(group(&[ChatEpisode::default()], &[0.0]).is_none());
        let c = episode(&tok, &[1, 2], &[3]);
        assert!(
            group(&[c, episode(&tok, &[5], &[3])], &[0.0, 0.0]).is_none(),
            "nothing shared"
        );
    }

    /// The task an agent reads: the record's info as an object beside the prompt and
    /// the answer (`{}` without one).
    #[test]
    fn an_agent_s_task_carries_the_record_s_info() {
        let task = Task {
            id: 7,
            prompt_index: 3,
            text: "2 + 2 =".into(),
            answer: "4".into(),
            info_json: r#"{"level":3,"tests":[1,2]}"#.into(),
            ..Default::default()
        };
        let input = task_input(&task, Some("be brief"), "7-0-ab", 1, 4);
        assert_eq!(input["info"], json!({"level": 3, "tests": [1, 2]}));
        assert_eq!(
            (&input["prompt"], &input["answer"], &input["sample"]),
            (&json!("2 + 2 ="), &json!("4"), &json!(1))
        );
        assert_eq!(
            input["messages"],
            json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2 ="}])
        );
        let none = Task {
            info_json: String::new(),
            ..task
        };
        assert_eq!(task_input(&none, None, "e", 0, 1)["info"], json!({}));
    }

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    fn sandbox(hidden: &[PathBuf]) -> Sandbox {
        Sandbox::new(
            View::Host {
                hidden: hidden.to_vec(),
            },
            Network::Host,
            User::Caller,
        )
        .unwrap()
    }

    fn env<'a>(episode: &'a str, key: &'a str) -> AgentEnv<'a> {
        AgentEnv {
            base_url: "http://127.0.0.1:1/v1",
            episode,
            key,
        }
    }

    /// The task arrives on stdin and the episode and its key in the environment; the
    /// last line is the reward; a failing or hanging agent is reported (and killed with
    /// what it started), never waited for past its timeout.
    #[test]
    fn agents_get_their_task_and_report_a_reward() {
        let sb = sandbox(&[]);
        let task = json!({"episode_id": "7-0-ab", "answer": "42"});
        let t = Duration::from_secs(20);
        let ok = run(
            &sb,
            &sh("read task; case \"$task\" in *42*) ;; *) exit 3;; esac; [ \"$TANDEM_EPISODE_ID\" = 7-0-ab ] || exit 4; [ -z \"$TANDEM_TOKEN\" ] || exit 5; [ \"$OPENAI_API_KEY\" = k-7 ] || exit 6; echo noise; echo '{\"reward\": 0.5}'"),
            &task,
            &env("7-0-ab", "k-7"),
            t,
        );
        assert_eq!(
            ok,
            Exit {
                reward: Some(0.5),
                failure: None
            }
        );
        let failed = run(&sb, &sh("echo oops >&2; exit 2"), &task, &env("e", "k"), t);
        assert_eq!(failed.reward, None);
        let why = failed.failure.unwrap();
        assert!(
            why.contains("exit status: 2") && why.contains("oops"),
            "{why}"
        );
        let marker = format!("agent-leftover-{:x}", rand::random::<u64>());
        let t0 = Instant::now();
        let hung = run(
            &sb,
            &sh(&format!("(exec -a {marker} sleep 30) & sleep 30")),
            &task,
            &env("e", "k"),
            Duration::from_millis(300),
        );
        assert!(hung.failure.unwrap().contains("agent_timeout_s"));
        assert!(t0.elapsed() < Duration::from_secs(10));
        let missing = run(
            &sb,
            &["/no/such/agent".to_string()],
            &task,
            &env("e", "k"),
            t,
        );
        assert!(missing.failure.unwrap().contains("could not start"));
        let nan = run(
            &sb,
            &sh("echo '{\"reward\": \"high\"}'"),
            &task,
            &env("e", "k"),
            t,
        );
        assert!(nan.failure.unwrap().contains("finite"));
        // Nothing an agent started outlives it.
        let left = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .count();
        assert_eq!(left, 0, "a process the agent started is alive");
    }

    /// An agent sees no other process (so not the generator's environment) and none of
    /// the generator's private files; it still reads the user's other files.
    #[test]
    fn agents_see_neither_the_generator_nor_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("run");
        std::fs::create_dir(&private).unwrap();
        std::fs::write(private.join("token"), "secret").unwrap();
        let key_file = dir.path().join("tls.key");
        std::fs::write(&key_file, "secret key").unwrap();
        let shared = dir.path().join("data.txt");
        std::fs::write(&shared, "the user's data").unwrap();
        let sb = sandbox(&[private.clone(), key_file.clone()]);
        let script = format!(
            "d=$(cat {data} 2>&1); t=$(cat {run}/token 2>&1); k=$(cat {key} 2>&1); \
             e=$(tr -d '\\0' < /proc/$PPID/environ 2>&1); \
             echo \"data=$d token=$t key=$k ppid=$PPID env=$e\" >&2; exit 1",
            data = shared.display(),
            run = private.display(),
            key = key_file.display(),
        );
        let t = Duration::from_secs(20);
        let sandboxed = run(&sb, &sh(&script), &json!({}), &env("e", "k"), t);
        let out = sandboxed.failure.unwrap();
        assert!(out.contains("data=the user's data"), "{out}");
        assert!(!out.contains("secret"), "{out}");
        assert!(!out.contains("PATH="), "the generator's environment: {out}");
        assert!(out.contains("ppid=0"), "{out}");
    }
}
