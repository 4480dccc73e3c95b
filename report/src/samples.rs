//! What the model writes (`[run] log_samples`): every `log_samples` steps the trainer
//! appends a few of the step's completions, decoded, to `RUN_DIR/samples.jsonl`, one
//! JSON object per line ([`Sample`]); `tandem report` shows the latest step's.
//!
//! The text is the model's and hostile: it is stored JSON-escaped (serde), each text
//! cut to [`TEXT_BYTES`], and a terminal must escape its control characters before
//! showing it (the binary prints it through `tandem_proto::limits::printable`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The file in the run folder.
pub const FILE: &str = "samples.jsonl";

/// The most bytes of a prompt's or a completion's text a line keeps (cut at a
/// character boundary, the prompt from its end, the completion from its start).
pub const TEXT_BYTES: usize = 8192;

/// One completion of a step, as `samples.jsonl` holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub step: u64,
    /// The policy version the step trained (its result is `version + 1`).
    pub version: u64,
    /// The group (one prompt) the completion belongs to.
    pub group: String,
    /// Why it was picked: `best` or `worst` reward of its group.
    pub pick: String,
    /// The prompt's text as the model saw it (chat template included), its end kept.
    pub prompt_text: String,
    pub completion_text: String,
    /// Whether a text was cut to [`TEXT_BYTES`].
    pub truncated: bool,
    pub reward: f64,
    /// The completion's advantage: the mean over its trained tokens (absent when the
    /// step computed none).
    pub advantage: Option<f64>,
    /// The oldest and newest policy version among its tokens.
    pub versions: [u64; 2],
    /// The step's version minus the oldest token version.
    pub staleness: u64,
    pub completion_tokens: usize,
}

/// `text` with at most `max` bytes, keeping its start (`from_end` false) or its end,
/// cut at a character boundary; and whether it was cut.
pub fn cut(text: &str, max: usize, from_end: bool) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    if from_end {
        let mut at = text.len() - max;
        while !text.is_char_boundary(at) {
            at += 1;
        }
        (&text[at..], true)
    } else {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        (&text[..at], true)
    }
}

/// Appends `samples` to `RUN_DIR/samples.jsonl` (created with mode 0600, never through
/// a link), one line each, in one write.
pub fn append(run_dir: &Path, samples: &[Sample]) -> Result<()> {
    let path = run_dir.join(FILE);
    let mut text = String::new();
    for s in samples {
        text.push_str(&serde_json::to_string(s).expect("a sample serializes"));
        text.push('\n');
    }
    let io = |what| {
        let path = path.clone();
        move |cause| Error::Io { what, path, cause }
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io("opening (a link there is refused)"))?;
    f.write_all(text.as_bytes()).map_err(io("writing"))
}

/// The samples of the latest step in `RUN_DIR/samples.jsonl` (none when the file is
/// missing or empty). A line that is not a sample is skipped with a warning.
pub fn latest(run_dir: &Path) -> Result<Vec<Sample>> {
    let path = run_dir.join(FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let rows = tandem_model::durable::read_jsonl(&path).map_err(|cause| Error::Read {
        path: path.clone(),
        cause,
    })?;
    let samples: Vec<Sample> = rows
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| match serde_json::from_value(v) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(file = %path.display(), line = i + 1, "not a sample: {e}");
                None
            }
        })
        .collect();
    let last = samples.iter().map(|s| s.step).max();
    Ok(samples
        .into_iter()
        .filter(|s| Some(s.step) == last)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64, text: &str) -> Sample {
        Sample {
            step,
            version: step - 1,
            group: "g0".into(),
            pick: "best".into(),
            prompt_text: "1 + 1 =".into(),
            completion_text: text.into(),
            truncated: false,
            reward: 1.0,
            advantage: Some(0.5),
            versions: [step - 1, step - 1],
            staleness: 0,
            completion_tokens: 2,
        }
    }

    #[test]
    fn the_latest_step_is_read_back_escaped_and_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert!(latest(dir.path()).unwrap().is_empty());
        let hostile = "\u{1b}[2J\"}\n{\"step\":99}";
        append(dir.path(), &[sample(2, "a")]).unwrap();
        append(dir.path(), &[sample(4, hostile), sample(4, "b")]).unwrap();
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        let got = latest(dir.path()).unwrap();
        assert_eq!(got, [sample(4, hostile), sample(4, "b")]);
    }

    #[test]
    fn cuts_keep_whole_characters() {
        assert_eq!(cut("héllo", 2, false), ("h", true));
        assert_eq!(cut("héllo", 4, true), ("llo", true));
        assert_eq!(cut("héllo", 9, true), ("héllo", false));
    }

    #[test]
    fn a_link_in_place_of_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(FILE)).unwrap();
        let e = append(dir.path(), &[sample(1, "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("samples.jsonl"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "");
    }
}
