//! Small models Tandem creates itself, for tests and demos: a random Llama (or Qwen2,
//! Qwen3) with a real byte-level BPE tokenizer trained on an embedded corpus.

use std::collections::HashMap;

use candle_core::{DType, Device};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};

use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::tokenizer::{PreTokenizer, Tokenizer};
use crate::transformer::Model;
use crate::Pretrained;

/// The special tokens of every preset, ids 0, 1, 2 (as in SmolLM2).
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const BOS_ID: u32 = 1;
pub const EOS_ID: u32 = 2;

/// ChatML, as SmolLM2 uses (without its default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const CORPUS: &str = include_str!("preset_corpus.txt");

/// Names of the presets `tandem model init --preset` accepts.
pub const PRESETS: &[&str] = &["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"];

/// The config of a preset.
pub fn preset_config(name: &str) -> Result<ModelConfig> {
    let base = ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 176,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
        attention_bias: false,
        bos_token_id: Some(BOS_ID),
        eos_token_ids: vec![EOS_ID],
        pad_token_id: Some(EOS_ID),
        sliding_window: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
    };
    match name {
        // Untied head, no biases: the Llama path.
        "tiny" => Ok(base),
        // Tied embeddings and q/k/v biases: the Qwen2 path.
        "tiny-qwen2" => Ok(ModelConfig {
            architecture: Architecture::Qwen2,
            tie_word_embeddings: true,
            attention_bias: true,
            rope_theta: 1_000_000.0,
            ..base
        }),
        // Per-head q/k norms, head_dim ≠ hidden / heads, GQA 4:1, tied: the Qwen3 path.
        "tiny-qwen3" => Ok(ModelConfig {
            architecture: Architecture::Qwen3,
            num_key_value_heads: 1,
            head_dim: 32,
            tie_word_embeddings: true,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            ..base
        }),
        // Gemma 3: local layers with a window of 16 around a global one, GeGLU, four
        // norms per layer, √d embeddings, head_dim ≠ hidden / heads, GQA 2:1, tied.
        "tiny-gemma3" => Ok(ModelConfig {
            architecture: Architecture::Gemma3,
            num_hidden_layers: 3,
            head_dim: 32,
            tie_word_embeddings: true,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            sliding_window: Some(crate::config::SlidingWindow {
                size: 16,
                local: vec![true, false, true],
                rope_theta: 10_000.0,
            }),
            query_pre_attn_scalar: Some(24.0),
            ..base
        }),
        other => Err(Error::invalid(format!(
            "unknown preset `{other}` (known: {})",
            PRESETS.join(", ")
        ))),
    }
}

/// A random model of the preset with the preset tokenizer. Same seed, same weights.
pub fn init(name: &str, seed: u64, device: &Device) -> Result<Pretrained> {
    let config = preset_config(name)?;
    let tokenizer = tiny_tokenizer(config.vocab_size)?;
    let model = Model::random(config, seed, DType::F32, device)?;
    // Random init gives zero biases and unit norms; make the biases and the per-head
    // q/k norms (whose scale changes the attention) other than that, so that their
    // paths are exercised.
    if model.config().attention_bias || model.config().architecture.qk_norm() {
        use rand::SeedableRng;
        use rand_distr::{Distribution, Normal};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xb1a5);
        let normal = Normal::new(0.0f32, 0.02).map_err(|e| Error::invalid(e.to_string()))?;
        let mut biases = HashMap::new();
        // Gemma 3's norms are offsets from one: all of them are perturbed.
        let offset = model.config().architecture.norm_offset() as f32;
        let perturbed = |n: &str| {
            n.ends_with(".bias")
                || n.ends_with("_norm.weight")
                || (offset != 0.0 && n.ends_with("norm.weight"))
        };
        for (name, var) in model.params().iter().filter(|(n, _)| perturbed(n)) {
            // Biases N(0, 0.02); norms (c + w) = 1 + N(0, 0.2).
            let (base, scale) = if name.ends_with(".bias") {
                (0.0, 1.0)
            } else {
                (1.0 - offset, 10.0)
            };
            let data: Vec<f32> = (0..var.elem_count())
                .map(|_| base + scale * normal.sample(&mut rng))
                .collect();
            biases.insert(
                name.to_string(),
                candle_core::Tensor::from_vec(data, var.dims(), device)?,
            );
        }
        model.params().assign(&biases)?;
    }
    Ok(Pretrained {
        model,
        tokenizer,
        source: format!("preset:{name}").into(),
        weights_dtype: candle_core::DType::F32,
        generation_config: None,
    })
}

/// GPT-2's reversible byte → printable-character map (`bytes_to_unicode`).
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('?')
            }
        })
        .collect()
}

/// Trains a byte-level BPE of exactly `vocab_size` tokens on the embedded corpus:
/// ids 0..3 special tokens, then the 256 byte symbols, then merges; unused slots at
/// the end are filled with reserved tokens. Deterministic: ties between equally
/// frequent pairs go to the lexicographically smallest.
pub fn tiny_tokenizer(vocab_size: usize) -> Result<Tokenizer> {
    let base = SPECIAL_TOKENS.len() + 256;
    if vocab_size < base {
        return Err(Error::invalid(format!(
            "vocab_size must be at least {base}"
        )));
    }
    let mut tokens: Vec<String> = SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_chars().into_iter().map(|c| c.to_string()));
    // Words as the real pre-tokenizer splits them (digits apart, GPT-2 regex, bytes mapped).
    let pre = tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
        tokenizers::pre_tokenizers::PreTokenizerWrapper::Digits(
            tokenizers::pre_tokenizers::digits::Digits::new(true),
        ),
        tokenizers::pre_tokenizers::PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, true,
        )),
    ]);
    let mut counts: HashMap<Vec<String>, usize> = HashMap::new();
    for line in CORPUS.lines() {
        let mut pts = PreTokenizedString::from(line);
        pre.pre_tokenize(&mut pts)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        for (word, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            *counts
                .entry(word.chars().map(|c| c.to_string()).collect())
                .or_default() += 1;
        }
    }
    let mut words: Vec<(Vec<String>, usize)> = counts.into_iter().collect();
    words.sort();
    let mut merges: Vec<(String, String)> = Vec::new();
    while tokens.len() < vocab_size {
        let mut pairs: HashMap<(&str, &str), usize> = HashMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *pairs.entry((p[0].as_str(), p[1].as_str())).or_default() += c;
            }
        }
        let Some(((a, b), _)) = pairs
            .into_iter()
            .filter(|(_, c)| *c >= 2)
            .max_by(|(pa, ca), (pb, cb)| ca.cmp(cb).then_with(|| pb.cmp(pa)))
            .map(|((a, b), c)| ((a.to_string(), b.to_string()), c))
        else {
            break;
        };
        let joined = format!("{a}{b}");
        for (w, _) in words.iter_mut() {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        tokens.push(joined);
        merges.push((a, b));
    }
    let mut reserved = 0;
    while tokens.len() < vocab_size {
        tokens.push(format!("<|reserved_{reserved}|>"));
        reserved += 1;
    }
    let special: Vec<u32> = (0..SPECIAL_TOKENS.len() as u32).collect();
    Tokenizer::from_vocab_and_merges(
        &tokens,
        merges,
        &special,
        PreTokenizer::Gpt2Digits,
        Some(CHATML_TEMPLATE.to_string()),
        Some(BOS_ID),
        Some(EOS_ID),
    )
}
