//! A run's logs as the trainer wrote them: `metrics.jsonl`, one row per step (`step`,
//! `unix_time`, `step_seconds`, `tokens`, `reward_mean`, …), and `eval.jsonl`, one row
//! per held-out evaluation (`step`, `eval_accuracy`, `eval_pass_at_K`, …). A torn last
//! line (a crash mid-write) is skipped.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

/// One plotted series: (step, value) points.
pub type Points = Vec<(f64, f64)>;

/// The rows of a run's logs.
#[derive(Clone, Debug, Default)]
pub struct RunLog {
    /// `metrics.jsonl`, oldest first; never empty when read by [`RunLog::read`].
    pub rows: Vec<Value>,
    /// `eval.jsonl`, oldest first; empty when the run had no held-out evaluation.
    pub evals: Vec<Value>,
}

/// The number at `key` of a row, if it has one.
pub fn field(row: &Value, key: &str) -> Option<f64> {
    row[key].as_f64()
}

impl RunLog {
    /// Reads `run_dir/metrics.jsonl` (which must hold a step) and `run_dir/eval.jsonl`
    /// (when there is one).
    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        let rows = tandem_model::durable::read_jsonl(&path).map_err(|cause| Error::Read {
            path: path.clone(),
            cause,
        })?;
        if rows.is_empty() {
            return Err(Error::NoSteps(path));
        }
        let evals =
            tandem_model::durable::read_jsonl(&run_dir.join("eval.jsonl")).unwrap_or_default();
        Ok(RunLog { rows, evals })
    }

    /// `key` over steps: the rows that have both `step` and `key`.
    pub fn series(&self, key: &str) -> Points {
        points(&self.rows, key)
    }

    /// `key` of the held-out evaluations over steps.
    pub fn eval_series(&self, key: &str) -> Points {
        points(&self.evals, key)
    }

    /// Throughput over steps: a step's completion tokens per wall second since the step
    /// before it (the first step, and steps without a later clock, have none).
    pub fn throughput(&self) -> Points {
        self.rows
            .windows(2)
            .filter_map(|w| {
                let (t0, t1) = (field(&w[0], "unix_time")?, field(&w[1], "unix_time")?);
                let (step, tokens) = (field(&w[1], "step")?, field(&w[1], "tokens")?);
                (t1 > t0).then(|| (step, tokens / (t1 - t0)))
            })
            .collect()
    }

    /// Whether any step's episodes had more than one turn (a multi-turn run).
    pub fn multi_turn(&self) -> bool {
        self.rows
            .iter()
            .any(|r| field(r, "turns_per_episode").is_some_and(|t| t > 1.0))
    }

    /// The first `eval_pass_at_K` key with K > 1 of the first evaluation, if any.
    pub fn pass_at_k_key(&self) -> Option<&str> {
        self.evals
            .first()?
            .as_object()?
            .keys()
            .map(String::as_str)
            .find(|k| k.starts_with("eval_pass_at_") && *k != "eval_pass_at_1")
    }
}

fn points(rows: &[Value], key: &str) -> Points {
    rows.iter()
        .filter_map(|r| Some((field(r, "step")?, field(r, key)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn series_skip_rows_without_the_key_and_throughput_needs_a_clock() {
        let run = RunLog {
            rows: vec![
                json!({"step": 1, "unix_time": 10.0, "tokens": 100, "loss": 0.5}),
                json!({"step": 2, "unix_time": 14.0, "tokens": 200}),
                // The clock went backwards: no throughput for this step.
                json!({"step": 3, "unix_time": 13.0, "tokens": 300, "loss": 0.25}),
                json!({"step": 4, "unix_time": 23.0, "tokens": 50}),
            ],
            evals: vec![json!({"step": 0, "eval_pass_at_1": 0.5, "eval_pass_at_8": 0.9})],
        };
        assert_eq!(run.series("loss"), vec![(1.0, 0.5), (3.0, 0.25)]);
        assert_eq!(run.throughput(), vec![(2.0, 50.0), (4.0, 5.0)]);
        assert_eq!(run.eval_series("eval_pass_at_8"), vec![(0.0, 0.9)]);
        assert_eq!(run.pass_at_k_key(), Some("eval_pass_at_8"));
        assert!(!run.multi_turn());
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_eval_jsonl_is_optional() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":1,\"reward_mean\":0.5}\n{\"step\":2,\"rew",
        )
        .unwrap();
        let run = RunLog::read(dir.path()).unwrap();
        assert_eq!(run.series("reward_mean"), vec![(1.0, 0.5)]);
        assert!(run.evals.is_empty());
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":1}\nnot json\n{}\n",
        )
        .unwrap();
        let e = RunLog::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl:2"), "{e}");
    }
}
