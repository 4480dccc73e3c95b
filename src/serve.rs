//! `tandem coordinator | trainer | generator`: one service per process. Workers need
//! only the coordinator's address (and the token); they receive the run's config
//! from it when they register.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::v1::{RegisterRequest, Role};
use tandem_trainer::node;
use tandem_weights::plane::collective_backend;
use tandem_weights::BroadcastPlane;

use crate::health::{self, Phase, Readiness};
use crate::run_config::RunConfig;
use crate::security::SecurityArgs;

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
    let dataset = tandem_data::Dataset::load(&cfg.data)?;
    if let Some(n) = dataset.epoch_len() {
        tracing::info!(
            records = n,
            held_out = dataset.held_out(),
            "dataset: {n} records to train on, {} held out for evaluation ([data] eval_fraction = {})",
            dataset.held_out(),
            cfg.data.eval_fraction
        );
    }
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
    tandem_launch::run_dir::prepare(Path::new(&cfg.run.run_dir))?;
    let rt = runtime()?;
    rt.block_on(async {
        // The state lives in the run folder: a coordinator started again on it (after a
        // crash, a kill, a node loss) continues the run.
        let state = Path::new(&cfg.run.run_dir).join(tandem_coordinator::store::STATE_FILE);
        let running =
            tandem_coordinator::server::start(settings, dataset, &creds, Some(&state)).await?;
        tracing::info!(grpc = %running.grpc, http = %running.http, "coordinator serving");
        if let Some(path) = &a.addr_file {
            // `scheme`: the HTTP endpoints speak TLS when the run does.
            let scheme = if creds.tls().server().is_some() { "https" } else { "http" };
            let addrs = serde_json::json!({"grpc": running.grpc.to_string(), "http": running.http.to_string(), "scheme": scheme});
            tandem_model::write_atomic(path, addrs.to_string())?;
        }
        if !running.wait_finished_or_stopped().await {
            return Ok(());
        }
        let out = Path::new(&cfg.run.run_dir).join("coordinator-status.json");
        tandem_model::write_atomic(&out, serde_json::to_string_pretty(&running.status_json())?)?;
        tracing::info!(status = %out.display(), "run finished; coordinator exits");
        Ok::<_, anyhow::Error>(())
    })
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
        .register(client::unary(RegisterRequest {
            role: role as i32,
            name: name.to_string(),
            address: address.to_string(),
        }))
        .await
        .map_err(|e| {
            anyhow!(
                "registering with the coordinator at {addr}: {}",
                client::describe(&e)
            )
        })?
        .into_inner();
    // Every later call of this worker shows its session (bound to its id and role).
    creds.set_session(&reply.session_token);
    let cfg =
        RunConfig::parse(&reply.config_toml, &[]).context("the config the coordinator sent")?;
    // Every later unary call of this worker has the run's deadline.
    client::set_rpc_timeout(Duration::from_secs_f64(cfg.coordinator.rpc_timeout_s));
    tandem_proto::retry::set_patience(Duration::from_secs_f64(cfg.coordinator.reconnect_timeout_s));
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
    /// The folder this trainer writes its checkpoints, metrics and final model to (and
    /// resumes from). Its own choice: a worker takes no host path to write to from the
    /// config the coordinator sends (that config's `[run] run_dir` is only compared).
    #[arg(long, env = "TANDEM_RUN_DIR")]
    run_dir: PathBuf,
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
    let (coordinator, reply, cfg) = rt.block_on(join(
        &a.coordinator,
        &creds,
        Role::Trainer,
        "trainer",
        &advertise,
    ))?;
    tandem_launch::run_dir::prepare(&a.run_dir)?;
    if a.run_dir != Path::new(&cfg.run.run_dir) {
        tracing::info!(
            run_dir = %a.run_dir.display(),
            coordinator_run_dir = %cfg.run.run_dir,
            "writing to --run-dir, not to the folder the coordinator's config names"
        );
    }
    let settings = node::Settings {
        model: cfg.model.path.clone(),
        save_dtype: cfg.model.explicit_save_dtype()?,
        lora: cfg.lora.clone(),
        run_dir: a.run_dir.clone(),
        steps: cfg.run.steps,
        group_size: cfg.run.group_size,
        batch_groups: cfg.run.batch_groups,
        max_staleness: cfg.run.max_staleness,
        filter_zero_std: cfg.run.filter_zero_std,
        log_samples: cfg.run.log_samples,
        tensorboard: cfg.run.tensorboard,
        // An agent's sample also carries the part of its prompt past what its group
        // shares; the model's context bounds it.
        max_completion_tokens: if cfg.env.agent.is_empty() {
            cfg.generator.max_new_tokens
        } else {
            usize::MAX
        },
        samples_per_episode: cfg.env.samples_per_episode() as usize,
        reward_bound: cfg.reward.bound,
        heartbeat_interval: Duration::from_millis(cfg.coordinator.heartbeat_interval_ms),
        trainer: cfg.trainer.clone(),
        algorithm: cfg.algorithm.clone(),
        optimizer: cfg.optimizer.clone(),
    };
    let endpoints = node::Endpoints {
        listener,
        listen: a.listen.clone(),
        advertise,
        broadcast_listen: a.broadcast_listen.clone(),
        resume: a.resume,
    };
    let joined = node::Joined { coordinator, reply };
    // Held-out evaluation on the trainer's weights between steps (`[eval] every`).
    let evals = (cfg.eval.every > 0).then(|| tandem_trainer::node::evaluate::Evaluations {
        every: cfg.eval.every,
        evaluator: Box::new(crate::eval::RunEvaluator::new(
            &cfg,
            creds.tls(),
            rt.handle().clone(),
        )),
    });
    node::run(&settings, endpoints, joined, &creds, &rt, &readiness, evals)?;
    Ok(())
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
    /// Serve the OpenAI-compatible endpoint of `[env] agent` programs here, e.g.
    /// 127.0.0.1:8000 (default: a free loopback port; the agents are told it).
    #[arg(long)]
    openai: Option<String>,
    #[command(flatten)]
    security: SecurityArgs,
}

/// A generator's own files, hidden from the agent programs it runs: the run folder
/// (tokens, config, checkpoints, logs), the model cache and the TLS files.
fn private_paths(run_dir: &str, security: &SecurityArgs) -> Vec<std::path::PathBuf> {
    let tls = security.tls_files(None);
    let mut paths = vec![
        std::path::PathBuf::from(run_dir),
        tandem_model::fetch::cache_dir(),
    ];
    paths.extend([tls.ca, tls.cert, tls.key].into_iter().flatten());
    paths
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
    let mut model = tandem_model::load_model(&cfg.model.path)?;
    // Under [lora] the generator samples the base with the run's adapter (version 0 is
    // the same fresh or `from` adapter the trainer starts from); each version then
    // carries only the adapter, for this base. The adapter is folded into the weights
    // (refolded at each version), so the engine runs the base's kernels alone.
    if let Some(lora) = &cfg.lora {
        model.model = lora
            .attach(model.model)
            .and_then(|m| m.fold_adapter())
            .with_context(|| format!("[lora]: attaching the adapter to {}", cfg.model.path))?;
    }
    tandem_generator::render::set_template_kwargs(&mut model.tokenizer, &cfg.data)?;
    let seed = cfg.run.seed ^ reply.worker_id.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let settings = tandem_generator::worker::Settings {
        name: a.name.clone(),
        generator: cfg.generator.clone(),
        reward: cfg.reward.clone(),
        env: cfg.env.clone(),
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
                collective: collective_backend(plane, false)?,
            }),
        },
        openai: a.openai.clone(),
        private: private_paths(&cfg.run.run_dir, &a.security),
    };
    let worker = tandem_generator::worker::Worker::new(
        settings,
        model,
        rt.handle().clone(),
        creds,
        tandem_generator::worker::Registration {
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
