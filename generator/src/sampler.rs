//! The engine driver: it owns the sampling [`Engine`], the policy it samples, the
//! groups being sampled as episodes ([`SampleGroups`]), the agent programs and the
//! leases of everything in flight. It starts leased groups, steps the engine with the
//! held version as each token's tag, and turns each group whose episodes all ended
//! into a [`Job`] for the scorer stage; it never scores, calls a reward service or
//! pushes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_env::agent::{Agents, Ended};
use tandem_env::service::EnvService;
use tandem_env::{Env, FinishedGroup, GroupRequest, GroupSamples, SampleGroups};
use tandem_model::{ChatMessage, Engine, Finished, Model, Pretrained, SamplingParams};
use tandem_proto::auth::Credentials;
use tandem_proto::v1::PromptLease;
use tokio::runtime::Handle;

use crate::config::GeneratorConfig;
use crate::error::{rpc, Result};
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
    /// The lease of each group being sampled, by group id (its lease id).
    leases: HashMap<u64, PromptLease>,
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
            tracing::info!(
                prefill_tokens = prefilled,
                prefix_cache_hit_tokens = cached,
                prefix_cache_evictions = st.prefix_cache_evictions,
                preemptions = st.preemptions,
                "engine: {prefilled} prompt tokens computed, {cached} from the prefix cache ({:.0} %)",
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
            let p = self.params(&l);
            if let Some(agents) = self.agents.as_mut() {
                agents.start(&task(&l), self.system.as_deref(), p, self.group_size);
                self.leases.insert(l.lease_id, l);
                continue;
            }
            let prompt = match self.reset_episodes(&l) {
                Ok(Some(first)) => self.render(PromptInput::Text(&first))?,
                Ok(None) => self.prompt_of(&l)?,
                Err(why) => {
                    // Skip instead of stop: another generator (or this one) retries it.
                    jobs.push(Job::GiveBack { lease: l, why });
                    continue;
                }
            };
            let group = GroupRequest {
                id: l.lease_id,
                prompt,
                params: p,
                samples: self.group_size,
            };
            self.groups
                .start(&mut self.engine, &self.policy.model, group)?;
            self.leases.insert(l.lease_id, l);
        }
        Ok(jobs)
    }

    /// Episodes whose tool calls returned go on (or end, and their group with them);
    /// agents' turns go to the engine, and groups whose agents all exited end.
    pub fn poll(&mut self) -> Result<Vec<Job>> {
        let held = self.beat.held();
        let p = &self.policy;
        let answered =
            self.groups
                .poll_tools(&mut self.engine, &p.model, &self.env, &p.tokenizer, held)?;
        let mut jobs: Vec<Job> = answered.into_iter().filter_map(|g| self.ended(g)).collect();
        let ended = match self.agents.as_mut() {
            Some(a) => a.poll(&mut self.engine, &self.policy.model),
            None => Vec::new(),
        };
        for e in ended {
            match e {
                Ended::Done(g) => jobs.extend(self.ended(g)),
                Ended::Failed(id, why) => {
                    if let Some(a) = self.agents.as_mut() {
                        a.failed(&why)?;
                    }
                    if let Some(lease) = self.leases.remove(&id) {
                        jobs.push(Job::GiveBack { lease, why });
                    }
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
                jobs.extend(self.ended(g));
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

    /// The scorer's job for a group whose episodes all ended.
    fn ended(&mut self, g: FinishedGroup) -> Option<Job> {
        let Some(lease) = self.leases.remove(&g.id) else {
            tracing::warn!(group = g.id, "a group ended that no lease holds; dropped");
            return None;
        };
        Some(Job::Score {
            lease,
            prompt: g.prompt,
            samples: g.samples,
        })
    }

    /// The sampling settings of lease `l`'s group: the run's, with a seed derived from
    /// the lease.
    fn params(&self, l: &PromptLease) -> SamplingParams {
        let g = &self.config;
        SamplingParams {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            max_new_tokens: g.max_new_tokens,
            stop_token_ids: self.policy.stop_token_ids(),
            seed: self.seed ^ l.lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
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
            };
            jobs.push(Job::Score {
                lease: l,
                prompt,
                samples: GroupSamples::single_turn(finished),
            });
        }
        Ok(jobs)
    }

    /// With an Environment service: `Reset` of each sample's episode. Their first
    /// observation is the group's prompt (`None`: the dataset's prompt), so it must
    /// not differ between the samples of one prompt.
    fn reset_episodes(&self, l: &PromptLease) -> std::result::Result<Option<String>, String> {
        let Some(service) = &self.env.service else {
            return Ok(None);
        };
        let prompt = task(l).prompt_text();
        let mut first: Option<String> = None;
        for j in 0..self.group_size {
            let episode = tandem_env::sample_groups::episode_id(l.lease_id, j);
            let obs = service.reset(&episode, &prompt, &l.answer)?;
            match &first {
                Some(f) if *f != obs => {
                    return Err(format!(
                        "[env] service: Reset gave the samples of prompt {} different first observations; it must depend on the prompt only (keep per-episode randomness for Step)",
                        l.prompt_index
                    ))
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
