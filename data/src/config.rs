//! `[data]`: where prompts come from, checked before anything reads them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::template_kwargs::TemplateKwargs;

/// `[data]`: where prompts come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// arithmetic | jsonl | parquet.
    pub kind: DataKind,
    /// The prompt file (kind = "jsonl" or "parquet").
    pub path: Option<PathBuf>,
    /// Digits of each operand (arithmetic): 1 → 0..=9, 2 → 10..=99.
    pub digits: u32,
    /// Operators to draw from (arithmetic): any of "+", "-", "*".
    pub operators: Vec<String>,
    /// The prompt text; `{question}` becomes "a + b".
    pub template: String,
    /// Render prompts with the model's chat template (a user turn), or feed raw text.
    pub chat: bool,
    /// An optional system turn before each prompt (chat only).
    pub system: Option<String>,
    /// Extra variables for the chat template (Qwen3's `enable_thinking`, …), as
    /// transformers' `apply_chat_template(**kwargs)`.
    pub chat_template_kwargs: Option<TemplateKwargs>,
    /// Seed of the arithmetic draws and of the per-epoch order of a file.
    pub seed: u64,
    /// Visit a file's rows in a new random order each epoch.
    pub shuffle: bool,
    /// A file's own names for `prompt`, `answer` and `info` (dotted paths reach into
    /// nested objects and Parquet structs); unset = Tandem's names.
    pub columns: Option<Columns>,
    /// The share of a file's records held out for evaluation ([`crate::split`]): the
    /// training stream skips them, `[eval]` without a `path` reads exactly them; 0 = no
    /// split.
    pub eval_fraction: f64,
    /// Which side of the split a [`crate::Dataset`] loaded from this config reads (not
    /// a config key: the evaluation asks for the held-out side).
    #[serde(skip)]
    pub split: Split,
}

/// A side of `[data] eval_fraction`'s split of a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Split {
    /// The records trained on (every record without a split).
    #[default]
    Train,
    /// The records held out for evaluation.
    HeldOut,
}

/// `[data] columns`: which field of a record is the prompt, the answer and the info.
/// Each value is a field name, or a dotted path into nested objects (Parquet structs):
/// `"reward_model.ground_truth"`. A field named with the dots itself wins over the path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Columns {
    /// The prompt: text, or a list of `{role, content}` messages (unset: `prompt`, or
    /// `messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// The reference answer, a string or a number (unset: `answer`, or `ground_truth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// The record's info, a JSON object or a string holding one (unset: `info`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
}

/// Whether field path `inner` is `outer` or inside it (`a.b` is inside `a`).
fn inside(outer: &str, inner: &str) -> bool {
    inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('.'))
}

impl Columns {
    /// The mapped (target, column) pairs, in the order prompt, answer, info.
    pub fn mapped(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("prompt", self.prompt.as_deref()),
            ("answer", self.answer.as_deref()),
            ("info", self.info.as_deref()),
        ]
        .into_iter()
        .filter_map(|(target, column)| column.map(|c| (target, c)))
    }

    /// Each name is a field or a dotted path without empty parts, and no two targets
    /// read the same field (or one inside the other).
    pub fn validate(&self) -> Result<()> {
        let mapped: Vec<(&str, &str)> = self.mapped().collect();
        for (target, column) in &mapped {
            if column.is_empty() || column.split('.').any(str::is_empty) {
                return Err(invalid(format!(
                    "[data] columns.{target} = {column:?}: give a field name, or a dotted path like \"reward_model.ground_truth\""
                )));
            }
        }
        for (i, (a, x)) in mapped.iter().enumerate() {
            for (b, y) in &mapped[i + 1..] {
                if inside(x, y) || inside(y, x) {
                    return Err(invalid(format!(
                        "[data] columns: {a} = {x:?} and {b} = {y:?} read the same field; map each target to a field of its own"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    Arithmetic,
    Jsonl,
    Parquet,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            kind: DataKind::Arithmetic,
            path: None,
            digits: 1,
            operators: vec!["+".into()],
            template: "What is {question}? Answer with the number only.".into(),
            chat: true,
            system: None,
            chat_template_kwargs: None,
            seed: 0,
            shuffle: true,
            columns: None,
            eval_fraction: 0.0,
            split: Split::Train,
        }
    }
}

impl DataConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[data] {key}: {why}")));
        if !(1..=9).contains(&self.digits) {
            return bad("digits", "must be in 1..=9");
        }
        if self.operators.is_empty() {
            return bad("operators", "needs at least one of \"+\", \"-\", \"*\"");
        }
        if let Some(op) = self
            .operators
            .iter()
            .find(|o| !["+", "-", "*"].contains(&o.as_str()))
        {
            return bad(
                "operators",
                &format!("unknown operator {op:?}; use \"+\", \"-\" or \"*\""),
            );
        }
        if self.kind == DataKind::Arithmetic && !self.template.contains("{question}") {
            return bad("template", "must contain `{question}`");
        }
        if self.kind != DataKind::Arithmetic && self.path.is_none() {
            return bad("path", "required with kind = \"jsonl\" or \"parquet\"");
        }
        if let Some(k) = &self.chat_template_kwargs {
            k.validate()?;
        }
        if let Some(c) = &self.columns {
            c.validate()?;
        }
        if !(self.eval_fraction.is_finite() && (0.0..1.0).contains(&self.eval_fraction)) {
            return bad(
                "eval_fraction",
                &format!(
                    "{} must be in [0, 1): the share of the file's records held out for evaluation (0 = none)",
                    self.eval_fraction
                ),
            );
        }
        if self.kind == DataKind::Arithmetic && self.eval_fraction > 0.0 {
            return bad(
                "eval_fraction",
                "holds out records of a file (kind = \"jsonl\" or \"parquet\"); the synthetic task's held-out prompts are drawn with [eval] seed: set it to 0",
            );
        }
        Ok(())
    }
}
