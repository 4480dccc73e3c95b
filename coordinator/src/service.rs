//! The Coordinator gRPC service and its state: membership, leases under the admission
//! rule, the published version, and what workers report (exported as metrics).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_proto::v1::coordinator_server::Coordinator;
use tandem_proto::v1::{
    ChatMessage, CommitReply, CommitRequest, ExcludeReply, ExcludeRequest, HeartbeatReply,
    HeartbeatRequest, LeaseReply, LeaseRequest, LeaveReply, LeaveRequest, PromptLease,
    PublishVersionReply, PublishVersionRequest, RegisterReply, RegisterRequest, Role, StatusReply,
    StatusRequest, WorkerStatus,
};
use tonic::{Request, Response, Status};

use crate::config::{CoordinatorConfig, RunSection};
use crate::group::Group;
use crate::lease::{admission_capacity, Leases};
use crate::membership::Members;
use crate::metrics as m;
use tandem_data::{Dataset, PromptBody};

/// What the coordinator serves.
pub struct Settings {
    pub run: RunSection,
    pub coordinator: CoordinatorConfig,
    /// The whole config file, handed to workers when they register.
    pub config_toml: String,
}

/// The mutable state behind the service.
pub struct Core {
    pub settings: Settings,
    dataset: Dataset,
    pub leases: Leases,
    pub members: Members,
    /// Who receives weights by broadcast.
    pub group: Group,
    pub version: u64,
    pub step: u64,
    pub train_metrics: BTreeMap<String, f64>,
    pub dropped: BTreeMap<String, u64>,
    pub buffer_groups: u64,
    pub max_staleness_seen: u32,
    tokens: VecDeque<(Instant, u64)>,
    /// When the trainer published its last step (None while the run goes).
    pub finished_at: Option<Instant>,
    /// Seconds counters (Prometheus counters are float; the `metrics` crate's are not).
    pub trainer_wait_s: f64,
    pub generator_wait_s: BTreeMap<String, f64>,
}

impl Core {
    pub fn new(settings: Settings, dataset: Dataset) -> Self {
        Core {
            settings,
            dataset,
            leases: Leases::starting_at(0, 0),
            members: Members::default(),
            group: Group::default(),
            version: 0,
            step: 0,
            train_metrics: BTreeMap::new(),
            dropped: BTreeMap::new(),
            buffer_groups: 0,
            max_staleness_seen: 0,
            tokens: VecDeque::new(),
            finished_at: None,
            trainer_wait_s: 0.0,
            generator_wait_s: BTreeMap::new(),
        }
    }

    fn count_dropped(&mut self, reason: &str, n: u64) {
        *self.dropped.entry(reason.to_string()).or_default() += n;
        metrics::counter!(m::GROUPS_DROPPED, "reason" => reason.to_string()).increment(n);
    }

    /// The trainer has published its last step.
    pub fn finished(&self) -> bool {
        self.finished_at.is_some()
    }

    /// Drops silent workers and re-issues their leases and over-age leases.
    pub fn reap(&mut self, now: Instant) {
        let timeout = Duration::from_millis(self.settings.coordinator.heartbeat_timeout_ms);
        let reaped = self.members.reap(timeout, now);
        let membership_changed = !reaped.is_empty();
        for (id, w) in reaped {
            let n = self.leases.expire_worker(id);
            let role = if w.role == Role::Trainer {
                "trainer"
            } else {
                "generator"
            };
            metrics::counter!(m::WORKERS_DROPPED, "role" => role).increment(1);
            tracing::warn!(worker = %w.name, id, leases = n, "worker silent past the timeout: dropped, its leases re-issued");
            metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
        }
        if membership_changed {
            self.update_group();
        }
        let n = self.leases.expire_older_than(
            Duration::from_secs(self.settings.coordinator.lease_timeout_s),
            now,
        );
        if n > 0 {
            tracing::warn!(leases = n, "leases past lease_timeout_s re-issued");
            metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
        }
        self.export_gauges();
    }

    /// Recomputes the broadcast group after a membership change.
    fn update_group(&mut self) {
        if self.group.update(&self.members) {
            tracing::info!(
                epoch = self.group.epoch,
                world_size = self.group.world_size(),
                "weight-broadcast group changed"
            );
        }
    }

    fn export_gauges(&self) {
        metrics::gauge!(m::LEASES_RUNNING).set(self.leases.running() as f64);
        metrics::gauge!(m::POLICY_VERSION).set(self.version as f64);
        metrics::gauge!(m::STEP).set(self.step as f64);
        metrics::gauge!(m::RUN_FINISHED).set(if self.finished() { 1.0 } else { 0.0 });
        metrics::gauge!(m::BUFFER_GROUPS).set(self.buffer_groups as f64);
        metrics::gauge!(m::WORKERS, "role" => "generator").set(self.members.generators() as f64);
        let trainers = self
            .members
            .iter()
            .filter(|(_, w)| w.role == Role::Trainer)
            .count();
        metrics::gauge!(m::WORKERS, "role" => "trainer").set(trainers as f64);
    }

    fn tokens_per_second(&self, now: Instant) -> f64 {
        let window = Duration::from_secs(10);
        let recent: Vec<&(Instant, u64)> = self
            .tokens
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= window)
            .collect();
        let Some(first) = recent.first() else {
            return 0.0;
        };
        let span = now.duration_since(first.0).as_secs_f64().max(1.0);
        recent.iter().map(|(_, n)| *n).sum::<u64>() as f64 / span
    }

    /// The series computed at scrape time, in Prometheus text format: the float-valued
    /// counters, and the heartbeat age of each live generator (a generator that left
    /// or was dropped has no series, rather than a frozen one).
    pub fn render_computed(&self, now: Instant) -> String {
        let mut out = format!(
            "# HELP {t} Seconds the trainer waited for data\n# TYPE {t} counter\n{t} {}\n",
            self.trainer_wait_s,
            t = m::TRAINER_WAIT
        );
        if !self.generator_wait_s.is_empty() {
            out += &format!(
                "# HELP {g} Seconds generators waited for leases\n# TYPE {g} counter\n",
                g = m::GENERATOR_WAIT
            );
            for (name, v) in &self.generator_wait_s {
                out += &format!(
                    "{}{{generator=\"{}\"}} {v}\n",
                    m::GENERATOR_WAIT,
                    escape_label(name)
                );
            }
        }
        let ages: Vec<(&str, f64)> = self
            .members
            .iter()
            .filter(|(_, w)| w.role == Role::Generator)
            .map(|(_, w)| {
                let age = now.saturating_duration_since(w.last_seen);
                (w.name.as_str(), age.as_secs_f64())
            })
            .collect();
        if !ages.is_empty() {
            out += &format!(
                "# HELP {a} Seconds since each live generator's last heartbeat\n# TYPE {a} gauge\n",
                a = m::HEARTBEAT_AGE
            );
            for (name, age) in ages {
                out += &format!(
                    "{}{{generator=\"{}\"}} {age}\n",
                    m::HEARTBEAT_AGE,
                    escape_label(name)
                );
            }
        }
        out
    }

    pub fn status(&self, now: Instant) -> StatusReply {
        StatusReply {
            policy_version: self.version,
            step: self.step,
            total_steps: self.settings.run.steps,
            workers: self
                .members
                .iter()
                .map(|(&id, w)| WorkerStatus {
                    worker_id: id,
                    name: w.name.clone(),
                    role: w.role as i32,
                    policy_version: w.policy_version,
                    lag: self.version.saturating_sub(w.policy_version),
                    generated_tokens: w.generated_tokens,
                    last_seen_ms: now.duration_since(w.last_seen).as_millis() as u64,
                    leases: self.leases.held_by(id) as u32,
                })
                .collect(),
            groups_accepted: self.leases.accepted,
            leases_running: self.leases.running(),
            buffer_groups: self.buffer_groups,
            metrics: self.train_metrics.clone().into_iter().collect(),
            dropped: self.dropped.clone().into_iter().collect(),
            finished: self.finished(),
            tokens_per_second: self.tokens_per_second(now),
            max_staleness_seen: self.max_staleness_seen,
        }
    }
}

/// The gRPC face of [`Core`].
#[derive(Clone)]
pub struct CoordinatorService {
    pub core: Arc<Mutex<Core>>,
}

impl CoordinatorService {
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
        let r = req.into_inner();
        let role = Role::try_from(r.role).unwrap_or(Role::Unspecified);
        if role == Role::Unspecified {
            return Err(Status::invalid_argument(
                "role: must be ROLE_GENERATOR or ROLE_TRAINER",
            ));
        }
        if r.name.is_empty() || r.name.len() > 128 {
            return Err(Status::invalid_argument("name: 1 to 128 characters"));
        }
        if role == Role::Trainer && !is_host_port(&r.address) {
            return Err(Status::invalid_argument(format!(
                "address: the trainer must give its gRPC address as host:port, got {:?}",
                r.address
            )));
        }
        let mut core = self.lock()?;
        let id = core
            .members
            .register(r.name.clone(), role, r.address, Instant::now());
        tracing::info!(name = %r.name, id, ?role, "worker registered");
        core.update_group();
        core.export_gauges();
        Ok(Response::new(RegisterReply {
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
        let r = req.into_inner();
        let now = Instant::now();
        let mut core = self.lock()?;
        let version = core.version;
        let is_generator = core
            .members
            .get(r.worker_id)
            .is_some_and(|w| w.role == Role::Generator);
        if is_generator && r.policy_version > version {
            return Err(Status::invalid_argument(format!(
                "policy_version: {} is newer than the published {version}",
                r.policy_version
            )));
        }
        if !r.wait_seconds.is_finite() || r.wait_seconds < 0.0 {
            return Err(Status::invalid_argument(
                "wait_seconds: must be finite and ≥ 0",
            ));
        }
        if r.weight_sync_seconds
            .iter()
            .any(|s| !s.is_finite() || *s < 0.0)
        {
            return Err(Status::invalid_argument(
                "weight_sync_seconds: must be finite and ≥ 0",
            ));
        }
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
            return Err(Status::invalid_argument(format!(
                "broadcast_address: only the trainer gives one, as host:port; got {:?}",
                r.broadcast_address
            )));
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
        w.generated_tokens += r.generated_tokens;
        let (name, role) = (w.name.clone(), w.role);
        if role == Role::Generator {
            metrics::gauge!(m::GENERATOR_POLICY_VERSION, "generator" => name.clone())
                .set(r.policy_version as f64);
            metrics::gauge!(m::GENERATOR_LAG, "generator" => name.clone())
                .set((version - r.policy_version) as f64);
            metrics::counter!(m::GENERATED_TOKENS, "generator" => name.clone())
                .increment(r.generated_tokens);
            *core.generator_wait_s.entry(name.clone()).or_default() += r.wait_seconds;
            for s in &r.weight_sync_seconds {
                metrics::histogram!(m::WEIGHT_SYNC_SECONDS).record(*s);
            }
            metrics::counter!(m::WEIGHT_SYNC_BYTES).increment(r.weight_sync_bytes);
            metrics::counter!(m::WEIGHT_SYNC_FAILURES, "generator" => name.clone())
                .increment(r.weight_sync_failures);
            if r.generated_tokens > 0 {
                core.tokens.push_back((now, r.generated_tokens));
                while core
                    .tokens
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(30))
                {
                    core.tokens.pop_front();
                }
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
        let r = req.into_inner();
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
        if r.max_groups == 0 || r.max_groups > 4096 {
            return Err(Status::invalid_argument("max_groups: must be in 1..=4096"));
        }
        let run = &core.settings.run;
        let capacity = admission_capacity(
            run.max_staleness,
            version,
            run.batch_groups,
            core.leases.accepted,
            core.leases.running(),
        );
        let n = capacity.min(r.max_groups as u64);
        let granted = core.leases.grant(r.worker_id, n, now);
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
        let r = req.into_inner();
        let mut core = self.lock()?;
        if core.finished() {
            return Ok(Response::new(CommitReply {
                accepted: false,
                reason: "finished".into(),
            }));
        }
        match core.leases.commit(r.lease_id, r.prompt_index) {
            Ok(_) => {
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
        let r = req.into_inner();
        let mut core = self.lock()?;
        if r.resumed {
            let keep: std::collections::HashSet<u64> = r.buffered_leases.iter().copied().collect();
            let n = core.leases.rewind(r.version, &keep);
            metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
            tracing::warn!(
                from = core.version,
                to = r.version,
                reissued = n,
                "the trainer resumed from a checkpoint: rewound, leases since then re-issued"
            );
            core.version = r.version;
            core.step = r.step;
        } else if r.version < core.version {
            return Err(Status::failed_precondition(format!(
                "version: {} is older than the published {}",
                r.version, core.version
            )));
        }
        let v = r.version;
        core.leases.mark_trained(&r.trained_leases, v);
        if let Some((k, _)) = r.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Status::invalid_argument(format!(
                "metrics[{k}]: must be finite"
            )));
        }
        core.version = r.version;
        core.step = r.step;
        core.buffer_groups = r.buffer_groups;
        for (k, v) in &r.metrics {
            let name = m::train_metric_name(k);
            if !core.train_metrics.contains_key(k) {
                metrics::describe_gauge!(
                    name.clone(),
                    format!("Training step metric `{k}` of the latest step")
                );
            }
            metrics::gauge!(name).set(*v);
            core.train_metrics.insert(k.clone(), *v);
        }
        core.max_staleness_seen = r.staleness.iter().copied().max().unwrap_or(0);
        for s in &r.staleness {
            metrics::histogram!(m::ROLLOUT_STALENESS).record(*s as f64);
        }
        for (reason, n) in &r.dropped {
            core.count_dropped(reason, *n);
        }
        if !r.wait_seconds.is_finite() || r.wait_seconds < 0.0 {
            return Err(Status::invalid_argument(
                "wait_seconds: must be finite and ≥ 0",
            ));
        }
        core.trainer_wait_s += r.wait_seconds;
        if r.finished && !core.finished() {
            core.finished_at = Some(Instant::now());
            tracing::info!(step = r.step, version = r.version, "run finished");
        }
        core.export_gauges();
        Ok(Response::new(PublishVersionReply {
            group: core.group.view(None, &core.members),
        }))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let id = req.into_inner().worker_id;
        let mut core = self.lock()?;
        if let Some(w) = core.members.remove(id) {
            let n = core.leases.expire_worker(id);
            if n > 0 {
                metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
            }
            tracing::info!(name = %w.name, id, leases_reissued = n, "worker left");
        }
        core.update_group();
        core.export_gauges();
        Ok(Response::new(LeaveReply {}))
    }

    async fn exclude_from_group(
        &self,
        req: Request<ExcludeRequest>,
    ) -> Result<Response<ExcludeReply>, Status> {
        let r = req.into_inner();
        if r.worker_ids.is_empty() {
            return Err(Status::invalid_argument("worker_ids: name at least one"));
        }
        let mut core = self.lock()?;
        let names: Vec<String> = r
            .worker_ids
            .iter()
            .map(|id| {
                core.members
                    .get(*id)
                    .map_or_else(|| format!("#{id} (gone)"), |w| w.name.clone())
            })
            .collect();
        let Core { group, members, .. } = &mut *core;
        if group.exclude(&r.worker_ids, members) {
            tracing::warn!(
                workers = ?names,
                seen_in_epoch = r.epoch,
                epoch = group.epoch,
                reason = %r.reason,
                "excluded from the weight-broadcast group; they fetch weights over gRPC"
            );
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

/// `host:port` with a non-empty host (an IP or a DNS name) and a numeric port.
fn is_host_port(addr: &str) -> bool {
    addr.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
