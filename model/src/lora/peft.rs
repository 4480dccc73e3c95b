//! An adapter in PEFT's format: `adapter_config.json` and `adapter_model.safetensors`
//! with PEFT's tensor names, what `PeftModel.from_pretrained(base, folder)` loads and
//! what `[lora] from` starts from.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::lora::adapter::Adapter;
use crate::lora::config::{parse_targets, LoraSpec};

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// `adapter_config.json` for `spec`, naming `base` as the base model.
pub fn adapter_config_json(spec: &LoraSpec, base: &str) -> Value {
    let alpha = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 1e15 {
        json!(spec.alpha as i64)
    } else {
        json!(spec.alpha)
    };
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": alpha,
        "target_modules": spec.targets.iter().map(|t| t.module()).collect::<Vec<_>>(),
        "use_rslora": spec.rslora,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    })
}

/// Writes `adapter` into `dir` (created if needed) in PEFT's format, each file through
/// a temporary file and a rename; the tensors in `dtype`.
pub fn save_peft(adapter: &Adapter, dir: &Path, base: &str, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text = serde_json::to_string_pretty(&adapter_config_json(adapter.spec(), base))
        .map_err(|e| Error::invalid(e.to_string()))?;
    crate::write_atomic(&dir.join(ADAPTER_CONFIG_FILE), text)?;
    let mut tensors = HashMap::new();
    for (name, v) in adapter.params().iter() {
        let t = v
            .as_tensor()
            .detach()
            .to_dtype(dtype)?
            .to_device(&Device::Cpu)?;
        tensors.insert(name.to_string(), t);
    }
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)
        .map_err(|e| Error::format(&tmp, e.to_string()))?;
    crate::durable::sync_file(&tmp)?;
    crate::durable::publish(&tmp, &path)
}

/// The adapter's spec from `adapter_config.json`; what Tandem cannot apply exactly is
/// refused by field (DoRA, trained biases, per-module ranks, modules saved in full,
/// a subset of layers, regex targets, another method than LoRA).
pub fn read_spec(dir: &Path) -> Result<LoraSpec> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let bad = |field: &str, why: &str| Error::format(&path, format!("{field}: {why}"));
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(
                "peft_type",
                &format!("{other:?}: only LoRA adapters (\"LORA\") can be loaded"),
            ))
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("r", "missing or not a positive integer"))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("lora_alpha", "missing or not a number"))?;
    let names: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("target_modules", "every entry must be a module name"))?,
        Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
        Some(Value::String(s)) => {
            return Err(bad(
                "target_modules",
                &format!("{s:?}: a pattern is not supported; list module names (q_proj, …)"),
            ))
        }
        _ => return Err(bad("target_modules", "missing")),
    };
    let targets = parse_targets(&names).map_err(|e| bad("target_modules", &e.to_string()))?;
    let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(bad(
            "use_dora",
            "DoRA adapters are not supported (LoRA only)",
        ));
    }
    if flag("fan_in_fan_out") {
        return Err(bad(
            "fan_in_fan_out",
            "true is for GPT-2's Conv1D layers; the decoder's projections are Linear",
        ));
    }
    if let Some(b) = v.get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(bad(
                "bias",
                &format!("{b:?}: adapters with trained biases are not supported (\"none\" only)"),
            ));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if v.get(k)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return Err(bad(k, "per-module ranks or alphas are not supported"));
        }
    }
    for k in ["modules_to_save", "layers_to_transform", "layers_pattern"] {
        let set = match v.get(k) {
            None | Some(Value::Null) => false,
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(
                k,
                "must be null: Tandem trains adapters on every layer and nothing in full",
            ));
        }
    }
    if v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) > 0.0 {
        tracing::warn!(path = %path.display(), "lora_dropout is ignored: Tandem trains adapters without dropout");
    }
    let spec = LoraSpec {
        rank,
        alpha,
        rslora: flag("use_rslora"),
        targets,
    };
    spec.validate(&format!("{}:", path.display()))?;
    Ok(spec)
}

/// The PEFT adapter in `dir`, for a base model of config `cfg`.
pub fn load_peft(dir: &Path, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Adapter> {
    let spec = read_spec(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    if !path.is_file() {
        return Err(Error::io(
            &path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "adapter weights missing"),
        ));
    }
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| Error::format(&path, e.to_string()))?;
    Adapter::from_tensors(cfg, spec, tensors, dtype, device).map_err(|e| {
        Error::format(
            &path,
            format!("{e} (was the adapter trained on this base model?)"),
        )
    })
}
