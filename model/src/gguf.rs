//! Loading a GGUF file: metadata → config, every tensor dequantized to f32 with HF
//! names, and the tokenizer rebuilt from its vocabulary and merges.
//!
//! llama.cpp's converter permutes the q and k projections of Llama models (so that
//! its RoPE can rotate interleaved pairs). We undo that permutation, so the weights are
//! the HF ones and the usual rotate-half RoPE applies.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::tokenizer::{PreTokenizer, Tokenizer};

/// What a GGUF file holds, ready to build a model from.
pub struct GgufModel {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: Tokenizer,
}

struct Meta<'a> {
    md: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.md
            .get(key)
            .ok_or_else(|| Error::format(self.path, format!("GGUF metadata `{key}` is missing")))
    }
    fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key).ok_or_else(|| match self.md.get(key) {
            None => Error::format(self.path, format!("GGUF metadata `{key}` is missing")),
            Some(v) => Error::format(
                self.path,
                format!("GGUF metadata `{key}` must be an integer, got {v:?}"),
            ),
        })
    }
    fn opt_u64(&self, key: &str) -> Option<u64> {
        self.md.get(key).and_then(|v| {
            v.to_u64()
                .ok()
                .or_else(|| v.to_u32().ok().map(u64::from))
                .or_else(|| v.to_i32().ok().map(|x| x as u64))
        })
    }
    fn opt_f64(&self, key: &str) -> Option<f64> {
        self.md
            .get(key)
            .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
    }
    fn opt_str(&self, key: &str) -> Option<&str> {
        self.md
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let list = self
            .get(key)?
            .to_vec()
            .map_err(|e| Error::format(self.path, format!("GGUF metadata `{key}`: {e}")))?;
        list.iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|e| Error::format(self.path, format!("GGUF metadata `{key}`: {e}")))
            })
            .collect()
    }
}

/// Undoes llama.cpp's q/k permutation: GGUF rows are ordered (head, pair, 2); HF rows
/// are (head, 2, pair). Works for weights (rows, cols) and biases (rows,).
fn unpermute(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Maps a GGUF tensor name to its HF name.
fn hf_name(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mapped = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{mapped}"))
}

/// Reads and dequantizes a GGUF file.
pub fn load(path: &Path) -> Result<GgufModel> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader)
        .map_err(|e| Error::format(path, format!("not a readable GGUF file: {e}")))?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch_name = meta
        .opt_str("general.architecture")
        .unwrap_or("")
        .to_string();
    let architecture = match arch_name.as_str() {
        "llama" | "mistral" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(Error::format(
                path,
                format!(
                    "unsupported GGUF architecture `{other}` (supported: llama, mistral, qwen2)"
                ),
            ))
        }
    };
    let a = |k: &str| format!("{arch_name}.{k}");
    let hidden = meta.u64(&a("embedding_length"))? as usize;
    let heads = meta.u64(&a("attention.head_count"))? as usize;
    let kv_heads = meta
        .opt_u64(&a("attention.head_count_kv"))
        .map(|x| x as usize)
        .unwrap_or(heads);
    let head_dim = meta
        .opt_u64(&a("attention.key_length"))
        .map(|x| x as usize)
        .unwrap_or(hidden / heads.max(1));
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let rope_scaling = match (
        meta.opt_str(&a("rope.scaling.type")),
        meta.opt_f64(&a("rope.scaling.factor")),
    ) {
        (Some("linear"), Some(f)) if f > 0.0 && f != 1.0 => Some(RopeScaling::Linear { factor: f }),
        _ => None,
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(Error::format(path, "GGUF with `rope_freqs.weight` (Llama 3.1 rope scaling) is not supported yet: convert from the HF folder instead"));
    }
    let eos = meta
        .opt_u64("tokenizer.ggml.eos_token_id")
        .map(|x| x as u32);
    let bos = meta
        .opt_u64("tokenizer.ggml.bos_token_id")
        .map(|x| x as u32);
    let pad = meta
        .opt_u64("tokenizer.ggml.padding_token_id")
        .map(|x| x as u32);
    let tensors = read_tensors(&content, &mut reader, path, architecture, (heads, kv_heads))?;
    let tie = !tensors.contains_key("lm_head.weight");
    let vocab_size = tensors
        .get("model.embed_tokens.weight")
        .map(|t| t.dim(0))
        .transpose()?
        .ok_or_else(|| Error::format(path, "GGUF has no `token_embd.weight`"))?;
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta.u64(&a("feed_forward_length"))? as usize,
        num_hidden_layers: meta.u64(&a("block_count"))? as usize,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta
            .opt_f64(&a("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5),
        rope_theta: meta.opt_f64(&a("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: meta.opt_u64(&a("context_length")).unwrap_or(2048) as usize,
        tie_word_embeddings: tie,
        attention_bias: tensors.contains_key("model.layers.0.self_attn.q_proj.bias"),
        bos_token_id: bos,
        eos_token_ids: eos.into_iter().collect(),
        pad_token_id: pad,
        sliding_window: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
    };
    config
        .validate()
        .map_err(|e| Error::format(path, e.to_string()))?;
    let tokenizer = read_tokenizer(&meta, &tokens, bos, eos)?;
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
    })
}

/// Every tensor of `content`, dequantized to f32 on the CPU under its HF name, with
/// Llama's q and k projections (of `heads` and `kv_heads` heads) un-permuted.
fn read_tensors(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
    architecture: Architecture,
    (heads, kv_heads): (usize, usize),
) -> Result<HashMap<String, Tensor>> {
    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let Some(hf) = hf_name(name) else {
            if name == "rope_freqs.weight" {
                continue;
            }
            return Err(Error::format(
                path,
                format!("unexpected GGUF tensor `{name}`"),
            ));
        };
        let q = content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu)?;
        if architecture == Architecture::Llama {
            if name.contains("attn_q.") {
                t = unpermute(&t, heads)?;
            } else if name.contains("attn_k.") {
                t = unpermute(&t, kv_heads)?;
            }
        }
        tensors.insert(hf, t);
    }
    Ok(tensors)
}

/// The byte-level BPE tokenizer of the file's vocabulary `tokens`, merges,
/// pre-tokenizer, special tokens and chat template.
fn read_tokenizer(
    meta: &Meta,
    tokens: &[String],
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<Tokenizer> {
    let path = meta.path;
    let model_kind = meta.opt_str("tokenizer.ggml.model").unwrap_or("");
    if model_kind != "gpt2" {
        return Err(Error::format(
            path,
            format!(
                "tokenizer model `{model_kind}` is not supported (only byte-level BPE, `gpt2`)"
            ),
        ));
    }
    let merges = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(x, y)| (x.to_string(), y.to_string()))
                .ok_or_else(|| Error::format(path, format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let pre_name = meta.opt_str("tokenizer.ggml.pre").unwrap_or("default");
    let pre = PreTokenizer::from_gguf_name(pre_name).unwrap_or_else(|| {
        tracing::warn!(pre = pre_name, "unknown GGUF pre-tokenizer; using GPT-2's");
        PreTokenizer::Gpt2
    });
    // token_type 3 = control (special), 4 = user-defined.
    let special: Vec<u32> = match meta
        .md
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
    {
        Some(types) => types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.to_i32().ok(), Some(3) | Some(4)))
            .map(|(i, _)| i as u32)
            .collect(),
        None => Vec::new(),
    };
    Tokenizer::from_vocab_and_merges(
        tokens,
        merges,
        &special,
        pre,
        meta.opt_str("tokenizer.chat_template").map(str::to_string),
        bos,
        eos,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, hd, cols) = (3usize, 4usize, 2usize);
        let rows = heads * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let hf_t = Tensor::from_vec(hf.clone(), (rows, cols), &Device::Cpu).unwrap();
        let permuted = hf_t
            .reshape((heads, 2, hd / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let back = unpermute(&permuted, heads).unwrap();
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), hf);
    }

    #[test]
    fn maps_names() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
    }
}
