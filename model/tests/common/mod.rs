//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device};
use serde_json::Value;
use tandem_model::{Model, Pretrained};

pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("int") as u32)
        .collect()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

pub fn tiny(preset: &str, seed: u64) -> Pretrained {
    tandem_model::preset::init(preset, seed, &Device::Cpu).expect("preset")
}

/// Per-token logprobs and entropies of `ids[1..]` given the tokens before them.
pub fn score(model: &Model, ids: &[u32], temperature: f64) -> (Vec<f64>, Vec<f64>) {
    let out = model
        .completion_logprobs(
            &model.inference_weights(),
            &[ids.to_vec()],
            &[1],
            temperature,
        )
        .expect("logprobs");
    let to = |t: &candle_core::Tensor| t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    (to(&out.logprobs), to(&out.entropy))
}

/// sha256 over (name, little-endian f32 bytes) with names sorted, as tools/make_fixtures.py.
pub fn weights_hash(model: &Model) -> String {
    use sha2::{Digest, Sha256};
    let mut names: Vec<&str> = model.params().names().iter().map(|s| s.as_str()).collect();
    names.sort();
    let mut h = Sha256::new();
    for n in names {
        h.update(n.as_bytes());
        let v = model
            .params()
            .get(n)
            .unwrap()
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// The tiny preset (`seed`) as a checkpoint the way large models ship: its weights
/// rounded to bf16 and written with the `safetensors` crate (not Tandem's writer) as
/// `shards` files `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json`,
/// beside Tandem's `config.json` and tokenizer. Returns the bf16 bytes by tensor name.
pub fn write_bf16_shards(
    dir: &std::path::Path,
    seed: u64,
    shards: usize,
) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let p = tiny("tiny", seed);
    tandem_model::save_hf(&p, dir, DType::F32).expect("save the preset");
    std::fs::remove_file(dir.join("model.safetensors")).expect("remove the f32 weights");
    let mut tensors = std::collections::BTreeMap::new();
    for (name, var) in p.model.params().iter() {
        let bytes: Vec<u8> = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .flat_map(|x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        tensors.insert(name.to_string(), (var.dims().to_vec(), bytes));
    }
    let names: Vec<&String> = tensors.keys().collect();
    let per = names.len().div_ceil(shards);
    let mut map = serde_json::Map::new();
    for (k, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", k + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = chunk
            .iter()
            .map(|n| {
                let (shape, bytes) = &tensors[*n];
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::BF16,
                    shape.clone(),
                    bytes,
                )
                .unwrap();
                ((*n).clone(), view)
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, None, &dir.join(&file)).unwrap();
        for n in chunk {
            map.insert((*n).clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    tensors
}

/// Every tensor of a folder's safetensors files as (dtype, shape, raw bytes).
pub fn raw_tensors(
    dir: &std::path::Path,
) -> std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let prev = out.insert(
                name.clone(),
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            );
            assert!(prev.is_none(), "{name} in two files");
        }
    }
    out
}

/// The logits of `ids` on the inference path, flattened.
pub fn logits_of(p: &Pretrained, ids: &[u32]) -> Vec<f32> {
    p.model
        .sequence_logits(&p.model.inference_weights(), &[ids.to_vec()])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
