//! A prompt as token ids: the model's chat template around the conversation (with an
//! optional system turn), or the raw text.

use tandem_model::{ChatMessage, Tokenizer};

use crate::error::{invalid, Result};

/// What a dataset row or a command line gives.
pub enum PromptInput<'a> {
    Text(&'a str),
    Messages(Vec<ChatMessage>),
}

/// Token ids of the prompt, ending where the assistant's answer begins (chat), or the
/// encoded text (raw).
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    input: PromptInput<'_>,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    let text = match (input, chat) {
        (PromptInput::Text(t), false) => t.to_string(),
        (PromptInput::Messages(_), false) => {
            return Err(invalid(
                "a conversation prompt needs the chat template: set [data] chat = true",
            ))
        }
        (input, true) => {
            let mut messages = Vec::new();
            if let Some(s) = system {
                messages.push(ChatMessage {
                    role: "system".into(),
                    content: s.to_string(),
                });
            }
            match input {
                PromptInput::Text(t) => messages.push(ChatMessage::user(t)),
                PromptInput::Messages(m) => messages.extend(m),
            }
            tokenizer.apply_chat_template(&messages, true)?
        }
    };
    let ids = tokenizer.encode(&text)?;
    if ids.is_empty() {
        return Err(invalid("the prompt is empty after tokenization"));
    }
    Ok(ids)
}
