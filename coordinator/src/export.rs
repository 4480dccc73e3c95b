//! What the coordinator exports from its state beyond the counters its handlers
//! increment: gauges of the state, and the series computed at scrape time.

use std::time::Instant;

use tandem_proto::v1::Role;

use crate::metrics as m;
use crate::state::Core;

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
        for (k, v) in &self.train_metrics {
            metrics::gauge!(m::train_metric_name(k)).set(*v);
        }
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
}

/// A Prometheus label value with `\\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
