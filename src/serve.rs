//! `tandem coordinator | trainer | generator`: one service per process. Workers need
//! only the coordinator's address (and the token); they receive the run's config
//! from it when they register.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::v1::{
    HeartbeatRequest, LeaveRequest, PublishVersionRequest, RegisterRequest, Role,
};
use tandem_trainer::advantage::Estimator;
use tandem_trainer::buffer::Buffer;
use tandem_trainer::checkpoint;
use tandem_trainer::config::BroadcastPlane;
use tandem_trainer::ingest::Limits;
use tandem_trainer::learner::{self, Learner, Plan};
use tandem_trainer::service::{Shared, TrainerService};
use tandem_trainer::step::Optimizer;
use tandem_trainer::value::ValueHead;

use crate::health::{self, Phase, Readiness};
use crate::run_config::RunConfig;
use crate::security::SecurityArgs;
use crate::weight_broadcast;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(Args)]
pub struct CoordinatorArgs {
    /// The run's config file.
    #[arg(long)]
    config: PathBuf,
    /// Config overrides, `section.key=value` (repeatable).
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Write {"grpc": ADDR, "http": ADDR} here once listening.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    #[command(flatten)]
    security: SecurityArgs,
}

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let cfg = RunConfig::read(&a.config, &a.overrides)?;
    let creds = a
        .security
        .credentials(cfg.run.token.as_deref(), Some(&cfg.tls))?;
    let dataset = tandem_coordinator::dataset::Dataset::load(&cfg.data)?;
    let settings = tandem_coordinator::service::Settings {
        run: cfg.run.clone(),
        coordinator: cfg.coordinator.clone(),
        // Workers get the run's config, not this host's secrets and file paths.
        config_toml: RunConfig {
            tls: Default::default(),
            run: tandem_coordinator::config::RunSection {
                token: None,
                ..cfg.run.clone()
            },
            ..cfg.clone()
        }
        .to_toml()?,
    };
    let rt = runtime()?;
    rt.block_on(async {
        let running = tandem_coordinator::server::start(settings, dataset, &creds).await?;
        tracing::info!(grpc = %running.grpc, http = %running.http, "coordinator serving");
        if let Some(path) = &a.addr_file {
            write_atomic(path, &serde_json::json!({"grpc": running.grpc.to_string(), "http": running.http.to_string()}).to_string())?;
        }
        running.wait_finished().await;
        let out = Path::new(&cfg.run.run_dir).join("coordinator-status.json");
        std::fs::create_dir_all(&cfg.run.run_dir).ok();
        write_atomic(&out, &serde_json::to_string_pretty(&running.status_json())?)?;
        tracing::info!(status = %out.display(), "run finished; coordinator exits");
        Ok::<_, anyhow::Error>(())
    })
}

pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))
}

/// Connects to the coordinator and registers; returns the client, the reply and the
/// parsed config.
async fn join(
    addr: &str,
    creds: &Credentials,
    role: Role,
    name: &str,
    address: &str,
) -> Result<(
    tandem_proto::v1::coordinator_client::CoordinatorClient<client::Authed>,
    tandem_proto::v1::RegisterReply,
    RunConfig,
)> {
    let ch = client::connect(addr, creds)
        .await
        .map_err(|e| anyhow!("coordinator: {e}"))?;
    let mut coord = client::coordinator(ch, creds);
    let reply = coord
        .register(RegisterRequest {
            role: role as i32,
            name: name.to_string(),
            address: address.to_string(),
        })
        .await
        .map_err(|e| {
            anyhow!(
                "registering with the coordinator at {addr}: {}",
                client::describe(&e)
            )
        })?
        .into_inner();
    let cfg =
        RunConfig::parse(&reply.config_toml, &[]).context("the config the coordinator sent")?;
    Ok((coord, reply, cfg))
}

#[derive(Args)]
pub struct TrainerArgs {
    /// The coordinator's gRPC address.
    #[arg(long)]
    coordinator: String,
    /// Where this trainer listens (port 0 = any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The address generators should use (default: the bound address).
    #[arg(long)]
    advertise: Option<String>,
    /// Continue from the newest checkpoint in the run's folder (model, optimizer, step,
    /// version, buffer); the coordinator re-issues the work done since.
    #[arg(long)]
    resume: bool,
    /// Serve /healthz and /readyz here (for Kubernetes probes), e.g. 0.0.0.0:8080.
    #[arg(long)]
    http: Option<String>,
    /// Where the weight-broadcast listener binds with `[trainer] broadcast = "tcp"`
    /// (default: --listen's host, any free port; generators dial --advertise's host).
    #[arg(long)]
    broadcast_listen: Option<String>,
    #[command(flatten)]
    security: SecurityArgs,
}

pub fn trainer(a: TrainerArgs) -> Result<()> {
    let rt = runtime()?;
    let readiness = Readiness::default();
    if let Some(addr) = &a.http {
        health::serve(&rt, addr, readiness.clone())?;
    }
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&a.listen))
        .with_context(|| format!("--listen: cannot listen on {}", a.listen))?;
    let bound = listener.local_addr()?.to_string();
    let advertise = a.advertise.clone().unwrap_or(bound);
    let creds = a.security.credentials(None, None)?;
    let (mut coord, reply, cfg) = rt.block_on(join(
        &a.coordinator,
        &creds,
        Role::Trainer,
        "trainer",
        &advertise,
    ))?;
    let worker_id = Arc::new(std::sync::atomic::AtomicU64::new(reply.worker_id));

    let run_dir = PathBuf::from(&cfg.run.run_dir);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let resume_from = if a.resume {
        let dir = checkpoint::latest(&run_dir)?.ok_or_else(|| {
            anyhow!(
                "--resume: no checkpoint in {}",
                run_dir.join("checkpoints").display()
            )
        })?;
        Some(dir)
    } else {
        None
    };
    let start_path = match &resume_from {
        Some(d) => d
            .to_str()
            .ok_or_else(|| anyhow!("{} is not UTF-8", d.display()))?
            .to_string(),
        None => cfg.model.path.clone(),
    };
    let policy = crate::load_model(&start_path)?;
    // The KL reference is always the run's starting model.
    let reference = if cfg.algorithm.kl_coef > 0.0 {
        Some(crate::load_model(&cfg.model.path)?.model)
    } else {
        None
    };
    let critic = if cfg.algorithm.advantage == Estimator::Gae {
        let (d, dtype, device) = (
            policy.model.config().hidden_size,
            policy.model.dtype(),
            policy.model.device(),
        );
        Some(
            match ValueHead::load(Path::new(&start_path), d, dtype, device)? {
                Some(h) => h,
                None => ValueHead::zeros(d, dtype, device)?,
            },
        )
    } else {
        None
    };
    let extra = critic.as_ref().map(|c| c.named_vars()).unwrap_or_default();
    let mut opt = Optimizer::new(&cfg.optimizer, &policy.model, extra)?;
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
    }
    let kept: Vec<u64> = start_buffer.groups().map(|g| g.lease_id).collect();
    let mc = policy.model.config();
    let shared = Arc::new(Shared::new(
        start_buffer,
        cfg.trainer.buffer_capacity,
        learner::snapshot(&policy.model, start_version)?,
        Limits {
            vocab_size: mc.vocab_size,
            group_size: cfg.run.group_size as usize,
            max_completion_tokens: cfg.generator.max_new_tokens,
            max_context_tokens: mc.max_position_embeddings,
        },
        cfg.trainer.bucket_mib << 20,
    ));
    let svc = TrainerService {
        shared: shared.clone(),
        coordinator: coord.clone(),
    };
    let server_creds = creds.clone();
    rt.spawn(async move {
        let r = tandem_trainer::service::serve(svc, listener, &server_creds).await;
        if let Err(e) = r {
            tracing::error!("trainer gRPC server stopped: {e}");
        }
    });
    let pusher = broadcast_pusher(&a, &cfg, &advertise, &creds, rt.handle(), &coord)?;
    let broadcast_address = pusher
        .as_ref()
        .map(|p| p.advertise.clone())
        .unwrap_or_default();
    // Heartbeats keep the trainer a member; a dropped trainer registers again.
    {
        let (mut c, shared, id, adv) = (
            coord.clone(),
            shared.clone(),
            worker_id.clone(),
            advertise.clone(),
        );
        let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(1));
        rt.spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let req = HeartbeatRequest {
                    worker_id: id.load(Ordering::SeqCst),
                    policy_version: shared.version.load(Ordering::SeqCst),
                    broadcast_address: broadcast_address.clone(),
                    ..Default::default()
                };
                match c.heartbeat(req).await {
                    Ok(r) if !r.get_ref().known => {
                        let again = c
                            .register(RegisterRequest {
                                role: Role::Trainer as i32,
                                name: "trainer".into(),
                                address: adv.clone(),
                            })
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
    tracing::info!(address = %advertise, steps = cfg.run.steps, "trainer serving");
    readiness.set(Phase::Ready);
    if resume_from.is_some() {
        rt.block_on(coord.publish_version(PublishVersionRequest {
            version: start_version,
            step: start_step,
            resumed: true,
            buffered_leases: kept,
            buffer_groups: shared.buffer_len() as u64,
            ..Default::default()
        }))
        .map_err(|e| {
            anyhow!(
                "announcing the resumed version {start_version}: {}",
                client::describe(&e)
            )
        })?;
    }
    let mut learner = Learner {
        policy,
        reference,
        critic,
        opt,
        algorithm: cfg.algorithm.clone(),
        optimizer: cfg.optimizer.clone(),
        plan: Plan {
            steps: cfg.run.steps,
            batch_groups: cfg.run.batch_groups as usize,
            max_staleness: cfg.run.max_staleness,
            run_dir: run_dir.clone(),
            dump_batches: cfg.trainer.dump_batches,
            mock_train_ms: cfg.trainer.mock_train_ms,
        },
        step: start_step,
        version: start_version,
    };
    while learner.step < cfg.run.steps {
        let report = learner.step_once(&shared)?;
        learner.log(&report)?;
        let last = learner.step == cfg.run.steps;
        if last {
            // Nothing enters the buffer from here on; what is in it is reported.
            shared.close(Duration::from_secs(10));
            let out = run_dir.join("final");
            tandem_model::save_hf(&learner.policy.model, &learner.policy.tokenizer, &out)
                .with_context(|| format!("writing {}", out.display()))?;
            if let Some(c) = &learner.critic {
                c.save(&out)?;
            }
            let left: Vec<String> = shared
                .buffer
                .lock()
                .map(|b| b.groups().map(|g| g.key()).collect())
                .unwrap_or_default();
            write_atomic(
                &run_dir.join("trainer-summary.json"),
                &serde_json::json!({"steps": learner.step, "version": learner.version, "groups_left_in_buffer": left}).to_string(),
            )?;
        }
        let dropped = shared
            .dropped
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or_default();
        let mut dropped: std::collections::HashMap<String, u64> = dropped.into_iter().collect();
        if !report.stale_dropped.is_empty() {
            *dropped.entry("stale".into()).or_default() += report.stale_dropped.len() as u64;
            // Which groups, across trainer restarts: RUN_DIR/stale-groups.txt.
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
        tracing::info!(
            step = report.step,
            reward = format!("{:.3}", report.metrics.reward_mean),
            loss = format!("{:.4}", report.metrics.loss),
            staleness_max = report.staleness.iter().max().copied().unwrap_or(0),
            seconds = format!("{:.2}", report.step_seconds),
            "step"
        );
        let published = rt
            .block_on(coord.publish_version(PublishVersionRequest {
                version: report.version,
                step: report.step,
                metrics: report.metric_map(),
                staleness: report.staleness.clone(),
                dropped,
                buffer_groups: shared.buffer_len() as u64,
                wait_seconds: report.wait_seconds,
                finished: last,
                trained_leases: report.trained_leases.clone(),
                ..Default::default()
            }))
            .map_err(|e| {
                anyhow!(
                    "publishing version {} to the coordinator: {}",
                    report.version,
                    client::describe(&e)
                )
            })?;
        if let (Some(p), Some(group), false) = (&pusher, published.into_inner().group, last) {
            if let Ok(w) = shared.weights.read() {
                p.offer(group, w.clone());
            }
        }
        // After the publish, so the coordinator knows what the checkpoint has trained.
        let every = cfg.trainer.checkpoint_every;
        if !last && every > 0 && learner.step.is_multiple_of(every) {
            let buffer = shared.buffer.lock().map(|b| b.clone()).unwrap_or_default();
            let dir = checkpoint::save(&run_dir, &learner, &buffer, cfg.trainer.keep_checkpoints)?;
            tracing::info!(checkpoint = %dir.display(), "checkpoint written");
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

/// The weight-broadcast listener and pusher, with `[trainer] broadcast = "tcp"|"nccl"`.
fn broadcast_pusher(
    a: &TrainerArgs,
    cfg: &RunConfig,
    advertise: &str,
    creds: &tandem_proto::auth::Credentials,
    rt: &tokio::runtime::Handle,
    coord: &tandem_proto::v1::coordinator_client::CoordinatorClient<tandem_proto::client::Authed>,
) -> Result<Option<weight_broadcast::Pusher>> {
    if cfg.trainer.broadcast == BroadcastPlane::Off {
        return Ok(None);
    }
    if creds.tls().server().is_some() {
        tracing::warn!(
            "[trainer] broadcast = {:?} is plaintext and this run uses TLS: generators fetch weights over gRPC (TLS) instead",
            cfg.trainer.broadcast
        );
        return Ok(None);
    }
    let (bind, host) =
        weight_broadcast::addresses(&a.listen, advertise, a.broadcast_listen.as_deref())?;
    let heartbeat = Duration::from_millis(cfg.coordinator.heartbeat_interval_ms);
    let timeout = Duration::from_secs_f64(cfg.trainer.broadcast_timeout_s);
    let p = weight_broadcast::Pusher::start(
        &bind,
        &host,
        creds.token(),
        weight_broadcast::Settings {
            bucket_bytes: cfg.trainer.bucket_mib << 20,
            // Members learn a new epoch from a heartbeat, then connect.
            join_wait: (heartbeat * 4).max(Duration::from_secs(1)).min(timeout),
            timeout,
            collective: weight_broadcast::collective(cfg.trainer.broadcast, true)?,
        },
        rt.clone(),
        coord.clone(),
    )
    .context("--broadcast-listen")?;
    tracing::info!(address = %p.advertise, "weight broadcast listening");
    Ok(Some(p))
}

#[derive(Args)]
pub struct GeneratorArgs {
    /// The coordinator's gRPC address.
    #[arg(long)]
    coordinator: String,
    /// This generator's name (metrics label).
    #[arg(long, default_value = "gen-0")]
    name: String,
    /// Serve /healthz and /readyz here (for Kubernetes probes), e.g. 0.0.0.0:8080.
    #[arg(long)]
    http: Option<String>,
    #[command(flatten)]
    security: SecurityArgs,
}

pub fn generator(a: GeneratorArgs) -> Result<()> {
    let rt = runtime()?;
    let readiness = Readiness::default();
    if let Some(addr) = &a.http {
        health::serve(&rt, addr, readiness.clone())?;
    }
    let creds = a.security.credentials(None, None)?;
    let (coord, reply, cfg) =
        rt.block_on(join(&a.coordinator, &creds, Role::Generator, &a.name, ""))?;
    let model = crate::load_model(&cfg.model.path)?;
    let seed = cfg.run.seed ^ reply.worker_id.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let settings = tandem_generator::worker::Settings {
        name: a.name.clone(),
        generator: cfg.generator.clone(),
        reward: cfg.reward.clone(),
        chat: cfg.data.chat,
        system: cfg.data.system.clone(),
        group_size: cfg.run.group_size,
        seed,
        heartbeat_interval: Duration::from_millis(reply.heartbeat_interval_ms.max(1)),
        weight_sync_timeout: Duration::from_secs(300),
        // The trainer pushes versions only without TLS (plaintext; see the trainer).
        broadcast: match (cfg.trainer.broadcast, creds.tls().client().is_some()) {
            (BroadcastPlane::Off, _) | (_, true) => None,
            (plane, false) => Some(tandem_generator::worker::BroadcastSettings {
                token: creds.token().to_string(),
                timeout: Duration::from_secs_f64(cfg.trainer.broadcast_timeout_s),
                collective: weight_broadcast::collective(plane, false)?,
            }),
        },
    };
    let worker = tandem_generator::worker::Worker::new(
        settings,
        model,
        rt.handle().clone(),
        creds,
        tandem_generator::worker::Joined {
            coordinator: coord,
            worker_id: reply.worker_id,
            policy_version: reply.policy_version,
            trainer_address: reply.trainer_address,
        },
    )?;
    tracing::info!(name = %a.name, id = reply.worker_id, "generator running");
    readiness.set(Phase::Ready);
    let done = worker.run();
    readiness.set(Phase::Stopping);
    done?;
    tracing::info!(name = %a.name, "generator done");
    Ok(())
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
    write_atomic(
        path,
        &(kept.join("\n") + if kept.is_empty() { "" } else { "\n" }),
    )
}
