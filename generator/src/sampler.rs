//! The engine driver: it owns the sampling [`Engine`], the policy it samples, the
//! groups being sampled as episodes ([`SampleGroups`]), the agent programs and the
//! leases of everything in flight. It starts leased groups, steps the engine with the
//! held version as each token's tag, and turns each group whose episodes all ended
//! into a [`Job`] for the scorer stage; it never scores, calls a reward service or
//! pushes. A group whose episode failed through no doing of the model runs again with
//! new episodes, or its lease goes back ([`crate::failure`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_env::agent::{Agents, Ended};
use tandem_env::service::EnvService;
use tandem_env::{Env, FinishedGroup, GroupRequest, GroupSamples, SampleGroups};
use tandem_model::{ChatMessage, Engine, Finished, Model, Pretrained, SamplingParams};
use tandem_proto::auth::Credentials;
use tandem_proto::v1::{GroupFailure, PromptLease};
use tokio::runtime::Handle;

use crate::config::GeneratorConfig;
use crate::error::{rpc, Result};
use crate::failure::{self, Attempts, Failure};
use crate::heartbeat::Beat;
use crate::leases::task;
use crate::render::{prompt_ids, PromptInput};
use crate::scorer::Job;
use crate::worker::Settings;

/// The engine's steps so far, readable from any thread (the scorer logs how far the
/// engine got during a slow reward call).
#[derive(Clone, Default)]
pub(crate) struct StepCount(Arc<AtomicU64>);

impl StepCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn set(&self, n: u64) {
        self.0.store(n, Ordering::SeqCst);
    }
}

/// The engine driver and everything it owns.
pub(crate) struct Sampler {
    engine: Engine,
    policy: Pretrained,
    groups: SampleGroups,
    /// `[env] agent`: the agent programs and their endpoint.
    agents: Option<Agents>,
    /// The environment of multi-turn episodes (one turn by default).
    env: Env,
    /// The system turn of every prompt: `[data] system`, and the tools announced in it
    /// (chat models), written once.
    system: Option<String>,
    /// The lease of each group being sampled, by group id (its lease id), and the
    /// group's failed runs before this one.
    leases: HashMap<u64, (PromptLease, Attempts)>,
    /// `[env] max_retries`.
    max_retries: u32,
    config: GeneratorConfig,
    group_size: usize,
    seed: u64,
    /// `[data] chat`.
    chat: bool,
    /// The version held (each token's tag); tokens and waits are reported here.
    beat: Arc<Beat>,
    steps: StepCount,
    /// The engine's prompt counters already reported: (prefilled, cached).
    reported: (u64, u64),
    /// When the prompt counters were last logged.
    logged: Instant,
}

/// How often the engine's prompt counters are logged.
const LOG_EVERY: Duration = Duration::from_secs(60);

impl Sampler {
    /// The driver of `policy`'s engine for `settings`: its environment (tools, the
    /// Environment service, agent programs and their endpoint on `rt`) set up and tried.
    pub fn new(
        policy: Pretrained,
        settings: &Settings,
        rt: &Handle,
        creds: &Credentials,
        beat: Arc<Beat>,
        steps: StepCount,
    ) -> Result<Self> {
        let mut env = Env::new(
            settings.env.clone(),
            &policy.tokenizer,
            settings.chat,
            &policy.stop_token_ids(),
        )?;
        let system = if settings.chat && !env.config.tools.is_empty() {
            Some(tandem_env::tool_call::system_prompt(
                settings.system.as_deref(),
                &env.config.tools,
            )?)
        } else {
            settings.system.clone()
        };
        env.service = env_service(settings, creds, rt)?;
        let b = beat.clone();
        let agents = Agents::new(
            rt,
            &settings.env,
            settings.openai.as_deref(),
            &policy,
            settings.generator.max_new_tokens,
            Arc::new(move || b.held()),
            &settings.private,
        )?;
        Ok(Sampler {
            engine: Engine::new(&policy.model, settings.generator.engine())?,
            policy,
            groups: SampleGroups::default(),
            agents,
            env,
            system,
            leases: HashMap::new(),
            max_retries: settings.env.max_retries,
            config: settings.generator.clone(),
            group_size: settings.group_size as usize,
            seed: settings.seed,
            chat: settings.chat,
            beat,
            steps,
            reported: (0, 0),
            logged: Instant::now(),
        })
    }

    /// Reports the prompt tokens the engine computed and those its prefix cache served
    /// since the last call (heartbeats carry them to the coordinator's `/metrics`), and
    /// logs the totals every minute (and when `now`).
    pub fn report_prefill(&mut self, now: bool) {
        let st = self.engine.stats();
        let (prefilled, cached) = (st.prefilled_tokens, st.prefix_cache_hit_tokens);
        self.beat
            .prefilled(prefilled - self.reported.0, cached - self.reported.1);
        self.reported = (prefilled, cached);
        if now || self.logged.elapsed() >= LOG_EVERY {
            self.logged = Instant::now();
            let share = cached as f64 / (prefilled + cached).max(1) as f64;
            let per = |t: u64| t as f64 / st.prompts.max(1) as f64;
            tracing::info!(
                prompts = st.prompts,
                prefill_tokens = prefilled,
                prefix_cache_hit_tokens = cached,
                prefix_cache_evictions = st.prefix_cache_evictions,
                preemptions = st.preemptions,
                decoded_tokens = st.decoded_tokens,
                "engine: {} prompts, {prefilled} prompt tokens computed ({:.1} a prompt), \
                 {cached} from the prefix cache ({:.0} %)",
                st.prompts,
                per(prefilled),
                100.0 * share
            );
        }
    }

    /// The policy the engine samples (weight syncs assign into it in place).
    pub fn model(&self) -> &Model {
        &self.policy.model
    }

    pub fn is_idle(&self) -> bool {
        self.engine.is_idle()
    }

    /// Groups waiting to run: queued in the engine, or with agent programs running
    /// (their turns wait on the programs, not in the engine's queue).
    pub fn waiting(&self) -> usize {
        self.engine.queued_requests() + self.agents.as_ref().map_or(0, Agents::groups)
    }

    /// Renders each lease's prompt and queues `group_size` samples of it (or starts
    /// `group_size` agent programs on it); a group's samples draw from streams 0.. of a
    /// seed derived from its lease. Leases that cannot start go back (jobs).
    pub fn start(&mut self, leases: Vec<PromptLease>) -> Result<Vec<Job>> {
        if self.config.mock_generate_ms > 0 {
            return self.mock(leases);
        }
        let mut jobs = Vec::new();
        for l in leases {
            jobs.extend(self.launch(l, Attempts::default())?);
        }
        Ok(jobs)
    }

    /// Runs again the groups whose scoring failed (the scorer's re-runs), each after
    /// its failed runs so far.
    pub fn restart(&mut self, groups: Vec<(PromptLease, Attempts)>) -> Result<Vec<Job>> {
        let mut jobs = Vec::new();
        for (l, attempts) in groups {
            jobs.extend(self.launch(l, attempts)?);
        }
        Ok(jobs)
    }

    /// Starts lease `l`'s group after `attempts` failed runs, with new episodes: its
    /// agents, or its episodes (with an Environment service, each `Reset` first). A
    /// failed `Reset` runs the group again at once; once `[env] max_retries` re-runs
    /// failed, the lease goes back (the job).
    fn launch(&mut self, l: PromptLease, mut attempts: Attempts) -> Result<Option<Job>> {
        if let Some(agents) = self.agents.as_mut() {
            let p = params(&self.config, self.seed, &self.policy, &l, attempts.retries);
            agents.start(&task(&l), self.system.as_deref(), p, self.group_size);
        } else {
            let prompt = loop {
                match self.reset_episodes(&l, attempts.retries) {
                    Ok(Some(first)) => break self.render(PromptInput::Text(&first))?,
                    Ok(None) => break self.prompt_of(&l)?,
                    Err(f) => {
                        let max = self.max_retries;
                        match failure::retry(l.lease_id, attempts, &f, max, &self.beat) {
                            Some(next) => attempts = next,
                            None => {
                                return Ok(Some(Job::GiveBack {
                                    lease: l,
                                    failure: f,
                                }))
                            }
                        }
                    }
                }
            };
            let group = GroupRequest {
                id: l.lease_id,
                prompt,
                params: params(&self.config, self.seed, &self.policy, &l, attempts.retries),
                samples: self.group_size,
                retry: attempts.retries,
            };
            self.groups
                .start(&mut self.engine, &self.policy.model, group)?;
        }
        self.leases.insert(l.lease_id, (l, attempts));
        Ok(None)
    }

    /// The group of lease `id` failed with `f`: it runs again, or its lease goes back.
    fn failed(&mut self, id: u64, f: Failure) -> Result<Option<Job>> {
        let Some((lease, attempts)) = self.leases.remove(&id) else {
            return Ok(None);
        };
        match failure::retry(id, attempts, &f, self.max_retries, &self.beat) {
            Some(next) => self.launch(lease, next),
            None => Ok(Some(Job::GiveBack { lease, failure: f })),
        }
    }

    /// Episodes whose tool calls returned go on (or end, and their group with them);
    /// agents' turns go to the engine, and groups whose agents all exited end.
    pub fn poll(&mut self) -> Result<Vec<Job>> {
        let held = self.beat.held();
        let p = &self.policy;
        let answered =
            self.groups
                .poll_tools(&mut self.engine, &p.model, &self.env, &p.tokenizer, held)?;
        let mut jobs = Vec::new();
        for g in answered {
            jobs.extend(self.ended(g)?);
        }
        let ended = match self.agents.as_mut() {
            Some(a) => a.poll(&mut self.engine, &self.policy.model),
            None => Vec::new(),
        };
        for e in ended {
            match e {
                Ended::Done(g) => jobs.extend(self.ended(g)?),
                Ended::Failed(id, failed) => {
                    jobs.extend(self.failed(id, Failure::of_episodes(failed))?)
                }
            }
        }
        Ok(jobs)
    }

    /// One engine step: one token of every decoding row (and a chunk of prompts),
    /// tagged with the version held; the groups it finished go to the scorer.
    pub fn step(&mut self) -> Result<Vec<Job>> {
        let out = self.engine.step(&self.policy.model, self.beat.held())?;
        self.steps.set(self.engine.stats().steps);
        self.beat.generated(out.decoded as u64);
        self.report_prefill(false);
        let mut jobs = Vec::new();
        for f in out.finished {
            let f = match self.agents.as_mut() {
                Some(a) => match a.finished(f) {
                    Some(f) => f,
                    None => continue,
                },
                None => f,
            };
            let p = &self.policy;
            let done =
                self.groups
                    .finished(&mut self.engine, &p.model, f, &self.env, &p.tokenizer)?;
            if let Some(g) = done {
                jobs.extend(self.ended(g)?);
            }
        }
        Ok(jobs)
    }

    /// Waits while the engine has nothing to step: until the next lease call
    /// (`until_lease`), at most 1 s, or 2 ms while tool calls or agents run.
    pub fn idle_wait(&self, until_lease: Duration) {
        let running = self.groups.tools_running() + self.agents.as_ref().map_or(0, Agents::groups);
        let most = Duration::from_millis(if running > 0 { 2 } else { 1000 });
        let wait = until_lease.clamp(Duration::from_millis(1), most);
        std::thread::sleep(wait);
        self.beat.waited(wait);
    }

    /// The scorer's job for a group whose episodes all ended; a group with a failed
    /// episode runs again instead (or its lease goes back).
    fn ended(&mut self, g: FinishedGroup) -> Result<Option<Job>> {
        if let Some(failed) = g.failed {
            return self.failed(g.id, Failure::of_episodes(failed));
        }
        let Some((lease, attempts)) = self.leases.remove(&g.id) else {
            tracing::warn!(group = g.id, "a group ended that no lease holds; dropped");
            return Ok(None);
        };
        Ok(Some(Job::Score {
            lease,
            attempts,
            prompt: g.prompt,
            samples: g.samples,
        }))
    }

    /// Benchmarks of the control plane (`mock_generate_ms`): one wait per lease reply
    /// instead of sampling, then groups of `max_new_tokens` placeholder tokens per
    /// sample.
    fn mock(&mut self, leases: Vec<PromptLease>) -> Result<Vec<Job>> {
        std::thread::sleep(Duration::from_millis(self.config.mock_generate_ms));
        let (held, n, k) = (
            self.beat.held(),
            self.config.max_new_tokens,
            self.group_size,
        );
        let mut jobs = Vec::with_capacity(leases.len());
        for l in leases {
            let prompt = self.prompt_of(&l)?;
            self.beat.generated((n * k) as u64);
            let finished = Finished {
                id: l.lease_id,
                completions: vec![
                    tandem_model::Completion {
                        tokens: vec![prompt[prompt.len() - 1]; n],
                        logprobs: vec![-1.0; n],
                        finish_reason: Some(tandem_model::FinishReason::Length),
                    };
                    k
                ],
                tags: vec![vec![held; n]; k],
                top_logprobs: vec![Vec::new(); k],
            };
            jobs.push(Job::Score {
                lease: l,
                attempts: Attempts::default(),
                prompt,
                samples: GroupSamples::single_turn(finished),
            });
        }
        Ok(jobs)
    }

    /// With an Environment service: `Reset` of each sample's episode (named for the
    /// group's run `retry`). Their first observation is the group's prompt (`None`: the
    /// dataset's prompt), so it must not differ between the samples of one prompt. A
    /// failed `Reset` fails one episode.
    fn reset_episodes(
        &self,
        l: &PromptLease,
        retry: u32,
    ) -> std::result::Result<Option<String>, Failure> {
        let Some(service) = &self.env.service else {
            return Ok(None);
        };
        let fail = |why: String| Failure {
            kind: GroupFailure::Environment,
            episodes: 1,
            why,
        };
        let prompt = task(l).prompt_text();
        let mut first: Option<String> = None;
        for j in 0..self.group_size {
            let episode = tandem_env::sample_groups::episode_id(l.lease_id, retry, j);
            let obs = service
                .reset(&episode, &prompt, &l.answer, &l.info_json)
                .map_err(fail)?;
            match &first {
                Some(f) if *f != obs => {
                    return Err(fail(format!(
                        "[env] service: Reset gave the samples of prompt {} different first observations; it must depend on the prompt only (keep per-episode randomness for Step)",
                        l.prompt_index
                    )))
                }
                _ => first = Some(obs),
            }
        }
        Ok(first.filter(|f| !f.is_empty()))
    }

    /// A lease's prompt as token ids (chat template when `[data] chat`).
    fn prompt_of(&self, l: &PromptLease) -> Result<Vec<u32>> {
        let input = if l.messages.is_empty() {
            PromptInput::Text(&l.text)
        } else {
            PromptInput::Messages(
                l.messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            )
        };
        self.render(input)
    }

    /// `input` as token ids: the chat template (with the system turn, and the tools
    /// announced in it) when `[data] chat`, the raw text otherwise.
    fn render(&self, input: PromptInput<'_>) -> Result<Vec<u32>> {
        prompt_ids(
            &self.policy.tokenizer,
            input,
            self.chat,
            self.system.as_deref(),
        )
    }
}

/// The sampling settings of lease `l`'s group: `config`'s, with a seed derived from the
/// run's `seed` and the lease (and from `retry`, the group's run, when it runs again).
fn params(
    config: &GeneratorConfig,
    seed: u64,
    policy: &Pretrained,
    l: &PromptLease,
    retry: u32,
) -> SamplingParams {
    SamplingParams {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
        max_new_tokens: config.max_new_tokens,
        stop_token_ids: policy.stop_token_ids(),
        seed: seed
            ^ l.lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ u64::from(retry).wrapping_mul(0xD1B5_4A32_D192_ED03),
    }
}

/// The client of `[env] service` (`None` when unset), with its own token
/// (`TANDEM_ENV_TOKEN`, else `[env] service_token`) and `creds`' TLS material: the
/// generator's token is never sent to it.
fn env_service(
    settings: &Settings,
    creds: &Credentials,
    rt: &Handle,
) -> Result<Option<EnvService>> {
    let Some(addr) = &settings.env.service else {
        return Ok(None);
    };
    let token = std::env::var("TANDEM_ENV_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| settings.env.service_token.clone())
        .ok_or_else(|| {
            rpc(
                "[env] service",
                "needs its own token: set TANDEM_ENV_TOKEN (or [env] service_token); the generator's token is not sent to it",
            )
        })?;
    let env_creds =
        Credentials::new(&token, creds.tls().clone()).map_err(|e| rpc("[env] service_token", e))?;
    Ok(Some(EnvService::connect(addr, &env_creds, rt.clone())?))
}
