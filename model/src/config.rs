//! Model hyper-parameters: parsed from (and written to) Hugging Face `config.json`,
//! or built from GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// The decoder families Tandem runs. All share the Llama block (RMSNorm, RoPE, a
/// gated MLP, grouped-query attention); they differ in biases, in the per-head RMSNorm
/// of q and k (Qwen3, Gemma 3) and in Gemma 3's norms, activation and embedding scale.
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
    /// Gemma 3 text (`Gemma3ForCausalLM`, and the text model of
    /// `Gemma3ForConditionalGeneration`): embeddings scaled by √hidden, RMSNorm with
    /// weight (1 + w), four norms per layer (before and after attention and MLP), the
    /// GeGLU MLP with tanh-approximated GELU, q/k norms, scores scaled by
    /// `query_pre_attn_scalar`^(−1/2), and local (sliding-window) layers with their
    /// own RoPE base between global ones.
    Gemma3,
}

/// The gate's activation of the gated MLP: down(act(gate(x)) ∘ up(x)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// silu(x) = x · σ(x) (SwiGLU).
    Silu,
    /// gelu_tanh(x) = ½ x (1 + tanh(√(2/π) (x + 0.044715 x³))) (GeGLU, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Architecture {
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Gemma3 => "Gemma3ForCausalLM",
        }
    }
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Gemma3 => "gemma3_text",
        }
    }

    /// Whether q and k are RMS-normalized per head before RoPE (Qwen3, Gemma 3).
    pub fn qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Gemma3)
    }

    /// The constant added to every RMSNorm weight: y = x / rms(x) · (c + w); 1 for
    /// Gemma 3 (its norms are stored as offsets from one), 0 otherwise.
    pub fn norm_offset(self) -> f64 {
        if self == Architecture::Gemma3 {
            1.0
        } else {
            0.0
        }
    }

    /// Whether the attention and MLP outputs are normalized again before the residual
    /// add (`post_attention_layernorm`, `post_feedforward_layernorm` in Gemma 3, whose
    /// `pre_feedforward_layernorm` plays the Llama `post_attention_layernorm`'s part).
    pub fn sandwich_norms(self) -> bool {
        self == Architecture::Gemma3
    }

    pub fn activation(self) -> Activation {
        if self == Architecture::Gemma3 {
            Activation::GeluTanh
        } else {
            Activation::Silu
        }
    }
}

/// The `architectures` classes (and `model_type`s) Tandem runs, for error messages.
pub const KNOWN_ARCHITECTURES: &str =
    "LlamaForCausalLM (llama), MistralForCausalLM (mistral), Qwen2ForCausalLM (qwen2), \
     Qwen3ForCausalLM (qwen3), Gemma3ForCausalLM (gemma3_text), \
     Gemma3ForConditionalGeneration (gemma3, its text model)";

/// Local attention: a query at position i sees keys at positions j with
/// i − `size` < j ≤ i. `local[l]` says whether layer l is local; local layers rotate
/// with their own base `rope_theta` and no scaling (Gemma 3's `rope_local_base_freq`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    pub size: usize,
    pub local: Vec<bool>,
    pub rope_theta: f64,
}

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
    /// The local layers and their window (Gemma 3); `None`: every layer is global.
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
    /// Scores scaled by `query_pre_attn_scalar`^(−1/2) instead of `head_dim`^(−1/2).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Logits capped as c · tanh(logits / c) (`final_logit_softcapping`).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
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
            "Gemma3ForCausalLM" | "gemma3_text" => Architecture::Gemma3,
            "Gemma3ForConditionalGeneration" | "gemma3" => {
                let text = v
                    .get("text_config")
                    .filter(|t| t.is_object())
                    .ok_or_else(|| {
                        Error::format(path, "a `gemma3` config needs its `text_config` object")
                    })?;
                return Self::parse(Architecture::Gemma3, &gemma3_defaults(text), path);
            }
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "unsupported architecture `{other}`: Tandem runs {KNOWN_ARCHITECTURES}"
                    ),
                ))
            }
        };
        if architecture == Architecture::Gemma3 {
            return Self::parse(architecture, &gemma3_defaults(&v), path);
        }
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
                    format!("sliding-window attention (`sliding_window` = {w}) is not supported for {class}: only Gemma 3's local layers are"),
                ));
            }
        }
        Self::parse(architecture, &v, path)
    }

    /// The fields of a text model's config `v` of a known family.
    fn parse(architecture: Architecture, v: &Value, path: &Path) -> Result<Self> {
        let hidden_size = usize_field(v, "hidden_size", path)?;
        let num_attention_heads = usize_field(v, "num_attention_heads", path)?;
        let head_dim = match v.get("head_dim").and_then(|h| h.as_u64()) {
            Some(h) => h as usize,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => 0,
        };
        // transformers ≥ 5 writes `rope_parameters` (theta and scaling in one object);
        // Gemma 3's holds one per kind of layer.
        let global_rope = match architecture {
            Architecture::Gemma3 => &rope_parameters(v)["full_attention"],
            _ => rope_parameters(v),
        };
        let rope_scaling = match v.get("rope_scaling").filter(|x| !x.is_null()) {
            Some(rs) => Some(parse_rope_scaling(rs, path)?),
            None => match global_rope.get("rope_type").and_then(|t| t.as_str()) {
                None | Some("default") => None,
                Some(_) => Some(parse_rope_scaling(global_rope, path)?),
            },
        };
        let mut cfg = ModelConfig {
            architecture,
            vocab_size: usize_field(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size", path)?,
            num_hidden_layers: usize_field(v, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads: match v.get("num_key_value_heads") {
                None | Some(Value::Null) => num_attention_heads,
                Some(_) => usize_field(v, "num_key_value_heads", path)?,
            },
            head_dim,
            rms_norm_eps: f64_field_or(v, "rms_norm_eps", 1e-6, path)?,
            rope_theta: match v.get("rope_theta") {
                None | Some(Value::Null) => {
                    f64_field_or(global_rope, "rope_theta", 10_000.0, path)?
                }
                Some(_) => f64_field_or(v, "rope_theta", 10_000.0, path)?,
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
            sliding_window: None,
            query_pre_attn_scalar: None,
            final_logit_softcapping: None,
        };
        if v.get("mlp_bias").and_then(|b| b.as_bool()).unwrap_or(false) {
            return Err(Error::format(path, "`mlp_bias = true` is not supported"));
        }
        let wanted = match architecture.activation() {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        };
        for key in ["hidden_act", "hidden_activation"] {
            if let Some(act) = v.get(key).and_then(|a| a.as_str()) {
                if act != wanted {
                    return Err(Error::format(
                        path,
                        format!(
                            "`{key}` = \"{act}\" is not supported for {} (only \"{wanted}\")",
                            architecture.hf_class()
                        ),
                    ));
                }
            }
        }
        if architecture == Architecture::Gemma3 {
            cfg.gemma3_fields(v, path)?;
        }
        cfg.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(cfg)
    }

    /// Gemma 3's local layers (`layer_types`, or the older `sliding_window_pattern`:
    /// every n-th layer global), their RoPE base, the score scale and the soft cap.
    fn gemma3_fields(&mut self, v: &Value, path: &Path) -> Result<()> {
        let n = self.num_hidden_layers;
        let local: Vec<bool> = match v.get("layer_types").filter(|x| !x.is_null()) {
            Some(Value::Array(types)) => types
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::format(
                        path,
                        format!("`layer_types[{i}]` must be \"sliding_attention\" or \"full_attention\", got {t}"),
                    )),
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!("`layer_types` must be a list, got {other}"),
                ))
            }
            None => {
                let pattern = match v.get("sliding_window_pattern") {
                    None | Some(Value::Null) => 6,
                    Some(_) => usize_field(v, "sliding_window_pattern", path)?.max(1),
                };
                (0..n).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        if local.len() != n {
            return Err(Error::format(
                path,
                format!(
                    "`layer_types` names {} layers, the model has {n} (`num_hidden_layers`)",
                    local.len()
                ),
            ));
        }
        let local_rope = &rope_parameters(v)["sliding_attention"];
        let rope_theta = match v.get("rope_local_base_freq") {
            None | Some(Value::Null) => f64_field_or(local_rope, "rope_theta", 10_000.0, path)?,
            Some(_) => f64_field_or(v, "rope_local_base_freq", 10_000.0, path)?,
        };
        if local.iter().any(|&l| l) {
            self.sliding_window = Some(SlidingWindow {
                size: usize_field(v, "sliding_window", path)?,
                local,
                rope_theta,
            });
        }
        self.query_pre_attn_scalar = Some(f64_field_or(v, "query_pre_attn_scalar", 256.0, path)?);
        self.final_logit_softcapping = match v.get("final_logit_softcapping") {
            None | Some(Value::Null) => None,
            Some(_) => Some(f64_field_or(v, "final_logit_softcapping", 0.0, path)?),
        };
        if v.get("attn_logit_softcapping")
            .is_some_and(|c| !c.is_null())
        {
            return Err(Error::format(
                path,
                "`attn_logit_softcapping` is not supported (Gemma 3 checkpoints set it to null; Gemma 2 is not a family Tandem runs)",
            ));
        }
        if v.get("use_bidirectional_attention")
            .and_then(|b| b.as_bool())
            == Some(true)
        {
            return Err(Error::format(
                path,
                "`use_bidirectional_attention = true` (an embedding model) is not supported: Tandem runs causal decoders",
            ));
        }
        Ok(())
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
        if let Some(sw) = &self.sliding_window {
            if sw.size == 0 || sw.local.len() != self.num_hidden_layers {
                return Err(Error::invalid(format!(
                    "`sliding_window` ({}) must be positive and `layer_types` name all {} layers (it names {})",
                    sw.size,
                    self.num_hidden_layers,
                    sw.local.len()
                )));
            }
            if sw.rope_theta.is_nan() || sw.rope_theta <= 0.0 {
                return Err(Error::invalid("`rope_local_base_freq` must be positive"));
            }
        }
        for (name, x) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if x.is_some_and(|x| x.is_nan() || x <= 0.0) {
                return Err(Error::invalid(format!("`{name}` must be positive")));
            }
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

    /// Gemma 3's own fields of `config.json`, in the form both transformers 4 and 5
    /// read (`rope_theta` and `rope_local_base_freq`; 5 folds them into
    /// `rope_parameters`).
    fn gemma3_json(&self, v: &mut Value) {
        if let Some(o) = v.as_object_mut() {
            o.remove("hidden_act");
        }
        v["hidden_activation"] = json!("gelu_pytorch_tanh");
        // An integer where it is one: transformers 5's strict `Gemma3TextConfig` refuses
        // 256.0 for its `int` field.
        let scalar = self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64);
        v["query_pre_attn_scalar"] =
            if scalar.fract() == 0.0 && (1.0..=u32::MAX as f64).contains(&scalar) {
                json!(scalar as u64)
            } else {
                json!(scalar)
            };
        v["final_logit_softcapping"] = json!(self.final_logit_softcapping);
        v["attn_logit_softcapping"] = Value::Null;
        let (window, local, theta) = match &self.sliding_window {
            Some(sw) => (sw.size, sw.local.clone(), sw.rope_theta),
            None => (
                self.max_position_embeddings,
                vec![false; self.num_hidden_layers],
                10_000.0,
            ),
        };
        v["sliding_window"] = json!(window);
        v["rope_local_base_freq"] = json!(theta);
        let kind = |l: &bool| {
            if *l {
                "sliding_attention"
            } else {
                "full_attention"
            }
        };
        v["layer_types"] = json!(local.iter().map(kind).collect::<Vec<_>>());
    }

    /// Whether layer `l` attends locally, and its window.
    pub fn window_of(&self, l: usize) -> Option<usize> {
        let sw = self.sliding_window.as_ref()?;
        sw.local.get(l).copied().unwrap_or(false).then_some(sw.size)
    }

    /// The number of parameters a model of this shape has (the tied head counted once).
    pub fn num_parameters(&self) -> usize {
        crate::params::expected_params(self)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
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
        match self.architecture {
            Architecture::Qwen2 => {}
            Architecture::Gemma3 => {
                v["attention_bias"] = json!(self.attention_bias);
                self.gemma3_json(&mut v);
            }
            _ => {
                v["attention_bias"] = json!(self.attention_bias);
                v["mlp_bias"] = json!(false);
            }
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

/// A Gemma 3 text config with transformers' defaults (`Gemma3TextConfig`) for the
/// fields it leaves out, as the configs of the multimodal checkpoints do.
fn gemma3_defaults(text: &Value) -> Value {
    let mut v = json!({
        "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 256, "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
        "query_pre_attn_scalar": 256, "sliding_window": 4096,
    });
    if let (Some(out), Some(given)) = (v.as_object_mut(), text.as_object()) {
        for (k, x) in given {
            if !x.is_null() {
                out.insert(k.clone(), x.clone());
            }
        }
    }
    if v.get("rope_theta").is_none()
        && v["rope_parameters"]["full_attention"]["rope_theta"].is_null()
    {
        v["rope_theta"] = json!(1_000_000.0);
    }
    v
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

    /// transformers 5 reads `query_pre_attn_scalar` as an integer and refuses 256.0.
    #[test]
    fn gemma3_query_scalar_is_written_as_an_integer() {
        let mut cfg = crate::preset::preset_config("tiny-gemma3").unwrap();
        assert_eq!(cfg.to_hf_json()["query_pre_attn_scalar"], json!(24));
        cfg.query_pre_attn_scalar = Some(24.5);
        assert_eq!(cfg.to_hf_json()["query_pre_attn_scalar"], json!(24.5));
        cfg.query_pre_attn_scalar = Some(256.0);
        let back =
            ModelConfig::from_hf_json(&cfg.to_hf_json().to_string(), Path::new("c")).unwrap();
        assert_eq!(back.query_pre_attn_scalar, Some(256.0));
    }
}
