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
