//! Serving: the state the service and the learner share, the Trainer gRPC service
//! (rollouts in, weights out), stale drops forwarded to the coordinator, the weight
//! broadcast and the heartbeats.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{HeartbeatRequest, RegisterRequest, Role};
use tandem_weights::{BroadcastPlane, Snapshot};

use super::ingest::Limits;
use super::publisher::{self, Pusher};
use super::service::{Shared, TrainerService};
use super::start::Start;
use super::{Endpoints, Settings};
use crate::error::{Context, Result};

/// The coordinator as the trainer reaches it: its client, the trainer's worker id (a
/// re-registration changes it) and the heartbeat interval it asked for.
pub(super) struct Membership<'a> {
    pub coordinator: &'a CoordinatorClient<Authed>,
    pub worker_id: Arc<AtomicU64>,
    pub heartbeat: Duration,
}

/// Starts serving: the shared state (holding the buffered groups of `start`), the gRPC
/// service on `ends.listener`, the forwarding of stale drops, the broadcast pusher and
/// the heartbeats. Returns the shared state and the pusher (`None`: no broadcast).
pub(super) fn serve(
    s: &Settings,
    start: &mut Start,
    ends: Endpoints,
    creds: &Credentials,
    rt: &tokio::runtime::Runtime,
    member: &Membership,
) -> Result<(Arc<Shared>, Option<Pusher>)> {
    let shared = shared_state(s, start)?;
    let coord = member.coordinator;
    spawn_discards(rt, &shared, coord.clone());
    let svc = TrainerService {
        shared: shared.clone(),
        coordinator: coord.clone(),
        run_token: creds.token().to_string(),
    };
    let server_creds = creds.clone();
    rt.spawn(async move {
        let r = super::service::serve(svc, ends.listener, &server_creds).await;
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
        coord,
    )?;
    let broadcast_address = pusher
        .as_ref()
        .map(|p| p.advertise.clone())
        .unwrap_or_default();
    spawn_heartbeat(
        rt,
        coord.clone(),
        shared.clone(),
        member.worker_id.clone(),
        ends.advertise.clone(),
        broadcast_address,
        member.heartbeat,
    );
    tracing::info!(address = %ends.advertise, steps = s.steps, "trainer serving");
    Ok((shared, pusher))
}

/// The buffer (`start`'s groups move into it), the current weights and the checks
/// incoming groups pass.
fn shared_state(s: &Settings, start: &mut Start) -> Result<Arc<Shared>> {
    let mc = start.policy.model.config();
    Ok(Arc::new(Shared::new(
        std::mem::take(&mut start.buffer),
        s.trainer.buffer_capacity,
        Snapshot::of(&start.policy.model, start.version)?,
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
    )))
}

/// Stale drops are discarded at the coordinator as they happen (not at the next
/// publish): admission then grants their replacements while the learner waits.
fn spawn_discards(rt: &tokio::runtime::Runtime, shared: &Shared, coord: CoordinatorClient<Authed>) {
    let (discard_tx, mut discard_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
    let _ = shared.discard.set(discard_tx);
    rt.spawn(async move {
        while let Some(lease_ids) = discard_rx.recv().await {
            let req = tandem_proto::v1::DiscardRequest {
                lease_ids,
                reason: "stale".into(),
            };
            let r = tandem_proto::retry::retry("discarding stale groups", || {
                let (mut c, req) = (coord.clone(), req.clone());
                async move { c.discard(client::unary(req)).await }
            })
            .await;
            if let Err(e) = r {
                tracing::warn!("{}", client::describe(&e));
            }
        }
    });
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
