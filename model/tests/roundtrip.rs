//! Save → load and GGUF → HF folder give identical logits.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;

fn logits(p: &tandem_model::Pretrained, ids: &[u32]) -> Vec<f32> {
    p.model
        .sequence_logits(&p.model.inference_weights(), &[ids.to_vec()])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn save_then_load_gives_identical_logits() {
    for name in tandem_model::preset::TINY_PRESETS {
        let p = tiny(name, 11);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        tandem_model::save_hf(&p, &path, DType::F32).unwrap();
        let q = tandem_model::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
        let ids = [1u32, 50, 60, 70, 2, 300];
        assert_eq!(logits(&p, &ids), logits(&q, &ids), "{name}");
        assert_eq!(
            q.model.config(),
            p.model.config(),
            "{name}: config round trip"
        );
        assert_eq!(
            q.tokenizer.encode("What is 3 + 4?").unwrap(),
            p.tokenizer.encode("What is 3 + 4?").unwrap()
        );
        // Saving over an existing folder replaces it whole.
        tandem_model::save_hf(&q, &path, DType::F32).unwrap();
    }
}

#[test]
fn sharded_safetensors_load() {
    let p = tiny("tiny", 12);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    tandem_model::save_hf(&p, &path, DType::F32).unwrap();
    // Split model.safetensors into two shards with an index, as large HF models ship.
    let all = candle_core::safetensors::load(path.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(path.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (k, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let part: std::collections::HashMap<String, Tensor> = chunk
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&part, path.join(&file)).unwrap();
        for n in chunk {
            map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    std::fs::write(
        path.join("model.safetensors.index.json"),
        serde_json::json!({"weight_map": map}).to_string(),
    )
    .unwrap();
    let q = tandem_model::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(logits(&p, &[3, 4, 5]), logits(&q, &[3, 4, 5]));
}

#[test]
fn smollm2_gguf_to_hf_folder_gives_identical_logits() {
    let g = tandem_model::load("smollm2", DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2-hf");
    tandem_model::save_hf(&g, &path, DType::F32).unwrap();
    let h = tandem_model::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let ids = [1u32, 9690, 198, 2683, 314, 216, 34, 30, 35, 47, 2];
    assert_eq!(logits(&g, &ids), logits(&h, &ids));
    let text = "<|im_start|>user\nWhat is 12+30?<|im_end|>";
    assert_eq!(
        g.tokenizer.encode(text).unwrap(),
        h.tokenizer.encode(text).unwrap()
    );
    assert_eq!(h.stop_token_ids(), g.stop_token_ids());
    assert_eq!(
        g.tokenizer
            .apply_chat_template(&[tandem_model::ChatMessage::user("hi")], true)
            .unwrap(),
        h.tokenizer
            .apply_chat_template(&[tandem_model::ChatMessage::user("hi")], true)
            .unwrap()
    );
}

/// Weights serialised to bytes (how they travel in buckets) and assigned into another
/// model give identical logits; a wrong length or dtype is refused and writes nothing.
#[test]
fn weight_bytes_round_trip_into_another_model() {
    let a = tandem_model::preset::init("tiny", 1, &Device::Cpu).unwrap();
    let b = tandem_model::preset::init("tiny", 2, &Device::Cpu).unwrap();
    let ids = [1u32, 40, 41, 42, 60];
    assert_ne!(logits(&a, &ids), logits(&b, &ids));
    let (bytes, dtype) = a.model.params().to_bytes().unwrap();
    assert_eq!(dtype, "f32");
    assert_eq!(bytes.len(), a.model.params().numel() * 4);
    let before = logits(&b, &ids);
    let e = b
        .model
        .params()
        .assign_bytes(&bytes[..bytes.len() - 4], "f32")
        .unwrap_err();
    assert!(e.to_string().contains("bytes"), "{e}");
    let e = b.model.params().assign_bytes(&bytes, "f64").unwrap_err();
    assert!(e.to_string().contains("unknown dtype \"f64\""), "{e}");
    assert_eq!(
        logits(&b, &ids),
        before,
        "a refused assignment writes nothing"
    );
    b.model.params().assign_bytes(&bytes, dtype).unwrap();
    assert_eq!(logits(&b, &ids), logits(&a, &ids));

    // The same from uneven chunks (received buckets), tensors straddling their edges.
    let c = tandem_model::preset::init("tiny", 3, &Device::Cpu).unwrap();
    let cuts = [0, 1000, 1007, 70_001, bytes.len() - 3, bytes.len()];
    let chunks: Vec<&[u8]> = cuts.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
    c.model.params().assign_chunks(&chunks, dtype).unwrap();
    assert_eq!(logits(&c, &ids), logits(&a, &ids));
    let e = c
        .model
        .params()
        .assign_chunks(&chunks[..4], dtype)
        .unwrap_err();
    assert!(
        e.to_string().contains(&format!("{} bytes of f32", cuts[4])),
        "{e}"
    );
}
