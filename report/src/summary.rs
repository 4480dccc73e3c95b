//! `summary.json`: a run in numbers — its length in steps and wall time, the median
//! step time, when the reward first reached a target, the reward at its start and end,
//! the worst staleness and mismatch KL, throughput, the held-out accuracy before and
//! after.

use serde::Serialize;
use serde_json::Value;

use crate::log::{field, RunLog};
use crate::stats::{mean, median, time_to_target};

/// Steps averaged for `reward_first_5`, `reward_last_5` and `time_to_target`.
pub const WINDOW: usize = 5;

/// When the run's reward first reached the target (mean over [`WINDOW`] steps).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TimeToTarget {
    pub reward_target: f64,
    pub window: usize,
    /// The last step of the first window at the target.
    pub step: f64,
    /// Seconds from the start of the first step to the end of that one.
    pub seconds: f64,
}

/// The report's summary; `None` (JSON `null`) where the run's logs do not say.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// The last step logged.
    pub steps: Option<f64>,
    /// From the start of the first step to the end of the last.
    pub wall_seconds: f64,
    pub median_step_seconds: Option<f64>,
    /// A step's seconds over its completions (`sequences`), the median over steps.
    pub median_step_seconds_per_completion: Option<f64>,
    pub time_to_target: Option<TimeToTarget>,
    /// The mean `reward_mean` of the first and the last [`WINDOW`] steps.
    pub reward_first_5: Option<f64>,
    pub reward_last_5: Option<f64>,
    pub staleness_max: f64,
    pub mismatch_kl_max: f64,
    /// Trained completion tokens per wall second, the mean over steps.
    pub tokens_per_second_mean: f64,
    pub eval_accuracy_first: Option<f64>,
    pub eval_accuracy_last: Option<f64>,
    /// Records of the held-out set of the last evaluation (`eval_held_out`: `[data]
    /// eval_fraction`'s held-out side or `[eval] path`'s records; none for the synthetic
    /// task).
    pub eval_held_out: Option<f64>,
    /// The plots' file names.
    pub plots: Vec<&'static str>,
}

impl Summary {
    /// The summary of `run` (which has at least one step), with `time_to_target` for
    /// `reward_target`; `plots` are listed as given.
    pub fn of(run: &RunLog, reward_target: f64, plots: Vec<&'static str>) -> Self {
        let rows = &run.rows;
        let (first, last) = (&rows[0], &rows[rows.len() - 1]);
        let at = |r: &Value, k: &str| field(r, k).unwrap_or(0.0);
        // The run starts when its first step did.
        let start = at(first, "unix_time") - at(first, "step_seconds");
        let n = rows.len().min(WINDOW);
        let values =
            |xs: &[Value], k: &str| -> Vec<f64> { xs.iter().filter_map(|r| field(r, k)).collect() };
        let max = |k: &str| values(rows, k).into_iter().fold(0.0, f64::max);
        let per_completion = rows
            .iter()
            .filter_map(|r| Some(field(r, "step_seconds")? / field(r, "sequences")?.max(1.0)))
            .collect();
        let throughput: Vec<f64> = run.throughput().iter().map(|p| p.1).collect();
        let accuracy = |r: Option<&Value>| r.and_then(|r| field(r, "eval_accuracy"));
        Summary {
            steps: field(last, "step"),
            wall_seconds: at(last, "unix_time") - start,
            median_step_seconds: median(values(rows, "step_seconds")),
            median_step_seconds_per_completion: median(per_completion),
            time_to_target: time_to_target(rows, reward_target, WINDOW).map(|(step, t)| {
                TimeToTarget {
                    reward_target,
                    window: WINDOW,
                    step,
                    seconds: t - start,
                }
            }),
            reward_first_5: mean(&values(&rows[..n], "reward_mean")),
            reward_last_5: mean(&values(&rows[rows.len() - n..], "reward_mean")),
            staleness_max: max("staleness_max"),
            mismatch_kl_max: max("mismatch_kl"),
            tokens_per_second_mean: mean(&throughput).unwrap_or(0.0),
            eval_accuracy_first: accuracy(run.evals.first()),
            eval_accuracy_last: accuracy(run.evals.last()),
            eval_held_out: run.evals.last().and_then(|r| field(r, "eval_held_out")),
            plots,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_summary_reads_what_the_steps_say() {
        // Seven steps of 10 s each, ending at t = 110, 120, …, 170; the first started
        // at t = 100.
        let rewards = [0.0, 0.2, 0.4, 1.0, 1.0, 1.0, 1.0];
        let rows = rewards
            .iter()
            .enumerate()
            .map(|(i, r)| {
                json!({
                    "step": i + 1, "unix_time": 110.0 + 10.0 * i as f64, "step_seconds": 10.0,
                    "sequences": 4.0, "tokens": 200.0 * (i + 1) as f64, "reward_mean": r,
                    "staleness_max": (i % 3) as f64, "mismatch_kl": 1e-3 * i as f64,
                })
            })
            .collect();
        let run = RunLog {
            rows,
            evals: vec![json!({"step": 0, "eval_accuracy": 0.1}), json!({"step": 7})],
        };
        let s = Summary::of(&run, 0.7, vec!["reward.svg"]);
        assert_eq!(s.steps, Some(7.0));
        assert_eq!(s.wall_seconds, 70.0);
        assert_eq!(s.median_step_seconds, Some(10.0));
        assert_eq!(s.median_step_seconds_per_completion, Some(2.5));
        // Windows of 5: 0.52, 0.72 → first at step 6, 60 s after the start.
        assert_eq!(
            s.time_to_target,
            Some(TimeToTarget {
                reward_target: 0.7,
                window: 5,
                step: 6.0,
                seconds: 60.0
            })
        );
        assert!((s.reward_first_5.unwrap() - 0.52).abs() < 1e-12);
        assert!((s.reward_last_5.unwrap() - 0.88).abs() < 1e-12);
        assert_eq!(s.staleness_max, 2.0);
        assert!((s.mismatch_kl_max - 6e-3).abs() < 1e-15);
        // Steps 2..7 trained 400..1400 tokens in 10 s each: 90 tokens/s on average.
        assert!((s.tokens_per_second_mean - 90.0).abs() < 1e-9);
        assert_eq!(s.eval_accuracy_first, Some(0.1));
        assert_eq!(s.eval_accuracy_last, None);
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["time_to_target"]["seconds"], 60.0);
        assert_eq!(v["eval_accuracy_last"], Value::Null);
    }
}
