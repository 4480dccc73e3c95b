//! Trainer checkpoints (ARCHITECTURE.md, "Checkpoints are atomic and complete"): the model as an HF folder (loadable by
//! transformers; under LoRA the adapter alone in PEFT's format, its base the run's
//! `[model] path`), the value head, the optimizer state, and `trainer.json` with the
//! step, the version and the rollout buffer. Written into a temporary folder, flushed
//! to disk (fsync of every file and folder) and renamed, the rename flushed too;
//! `RUN_DIR/checkpoints/latest` names the newest complete one. Pruning keeps the
//! highest step numbers (a reused run folder's old, higher-named checkpoints never
//! outrank by name a fresh one).
//!
//! The trainer has no random state of its own (sampling seeds live in generators, data
//! order in the coordinator), so step, version and buffer are all it needs to continue.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::node::buffer::Buffer;
use crate::node::learner::Learner;

/// `trainer.json`.
#[derive(Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub version: u64,
    pub buffer: Buffer,
    /// The dtype the run's `final/` model is saved in (`f32`, `bf16`, `f16`); absent in
    /// checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_dtype: Option<String>,
}

fn io(what: &str, path: &Path, e: impl std::fmt::Display) -> crate::Error {
    invalid(format!("{what} {}: {e}", path.display()))
}

/// Writes `RUN_DIR/checkpoints/step-N` atomically and points `latest` at it; keeps the
/// `keep` newest checkpoints.
pub fn save(run_dir: &Path, learner: &Learner, buffer: &Buffer, keep: usize) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| io("creating", &root, e))?;
    let name = format!("step-{:06}", learner.step);
    let dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io("removing", &tmp, e))?;
    }
    // The model folder itself (under LoRA the adapter alone) is written atomically, in
    // the dtype the weights are trained in, so that `--resume` goes on from exactly them.
    let dtype = learner.policy.model.dtype();
    tandem_model::save_policy(&learner.policy, &tmp, dtype, &learner.base)?;
    if let Some(c) = &learner.critic {
        c.save(&tmp, tandem_model::VALUE_HEAD_FILE)?;
    }
    learner.opt.save(&tmp)?;
    let state = TrainerState {
        step: learner.step,
        version: learner.version,
        buffer: buffer.clone(),
        save_dtype: Some(tandem_model::checkpoint::dtype_name(learner.save_dtype).into()),
    };
    let text = serde_json::to_string(&state).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(tmp.join("trainer.json"), text).map_err(|e| io("writing", &tmp, e))?;
    tandem_model::durable::sync_tree(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io("removing", &dir, e))?;
    }
    tandem_model::durable::publish(&tmp, &dir)?;
    tandem_model::write_atomic(&root.join("latest"), &name)?;
    prune(&root, learner.step, keep)?;
    Ok(dir)
}

/// The step of a checkpoint folder name `step-N`.
fn step_of(path: &Path) -> Option<u64> {
    path.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

/// Removes checkpoints beyond the `keep` with the highest step numbers, never the one
/// of `current` (the one just written): one from a later step than `current` is left
/// over from an earlier run in the same folder and goes first.
fn prune(root: &Path, current: u64, keep: usize) -> Result<()> {
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .map_err(|e| io("listing", root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Some((step_of(&p)?, p)))
        .collect();
    // Newest first: the current one, then the older ones by step; stale later ones last.
    all.sort_by_key(|(s, _)| (*s != current, *s > current, std::cmp::Reverse(*s)));
    for (_, old) in all.iter().skip(keep.max(1)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}

/// The version of the oldest complete checkpoint kept in `run_dir` (0 = none): no
/// resume can go back past it.
pub fn resumable_from(run_dir: &Path) -> u64 {
    let root = run_dir.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| Some((step_of(&p)?, p)))
        .min_by_key(|(s, _)| *s)
        .and_then(|(_, p)| load_state(&p).ok())
        .map_or(0, |st| st.version)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let root = run_dir.join("checkpoints");
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(|e| io("reading", &pointer, e))?;
    let dir = root.join(name.trim());
    if !dir.join("trainer.json").exists() {
        return Err(invalid(format!(
            "{} names {}, which is incomplete",
            pointer.display(),
            dir.display()
        )));
    }
    Ok(Some(dir))
}

/// Reads a checkpoint's `trainer.json`.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io("reading", &path, e))?;
    serde_json::from_str(&text).map_err(|e| io("parsing", &path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pruning keeps the newest by step number: `step-100000` left by an earlier run
    /// in a reused folder (which sorts after `step-000040` by name, and would have
    /// outranked it) goes first, and the checkpoint just written always stays.
    #[test]
    fn pruning_keeps_the_newest_steps_not_the_latest_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "step-000020",
            "step-000030",
            "step-000040",
            "step-100000",
            "latest",
        ] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
        }
        prune(dir.path(), 40, 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec!["latest", "step-000030", "step-000040"]);
    }
}
