//! The generator: a loop over components that each own their state. The `Sampler`
//! (the engine driver, `sampler.rs`) starts leased groups and steps the engine;
//! `Leasing` (`leases.rs`) asks the coordinator for groups ahead of it; `WeightSync`
//! (`weight_sync.rs`) takes new versions between batches, or between decode steps
//! (`in_flight`); finished groups go to the scorer stage (`scorer.rs`: a thread of its
//! own that scores, builds rollouts and pushes them through its `Outbox`); the
//! heartbeat task reports and learns through the `Beat` (`heartbeat.rs`). The loop
//! hands finished groups over and never waits for their scores or their pushes.

use std::sync::Arc;
use std::time::Duration;

use tandem_env::EnvConfig;
use tandem_model::Pretrained;
use tandem_proto::auth::Credentials;
use tandem_proto::client::Authed;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::PromptLease;
use tokio::runtime::Handle;

use crate::config::{GeneratorConfig, WeightUpdate};
use crate::error::Result;
use crate::heartbeat::{Beat, Heartbeat};
use crate::judge::Judge;
use crate::leases::{LeaseClient, Leased, Leasing};
use crate::outbox::Outbox;
use crate::reward::RewardConfig;
use crate::reward_service::RewardService;
use crate::sampler::{Sampler, StepCount};
use crate::scorer::{Job, Scorer, ScorerHandle};
use crate::weight_sync::{Takes, WeightSync};

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

/// A registration with the coordinator: the client and what the reply said.
pub struct Registration {
    pub coordinator: CoordinatorClient<Authed>,
    pub worker_id: u64,
    pub policy_version: u64,
    pub trainer_address: String,
}

/// A registered generator, its components built.
pub struct Worker {
    sampler: Sampler,
    leasing: Leasing,
    weights: WeightSync,
    /// The scorer stage, started by [`Worker::run`].
    scorer: Option<Scorer>,
    beat: Arc<Beat>,
    /// `[generator] weight_update = "in_flight"`.
    in_flight: bool,
    /// `[generator] prompts_per_batch`: groups kept waiting ahead of the engine.
    ahead: usize,
}

impl Worker {
    /// A registered worker, its components built and tried (the reward service
    /// connected, the judge and reward model loaded, the environment set up); starts
    /// its heartbeat task on `rt`.
    pub fn new(
        settings: Settings,
        model: Pretrained,
        rt: Handle,
        creds: Credentials,
        registration: Registration,
    ) -> Result<Self> {
        let Registration {
            coordinator,
            worker_id,
            policy_version,
            trainer_address,
        } = registration;
        settings.generator.validate()?;
        // Every weight 0 is the run's choice (checked with its [algorithm]: pure
        // distillation); the generator then scores 0.
        settings.reward.validate_for(true)?;
        let beat = Arc::new(Beat::new(worker_id, policy_version, trainer_address));
        let leases = LeaseClient::new(coordinator.clone(), rt.clone(), beat.clone());
        let steps = StepCount::default();
        let scorer = Scorer {
            reward: settings.reward.clone(),
            env_weight: settings.env.reward_weight,
            tokenizer: model.tokenizer.clone(),
            judge: Judge::load(&settings.reward, &model.model)?,
            reward_model: match &settings.reward.model {
                Some(dir) => Some(tandem_model::RewardModel::load(dir, &model.model)?),
                None => None,
            },
            service: RewardService::connect(&settings.reward, creds.tls(), rt.clone())?,
            leases: leases.clone(),
            outbox: Outbox::new(rt.clone(), creds.clone(), beat.clone()),
            creds: creds.clone(),
            beat: beat.clone(),
            engine_steps: steps.clone(),
            max_retries: settings.env.max_retries,
            group_size: settings.group_size,
            window: Default::default(),
        };
        // Versions carry the model's trainable parameters: a LoRA adapter's A and B for
        // its base, else every parameter.
        let takes = Takes::of(&model);
        let sampler = Sampler::new(model, &settings, &rt, &creds, beat.clone(), steps)?;
        let weights = WeightSync::new(
            rt.clone(),
            creds.clone(),
            beat.clone(),
            settings.broadcast.as_ref(),
            takes,
            settings.weight_sync_timeout,
        )?;
        Heartbeat {
            beat: beat.clone(),
            coordinator,
            creds,
            interval: settings.heartbeat_interval,
            name: settings.name.clone(),
            inbox: weights.inbox(),
        }
        .spawn(&rt);
        // SIGINT / SIGTERM: the loop ends, and leaving gives every open lease back.
        let stop = beat.clone();
        rt.spawn(async move {
            tandem_proto::shutdown::requested().await;
            tracing::info!("stopping: the open leases go back to the coordinator");
            stop.stop();
        });
        Ok(Worker {
            sampler,
            leasing: Leasing::new(leases, settings.heartbeat_interval),
            weights,
            scorer: Some(scorer),
            beat,
            in_flight: settings.generator.weight_update == WeightUpdate::InFlight,
            ahead: settings.generator.prompts_per_batch as usize,
        })
    }

    /// Runs until the coordinator says the run is over (or SIGINT / SIGTERM asks it to
    /// stop): leases groups ahead of the engine, steps it, and hands each group to the scorer stage as its last sample
    /// finishes. Then the scorer drops what it still holds (the run is over), the
    /// pushed groups' acknowledgements are awaited, and the worker leaves (the
    /// coordinator re-issues the prompts of its open leases at once).
    pub fn run(mut self) -> Result<()> {
        let mut scorer = match self.scorer.take() {
            Some(s) => s.spawn()?,
            None => return Ok(()),
        };
        let sampled = self.sample(&mut scorer);
        self.sampler.report_prefill(true);
        let scored = scorer.finish();
        self.beat.stop();
        self.weights.stop();
        self.leasing.leave();
        sampled.and(scored)
    }

    /// The loop: weight syncs, leases, the engine's steps; every finished group goes to
    /// `scorer`, whose failure ends the loop with its error.
    fn sample(&mut self, scorer: &mut ScorerHandle) -> Result<()> {
        while !self.beat.stopped() {
            scorer.check()?;
            let idle = self.sampler.is_idle();
            if self.in_flight || idle {
                self.weights.maybe_sync(None, self.sampler.model())?;
            }
            if let Some((v, leases)) = self.leasing.take_deferred(idle) {
                self.weights.maybe_sync(Some(v), self.sampler.model())?;
                let jobs = self.sampler.start(leases)?;
                send(scorer, jobs)?;
            }
            match self.leasing.poll(self.sampler.waiting(), self.ahead)? {
                Some(Leased::Stop) => break,
                Some(Leased::Granted { version, leases }) => {
                    let jobs = self.admit(version, leases)?;
                    send(scorer, jobs)?;
                }
                Some(Leased::Wait(_)) | None => {}
            }
            send(scorer, self.sampler.poll()?)?;
            // Groups whose scoring failed run again.
            let again = scorer.again();
            if !again.is_empty() {
                let jobs = self.sampler.restart(again)?;
                send(scorer, jobs)?;
            }
            if self.sampler.is_idle() {
                self.sampler.idle_wait(self.leasing.until_next());
                continue;
            }
            send(scorer, self.sampler.step()?)?;
            if self.in_flight {
                // A new version applies to every running row from the next step on.
                self.weights.maybe_sync(None, self.sampler.model())?;
            }
        }
        Ok(())
    }

    /// Starts leases admitted under `version`, with that version (or newer) held; with
    /// `between_batches` and rows of an older version running, they wait until the
    /// engine drains.
    fn admit(&mut self, version: u64, leases: Vec<PromptLease>) -> Result<Vec<Job>> {
        if self.in_flight || self.sampler.is_idle() || version <= self.beat.held() {
            self.weights
                .maybe_sync(Some(version), self.sampler.model())?;
            self.sampler.start(leases)
        } else {
            self.leasing.defer(version, leases);
            Ok(Vec::new())
        }
    }
}

/// Hands `jobs` to the scorer stage (never waits).
fn send(scorer: &mut ScorerHandle, jobs: Vec<Job>) -> Result<()> {
    for j in jobs {
        scorer.send(j)?;
    }
    Ok(())
}
