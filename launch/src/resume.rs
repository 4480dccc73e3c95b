//! An earlier run in the run folder, and what `tandem run` does with it. A folder
//! holds a run once a step was logged (`metrics.jsonl`), a checkpoint written or the
//! final model saved. `tandem run` refuses such a folder unless told: `--resume`
//! continues the run (the coordinator from its saved state, the trainer from its newest
//! checkpoint, `metrics.jsonl` and `eval.jsonl` appended to), `--fresh` starts over
//! (the earlier run's outputs deleted). Nothing is deleted without being asked, except
//! the leftovers of a run that never logged a step nor wrote a checkpoint.

use std::path::Path;

use crate::{Error, Result};

/// What the command line asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new run (the folder must not hold one).
    New,
    /// `--resume`: continue the run in the folder.
    Resume,
    /// `--fresh`: delete the earlier run's outputs and start over.
    Fresh,
}

impl Mode {
    pub fn of(resume: bool, fresh: bool) -> Self {
        match (resume, fresh) {
            (true, _) => Mode::Resume,
            (false, true) => Mode::Fresh,
            (false, false) => Mode::New,
        }
    }
}

/// The files and folders a run writes in its folder besides its logs, tokens and
/// config, with `state_file` (the coordinator's saved state): what `--fresh` deletes.
pub fn outputs(state_file: &str) -> Vec<String> {
    [
        "metrics.jsonl",
        "eval.jsonl",
        state_file,
        "checkpoints",
        "final",
        "trainer-summary.json",
        "coordinator-status.json",
        "stale-groups.txt",
        "batches",
        "report",
        "samples.jsonl",
        "tensorboard",
    ]
    .map(String::from)
    .to_vec()
}

/// What an earlier run left in a folder.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Earlier {
    /// The last step in `metrics.jsonl` (0: none).
    pub step: u64,
    /// The step of the newest checkpoint (`checkpoints/latest`), if any.
    pub checkpoint: Option<u64>,
    /// The trainer did the last step (`trainer-summary.json`).
    pub finished: bool,
}

impl Earlier {
    /// The run in `dir`, when it holds one (a step logged, a checkpoint or a final
    /// model).
    pub fn find(dir: &Path) -> Option<Earlier> {
        let step = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["step"].as_u64())
            .max()
            .unwrap_or(0);
        let checkpoint = std::fs::read_to_string(dir.join("checkpoints/latest"))
            .ok()
            .and_then(|name| name.trim().strip_prefix("step-")?.parse().ok());
        let finished = dir.join("trainer-summary.json").exists();
        let e = Earlier {
            step,
            checkpoint,
            finished,
        };
        (step > 0 || checkpoint.is_some() || finished || dir.join("final").exists()).then_some(e)
    }

    /// "step 12 logged, checkpoint of step 10".
    pub fn describe(&self) -> String {
        let mut out = format!("step {} logged", self.step);
        match self.checkpoint {
            Some(c) => out += &format!(", checkpoint of step {c}"),
            None => out += ", no checkpoint",
        }
        if self.finished {
            out += ", finished";
        }
        out
    }
}

/// What a run does with its folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Continue: the trainer with `--resume`, nothing deleted.
    pub resume: bool,
    /// What is deleted before the run starts (names in the folder).
    pub remove: Vec<String>,
}

/// Decides what a run in `dir` does under `mode`; the refusals name the folder, what it
/// holds and the commands that go on (`command(flag)`: this command line with the flag).
pub fn decide(
    dir: &Path,
    mode: Mode,
    outputs: &[String],
    command: &dyn Fn(&str) -> String,
) -> Result<Decision> {
    let start_over = Decision {
        resume: false,
        remove: outputs.to_vec(),
    };
    let shown = dir.display();
    match (mode, Earlier::find(dir)) {
        (Mode::Fresh, _) | (Mode::New, None) => Ok(start_over),
        (Mode::New, Some(e)) => Err(Error::Invalid(format!(
            "[run] run_dir: {shown} already holds a run ({}). Continue it: `{}`; or delete it and start over: `{}`; or set [run] run_dir to another folder",
            e.describe(),
            command("--resume"),
            command("--fresh")
        ))),
        (Mode::Resume, None) => Err(Error::Invalid(format!(
            "--resume: {shown} holds no run to continue (no step logged, no checkpoint); leave out --resume to start one: `{}`",
            command("")
        ))),
        (Mode::Resume, Some(e)) if e.finished => Err(Error::Invalid(format!(
            "--resume: the run in {shown} is finished ({}): nothing to continue; start over with `{}`",
            e.describe(),
            command("--fresh")
        ))),
        (Mode::Resume, Some(e)) if e.checkpoint.is_none() => Err(Error::Invalid(format!(
            "--resume: {shown} has no checkpoint to continue from ({}; the run was killed before its first [trainer] checkpoint_every); start over with `{}`",
            e.describe(),
            command("--fresh")
        ))),
        (Mode::Resume, Some(_)) => Ok(Decision {
            resume: true,
            remove: Vec::new(),
        }),
    }
}

/// What `tandem run` prints after a stop: the step reached, what the folder keeps, and
/// the command that continues the run.
pub fn kept(dir: &Path, outcome: &crate::Outcome, resume: &str) -> String {
    let how = match outcome.ending {
        crate::Ending::Killed => "killed",
        _ => "stopped",
    };
    let earlier = Earlier::find(dir).unwrap_or_default();
    let step = earlier.step.max(outcome.step);
    let checkpoint = match earlier.checkpoint {
        Some(c) if c < step => format!(
            "the checkpoint of step {c} (steps {}–{step} are done again)",
            c + 1
        ),
        Some(c) => format!("the checkpoint of step {c}"),
        None => "no checkpoint (nothing to continue: the run starts over with --fresh)".into(),
    };
    format!(
        "{how} at step {step}: {} keeps {checkpoint}, metrics.jsonl, the coordinator's state and logs/\ncontinue with: {resume}",
        dir.display()
    )
}

/// This command line (`args` without the program) as one to type: `tandem` and the
/// arguments, without `--resume` and `--fresh`, then `flag` (when not empty); quoted
/// for a POSIX shell where needed.
pub fn command_line(args: &[String], flag: &str) -> String {
    let mut words = vec!["tandem".to_string()];
    words.extend(
        args.iter()
            .filter(|a| *a != "--resume" && *a != "--fresh")
            .map(|a| quote(a)),
    );
    if !flag.is_empty() {
        words.push(flag.to_string());
    }
    words.join(" ")
}

/// `word` as a POSIX shell reads it: as is when it holds only safe characters, else
/// in single quotes.
fn quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(flag: &str) -> String {
        command_line(&["run".into(), "a b.toml".into(), "--fresh".into()], flag)
    }

    #[test]
    fn an_earlier_run_is_refused_unless_resumed_or_started_over() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let outputs = outputs("coordinator.redb");
        // Empty, or only the leftovers of a run that never logged a step: a new run.
        std::fs::write(dir.join("coordinator.redb"), "").unwrap();
        let new = decide(dir, Mode::New, &outputs, &command).unwrap();
        assert!(!new.resume && new.remove.contains(&"coordinator.redb".to_string()));
        let e = decide(dir, Mode::Resume, &outputs, &command)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds no run") && e.contains("`tandem run 'a b.toml'`"),
            "{e}"
        );
        // Steps logged, no checkpoint: refused; --resume cannot, --fresh can.
        std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1}\n{\"step\":2}\n").unwrap();
        let e = decide(dir, Mode::New, &outputs, &command)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[run] run_dir")
                && e.contains("already holds a run (step 2 logged, no checkpoint)")
                && e.contains("`tandem run 'a b.toml' --resume`")
                && e.contains("`tandem run 'a b.toml' --fresh`"),
            "{e}"
        );
        let e = decide(dir, Mode::Resume, &outputs, &command)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no checkpoint to continue from"), "{e}");
        // A checkpoint: resumed, nothing removed.
        std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
        std::fs::write(dir.join("checkpoints/latest"), "step-000002").unwrap();
        assert_eq!(
            Earlier::find(dir).unwrap(),
            Earlier {
                step: 2,
                checkpoint: Some(2),
                finished: false
            }
        );
        let r = decide(dir, Mode::Resume, &outputs, &command).unwrap();
        assert!(r.resume && r.remove.is_empty());
        let f = decide(dir, Mode::Fresh, &outputs, &command).unwrap();
        assert!(!f.resume && f.remove == outputs);
        // Finished: nothing to resume.
        std::fs::write(dir.join("trainer-summary.json"), "{}").unwrap();
        let e = decide(dir, Mode::Resume, &outputs, &command)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is finished"), "{e}");
    }

    #[test]
    fn the_command_to_type_is_quoted() {
        let args: Vec<String> = [
            "run",
            "--config",
            "x.toml",
            "--set",
            "run.note=it's",
            "--resume",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            command_line(&args, "--resume"),
            r"tandem run --config x.toml --set 'run.note=it'\''s' --resume"
        );
        assert_eq!(Mode::of(true, false), Mode::Resume);
        assert_eq!(Mode::of(false, true), Mode::Fresh);
    }
}
