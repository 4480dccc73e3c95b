//! The trainer's publish of a version: the request is checked whole before anything
//! changes, so a refused publish leaves the run as it was. Then, in order: a resumed
//! trainer rewinds the leases to its checkpoint, the leases the step trained are marked,
//! and the version, step, buffer, metrics, staleness, drops and wait are recorded.

use std::collections::HashSet;
use std::time::Instant;

use tandem_proto::limits::{printable, Check};
use tandem_proto::v1::{PublishVersionReply, PublishVersionRequest};
use tonic::Status;

use crate::metrics as m;
use crate::state::Core;

impl Core {
    /// Applies a publish checked by [`Core::check_publish`]; returns the broadcast group
    /// the trainer pushes the version to.
    /// A repeat of the last publish (a retry whose reply was lost) changes nothing and
    /// gets the same answer.
    pub fn publish(&mut self, r: &PublishVersionRequest) -> Result<PublishVersionReply, Status> {
        self.check_publish(r)?;
        if !r.resumed && r.step > 0 && (r.version, r.step) == (self.version, self.step) {
            tracing::info!(version = r.version, "a repeated publish: already applied");
            return Ok(PublishVersionReply {
                group: self.group.view(None, &self.members),
            });
        }
        if r.resumed {
            let keep: HashSet<u64> = r.buffered_leases.iter().copied().collect();
            let n = self.leases.rewind(r.version, &keep);
            metrics::counter!(m::LEASES_REISSUED).increment(n as u64);
            tracing::warn!(
                from = self.version,
                to = r.version,
                reissued = n,
                "the trainer resumed from a checkpoint: rewound, leases since then re-issued"
            );
        }
        self.leases.mark_trained(&r.trained_leases, r.version);
        if r.resumable_from > 0 {
            self.leases.settle(r.resumable_from);
        }
        self.version = r.version;
        self.step = r.step;
        self.buffer_groups = r.buffer_groups;
        if r.version_bytes > 0 {
            self.version_bytes = r.version_bytes;
        }
        for (k, v) in &r.metrics {
            let name = m::train_metric_name(k);
            if !self.train_metrics.contains_key(k) {
                metrics::describe_gauge!(
                    name.clone(),
                    format!("Training step metric `{k}` of the latest step")
                );
            }
            metrics::gauge!(name).set(*v);
            self.train_metrics.insert(k.clone(), *v);
        }
        self.max_staleness_seen = r.staleness.iter().copied().max().unwrap_or(0);
        for s in &r.staleness {
            metrics::histogram!(m::ROLLOUT_STALENESS).record(*s as f64);
        }
        for (reason, n) in &r.dropped {
            self.count_dropped(reason, *n);
        }
        self.trainer_wait_s += r.wait_seconds;
        if r.finished && !self.finished() {
            self.finished_at = Some(Instant::now());
            tracing::info!(step = r.step, version = r.version, "run finished");
        }
        self.export_gauges();
        Ok(PublishVersionReply {
            group: self.group.view(None, &self.members),
        })
    }

    /// Refuses a publish that names an older version (unless the trainer resumed from a
    /// checkpoint), a non-finite metric, a field past its limit, a drop reason the run
    /// does not know (each is a metric label), or a wait that is negative or not finite.
    pub fn check_publish(&self, r: &PublishVersionRequest) -> Result<(), Status> {
        r.check()?;
        if let Some(reason) = r
            .dropped
            .keys()
            .find(|k| !m::DROP_REASONS.contains(&k.as_str()))
        {
            return Err(Status::invalid_argument(format!(
                "dropped[{:?}]: not a drop reason of the run (one of {:?})",
                printable(reason),
                m::DROP_REASONS
            )));
        }
        if !r.resumed && r.version < self.version {
            return Err(Status::failed_precondition(format!(
                "version: {} is older than the published {}",
                r.version, self.version
            )));
        }
        if let Some((k, _)) = r.metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(Status::invalid_argument(format!(
                "metrics[{k}]: must be finite"
            )));
        }
        if !r.wait_seconds.is_finite() || r.wait_seconds < 0.0 {
            return Err(Status::invalid_argument(
                "wait_seconds: must be finite and ≥ 0",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tandem_data::{DataConfig, Dataset};
    use tandem_proto::v1::Role;

    use super::*;
    use crate::config::{CoordinatorConfig, RunSection};
    use crate::state::Settings;

    /// A run with one generator holding 4 leases, 2 of them committed; version 3.
    fn core() -> (Core, Vec<u64>) {
        let settings = Settings {
            run: RunSection::default(),
            coordinator: CoordinatorConfig::default(),
            config_toml: String::new(),
        };
        let mut core = Core::new(settings, Dataset::load(&DataConfig::default()).unwrap());
        let now = Instant::now();
        let gen = core
            .members
            .register("gen-0".into(), Role::Generator, String::new(), now);
        let leases: Vec<u64> = core
            .leases
            .grant(gen, 4, now)
            .into_iter()
            .map(|(lease, prompt)| {
                if lease % 2 == 0 {
                    core.leases.commit(lease, prompt, 0, 0).unwrap();
                }
                lease
            })
            .collect();
        core.version = 3;
        core.step = 3;
        (core, leases)
    }

    /// Everything a publish may change.
    fn observe(c: &mut Core) -> String {
        // What a generator would be granted next shows any rewind or re-issue.
        let next = c.leases.grant(1, 8, Instant::now());
        format!(
            "v{} s{} buf{} acc{} run{} reissue{:?} wait{} drop{:?} metrics{:?} fin{} stale{} bytes{} | next grant {:?}",
            c.version,
            c.step,
            c.buffer_groups,
            c.leases.accepted,
            c.leases.running(),
            c.leases.pending_reissue(),
            c.trainer_wait_s,
            c.dropped,
            c.train_metrics,
            c.finished(),
            c.max_staleness_seen,
            c.version_bytes,
            next,
        )
    }

    #[test]
    fn a_refused_publish_changes_nothing() {
        let (_, leases) = core();
        let bad: Vec<PublishVersionRequest> = vec![
            PublishVersionRequest {
                version: 1,
                step: 1,
                resumed: true,
                buffered_leases: vec![],
                trained_leases: leases.clone(),
                metrics: HashMap::from([("loss".to_string(), f64::NAN)]),
                dropped: HashMap::from([("stale".to_string(), 2)]),
                ..Default::default()
            },
            PublishVersionRequest {
                version: 4,
                step: 4,
                trained_leases: leases.clone(),
                wait_seconds: -1.0,
                finished: true,
                staleness: vec![1, 2],
                ..Default::default()
            },
            PublishVersionRequest {
                version: 2,
                step: 4,
                trained_leases: leases.clone(),
                buffer_groups: 7,
                ..Default::default()
            },
            PublishVersionRequest {
                version: 4,
                step: 4,
                trained_leases: leases.clone(),
                version_bytes: tandem_proto::limits::WEIGHT_VERSION_BYTES + 1,
                ..Default::default()
            },
        ];
        for r in bad {
            let (mut before, _) = core();
            let (mut after, _) = core();
            let e = after.publish(&r).unwrap_err();
            assert!(
                matches!(
                    e.code(),
                    tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                ),
                "{e}"
            );
            assert_eq!(observe(&mut before), observe(&mut after), "{r:?}");
        }
    }

    #[test]
    fn an_accepted_publish_and_a_resume_change_the_run() {
        let (mut c, leases) = core();
        let fresh = observe(&mut core().0);
        c.publish(&PublishVersionRequest {
            version: 4,
            step: 4,
            trained_leases: leases.clone(),
            wait_seconds: 0.5,
            metrics: HashMap::from([("loss".to_string(), 0.25)]),
            version_bytes: 1 << 20,
            ..Default::default()
        })
        .unwrap();
        assert_eq!((c.version, c.step, c.trainer_wait_s), (4, 4, 0.5));
        assert_eq!(c.version_bytes, 1 << 20);
        assert_ne!(observe(&mut c), fresh);
        // A publish that does not report the bytes keeps the last reported.
        c.publish(&PublishVersionRequest {
            version: 5,
            step: 5,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.version_bytes, 1 << 20);
        // A trainer that resumed from version 1 rewinds: what was committed since and
        // not buffered is leased again.
        let (mut c, _) = core();
        c.publish(&PublishVersionRequest {
            version: 1,
            step: 1,
            resumed: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.version, 1);
        assert!(!c.leases.pending_reissue().is_empty());
    }
}
