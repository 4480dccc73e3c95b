//! The generator service: lease prompt groups, sample `group_size` completions each,
//! score them, stream the groups to the trainer, and take new weights when they are
//! published — between batches, or between decode steps (`in_flight`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_model::{ChatMessage, Pretrained, SamplingParams, Session};
use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::reward_client::RewardClient;
use tandem_proto::v1::{
    Completion, FetchWeightsRequest, HeartbeatRequest, LeaseRequest, LeaveRequest, PromptLease,
    RegisterRequest, Role, RolloutGroup, ScoreRequest,
};
use tandem_weights::bucket::Assembler;
use tokio::runtime::Handle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::broadcast::Inbox;
use crate::config::{GeneratorConfig, WeightUpdate};
use crate::error::{Error, Result};
use crate::render::{prompt_ids, PromptInput};
use crate::reward::RewardConfig;

/// Everything a generator needs besides its model.
#[derive(Clone)]
pub struct Settings {
    pub name: String,
    pub generator: GeneratorConfig,
    pub reward: RewardConfig,
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
}

/// A generator's side of `[trainer] broadcast`.
#[derive(Clone)]
pub struct BroadcastSettings {
    /// The run's token.
    pub token: String,
    /// How long to wait for a version before fetching it over gRPC.
    pub timeout: Duration,
    /// The collective data plane (NCCL), or `None` to receive over TCP.
    pub collective: Option<tandem_weights::collective::SharedBackend>,
}

/// What the heartbeat task and the sampling loop share.
#[derive(Default)]
struct Beat {
    worker_id: AtomicU64,
    held: AtomicU64,
    latest: AtomicU64,
    tokens: AtomicU64,
    wait_us: AtomicU64,
    sync_bytes: AtomicU64,
    sync_failures: AtomicU64,
    syncs: Mutex<Vec<f64>>,
    trainer: Mutex<String>,
    stop: AtomicBool,
}

fn rpc(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Rpc(format!("{what}: {e}"))
}

/// Registers again after the coordinator dropped this worker; returns the new id.
async fn register_again(coordinator: &mut CoordinatorClient<Authed>, name: &str) -> Result<u64> {
    let r = coordinator
        .register(RegisterRequest {
            role: Role::Generator as i32,
            name: name.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| rpc("registering with the coordinator", client::describe(&e)))?;
    Ok(r.into_inner().worker_id)
}

/// Streams groups to the trainer and keeps each until it is acknowledged, so a broken
/// stream (a restarted trainer) resends what was not acknowledged.
struct Pusher {
    tx: tokio::sync::mpsc::Sender<RolloutGroup>,
    pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    broken: Arc<AtomicBool>,
}

impl Pusher {
    fn open(
        rt: &Handle,
        addr: &str,
        creds: &Credentials,
        pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    ) -> Result<Self> {
        let ch = rt
            .block_on(client::connect(addr, creds))
            .map_err(|e| rpc("trainer", e))?;
        let mut trainer = client::trainer(ch, creds);
        let (tx, rx) = tokio::sync::mpsc::channel::<RolloutGroup>(4);
        let broken = Arc::new(AtomicBool::new(false));
        let (p, b) = (pending.clone(), broken.clone());
        let addr_owned = addr.to_string();
        rt.spawn(async move {
            match trainer.push_rollouts(ReceiverStream::new(rx)).await {
                Ok(resp) => {
                    let mut acks = resp.into_inner();
                    while let Some(ack) = acks.next().await {
                        match ack {
                            Ok(a) => {
                                if let Ok(mut p) = p.lock() {
                                    p.remove(&a.seq);
                                }
                                if !a.accepted {
                                    tracing::warn!(seq = a.seq, reason = %a.reason, "the trainer refused a group");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(trainer = %addr_owned, "rollout stream broke: {}", client::describe(&e));
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(trainer = %addr_owned, "cannot open the rollout stream: {}", client::describe(&e)),
            }
            b.store(true, Ordering::SeqCst);
        });
        let this = Pusher {
            tx,
            pending,
            broken,
        };
        let resend: Vec<RolloutGroup> = this
            .pending
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        for g in resend {
            this.tx
                .blocking_send(g)
                .map_err(|_| rpc("trainer", "rollout stream closed"))?;
        }
        Ok(this)
    }
}

/// A registration with the coordinator: the client and what the reply said.
pub struct Joined {
    pub coordinator: CoordinatorClient<Authed>,
    pub worker_id: u64,
    pub policy_version: u64,
    pub trainer_address: String,
}

pub struct Worker {
    settings: Settings,
    model: Pretrained,
    rt: Handle,
    creds: Credentials,
    coordinator: CoordinatorClient<Authed>,
    beat: Arc<Beat>,
    pusher: Option<Pusher>,
    pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    reward_service: Option<RewardClient<Authed>>,
    reward_model: Option<tandem_model::RewardModel>,
    judge: Option<crate::reward::Judge>,
    next_seq: u64,
    /// The highest version the coordinator has published, as far as this worker saw.
    high_water: u64,
    /// Weight syncs failed in a row.
    sync_failures: u32,
    inbox: Option<Arc<Inbox>>,
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
        settings.reward.validate()?;
        let beat = Arc::new(Beat::default());
        beat.worker_id.store(worker_id, Ordering::SeqCst);
        beat.latest.store(latest_version, Ordering::SeqCst);
        if let Ok(mut t) = beat.trainer.lock() {
            *t = trainer_address;
        }
        let reward_service = match &settings.reward.service {
            Some(addr) => {
                let ch = rt
                    .block_on(client::connect(addr, &creds))
                    .map_err(|e| rpc("[reward] service", e))?;
                Some(client::reward(ch, &creds))
            }
            None => None,
        };
        let reward_model = match &settings.reward.model {
            Some(dir) => Some(tandem_model::RewardModel::load(dir, &model.model)?),
            None => None,
        };
        let judge = crate::reward::Judge::load(&settings.reward, &model.model)?;
        let inbox = match &settings.broadcast {
            Some(bs) => {
                let inbox = Inbox::new(bs.timeout, bs.collective.clone());
                let b = beat.clone();
                inbox
                    .spawn(bs.token.clone(), move || b.worker_id.load(Ordering::SeqCst))
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
            pusher: None,
            pending: Arc::new(Mutex::new(BTreeMap::new())),
            reward_service,
            reward_model,
            judge,
            next_seq: 1,
            high_water: latest_version,
            sync_failures: 0,
            inbox,
        };
        w.spawn_heartbeat();
        Ok(w)
    }

    fn spawn_heartbeat(&self) {
        let beat = self.beat.clone();
        let mut coord = self.coordinator.clone();
        let interval = self.settings.heartbeat_interval;
        let name = self.settings.name.clone();
        let inbox = self.inbox.clone();
        self.rt.spawn(async move {
            let mut failures = 0u32;
            while !beat.stop.load(Ordering::SeqCst) {
                tokio::time::sleep(interval).await;
                let req = HeartbeatRequest {
                    worker_id: beat.worker_id.load(Ordering::SeqCst),
                    policy_version: beat.held.load(Ordering::SeqCst),
                    generated_tokens: beat.tokens.swap(0, Ordering::SeqCst),
                    wait_seconds: beat.wait_us.swap(0, Ordering::SeqCst) as f64 / 1e6,
                    weight_sync_seconds: beat
                        .syncs
                        .lock()
                        .map(|mut s| std::mem::take(&mut *s))
                        .unwrap_or_default(),
                    weight_sync_bytes: beat.sync_bytes.swap(0, Ordering::SeqCst),
                    weight_sync_failures: beat.sync_failures.swap(0, Ordering::SeqCst),
                    broadcast: inbox.is_some(),
                    broadcast_address: String::new(),
                };
                match coord.heartbeat(req).await {
                    Ok(r) => {
                        failures = 0;
                        let r = r.into_inner();
                        if let Some(inbox) = &inbox {
                            inbox.set_group(r.group.clone());
                        }
                        // The published version; it only goes back when a trainer resumed.
                        beat.latest.store(r.policy_version, Ordering::SeqCst);
                        if let Ok(mut t) = beat.trainer.lock() {
                            *t = r.trainer_address;
                        }
                        if r.stop {
                            beat.stop.store(true, Ordering::SeqCst);
                        }
                        if !r.known {
                            tracing::warn!(
                                "the coordinator dropped this generator; registering again"
                            );
                            if let Ok(id) = register_again(&mut coord, &name).await {
                                beat.worker_id.store(id, Ordering::SeqCst);
                            }
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        tracing::warn!("heartbeat failed ({failures}): {}", client::describe(&e));
                        if failures >= 20 {
                            tracing::error!("the coordinator is unreachable; stopping");
                            beat.stop.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
    }

    fn trainer_address(&self) -> Result<String> {
        let t = self
            .beat
            .trainer
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        if t.is_empty() {
            return Err(rpc(
                "trainer",
                "no trainer has registered with the coordinator yet",
            ));
        }
        Ok(t)
    }

    /// Takes version `want` (or newer) from the broadcast when it arrives in time.
    fn take_broadcast(&mut self, want: u64) -> Result<bool> {
        let held = self.beat.held.load(Ordering::SeqCst);
        let Some(inbox) = self.inbox.clone().filter(|_| want > held) else {
            return Ok(false);
        };
        let Some((got, transfer_s)) = inbox.take(want) else {
            return Ok(false);
        };
        self.install(
            got.version,
            &[&got.bytes],
            &got.dtype,
            transfer_s,
            "broadcast",
        )?;
        // Broadcast after its publish: the coordinator has published this version even
        // if no reply has said so yet (not a version ahead of the run to undo).
        self.beat.latest.fetch_max(got.version, Ordering::SeqCst);
        self.high_water = self.high_water.max(got.version);
        inbox.recycle(got.bytes);
        Ok(true)
    }

    /// Assigns a version's bytes in place and records the sync for the heartbeat (the
    /// version held, bytes, and seconds: `before` spent getting them plus the assign).
    fn install(
        &mut self,
        version: u64,
        chunks: &[&[u8]],
        dtype: &str,
        before: f64,
        how: &str,
    ) -> Result<()> {
        let t0 = Instant::now();
        self.model.model.params().assign_chunks(chunks, dtype)?;
        let n: usize = chunks.iter().map(|c| c.len()).sum();
        self.beat.held.store(version, Ordering::SeqCst);
        self.beat.sync_bytes.fetch_add(n as u64, Ordering::SeqCst);
        let secs = before + t0.elapsed().as_secs_f64();
        if let Ok(mut s) = self.beat.syncs.lock() {
            s.push(secs);
        }
        tracing::info!(
            version,
            mib = n as f64 / (1 << 20) as f64,
            seconds = secs,
            "weights updated by {how}"
        );
        Ok(())
    }

    /// Fetches version `want` (or the newest) and assigns it in place.
    fn sync_weights(&mut self, want: u64) -> Result<()> {
        if self.take_broadcast(want)? {
            return Ok(());
        }
        let addr = self.trainer_address()?;
        let t0 = Instant::now();
        let creds = self.creds.clone();
        let timeout = self.settings.weight_sync_timeout;
        let fetched = self.rt.block_on(async {
            let fetch = async {
                let ch = client::connect(&addr, &creds)
                    .await
                    .map_err(|e| rpc("weights", e))?;
                let mut t = client::trainer(ch, &creds);
                let mut stream = t
                    .fetch_weights(FetchWeightsRequest { version: want })
                    .await
                    .map_err(|e| {
                        rpc(
                            &format!("fetching weights v{want} from the trainer at {addr}"),
                            client::describe(&e),
                        )
                    })?
                    .into_inner();
                let mut asm = Assembler::default();
                while let Some(b) = stream.message().await.map_err(|e| {
                    rpc(
                        &format!("weights stream from the trainer at {addr}"),
                        client::describe(&e),
                    )
                })? {
                    asm.push(b)
                        .map_err(|e| rpc(&format!("trainer at {addr}"), e))?;
                }
                asm.finish()
                    .map_err(|e| rpc(&format!("trainer at {addr}"), e))
            };
            tokio::time::timeout(timeout, fetch).await.map_err(|_| {
                rpc(
                    "weights",
                    format!(
                        "the fetch of v{want} from the trainer at {addr} stalled for {timeout:?}"
                    ),
                )
            })?
        })?;
        let (version, dtype, chunks) = fetched;
        let slices: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
        self.install(
            version,
            &slices,
            &dtype,
            t0.elapsed().as_secs_f64(),
            "fetch",
        )
    }

    /// Takes the published version (or `target`) when the weights held differ from it
    /// — newer in a running run, older after the trainer resumed from a checkpoint.
    fn maybe_sync(&mut self, target: Option<u64>) -> Result<()> {
        let want = target.unwrap_or_else(|| self.beat.latest.load(Ordering::SeqCst));
        let held = self.beat.held.load(Ordering::SeqCst);
        // Below the highest version ever published only after a rewind; a fetch may
        // also return a version the coordinator has not announced yet (held > want).
        let rewound = want < held && want < self.high_water;
        self.high_water = self.high_water.max(want);
        if want > held || rewound {
            match self.sync_weights(want) {
                Ok(()) => {
                    self.sync_failures = 0;
                    if rewound {
                        self.high_water = want;
                    }
                }
                // The trainer may be restarting: keep the weights held (their tokens
                // carry their true version) and try again shortly.
                Err(e) if self.sync_failures < 60 => {
                    self.sync_failures += 1;
                    self.beat.sync_failures.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!("weight sync failed ({}): {e}; retrying", self.sync_failures);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Runs until the coordinator says the run is over.
    pub fn run(mut self) -> Result<()> {
        while !self.beat.stop.load(Ordering::SeqCst) {
            self.maybe_sync(None)?;
            let worker_id = self.beat.worker_id.load(Ordering::SeqCst);
            let reply = self.rt.block_on(self.coordinator.lease(LeaseRequest {
                worker_id,
                max_groups: self.settings.generator.prompts_per_batch,
            }));
            let reply = match reply {
                Ok(r) => r.into_inner(),
                Err(e) if e.code() == tonic::Code::NotFound => {
                    std::thread::sleep(self.settings.heartbeat_interval);
                    continue;
                }
                Err(e) => return Err(rpc("leasing prompts", client::describe(&e))),
            };
            if reply.stop {
                break;
            }
            if reply.leases.is_empty() {
                let wait = Duration::from_millis(reply.retry_after_ms.clamp(5, 1000));
                std::thread::sleep(wait);
                self.beat
                    .wait_us
                    .fetch_add(wait.as_micros() as u64, Ordering::SeqCst);
                continue;
            }
            // Admitted under version v: generate with v.
            self.maybe_sync(Some(reply.policy_version))?;
            let groups = self.generate(&reply.leases, worker_id)?;
            for g in groups {
                self.push(g)?;
            }
        }
        self.drain();
        self.beat.stop.store(true, Ordering::SeqCst);
        if let Some(inbox) = &self.inbox {
            inbox.stop();
        }
        let worker_id = self.beat.worker_id.load(Ordering::SeqCst);
        let _ = self
            .rt
            .block_on(self.coordinator.leave(LeaveRequest { worker_id }));
        Ok(())
    }

    fn push(&mut self, mut g: RolloutGroup) -> Result<()> {
        g.seq = self.next_seq;
        self.next_seq += 1;
        if let Ok(mut p) = self.pending.lock() {
            p.insert(g.seq, g.clone());
        }
        for _attempt in 0..30 {
            if self.beat.stop.load(Ordering::SeqCst) {
                // The run is over: nothing will train this group.
                return Ok(());
            }
            let broken = self
                .pusher
                .as_ref()
                .is_none_or(|p| p.broken.load(Ordering::SeqCst));
            if broken {
                self.pusher = None;
                match self
                    .trainer_address()
                    .and_then(|a| Pusher::open(&self.rt, &a, &self.creds, self.pending.clone()))
                {
                    Ok(p) => {
                        // Opening resent every pending group, this one included.
                        self.pusher = Some(p);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!("cannot reach the trainer: {e}; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            if let Some(p) = &self.pusher {
                if p.tx.blocking_send(g.clone()).is_ok() {
                    return Ok(());
                }
                p.broken.store(true, Ordering::SeqCst);
            }
        }
        Err(rpc("trainer", "could not deliver rollouts for 30 attempts"))
    }

    /// Waits (up to 30 s) until every pushed group is acknowledged.
    fn drain(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            let left = self.pending.lock().map(|p| p.len()).unwrap_or(0);
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pusher = None;
    }

    /// Samples `rows` in one batch; each token is tagged with the version held when it
    /// was sampled (in-flight swaps change it mid-sequence).
    fn sample(
        &mut self,
        rows: Vec<Vec<u32>>,
        params: SamplingParams,
    ) -> Result<(Vec<tandem_model::Completion>, Vec<Vec<u64>>)> {
        let in_flight = self.settings.generator.weight_update == WeightUpdate::InFlight;
        let mut versions: Vec<Vec<u64>> = vec![Vec::new(); rows.len()];
        let mut session = Session::new(&self.model.model, rows, params)?;
        loop {
            let running = session.step(&self.model.model)?;
            let held = self.beat.held.load(Ordering::SeqCst);
            for (v, c) in versions.iter_mut().zip(session.completions()) {
                let new = c.tokens.len() - v.len();
                v.extend(std::iter::repeat_n(held, new));
            }
            if !running {
                break;
            }
            if in_flight {
                self.maybe_sync(None)?;
            }
        }
        Ok((session.into_completions(), versions))
    }

    /// Samples every group of `leases` in one batch and scores it.
    fn generate(&mut self, leases: &[PromptLease], worker_id: u64) -> Result<Vec<RolloutGroup>> {
        let k = self.settings.group_size as usize;
        let tok = &self.model.tokenizer;
        let mut prompts = Vec::with_capacity(leases.len());
        for l in leases {
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
            prompts.push(prompt_ids(
                tok,
                input,
                self.settings.chat,
                self.settings.system.as_deref(),
            )?);
        }
        let g = &self.settings.generator;
        let params = SamplingParams {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            max_new_tokens: g.max_new_tokens,
            stop_token_ids: self.model.stop_token_ids(),
            seed: self.settings.seed ^ leases[0].lease_id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), k))
            .collect();
        let (completions, versions) = if g.mock_generate_ms > 0 {
            // Benchmarks of the control plane: wait instead of sampling.
            std::thread::sleep(Duration::from_millis(g.mock_generate_ms));
            let held = self.beat.held.load(Ordering::SeqCst);
            let n = g.max_new_tokens;
            let c: Vec<tandem_model::Completion> = rows
                .iter()
                .map(|r| tandem_model::Completion {
                    tokens: vec![r[r.len() - 1]; n],
                    logprobs: vec![-1.0; n],
                    finish_reason: Some(tandem_model::FinishReason::Length),
                })
                .collect();
            (c, vec![vec![held; n]; rows.len()])
        } else {
            self.sample(rows, params)?
        };
        let tokens: usize = completions.iter().map(|c| c.tokens.len()).sum();
        self.beat.tokens.fetch_add(tokens as u64, Ordering::SeqCst);
        let mut groups = Vec::with_capacity(leases.len());
        for (i, l) in leases.iter().enumerate() {
            let rows = &completions[i * k..(i + 1) * k];
            let texts: Vec<String> = rows
                .iter()
                .map(|c| self.model.tokenizer.decode(&c.tokens, true))
                .collect::<std::result::Result<_, _>>()?;
            let answer = (!l.answer.is_empty()).then_some(l.answer.as_str());
            let mut rewards: Vec<f64> = texts
                .iter()
                .map(|t| self.settings.reward.score(t, answer))
                .collect();
            let prompt = if l.messages.is_empty() {
                l.text.clone()
            } else {
                l.messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            if let Some(judge) = &self.judge {
                for (r, s) in rewards
                    .iter_mut()
                    .zip(judge.score(&prompt, &texts, answer)?)
                {
                    *r += self.settings.reward.judge_weight * s;
                }
            }
            if let Some(svc) = &mut self.reward_service {
                let scored = self
                    .rt
                    .block_on(svc.score(ScoreRequest {
                        prompt: prompt.clone(),
                        answer: l.answer.clone(),
                        completions: texts.clone(),
                    }))
                    .map_err(|e| rpc("[reward] service", client::describe(&e)))?
                    .into_inner()
                    .rewards;
                if scored.len() != texts.len() || scored.iter().any(|r| !r.is_finite()) {
                    return Err(rpc(
                        "[reward] service",
                        format!(
                            "returned {} rewards for {} completions (all must be finite)",
                            scored.len(),
                            texts.len()
                        ),
                    ));
                }
                for (r, s) in rewards.iter_mut().zip(scored) {
                    *r += self.settings.reward.service_weight * s;
                }
            }
            if let Some(rm) = &self.reward_model {
                let ids: Vec<Vec<u32>> = rows.iter().map(|c| c.tokens.clone()).collect();
                for (r, s) in rewards.iter_mut().zip(rm.score(&prompts[i], &ids)?) {
                    *r += self.settings.reward.model_weight * s;
                }
            }
            groups.push(RolloutGroup {
                seq: 0,
                lease_id: l.lease_id,
                prompt_index: l.prompt_index,
                worker_id,
                prompt_ids: prompts[i].clone(),
                completions: rows
                    .iter()
                    .zip(&versions[i * k..(i + 1) * k])
                    .zip(rewards)
                    .map(|((c, v), reward)| Completion {
                        completion_ids: c.tokens.clone(),
                        behavior_logprobs: c.logprobs.clone(),
                        versions: v.clone(),
                        reward,
                        finish_reason: match c.finish_reason {
                            Some(tandem_model::FinishReason::Stop) => "stop".into(),
                            _ => "length".into(),
                        },
                    })
                    .collect(),
            });
        }
        Ok(groups)
    }
}
