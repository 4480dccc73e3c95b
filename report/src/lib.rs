//! `tandem-report`: what a run did, read back from the files its trainer wrote —
//! `RUN_DIR/metrics.jsonl` (one line per step) and `RUN_DIR/eval.jsonl` (the held-out
//! evaluations). It draws the plots of `tandem report` (SVG), computes its summary
//! (wall time, step times, time to a reward target, staleness, throughput) and the
//! held-out line `tandem run` ends with. It reads files only: it knows no service and
//! no role. It also holds the two files a trainer writes for watching a run:
//! `samples.jsonl` (the model's text) and TensorBoard's event files.
//!
//! Modules: [`log`] (the run's rows and the series drawn from them), [`stats`]
//! (median, trailing means, time to target), [`summary`] (`summary.json`), [`plot`]
//! (which plots a run gets, and SVG drawing), [`held_out`] (the first and last
//! held-out evaluation), [`samples`] (`samples.jsonl`: a step's completions as text),
//! [`tensorboard`] (event files: TFRecord framing around `tensorflow.Event`).

#![forbid(unsafe_code)]

pub mod held_out;
pub mod log;
pub mod plot;
pub mod samples;
pub mod stats;
pub mod summary;
pub mod tensorboard;

use std::path::{Path, PathBuf};

pub use log::RunLog;
pub use summary::Summary;

/// What can go wrong reading a run or writing its report; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `metrics.jsonl` exists but holds no step.
    #[error("{}: no steps yet", .0.display())]
    NoSteps(PathBuf),
    /// A log could not be read, or a line of it (not the last) is not JSON.
    #[error("reading {}: {cause}", path.display())]
    Read {
        path: PathBuf,
        cause: tandem_model::Error,
    },
    #[error("{what} {}: {cause}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// Drawing a plot failed.
    #[error("plotting {}: {msg}", path.display())]
    Plot { path: PathBuf, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads `run_dir`'s logs and writes the report into `out` (created if missing): one
/// SVG per plot and `summary.json`. `reward_target` is the summary's
/// `time_to_target` threshold. Returns the summary.
pub fn write(run_dir: &Path, out: &Path, reward_target: f64) -> Result<Summary> {
    let run = RunLog::read(run_dir)?;
    std::fs::create_dir_all(out).map_err(|cause| Error::Io {
        what: "creating",
        path: out.to_path_buf(),
        cause,
    })?;
    let plots = plot::plots(&run);
    for p in &plots {
        p.write_svg(&out.join(p.file))?;
    }
    let summary = Summary::of(&run, reward_target, plots.iter().map(|p| p.file).collect());
    let path = out.join("summary.json");
    let text = serde_json::to_string_pretty(&summary).expect("a summary serializes");
    std::fs::write(&path, text).map_err(|cause| Error::Io {
        what: "writing",
        path,
        cause,
    })?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_writes_every_plot_and_the_summary_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let mut metrics = String::new();
        for step in 1..=6 {
            let r = serde_json::json!({
                "step": step, "unix_time": 100.0 + 10.0 * step as f64, "step_seconds": 10.0,
                "tokens": 500.0, "sequences": 8.0, "reward_mean": step as f64 / 6.0,
                "staleness_mean": 0.5, "staleness_max": 1.0, "loss": 0.1, "kl": 0.0,
                "mismatch_kl": 1e-4, "turns_per_episode": 2.0, "tool_calls_per_episode": 1.0,
                "tool_errors": 0.0,
            });
            metrics.push_str(&format!("{r}\n"));
        }
        std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
        std::fs::write(
            run.join("eval.jsonl"),
            "{\"step\":0,\"eval_accuracy\":0.25,\"eval_pass_at_1\":0.25,\"eval_pass_at_4\":0.5}\n{\"step\":6,\"eval_accuracy\":0.75,\"eval_pass_at_1\":0.75,\"eval_pass_at_4\":1.0,\"eval_held_out\":40}\n",
        )
        .unwrap();
        let out = run.join("report");
        let s = write(run, &out, 0.5).unwrap();
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(written, serde_json::to_value(&s).unwrap());
        assert_eq!(
            s.plots,
            [
                "reward.svg",
                "staleness.svg",
                "throughput.svg",
                "loss.svg",
                "kl.svg",
                "mismatch_kl.svg",
                "episodes.svg",
                "tool_errors.svg",
                "eval.svg"
            ]
        );
        for f in &s.plots {
            let svg = std::fs::read_to_string(out.join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{f}");
        }
        assert_eq!(s.steps, Some(6.0));
        assert_eq!(s.eval_accuracy_first, Some(0.25));
        assert_eq!(s.eval_accuracy_last, Some(0.75));
        assert_eq!(s.eval_held_out, Some(40.0));
        // 500 tokens every 10 s.
        assert!((s.tokens_per_second_mean - 50.0).abs() < 1e-9);
    }

    #[test]
    fn a_run_without_steps_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = write(dir.path(), &dir.path().join("r"), 0.9)
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.jsonl"), "{e}");
        std::fs::write(dir.path().join("metrics.jsonl"), "").unwrap();
        let e = write(dir.path(), &dir.path().join("r"), 0.9)
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.jsonl: no steps yet"), "{e}");
        assert!(!dir.path().join("r").exists());
    }
}
