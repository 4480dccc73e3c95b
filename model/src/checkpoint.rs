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
    /// The dtype the weights came in (f32, bf16 or f16; f32 for presets and GGUF files,
    /// which are dequantized): what [`save_hf`] writes unless `[model] save_dtype` says
    /// otherwise.
    pub weights_dtype: DType,
    /// The source folder's `generation_config.json`, written back verbatim on save.
    pub generation_config: Option<Value>,
}

impl Pretrained {
    /// The dtype what is trained on this model is saved in unless one is asked for:
    /// the dtype the weights came in, or under LoRA the compute dtype the adapter is
    /// trained in (an adapter is small, and `[lora] from` goes on from it exactly).
    pub fn trained_dtype(&self) -> DType {
        match self.model.adapter() {
            Some(_) => self.model.dtype(),
            None => self.weights_dtype,
        }
    }

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
    /// HF folder, .gguf file, a fetchable name (`smollm2`, `gemma3-270m`), or
    /// `preset:tiny` (a random tiny model).
    pub path: String,
    /// The dtype saved models are written in: `f32`, `bf16` or `f16`; unset: the dtype
    /// the weights were loaded in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_dtype: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "preset:tiny".into(),
            save_dtype: None,
        }
    }
}

impl ModelSection {
    /// Checks `save_dtype`.
    pub fn validate(&self) -> Result<()> {
        self.explicit_save_dtype().map(|_| ())
    }

    /// The dtype to save in: `save_dtype`, else `loaded` (the dtype the weights came in).
    pub fn save_dtype_or(&self, loaded: DType) -> Result<DType> {
        Ok(self.explicit_save_dtype()?.unwrap_or(loaded))
    }

    /// `save_dtype` as a dtype (`None` when unset).
    pub fn explicit_save_dtype(&self) -> Result<Option<DType>> {
        match &self.save_dtype {
            None => Ok(None),
            Some(s) => parse_dtype(s).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "[model] save_dtype = {s:?}: expected \"f32\", \"bf16\" or \"f16\" \
                     (or leave it out to save in the dtype the weights were loaded in)"
                ))
            }),
        }
    }
}

/// `f32`, `bf16` or `f16` as a dtype.
pub fn parse_dtype(name: &str) -> Option<DType> {
    match name {
        "f32" => Some(DType::F32),
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        _ => None,
    }
}

/// A dtype's name as [`parse_dtype`] reads it (f32 for anything but bf16 and f16).
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// Loads `spec`: an HF model folder, a `.gguf` file, the name of a model Tandem can
/// fetch (`smollm2`, `gemma3-270m`: see [`fetch::resolve`]) or `preset:NAME` (a seeded random model,
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
            weights_dtype: DType::F32,
            generation_config: None,
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
                format!(
                    "no such file or folder (give an HF model folder, a .gguf file, or a model Tandem fetches: {})",
                    fetch::known_names()
                ),
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
        for (f, _) in weight_files(&path)? {
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

/// The largest shard [`save_hf`] writes (bytes), as `transformers`' `max_shard_size="5GB"`.
pub const MAX_SHARD_BYTES: u64 = 5_000_000_000;

const INDEX_FILE: &str = "model.safetensors.index.json";

/// The weights of a folder: `model.safetensors` (every tensor in it), or the shards
/// that `model.safetensors.index.json` names, each with the tensors the index puts in
/// it. Shard names are checked: a plain file name inside the folder, never an absolute
/// path, `..` or a link out of it.
fn weight_files(dir: &Path) -> Result<Vec<(PathBuf, Vec<String>)>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![(single, Vec::new())]);
    }
    let index = dir.join(INDEX_FILE);
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
    let mut shards: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(
                &index,
                format!("weight_map: `{tensor}` must name a shard file (a string)"),
            )
        })?;
        shards
            .entry(file.to_string())
            .or_default()
            .push(tensor.clone());
    }
    shards
        .into_iter()
        .map(|(file, tensors)| Ok((shard_path(dir, &index, &file)?, tensors)))
        .collect()
}

/// `dir/file` for a shard name from the index, refused unless it stays inside `dir`.
fn shard_path(dir: &Path, index: &Path, file: &str) -> Result<PathBuf> {
    let outside = || {
        Error::format(
            index,
            format!(
                "weight_map names shard {file:?}, which is not a file inside the model folder \
                 (shards must be plain names like model-00001-of-00002.safetensors)"
            ),
        )
    };
    let rel = Path::new(file);
    let plain = !file.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(outside());
    }
    let path = dir.join(rel);
    if !path.exists() {
        return Err(Error::io(
            &path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "shard listed in {INDEX_FILE} but missing \
                     (copy every shard the index names into the folder)"
                ),
            ),
        ));
    }
    let real = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
    let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !real.starts_with(&root) {
        return Err(outside());
    }
    Ok(path)
}

/// Every tensor of a folder's safetensors files, each shard holding what the index
/// says it holds.
fn load_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (f, listed) in weight_files(dir)? {
        if !f.exists() {
            return Err(Error::io(
                &f,
                std::io::Error::new(std::io::ErrorKind::NotFound, "weight file missing"),
            ));
        }
        let part = candle_core::safetensors::load(&f, &Device::Cpu)
            .map_err(|e| Error::format(&f, e.to_string()))?;
        if let Some(t) = listed.iter().find(|t| !part.contains_key(*t)) {
            return Err(Error::format(
                &f,
                format!(
                    "{INDEX_FILE} puts tensor `{t}` in this shard, but it does not hold it \
                     (the index and the shards disagree: fetch the model again)"
                ),
            ));
        }
        tensors.extend(part);
    }
    Ok(tensors)
}

/// The text model's tensors under their causal-LM names: a multimodal checkpoint
/// (`Gemma3ForConditionalGeneration`) stores them as `language_model.model.…` (older
/// transformers) or `model.language_model.…` with `lm_head.weight`; its vision tower
/// and projector are dropped. Other checkpoints are returned as they are.
fn text_model_tensors(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let multimodal = tensors
        .keys()
        .any(|k| k.starts_with("language_model.") || k.starts_with("model.language_model."));
    if !multimodal {
        return tensors;
    }
    tensors
        .into_iter()
        .filter_map(|(name, t)| {
            let text = if let Some(rest) = name.strip_prefix("model.language_model.") {
                format!("model.{rest}")
            } else if let Some(rest) = name.strip_prefix("language_model.") {
                rest.to_string()
            } else if name == "lm_head.weight" {
                name
            } else {
                return None;
            };
            Some((text, t))
        })
        .collect()
}

/// The dtype the weights are stored in: the embedding's (f32 unless bf16 or f16).
fn stored_dtype(tensors: &HashMap<String, Tensor>) -> DType {
    match tensors.get("model.embed_tokens.weight").map(|t| t.dtype()) {
        Some(d @ (DType::BF16 | DType::F16)) => d,
        _ => DType::F32,
    }
}

/// A folder's `generation_config.json`, if it has one.
fn read_generation_config(dir: &Path) -> Result<Option<Value>> {
    let path = dir.join("generation_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&read_file(&path)?)
        .map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::format(&path, "expected a JSON object"));
    }
    Ok(Some(v))
}

fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Pretrained> {
    let mut config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let generation_config = read_generation_config(dir)?;
    if let Some(v) = &generation_config {
        // `eos_token_id` is an int or a list; its ids join the config's stop ids.
        for id in crate::config::token_ids(v.get("eos_token_id")) {
            if !config.eos_token_ids.contains(&id) {
                config.eos_token_ids.push(id);
            }
        }
        let gen_path = dir.join("generation_config.json");
        config
            .validate()
            .map_err(|e| Error::format(&gen_path, e.to_string()))?;
    }
    let tensors = text_model_tensors(load_weights(dir)?);
    let weights_dtype = stored_dtype(&tensors);
    let model = Model::from_tensors(config, tensors, dtype, device)
        .map_err(|e| Error::format(dir, e.to_string()))?;
    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    Ok(Pretrained {
        model,
        tokenizer,
        source: dir.to_path_buf(),
        weights_dtype,
        generation_config,
    })
}

/// [`save_hf_sharded`] with shards of at most [`MAX_SHARD_BYTES`].
pub fn save_hf(p: &Pretrained, dir: &Path, dtype: DType) -> Result<()> {
    save_hf_sharded(p, dir, dtype, MAX_SHARD_BYTES)
}

/// Saves what a run trained into `dir`, atomically: under LoRA the adapter alone in
/// PEFT's format (`adapter_config.json` naming `base`, `adapter_model.safetensors` in
/// `dtype`), else the whole model as [`save_hf`] writes it.
pub fn save_policy(p: &Pretrained, dir: &Path, dtype: DType, base: &str) -> Result<()> {
    let Some(adapter) = p.model.adapter() else {
        return save_hf(p, dir, dtype);
    };
    let tmp = fresh_temp_dir(dir)?;
    crate::lora::save_peft(adapter, &tmp, base, dtype)?;
    crate::durable::sync_tree(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::durable::publish(&tmp, dir)
}

/// Writes an HF folder that `transformers` and vLLM load: `config.json` (its
/// `torch_dtype` the saved one), `generation_config.json` (the source folder's, kept,
/// or one from the config's special ids), the weights in `dtype` (f32, bf16 or f16; HF
/// names, no `lm_head.weight` when tied) as `model.safetensors`, or, when they exceed
/// `max_shard_bytes`, as `model-0000N-of-0000M.safetensors` shards of at most that size
/// (a tensor larger than the limit gets a shard of its own) with
/// `model.safetensors.index.json`; `tokenizer.json` and `tokenizer_config.json` (with
/// the chat template). Files are written into a temporary folder beside `dir` and
/// moved in place at the end, so a reader never sees half a checkpoint.
pub fn save_hf_sharded(
    p: &Pretrained,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::invalid(format!(
            "saving a model: dtype {dtype:?} is not one of f32, bf16, f16"
        )));
    }
    let tmp = fresh_temp_dir(dir)?;
    let cfg = p.model.config();
    let pretty =
        |v: &Value| serde_json::to_string_pretty(v).map_err(|e| Error::invalid(e.to_string()));
    let mut hf = cfg.to_hf_json();
    hf["torch_dtype"] = json!(torch_dtype_name(dtype));
    write_file(&tmp.join("config.json"), pretty(&hf)?)?;
    let gen = p
        .generation_config
        .clone()
        .unwrap_or_else(|| generation_config_of(cfg));
    write_file(&tmp.join("generation_config.json"), pretty(&gen)?)?;
    write_shards(p, &tmp, dtype, max_shard_bytes)?;
    p.tokenizer.save(&tmp, cfg.max_position_embeddings)?;
    // On disk before the rename publishes it.
    crate::durable::sync_tree(&tmp)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    crate::durable::publish(&tmp, dir)
}

/// An empty temporary folder beside `dir`.
fn fresh_temp_dir(dir: &Path) -> Result<PathBuf> {
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
    Ok(tmp)
}

fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// `generation_config.json` from the config's special token ids.
fn generation_config_of(cfg: &ModelConfig) -> Value {
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
    gen
}

/// The parameters in `dtype`, in their stable order, cut into shards of at most
/// `max_shard_bytes`; one shard is `model.safetensors`, more come with the index.
fn write_shards(p: &Pretrained, dir: &Path, dtype: DType, max_shard_bytes: u64) -> Result<()> {
    // Cut by size first; each shard's tensors are converted only as it is written.
    let mut shards: Vec<Vec<(&str, &candle_core::Var)>> = vec![Vec::new()];
    let (mut size, mut total) = (0u64, 0u64);
    for (name, var) in p.model.params().iter() {
        let bytes = (var.elem_count() * dtype.size_in_bytes()) as u64;
        if shards.last().is_some_and(|s| !s.is_empty()) && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        total += bytes;
        if let Some(s) = shards.last_mut() {
            s.push((name, var));
        }
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", i + 1)
        };
        let mut tensors: HashMap<String, Tensor> = HashMap::with_capacity(shard.len());
        for (name, var) in shard {
            weight_map.insert(name.to_string(), json!(file));
            let t = var
                .as_tensor()
                .detach()
                .to_dtype(dtype)?
                .to_device(&Device::Cpu)?;
            tensors.insert(name.to_string(), t);
        }
        let path = dir.join(&file);
        candle_core::safetensors::save(&tensors, &path)
            .map_err(|e| Error::format(&path, e.to_string()))?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text =
            serde_json::to_string_pretty(&index).map_err(|e| Error::invalid(e.to_string()))?;
        write_file(&dir.join(INDEX_FILE), text)?;
    }
    Ok(())
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
