//! Model hyper-parameters: parsed from (and written to) Hugging Face `config.json`,
//! or built from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The decoder families Tandem runs. All share the Llama block (RMSNorm, RoPE,
/// SwiGLU MLP, grouped-query attention); they differ in biases and in Qwen3's
/// per-head RMSNorm of q and k.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// Llama 2/3, SmolLM2, Mistral (no sliding window): `LlamaForCausalLM`.
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v projections carry a bias. `Qwen2ForCausalLM`.
    Qwen2,
    /// Qwen3: an RMSNorm over each head of q and k (`q_norm`, `k_norm`, [head_dim])
    /// after the projections, before RoPE; `head_dim` from the config; no q/k/v bias
    /// unless `attention_bias`. `Qwen3ForCausalLM`.
    Qwen3,
}

impl Architecture {
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// Whether q and k are RMS-normalized per head before RoPE (Qwen3).
    pub fn qk_norm(self) -> bool {
        self == Architecture::Qwen3
    }
}

/// The `architectures` classes (and `model_type`s) Tandem runs, for error messages.
pub const KNOWN_ARCHITECTURES: &str =
    "LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2), \
     Qwen3ForCausalLM (qwen3)";

/// RoPE frequency scaling as found in `rope_scaling`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's piecewise scaling of the inverse frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Everything the transformer needs to know about its shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2 always, Llama when `attention_bias`).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

fn field<'a>(v: &'a Value, key: &str, path: &Path) -> Result<&'a Value> {
    v.get(key)
        .filter(|x| !x.is_null())
        .ok_or_else(|| Error::format(path, format!("missing field `{key}`")))
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize> {
    field(v, key, path)?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| {
            Error::format(
                path,
                format!("field `{key}` must be a non-negative integer"),
            )
        })
}

fn f64_field_or(v: &Value, key: &str, default: f64, path: &Path) -> Result<f64> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| Error::format(path, format!("field `{key}` must be a number"))),
    }
}

/// `eos_token_id` is an integer or a list of integers in HF files.
pub(crate) fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    /// Parses an HF `config.json`. `path` is only used in error messages.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let class = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| {
                Error::format(path, "missing field `architectures` (or `model_type`)")
            })?;
        let architecture = match class {
            "LlamaForCausalLM" | "MistralForCausalLM" | "llama" | "mistral" => Architecture::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            "Qwen3ForCausalLM" | "qwen3" => Architecture::Qwen3,
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "unsupported architecture `{other}`: Tandem runs {KNOWN_ARCHITECTURES}"
                    ),
                ))
            }
        };
        if let Some(w) = v.get("sliding_window").and_then(|w| w.as_u64()) {
            let use_sw = v
                .get("use_sliding_window")
                .and_then(|b| b.as_bool())
                .unwrap_or(class.starts_with("Mistral"));
            let max_pos = v
                .get("max_position_embeddings")
                .and_then(|m| m.as_u64())
                .unwrap_or(0);
            if use_sw && w < max_pos {
                return Err(Error::format(
                    path,
                    format!("sliding-window attention (`sliding_window` = {w}) is not supported"),
                ));
            }
        }
        let hidden_size = usize_field(&v, "hidden_size", path)?;
        let num_attention_heads = usize_field(&v, "num_attention_heads", path)?;
        let head_dim = match v.get("head_dim").and_then(|h| h.as_u64()) {
            Some(h) => h as usize,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        // transformers ≥ 5 writes `rope_parameters` (theta and scaling in one object).
        let rope_scaling = match v.get("rope_scaling").filter(|x| !x.is_null()) {
            Some(rs) => Some(parse_rope_scaling(rs, path)?),
            None => match rope_parameters(&v)
                .get("rope_type")
                .and_then(|t| t.as_str())
            {
                None | Some("default") => None,
                Some(_) => Some(parse_rope_scaling(rope_parameters(&v), path)?),
            },
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: usize_field(&v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: usize_field(&v, "intermediate_size", path)?,
            num_hidden_layers: usize_field(&v, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads: match v.get("num_key_value_heads") {
                None | Some(Value::Null) => num_attention_heads,
                Some(_) => usize_field(&v, "num_key_value_heads", path)?,
            },
            head_dim,
            rms_norm_eps: f64_field_or(&v, "rms_norm_eps", 1e-6, path)?,
            rope_theta: match v.get("rope_theta") {
                None | Some(Value::Null) => {
                    f64_field_or(rope_parameters(&v), "rope_theta", 10_000.0, path)?
                }
                Some(_) => f64_field_or(&v, "rope_theta", 10_000.0, path)?,
            },
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|m| m.as_u64())
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || v.get("attention_bias")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false),
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
        };
        if v.get("mlp_bias").and_then(|b| b.as_bool()).unwrap_or(false) {
            return Err(Error::format(path, "`mlp_bias = true` is not supported"));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(Error::format(
                    path,
                    format!("`hidden_act` = \"{act}\" is not supported (only \"silu\")"),
                ));
            }
        }
        cfg.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(cfg)
    }

    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = String::from_utf8(crate::error::read_file(path)?)
            .map_err(|_| Error::format(path, "not UTF-8"))?;
        Self::from_hf_json(&text, path)
    }

    /// Checks that the shapes are consistent; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::invalid(format!("`{name}` must be positive")));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(Error::invalid(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "`head_dim` ({}) must be even for RoPE",
                self.head_dim
            )));
        }
        if [self.rms_norm_eps, self.rope_theta]
            .iter()
            .any(|x| x.is_nan() || *x <= 0.0)
        {
            return Err(Error::invalid(
                "`rms_norm_eps` and `rope_theta` must be positive",
            ));
        }
        for &id in self.eos_token_ids.iter().chain(self.bos_token_id.iter()) {
            if id as usize >= self.vocab_size {
                return Err(Error::invalid(format!(
                    "special token id {id} is not below `vocab_size` ({})",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }

    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The `config.json` that `transformers` loads.
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "initializer_range": 0.02,
            "use_cache": true,
        });
        if self.architecture != Architecture::Qwen2 {
            v["attention_bias"] = json!(self.attention_bias);
            v["mlp_bias"] = json!(false);
        }
        if let Some(b) = self.bos_token_id {
            v["bos_token_id"] = json!(b);
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => v["eos_token_id"] = json!(one),
            many => v["eos_token_id"] = json!(many),
        }
        if let Some(p) = self.pad_token_id {
            v["pad_token_id"] = json!(p);
        }
        v["rope_scaling"] = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        v
    }
}

/// `rope_parameters` of a transformers ≥ 5 config (null when absent).
fn rope_parameters(v: &Value) -> &Value {
    v.get("rope_parameters").unwrap_or(&Value::Null)
}

fn parse_rope_scaling(rs: &Value, path: &Path) -> Result<RopeScaling> {
    let kind = rs
        .get("rope_type")
        .or_else(|| rs.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let factor = || {
        rs.get("factor")
            .and_then(|f| f.as_f64())
            .filter(|f| *f > 0.0)
            .ok_or_else(|| Error::format(path, "`rope_scaling.factor` must be a positive number"))
    };
    match kind {
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: rs
                .get("low_freq_factor")
                .and_then(|f| f.as_f64())
                .unwrap_or(1.0),
            high_freq_factor: rs
                .get("high_freq_factor")
                .and_then(|f| f.as_f64())
                .unwrap_or(4.0),
            original_max_position_embeddings: rs
                .get("original_max_position_embeddings")
                .and_then(|f| f.as_u64())
                .unwrap_or(8192) as usize,
        }),
        other => Err(Error::format(
            path,
            format!("unsupported `rope_scaling` type `{other}` (supported: linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers ≥ 5 writes theta and scaling as `rope_parameters`.
    #[test]
    fn rope_parameters_give_theta_and_scaling() {
        let base = json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        });
        let parse = |extra: Value| {
            let mut v = base.clone();
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            ModelConfig::from_hf_json(&v.to_string(), Path::new("config.json")).unwrap()
        };
        let plain = parse(json!({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}));
        assert_eq!((plain.rope_theta, plain.rope_scaling), (5e5, None));
        let scaled = parse(json!({"rope_parameters": {
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        }}));
        assert_eq!(scaled.rope_theta, 5e5);
        assert_eq!(
            scaled.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        // The older top-level fields still win where both are present.
        let legacy = parse(json!({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}));
        assert_eq!(legacy.rope_theta, 1e4);
        assert_eq!(parse(json!({})).rope_theta, 10_000.0);
    }
}
