//! Models Tandem creates itself, for tests, demos and benchmarks: a random Llama (or
//! Qwen2, Qwen3, Gemma 3) with a real byte-level BPE tokenizer trained on an embedded
//! corpus. The `tiny*` presets are a few hundred thousand parameters; `qwen3-0.6b` and
//! `gemma3-270m` have exactly the shape of Qwen3-0.6B and Gemma-3-270M (their published
//! `config.json`), so that speed and memory can be measured at a real size without
//! the weights. Their tokenizer is the tiny one ([`TINY_VOCAB`] tokens, the same
//! merges) padded with reserved tokens to the model's vocabulary: text never encodes to
//! an id from [`TINY_VOCAB`] on, and every id the model can sample decodes to a token.

use std::collections::HashMap;

use candle_core::{DType, Device};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::tokenizer::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _};

use crate::chat_template::QWEN3_TEMPLATE;
use crate::config::{Architecture, ModelConfig, SlidingWindow};
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

/// The small presets, a few hundred thousand parameters each: every family's path in
/// the tests.
pub const TINY_PRESETS: &[&str] = &["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"];

/// Names of the presets `tandem model init --preset` accepts: the tiny ones and the
/// real shapes (for speed and memory figures, never looped over by tests).
pub const PRESETS: &[&str] = &[
    "tiny",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-gemma3",
    "qwen3-0.6b",
    "gemma3-270m",
];

/// The size of the BPE trained on the embedded corpus; a preset with a larger
/// vocabulary pads it with reserved tokens.
pub const TINY_VOCAB: usize = 512;

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
        // Qwen3-0.6B's config.json: 28 layers, GQA 16:8, head_dim 128 ≠ 1024 / 16.
        "qwen3-0.6b" => Ok(ModelConfig {
            architecture: Architecture::Qwen3,
            vocab_size: 151_936,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_hidden_layers: 28,
            num_attention_heads: 16,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
            ..base
        }),
        // Gemma-3-270M's config.json: 18 layers, every 6th global, the others local
        // over 512 tokens with their own RoPE base; GQA 4:1, head_dim 256.
        "gemma3-270m" => Ok(ModelConfig {
            architecture: Architecture::Gemma3,
            vocab_size: 262_144,
            hidden_size: 640,
            intermediate_size: 2048,
            num_hidden_layers: 18,
            num_attention_heads: 4,
            num_key_value_heads: 1,
            head_dim: 256,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 32_768,
            tie_word_embeddings: true,
            sliding_window: Some(SlidingWindow {
                size: 512,
                local: (0..18).map(|l| (l + 1) % 6 != 0).collect(),
                rope_theta: 10_000.0,
            }),
            query_pre_attn_scalar: Some(256.0),
            ..base
        }),
        other => Err(Error::invalid(format!(
            "unknown preset `{other}` (known: {})",
            PRESETS.join(", ")
        ))),
    }
}

/// The tokenizer of preset `name` for a model of `vocab_size` tokens: the tiny BPE,
/// padded to `vocab_size` when larger; Qwen3's chat template for `qwen3-0.6b`, ChatML
/// for the others.
pub fn preset_tokenizer(name: &str, vocab_size: usize) -> Result<Tokenizer> {
    let template = match name {
        "qwen3-0.6b" => QWEN3_TEMPLATE,
        _ => CHATML_TEMPLATE,
    };
    let (mut tokens, merges) = tiny_vocab(vocab_size.min(TINY_VOCAB))?;
    let mut reserved = tokens
        .iter()
        .filter(|t| t.starts_with("<|reserved_"))
        .count();
    while tokens.len() < vocab_size {
        tokens.push(format!("<|reserved_{reserved}|>"));
        reserved += 1;
    }
    bpe_tokenizer(&tokens, merges, template)
}

/// A random model of the preset with the preset tokenizer. Same seed, same weights.
pub fn init(name: &str, seed: u64, device: &Device) -> Result<Pretrained> {
    let config = preset_config(name)?;
    let tokenizer = preset_tokenizer(name, config.vocab_size)?;
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
    let (tokens, merges) = tiny_vocab(vocab_size)?;
    bpe_tokenizer(&tokens, merges, CHATML_TEMPLATE)
}

/// A byte-level BPE's tokens (id = index) and merges (in rank order).
type Vocab = (Vec<String>, Vec<(String, String)>);

/// The tokens and merges of [`tiny_tokenizer`].
fn tiny_vocab(vocab_size: usize) -> Result<Vocab> {
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
    Ok((tokens, merges))
}

/// The presets' byte-level BPE over `tokens` and `merges`, with their special tokens
/// and `template`.
fn bpe_tokenizer(
    tokens: &[String],
    merges: Vec<(String, String)>,
    template: &str,
) -> Result<Tokenizer> {
    let special: Vec<u32> = (0..SPECIAL_TOKENS.len() as u32).collect();
    Tokenizer::from_vocab_and_merges(
        tokens,
        merges,
        &special,
        PreTokenizer::Gpt2Digits,
        Some(template.to_string()),
        Some(BOS_ID),
        Some(EOS_ID),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests loop over the tiny presets: each is one of `PRESETS` and small.
    #[test]
    fn the_tiny_presets_are_presets_and_tiny() {
        for name in TINY_PRESETS {
            assert!(PRESETS.contains(name), "{name}");
            let cfg = preset_config(name).unwrap();
            let params: usize = crate::params::expected_params(&cfg)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum();
            assert!(params < 1_000_000, "{name}: {params} parameters");
        }
    }

    /// The real-size presets have their model's published shape (config.json of
    /// Qwen3-0.6B and of Gemma-3-270M).
    #[test]
    fn real_size_presets_have_the_published_shape() {
        let q = preset_config("qwen3-0.6b").unwrap();
        assert_eq!(q.architecture, Architecture::Qwen3);
        assert_eq!(
            (
                q.vocab_size,
                q.hidden_size,
                q.intermediate_size,
                q.num_hidden_layers
            ),
            (151_936, 1024, 3072, 28)
        );
        assert_eq!(
            (q.num_attention_heads, q.num_key_value_heads, q.head_dim),
            (16, 8, 128)
        );
        assert_eq!((q.rope_theta, q.rms_norm_eps), (1e6, 1e-6));
        assert_eq!(q.max_position_embeddings, 40_960);
        assert!(q.tie_word_embeddings && !q.attention_bias && q.sliding_window.is_none());
        // Qwen3-0.6B's 596M parameters (0.44B without the embedding).
        assert_eq!(q.num_parameters(), 596_049_920);
        q.validate().unwrap();

        let g = preset_config("gemma3-270m").unwrap();
        assert_eq!(g.architecture, Architecture::Gemma3);
        assert_eq!(
            (
                g.vocab_size,
                g.hidden_size,
                g.intermediate_size,
                g.num_hidden_layers
            ),
            (262_144, 640, 2048, 18)
        );
        assert_eq!(
            (g.num_attention_heads, g.num_key_value_heads, g.head_dim),
            (4, 1, 256)
        );
        assert_eq!(
            (g.rope_theta, g.rms_norm_eps, g.max_position_embeddings),
            (1e6, 1e-6, 32_768)
        );
        assert_eq!(g.query_pre_attn_scalar, Some(256.0));
        let sw = g.sliding_window.as_ref().unwrap();
        assert_eq!((sw.size, sw.rope_theta), (512, 10_000.0));
        let global: Vec<usize> = (0..18).filter(|&l| !sw.local[l]).collect();
        assert_eq!(global, [5, 11, 17], "every 6th layer global");
        assert!(g.tie_word_embeddings && g.final_logit_softcapping.is_none());
        // Gemma-3-270M's 268M parameters (170M of them the embedding).
        assert_eq!(g.num_parameters(), 268_098_176);
        g.validate().unwrap();
        // As transformers reads it: sliding_window, layer_types and the local base.
        let hf = g.to_hf_json();
        assert_eq!(hf["sliding_window"], 512);
        assert!(
            hf["query_pre_attn_scalar"].is_u64(),
            "an int, as transformers 5 wants"
        );
        assert_eq!(hf["layer_types"][5], "full_attention");
        assert_eq!(hf["layer_types"][0], "sliding_attention");
    }

    /// A real-size preset's tokenizer is the tiny BPE padded to the model's vocabulary:
    /// the same ids for text, nothing from TINY_VOCAB on, and every id decodes.
    #[test]
    fn real_size_tokenizers_pad_the_tiny_one() {
        let tiny = tiny_tokenizer(TINY_VOCAB).unwrap();
        for (name, vocab) in [("qwen3-0.6b", 151_936), ("gemma3-270m", 262_144)] {
            let tok = preset_tokenizer(name, vocab).unwrap();
            assert_eq!(tok.vocab_size(), vocab, "{name}");
            for text in [CORPUS.lines().next().unwrap(), "What is 12 + 7? <|im_end|>"] {
                let ids = tok.encode(text).unwrap();
                assert_eq!(ids, tiny.encode(text).unwrap(), "{name}: {text}");
                assert!(ids.iter().all(|&i| (i as usize) < TINY_VOCAB), "{name}");
            }
            let last = tok.decode(&[vocab as u32 - 1], false).unwrap();
            assert!(last.starts_with("<|reserved_"), "{name}: {last}");
            let tokens: std::collections::HashSet<String> = (0..vocab as u32)
                .map(|i| tok.decode(&[i], false).unwrap())
                .filter(|t| t.starts_with("<|reserved_"))
                .collect();
            assert_eq!(
                tokens.len(),
                vocab - TINY_VOCAB + tiny_reserved(),
                "{name}: unique"
            );
        }
        let q = preset_tokenizer("qwen3-0.6b", 151_936).unwrap();
        assert_eq!(q.chat_template(), Some(QWEN3_TEMPLATE));
        let g = preset_tokenizer("gemma3-270m", 262_144).unwrap();
        assert_eq!(g.chat_template(), Some(CHATML_TEMPLATE));
    }

    fn tiny_reserved() -> usize {
        tiny_vocab(TINY_VOCAB)
            .unwrap()
            .0
            .iter()
            .filter(|t| t.starts_with("<|reserved_"))
            .count()
    }
}
