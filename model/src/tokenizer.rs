//! Text ↔ token ids, and the chat template.
//!
//! One tokenizer type for every source: an HF `tokenizer.json` (+ `tokenizer_config.json`
//! for the chat template and special tokens), a byte-level BPE built from a vocabulary
//! and merges (GGUF files and the tiny preset take that path), or a SentencePiece BPE
//! vocabulary with byte fallback as GGUF stores it (Gemma, Llama 2).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
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

/// Which SentencePiece pipeline a GGUF vocabulary (`tokenizer.ggml.model = "llama"`)
/// needs, as transformers rebuilds it from the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SentencePieceFlavor {
    /// Gemma: spaces become `▁` in a normalizer, never a prefix space; merges ranked by
    /// the tokens' order in the file (Gemma's scores do not follow its merge order);
    /// tokens made only of spaces are stored as spaces and looked up as `▁`s.
    Gemma,
    /// Llama 2 style: `▁` for spaces and a prefix `▁` before the text when
    /// `add_space_prefix`, merges ranked by score.
    Llama,
}

/// A SentencePiece BPE vocabulary as a GGUF file stores it.
pub struct SentencePiece<'a> {
    /// Token strings, id = index.
    pub tokens: &'a [String],
    /// `tokenizer.ggml.scores` (needed by [`SentencePieceFlavor::Llama`]).
    pub scores: Option<&'a [f32]>,
    /// `tokenizer.ggml.token_type` (3 control → special token, 4 user-defined → matched
    /// whole), or empty.
    pub token_types: &'a [u64],
    pub flavor: SentencePieceFlavor,
    pub add_space_prefix: bool,
    pub unk_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub chat_template: Option<String>,
}

/// The merges a SentencePiece BPE vocabulary implies (transformers' `generate_merges`):
/// every split of a token into two tokens of the vocabulary, ranked by `priority` of the
/// token they make (higher first), then by the longer left piece, then the longer right
/// piece (lengths in characters). A token listed twice counts once, with its last id.
fn merges_from_vocab(
    tokens: &[String],
    vocab: &ahash::AHashMap<String, u32>,
    priority: impl Fn(u32) -> f64,
) -> Vec<(String, String)> {
    struct Split<'a> {
        priority: f64,
        left_chars: usize,
        right_chars: usize,
        left: &'a str,
        right: &'a str,
    }
    let mut seen = ahash::AHashSet::new();
    let mut splits: Vec<Split> = Vec::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let Some(&id) = vocab.get(token) else {
            continue;
        };
        let mut local: Vec<(u32, u32, Split)> = token
            .char_indices()
            .skip(1)
            .enumerate()
            .filter_map(|(k, (at, _))| {
                let (left, right) = token.split_at(at);
                let (&l, &r) = (vocab.get(left)?, vocab.get(right)?);
                let left_chars = k + 1;
                let split = Split {
                    priority: priority(id),
                    left_chars,
                    right_chars: token.chars().count() - left_chars,
                    left,
                    right,
                };
                Some((l, r, split))
            })
            .collect();
        local.sort_by_key(|(l, r, _)| (*l, *r));
        splits.extend(local.into_iter().map(|(_, _, s)| s));
    }
    // Stable, so equal keys keep the order above (as Python's `sorted(reverse=True)`).
    splits.sort_by(|a, b| {
        b.priority
            .total_cmp(&a.priority)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    splits
        .into_iter()
        .map(|s| (s.left.to_string(), s.right.to_string()))
        .collect()
}

/// Checks that every merge joins two tokens of `vocab` into a third: the `tokenizers`
/// crate panics on some merges that do not.
fn check_merges(vocab: &ahash::AHashMap<String, u32>, merges: &[(String, String)]) -> Result<()> {
    for (a, b) in merges {
        for piece in [a.as_str(), b.as_str(), &format!("{a}{b}")] {
            if !vocab.contains_key(piece) {
                return Err(Error::Tokenizer(format!(
                    "merge `{a} {b}`: `{piece}` is not in the vocabulary; the tokenizer data is corrupt"
                )));
            }
        }
    }
    Ok(())
}

/// The normalizer, pre-tokenizer and decoder around a SentencePiece BPE, as
/// transformers' `GemmaTokenizer` and `LlamaTokenizer` set them: `▁` for spaces (a
/// normalizer for Gemma; Metaspace, with a prefix `▁` when `add_space_prefix`, for
/// Llama), decoded back with the byte-fallback tokens joined into UTF-8.
fn sentencepiece_pipeline(
    inner: &mut tokenizers::Tokenizer,
    flavor: SentencePieceFlavor,
    add_space_prefix: bool,
) -> Result<()> {
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if flavor == SentencePieceFlavor::Gemma {
        let spaces = Replace::new(" ", "\u{2581}").map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner
            .with_normalizer(Some(NormalizerWrapper::Replace(spaces)))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let split = Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Split(split)));
    } else {
        let prepend = match add_space_prefix {
            true => PrependScheme::First,
            false => PrependScheme::Never,
        };
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
            '\u{2581}', prepend, false,
        ))));
        if add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
    }
    inner.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(())
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
    /// Whether a raw prompt starts with the BOS token ([`Tokenizer::encode_prompt`]):
    /// `add_bos_token` of a GGUF or an HF tokenizer's post-processor (Gemma, Llama).
    add_bos: bool,
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
            add_bos: false,
        }
        .with_add_bos_from_post_processor())
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
        check_merges(&vocab, &merges)?;
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
            add_bos: false,
        })
    }

    /// A SentencePiece BPE with byte fallback (`<0xNN>` tokens for what the vocabulary
    /// lacks), built as transformers builds it from a GGUF file: merges recovered from
    /// the vocabulary (no merges are stored), control tokens special, user-defined
    /// tokens matched whole.
    pub fn from_sentencepiece(sp: SentencePiece<'_>) -> Result<Self> {
        let gemma = sp.flavor == SentencePieceFlavor::Gemma;
        let tokens: Vec<String> = sp
            .tokens
            .iter()
            .map(|t| {
                let spaces_only = !t.is_empty() && t.chars().all(|c| c == ' ');
                if gemma && spaces_only {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = match (sp.flavor, sp.scores) {
            (SentencePieceFlavor::Gemma, _) => {
                merges_from_vocab(&tokens, &vocab, |id| -f64::from(id))
            }
            (SentencePieceFlavor::Llama, Some(scores)) => {
                merges_from_vocab(&tokens, &vocab, |id| {
                    scores.get(id as usize).copied().map_or(f64::MIN, f64::from)
                })
            }
            (SentencePieceFlavor::Llama, None) => {
                return Err(Error::Tokenizer(
                    "a SentencePiece vocabulary needs its scores to rank its merges".into(),
                ))
            }
        };
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab.clone(), merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(unk) = name(sp.unk_id) {
            builder = builder.unk_token(unk);
        }
        let bpe = builder
            .build()
            .map_err(|e| Error::Tokenizer(format!("building the SentencePiece BPE: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        sentencepiece_pipeline(&mut inner, sp.flavor, sp.add_space_prefix)?;
        // The file's own spellings, as transformers adds them: a user-defined token only
        // when the vocabulary has it so spelled (not Gemma's runs of spaces).
        let of_type = |kind: u64| {
            sp.token_types
                .iter()
                .zip(sp.tokens)
                .filter(move |(&t, _)| t == kind)
                .map(|(_, token)| token)
        };
        let special: Vec<AddedToken> = of_type(3)
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| Error::Tokenizer(format!("adding special tokens: {e}")))?;
        let user: Vec<AddedToken> = of_type(4)
            .filter(|t| vocab.contains_key(t.as_str()))
            .map(|t| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        inner
            .add_tokens(user)
            .map_err(|e| Error::Tokenizer(format!("adding user-defined tokens: {e}")))?;
        Ok(Tokenizer {
            inner,
            chat_template: sp.chat_template,
            bos_token: name(sp.bos_id),
            eos_token: name(sp.eos_id),
            template_kwargs: Vec::new(),
            add_bos: false,
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

    /// The same tokenizer with a raw prompt starting with its BOS token (a GGUF's
    /// `tokenizer.ggml.add_bos_token`): a post-processor as transformers' tokenizers
    /// carry, kept in the `tokenizer.json` Tandem saves. An error when it has no BOS.
    pub fn with_bos_on_prompts(mut self) -> Result<Self> {
        let bos = self.bos_token.clone().ok_or_else(|| {
            Error::Tokenizer("add_bos_token is set but the tokenizer has no BOS token".into())
        })?;
        let id = self.inner.token_to_id(&bos).ok_or_else(|| {
            Error::Tokenizer(format!("the BOS token {bos:?} is not in the vocabulary"))
        })?;
        let template = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(format!("{bos} $A"))
            .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
            .map_err(|e| Error::Tokenizer(format!("BOS template: {e}")))?
            .special_tokens(vec![(bos.clone(), id)])
            .build()
            .map_err(|e| Error::Tokenizer(format!("BOS template: {e}")))?;
        self.inner.with_post_processor(Some(template));
        self.add_bos = true;
        Ok(self)
    }

    /// Whether an HF tokenizer's post-processor puts a special token before the text
    /// (Gemma's and Llama's put BOS there).
    fn with_add_bos_from_post_processor(mut self) -> Self {
        self.add_bos = match self.inner.encode("a", true) {
            Ok(with) => match self.inner.encode("a", false) {
                Ok(without) => with.get_ids().len() > without.get_ids().len(),
                Err(_) => false,
            },
            Err(_) => false,
        };
        self
    }

    /// Token ids of a raw prompt as transformers' `tokenizer(text)` gives them: the
    /// text's ids after the BOS token when the model's tokenizer adds one (Gemma,
    /// Llama), else [`Tokenizer::encode`]'s. A chat template writes BOS itself: its
    /// rendering goes through `encode`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, self.add_bos)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
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
            "add_bos_token": self.add_bos,
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

    /// A small SentencePiece vocabulary: control tokens, a user-defined newline and
    /// double space, the 256 byte tokens, then pieces in merge order.
    fn sentencepiece_vocab() -> (Vec<String>, Vec<f32>, Vec<u64>) {
        let mut tokens: Vec<String> = [
            "<pad>",
            "<eos>",
            "<bos>",
            "<unk>",
            "<start_of_turn>",
            "\n",
            "  ",
        ]
        .iter()
        .map(|t| t.to_string())
        .collect();
        let mut types = vec![3, 3, 3, 3, 3, 4, 4];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        for piece in ["\u{2581}", "a", "b", "ab", "\u{2581}a", "\u{2581}ab", "ba"] {
            tokens.push(piece.to_string());
            types.push(1);
        }
        let scores = (0..tokens.len()).map(|i| -(i as f32)).collect();
        (tokens, scores, types)
    }

    fn sentencepiece(flavor: SentencePieceFlavor, scores: Option<&[f32]>) -> Tokenizer {
        let (tokens, _, types) = sentencepiece_vocab();
        Tokenizer::from_sentencepiece(SentencePiece {
            tokens: &tokens,
            scores,
            token_types: &types,
            flavor,
            add_space_prefix: flavor == SentencePieceFlavor::Llama,
            unk_id: Some(3),
            bos_id: Some(2),
            eos_id: Some(1),
            chat_template: None,
        })
        .unwrap()
    }

    #[test]
    fn gemma_sentencepiece_merges_in_vocabulary_order_with_byte_fallback() {
        let tok = sentencepiece(SentencePieceFlavor::Gemma, None);
        let id = |t: &str| tok.token_to_id(t).unwrap();
        let (a, b, ab, sp_ab) = (id("a"), id("b"), id("ab"), id("\u{2581}ab"));
        // "ab" (earlier) merges before "ba"; no prefix space.
        assert_eq!(tok.encode("ab ab").unwrap(), vec![ab, sp_ab]);
        assert_eq!(tok.encode("aba").unwrap(), vec![ab, a]);
        // Unknown characters fall back to their UTF-8 bytes, and decode back.
        let e_acute = tok.encode("bé").unwrap();
        assert_eq!(e_acute, vec![b, id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(tok.decode(&e_acute, false).unwrap(), "bé");
        // A run of spaces is looked up as `▁`s (the file spells it with spaces): the
        // user-defined "  " is not matched whole in the text.
        let spaces = id("\u{2581}\u{2581}");
        assert_eq!(spaces, 6);
        assert_eq!(tok.encode("a  b").unwrap(), vec![a, spaces, b]);
        // Control tokens are special and the user-defined newline is matched whole.
        assert_eq!(
            tok.encode("<start_of_turn>a\nb<eos>").unwrap(),
            vec![4, a, 5, b, 1]
        );
        assert_eq!(tok.decode(&[4, ab, 5, sp_ab], true).unwrap(), "ab\n ab");
        assert_eq!(tok.eos_token(), Some("<eos>"));
    }

    #[test]
    fn llama_sentencepiece_adds_a_prefix_space_and_ranks_by_score() {
        let (_, mut scores, _) = sentencepiece_vocab();
        let tok = sentencepiece(SentencePieceFlavor::Llama, Some(&scores));
        let id = |t: &str| tok.token_to_id(t).unwrap();
        assert_eq!(tok.encode("ab").unwrap(), vec![id("\u{2581}ab")]);
        assert_eq!(
            tok.decode(&tok.encode("ab ab").unwrap(), false).unwrap(),
            "ab ab"
        );
        // Scores, not positions, rank the merges: make "ba" outrank "ab".
        let n = scores.len();
        scores[n - 1] = 0.0;
        let tok = sentencepiece(SentencePieceFlavor::Llama, Some(&scores));
        assert_eq!(tok.encode("aba").unwrap(), vec![id("\u{2581}a"), id("ba")]);
    }
}
