//! Text ↔ token ids, and the chat template.
//!
//! One tokenizer type for every source: an HF `tokenizer.json` (+ `tokenizer_config.json`
//! for the chat template and special tokens), or a byte-level BPE built from a vocabulary
//! and merges (GGUF files and the tiny preset take that path).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{read_file, write_file, Error, Result};

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// How a byte-level BPE splits text into words before merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex.
    Gpt2,
    /// GPT-2's regex after splitting every digit apart (SmolLM2).
    Gpt2Digits,
    /// The Llama 3 regex (numbers in groups of up to three).
    Llama3,
    /// The Qwen2 regex (single digits).
    Qwen2,
}

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

impl PreTokenizer {
    /// From GGUF's `tokenizer.ggml.pre`.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        match name {
            "gpt2" | "default" | "gpt-2" | "olmo" | "refact" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" => Some(PreTokenizer::Gpt2Digits),
            "llama3" | "llama-bpe" | "llama-v3" => Some(PreTokenizer::Llama3),
            "qwen2" | "qwen35" => Some(PreTokenizer::Qwen2),
            _ => None,
        }
    }

    fn build(self) -> Result<PreTokenizerWrapper> {
        let regex_then_bytes = |re: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
            ])))
        };
        Ok(match self {
            PreTokenizer::Gpt2 => PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            PreTokenizer::Gpt2Digits => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
            ])),
            PreTokenizer::Llama3 => regex_then_bytes(LLAMA3_REGEX)?,
            PreTokenizer::Qwen2 => regex_then_bytes(QWEN2_REGEX)?,
        })
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// Extra variables every render of the chat template gets (`[data]
    /// chat_template_kwargs`), in order.
    template_kwargs: Vec<(String, minijinja::Value)>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_token", &self.eos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` in tokenizer_config.json.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present beside it, `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = read_file(&path)?;
        // The tokenizers crate panics on some malformed files (found by tests/fuzz.rs):
        // the JSON is checked first, and a panic inside it becomes this file's error.
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|_| Error::format(&path, "not a tokenizer the tokenizers library can read"))?
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            serde_json::from_slice(&read_file(&cfg_path)?)
                .map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?
        } else {
            json!({})
        };
        // The template is a string, or a list of named templates ("default" first).
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.exists() {
                    Some(String::from_utf8_lossy(&read_file(&jinja)?).into_owned())
                } else {
                    None
                }
            }
        };
        Ok(Tokenizer {
            inner,
            chat_template,
            template_kwargs: Vec::new(),
            bos_token: token_string(cfg.get("bos_token")),
            eos_token: token_string(cfg.get("eos_token")),
        })
    }

    /// A byte-level BPE from `tokens` (id = index), `merges` (in rank order) and the ids
    /// of special tokens (matched whole in text, never split).
    pub fn from_vocab_and_merges(
        tokens: &[String],
        merges: Vec<(String, String)>,
        special_ids: &[u32],
        pre: PreTokenizer,
        chat_template: Option<String>,
        bos_id: Option<u32>,
        eos_id: Option<u32>,
    ) -> Result<Self> {
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre.build()?));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = special_ids
            .iter()
            .filter_map(|&id| tokens.get(id as usize))
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| Error::Tokenizer(format!("adding special tokens: {e}")))?;
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Tokenizer {
            inner,
            chat_template,
            template_kwargs: Vec::new(),
            bos_token: name(bos_id),
            eos_token: name(eos_id),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Why `other` does not encode text to the same ids (a token with another id, or
    /// one that only one of them has), or `None` when their vocabularies are equal.
    pub fn vocabulary_difference(&self, other: &Tokenizer) -> Option<String> {
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            return Some(format!("{} tokens against {}", a.len(), b.len()));
        }
        let mut tokens: Vec<(&String, &u32)> = a.iter().collect();
        tokens.sort_by_key(|(_, &id)| id);
        tokens.into_iter().find_map(|(tok, &id)| match b.get(tok) {
            Some(&other_id) if other_id == id => None,
            Some(&other_id) => Some(format!("token {tok:?} is id {id} against {other_id}")),
            None => Some(format!("token {tok:?} (id {id}) is missing from the other")),
        })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Token ids of `text`; special-token strings in it become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Sets the extra variables every render of the chat template gets, as
    /// transformers' `apply_chat_template(messages, **kwargs)` (Qwen3's
    /// `enable_thinking`, a template's `tools`); they replace any set before. Tables keep
    /// the order their serialization gives. `messages` and `add_generation_prompt` are
    /// refused: Tandem sets them.
    pub fn set_chat_template_kwargs<K, V>(
        &mut self,
        kwargs: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()>
    where
        K: Into<String>,
        V: Serialize,
    {
        let kwargs: Vec<(String, minijinja::Value)> = kwargs
            .into_iter()
            .map(|(k, v)| (k.into(), minijinja::Value::from_serialize(&v)))
            .collect();
        crate::chat_template::check_names(kwargs.iter().map(|(k, _)| k.as_str()))?;
        self.template_kwargs = kwargs;
        Ok(())
    }

    /// The names of the extra template variables set.
    pub fn chat_template_kwargs(&self) -> Vec<&str> {
        self.template_kwargs
            .iter()
            .map(|(k, _)| k.as_str())
            .collect()
    }

    /// Renders `messages` with the model's chat template (Jinja, as `transformers`'
    /// `apply_chat_template`: see [`crate::chat_template`]), ending with the assistant's
    /// turn header when `add_generation_prompt`; the extra variables of
    /// [`Tokenizer::set_chat_template_kwargs`] are passed along.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template("this model has no chat template; drop --chat or add one".into())
        })?;
        let mut vars = vec![
            (
                "bos_token".to_string(),
                minijinja::Value::from(self.bos_token.clone().unwrap_or_default()),
            ),
            (
                "eos_token".to_string(),
                minijinja::Value::from(self.eos_token.clone().unwrap_or_default()),
            ),
        ];
        vars.extend(self.template_kwargs.iter().cloned());
        crate::chat_template::render(
            source,
            &vars,
            minijinja::Value::from_serialize(messages),
            add_generation_prompt,
        )
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
            "add_bos_token": false,
            "add_eos_token": false,
        });
        if let Some(t) = &self.chat_template {
            cfg["chat_template"] = json!(t);
        }
        if let Some(t) = &self.bos_token {
            cfg["bos_token"] = json!(t);
        }
        if let Some(t) = &self.eos_token {
            cfg["eos_token"] = json!(t);
            cfg["pad_token"] = json!(t);
        }
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| Error::invalid(e.to_string()))?;
        write_file(&dir.join("tokenizer_config.json"), text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe(tokens: &[&str]) -> Tokenizer {
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        Tokenizer::from_vocab_and_merges(&tokens, vec![], &[], PreTokenizer::Gpt2, None, None, None)
            .unwrap()
    }

    #[test]
    fn vocabularies_are_compared_token_by_token() {
        let a = bpe(&["a", "b", "c"]);
        assert_eq!(a.vocabulary_difference(&bpe(&["a", "b", "c"])), None);
        let swapped = a.vocabulary_difference(&bpe(&["a", "c", "b"])).unwrap();
        assert!(swapped.contains("\"b\" is id 1 against 2"), "{swapped}");
        let other = a.vocabulary_difference(&bpe(&["a", "b", "d"])).unwrap();
        assert!(
            other.contains("\"c\"") && other.contains("missing"),
            "{other}"
        );
        assert!(a
            .vocabulary_difference(&bpe(&["a", "b"]))
            .unwrap()
            .contains("3 tokens against 2"));
    }
}
