//! SFT records: a dataset record becomes token ids and the positions the loss trains
//! (the assistant's tokens only).
//!
//! Records follow TRL's fields: `messages` (a conversation of `{role, content}` turns),
//! or `prompt` (a string or a conversation) with `completion` (a string or assistant
//! turns). Other fields are ignored.

use serde::{Deserialize, Serialize};
use tandem_model::{ChatMessage, Tokenizer};

use crate::error::{invalid, Result};

/// Which assistant tokens a conversation trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Masking {
    /// Every assistant turn (TRL's `assistant_only_loss`).
    #[default]
    AllAssistant,
    /// Only the last assistant turn; earlier turns are context.
    LastTurn,
}

/// One SFT record.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// A conversation with at least one assistant turn.
    Conversation(Vec<ChatMessage>),
    /// Plain text: the completion follows the prompt directly (no chat template).
    Text { prompt: String, completion: String },
}

const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

pub(crate) fn messages(v: &serde_json::Value, at: &str, field: &str) -> Result<Vec<ChatMessage>> {
    let list = v.as_array().ok_or_else(|| {
        invalid(format!(
            "{at}: `{field}` must be a string or a list of {{role, content}} messages"
        ))
    })?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(|r| r.as_str());
            let content = m.get("content").and_then(|c| c.as_str());
            match (role, content) {
                (Some(r), Some(c)) if ROLES.contains(&r) => Ok(ChatMessage {
                    role: r.to_string(),
                    content: c.to_string(),
                }),
                (Some(r), Some(_)) => Err(invalid(format!(
                    "{at}: `{field}` message {i} has role {r:?}; use system, user, assistant or tool"
                ))),
                _ => Err(invalid(format!(
                    "{at}: `{field}` message {i} needs string `role` and `content`"
                ))),
            }
        })
        .collect()
}

impl Example {
    /// Parses a record; `at` (`FILE:LINE`) and the field name every error.
    pub fn from_row(v: &serde_json::Value, at: &str) -> Result<Self> {
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let ex = match (field("messages"), field("prompt"), field("completion")) {
            (Some(m), None, None) => Example::Conversation(messages(m, at, "messages")?),
            (Some(_), _, _) => {
                return Err(invalid(format!(
                    "{at}: give `messages`, or `prompt` with `completion`, not both"
                )))
            }
            (None, Some(p), Some(c)) => match (p, c) {
                (serde_json::Value::String(p), serde_json::Value::String(c)) => Example::Text {
                    prompt: p.clone(),
                    completion: c.clone(),
                },
                (p, c) => {
                    let mut turns = match p {
                        serde_json::Value::String(s) => vec![ChatMessage::user(s.clone())],
                        other => messages(other, at, "prompt")?,
                    };
                    match c {
                        serde_json::Value::String(s) => turns.push(ChatMessage {
                            role: "assistant".into(),
                            content: s.clone(),
                        }),
                        other => {
                            let c = messages(other, at, "completion")?;
                            if c.iter().any(|m| m.role != "assistant") {
                                return Err(invalid(format!(
                                    "{at}: `completion` turns must all be assistant turns"
                                )));
                            }
                            turns.extend(c);
                        }
                    }
                    Example::Conversation(turns)
                }
            },
            (None, Some(_), None) => {
                return Err(invalid(format!("{at}: `prompt` needs a `completion`")))
            }
            (None, None, Some(_)) => {
                return Err(invalid(format!("{at}: `completion` needs a `prompt`")))
            }
            (None, None, None) => {
                let keys: Vec<&String> = v
                    .as_object()
                    .map(|o| o.keys().collect())
                    .unwrap_or_default();
                return Err(invalid(format!(
                    "{at}: needs `messages`, or `prompt` and `completion` (found {keys:?})"
                )));
            }
        };
        match &ex {
            Example::Text { completion, .. } if completion.is_empty() => {
                return Err(invalid(format!("{at}: `completion` is empty")))
            }
            Example::Conversation(turns) => {
                if !turns.iter().any(|m| m.role == "assistant") {
                    return Err(invalid(format!(
                        "{at}: the conversation has no assistant turn to learn from"
                    )));
                }
                if let Some(i) = turns
                    .iter()
                    .position(|m| m.role == "assistant" && m.content.is_empty())
                {
                    return Err(invalid(format!("{at}: assistant message {i} is empty")));
                }
            }
            _ => {}
        }
        Ok(ex)
    }
}

/// Token ids of one record and the indices the loss trains (each ≥ 1: a token is
/// predicted from the ones before it).
#[derive(Clone, Debug, PartialEq)]
pub struct Tokenized {
    pub ids: Vec<u32>,
    pub targets: Vec<usize>,
}

/// How records become tokens.
pub struct Render<'a> {
    pub tokenizer: &'a Tokenizer,
    /// A system turn put first in conversations that have none.
    pub system: Option<&'a str>,
    pub masking: Masking,
    /// Appended to text completions (conversations end their turns by the template).
    pub eos: Option<u32>,
    /// Longer sequences are cut to this many tokens.
    pub max_len: usize,
}

impl<'a> Render<'a> {
    /// The render for model `p`: its tokenizer and end token, sequences cut to
    /// `max_len` or the model's context, whichever is shorter.
    pub fn for_model(
        p: &'a tandem_model::Pretrained,
        system: Option<&'a str>,
        masking: Masking,
        max_len: usize,
    ) -> Self {
        let c = p.model.config();
        Render {
            tokenizer: &p.tokenizer,
            system,
            masking,
            eos: c.eos_token_ids.first().copied(),
            max_len: max_len.min(c.max_position_embeddings),
        }
    }

    /// The ids and trained positions of `ex`; `None` when truncation leaves nothing to
    /// train.
    ///
    /// A conversation is rendered by the chat template; assistant turn k spans the
    /// tokens from the end of `template(turns[..k], add_generation_prompt)` to the end
    /// of `template(turns[..=k])`, each of which must be a token prefix of the whole
    /// (true of templates that render turn by turn, such as ChatML). The span includes
    /// the turn's end marker, so the model learns to stop.
    pub fn tokenize(&self, ex: &Example) -> Result<Option<Tokenized>> {
        let (mut ids, mut targets) = match ex {
            Example::Text { prompt, completion } => {
                // BOS first where the model's tokenizer adds one, as transformers' SFT.
                let mut ids = self.tokenizer.encode_prompt(prompt)?;
                if ids.is_empty() {
                    return Err(invalid("`prompt` is empty after tokenization"));
                }
                let start = ids.len();
                ids.extend(self.tokenizer.encode(completion)?);
                ids.extend(self.eos);
                let targets = (start..ids.len()).collect();
                (ids, targets)
            }
            Example::Conversation(turns) => {
                let mut turns = turns.clone();
                if let (Some(s), false) = (
                    self.system,
                    turns.first().is_some_and(|m| m.role == "system"),
                ) {
                    turns.insert(
                        0,
                        ChatMessage {
                            role: "system".into(),
                            content: s.to_string(),
                        },
                    );
                }
                let t = self.tokenizer;
                let ids = t.encode(&t.apply_chat_template(&turns, false)?)?;
                let assistant: Vec<usize> = turns
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.role == "assistant")
                    .map(|(k, _)| k)
                    .collect();
                let trained = match self.masking {
                    Masking::AllAssistant => &assistant[..],
                    Masking::LastTurn => &assistant[assistant.len() - 1..],
                };
                let prefix = |k: usize, open: bool| -> Result<usize> {
                    let p = t.encode(&t.apply_chat_template(&turns[..k], open)?)?;
                    if !ids.starts_with(&p) {
                        return Err(invalid(format!(
                            "the chat template does not render turn {k} as a prefix of the conversation, so assistant tokens cannot be located; use a turn-by-turn template"
                        )));
                    }
                    Ok(p.len())
                };
                let mut targets = Vec::new();
                for &k in trained {
                    let (a, b) = (prefix(k, true)?, prefix(k + 1, false)?);
                    targets.extend(a.max(1)..b);
                }
                (ids, targets)
            }
        };
        if ids.len() > self.max_len {
            ids.truncate(self.max_len);
            targets.retain(|&j| j < self.max_len);
        }
        Ok((!targets.is_empty()).then_some(Tokenized { ids, targets }))
    }
}
