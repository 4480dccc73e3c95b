//! Trainer checkpoints (ARCHITECTURE.md, "Checkpoints are atomic and complete"): the model as an HF folder (loadable by
//! transformers), the value head, the optimizer state, and `trainer.json` with the
//! step, the version and the rollout buffer. Written into a temporary folder and
//! renamed; `RUN_DIR/checkpoints/latest` names the newest complete one.
//!
//! The trainer has no random state of its own (sampling seeds live in generators, data
//! order in the coordinator), so step, version and buffer are all it needs to continue.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::buffer::Buffer;
use crate::error::{invalid, Result};
use crate::learner::Learner;

/// `trainer.json`.
#[derive(Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub version: u64,
    pub buffer: Buffer,
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
    // The model folder itself is written atomically by save_hf.
    tandem_model::save_hf(&learner.policy.model, &learner.policy.tokenizer, &tmp)?;
    if let Some(c) = &learner.critic {
        c.save(&tmp, tandem_model::VALUE_HEAD_FILE)?;
    }
    learner.opt.save(&tmp)?;
    let state = TrainerState {
        step: learner.step,
        version: learner.version,
        buffer: buffer.clone(),
    };
    let text = serde_json::to_string(&state).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(tmp.join("trainer.json"), text).map_err(|e| io("writing", &tmp, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| io("removing", &dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| io("renaming into", &dir, e))?;
    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(|e| io("writing", &latest_tmp, e))?;
    std::fs::rename(&latest_tmp, root.join("latest"))
        .map_err(|e| io("renaming", &latest_tmp, e))?;
    // Older checkpoints beyond `keep` go.
    let mut all: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(|e| io("listing", &root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    all.sort();
    for old in all.iter().rev().skip(keep.max(1)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dir)
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
