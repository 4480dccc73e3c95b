//! Loading a GGUF file: metadata → config, every tensor dequantized to f32 with HF
//! names, and the tokenizer rebuilt from its vocabulary (byte-level BPE, or
//! SentencePiece BPE with byte fallback).
//!
//! What llama.cpp's converter (`convert_hf_to_gguf.py`) changed is undone here, so that
//! the weights are the HF ones and the HF forward applies:
//! - Llama (and Mistral): the q and k projections are permuted so that llama.cpp's RoPE
//!   can rotate interleaved pairs; we un-permute them. Qwen2, Qwen3 and Gemma 3 rotate
//!   halves in llama.cpp too (NeoX RoPE) and are stored unpermuted.
//! - Gemma 3: every norm weight (each name ending in `norm.weight`, the q/k norms
//!   included) is stored as 1 + w, because llama.cpp multiplies by the weight where HF
//!   multiplies by (1 + w); we subtract the 1.
//! - Gemma 3's layer pattern is not in the file: llama.cpp makes every 6th layer global
//!   and the others local (within `attention.sliding_window`), rotating the local ones
//!   with base 10 000 and no scaling, and scales scores by 1/√`attention.key_length`
//!   (1/√(hidden / heads) for the 62-layer 27B). We do the same, reading the pattern and
//!   the local base from the file where it has them.
//!
//! A GGUF is untrusted input: counts, shapes and offsets are checked before anything is
//! allocated from them, and a panic inside the parser becomes this file's error.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling, SlidingWindow};
use crate::error::{Error, Result};
use crate::tokenizer::{PreTokenizer, SentencePiece, SentencePieceFlavor, Tokenizer};

/// The `general.architecture` values Tandem loads.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, mistral, qwen2, qwen3, gemma3";

/// The tensor types Tandem dequantizes (every type candle decodes).
pub const SUPPORTED_TYPES: &str =
    "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K";

/// The largest value a size in the metadata (width, heads, layers…) may take:
/// products of two stay far from overflow, and nothing real comes near it.
const MAX_DIM: u64 = 1 << 24;

/// The longest context a GGUF may declare: the RoPE tables are precomputed for every
/// position.
const MAX_CONTEXT: u64 = 1 << 21;

/// llama.cpp's fixed Gemma 3 pattern: layer l is global when (l + 1) % 6 == 0.
const GEMMA3_PATTERN: usize = 6;

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

/// A non-negative integer of any GGUF integer type.
fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

impl Meta<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::format(self.path, msg)
    }

    /// An optional integer in 0..=`max`; present but of another type or out of range is
    /// an error naming the key.
    fn opt_count(&self, key: &str, max: u64) -> Result<Option<usize>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        match value_u64(v) {
            Some(x) if x <= max => Ok(Some(x as usize)),
            Some(x) => Err(self.err(format!(
                "GGUF metadata `{key}` = {x} is larger than Tandem accepts ({max}); the file is corrupt or not a model Tandem runs"
            ))),
            None => Err(self.err(format!(
                "GGUF metadata `{key}` must be a non-negative integer, got {v:?}"
            ))),
        }
    }

    fn count(&self, key: &str, max: u64) -> Result<usize> {
        self.opt_count(key, max)?.ok_or_else(|| {
            self.err(format!(
                "GGUF metadata `{key}` is missing: the file was not written by llama.cpp's converter for this architecture"
            ))
        })
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => value_u64(v).map(|x| Some(x as f64)).ok_or_else(|| {
                self.err(format!("GGUF metadata `{key}` must be a number, got {v:?}"))
            }),
        }
    }

    fn opt_str(&self, key: &str) -> Option<&str> {
        self.md
            .get(key)
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(format!(
                "GGUF metadata `{key}` must be a boolean, got {v:?}"
            ))),
        }
    }

    fn list(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_vec()
                .map(Some)
                .map_err(|_| self.err(format!("GGUF metadata `{key}` must be a list"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let list = self
            .list(key)?
            .ok_or_else(|| self.err(format!("GGUF metadata `{key}` is missing")))?;
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.err(format!("GGUF metadata `{key}[{i}]` must be a string")))
            })
            .collect()
    }

    /// A list of numbers of the same length as the vocabulary (`n`), or `None`.
    fn per_token<T>(
        &self,
        key: &str,
        n: usize,
        convert: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(list) = self.list(key)? else {
            return Ok(None);
        };
        if list.len() != n {
            return Err(self.err(format!(
                "GGUF metadata `{key}` has {} entries for {n} tokens",
                list.len()
            )));
        }
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                convert(v).ok_or_else(|| {
                    self.err(format!("GGUF metadata `{key}[{i}]` is not a number: {v:?}"))
                })
            })
            .collect::<Result<Vec<T>>>()
            .map(Some)
    }
}

/// The Tandem architecture of a GGUF `general.architecture`.
fn architecture_of(name: &str) -> Option<Architecture> {
    match name {
        "llama" | "mistral" => Some(Architecture::Llama),
        "qwen2" => Some(Architecture::Qwen2),
        "qwen3" => Some(Architecture::Qwen3),
        "gemma3" => Some(Architecture::Gemma3),
        _ => None,
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

/// Maps a GGUF tensor name to its HF name for `arch`; `None` for a tensor Tandem does
/// not know.
fn hf_name(name: &str, arch: Architecture) -> Option<String> {
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
    let gemma = arch == Architecture::Gemma3;
    let mapped = match tail {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" if gemma => "pre_feedforward_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "post_attention_norm.weight" if gemma => "post_attention_layernorm.weight",
        "post_ffw_norm.weight" if gemma => "post_feedforward_layernorm.weight",
        "attn_q_norm.weight" if arch.qk_norm() => "self_attn.q_norm.weight",
        "attn_k_norm.weight" if arch.qk_norm() => "self_attn.k_norm.weight",
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

/// The GGUF name of a tensor type (llama.cpp's spelling).
fn type_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// llama.cpp's names of the tensor types candle cannot read at all (`ggml_type`).
fn unknown_type_name(code: u32) -> &'static str {
    match code {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

/// The file, its length and its parsed header; a parser error (or panic) names the file.
fn open(path: &Path) -> Result<(Content, BufReader<File>, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let parsed = catch_unwind(AssertUnwindSafe(|| Content::read(&mut reader)))
        .map_err(|_| Error::format(path, "not a readable GGUF file (its header is malformed)"))?;
    let content = parsed.map_err(|e| {
        let msg = e.to_string();
        match msg
            .split("unknown dtype for tensor ")
            .nth(1)
            .and_then(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u32>().ok()
            })
        {
            Some(code) => Error::format(
                path,
                format!(
                    "a tensor has GGUF type {code} ({}), which Tandem cannot dequantize (supported: {SUPPORTED_TYPES}); requantize the model with llama.cpp's llama-quantize to e.g. Q4_K_M or Q8_0",
                    unknown_type_name(code)
                ),
            ),
            None => Error::format(path, format!("not a readable GGUF file: {msg}")),
        }
    })?;
    Ok((content, reader, len))
}

/// Reads and dequantizes a GGUF file.
pub fn load(path: &Path) -> Result<GgufModel> {
    let (content, mut reader, file_len) = open(path)?;
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let arch_name = meta.opt_str("general.architecture").unwrap_or("");
    let architecture = architecture_of(arch_name).ok_or_else(|| {
        meta.err(format!(
            "unsupported GGUF architecture `{arch_name}` (supported: {SUPPORTED_ARCHITECTURES}); convert the HF model with Tandem's supported families instead"
        ))
    })?;
    let config = read_config(&meta, &content, arch_name, architecture)?;
    let tokenizer = read_tokenizer(&meta, arch_name)?;
    let tensors = read_tensors(&content, &mut reader, path, &config, file_len)?;
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
    })
}

/// `{arch}.rope.scaling.*`: none, or linear (positions divided by the factor); any
/// other kind is refused rather than run wrong.
fn read_rope_scaling(meta: &Meta, arch: &str) -> Result<Option<RopeScaling>> {
    let kind = meta.opt_str(&format!("{arch}.rope.scaling.type"));
    let factor = meta.opt_f64(&format!("{arch}.rope.scaling.factor"))?;
    match (kind, factor) {
        (None | Some("none"), _) => Ok(None),
        (Some("linear"), Some(1.0)) => Ok(None),
        (Some("linear"), Some(f)) if f > 0.0 && f.is_finite() => {
            Ok(Some(RopeScaling::Linear { factor: f }))
        }
        (Some("linear"), f) => Err(meta.err(format!(
            "GGUF metadata `{arch}.rope.scaling.factor` must be a positive number with linear scaling, got {f:?}"
        ))),
        (Some(other), _) => Err(meta.err(format!(
            "RoPE scaling `{other}` (`{arch}.rope.scaling.type`) is not supported (only linear); convert from the HF folder instead"
        ))),
    }
}

/// The model's hyper-parameters from `{arch}.*` metadata and the tensors' shapes
/// (vocabulary, tied head, q/k/v biases), checked.
fn read_config(
    meta: &Meta,
    content: &Content,
    arch: &str,
    architecture: Architecture,
) -> Result<ModelConfig> {
    let a = |k: &str| format!("{arch}.{k}");
    let tensor_count = content.tensor_infos.len() as u64;
    let hidden = meta.count(&a("embedding_length"), MAX_DIM)?;
    let heads = meta.count(&a("attention.head_count"), MAX_DIM)?;
    let kv_heads = meta
        .opt_count(&a("attention.head_count_kv"), MAX_DIM)?
        .unwrap_or(heads);
    let head_dim = match meta.opt_count(&a("attention.key_length"), MAX_DIM)? {
        Some(d) => d,
        None => hidden / heads.max(1),
    };
    // Every layer has tensors of its own: more layers than tensors is a lie.
    let layers = meta.count(&a("block_count"), tensor_count.min(MAX_DIM))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(meta.err("GGUF with `rope_freqs.weight` (Llama 3.1 rope scaling) is not supported yet: convert from the HF folder instead"));
    }
    let embedding = content
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| meta.err("GGUF has no `token_embd.weight`"))?;
    let vocab_size = embedding.shape.dims().first().copied().unwrap_or(0);
    let token_id = |k: &str| -> Result<Option<u32>> {
        Ok(meta
            .opt_count(&format!("tokenizer.ggml.{k}"), u32::MAX.into())?
            .map(|x| x as u32))
    };
    let eos = token_id("eos_token_id")?;
    let mut config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta.count(&a("feed_forward_length"), MAX_DIM)?,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta
            .opt_f64(&a("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: meta.opt_f64(&a("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: read_rope_scaling(meta, arch)?,
        max_position_embeddings: meta
            .opt_count(&a("context_length"), MAX_CONTEXT)?
            .unwrap_or(2048),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        bos_token_id: token_id("bos_token_id")?,
        eos_token_ids: eos.into_iter().collect(),
        pad_token_id: token_id("padding_token_id")?,
        sliding_window: None,
        query_pre_attn_scalar: None,
        final_logit_softcapping: None,
    };
    if architecture == Architecture::Gemma3 {
        gemma3_fields(meta, arch, &mut config)?;
    }
    config
        .validate()
        .map_err(|e| meta.err(format!("GGUF metadata: {e}")))?;
    Ok(config)
}

/// Gemma 3's local layers, score scale and soft cap, as llama.cpp derives them
/// (`llama_model::load_hparams`, `LLM_ARCH_GEMMA3`): a window from
/// `{arch}.attention.sliding_window` (none: every layer global); the pattern from
/// `{arch}.attention.sliding_window_pattern` (a list of flags, true = local, or a
/// period) or else every 6th layer global; the local base from `{arch}.rope.freq_base_swa`
/// or else 10 000; scores scaled by 1/√key_length (1/√(hidden / heads) for the 62-layer
/// 27B); logits capped by `{arch}.final_logit_softcapping` when it is positive.
fn gemma3_fields(meta: &Meta, arch: &str, cfg: &mut ModelConfig) -> Result<()> {
    let a = |k: &str| format!("{arch}.{k}");
    let n = cfg.num_hidden_layers;
    let window = meta.opt_count(&a("attention.sliding_window"), MAX_CONTEXT)?;
    let pattern_key = a("attention.sliding_window_pattern");
    let local: Vec<bool> = match meta.md.get(&pattern_key) {
        Some(Value::Array(flags)) => flags
            .iter()
            .enumerate()
            .map(|(i, f)| {
                f.to_bool().map_err(|_| {
                    meta.err(format!(
                        "GGUF metadata `{pattern_key}[{i}]` must be a boolean"
                    ))
                })
            })
            .collect::<Result<_>>()?,
        Some(_) => {
            let period = meta.count(&pattern_key, MAX_DIM)?.max(1);
            (0..n).map(|l| (l + 1) % period != 0).collect()
        }
        None => (0..n).map(|l| (l + 1) % GEMMA3_PATTERN != 0).collect(),
    };
    if local.len() != n {
        return Err(meta.err(format!(
            "GGUF metadata `{pattern_key}` names {} layers, `{arch}.block_count` is {n}",
            local.len()
        )));
    }
    cfg.sliding_window = match window {
        Some(size) if size > 0 && local.iter().any(|&l| l) => Some(SlidingWindow {
            size,
            local,
            rope_theta: meta.opt_f64(&a("rope.freq_base_swa"))?.unwrap_or(10_000.0),
        }),
        _ => None,
    };
    let scalar = if n == 62 {
        cfg.hidden_size / cfg.num_attention_heads.max(1)
    } else {
        cfg.head_dim
    };
    cfg.query_pre_attn_scalar = Some(scalar as f64);
    cfg.final_logit_softcapping = meta
        .opt_f64(&a("final_logit_softcapping"))?
        .filter(|c| *c > 0.0);
    if meta
        .opt_f64(&a("attn_logit_softcapping"))?
        .is_some_and(|c| c > 0.0)
    {
        return Err(meta.err(format!(
            "GGUF metadata `{arch}.attn_logit_softcapping` is set: Gemma 3 has none (Gemma 2 is not a family Tandem runs)"
        )));
    }
    Ok(())
}

/// Checks that `info` describes a tensor of a type Tandem dequantizes, whose bytes lie
/// inside the file, before anything is read or allocated for it.
fn check_tensor(
    name: &str,
    info: &TensorInfo,
    data_offset: u64,
    file_len: u64,
    path: &Path,
) -> Result<()> {
    let dtype = info.ggml_dtype;
    if matches!(dtype, GgmlDType::Q8_1 | GgmlDType::Q8K) {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` is {} (an intermediate llama.cpp type, not a storage type); Tandem dequantizes {SUPPORTED_TYPES}",
                type_name(dtype)
            ),
        ));
    }
    let dims = info.shape.dims();
    let corrupt = |what: String| {
        Error::format(
            path,
            format!("tensor `{name}` ({} {dims:?}): {what}; the file is truncated or corrupt, fetch or convert it again", type_name(dtype)),
        )
    };
    let elems = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| corrupt("its element count overflows".into()))?;
    // candle views an empty buffer as a slice of blocks at a dangling, unaligned
    // address (an abort in debug builds, undefined behaviour otherwise).
    if elems == 0 {
        return Err(corrupt("it has no elements".into()));
    }
    let block = dtype.block_size();
    if !elems.is_multiple_of(block) {
        return Err(corrupt(format!(
            "{elems} elements are not a whole number of {block}-element blocks"
        )));
    }
    let bytes = (elems / block)
        .checked_mul(dtype.type_size())
        .and_then(|b| u64::try_from(b).ok());
    let end = data_offset
        .checked_add(info.offset)
        .zip(bytes)
        .and_then(|(start, b)| start.checked_add(b));
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(corrupt(format!(
            "its data (offset {}) runs past the end of the file ({file_len} bytes)",
            info.offset
        ))),
    }
}

/// The tensor `name` dequantized to f32 on the CPU, after [`check_tensor`].
fn dequantize(
    content: &Content,
    reader: &mut BufReader<File>,
    name: &str,
    file_len: u64,
    path: &Path,
) -> Result<Tensor> {
    let info = content
        .tensor_infos
        .get(name)
        .ok_or_else(|| Error::format(path, format!("no tensor `{name}`")))?;
    check_tensor(name, info, content.tensor_data_offset, file_len, path)?;
    let read = catch_unwind(AssertUnwindSafe(|| {
        content
            .tensor(reader, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
    }));
    read.map_err(|_| Error::format(path, format!("tensor `{name}` could not be decoded")))?
        .map_err(|e| Error::format(path, format!("tensor `{name}`: {e}")))
}

/// Every tensor of a GGUF file dequantized to f32, under its GGUF name (no renaming,
/// no permutation, no norm offset): what the file stores, for inspection and tests.
pub fn dequantized_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let (content, mut reader, file_len) = open(path)?;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            Ok((
                n.clone(),
                dequantize(&content, &mut reader, n, file_len, path)?,
            ))
        })
        .collect()
}

/// Every tensor of `content`, dequantized to f32 on the CPU under its HF name, with
/// what the converter changed undone: Llama's q and k un-permuted, Gemma 3's norms
/// less one.
fn read_tensors(
    content: &Content,
    reader: &mut BufReader<File>,
    path: &Path,
    cfg: &ModelConfig,
    file_len: u64,
) -> Result<HashMap<String, Tensor>> {
    let arch = cfg.architecture;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for name in names {
        let Some(hf) = hf_name(name, arch) else {
            return Err(Error::format(
                path,
                format!(
                    "unexpected GGUF tensor `{name}` for a {} model: this file holds more than the architecture Tandem knows",
                    arch.hf_class()
                ),
            ));
        };
        let mut t = dequantize(content, reader, name, file_len, path)?;
        if arch == Architecture::Llama {
            if name.ends_with("attn_q.weight") || name.ends_with("attn_q.bias") {
                t = unpermute(&t, cfg.num_attention_heads)?;
            } else if name.ends_with("attn_k.weight") || name.ends_with("attn_k.bias") {
                t = unpermute(&t, cfg.num_key_value_heads)?;
            }
        }
        if arch == Architecture::Gemma3 && name.ends_with("norm.weight") {
            t = t.affine(1.0, -1.0)?;
        }
        tensors.insert(hf, t);
    }
    Ok(tensors)
}

/// The tokenizer of the file: byte-level BPE (`tokenizer.ggml.model = "gpt2"`) or
/// SentencePiece BPE (`"llama"`), with its special tokens and chat template.
fn read_tokenizer(meta: &Meta, arch: &str) -> Result<Tokenizer> {
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let id = |k: &str| -> Result<Option<u32>> {
        Ok(meta
            .opt_count(&format!("tokenizer.ggml.{k}"), u32::MAX.into())?
            .map(|x| x as u32))
    };
    let (bos, eos) = (id("bos_token_id")?, id("eos_token_id")?);
    let chat_template = meta.opt_str("tokenizer.chat_template").map(str::to_string);
    // 1 normal, 2 unknown, 3 control (special), 4 user-defined, 5 unused, 6 byte.
    let token_types = meta
        .per_token("tokenizer.ggml.token_type", tokens.len(), value_u64)?
        .unwrap_or_default();
    let model_kind = meta.opt_str("tokenizer.ggml.model").unwrap_or("");
    let add_bos = meta
        .opt_bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(false);
    let tokenizer = match model_kind {
        "gpt2" => {
            let merges = meta
                .strings("tokenizer.ggml.merges")?
                .into_iter()
                .map(|m| {
                    m.split_once(' ')
                        .map(|(x, y)| (x.to_string(), y.to_string()))
                        .ok_or_else(|| meta.err(format!("malformed merge `{m}`")))
                })
                .collect::<Result<Vec<_>>>()?;
            let pre_name = meta.opt_str("tokenizer.ggml.pre").unwrap_or("default");
            let pre = PreTokenizer::from_gguf_name(pre_name).unwrap_or_else(|| {
                tracing::warn!(pre = pre_name, "unknown GGUF pre-tokenizer; using GPT-2's");
                PreTokenizer::Gpt2
            });
            let special: Vec<u32> = (0..tokens.len() as u32)
                .filter(|&i| matches!(token_types.get(i as usize), Some(3 | 4)))
                .collect();
            Tokenizer::from_vocab_and_merges(&tokens, merges, &special, pre, chat_template, bos, eos)
        }
        "llama" => {
            let gemma = arch.starts_with("gemma");
            let scores = meta.per_token("tokenizer.ggml.scores", tokens.len(), |v| match *v {
                Value::F32(x) => Some(x),
                _ => None,
            })?;
            if scores.is_none() && !gemma {
                return Err(meta.err("GGUF metadata `tokenizer.ggml.scores` is missing: a SentencePiece vocabulary needs its scores to rank its merges"));
            }
            Tokenizer::from_sentencepiece(SentencePiece {
                tokens: &tokens,
                scores: scores.as_deref(),
                token_types: &token_types,
                flavor: if gemma {
                    SentencePieceFlavor::Gemma
                } else {
                    SentencePieceFlavor::Llama
                },
                add_space_prefix: meta
                    .opt_bool("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(!gemma),
                unk_id: id("unknown_token_id")?,
                bos_id: bos,
                eos_id: eos,
                chat_template,
            })
        }
        other => Err(meta.err(format!(
            "tokenizer model `{other}` (`tokenizer.ggml.model`) is not supported (supported: gpt2 — byte-level BPE, llama — SentencePiece BPE)"
        ))),
    }?;
    if add_bos {
        return tokenizer.with_bos_on_prompts();
    }
    Ok(tokenizer)
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
        let llama = Architecture::Llama;
        assert_eq!(
            hf_name("blk.12.attn_k.weight", llama).as_deref(),
            Some("model.layers.12.self_attn.k_proj.weight")
        );
        assert_eq!(
            hf_name("output.weight", llama).as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_name("blk.x.attn_k.weight", llama), None);
        assert_eq!(
            hf_name("blk.3.ffn_norm.weight", llama).as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        // q/k norms only where the architecture has them.
        assert_eq!(hf_name("blk.0.attn_q_norm.weight", llama), None);
        assert_eq!(
            hf_name("blk.0.attn_k_norm.weight", Architecture::Qwen3).as_deref(),
            Some("model.layers.0.self_attn.k_norm.weight")
        );
        // Gemma 3's four norms per layer.
        let gemma = Architecture::Gemma3;
        for (gguf, hf) in [
            ("attn_norm", "input_layernorm"),
            ("post_attention_norm", "post_attention_layernorm"),
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
            ("attn_q_norm", "self_attn.q_norm"),
        ] {
            assert_eq!(
                hf_name(&format!("blk.5.{gguf}.weight"), gemma),
                Some(format!("model.layers.5.{hf}.weight"))
            );
        }
        assert_eq!(
            hf_name("blk.5.post_ffw_norm.weight", Architecture::Qwen3),
            None
        );
    }
}
