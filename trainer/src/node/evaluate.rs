//! Held-out evaluation inside a run: before the first step, every `[eval] every`
//! steps and after the last, the trainer hands its current weights to an
//! [`Evaluator`] (the binary provides one that samples and scores the held-out set:
//! the trainer itself neither samples nor scores) and records the `eval_*` metrics in
//! `RUN_DIR/eval.jsonl` (one line per evaluation, step 0 included) and in that step's
//! `metrics.jsonl` line and published metrics. Evaluating blocks the learner for its
//! duration (the generators keep sampling into the buffer meanwhile).

use std::collections::BTreeMap;
use std::path::Path;

use tandem_model::Pretrained;

use crate::error::Result;

/// Evaluates a policy on a held-out set.
pub trait Evaluator {
    /// The `eval_*` metrics of `policy`'s current weights.
    fn evaluate(&mut self, policy: &Pretrained) -> Result<BTreeMap<String, f64>>;
}

/// An evaluator and how often it runs.
pub struct Evaluations {
    /// Steps between evaluations (≥ 1).
    pub every: u64,
    pub evaluator: Box<dyn Evaluator>,
}

impl Evaluations {
    /// Whether an evaluation follows step `step` (the last step always has one).
    pub fn due(&self, step: u64, last: bool) -> bool {
        last || step.is_multiple_of(self.every.max(1))
    }

    /// Evaluates `policy` at `step` (0 = before training), appends the line to
    /// `RUN_DIR/eval.jsonl` and returns the metrics.
    pub fn run(
        &mut self,
        policy: &Pretrained,
        step: u64,
        version: u64,
        run_dir: &Path,
    ) -> Result<BTreeMap<String, f64>> {
        let t0 = std::time::Instant::now();
        let metrics = self.evaluator.evaluate(policy)?;
        let mut line = serde_json::json!({"step": step, "version": version});
        for (k, v) in &metrics {
            line[k] = (*v).into();
        }
        line["eval_seconds"] = t0.elapsed().as_secs_f64().into();
        tandem_model::durable::append_line(&run_dir.join("eval.jsonl"), &line.to_string())?;
        tracing::info!(
            step,
            accuracy = format!(
                "{:.3}",
                metrics.get("eval_accuracy").copied().unwrap_or(f64::NAN)
            ),
            seconds = format!("{:.1}", t0.elapsed().as_secs_f64()),
            "held-out evaluation"
        );
        Ok(metrics)
    }
}
