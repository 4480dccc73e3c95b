//! The fields of a turn request read and checked: the chat and completions bodies'
//! common fields, `logprobs` / `top_logprobs`, `return_token_ids`, stops; each refused
//! with the field's name and its bound.

use super::*;

/// An optional boolean field (null = absent).
pub(super) fn flag(v: &Value, field: &str) -> Result<bool, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("{field}: {} must be true or false", short(other))),
    }
}

/// An optional integer field in `lo..=hi` (null = absent).
pub(super) fn integer(v: &Value, field: &str, lo: u64, hi: u64) -> Result<Option<u64>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "{field}: {} must be an integer from {lo} to {hi}",
                short(x)
            )),
        },
    }
}

/// A value as the start of its JSON, for an error message.
pub(super) fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Fields both turn endpoints read the same way.
pub(super) fn common(v: &Value) -> Result<usize, String> {
    if flag(v, "stream")? {
        return Err("stream: streaming is not served; send \"stream\": false".into());
    }
    match v.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(n) => {
            return Err(format!(
                "n: {} choices asked; one is served per request (the group's samples are episodes of their own)",
                short(n)
            ))
        }
    }
    for field in ["temperature", "top_p"] {
        match v.get(field) {
            None | Some(Value::Null) => {}
            Some(x) if x.as_f64().is_some_and(|t| t.is_finite() && t >= 0.0) => {}
            Some(x) => return Err(format!("{field}: {} must be a number ≥ 0", short(x))),
        }
    }
    match v
        .get("max_completion_tokens")
        .filter(|m| !m.is_null())
        .or_else(|| v.get("max_tokens"))
    {
        None | Some(Value::Null) => Ok(usize::MAX),
        Some(m) => match m.as_u64() {
            Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            _ => Err(format!("max_tokens: {} must be an integer ≥ 1", short(m))),
        },
    }
}

/// What a turn request asks for.
pub(super) enum Kind {
    Chat {
        messages: Vec<chat_episode::Message>,
        tools: Vec<Value>,
    },
    Text {
        prompt: Prompt,
        stop: Vec<String>,
    },
}

/// What the reply carries beside the turn.
#[derive(Clone, Copy, Default)]
pub(super) struct Extras {
    /// Chat: `logprobs: true`; completions: `logprobs` was given.
    pub(super) logprobs: bool,
    /// Most likely tokens per token (chat `top_logprobs`, completions `logprobs`).
    pub(super) top: usize,
    /// vLLM's `return_token_ids`: `prompt_token_ids` and each choice's `token_ids`.
    pub(super) token_ids: bool,
    /// vLLM's `return_tokens_as_token_ids`: tokens named `token_id:<id>`.
    pub(super) tokens_as_ids: bool,
}

/// A turn request, checked.
pub(super) struct Asked {
    pub(super) episode: String,
    pub(super) kind: Kind,
    pub(super) max_tokens: usize,
    pub(super) extras: Extras,
}

/// A `/v1/chat/completions` request's fields, checked; the error names the field.
pub(super) fn read_chat(v: &Value) -> Result<(Kind, usize, Extras), String> {
    let max_tokens = common(v)?;
    let messages = chat_episode::parse_messages(
        v.get("messages")
            .and_then(Value::as_array)
            .ok_or("messages: missing (a list of {\"role\", \"content\"})")?,
    )?;
    let tools = match v.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(t)) => chat_episode::parse_tools(t)?,
        Some(_) => return Err("tools: must be a list".into()),
    };
    let logprobs = flag(v, "logprobs")?;
    let top = integer(v, "top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?.unwrap_or(0) as usize;
    if top > 0 && !logprobs {
        return Err("top_logprobs: needs \"logprobs\": true".into());
    }
    let extras = Extras {
        logprobs,
        top,
        token_ids: flag(v, "return_token_ids")?,
        tokens_as_ids: flag(v, "return_tokens_as_token_ids")?,
    };
    Ok((Kind::Chat { messages, tools }, max_tokens, extras))
}

/// A `/v1/completions` request's fields, checked against the vocabulary (`vocab`) and
/// the context; the error names the field.
pub(super) fn read_completions(
    v: &Value,
    vocab: usize,
    context: usize,
) -> Result<(Kind, usize, Extras), String> {
    let max_tokens = common(v)?;
    if flag(v, "echo")? {
        return Err("echo: the prompt is not echoed; send \"echo\": false (return_token_ids gives prompt_token_ids)".into());
    }
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Prompt::Text(items[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            if items.len() >= context {
                return Err(format!(
                    "prompt: {} tokens, the model's context {}",
                    items.len(),
                    context
                ));
            }
            let ids = items
                .iter()
                .enumerate()
                .map(|(i, x)| match x.as_u64() {
                    Some(id) if id < vocab as u64 => Ok(id as u32),
                    _ => Err(format!(
                        "prompt[{i}]: {} is not a token id below the vocabulary size {vocab}",
                        short(x)
                    )),
                })
                .collect::<Result<Vec<u32>, String>>()?;
            Prompt::Tokens(ids)
        }
        None | Some(Value::Null) => {
            return Err("prompt: missing (a string, or a list of token ids)".into())
        }
        Some(_) => {
            return Err("prompt: one prompt per request: a string, or a list of token ids".into())
        }
    };
    if matches!(&prompt, Prompt::Text(t) if t.is_empty())
        || matches!(&prompt, Prompt::Tokens(t) if t.is_empty())
    {
        return Err("prompt: empty; at least one token is needed".into());
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOP => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("stop[{i}]: must be a string"))
            })
            .collect::<Result<Vec<String>, String>>()?,
        Some(Value::Array(items)) => {
            return Err(format!("stop: {} strings, at most {MAX_STOP}", items.len()))
        }
        Some(_) => return Err("stop: must be a string or a list of strings".into()),
    };
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(format!(
                "stop[{i}]: {} bytes; a stop string has 1 to {MAX_STOP_BYTES}",
                s.len()
            ));
        }
    }
    let logprobs = integer(v, "logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
    let extras = Extras {
        logprobs: logprobs.is_some(),
        top: logprobs.unwrap_or(0) as usize,
        token_ids: flag(v, "return_token_ids")?,
        tokens_as_ids: flag(v, "return_tokens_as_token_ids")?,
    };
    Ok((Kind::Text { prompt, stop }, max_tokens, extras))
}
