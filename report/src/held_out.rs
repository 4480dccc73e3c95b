//! The held-out accuracy before and after a run: its first and last evaluations in
//! `eval.jsonl`, the line `tandem run` ends with.

use std::path::Path;

use crate::log::field;

/// The first and last held-out evaluation of a run: (step, accuracy) each.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeldOut {
    pub first: (u64, f64),
    pub last: (u64, f64),
}

impl HeldOut {
    /// The first and last evaluations in `run_dir/eval.jsonl`; `None` when it has none
    /// (or one lacks its step or accuracy).
    pub fn read(run_dir: &Path) -> Option<Self> {
        let evals = tandem_model::durable::read_jsonl(&run_dir.join("eval.jsonl")).ok()?;
        let point = |v: &serde_json::Value| Some((v["step"].as_u64()?, field(v, "eval_accuracy")?));
        Some(HeldOut {
            first: point(evals.first()?)?,
            last: point(evals.last()?)?,
        })
    }

    /// "held-out accuracy A (step s) → B (step t) on P prompts × S at T = τ", for a held-out
    /// set of `prompts` prompts sampled `samples` times each at `temperature`.
    pub fn line(&self, prompts: usize, samples: usize, temperature: f64) -> String {
        format!(
            "held-out accuracy {:.2} (step {}) → {:.2} (step {}) on {prompts} prompts × {samples} at T = {temperature}",
            self.first.1, self.first.0, self.last.1, self.last.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_last_evaluations_make_the_line() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(HeldOut::read(dir.path()), None);
        std::fs::write(
            dir.path().join("eval.jsonl"),
            "{\"step\":0,\"eval_accuracy\":0.25}\n{\"step\":10,\"eval_accuracy\":0.5}\n{\"step\":20,\"eval_accuracy\":0.75}\n",
        )
        .unwrap();
        let h = HeldOut::read(dir.path()).unwrap();
        assert_eq!(
            h,
            HeldOut {
                first: (0, 0.25),
                last: (20, 0.75)
            }
        );
        assert_eq!(
            h.line(16, 4, 1.0),
            "held-out accuracy 0.25 (step 0) → 0.75 (step 20) on 16 prompts × 4 at T = 1"
        );
    }
}
