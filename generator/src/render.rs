//! A prompt as token ids: the model's chat template around the conversation (with an
//! optional system turn), or the raw text; `[data] chat_template_kwargs` set on the
//! tokenizer that renders it.

use tandem_data::DataConfig;
use tandem_model::{ChatMessage, Tokenizer};

use crate::error::{invalid, Result};

/// What a dataset row or a command line gives.
pub enum PromptInput<'a> {
    Text(&'a str),
    Messages(Vec<ChatMessage>),
}

/// Gives `tokenizer` the extra template variables of `[data] chat_template_kwargs`
/// (none when unset): every render of its chat template gets them, the prompts', the
/// environment's turn delimiters' and the agents' endpoint's alike.
pub fn set_template_kwargs(tokenizer: &mut Tokenizer, data: &DataConfig) -> Result<()> {
    let kwargs = data.chat_template_kwargs.clone().unwrap_or_default();
    kwargs.validate()?;
    tokenizer
        .set_chat_template_kwargs(kwargs.0)
        .map_err(|e| invalid(format!("[data] chat_template_kwargs: {e}")))
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
    // A raw prompt starts with BOS where the model's tokenizer adds one (Gemma); a
    // chat template writes its own.
    let ids = if chat {
        tokenizer.encode(&text)?
    } else {
        tokenizer.encode_prompt(&text)?
    };
    if ids.is_empty() {
        return Err(invalid("the prompt is empty after tokenization"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_data::{TemplateKwargs, TemplateValue};

    /// `[data] chat_template_kwargs` reaches the template: Qwen3's with
    /// `enable_thinking = false` opens the answer with an empty thinking block.
    #[test]
    fn template_kwargs_from_the_config_reach_every_render() {
        let mut tok = tandem_model::preset::preset_tokenizer("qwen3-0.6b", 512).unwrap();
        let text = |tok: &Tokenizer| {
            let ids =
                prompt_ids(tok, PromptInput::Text("2 + 2?"), true, Some("Be brief.")).unwrap();
            tok.decode(&ids, false).unwrap()
        };
        let plain = text(&tok);
        assert!(plain.ends_with("<|im_start|>assistant\n"), "{plain:?}");
        let mut data = DataConfig {
            chat_template_kwargs: Some(TemplateKwargs(vec![(
                "enable_thinking".into(),
                TemplateValue::Bool(false),
            )])),
            ..DataConfig::default()
        };
        set_template_kwargs(&mut tok, &data).unwrap();
        assert_eq!(text(&tok), format!("{plain}<think>\n\n</think>\n\n"));
        // Unset again: none.
        data.chat_template_kwargs = None;
        set_template_kwargs(&mut tok, &data).unwrap();
        assert_eq!(text(&tok), plain);
        // A reserved name is refused naming the key, and changes nothing.
        data.chat_template_kwargs = Some(TemplateKwargs(vec![(
            "messages".into(),
            TemplateValue::Int(1),
        )]));
        let e = set_template_kwargs(&mut tok, &data)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[data] chat_template_kwargs.messages"), "{e}");
        assert_eq!(text(&tok), plain);
    }

    /// A raw prompt starts with BOS where the model's tokenizer adds one (a Gemma GGUF's
    /// `add_bos_token`), and only then; a chat prompt is the template's rendering alone.
    #[test]
    fn raw_prompts_start_with_bos_where_the_tokenizer_adds_one() {
        let plain = tandem_model::preset::preset_tokenizer("tiny", 512).unwrap();
        let text = "3 + 4 =";
        let raw = |tok: &Tokenizer| prompt_ids(tok, PromptInput::Text(text), false, None).unwrap();
        assert_eq!(raw(&plain), plain.encode(text).unwrap());
        let with_bos = plain.clone().with_bos_on_prompts().unwrap();
        let bos = tandem_model::preset::BOS_ID;
        assert_eq!(
            raw(&with_bos),
            [vec![bos], plain.encode(text).unwrap()].concat()
        );
        let chat = |tok: &Tokenizer| prompt_ids(tok, PromptInput::Text(text), true, None).unwrap();
        assert_eq!(
            chat(&with_bos),
            chat(&plain),
            "the template writes its own tokens"
        );
    }
}
