//! Watching a run as it trains, beside `metrics.jsonl`: every `[run] log_samples`
//! steps a few of the step's completions decoded into `RUN_DIR/samples.jsonl`
//! ([`pick`]), and with `[run] tensorboard` TensorBoard event files under
//! `RUN_DIR/tensorboard/`: every number of each step's `metrics.jsonl` line as a
//! scalar (the held-out evaluation's `eval_*` included, step 0's too), and the samples
//! as a text summary (`samples`). A failure to write either is a warning: watching
//! never stops a run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tandem_model::Tokenizer;
use tandem_report::samples::{self, Sample, TEXT_BYTES};
use tandem_report::tensorboard::EventWriter;

use crate::error::{Context, Result};
use crate::rl::rollout::Rollout;

/// Whether step `step` logs samples with `[run] log_samples = every`.
pub fn samples_due(every: u64, step: u64) -> bool {
    every > 0 && step.is_multiple_of(every)
}

/// Groups of a step whose completions [`pick`] shows (the batch's first ones).
pub const SAMPLE_GROUPS: usize = 2;

/// The metrics.jsonl keys that are no scalar of their own: the event's step, and the
/// wall clock (the event's `wall_time`).
const NOT_SCALARS: [&str; 2] = ["step", "unix_time"];

/// Where samples and events go.
pub struct Watch {
    run_dir: PathBuf,
    events: Option<EventWriter>,
}

impl Watch {
    /// Opens a new event file when `tensorboard` (an error names the file and why).
    /// Nothing earlier is deleted here: `tandem run --fresh` removes an earlier run's
    /// `samples.jsonl` and `tensorboard/` with the rest of its outputs.
    pub fn open(run_dir: &Path, tensorboard: bool) -> Result<Self> {
        let dir = run_dir.join("tensorboard");
        let events = if tensorboard {
            let w = EventWriter::create(&dir)
                .with_context(|| "[run] tensorboard: the event file".to_string())?;
            tracing::info!(file = %w.path().display(), "TensorBoard events");
            Some(w)
        } else {
            None
        };
        Ok(Watch {
            run_dir: run_dir.to_path_buf(),
            events,
        })
    }

    /// A step's `metrics.jsonl` line and samples: the samples appended to
    /// `samples.jsonl`, and (with TensorBoard) the line's numbers as scalars and the
    /// samples as text, flushed.
    pub fn step(&mut self, step: u64, line: &serde_json::Value, picked: &[Sample]) {
        if !picked.is_empty() {
            if let Err(e) = samples::append(&self.run_dir, picked) {
                tracing::warn!("samples of step {step} not written: {e}");
            }
        }
        let Some(w) = self.events.as_mut() else {
            return;
        };
        let scalars = line
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !NOT_SCALARS.contains(&k.as_str()))
            .filter_map(|(k, v)| Some((k.as_str(), v.as_f64()?)));
        let mut written = w.scalars(step, scalars);
        if !picked.is_empty() && written.is_ok() {
            written = w.text(step, "samples", &markdown(picked));
        }
        if let Err(e) = written.and_then(|()| w.flush()) {
            tracing::warn!("TensorBoard events of step {step} not written: {e}");
        }
    }

    /// A held-out evaluation outside a step's line (the one before the first step).
    pub fn eval(&mut self, step: u64, metrics: &BTreeMap<String, f64>) {
        let line = serde_json::json!(metrics);
        self.step(step, &line, &[]);
    }
}

/// The samples of a step: of each of the batch's first [`SAMPLE_GROUPS`] groups, the
/// completion with the best reward (the first of equals) and the one with the worst
/// (the last of equals; none more when the group has one completion), decoded with their prompt, with reward,
/// advantage (`advantages[i]`: completion i's; none when the step computed none), token versions and staleness (the
/// trained `version` minus the oldest token version). A text that cannot be decoded
/// says so instead.
pub fn pick(
    rollouts: &[Rollout],
    advantages: &[f64],
    tokenizer: &Tokenizer,
    step: u64,
    version: u64,
) -> Vec<Sample> {
    let mut groups: Vec<&str> = Vec::new();
    for r in rollouts {
        if !groups.contains(&r.group.as_str()) && groups.len() < SAMPLE_GROUPS {
            groups.push(&r.group);
        }
    }
    let mut out = Vec::new();
    for g in groups {
        let members: Vec<usize> = (0..rollouts.len())
            .filter(|&i| rollouts[i].group == g)
            .collect();
        let by_reward =
            |a: &&usize, b: &&usize| rollouts[**a].reward.total_cmp(&rollouts[**b].reward);
        let best = members.iter().rev().max_by(by_reward).copied();
        let worst = members.iter().rev().min_by(by_reward).copied();
        for (pick, i) in [
            ("best", best),
            ("worst", worst.filter(|w| Some(*w) != best)),
        ] {
            if let Some(i) = i {
                let adv = advantages.get(i).copied().filter(|a| a.is_finite());
                out.push(sample(&rollouts[i], adv, pick, tokenizer, step, version));
            }
        }
    }
    out
}

/// One rollout as a [`Sample`].
fn sample(
    r: &Rollout,
    advantage: Option<f64>,
    pick: &str,
    tokenizer: &Tokenizer,
    step: u64,
    version: u64,
) -> Sample {
    let decode = |ids: &[u32]| {
        tokenizer
            .decode(ids, false)
            .unwrap_or_else(|e| format!("<not decodable: {e}>"))
    };
    let (prompt, completion) = (decode(&r.prompt_ids), decode(&r.completion_ids));
    let (prompt_text, cut_p) = samples::cut(&prompt, TEXT_BYTES, true);
    let (completion_text, cut_c) = samples::cut(&completion, TEXT_BYTES, false);
    let versions = r.versions.as_deref().unwrap_or_default();
    let oldest = r.oldest_version().unwrap_or(version);
    Sample {
        step,
        version,
        group: r.group.clone(),
        pick: pick.into(),
        prompt_text: prompt_text.into(),
        completion_text: completion_text.into(),
        truncated: cut_p || cut_c,
        reward: r.reward,
        advantage,
        versions: [
            versions.iter().copied().min().unwrap_or(version),
            versions.iter().copied().max().unwrap_or(version),
        ],
        staleness: version.saturating_sub(oldest),
        completion_tokens: r.completion_ids.len(),
    }
}

/// The samples as Markdown for TensorBoard's text tab: a heading line per sample, the
/// prompt's end and the completion as indented code blocks (every line indented, so
/// nothing the model wrote is read as Markdown or HTML).
pub fn markdown(picked: &[Sample]) -> String {
    let block = |text: &str| -> String {
        text.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    let mut out = String::new();
    for s in picked {
        let (prompt, _) = samples::cut(&s.prompt_text, 600, true);
        out += &format!(
            "**{} reward of group {}**: reward {:.4}, advantage {}, versions {}–{}, staleness {}, {} tokens\n\nprompt (end):\n\n{}\ncompletion:\n\n{}\n",
            s.pick,
            markdown_escape(&s.group),
            s.reward,
            s.advantage.map_or("-".into(), |a| format!("{a:.4}")),
            s.versions[0],
            s.versions[1],
            s.staleness,
            s.completion_tokens,
            block(prompt),
            block(&s.completion_text),
        );
    }
    out
}

/// `text` with Markdown's and HTML's special characters backslash-escaped.
fn markdown_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let esc = "\\`*_{}[]()#+-.!<>&|".contains(c);
            esc.then_some('\\').into_iter().chain([c])
        })
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(group: &str, reward: f64, versions: Vec<u64>) -> Rollout {
        Rollout {
            group: group.into(),
            prompt_ids: vec![1, 2],
            completion_ids: vec![3; versions.len()],
            behavior_logprobs: vec![-0.5; versions.len()],
            reward,
            versions: Some(versions),
            loss_mask: None,
            finish_reason: None,
            episode: None,
        }
    }

    #[test]
    fn the_best_and_worst_of_the_first_groups_are_picked() {
        let tok = tandem_model::preset::tiny_tokenizer(512).unwrap();
        let rollouts = [
            rollout("a", 0.0, vec![3, 4]),
            rollout("a", 1.0, vec![4, 4]),
            rollout("a", 0.5, vec![4]),
            rollout("b", 0.2, vec![4]),
            rollout("b", 0.2, vec![4]),
            rollout("c", 1.0, vec![4]),
        ];
        let adv = [-1.0, 1.0, 0.0, 0.0, 0.0, 0.0];
        let got = pick(&rollouts, &adv, &tok, 5, 4);
        let summary: Vec<(&str, &str, f64, f64)> = got
            .iter()
            .map(|s| {
                (
                    s.group.as_str(),
                    s.pick.as_str(),
                    s.reward,
                    s.advantage.unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("a", "best", 1.0, 1.0),
                ("a", "worst", 0.0, -1.0),
                ("b", "best", 0.2, 0.0),
                ("b", "worst", 0.2, 0.0)
            ]
        );
        assert_eq!((got[1].versions, got[1].staleness), ([3, 4], 1));
        assert!(got
            .iter()
            .all(|s| s.step == 5 && !s.completion_text.is_empty()));
    }

    #[test]
    fn a_trainer_start_deletes_nothing_and_writes_a_file_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (run, tb) = (dir.path(), dir.path().join("tensorboard"));
        std::fs::create_dir_all(&tb).unwrap();
        let old = tb.join("events.out.tfevents.1.old");
        for f in [&old, &run.join(samples::FILE)] {
            std::fs::write(f, "x").unwrap();
        }
        let w = Watch::open(run, true).unwrap();
        let new = w.events.as_ref().unwrap().path().to_path_buf();
        assert_ne!(new, old);
        Watch::open(run, false).unwrap();
        assert!(old.exists() && new.exists() && run.join(samples::FILE).exists());
    }

    #[test]
    fn markdown_indents_everything_the_model_wrote() {
        let s = Sample {
            step: 1,
            version: 0,
            group: "<b>g</b>".into(),
            pick: "best".into(),
            prompt_text: "q".into(),
            completion_text: "<script>x</script>\n# not a heading".into(),
            truncated: false,
            reward: 1.0,
            advantage: None,
            versions: [0, 0],
            staleness: 0,
            completion_tokens: 3,
        };
        let md = markdown(&[s]);
        assert!(
            md.contains("\n    <script>x</script>\n    # not a heading\n"),
            "{md}"
        );
        assert!(md.contains("\\<b\\>g\\</b\\>"), "{md}");
    }
}
