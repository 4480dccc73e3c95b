//! Dataset files: JSONL or Parquet records with TRL's fields. Every record is read and
//! checked when the file is loaded; errors name the file, the line or row, and the field.
//!
//! Prompt records: `{"prompt": "text"}` or `{"prompt": [{"role":..,"content":..}, ...]}`
//! or `{"messages": [...]}`, plus an optional reference answer `"answer"` or
//! `"ground_truth"` (string or number) and an optional `"info"` (verifiers' name: a JSON
//! object, or a string holding one, as `datasets` stores a dict whose keys vary). A
//! `messages` conversation that ends with an assistant turn has that turn removed (it is
//! the completion to learn, not the prompt).
//!
//! Datasets as they come: every other field of a record (`source`, `level`, `solution`,
//! a `ground_truth` beside an `answer`, …) rides along in its info, under its own name,
//! beside the keys of the record's `info` object. A field that is also a key of `info`
//! must hold the same value there (a copy), else the record is refused naming both. A
//! null field counts as absent. `[data] columns` maps a file's own names (or dotted paths
//! into nested objects and Parquet structs) to `prompt`, `answer` and `info`; a mapped
//! field missing from a record refuses it (file and line or row named); what a dotted
//! path reads is taken out of its parent, the rest of the parent rides in info.
//!
//! A record's info, as compact JSON, is at most [`INFO_BYTES`].

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::{Columns, DataConfig, DataKind};
use crate::error::{invalid, Result};
use crate::prompt::{Message, Prompt, PromptBody};

/// A record's `info` (its own object and its extra fields), as compact JSON, is at most
/// this many bytes. It travels with every lease of the record, so it is the bound of
/// `PromptLease.info_json` on the wire: the same number as
/// `tandem_proto::limits::INFO_BYTES` (this crate depends on no other Tandem crate; a
/// test of the coordinator checks that the two agree).
pub const INFO_BYTES: usize = 64 << 10;

fn answer_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
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
/// `ground_truth`; `info`; any other column into info); errors name the file, the line
/// or row, and the field.
pub fn read_prompts(path: &Path, parquet: bool) -> Result<Vec<Prompt>> {
    read_prompts_with(path, parquet, None)
}

/// [`read_prompts`] with `[data] columns`: the file's own names of the prompt, the
/// answer and the info.
pub fn read_prompts_with(
    path: &Path,
    parquet: bool,
    columns: Option<&Columns>,
) -> Result<Vec<Prompt>> {
    if let Some(c) = columns {
        c.validate()?;
    }
    read_rows(path, parquet)?
        .into_iter()
        .map(|r| match r.value {
            Value::Object(fields) => parse_record(fields, columns, &r.at),
            _ => Err(invalid(format!("{}: a record must be an object", r.at))),
        })
        .collect()
}

/// A Parquet cell as JSON: strings (and binary cells holding UTF-8), numbers (dates as
/// days and timestamps as milli- or microseconds since the epoch), lists, structs and
/// maps (keys as text); null for the rest.
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
        Field::Float16(x) => f64::from(*x).into(),
        Field::Float(x) => f64::from(*x).into(),
        Field::Double(x) => (*x).into(),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => s.into(),
            Err(_) => serde_json::Value::Null,
        },
        Field::Date(x) => (*x).into(),
        Field::TimestampMillis(x) | Field::TimestampMicros(x) => (*x).into(),
        Field::MapInternal(m) => m
            .entries()
            .iter()
            .map(|(k, v)| {
                let key = match row_value(k) {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (key, row_value(v))
            })
            .collect::<serde_json::Map<_, _>>()
            .into(),
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

/// Takes field `name` out of `fields`: the field of that exact name, else the dotted
/// path through nested objects (emptied parents removed, so what is left of them rides
/// in info). A null counts as absent.
fn take(fields: &mut Map<String, Value>, name: &str) -> Option<Value> {
    if let Some(v) = fields.remove(name) {
        return (!v.is_null()).then_some(v);
    }
    let (head, rest) = name.split_once('.')?;
    let Some(Value::Object(inner)) = fields.get_mut(head) else {
        return None;
    };
    let v = take(inner, rest);
    if inner.is_empty() {
        fields.remove(head);
    }
    v
}

/// A mapped field of a record; refused when the record lacks it.
fn take_mapped(
    fields: &mut Map<String, Value>,
    target: &str,
    column: &str,
    at: &str,
) -> Result<Value> {
    take(fields, column).ok_or_else(|| {
        invalid(format!(
            "{at}: no field `{column}` ([data] columns.{target} = {column:?}); every record needs the fields [data] columns maps"
        ))
    })
}

/// One record (JSONL line or Parquet row) as a prompt, read through `columns`; `at`
/// locates it in errors.
fn parse_record(
    mut fields: Map<String, Value>,
    columns: Option<&Columns>,
    at: &str,
) -> Result<Prompt> {
    fields.retain(|_, v| !v.is_null());
    let tandem_s = Columns::default();
    let columns = columns.unwrap_or(&tandem_s);
    // The prompt: the mapped field, else `prompt` or `messages`.
    let (prompt, messages, prompt_name) = match &columns.prompt {
        Some(c) => (
            Some(take_mapped(&mut fields, "prompt", c, at)?),
            None,
            c.as_str(),
        ),
        None => (
            take(&mut fields, "prompt"),
            take(&mut fields, "messages"),
            "prompt",
        ),
    };
    let body = match (prompt, messages) {
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "{at}: give `prompt` or `messages`, not both"
            )))
        }
        (None, None) => return Err(invalid(format!("{at}: needs `prompt` or `messages`"))),
        (Some(Value::String(s)), None) => PromptBody::Text(s),
        (Some(v @ Value::Array(_)), None) => PromptBody::Messages(
            serde_json::from_value(v)
                .map_err(|e| invalid(format!("{at}: `{prompt_name}` as a conversation: {e}")))?,
        ),
        (Some(_), None) => {
            return Err(invalid(format!(
                "{at}: `{prompt_name}` must be a string or a list of {{role, content}} messages"
            )))
        }
        (None, Some(v)) => {
            let mut m: Vec<Message> =
                serde_json::from_value(v).map_err(|e| invalid(format!("{at}: `messages`: {e}")))?;
            if m.last().is_some_and(|t| t.role == "assistant") {
                m.pop();
            }
            PromptBody::Messages(m)
        }
    };
    match &body {
        PromptBody::Text(s) if s.trim().is_empty() => {
            return Err(invalid(format!("{at}: `{prompt_name}` is empty")))
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
    // The answer: the mapped field, else `answer`, else `ground_truth` (a
    // `ground_truth` beside an `answer` rides in info).
    let (answer, answer_name) = match &columns.answer {
        Some(c) => (Some(take_mapped(&mut fields, "answer", c, at)?), c.as_str()),
        None => match take(&mut fields, "answer") {
            Some(v) => (Some(v), "answer"),
            None => (take(&mut fields, "ground_truth"), "ground_truth"),
        },
    };
    let answer = match answer {
        None => None,
        Some(v) => Some(answer_text(&v).ok_or_else(|| {
            invalid(format!(
                "{at}: `{answer_name}` (the answer) must be a string or a number"
            ))
        })?),
    };
    // The info: the mapped field, else `info`; then every other field beside its keys.
    let (info, info_name) = match &columns.info {
        Some(c) => (Some(take_mapped(&mut fields, "info", c, at)?), c.as_str()),
        None => (take(&mut fields, "info"), "info"),
    };
    let mut info = match info {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(Value::String(text)) => match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => m,
            _ => {
                return Err(invalid(format!(
                    "{at}: `{info_name}` (the info) is a string that does not hold a JSON object; give an object, or a string holding one"
                )))
            }
        },
        Some(_) => {
            return Err(invalid(format!(
                "{at}: `{info_name}` (the info) must be a JSON object (or a string holding one)"
            )))
        }
    };
    for (name, value) in fields {
        match info.get(&name) {
            Some(same) if *same == value => {}
            Some(_) => {
                return Err(invalid(format!(
                    "{at}: field `{name}` and `{info_name}.{name}` hold different values; extra fields ride in the info beside its own keys, so rename one of them"
                )))
            }
            None => {
                info.insert(name, value);
            }
        }
    }
    let info = if info.is_empty() {
        None
    } else {
        let text = Value::Object(info).to_string();
        if text.len() > INFO_BYTES {
            return Err(invalid(format!(
                "{at}: the info (`{info_name}` and the extra fields) is {} bytes as JSON, over the limit of {INFO_BYTES} (tandem_proto::limits::INFO_BYTES: it travels with every lease); drop large fields from the file, or keep large data elsewhere under a key the reward service or environment looks up",
                text.len()
            )));
        }
        Some(text)
    };
    Ok(Prompt { body, answer, info })
}

/// The records of `cfg`'s JSONL or Parquet file (what the offline stages read).
pub fn read_records(cfg: &DataConfig) -> Result<Vec<Row>> {
    let path = cfg
        .path
        .as_deref()
        .ok_or_else(|| invalid("[data] path: required with kind = \"jsonl\" or \"parquet\""))?;
    read_rows(path, cfg.kind == DataKind::Parquet)
}
