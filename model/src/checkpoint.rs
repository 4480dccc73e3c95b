//! A model with its tokenizer, loaded from an HF folder, a GGUF file or a named
//! model in the cache, and saved as an HF folder that `transformers` loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{read_file, write_file, Error, Result};
use crate::tokenizer::Tokenizer;
use crate::transformer::Model;
use crate::{fetch, gguf};

/// A model ready to run: weights, tokenizer, and the files it came from.
#[derive(Clone, Debug)]
pub struct Pretrained {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub source: PathBuf,
}

impl Pretrained {
    /// Token ids that end a completion: the config's eos ids (from `config.json`,
    /// `generation_config.json` or GGUF metadata).
    pub fn stop_token_ids(&self) -> Vec<u32> {
        self.model.config().eos_token_ids.clone()
    }
}

/// `[model]`: the model a run or a stage starts from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// HF folder, .gguf file, `smollm2` (fetched), or `preset:tiny` (a random tiny model).
    pub path: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "preset:tiny".into(),
        }
    }
}

/// Loads `spec`: an HF model folder, a `.gguf` file, the name of a model Tandem can
/// fetch (`smollm2`, see [`fetch::resolve`]) or `preset:NAME` (a seeded random model,
/// always f32: [`crate::preset`]).
pub fn load(spec: &str, dtype: DType, device: &Device) -> Result<Pretrained> {
    if let Some(name) = spec.strip_prefix("preset:") {
        return crate::preset::init(name, 0, device);
    }
    let path = fetch::resolve(spec)?;
    if path.is_dir() {
        load_hf_dir(&path, dtype, device)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let g = gguf::load(&path)?;
        let model = Model::from_tensors(g.config, g.tensors, dtype, device)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        Ok(Pretrained {
            model,
            tokenizer: g.tokenizer,
            source: path,
        })
    } else if path.exists() {
        Err(Error::format(
            &path,
            "expected an HF model folder or a .gguf file",
        ))
    } else {
        Err(Error::io(
            &path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file or folder (give an HF model folder, a .gguf file, or `smollm2`)",
            ),
        ))
    }
}

/// Checks, without loading the weights, that [`load`] can load `spec`: a preset is
/// known; a folder's `config.json` and tokenizer parse and its weight files exist; a
/// `.gguf` file exists. A run checks its model this way before it starts any process.
pub fn check(spec: &str) -> Result<()> {
    if let Some(name) = spec.strip_prefix("preset:") {
        return crate::preset::preset_config(name).map(|_| ());
    }
    let path = fetch::resolve(spec)?;
    if path.is_dir() {
        ModelConfig::from_hf_file(&path.join("config.json"))?;
        for f in weight_files(&path)? {
            if !f.exists() {
                return Err(Error::io(
                    &f,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "weight file listed but missing",
                    ),
                ));
            }
        }
        Tokenizer::from_hf_dir(&path).map(|_| ())
    } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        Ok(())
    } else {
        // The error `load` gives.
        load(spec, DType::F32, &Device::Cpu).map(|_| ())
    }
}

/// The safetensors files of a folder: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` names.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(Error::format(
            dir,
            "no model.safetensors nor model.safetensors.index.json in this folder",
        ));
    }
    let v: Value = serde_json::from_slice(&read_file(&index)?)
        .map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::format(&index, "missing object `weight_map`"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Pretrained> {
    let mut config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let v: Value = serde_json::from_slice(&read_file(&gen_path)?)
            .map_err(|e| Error::format(&gen_path, format!("not valid JSON: {e}")))?;
        let ids = crate::config::token_ids(v.get("eos_token_id"));
        for id in ids {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
        config
            .validate()
            .map_err(|e| Error::format(&gen_path, e.to_string()))?;
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in weight_files(dir)? {
        if !f.exists() {
            return Err(Error::io(
                &f,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "weight file listed but missing",
                ),
            ));
        }
        let part = candle_core::safetensors::load(&f, &Device::Cpu)
            .map_err(|e| Error::format(&f, e.to_string()))?;
        tensors.extend(part);
    }
    let model = Model::from_tensors(config, tensors, dtype, device)
        .map_err(|e| Error::format(dir, e.to_string()))?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    Ok(Pretrained {
        model,
        tokenizer,
        source: dir.to_path_buf(),
    })
}

/// Writes an HF folder: `config.json`, `generation_config.json`, `model.safetensors`
/// (f32, HF names, no `lm_head.weight` when tied), `tokenizer.json`,
/// `tokenizer_config.json`. Files are written into a temporary folder beside `dir`
/// and moved in place at the end, so a reader never sees half a checkpoint.
pub fn save_hf(model: &Model, tokenizer: &Tokenizer, dir: &Path) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let cfg = model.config();
    let pretty =
        |v: &Value| serde_json::to_string_pretty(v).map_err(|e| Error::invalid(e.to_string()));
    write_file(&tmp.join("config.json"), pretty(&cfg.to_hf_json())?)?;
    let mut gen = json!({"do_sample": true});
    if let Some(b) = cfg.bos_token_id {
        gen["bos_token_id"] = json!(b);
    }
    if !cfg.eos_token_ids.is_empty() {
        gen["eos_token_id"] = json!(cfg.eos_token_ids);
    }
    if let Some(p) = cfg.pad_token_id {
        gen["pad_token_id"] = json!(p);
    }
    write_file(&tmp.join("generation_config.json"), pretty(&gen)?)?;
    let tensors = model
        .params()
        .iter()
        .map(|(n, v)| {
            Ok((
                n.to_string(),
                v.as_tensor()
                    .detach()
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?,
            ))
        })
        .collect::<Result<HashMap<String, Tensor>>>()?;
    let st = tmp.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::format(&st, e.to_string()))?;
    tokenizer.save(&tmp, cfg.max_position_embeddings)?;
    // On disk before the rename publishes it.
    crate::durable::sync_tree(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::durable::publish(&tmp, dir)
}

/// A model argument every process of a run can load the same way: a named model is
/// fetched into the cache once (by the caller, before it starts the others) and becomes
/// its absolute path; presets and paths stay as they are.
pub fn materialize(spec: &str) -> Result<String> {
    if let Some(name) = spec.strip_prefix("preset:") {
        crate::preset::preset_config(name)?;
        return Ok(spec.to_string());
    }
    let path = fetch::resolve(spec)?;
    let abs = std::fs::canonicalize(&path).unwrap_or(path);
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::invalid(format!("{} is not valid UTF-8", abs.display())))
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename, so a
/// reader sees the old content or the new, never half of it.
pub fn write_atomic(path: &Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_file(&tmp, bytes)?;
    crate::durable::sync_file(&tmp)?;
    crate::durable::publish(&tmp, path)
}
