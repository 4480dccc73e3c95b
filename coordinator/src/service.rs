//! The Coordinator gRPC service: each handler checks its request — the caller's token
//! and session, then every field against its limit (`checked`: the limits of
//! `tandem_proto::limits`) — before any of it is used, logged or stored, then reads or
//! changes the [`Core`] state under its lock. A refusal is a `Status` naming the field.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tandem_data::PromptBody;
use tandem_proto::auth::{check_request_session, require_admin, session_token};
use tandem_proto::limits::{self, is_host_port, printable, Check};
use tandem_proto::v1::coordinator_server::Coordinator;
use tandem_proto::v1::{
    ChatMessage, CommitReply, CommitRequest, DiscardReply, DiscardRequest, ExcludeReply,
    ExcludeRequest, HeartbeatReply, HeartbeatRequest, LeaseReply, LeaseRequest, LeaveReply,
    LeaveRequest, PromptLease, PublishVersionReply, PublishVersionRequest, RegisterReply,
    RegisterRequest, ReleaseReply, ReleaseRequest, Role, StatusReply, StatusRequest,
};
use tonic::{Request, Response, Status};

use crate::lease::Closing;
use crate::metrics as m;
pub use crate::state::{Core, Settings};

/// The gRPC face of [`Core`].
#[derive(Clone)]
pub struct CoordinatorService {
    pub core: Arc<Mutex<Core>>,
    /// The run's token: the key of the workers' session tokens.
    pub run_token: String,
}

impl CoordinatorService {
    /// Refuses a generator acting for a worker id that is not its own.
    fn own<T>(&self, req: &Request<T>, worker_id: u64, what: &str) -> Result<(), Status> {
        denied(check_request_session(req, &self.run_token, worker_id, what))
    }

    fn lock(&self) -> Result<MutexGuard<'_, Core>, Status> {
        self.core
            .lock()
            .map_err(|_| Status::internal("coordinator state poisoned by an earlier panic"))
    }
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterReply>, Status> {
        if req.get_ref().role == Role::Trainer as i32 {
            denied(require_admin(&req, "registering as the trainer"))?;
        }
        let r = checked(req.into_inner())?;
        let role = Role::try_from(r.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            return Err(refused(Status::invalid_argument(
                "role: must be ROLE_GENERATOR or ROLE_TRAINER",
            )));
        }
        if (role == Role::Trainer || !r.address.is_empty()) && !is_host_port(&r.address) {
            return Err(refused(Status::invalid_argument(format!(
                "address: must be the worker's gRPC address as host:port (the trainer must give one), got {:?}",
                printable(&r.address)
            ))));
        }
        let mut core = self.lock()?;
        if core.members.iter().count() >= limits::WORKERS {
            return Err(refused(Status::resource_exhausted(format!(
                "the run has {} workers registered, the most it takes (tandem_proto::limits::WORKERS); workers that stop beating are dropped after the heartbeat timeout",
                limits::WORKERS
            ))));
        }
        let id = core
            .members
            .register(r.name.clone(), role, r.address, Instant::now());
        tracing::info!(name = %printable(&r.name), id, ?role, "worker registered");
        core.update_group();
        core.persist()?;
        core.export_gauges();
        let role_name = if role == Role::Trainer {
            "trainer"
        } else {
            "generator"
        };
        Ok(Response::new(RegisterReply {
            session_token: session_token(&self.run_token, id, role_name),
            worker_id: id,
            config_toml: core.settings.config_toml.clone(),
            heartbeat_interval_ms: core.settings.coordinator.heartbeat_interval_ms,
            policy_version: core.version,
            trainer_address: core
                .members
                .trainer_address()
                .unwrap_or_default()
                .to_string(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        self.own(&req, req.get_ref().worker_id, "Heartbeat")?;
        let r = checked(req.into_inner())?;
        let now = Instant::now();
        let mut core = self.lock()?;
        let version = core.version;
        // A generator may hold a version newer than the published one for a moment:
        // after a trainer resumed from an older checkpoint, until it fetches that one
        // (the reply tells it). Refusing the beat would leave it deaf to the rewind.
        let trainer_address = core
            .members
            .trainer_address()
            .unwrap_or_default()
            .to_string();
        let stop = core.finished();
        let role = core.members.get(r.worker_id).map(|w| w.role);
        if !r.broadcast_address.is_empty()
            && (role != Some(Role::Trainer) || !is_host_port(&r.broadcast_address))
        {
            return Err(refused(Status::invalid_argument(format!(
                "broadcast_address: only the trainer gives one, as host:port; got {:?}",
                printable(&r.broadcast_address)
            ))));
        }
        // Joining or leaving the broadcast: a generator's receiver, the trainer's listener.
        let changed = core.members.get_mut(r.worker_id).is_some_and(|w| {
            if w.role == Role::Generator {
                std::mem::replace(&mut w.broadcast, r.broadcast) != r.broadcast
            } else if w.broadcast_address != r.broadcast_address {
                w.broadcast_address = r.broadcast_address.clone();
                true
            } else {
                false
            }
        });
        if changed {
            core.update_group();
            core.persist()?;
        }
        let group = core.group.view(Some(r.worker_id), &core.members);
        let Some(w) = core.members.get_mut(r.worker_id) else {
            return Ok(Response::new(HeartbeatReply {
                policy_version: version,
                trainer_address,
                stop,
                known: false,
                group: None,
            }));
        };
        w.last_seen = now;
        w.policy_version = r.policy_version;
        // Counts a peer reports saturate: they never wrap a total.
        w.generated_tokens = w.generated_tokens.saturating_add(r.generated_tokens);
        let (name, role) = (w.name.clone(), w.role);
        if role == Role::Generator {
            let g = core.generator_series.entry(name).or_default();
            g.generated_tokens = g.generated_tokens.saturating_add(r.generated_tokens);
            g.wait_s += r.wait_seconds;
            g.weight_sync_failures = g
                .weight_sync_failures
                .saturating_add(r.weight_sync_failures);
            g.prefill_tokens = g.prefill_tokens.saturating_add(r.prefill_tokens);
            g.prefix_cache_hit_tokens = g
                .prefix_cache_hit_tokens
                .saturating_add(r.prefix_cache_hit_tokens);
            for s in &r.weight_sync_seconds {
                metrics::histogram!(m::WEIGHT_SYNC_SECONDS).record(*s);
            }
            core.weight_sync_bytes = core.weight_sync_bytes.saturating_add(r.weight_sync_bytes);
            metrics::counter!(m::WEIGHT_SYNC_BYTES).absolute(core.weight_sync_bytes);
            core.episodes_failed = core.episodes_failed.saturating_add(r.episodes_failed);
            metrics::counter!(m::EPISODES_FAILED).absolute(core.episodes_failed);
            core.groups_retried = core.groups_retried.saturating_add(r.groups_retried);
            metrics::counter!(m::GROUPS_RETRIED).absolute(core.groups_retried);
            if r.generated_tokens > 0 {
                core.record_tokens(now, r.generated_tokens);
            }
        }
        Ok(Response::new(HeartbeatReply {
            policy_version: version,
            trainer_address,
            stop,
            known: true,
            group,
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseReply>, Status> {
        self.own(&req, req.get_ref().worker_id, "Lease")?;
        let r = checked(req.into_inner())?;
        let now = Instant::now();
        let mut core = self.lock()?;
        let version = core.version;
        if core.finished() {
            return Ok(Response::new(LeaseReply {
                stop: true,
                policy_version: version,
                ..Default::default()
            }));
        }
        match core.members.get_mut(r.worker_id) {
            Some(w) if w.role == Role::Generator => w.last_seen = now,
            Some(_) => return Err(Status::permission_denied("only generators take leases")),
            None => {
                return Err(Status::not_found(format!(
                    "worker_id: {} is not registered (register again)",
                    r.worker_id
                )))
            }
        }
        let repeat = core
            .members
            .get(r.worker_id)
            .filter(|w| r.request_id != 0 && w.last_lease.0 == r.request_id)
            .map(|w| w.last_lease.1.clone());
        let granted: Vec<(u64, u64)> = match repeat {
            // A retry whose first reply was lost: the same leases, those still open.
            Some(ids) => ids
                .into_iter()
                .filter_map(|id| {
                    core.leases
                        .held(id, r.worker_id)
                        .map(|l| (id, l.prompt_index))
                })
                .collect(),
            None => {
                let granted = core.grant_leases(r.worker_id, r.max_groups as u64, now);
                if let Some(w) = core.members.get_mut(r.worker_id) {
                    w.last_lease = (r.request_id, granted.iter().map(|g| g.0).collect());
                }
                if !granted.is_empty() {
                    core.persist()?;
                }
                granted
            }
        };
        let leases = granted
            .into_iter()
            .map(|(lease_id, prompt_index)| {
                let p = core.dataset.get(prompt_index);
                let (text, messages) = match p.body {
                    PromptBody::Text(t) => (t, vec![]),
                    PromptBody::Messages(ms) => (
                        String::new(),
                        ms.into_iter()
                            .map(|x| ChatMessage {
                                role: x.role,
                                content: x.content,
                            })
                            .collect(),
                    ),
                };
                PromptLease {
                    lease_id,
                    prompt_index,
                    text,
                    messages,
                    answer: p.answer.unwrap_or_default(),
                    // Kept nowhere: a restarted coordinator reads it again from the
                    // record at `prompt_index`.
                    info_json: p.info.unwrap_or_default(),
                }
            })
            .collect::<Vec<_>>();
        metrics::gauge!(m::LEASES_RUNNING).set(core.leases.running() as f64);
        Ok(Response::new(LeaseReply {
            retry_after_ms: if leases.is_empty() { 100 } else { 0 },
            leases,
            policy_version: version,
            stop: false,
        }))
    }

    async fn commit(&self, req: Request<CommitRequest>) -> Result<Response<CommitReply>, Status> {
        denied(require_admin(&req, "Commit"))?;
        let r = req.into_inner();
        let mut core = self.lock()?;
        if core.finished() {
            return Ok(Response::new(CommitReply {
                accepted: false,
                reason: "finished".into(),
            }));
        }
        if r.filtered {
            return Ok(Response::new(
                match core
                    .leases
                    .filter(r.lease_id, r.prompt_index, r.worker_id, r.request_id)
                {
                    Ok(Closing::Repeat) => CommitReply {
                        accepted: true,
                        reason: String::new(),
                    },
                    Ok(Closing::Now) => {
                        core.persist()?;
                        metrics::counter!(m::LEASES_EXTRA).increment(1);
                        metrics::gauge!(m::INFORMATIVE_SHARE).set(core.leases.informative_share());
                        metrics::gauge!(m::LEASES_RUNNING).set(core.leases.running() as f64);
                        CommitReply {
                            accepted: true,
                            reason: String::new(),
                        }
                    }
                    Err(why) => CommitReply {
                        accepted: false,
                        reason: why.as_str().to_string(),
                    },
                },
            ));
        }
        match core
            .leases
            .commit(r.lease_id, r.prompt_index, r.worker_id, r.request_id)
        {
            Ok(Closing::Repeat) => Ok(Response::new(CommitReply {
                accepted: true,
                reason: String::new(),
            })),
            Ok(Closing::Now) => {
                core.persist()?;
                metrics::gauge!(m::INFORMATIVE_SHARE).set(core.leases.informative_share());
                metrics::counter!(m::GROUPS_ACCEPTED).increment(1);
                metrics::gauge!(m::LEASES_RUNNING).set(core.leases.running() as f64);
                Ok(Response::new(CommitReply {
                    accepted: true,
                    reason: String::new(),
                }))
            }
            Err(why) => {
                core.count_dropped(why.as_str(), 1);
                tracing::info!(lease = r.lease_id, reason = why.as_str(), "group refused");
                Ok(Response::new(CommitReply {
                    accepted: false,
                    reason: why.as_str().to_string(),
                }))
            }
        }
    }

    async fn publish_version(
        &self,
        req: Request<PublishVersionRequest>,
    ) -> Result<Response<PublishVersionReply>, Status> {
        denied(require_admin(&req, "PublishVersion"))?;
        let r = checked(req.into_inner())?;
        let mut core = self.lock()?;
        let reply = core.publish(&r).map_err(refused)?;
        core.persist()?;
        Ok(Response::new(reply))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        self.own(&req, req.get_ref().worker_id, "Leave")?;
        let id = req.into_inner().worker_id;
        let mut core = self.lock()?;
        if let Some(w) = core.members.remove(id) {
            let n = core.leases.expire_worker(id);
            core.leases.forget_worker(id);
            if n > 0 {
                metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
            }
            tracing::info!(name = %printable(&w.name), id, leases_reissued = n, "worker left");
        }
        core.update_group();
        core.forget_departed();
        core.persist()?;
        core.export_gauges();
        Ok(Response::new(LeaveReply {}))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        self.own(&req, req.get_ref().worker_id, "Release")?;
        let r = checked(req.into_inner())?;
        let mut core = self.lock()?;
        let released = core.leases.release(r.lease_id, r.worker_id);
        if released {
            core.persist()?;
            metrics::counter!(m::LEASES_REISSUED).increment(1);
            // A group that failed for good (the check refused unknown values).
            if let Some(reason) = m::failure_reason(r.failure()) {
                let n = core.groups_failed.entry(reason).or_default();
                *n = n.saturating_add(1);
                metrics::counter!(m::GROUPS_FAILED, "reason" => reason).absolute(*n);
            }
            metrics::gauge!(m::LEASES_RUNNING).set(core.leases.running() as f64);
            tracing::warn!(
                lease = r.lease_id,
                worker = r.worker_id,
                reason = %printable(&r.reason),
                "lease given back: its prompt is re-issued"
            );
        }
        Ok(Response::new(ReleaseReply { released }))
    }

    async fn discard(
        &self,
        req: Request<DiscardRequest>,
    ) -> Result<Response<DiscardReply>, Status> {
        denied(require_admin(&req, "Discard"))?;
        let r = checked(req.into_inner())?;
        let mut core = self.lock()?;
        let n = r
            .lease_ids
            .iter()
            .filter(|&&id| core.leases.discard(id))
            .count();
        if n > 0 {
            core.persist()?;
            metrics::gauge!(m::LEASES_RUNNING).set(core.leases.running() as f64);
            tracing::info!(
                discarded = n,
                reason = %printable(&r.reason),
                "groups discarded by the trainer: their admission slots are free again"
            );
        }
        Ok(Response::new(DiscardReply {
            discarded: n as u32,
        }))
    }

    async fn exclude_from_group(
        &self,
        req: Request<ExcludeRequest>,
    ) -> Result<Response<ExcludeReply>, Status> {
        denied(require_admin(&req, "ExcludeFromGroup"))?;
        let r = checked(req.into_inner())?;
        let mut core = self.lock()?;
        let names: Vec<String> = r
            .worker_ids
            .iter()
            .map(|id| {
                core.members.get(*id).map_or_else(
                    || format!("#{id} (gone)"),
                    |w| printable(&w.name).to_string(),
                )
            })
            .collect();
        let Core { group, members, .. } = &mut *core;
        if group.exclude(&r.worker_ids, members) {
            tracing::warn!(
                workers = ?names,
                seen_in_epoch = r.epoch,
                epoch = group.epoch,
                reason = %printable(&r.reason),
                "excluded from the weight-broadcast group; they fetch weights over gRPC"
            );
            core.persist()?;
        }
        Ok(Response::new(ExcludeReply {
            group: core.group.view(None, &core.members),
        }))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let core = self.lock()?;
        Ok(Response::new(core.status(Instant::now())))
    }
}

/// Counts and logs a refusal of `check` (a generator's token on a trainer's call).
fn denied(check: Result<(), Status>) -> Result<(), Status> {
    if let Err(e) = &check {
        metrics::counter!(m::PERMISSION_DENIED).increment(1);
        tracing::warn!("refused: {}", printable(e.message()));
    }
    check
}

/// `r` once every field is within its limit (`tandem_proto::limits`); otherwise
/// INVALID_ARGUMENT naming the field, the limit and the fix.
fn checked<T: Check>(r: T) -> Result<T, Status> {
    r.check().map_err(|e| refused(e.into()))?;
    Ok(r)
}

/// Logs a request refused for its content (the message escaped and cut) and counts it.
fn refused(e: Status) -> Status {
    metrics::counter!(m::REQUESTS_REFUSED).increment(1);
    tracing::warn!("request refused: {}", printable(e.message()));
    e
}
