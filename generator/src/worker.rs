//! The generator service: lease prompt groups, sample `group_size` completions each,
//! score them, stream the groups to the trainer, and take new weights when they are
//! published — between batches, or between decode steps (`in_flight`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::{ChatMessage, Engine, Finished, Pretrained, SamplingParams};
use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::retry;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::reward_client::RewardClient;
use tandem_proto::v1::{LeaseRequest, LeaveRequest, PromptLease, ReleaseRequest};
use tokio::runtime::Handle;

use crate::agent::{Agents, Ended};
use crate::broadcast::Inbox;
use crate::config::{GeneratorConfig, WeightUpdate};
use crate::env::{Env, EnvConfig};
use crate::error::{Error, Result};
use crate::groups::{Done, Groups, Sampled};
use crate::heartbeat::{self, Beat};
use crate::push::Outbox;
use crate::render::{prompt_ids, PromptInput};
use crate::reward::RewardConfig;
use crate::scoring::prompt_text;

/// Everything a generator needs besides its model.
#[derive(Clone)]
pub struct Settings {
    pub name: String,
    pub generator: GeneratorConfig,
    pub reward: RewardConfig,
    /// `[env]`: multi-turn episodes and their tools.
    pub env: EnvConfig,
    /// `[data] chat` and `[data] system`.
    pub chat: bool,
    pub system: Option<String>,
    pub group_size: u32,
    pub seed: u64,
    pub heartbeat_interval: Duration,
    /// How long a weight fetch may take before it is abandoned with an error.
    pub weight_sync_timeout: Duration,
    /// Receive versions by the trainer's broadcast (`[trainer] broadcast`).
    pub broadcast: Option<BroadcastSettings>,
    /// Where the OpenAI-compatible endpoint of `[env] agent` programs listens
    /// (`--openai`; any free loopback port when unset).
    pub openai: Option<String>,
    /// The generator's own files and folders (the run folder, the model cache, its
    /// credentials): hidden from `[env] agent` programs.
    pub private: Vec<std::path::PathBuf>,
}

/// A generator's side of `[trainer] broadcast`.
#[derive(Clone)]
pub struct BroadcastSettings {
    /// The token this generator holds (the generator token under `tandem run`).
    pub token: String,
    /// How long to wait for a version before fetching it over gRPC.
    pub timeout: Duration,
    /// The collective data plane (NCCL), or `None` to receive over TCP.
    pub collective: Option<tandem_weights::collective::SharedBackend>,
}

pub(crate) fn rpc(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Rpc(format!("{what}: {e}"))
}

/// A registration with the coordinator: the client and what the reply said.
pub struct Joined {
    pub coordinator: CoordinatorClient<Authed>,
    pub worker_id: u64,
    pub policy_version: u64,
    pub trainer_address: String,
}

pub struct Worker {
    pub(crate) settings: Settings,
    pub(crate) model: Pretrained,
    pub(crate) rt: Handle,
    pub(crate) creds: Credentials,
    pub(crate) coordinator: CoordinatorClient<Authed>,
    pub(crate) beat: Arc<Beat>,
    pub(crate) outbox: Outbox,
    pub(crate) reward_service: Option<RewardClient<Authed>>,
    pub(crate) reward_model: Option<tandem_model::RewardModel>,
    pub(crate) judge: Option<crate::reward::Judge>,
    pub(crate) next_seq: u64,
    /// The highest version the coordinator has published, as far as this worker saw.
    pub(crate) high_water: u64,
    /// Weight syncs failed in a row.
    pub(crate) sync_failures: u32,
    pub(crate) inbox: Option<Arc<Inbox>>,
    /// The environment of multi-turn episodes (one turn by default).
    pub(crate) env: Env,
    /// The system turn of every prompt: `[data] system`, and the tools announced in it
    /// (chat models), written once.
    pub(crate) system: Option<String>,
    /// `[env] agent`: the agent programs and their endpoint.
    pub(crate) agents: Option<Agents>,
}

impl Worker {
    /// A registered worker; starts its heartbeat task on `rt`.
    pub fn new(
        settings: Settings,
        model: Pretrained,
        rt: Handle,
        creds: Credentials,
        joined: Joined,
    ) -> Result<Self> {
        let Joined {
            coordinator,
            worker_id,
            policy_version: latest_version,
            trainer_address,
        } = joined;
        settings.generator.validate()?;
        // Every weight 0 is the run's choice (checked with its [algorithm]: pure
        // distillation); the generator then scores 0.
        settings.reward.validate_for(true)?;
        let beat = Arc::new(Beat::default());
        beat.worker_id.store(worker_id, Ordering::SeqCst);
        beat.latest.store(latest_version, Ordering::SeqCst);
        if let Ok(mut t) = beat.trainer.lock() {
            *t = trainer_address;
        }
        let reward_service = match &settings.reward.service {
            Some(addr) => {
                // Its own token, with the run's TLS material.
                let token = std::env::var("TANDEM_REWARD_TOKEN")
                    .ok()
                    .filter(|t| !t.is_empty())
                    .or_else(|| settings.reward.service_token.clone())
                    .ok_or_else(|| {
                        rpc(
                            "[reward] service",
                            "needs its own token: set TANDEM_REWARD_TOKEN (or [reward] service_token); the generator's token is not sent to it",
                        )
                    })?;
                let service_creds =
                    tandem_proto::auth::Credentials::new(&token, creds.tls().clone())
                        .map_err(|e| rpc("[reward] service_token", e))?;
                let ch = rt
                    .block_on(client::connect(addr, &service_creds))
                    .map_err(|e| rpc("[reward] service", e))?;
                Some(client::reward(ch, &service_creds))
            }
            None => None,
        };
        let reward_model = match &settings.reward.model {
            Some(dir) => Some(tandem_model::RewardModel::load(dir, &model.model)?),
            None => None,
        };
        let judge = crate::reward::Judge::load(&settings.reward, &model.model)?;
        let mut env = Env::new(
            settings.env.clone(),
            &model.tokenizer,
            settings.chat,
            &model.stop_token_ids(),
        )?;
        let system = if settings.chat && !env.config.tools.is_empty() {
            Some(crate::tool_call::system_prompt(
                settings.system.as_deref(),
                &env.config.tools,
            )?)
        } else {
            settings.system.clone()
        };
        if let Some(addr) = &settings.env.service {
            // Its own token, with the run's TLS material.
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
            let env_creds = tandem_proto::auth::Credentials::new(&token, creds.tls().clone())
                .map_err(|e| rpc("[env] service_token", e))?;
            env.service = Some(crate::env_service::EnvService::connect(
                addr,
                &env_creds,
                rt.clone(),
            )?);
        }
        let b = beat.clone();
        let agents = Agents::new(
            &rt,
            &settings.env,
            settings.openai.as_deref(),
            &model,
            settings.generator.max_new_tokens,
            Arc::new(move || b.held.load(Ordering::SeqCst)),
            &settings.private,
        )?;
        let inbox = match &settings.broadcast {
            Some(bs) => {
                let inbox = Inbox::new(bs.timeout, bs.collective.clone());
                let (b, c) = (beat.clone(), creds.clone());
                inbox
                    .spawn(
                        bs.token.clone(),
                        model.model.params().numel() as u64,
                        move || (b.worker_id.load(Ordering::SeqCst), c.session()),
                    )
                    .map_err(|e| rpc("weight broadcast receiver", e))?;
                Some(inbox)
            }
            None => None,
        };
        let w = Worker {
            settings,
            model,
            rt,
            creds,
            coordinator,
            beat,
            outbox: Outbox::default(),
            reward_service,
            reward_model,
            judge,
            next_seq: 1,
            high_water: latest_version,
            sync_failures: 0,
            inbox,
            system,
            env,
            agents,
        };
        heartbeat::spawn(
            &w.rt,
            w.beat.clone(),
            w.coordinator.clone(),
            w.creds.clone(),
            w.settings.heartbeat_interval,
            w.settings.name.clone(),
            w.inbox.clone(),
        );
        Ok(w)
    }

    /// Runs until the coordinator says the run is over: leases groups ahead of the
    /// engine, steps it, and scores and pushes each group as its last sample finishes.
    pub fn run(mut self) -> Result<()> {
        let mut engine = Engine::new(&self.model.model, self.settings.generator.engine())?;
        let mut groups = Groups::default();
        let mut agents = self.agents.take();
        // Leased under a version newer than the weights held while rows still run
        // (`between_batches`): started once the engine drains and the weights change.
        let mut deferred: Option<(u64, Vec<PromptLease>)> = None;
        let mut next_lease = Instant::now();
        let in_flight = self.settings.generator.weight_update == WeightUpdate::InFlight;
        let ahead = self.settings.generator.prompts_per_batch as usize;
        let beat = self.beat.clone();
        let worker_id = move || beat.worker_id.load(Ordering::SeqCst);
        while !self.beat.stop.load(Ordering::SeqCst) {
            // Groups whose stream broke go out again even when no new group finishes
            // (the trainer may be waiting for exactly those).
            self.redeliver()?;
            if in_flight || engine.is_idle() {
                self.maybe_sync(None)?;
            }
            if let Some((v, leases)) = deferred.take_if(|_| engine.is_idle()) {
                self.maybe_sync(Some(v))?;
                self.start(&mut engine, &mut groups, agents.as_mut(), leases)?;
            }
            // Agents' groups wait on their programs, not in the engine's queue.
            let queued = engine.queued_requests() + agents.as_ref().map_or(0, Agents::groups);
            if deferred.is_none() && queued < ahead && Instant::now() >= next_lease {
                // Retried through a coordinator restart; a retry carries the same
                // request id, so a lost reply loses no lease.
                let req = LeaseRequest {
                    worker_id: worker_id(),
                    max_groups: (ahead - queued) as u32,
                    request_id: retry::request_id(),
                };
                let coordinator = &self.coordinator;
                let reply = self.rt.block_on(retry::retry("leasing prompts", || {
                    let (mut c, req) = (coordinator.clone(), req);
                    async move { c.lease(client::unary(req)).await }
                }));
                match reply {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.stop {
                            break;
                        }
                        if r.leases.is_empty() {
                            let wait = Duration::from_millis(r.retry_after_ms.clamp(5, 1000));
                            next_lease = Instant::now() + wait;
                        } else if in_flight
                            || engine.is_idle()
                            || r.policy_version <= self.beat.held.load(Ordering::SeqCst)
                        {
                            // Admitted under version v: generate with v (or newer).
                            self.maybe_sync(Some(r.policy_version))?;
                            self.start(&mut engine, &mut groups, agents.as_mut(), r.leases)?;
                        } else {
                            deferred = Some((r.policy_version, r.leases));
                        }
                    }
                    Err(e) if e.code() == tonic::Code::NotFound => {
                        next_lease = Instant::now() + self.settings.heartbeat_interval;
                    }
                    Err(e) => return Err(rpc("leasing prompts", client::describe(&e))),
                }
            }
            // Episodes whose tool calls returned go on (or end, and their group with them).
            let held = self.beat.held.load(Ordering::SeqCst);
            let answered = groups.poll_tools(
                &mut engine,
                &self.model.model,
                &self.env,
                &self.model.tokenizer,
                held,
            )?;
            for d in answered {
                self.score_and_push(d, worker_id())?;
            }
            // Agents' turns go to the engine; groups whose agents all exited are scored.
            let ended = match agents.as_mut() {
                Some(a) => a.poll(&mut engine, &self.model.model),
                None => Vec::new(),
            };
            for e in ended {
                match e {
                    Ended::Done(d) => self.score_and_push(d, worker_id())?,
                    Ended::Failed(l, why) => {
                        self.release(&l, &why);
                        if let Some(a) = agents.as_mut() {
                            a.failed(&why)?;
                        }
                    }
                }
            }
            if engine.is_idle() {
                let wait = next_lease.saturating_duration_since(Instant::now());
                // A running tool call or agent is waited for in small steps.
                let waiting = groups.tools_running() + agents.as_ref().map_or(0, Agents::groups);
                let most = if waiting > 0 { 2 } else { 1000 };
                let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(most));
                std::thread::sleep(wait);
                self.beat
                    .wait_us
                    .fetch_add(wait.as_micros() as u64, Ordering::SeqCst);
                continue;
            }
            let out = engine.step(&self.model.model, held)?;
            self.beat
                .tokens
                .fetch_add(out.decoded as u64, Ordering::SeqCst);
            for f in out.finished {
                let f = match agents.as_mut() {
                    Some(a) => match a.finished(f) {
                        Some(f) => f,
                        None => continue,
                    },
                    None => f,
                };
                let done = groups.finished(
                    &mut engine,
                    &self.model.model,
                    f,
                    &self.env,
                    &self.model.tokenizer,
                )?;
                if let Some(d) = done {
                    self.score_and_push(d, worker_id())?;
                }
            }
            if in_flight {
                // A new version applies to every running row from the next step on.
                self.maybe_sync(None)?;
            }
        }
        self.drain();
        self.beat.stop.store(true, Ordering::SeqCst);
        if let Some(inbox) = &self.inbox {
            inbox.stop();
        }
        let _ = self
            .rt
            .block_on(self.coordinator.leave(client::unary(LeaveRequest {
                worker_id: worker_id(),
            })));
        Ok(())
    }

    /// Renders each lease's prompt and queues `group_size` samples of it (or starts
    /// `group_size` agent programs on it); a group's samples draw from streams 0.. of a
    /// seed derived from its lease.
    fn start(
        &mut self,
        engine: &mut Engine,
        groups: &mut Groups,
        agents: Option<&mut Agents>,
        leases: Vec<PromptLease>,
    ) -> Result<()> {
        let mock_ms = self.settings.generator.mock_generate_ms;
        if mock_ms > 0 {
            // Benchmarks of the control plane: one wait per lease reply instead of
            // sampling, then placeholder groups.
            std::thread::sleep(Duration::from_millis(mock_ms));
            for l in leases {
                let ids = self.prompt_of(&l)?;
                let sampled = Sampled::single_turn(self.mock_group(&l, &ids));
                let worker_id = self.beat.worker_id.load(Ordering::SeqCst);
                let done = Done {
                    lease: l,
                    prompt: ids,
                    sampled,
                };
                self.score_and_push(done, worker_id)?;
            }
            return Ok(());
        }
        if let Some(agents) = agents {
            for l in leases {
                let p = self.params(&l);
                let k = self.settings.group_size as usize;
                agents.start(l, self.system.as_deref(), p, k);
            }
            return Ok(());
        }
        for l in leases {
            let ids = match self.reset_episodes(&l) {
                Ok(Some(first)) => self.render(PromptInput::Text(&first))?,
                Ok(None) => self.prompt_of(&l)?,
                Err(why) => {
                    // Skip instead of stop: another generator (or this one) retries it.
                    self.release(&l, &why);
                    continue;
                }
            };
            let p = self.params(&l);
            groups.start(
                engine,
                &self.model.model,
                l,
                ids,
                p,
                self.settings.group_size as usize,
            )?;
        }
        Ok(())
    }

    /// The sampling settings of lease `l`'s group: the run's, with a seed derived from
    /// the lease.
    fn params(&self, l: &PromptLease) -> SamplingParams {
        let g = &self.settings.generator;
        SamplingParams {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            max_new_tokens: g.max_new_tokens,
            stop_token_ids: self.model.stop_token_ids(),
            seed: self.settings.seed ^ l.lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// `max_new_tokens` placeholder tokens per sample (`mock_generate_ms`).
    fn mock_group(&self, l: &PromptLease, prompt: &[u32]) -> Finished {
        let g = &self.settings.generator;
        let held = self.beat.held.load(Ordering::SeqCst);
        let n = g.max_new_tokens;
        let k = self.settings.group_size as usize;
        self.beat.tokens.fetch_add((n * k) as u64, Ordering::SeqCst);
        Finished {
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
        }
    }

    /// With an Environment service: `Reset` of each sample's episode. Their first
    /// observation is the group's prompt (`None`: the dataset's prompt), so it must
    /// not differ between the samples of one prompt.
    fn reset_episodes(&self, l: &PromptLease) -> std::result::Result<Option<String>, String> {
        let Some(service) = &self.env.service else {
            return Ok(None);
        };
        let prompt = prompt_text(l);
        let mut first: Option<String> = None;
        for j in 0..self.settings.group_size as usize {
            let episode = crate::groups::episode_id(l.lease_id, j);
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
            &self.model.tokenizer,
            input,
            self.settings.chat,
            self.system.as_deref(),
        )
    }

    /// Gives lease `l` back to the coordinator (its prompt is re-issued at once).
    pub(crate) fn release(&mut self, l: &PromptLease, why: &str) {
        tracing::warn!(
            lease = l.lease_id,
            "{}: giving the lease back",
            tandem_proto::limits::printable(why)
        );
        let req = ReleaseRequest {
            worker_id: self.beat.worker_id.load(Ordering::SeqCst),
            lease_id: l.lease_id,
            // The coordinator takes a reason of REASON_BYTES at most.
            reason: tandem_proto::limits::cut(why, tandem_proto::limits::REASON_BYTES).to_string(),
        };
        let coordinator = &self.coordinator;
        if let Err(e) = self.rt.block_on(retry::retry("giving a lease back", || {
            let (mut c, req) = (coordinator.clone(), req.clone());
            async move { c.release(client::unary(req)).await }
        })) {
            // It expires with the lease timeout instead.
            tracing::warn!(
                lease = l.lease_id,
                "could not give the lease back: {}",
                client::describe(&e)
            );
        }
    }
}
