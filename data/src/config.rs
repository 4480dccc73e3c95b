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
        Ok(())
    }
}
