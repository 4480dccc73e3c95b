//! The coordinator's state: the run's settings, membership, leases under the admission
//! rule, the broadcast group, the published version and what workers reported. The
//! gRPC handlers (`service.rs`) check a request and call into it; `publish.rs` is the
//! trainer's publish; `export.rs` turns it into metrics.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use tandem_data::Dataset;
use tandem_proto::v1::{Role, StatusReply, WorkerStatus};

use crate::config::{CoordinatorConfig, RunSection};
use crate::group::Group;
use crate::lease::Leases;
use crate::membership::Members;
use crate::metrics as m;
use crate::store::Store;

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
    pub(crate) dataset: Dataset,
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
    /// Where the state is saved (none in unit tests and embedded uses).
    pub(crate) store: Option<Store>,
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
            store: None,
        }
    }

    pub(crate) fn count_dropped(&mut self, reason: &str, n: u64) {
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
            self.forget_departed();
        }
        let n = self.leases.expire_older_than(
            Duration::from_secs(self.settings.coordinator.lease_timeout_s),
            now,
        );
        if n > 0 {
            tracing::warn!(leases = n, "leases past lease_timeout_s re-issued");
            metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
        }
        if membership_changed || n > 0 {
            // Logged by `persist`; the next change tries again.
            let _ = self.persist();
        }
        self.export_gauges();
    }

    /// Drops the wait counters of generators no longer in the run (their other series
    /// go after [`m::IDLE_SERIES`]), so label sets stay bounded by the live ones.
    pub(crate) fn forget_departed(&mut self) {
        let members = &self.members;
        self.generator_wait_s.retain(|name, _| {
            members
                .iter()
                .any(|(_, w)| w.role == Role::Generator && &w.name == name)
        });
    }

    /// Recomputes the broadcast group after a membership change.
    pub(crate) fn update_group(&mut self) {
        if self.group.update(&self.members) {
            tracing::info!(
                epoch = self.group.epoch,
                world_size = self.group.world_size(),
                "weight-broadcast group changed"
            );
        }
    }

    /// Counts `n` tokens generated at `now` toward the throughput window.
    pub(crate) fn record_tokens(&mut self, now: Instant, n: u64) {
        self.tokens.push_back((now, n));
        while self
            .tokens
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(30))
        {
            self.tokens.pop_front();
        }
    }

    pub(crate) fn tokens_per_second(&self, now: Instant) -> f64 {
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
