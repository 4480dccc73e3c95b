//! What the coordinator exports from its state beyond the counters its handlers
//! increment: gauges of the state, and the series computed at scrape time.

use std::collections::BTreeMap;
use std::time::Instant;

use tandem_proto::v1::Role;

use crate::metrics as m;
use crate::state::{Core, GeneratorSeries};

impl Core {
    /// Sets the gauges that mirror the state (version, step, leases, workers, buffer).
    pub fn export_gauges(&self) {
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
        metrics::counter!(m::WEIGHT_SYNC_BYTES).absolute(self.weight_sync_bytes);
        metrics::counter!(m::EPISODES_FAILED).absolute(self.episodes_failed);
        metrics::counter!(m::GROUPS_RETRIED).absolute(self.groups_retried);
        for (reason, n) in &self.groups_failed {
            metrics::counter!(m::GROUPS_FAILED, "reason" => *reason).absolute(*n);
        }
        metrics::gauge!(m::WEIGHT_VERSION_BYTES).set(self.version_bytes as f64);
        for (k, v) in &self.train_metrics {
            metrics::gauge!(m::train_metric_name(k)).set(*v);
        }
    }

    /// The series computed at scrape time, in Prometheus text format: the float-valued
    /// counters, and every per-generator series (version, lag, tokens, prefill and
    /// prefix-cache tokens, wait, sync failures, heartbeat age) of each live generator: a generator that left or was
    /// dropped has no series, rather than a frozen one. Two live workers with one name
    /// (a generator registered again before its old id was dropped) share a series:
    /// the newest id's version, the name's counters.
    pub fn render_computed(&self, now: Instant) -> String {
        let mut out = format!(
            "# HELP {t} Seconds the trainer waited for data\n# TYPE {t} counter\n{t} {}\n",
            self.trainer_wait_s,
            t = m::TRAINER_WAIT
        );
        // Name → (policy version, heartbeat age) of its newest live id.
        let mut live: BTreeMap<&str, (u64, f64)> = BTreeMap::new();
        let mut lags: BTreeMap<&str, u64> = BTreeMap::new();
        for (&id, w) in self
            .members
            .iter()
            .filter(|(_, w)| w.role == Role::Generator)
        {
            let age = now.saturating_duration_since(w.last_seen).as_secs_f64();
            live.insert(w.name.as_str(), (w.policy_version, age));
            lags.insert(w.name.as_str(), self.lag(id, w));
        }
        if live.is_empty() {
            return out;
        }
        let none = GeneratorSeries::default();
        let series = |name: &str| self.generator_series.get(name).unwrap_or(&none);
        let families: [Family<'_>; 8] = [
            (
                m::GENERATOR_POLICY_VERSION,
                "gauge",
                "Policy version each generator holds",
                &|_, v, _| v.to_string(),
            ),
            (
                m::GENERATOR_LAG,
                "gauge",
                "Published version minus the version at which the generator's oldest open lease was granted (0 with none)",
                &|n, _, _| lags.get(n).copied().unwrap_or(0).to_string(),
            ),
            (
                m::GENERATED_TOKENS,
                "counter",
                "Completion tokens generated, per generator",
                &|n, _, _| series(n).generated_tokens.to_string(),
            ),
            (
                m::PREFILL_TOKENS,
                "counter",
                "Prompt tokens each generator's engine computed (prefix-cache hits not included)",
                &|n, _, _| series(n).prefill_tokens.to_string(),
            ),
            (
                m::PREFIX_CACHE_HIT_TOKENS,
                "counter",
                "Prompt tokens each generator's engine took from its prefix cache instead of computing them",
                &|n, _, _| series(n).prefix_cache_hit_tokens.to_string(),
            ),
            (
                m::GENERATOR_WAIT,
                "counter",
                "Seconds generators waited for leases",
                &|n, _, _| series(n).wait_s.to_string(),
            ),
            (
                m::WEIGHT_SYNC_FAILURES,
                "counter",
                "Weight fetches that failed or timed out, per generator",
                &|n, _, _| series(n).weight_sync_failures.to_string(),
            ),
            (
                m::HEARTBEAT_AGE,
                "gauge",
                "Seconds since each live generator's last heartbeat",
                &|_, _, age| age.to_string(),
            ),
        ];
        for (family, kind, help, value) in families {
            out += &format!("# HELP {family} {help}\n# TYPE {family} {kind}\n");
            for (name, &(version, age)) in &live {
                out += &format!(
                    "{family}{{generator=\"{}\"}} {}\n",
                    escape_label(name),
                    value(name, version, age)
                );
            }
        }
        out
    }
}

/// A per-generator family: name, type, help, and its value from (generator name,
/// policy version, heartbeat age).
type Family<'a> = (
    &'static str,
    &'static str,
    &'static str,
    &'a dyn Fn(&str, u64, f64) -> String,
);

/// A Prometheus label value with `\\`, `"` and newlines escaped (names have no control
/// characters: Register refuses them).
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
