//! Preference records: one prompt and two or more responses ranked best first, for
//! reward models and DPO. Fields follow TRL: `prompt` (a string or a conversation)
//! with `chosen` and `rejected` (strings, or one assistant turn each) and an optional
//! numeric `margin`; or `prompt` with `ranked`, a list of responses best first
//! (Plackett–Luce). Other fields are ignored.

use tandem_model::ChatMessage;

use crate::error::{invalid, Result};
use crate::offline::sft::data::{self, Example, Render, Tokenized};

#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Turns(Vec<ChatMessage>),
}

/// One preference record.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub prompt: Prompt,
    /// Best first; at least two, all different and non-empty.
    pub responses: Vec<String>,
    /// How much better the first is than the second (Llama 2's margin), when given.
    pub margin: Option<f64>,
}

/// A comparison as token ids: one sequence per response, whose targets are the
/// response's tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub responses: Vec<Tokenized>,
    pub margin: Option<f64>,
}

fn response(v: &serde_json::Value, at: &str, field: &str) -> Result<String> {
    let text = match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(turns) => match &turns[..] {
            [t] if t.get("role").and_then(|r| r.as_str()) == Some("assistant") => t
                .get("content")
                .and_then(|c| c.as_str())
                .ok_or_else(|| invalid(format!("{at}: `{field}` needs a string `content`")))?
                .to_string(),
            _ => {
                return Err(invalid(format!(
                    "{at}: `{field}` as a list must hold exactly one assistant turn"
                )))
            }
        },
        _ => {
            return Err(invalid(format!(
                "{at}: `{field}` must be a string or one assistant turn"
            )))
        }
    };
    if text.trim().is_empty() {
        return Err(invalid(format!("{at}: `{field}` is empty")));
    }
    Ok(text)
}

impl Comparison {
    /// Parses a record; `at` (`FILE:LINE`) and the field name every error.
    pub fn from_row(v: &serde_json::Value, at: &str) -> Result<Self> {
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let prompt = match field("prompt") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => Prompt::Text(s.clone()),
            Some(serde_json::Value::String(_)) => {
                return Err(invalid(format!("{at}: `prompt` is empty")))
            }
            Some(p) => {
                let turns = data::messages(p, at, "prompt")?;
                if turns.is_empty() {
                    return Err(invalid(format!("{at}: `prompt` has no turn")));
                }
                Prompt::Turns(turns)
            }
            None => return Err(invalid(format!("{at}: needs `prompt`"))),
        };
        let (responses, margin) = match (field("chosen"), field("rejected"), field("ranked")) {
            (Some(c), Some(r), None) => {
                let margin = match field("margin") {
                    None => None,
                    Some(m) => Some(m.as_f64().filter(|m| m.is_finite()).ok_or_else(|| {
                        invalid(format!("{at}: `margin` must be a finite number"))
                    })?),
                };
                (
                    vec![response(c, at, "chosen")?, response(r, at, "rejected")?],
                    margin,
                )
            }
            (None, None, Some(serde_json::Value::Array(list))) => {
                let r = list
                    .iter()
                    .enumerate()
                    .map(|(i, x)| response(x, at, &format!("ranked[{i}]")))
                    .collect::<Result<Vec<_>>>()?;
                if r.len() < 2 {
                    return Err(invalid(format!(
                        "{at}: `ranked` needs at least 2 responses"
                    )));
                }
                (r, None)
            }
            (None, None, Some(_)) => {
                return Err(invalid(format!(
                    "{at}: `ranked` must be a list of responses, best first"
                )))
            }
            (Some(_), None, _) => {
                return Err(invalid(format!("{at}: `chosen` needs a `rejected`")))
            }
            (None, Some(_), _) => {
                return Err(invalid(format!("{at}: `rejected` needs a `chosen`")))
            }
            (Some(_), Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "{at}: give `chosen` and `rejected`, or `ranked`, not both"
                )))
            }
            (None, None, None) => {
                return Err(invalid(format!(
                    "{at}: needs `chosen` and `rejected` (or `ranked`)"
                )))
            }
        };
        for i in 0..responses.len() {
            if responses[..i].contains(&responses[i]) {
                return Err(invalid(format!(
                    "{at}: {} repeats an earlier response; a preference needs different responses",
                    if responses.len() == 2 {
                        "`rejected`".to_string()
                    } else {
                        format!("`ranked[{i}]`")
                    }
                )));
            }
        }
        Ok(Comparison {
            prompt,
            responses,
            margin,
        })
    }

    /// Prompt + each response as an SFT record (a conversation when `chat`).
    pub fn examples(&self, chat: bool) -> Result<Vec<Example>> {
        self.responses
            .iter()
            .map(|r| {
                Ok(match (&self.prompt, chat) {
                    (Prompt::Text(p), false) => Example::Text {
                        prompt: p.clone(),
                        completion: r.clone(),
                    },
                    (Prompt::Turns(_), false) => {
                        return Err(invalid(
                            "a conversation prompt needs the chat template: set [data] chat = true",
                        ))
                    }
                    (p, true) => {
                        let mut turns = match p {
                            Prompt::Text(t) => vec![ChatMessage::user(t.clone())],
                            Prompt::Turns(t) => t.clone(),
                        };
                        turns.push(ChatMessage {
                            role: "assistant".into(),
                            content: r.clone(),
                        });
                        Example::Conversation(turns)
                    }
                })
            })
            .collect()
    }

    /// Token ids of every response (the render's masking should be `LastTurn`); `None`
    /// when truncation leaves a response with no token.
    pub fn tokenize(&self, render: &Render<'_>, chat: bool) -> Result<Option<Tokens>> {
        let mut out = Vec::with_capacity(self.responses.len());
        for ex in self.examples(chat)? {
            match render.tokenize(&ex)? {
                Some(t) => out.push(t),
                None => return Ok(None),
            }
        }
        Ok(Some(Tokens {
            responses: out,
            margin: self.margin,
        }))
    }
}
