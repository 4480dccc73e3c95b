//! The trainer process: load the policy (or resume a checkpoint), serve rollouts in and
//! weights out, and run the learner loop — each step published to the coordinator, then
//! broadcast and checkpointed — until the run's last step. The binary joins the
//! coordinator and hands over the settings it received; everything after is here.

pub mod buffer;
pub mod checkpoint;
pub mod evaluate;
pub mod ingest;
pub mod learner;
pub mod publisher;
pub mod service;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_model::ScalarHead;
use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::health::{Phase, Readiness};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{
    HeartbeatRequest, LeaveRequest, PublishVersionRequest, RegisterReply, RegisterRequest, Role,
};
use tandem_weights::{BroadcastPlane, Snapshot};

use crate::config::{AlgorithmConfig, OptimizerConfig, TrainerConfig};
use crate::error::{invalid, Context, Result};
use crate::node::buffer::Buffer;
use crate::node::evaluate::Evaluations;
use crate::node::ingest::Limits;
use crate::node::learner::{Learner, Plan, StepReport};
use crate::node::publisher::Pusher;
use crate::node::service::{Shared, TrainerService};
use crate::optimizer::Optimizer;
use crate::rl::advantage::Estimator;

/// What the trainer needs of the run's config.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The run's starting model (a folder, a .gguf file, a fetchable name or a preset).
    pub model: String,
    pub run_dir: PathBuf,
    pub steps: u64,
    pub group_size: u32,
    pub batch_groups: u64,
    pub max_staleness: u64,
    /// `[run] filter_zero_std`: dynamic sampling drops groups whose rewards are all equal.
    pub filter_zero_std: bool,
    /// The longest completion a generator samples (`[generator] max_new_tokens`).
    pub max_completion_tokens: usize,
    /// Samples one episode may yield (`[env] agent`: one per turn; otherwise 1).
    pub samples_per_episode: usize,
    /// `[reward] bound`: a group with a reward r of |r| above it is refused.
    pub reward_bound: f64,
    pub heartbeat_interval: Duration,
    pub trainer: TrainerConfig,
    pub algorithm: AlgorithmConfig,
    pub optimizer: OptimizerConfig,
}

/// Where the trainer listens and what it was asked on its command line.
pub struct Endpoints {
    /// The bound gRPC listener rollouts and fetches arrive on.
    pub listener: tokio::net::TcpListener,
    /// The `--listen` address it was bound from (the broadcast listener binds beside it).
    pub listen: String,
    /// The address generators dial.
    pub advertise: String,
    /// `--broadcast-listen`.
    pub broadcast_listen: Option<String>,
    /// Continue from the newest checkpoint in the run's folder.
    pub resume: bool,
}

/// The trainer after it registered: its coordinator client and the reply.
pub struct Joined {
    pub coordinator: CoordinatorClient<Authed>,
    pub reply: RegisterReply,
}

/// Runs the trainer until the run's last step is published and the final model saved.
pub fn run(
    s: &Settings,
    ends: Endpoints,
    joined: Joined,
    creds: &Credentials,
    rt: &tokio::runtime::Runtime,
    readiness: &Readiness,
    mut evals: Option<Evaluations>,
) -> Result<()> {
    let Joined {
        coordinator: mut coord,
        reply,
    } = joined;
    let worker_id = Arc::new(AtomicU64::new(reply.worker_id));
    let run_dir = s.run_dir.clone();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let resume_from = if ends.resume {
        Some(checkpoint::latest(&run_dir)?.ok_or_else(|| {
            invalid(format!(
                "--resume: no checkpoint in {}",
                run_dir.join("checkpoints").display()
            ))
        })?)
    } else {
        None
    };
    let start_path = match &resume_from {
        Some(d) => d
            .to_str()
            .ok_or_else(|| invalid(format!("{} is not UTF-8", d.display())))?
            .to_string(),
        None => s.model.clone(),
    };
    let policy = tandem_model::load_model(&start_path)?;
    // The KL reference is always the run's starting model.
    let reference = if s.algorithm.kl_coef > 0.0 {
        Some(tandem_model::load_model(&s.model)?.model)
    } else {
        None
    };
    let teacher = match &s.algorithm.teacher {
        Some(path) => Some(crate::rl::distill::load_teacher(path, &policy)?.model),
        None => None,
    };
    let critic = if s.algorithm.advantage == Estimator::Gae {
        let dir = Path::new(&start_path);
        Some(ScalarHead::load_or_zeros(
            dir,
            tandem_model::VALUE_HEAD_FILE,
            &policy.model,
        )?)
    } else {
        None
    };
    let extra = critic.as_ref().map(|c| c.named_vars()).unwrap_or_default();
    let mut opt = Optimizer::new(&s.optimizer, &policy.model, extra)?;
    let (start_step, start_version, start_buffer) = match &resume_from {
        Some(dir) => {
            opt.load(dir)
                .with_context(|| format!("optimizer state in {}", dir.display()))?;
            let st = checkpoint::load_state(dir)?;
            tracing::info!(checkpoint = %dir.display(), step = st.step, version = st.version, buffered = st.buffer.len(), "resuming");
            (st.step, st.version, st.buffer)
        }
        None => (0, 0, Buffer::default()),
    };
    if resume_from.is_some() {
        // Steps after the checkpoint are done again; their old lines go.
        truncate_metrics(&run_dir.join("metrics.jsonl"), start_step)?;
        truncate_metrics(&run_dir.join("eval.jsonl"), start_step)?;
    }
    let kept: Vec<u64> = start_buffer.groups().map(|g| g.lease_id).collect();
    let mc = policy.model.config();
    let shared = Arc::new(Shared::new(
        start_buffer,
        s.trainer.buffer_capacity,
        Snapshot::of(&policy.model, start_version)?,
        Limits {
            vocab_size: mc.vocab_size,
            group_size: s.group_size as usize,
            samples_per_episode: s.samples_per_episode,
            max_completion_tokens: s.max_completion_tokens,
            max_context_tokens: mc.max_position_embeddings,
            filter_zero_std: s.filter_zero_std,
            reward_bound: s.reward_bound,
        },
        s.trainer.bucket_mib << 20,
    ));
    // Stale drops are discarded at the coordinator as they happen (not at the next
    // publish): admission then grants their replacements while the learner waits.
    let (discard_tx, mut discard_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
    let _ = shared.discard.set(discard_tx);
    let discard_coord = coord.clone();
    rt.spawn(async move {
        while let Some(lease_ids) = discard_rx.recv().await {
            let req = tandem_proto::v1::DiscardRequest {
                lease_ids,
                reason: "stale".into(),
            };
            let r = tandem_proto::retry::retry("discarding stale groups", || {
                let (mut c, req) = (discard_coord.clone(), req.clone());
                async move { c.discard(client::unary(req)).await }
            })
            .await;
            if let Err(e) = r {
                tracing::warn!("{}", client::describe(&e));
            }
        }
    });
    let svc = TrainerService {
        shared: shared.clone(),
        coordinator: coord.clone(),
        run_token: creds.token().to_string(),
    };
    let server_creds = creds.clone();
    rt.spawn(async move {
        let r = crate::node::service::serve(svc, ends.listener, &server_creds).await;
        if let Err(e) = r {
            tracing::error!("trainer gRPC server stopped: {e}");
        }
    });
    let pusher = broadcast_pusher(
        s,
        &ends.listen,
        &ends.advertise,
        ends.broadcast_listen.as_deref(),
        creds,
        rt.handle(),
        &coord,
    )?;
    let broadcast_address = pusher
        .as_ref()
        .map(|p| p.advertise.clone())
        .unwrap_or_default();
    spawn_heartbeat(
        rt,
        coord.clone(),
        shared.clone(),
        worker_id.clone(),
        ends.advertise.clone(),
        broadcast_address,
        Duration::from_millis(reply.heartbeat_interval_ms.max(1)),
    );
    tracing::info!(address = %ends.advertise, steps = s.steps, "trainer serving");
    readiness.set(Phase::Ready);
    if resume_from.is_some() {
        let req = PublishVersionRequest {
            version: start_version,
            step: start_step,
            resumed: true,
            buffered_leases: kept,
            buffer_groups: shared.buffer_len() as u64,
            ..Default::default()
        };
        rt.block_on(publish(&coord, req)).map_err(|e| {
            invalid(format!(
                "announcing the resumed version {start_version}: {}",
                client::describe(&e)
            ))
        })?;
    }
    let mut learner = Learner {
        policy,
        reference,
        teacher,
        critic,
        opt,
        algorithm: s.algorithm.clone(),
        optimizer: s.optimizer.clone(),
        plan: Plan {
            steps: s.steps,
            batch_groups: s.batch_groups as usize,
            max_staleness: s.max_staleness,
            run_dir: run_dir.clone(),
            dump_batches: s.trainer.dump_batches,
            mock_train_ms: s.trainer.mock_train_ms,
            compute: s.trainer.compute(),
        },
        step: start_step,
        version: start_version,
    };
    if let (Some(e), 0) = (&mut evals, start_step) {
        e.run(&learner.policy, 0, learner.version, &run_dir)
            .context("the held-out evaluation before the first step")?;
    }
    // What no resume can go back past (sent with each publish: the coordinator forgets
    // the leases trained before it).
    let mut resumable_from = checkpoint::resumable_from(&run_dir);
    while learner.step < s.steps {
        let mut report = learner.step_once(&shared)?;
        let last = learner.step == s.steps;
        if let Some(e) = evals.as_mut().filter(|e| e.due(report.step, last)) {
            report.eval = e
                .run(&learner.policy, report.step, report.version, &run_dir)
                .with_context(|| format!("the held-out evaluation after step {}", report.step))?;
        }
        learner.log(&report)?;
        if last {
            finish(&learner, &shared, &run_dir)?;
        }
        let dropped = dropped_since_last_publish(&shared, &report, &run_dir)?;
        tracing::info!(
            step = report.step,
            reward = format!("{:.3}", report.metrics.reward_mean),
            loss = format!("{:.4}", report.metrics.loss),
            staleness_max = report.staleness.iter().max().copied().unwrap_or(0),
            seconds = format!("{:.2}", report.step_seconds),
            "step"
        );
        let published = rt
            .block_on(publish(
                &coord,
                PublishVersionRequest {
                    version: report.version,
                    step: report.step,
                    metrics: report.metric_map(),
                    staleness: report.staleness.clone(),
                    dropped,
                    buffer_groups: shared.buffer_len() as u64,
                    wait_seconds: report.wait_seconds,
                    finished: last,
                    // Consumed: trained, or dropped as stale (either way done with; a rewind
                    // past this step re-issues them, one before it does not).
                    trained_leases: report
                        .trained_leases
                        .iter()
                        .copied()
                        .chain(report.stale_dropped.iter().map(|g| g.lease_id))
                        .collect(),
                    resumable_from,
                    ..Default::default()
                },
            ))
            .map_err(|e| {
                invalid(format!(
                    "publishing version {} to the coordinator: {}",
                    report.version,
                    client::describe(&e)
                ))
            })?;
        if let (Some(p), Some(group), false) = (&pusher, published.into_inner().group, last) {
            if let Ok(w) = shared.weights.read() {
                p.offer(group, w.clone());
            }
        }
        // After the publish, so the coordinator knows what the checkpoint has trained.
        let every = s.trainer.checkpoint_every;
        if !last && every > 0 && learner.step.is_multiple_of(every) {
            let buffer = shared.buffer.lock().map(|b| b.clone()).unwrap_or_default();
            let dir = checkpoint::save(&run_dir, &learner, &buffer, s.trainer.keep_checkpoints)?;
            tracing::info!(checkpoint = %dir.display(), "checkpoint written");
            resumable_from = checkpoint::resumable_from(&run_dir);
        }
    }
    tracing::info!(final_model = %run_dir.join("final").display(), "training finished");
    readiness.set(Phase::Stopping);
    // Let generators finish their last acks, then leave.
    std::thread::sleep(Duration::from_millis(300));
    let _ = rt.block_on(coord.leave(LeaveRequest {
        worker_id: worker_id.load(Ordering::SeqCst),
    }));
    Ok(())
}

/// Publishes a version, through a coordinator restart (a repeat of a publish that was
/// applied changes nothing, so a retry is safe).
async fn publish(
    coord: &CoordinatorClient<Authed>,
    req: PublishVersionRequest,
) -> std::result::Result<tonic::Response<tandem_proto::v1::PublishVersionReply>, tonic::Status> {
    tandem_proto::retry::retry("publishing a version", || {
        let (mut c, req) = (coord.clone(), req.clone());
        async move { c.publish_version(client::unary(req)).await }
    })
    .await
}

/// After the last step: closes ingestion and writes `final/` and `trainer-summary.json`
/// (with what was left in the buffer).
fn finish(learner: &Learner, shared: &Shared, run_dir: &Path) -> Result<()> {
    shared.close(Duration::from_secs(10));
    let out = run_dir.join("final");
    tandem_model::save_hf(&learner.policy.model, &learner.policy.tokenizer, &out)
        .with_context(|| format!("writing {}", out.display()))?;
    if let Some(c) = &learner.critic {
        c.save(&out, tandem_model::VALUE_HEAD_FILE)?;
    }
    let left: Vec<String> = shared
        .buffer
        .lock()
        .map(|b| b.groups().map(|g| g.key()).collect())
        .unwrap_or_default();
    let summary = serde_json::json!({"steps": learner.step, "version": learner.version, "groups_left_in_buffer": left});
    tandem_model::write_atomic(&run_dir.join("trainer-summary.json"), summary.to_string())?;
    Ok(())
}

/// Groups refused since the last publish by reason, with the step's stale drops added
/// (and their keys appended to `RUN_DIR/stale-groups.txt`, across trainer restarts).
fn dropped_since_last_publish(
    shared: &Shared,
    report: &StepReport,
    run_dir: &Path,
) -> Result<HashMap<String, u64>> {
    let dropped = shared
        .dropped
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default();
    let mut dropped: HashMap<String, u64> = dropped.into_iter().collect();
    if !report.stale_dropped.is_empty() {
        *dropped.entry("stale".into()).or_default() += report.stale_dropped.len() as u64;
        let keys: String = report
            .stale_dropped
            .iter()
            .map(|g| format!("{}\n", g.key()))
            .collect();
        let path = run_dir.join("stale-groups.txt");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        std::io::Write::write_all(&mut f, keys.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dropped)
}

/// Heartbeats keep the trainer a member; a dropped trainer registers again.
fn spawn_heartbeat(
    rt: &tokio::runtime::Runtime,
    mut c: CoordinatorClient<Authed>,
    shared: Arc<Shared>,
    id: Arc<AtomicU64>,
    advertise: String,
    broadcast_address: String,
    interval: Duration,
) {
    rt.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let req = HeartbeatRequest {
                worker_id: id.load(Ordering::SeqCst),
                policy_version: shared.version.load(Ordering::SeqCst),
                broadcast_address: broadcast_address.clone(),
                ..Default::default()
            };
            match c.heartbeat(client::unary(req)).await {
                Ok(r) if !r.get_ref().known => {
                    let again = c
                        .register(client::unary(RegisterRequest {
                            role: Role::Trainer as i32,
                            name: "trainer".into(),
                            address: advertise.clone(),
                        }))
                        .await;
                    if let Ok(r) = again {
                        id.store(r.get_ref().worker_id, Ordering::SeqCst);
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("heartbeat failed: {}", client::describe(&e)),
            }
        }
    });
}

/// The weight-broadcast listener and pusher, with `[trainer] broadcast = "tcp"|"nccl"`.
fn broadcast_pusher(
    s: &Settings,
    listen: &str,
    advertise: &str,
    broadcast_listen: Option<&str>,
    creds: &Credentials,
    rt: &tokio::runtime::Handle,
    coord: &CoordinatorClient<Authed>,
) -> Result<Option<Pusher>> {
    let plane = s.trainer.broadcast;
    if plane == BroadcastPlane::Off {
        return Ok(None);
    }
    if creds.tls().server().is_some() {
        tracing::warn!(
            "[trainer] broadcast = {plane:?} is plaintext and this run uses TLS: generators fetch weights over gRPC (TLS) instead",
        );
        return Ok(None);
    }
    let (bind, host) = publisher::addresses(listen, advertise, broadcast_listen)?;
    let timeout = Duration::from_secs_f64(s.trainer.broadcast_timeout_s);
    let p = Pusher::start(
        &bind,
        &host,
        // Only generators join: with split roles, theirs is the generator token; each
        // also shows its session token, made with the run's.
        tandem_weights::broadcast::Access {
            token: creds.generator_token().unwrap_or(creds.token()).to_string(),
            run_token: creds.token().to_string(),
        },
        publisher::Settings {
            bucket_bytes: s.trainer.bucket_mib << 20,
            // Members learn a new epoch from a heartbeat, then connect.
            join_wait: (s.heartbeat_interval * 4)
                .max(Duration::from_secs(1))
                .min(timeout),
            timeout,
            collective: tandem_weights::plane::collective_backend(plane, true)?,
        },
        rt.clone(),
        coord.clone(),
    )
    .context("--broadcast-listen")?;
    tracing::info!(address = %p.advertise, "weight broadcast listening");
    Ok(Some(p))
}

/// Keeps the lines of `metrics.jsonl` up to step `step`.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    tandem_model::write_atomic(
        path,
        kept.join("\n") + if kept.is_empty() { "" } else { "\n" },
    )?;
    Ok(())
}
