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
use crate::lease::{admission_capacity, fair_share, Leases};
use crate::membership::{Members, Worker};
use crate::metrics as m;
use crate::store::Store;
use tandem_proto::limits::printable;

/// What the coordinator serves.
pub struct Settings {
    pub run: RunSection,
    pub coordinator: CoordinatorConfig,
    /// The whole config file, handed to workers when they register.
    pub config_toml: String,
}

/// The counters of one generator name that its heartbeats add to (each sum saturates:
/// a peer's count never wraps a counter).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GeneratorSeries {
    pub wait_s: f64,
    pub generated_tokens: u64,
    pub weight_sync_failures: u64,
    /// Prompt tokens its engine computed, and those its prefix cache served instead.
    pub prefill_tokens: u64,
    pub prefix_cache_hit_tokens: u64,
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
    /// The per-generator series, by name, of the generators in the run: rendered at
    /// scrape time from here, so a generator that leaves takes its series with it.
    pub generator_series: BTreeMap<String, GeneratorSeries>,
    /// Bytes of weights generators reported receiving (saturating).
    pub weight_sync_bytes: u64,
    /// Episodes that failed and groups run again, as generators reported them, and the
    /// groups given back as failed, by reason (saturating; not saved, like every
    /// Prometheus counter).
    pub episodes_failed: u64,
    pub groups_retried: u64,
    pub groups_failed: BTreeMap<&'static str, u64>,
    /// Bytes of the latest published version as generators receive it (every
    /// parameter, or only a LoRA adapter's A and B); 0 until the trainer reports one.
    pub version_bytes: u64,
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
            generator_series: BTreeMap::new(),
            weight_sync_bytes: 0,
            episodes_failed: 0,
            groups_retried: 0,
            groups_failed: BTreeMap::new(),
            version_bytes: 0,
            store: None,
        }
    }

    pub(crate) fn count_dropped(&mut self, reason: &str, n: u64) {
        let d = self.dropped.entry(reason.to_string()).or_default();
        *d = d.saturating_add(n);
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
            self.leases.forget_worker(id);
            let role = if w.role == Role::Trainer {
                "trainer"
            } else {
                "generator"
            };
            metrics::counter!(m::WORKERS_DROPPED, "role" => role).increment(1);
            tracing::warn!(worker = %printable(&w.name), id, leases = n, "worker silent past the timeout: dropped, its leases re-issued");
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

    /// Drops the series of generators no longer in the run, so the label sets on
    /// `/metrics` are exactly the live generators'.
    pub(crate) fn forget_departed(&mut self) {
        let members = &self.members;
        self.generator_series.retain(|name, _| {
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

    /// Grants generator `worker` up to `max_groups` leases under the admission rule and
    /// its fair share, first taking leases back for it when it is starved (the rules of
    /// [`crate::lease`]). Returns the (lease id, prompt index) pairs granted.
    pub fn grant_leases(&mut self, worker: u64, max_groups: u64, now: Instant) -> Vec<(u64, u64)> {
        let (eta, b) = (
            self.settings.run.max_staleness,
            self.settings.run.batch_groups,
        );
        let share = fair_share(eta, b, self.members.generators() as u64);
        let limit = self.leases.limit_for(worker, share);
        let held = self.leases.held_by(worker) as u64;
        let want = max_groups.min(limit.saturating_sub(held));
        let room =
            |c: &Core| admission_capacity(eta, c.version, b, c.leases.accepted, c.leases.running());
        if want > room(self) {
            let overdue = self
                .leases
                .overdue_after(self.settings.coordinator.lease_overdue_factor);
            let need = want - room(self);
            for (holder, (n, late)) in self.leases.reclaim(worker, need, share, overdue, now) {
                let name = self.members.get(holder).map(|w| w.name.clone());
                let name = name.as_deref().unwrap_or("(gone)");
                metrics::counter!(m::LEASES_RECLAIMED).increment(n as u64);
                metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
                tracing::warn!(
                    from = %printable(name),
                    holder,
                    leases = n,
                    overdue = late,
                    share,
                    "leases taken back for a starved generator{}",
                    if late {
                        ": held past the overdue time, the holder may hold one lease until it delivers a group"
                    } else {
                        ": held above the holder's fair share"
                    }
                );
            }
        }
        let n = want.min(room(self));
        self.leases.grant_at(worker, n, now, self.version)
    }

    /// A worker's lag, the coordinator's own view: for a generator, the published
    /// version − the version at which the oldest lease it holds was granted (0 while
    /// it holds none), so exactly how many versions the oldest group it owes may be
    /// behind if it landed now; for the trainer, the published version − the one it
    /// reported.
    pub fn lag(&self, id: u64, w: &Worker) -> u64 {
        if w.role == Role::Generator {
            self.leases
                .oldest_version(id)
                .map_or(0, |v| self.version.saturating_sub(v))
        } else {
            self.version.saturating_sub(w.policy_version)
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
        let sum = recent.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n));
        sum as f64 / span
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
                    lag: self.lag(id, w),
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tandem_data::{DataConfig, Dataset};
    use tandem_proto::v1::Role;

    use super::*;
    use crate::config::{CoordinatorConfig, RunSection};

    /// η = 1, B = 2: an admission window of 4 groups.
    fn core() -> Core {
        let settings = Settings {
            run: RunSection {
                batch_groups: 2,
                max_staleness: 1,
                ..RunSection::default()
            },
            coordinator: CoordinatorConfig::default(),
            config_toml: String::new(),
        };
        Core::new(settings, Dataset::load(&DataConfig::default()).unwrap())
    }

    /// A generator alone gets the whole window; a second one gets the first's surplus
    /// at once and its overdue leases once a group shows how long groups take; the
    /// holder of overdue leases then holds one lease until it delivers a group.
    #[test]
    fn no_generator_holds_more_than_its_share_or_keeps_what_it_does_not_use() {
        let mut c = core();
        let t0 = Instant::now();
        let hog = c
            .members
            .register("hog".into(), Role::Generator, String::new(), t0);
        assert_eq!(
            c.grant_leases(hog, 4096, t0).len(),
            4,
            "alone: the whole window"
        );
        let gen = c
            .members
            .register("gen".into(), Role::Generator, String::new(), t0);
        // Two generators: a share of ⌈4 / 2⌉ + 1 = 3. The hog's fourth lease is above
        // it and goes to the newcomer.
        assert_eq!(crate::lease::fair_share(1, 2, 2), 3);
        let mine = c.grant_leases(gen, 4096, t0);
        assert_eq!(mine.len(), 1);
        assert_eq!(c.leases.held_by(hog), 3);
        // The newest of the hog's leases went: the others are further along.
        assert!(c.leases.held(4, hog).is_none() && c.leases.held(1, hog).is_some());
        assert_eq!(c.leases.reissued.len(), 1);
        // Nothing delivered yet: nothing is overdue, however old.
        let late = t0 + Duration::from_secs(3600);
        assert!(c.grant_leases(gen, 4096, late).is_empty());
        assert_eq!(c.leases.held_by(hog), 3);
        // A group lands (in well under a second): from now on a lease held past
        // max(10 s, 4 × that) is overdue.
        let (id, prompt) = mine[0];
        c.leases.commit(id, prompt, gen, 0).unwrap();
        assert!(
            c.grant_leases(gen, 4096, t0 + Duration::from_secs(5))
                .is_empty(),
            "not yet overdue"
        );
        let after = t0 + crate::lease::OVERDUE_FLOOR + Duration::from_secs(1);
        let back = c.grant_leases(gen, 4096, after);
        assert_eq!(back.len(), 3, "the hog's three overdue leases");
        assert_eq!(c.leases.held_by(hog), 0);
        assert!(c.leases.on_probation(hog));
        // Their prompts are the hog's, leased again first.
        assert_eq!(c.leases.reissued.len(), 4);
        // On probation, one lease at most (admission has room for it: v1 published).
        c.version = 1;
        let one = c.grant_leases(hog, 4096, after);
        assert_eq!(one.len(), 1);
        assert!(c.grant_leases(hog, 4096, after).is_empty());
        // A delivered group lifts the probation.
        c.leases.commit(one[0].0, one[0].1, hog, 0).unwrap();
        assert!(!c.leases.on_probation(hog));
        assert_eq!(c.leases.limit_for(hog, 3), 3);
    }

    /// A generator's lag is the published version − the grant version of the oldest
    /// lease it holds, whatever version its last heartbeat reported; 0 with none.
    #[test]
    fn a_generators_lag_is_the_age_of_its_oldest_open_lease() {
        let mut c = core();
        let t0 = Instant::now();
        let gen = c
            .members
            .register("gen".into(), Role::Generator, String::new(), t0);
        let lag = |c: &Core| {
            let st = c.status(t0);
            st.workers.iter().find(|w| w.worker_id == gen).unwrap().lag
        };
        assert_eq!(lag(&c), 0, "no lease: no lag");
        let first = c.grant_leases(gen, 1, t0);
        c.version = 1;
        let second = c.grant_leases(gen, 1, t0);
        assert_eq!((first.len(), second.len()), (1, 1));
        // A heartbeat's stale version does not count.
        c.members.get_mut(gen).unwrap().policy_version = 0;
        c.version = 2;
        assert_eq!(lag(&c), 2, "the oldest lease was granted at v0");
        c.leases.commit(first[0].0, first[0].1, gen, 0).unwrap();
        assert_eq!(lag(&c), 1, "now the oldest open lease is v1's");
        c.leases.commit(second[0].0, second[0].1, gen, 0).unwrap();
        assert_eq!(lag(&c), 0);
        let text = c.render_computed(t0);
        assert!(
            text.contains("tandem_generator_lag{generator=\"gen\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn overdue_reclaim_can_be_turned_off() {
        let mut c = core();
        c.settings.coordinator.lease_overdue_factor = 0.0;
        let t0 = Instant::now();
        let hog = c
            .members
            .register("hog".into(), Role::Generator, String::new(), t0);
        let gen = c
            .members
            .register("gen".into(), Role::Generator, String::new(), t0);
        assert_eq!(c.grant_leases(hog, 4096, t0).len(), 3);
        let (id, prompt) = c.grant_leases(gen, 4096, t0)[0];
        c.leases.commit(id, prompt, gen, 0).unwrap();
        let late = t0 + Duration::from_secs(600);
        assert!(c.grant_leases(gen, 4096, late).is_empty());
        assert_eq!(c.leases.held_by(hog), 3);
    }

    /// Counts peers report saturate instead of wrapping or panicking.
    #[test]
    fn token_counts_saturate() {
        let mut c = core();
        let now = Instant::now();
        c.record_tokens(now, u64::MAX);
        c.record_tokens(now, u64::MAX);
        assert_eq!(c.tokens_per_second(now), u64::MAX as f64);
        c.count_dropped("invalid", u64::MAX);
        c.count_dropped("invalid", 5);
        assert_eq!(c.dropped["invalid"], u64::MAX);
    }
}
