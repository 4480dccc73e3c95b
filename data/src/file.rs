//! Dataset files: JSONL or Parquet records with TRL's fields. Every record is read and
//! checked when the file is loaded; errors name the file, the line or row, and the field.
//!
//! Prompt records: `{"prompt": "text"}` or `{"prompt": [{"role":..,"content":..}, ...]}`
//! or `{"messages": [...]}`, plus an optional reference answer `"answer"` or
//! `"ground_truth"` (string or number). A `messages` conversation that ends with an
//! assistant turn has that turn removed (it is the completion to learn, not the prompt).

use std::path::Path;

use serde::Deserialize;

use crate::config::{DataConfig, DataKind};
use crate::error::{invalid, Result};
use crate::prompt::{Message, Prompt, PromptBody};

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

/// The records of `cfg`'s JSONL or Parquet file (what the offline stages read).
pub fn read_records(cfg: &DataConfig) -> Result<Vec<Row>> {
    let path = cfg
        .path
        .as_deref()
        .ok_or_else(|| invalid("[data] path: required with kind = \"jsonl\" or \"parquet\""))?;
    read_rows(path, cfg.kind == DataKind::Parquet)
}
