//! Prompt datasets: a JSONL or Parquet file with TRL's fields, or the built-in
//! synthetic arithmetic task. The coordinator walks them with a cursor (prompt index 0, 1, …;
//! a file repeats in a new order each epoch).
//!
//! JSONL lines: `{"prompt": "text"}` or `{"prompt": [{"role":..,"content":..}, ...]}`
//! or `{"messages": [...]}`, plus an optional reference answer `"answer"` or
//! `"ground_truth"` (string or number). A `messages` conversation that ends with an
//! assistant turn has that turn removed (it is the completion to learn, not the prompt).

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

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
            seed: 0,
            shuffle: true,
        }
    }
}

/// One turn of a prompt conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A prompt as the dataset gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptBody {
    Text(String),
    Messages(Vec<Message>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Prompt {
    pub body: PromptBody,
    /// Reference answer for verifiers.
    pub answer: Option<String>,
}

/// A prompt stream indexed from 0.
pub enum Dataset {
    Arithmetic(Arithmetic),
    Rows {
        rows: Vec<Prompt>,
        shuffle: bool,
        seed: u64,
    },
}

impl Dataset {
    /// Builds the configured dataset; a file is read and checked line by line now.
    pub fn load(cfg: &DataConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(match cfg.kind {
            DataKind::Arithmetic => Dataset::Arithmetic(Arithmetic {
                digits: cfg.digits,
                operators: cfg.operators.clone(),
                template: cfg.template.clone(),
                seed: cfg.seed,
            }),
            DataKind::Jsonl | DataKind::Parquet => {
                let path = cfg.path.as_deref().ok_or_else(|| {
                    invalid("[data] path: required with kind = \"jsonl\" or \"parquet\"")
                })?;
                Dataset::Rows {
                    rows: read_prompts(path, cfg.kind == DataKind::Parquet)?,
                    shuffle: cfg.shuffle,
                    seed: cfg.seed,
                }
            }
        })
    }

    /// The prompt at stream position `index` (files wrap around, one epoch per pass).
    pub fn get(&self, index: u64) -> Prompt {
        match self {
            Dataset::Arithmetic(a) => a.get(index),
            Dataset::Rows {
                rows,
                shuffle,
                seed,
            } => {
                let n = rows.len() as u64;
                let (epoch, pos) = (index / n, (index % n) as usize);
                if !shuffle {
                    return rows[pos].clone();
                }
                let mut order: Vec<usize> = (0..rows.len()).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ));
                rows[order[pos]].clone()
            }
        }
    }

    /// Rows in one epoch (None: endless).
    pub fn epoch_len(&self) -> Option<usize> {
        match self {
            Dataset::Arithmetic(_) => None,
            Dataset::Rows { rows, .. } => Some(rows.len()),
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
        Ok(())
    }
}

/// Synthetic arithmetic: prompt i is drawn from a stream seeded by (seed, i), so the
/// same index always gives the same problem, whichever generator asks.
pub struct Arithmetic {
    digits: u32,
    operators: Vec<String>,
    template: String,
    seed: u64,
}

impl Arithmetic {
    /// Operands uniform over the numbers with `digits` digits (0..=9 for one digit);
    /// for "-" the larger comes first, so answers are never negative.
    pub fn get(&self, index: u64) -> Prompt {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ index);
        let lo = if self.digits == 1 {
            0
        } else {
            10i64.pow(self.digits - 1)
        };
        let hi = 10i64.pow(self.digits) - 1;
        let mut a = rng.random_range(lo..=hi);
        let mut b = rng.random_range(lo..=hi);
        let op = &self.operators[rng.random_range(0..self.operators.len())];
        let answer = match op.as_str() {
            "+" => a + b,
            "-" => {
                if a < b {
                    std::mem::swap(&mut a, &mut b);
                }
                a - b
            }
            _ => a * b,
        };
        Prompt {
            body: PromptBody::Text(
                self.template
                    .replace("{question}", &format!("{a} {op} {b}")),
            ),
            answer: Some(answer.to_string()),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    prompt: Option<serde_json::Value>,
    messages: Option<Vec<Message>>,
    answer: Option<serde_json::Value>,
    ground_truth: Option<serde_json::Value>,
    /// Ignored here (SFT data carries it).
    #[allow(dead_code)]
    completion: Option<serde_json::Value>,
}

fn answer_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// One record of a dataset file: where it is (`FILE:LINE` or `FILE row N`, for errors)
/// and its fields as JSON.
pub struct Row {
    pub at: String,
    pub value: serde_json::Value,
}

/// Reads the records of a JSONL file (blank lines skipped) or, with `parquet`, of a
/// Parquet file (a null cell counts as absent; lists and structs become JSON arrays and
/// objects). Errors name the file and the line or row; an empty file is an error.
pub fn read_rows(path: &Path, parquet: bool) -> Result<Vec<Row>> {
    let cannot = |e: &dyn std::fmt::Display| {
        invalid(format!("[data] path: cannot read {}: {e}", path.display()))
    };
    let mut rows = Vec::new();
    if parquet {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = std::fs::File::open(path).map_err(|e| cannot(&e))?;
        let reader = SerializedFileReader::new(file)
            .map_err(|e| invalid(format!("{}: not a Parquet file: {e}", path.display())))?;
        let iter = reader
            .get_row_iter(None)
            .map_err(|e| invalid(format!("{}: {e}", path.display())))?;
        for (n, row) in iter.enumerate() {
            let at = format!("{} row {}", path.display(), n + 1);
            let row = row.map_err(|e| invalid(format!("{at}: {e}")))?;
            let mut obj = serde_json::Map::new();
            for (name, field) in row.get_column_iter() {
                let v = row_value(field);
                if !v.is_null() {
                    obj.insert(name.clone(), v);
                }
            }
            rows.push(Row {
                at,
                value: serde_json::Value::Object(obj),
            });
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| cannot(&e))?;
        for (n, raw) in text.lines().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), n + 1);
            let value: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| invalid(format!("{at}: {e}")))?;
            if !value.is_object() {
                return Err(invalid(format!("{at}: a line must be a JSON object")));
            }
            rows.push(Row { at, value });
        }
    }
    if rows.is_empty() {
        return Err(invalid(format!("{}: no records", path.display())));
    }
    Ok(rows)
}

/// Reads and checks a prompt file (JSONL, or Parquet with the same columns: `prompt` as
/// a string or a list of `{role, content}` structs, or `messages`; `answer` or
/// `ground_truth`); errors name the file, the line or row, and the field.
pub fn read_prompts(path: &Path, parquet: bool) -> Result<Vec<Prompt>> {
    read_rows(path, parquet)?
        .into_iter()
        .map(|r| {
            let line: Line =
                serde_json::from_value(r.value).map_err(|e| invalid(format!("{}: {e}", r.at)))?;
            parse_row(line, &r.at)
        })
        .collect()
}

/// A Parquet cell as JSON (strings, numbers, lists and structs; null for the rest).
fn row_value(f: &parquet::record::Field) -> serde_json::Value {
    use parquet::record::Field;
    match f {
        Field::Str(s) => s.clone().into(),
        Field::Bool(b) => (*b).into(),
        Field::Byte(x) => (*x).into(),
        Field::Short(x) => (*x).into(),
        Field::Int(x) => (*x).into(),
        Field::Long(x) => (*x).into(),
        Field::UByte(x) => (*x).into(),
        Field::UShort(x) => (*x).into(),
        Field::UInt(x) => (*x).into(),
        Field::ULong(x) => (*x).into(),
        Field::Float(x) => f64::from(*x).into(),
        Field::Double(x) => (*x).into(),
        Field::ListInternal(l) => l
            .elements()
            .iter()
            .map(row_value)
            .collect::<Vec<_>>()
            .into(),
        Field::Group(g) => g
            .get_column_iter()
            .map(|(k, v)| (k.clone(), row_value(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        _ => serde_json::Value::Null,
    }
}

/// One row (JSONL line or Parquet row) as a prompt; `at` locates it in errors.
fn parse_row(line: Line, at: &str) -> Result<Prompt> {
    let body = match (line.prompt, line.messages) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "{at}: give `prompt` or `messages`, not both"
            )))
        }
        (None, None) => return Err(invalid(format!("{at}: needs `prompt` or `messages`"))),
        (Some(serde_json::Value::String(s)), None) => PromptBody::Text(s),
        (Some(v @ serde_json::Value::Array(_)), None) => PromptBody::Messages(
            serde_json::from_value(v)
                .map_err(|e| invalid(format!("{at}: `prompt` as a conversation: {e}")))?,
        ),
        (Some(_), None) => {
            return Err(invalid(format!(
                "{at}: `prompt` must be a string or a list of {{role, content}} messages"
            )))
        }
        (None, Some(mut m)) => {
            if m.last().is_some_and(|t| t.role == "assistant") {
                m.pop();
            }
            PromptBody::Messages(m)
        }
    };
    match &body {
        PromptBody::Text(s) if s.trim().is_empty() => {
            return Err(invalid(format!("{at}: `prompt` is empty")))
        }
        PromptBody::Messages(m) if m.is_empty() => {
            return Err(invalid(format!(
                "{at}: the conversation has no prompt turn"
            )))
        }
        PromptBody::Messages(m) => {
            if let Some((i, t)) = m
                .iter()
                .enumerate()
                .find(|(_, t)| !["system", "user", "assistant", "tool"].contains(&t.role.as_str()))
            {
                return Err(invalid(format!(
                    "{at}: message {i} has role {:?}; use system, user, assistant or tool",
                    t.role
                )));
            }
        }
        _ => {}
    }
    let answer = match line.answer.or(line.ground_truth) {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            answer_text(&v)
                .ok_or_else(|| invalid(format!("{at}: `answer` must be a string or a number")))?,
        ),
    };
    Ok(Prompt { body, answer })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_deterministic_and_correct() {
        let cfg = DataConfig {
            operators: vec!["+".into(), "-".into(), "*".into()],
            digits: 2,
            ..Default::default()
        };
        let d = Dataset::load(&cfg).unwrap();
        for i in 0..200 {
            let p = d.get(i);
            assert_eq!(p, d.get(i));
            let PromptBody::Text(t) = &p.body else {
                panic!()
            };
            let q = t
                .strip_prefix("What is ")
                .unwrap()
                .split('?')
                .next()
                .unwrap();
            let parts: Vec<&str> = q.split(' ').collect();
            let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
            assert!((10..=99).contains(&a) && (10..=99).contains(&b), "{q}");
            let expect = match parts[1] {
                "+" => a + b,
                "-" => a - b,
                _ => a * b,
            };
            assert_eq!(p.answer.as_deref(), Some(expect.to_string().as_str()));
            assert!(expect >= 0);
        }
        assert_ne!(d.get(0), d.get(1));
    }

    #[test]
    fn jsonl_fields_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"prompt": "2+2?", "answer": 4}"#, "\n",
                r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "ground_truth": "x"}"#, "\n",
                "\n",
                r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}"#, "\n",
            ),
        )
        .unwrap();
        let rows = read_prompts(&path, false).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].body, PromptBody::Text("2+2?".into()));
        assert_eq!(rows[0].answer.as_deref(), Some("4"));
        let PromptBody::Messages(m) = &rows[1].body else {
            panic!()
        };
        assert_eq!(
            m.len(),
            1,
            "the assistant turn is the completion, not the prompt"
        );
        assert_eq!(rows[2].answer, None);
        let cfg = DataConfig {
            kind: DataKind::Jsonl,
            path: Some(path.clone()),
            ..Default::default()
        };
        let d = Dataset::load(&cfg).unwrap();
        let mut epoch: Vec<_> = (0..3).map(|i| format!("{:?}", d.get(i))).collect();
        epoch.sort();
        let mut all: Vec<_> = rows.iter().map(|r| format!("{r:?}")).collect();
        all.sort();
        assert_eq!(epoch, all, "an epoch visits every row once");

        for (line, needle) in [
            (r#"{"answer": 3}"#, "needs `prompt` or `messages`"),
            (r#"{"prompt": 5}"#, "`prompt` must be"),
            (r#"{"prompt": "x", "answer": [1]}"#, "`answer`"),
            (r#"{"prompt": "x", "colour": 1}"#, "colour"),
            (
                r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
                "robot",
            ),
            (r#"{"prompt": "   "}"#, "empty"),
            ("{not json", "p.jsonl:2"),
        ] {
            std::fs::write(&path, format!("{{\"prompt\": \"ok\"}}\n{line}\n")).unwrap();
            let e = read_prompts(&path, false).unwrap_err().to_string();
            assert!(e.contains("p.jsonl:2") && e.contains(needle), "{line}: {e}");
        }
    }

    /// A Parquet file written by pyarrow (tools/make_prompt_parquet.py) reads like JSONL.
    #[test]
    fn parquet_rows_read_like_jsonl() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/prompts.parquet");
        let cfg = DataConfig {
            kind: DataKind::Parquet,
            path: Some(path.clone()),
            shuffle: false,
            ..Default::default()
        };
        let d = Dataset::load(&cfg).unwrap();
        assert_eq!(d.epoch_len(), Some(3));
        assert_eq!(d.get(0).body, PromptBody::Text("What is 2+2?".into()));
        assert_eq!(d.get(0).answer.as_deref(), Some("4"));
        let PromptBody::Messages(m) = d.get(1).body else {
            panic!()
        };
        assert_eq!(
            m.iter().map(|t| t.role.as_str()).collect::<Vec<_>>(),
            ["system", "user"]
        );
        assert_eq!(m[1].content, "Capital of France?");
        assert_eq!(d.get(1).answer.as_deref(), Some("Paris"));
        assert_eq!(d.get(2).answer, None);
        assert_eq!(d.get(3), d.get(0), "the second epoch starts over");
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("x.parquet");
        std::fs::write(&bad, "not parquet").unwrap();
        let e = read_prompts(&bad, true).unwrap_err().to_string();
        assert!(e.contains("x.parquet") && e.contains("Parquet"), "{e}");
    }

    #[test]
    fn bad_config_is_named() {
        for (cfg, needle) in [
            (
                DataConfig {
                    digits: 0,
                    ..Default::default()
                },
                "digits",
            ),
            (
                DataConfig {
                    operators: vec!["/".into()],
                    ..Default::default()
                },
                "operators",
            ),
            (
                DataConfig {
                    template: "no slot".into(),
                    ..Default::default()
                },
                "template",
            ),
            (
                DataConfig {
                    kind: DataKind::Jsonl,
                    ..Default::default()
                },
                "path",
            ),
        ] {
            let e = Dataset::load(&cfg).err().unwrap().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
