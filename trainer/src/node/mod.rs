//! The trainer process: load the policy (or resume a checkpoint), serve rollouts in and
//! weights out, and run the learner loop — each step published to the coordinator, then
//! broadcast and checkpointed — until the run's last step. The binary joins the
//! coordinator and hands over the settings it received; everything after is here:
//! [`run`], in the steps below.
//!
//! - `start` — load, or resume the newest checkpoint
//! - `serve` — the shared state, the gRPC service, stale drops forwarded, the
//!   broadcast pusher, heartbeats
//! - `training` — the learner loop: train, publish, broadcast, checkpoint, the final
//!   model; on SIGINT / SIGTERM a checkpoint of the step finished, then leave
//!
//! and the parts they use: [`service`] (the Trainer gRPC service: rollouts in, weight
//! buckets out), [`ingest`] (the checks an incoming group passes), [`buffer`] (the
//! groups waiting for a step), [`learner`] (a batch into a step into a version),
//! [`checkpoint`], [`evaluate`] (the held-out evaluation between steps),
//! [`publisher`] (each version pushed to the generators of the broadcast group) and
//! [`watch`] (`samples.jsonl` and TensorBoard's event files).

pub mod buffer;
pub mod checkpoint;
pub mod evaluate;
pub mod ingest;
pub mod learner;
pub mod publisher;
pub mod service;
pub mod watch;

mod serve;
mod start;
mod training;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::auth::Credentials;
use tandem_proto::client::Authed;
use tandem_proto::health::{Phase, Readiness};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{LeaveRequest, RegisterReply};

use crate::config::{AlgorithmConfig, OptimizerConfig, TrainerConfig};
use crate::error::Result;
use evaluate::Evaluations;
use serve::{serve, Membership};
use start::Start;
use training::{announce_resume, Ended, Training};

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
    /// `[run] log_samples`: steps between the samples in `samples.jsonl` (0 = none).
    pub log_samples: u64,
    /// `[run] tensorboard`: event files under `RUN_DIR/tensorboard/`.
    pub tensorboard: bool,
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
    /// `[model] save_dtype` (`None`: the dtype the starting model's weights came in).
    pub save_dtype: Option<candle_core::DType>,
    /// `[lora]`: train adapters on the frozen `model` (`None`: every parameter).
    pub lora: Option<tandem_model::LoraSection>,
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

/// Runs the trainer until the run's last step is published and the final model saved:
/// load (or resume), serve, the learner loop, leave.
pub fn run(
    s: &Settings,
    ends: Endpoints,
    joined: Joined,
    creds: &Credentials,
    rt: &tokio::runtime::Runtime,
    readiness: &Readiness,
    evals: Option<Evaluations>,
) -> Result<()> {
    let Joined { coordinator, reply } = joined;
    let member = Membership {
        coordinator: &coordinator,
        worker_id: Arc::new(AtomicU64::new(reply.worker_id)),
        heartbeat: Duration::from_millis(reply.heartbeat_interval_ms.max(1)),
    };
    let mut start = Start::load(s, ends.resume)?;
    let kept: Vec<u64> = start.buffer.groups().map(|g| g.lease_id).collect();
    let (shared, pusher) = serve(s, &mut start, ends, creds, rt, &member)?;
    // SIGINT / SIGTERM: stop after the step being trained, its checkpoint written.
    let stop = shared.clone();
    rt.spawn(async move {
        tandem_proto::shutdown::requested().await;
        stop.stop.store(true, Ordering::SeqCst);
    });
    readiness.set(Phase::Ready);
    let resumed = start.resumed.is_some();
    let mut learner = start.into_learner(s);
    if resumed {
        announce_resume(rt, &coordinator, &learner, kept, shared.buffer_len())?;
    }
    let ended = Training {
        s,
        rt,
        coord: &coordinator,
        shared: &shared,
        pusher: pusher.as_ref(),
        evals,
        watch: watch::Watch::open(&s.run_dir, s.tensorboard)?,
        resumable_from: checkpoint::resumable_from(&s.run_dir),
    }
    .run(&mut learner)?;
    if ended == Ended::Finished {
        tracing::info!(final_model = %s.run_dir.join("final").display(), "training finished");
    }
    readiness.set(Phase::Stopping);
    leave(rt, &member);
    Ok(())
}

/// Lets generators finish their last acks, then leaves the run.
fn leave(rt: &tokio::runtime::Runtime, member: &Membership) {
    std::thread::sleep(Duration::from_millis(300));
    let mut coord = member.coordinator.clone();
    let _ = rt.block_on(coord.leave(LeaveRequest {
        worker_id: member.worker_id.load(Ordering::SeqCst),
    }));
}
