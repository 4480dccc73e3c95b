//! Checkpoints as they ship (sharded safetensors, bf16 weights, `generation_config.json`)
//! load, and are saved as they came (the same dtype, shards with an index, the
//! generation config and chat template kept).

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use serde_json::{json, Value};

const IDS: [u32; 6] = [1, 50, 60, 70, 2, 300];

fn load(dir: &Path) -> tandem_model::Result<tandem_model::Pretrained> {
    tandem_model::load(dir.to_str().unwrap(), DType::F32, &Device::Cpu)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

fn shard_files(dir: &Path) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    files.sort();
    files
}

/// A bf16 checkpoint in three shards loads (in f32 on the CPU, remembering bf16), gives
/// the logits of the same weights in one unsharded file, and saved in bf16 with a tiny
/// shard limit (several shards and an index) every tensor's bytes are the ones it came
/// with; loaded again, the logits are the same.
#[test]
fn sharded_bf16_round_trip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let original = write_bf16_shards(&src, 5, 3);
    assert_eq!(
        shard_files(&src),
        [1, 2, 3].map(|k| format!("model-0000{k}-of-00003.safetensors"))
    );
    let p = load(&src).unwrap();
    assert_eq!(p.weights_dtype, DType::BF16);
    assert_eq!(p.model.dtype(), DType::F32, "computed in f32 on the CPU");

    // The same bf16 weights in one model.safetensors give bit-identical logits.
    let single = dir.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), single.join(f)).unwrap();
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = original
        .iter()
        .map(|(n, (shape, bytes))| {
            let v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::BF16,
                shape.clone(),
                bytes,
            )
            .unwrap();
            (n.clone(), v)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, None, &single.join("model.safetensors")).unwrap();
    let s = load(&single).unwrap();
    assert_eq!(logits_of(&p, &IDS), logits_of(&s, &IDS));
    // bf16 rounding changed the preset's weights: the comparison can fail.
    assert_ne!(logits_of(&p, &IDS), logits_of(&tiny("tiny", 5), &IDS));

    let out = dir.path().join("out");
    tandem_model::save_hf_sharded(&p, &out, p.weights_dtype, 50_000).unwrap();
    let files = shard_files(&out);
    assert!(
        files.len() >= 3,
        "a 50 kB limit cuts the tiny model: {files:?}"
    );
    let n = files.len();
    for (k, f) in files.iter().enumerate() {
        assert_eq!(f, &format!("model-{:05}-of-{n:05}.safetensors", k + 1));
    }
    let index = read_json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), original.len());
    let total: usize = original.values().map(|(_, b)| b.len()).sum();
    assert_eq!(index["metadata"]["total_size"], json!(total));
    let saved = raw_tensors(&out);
    for (name, (dtype, shape, bytes)) in &saved {
        let (s0, b0) = &original[name];
        assert_eq!(*dtype, safetensors::Dtype::BF16, "{name}");
        assert_eq!(
            (shape, bytes),
            (s0, b0),
            "{name}: not the bytes it came with"
        );
        let file = map[name].as_str().unwrap();
        let held = raw_tensors_of_file(&out.join(file));
        assert!(
            held.contains(name),
            "{name} not in {file}, as the index says"
        );
    }
    assert_eq!(saved.len(), original.len());
    for f in &files {
        let size = std::fs::metadata(out.join(f)).unwrap().len();
        // The header adds a little; a shard over the limit holds one tensor alone.
        let held = raw_tensors_of_file(&out.join(f));
        assert!(
            size <= 50_000 + 2_000 || held.len() == 1,
            "{f}: {size} bytes"
        );
    }
    assert_eq!(
        read_json(&out.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
    let q = load(&out).unwrap();
    assert_eq!(q.weights_dtype, DType::BF16);
    assert_eq!(logits_of(&q, &IDS), logits_of(&p, &IDS));
}

fn raw_tensors_of_file(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(str::to_string).collect()
}

/// One shard: `model.safetensors`, no index; f16 and f32 on request, the config's
/// `torch_dtype` saying which.
#[test]
fn one_shard_has_no_index_and_the_dtype_is_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny("tiny", 3);
    for (dtype, st, torch) in [
        (DType::F16, safetensors::Dtype::F16, "float16"),
        (DType::F32, safetensors::Dtype::F32, "float32"),
        (DType::BF16, safetensors::Dtype::BF16, "bfloat16"),
    ] {
        let out = dir.path().join(format!("{dtype:?}"));
        tandem_model::save_hf(&p, &out, dtype).unwrap();
        assert_eq!(shard_files(&out), ["model.safetensors"]);
        assert!(!out.join("model.safetensors.index.json").exists());
        assert_eq!(read_json(&out.join("config.json"))["torch_dtype"], torch);
        assert!(raw_tensors(&out).values().all(|(d, _, _)| *d == st));
        assert_eq!(load(&out).unwrap().weights_dtype, dtype);
    }
    let e = tandem_model::save_hf(&p, &dir.path().join("x"), DType::F64).unwrap_err();
    assert!(e.to_string().contains("F64"), "{e}");
}

/// `[model] save_dtype`: unset, the loaded dtype; f32 / bf16 / f16 on request;
/// anything else refused naming the key.
#[test]
fn save_dtype_is_validated() {
    let section = |s: Option<&str>| tandem_model::ModelSection {
        save_dtype: s.map(str::to_string),
        ..Default::default()
    };
    assert_eq!(
        section(None).save_dtype_or(DType::BF16).unwrap(),
        DType::BF16
    );
    assert_eq!(
        section(Some("f32")).save_dtype_or(DType::BF16).unwrap(),
        DType::F32
    );
    assert_eq!(
        section(Some("f16")).save_dtype_or(DType::F32).unwrap(),
        DType::F16
    );
    assert_eq!(
        section(Some("bf16")).save_dtype_or(DType::F32).unwrap(),
        DType::BF16
    );
    let e = section(Some("fp8")).validate().unwrap_err().to_string();
    assert!(
        e.contains("[model] save_dtype") && e.contains("\"fp8\"") && e.contains("bf16"),
        "{e}"
    );
    let parsed: tandem_model::ModelSection =
        toml_like(r#"{"path": "preset:tiny", "save_dtype": "bf16"}"#);
    assert_eq!(parsed.save_dtype.as_deref(), Some("bf16"));
}

fn toml_like(json: &str) -> tandem_model::ModelSection {
    serde_json::from_str(json).unwrap()
}

/// Shard names in the index are hostile input: absolute paths, `..`, and links out of
/// the folder are refused naming the shard.
#[test]
fn an_index_pointing_outside_the_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m");
    write_bf16_shards(&src, 1, 2);
    let outside = dir.path().join("evil.safetensors");
    std::fs::copy(src.join("model-00001-of-00002.safetensors"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, src.join("link.safetensors")).unwrap();
    let index_path = src.join("model.safetensors.index.json");
    let good = read_json(&index_path);
    let first = good["weight_map"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, f)| *f == "model-00001-of-00002.safetensors")
        .map(|(n, _)| n.clone())
        .unwrap();
    for bad in [
        outside.to_str().unwrap().to_string(),
        "../evil.safetensors".to_string(),
        "sub/../../evil.safetensors".to_string(),
        "./../evil.safetensors".to_string(),
        "link.safetensors".to_string(),
        String::new(),
    ] {
        let mut index = good.clone();
        index["weight_map"][&first] = json!(bad);
        write_json(&index_path, &index);
        let e = load(&src).unwrap_err().to_string();
        assert!(
            e.contains("not a file inside the model folder")
                && e.contains(&format!("{bad:?}"))
                && e.contains("model.safetensors.index.json"),
            "{bad}: {e}"
        );
        assert!(tandem_model::check(src.to_str().unwrap()).is_err(), "{bad}");
    }
    let mut index = good.clone();
    index["weight_map"][&first] = json!(7);
    write_json(&index_path, &index);
    let e = load(&src).unwrap_err().to_string();
    assert!(e.contains(&first) && e.contains("string"), "{e}");
    write_json(&index_path, &good);
    load(&src).unwrap();
}

/// A missing shard is refused naming it; so is a tensor the index puts in a shard that
/// does not hold it, and one the config needs that no shard holds.
#[test]
fn missing_shards_and_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m");
    write_bf16_shards(&src, 1, 3);
    let index_path = src.join("model.safetensors.index.json");
    let good = read_json(&index_path);

    let second = src.join("model-00002-of-00003.safetensors");
    let kept = dir.path().join("kept.safetensors");
    std::fs::rename(&second, &kept).unwrap();
    let e = load(&src).unwrap_err().to_string();
    assert!(
        e.contains("model-00002-of-00003.safetensors") && e.contains("missing"),
        "{e}"
    );
    let e = tandem_model::check(src.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");
    std::fs::rename(&kept, &second).unwrap();

    // The index says shard 1 holds a tensor of shard 3.
    let mut index = good.clone();
    let moved = "model.norm.weight";
    let was = index["weight_map"][moved].clone();
    assert_ne!(was, json!("model-00001-of-00003.safetensors"));
    index["weight_map"][moved] = json!("model-00001-of-00003.safetensors");
    write_json(&index_path, &index);
    let e = load(&src).unwrap_err().to_string();
    assert!(
        e.contains(moved) && e.contains("model-00001-of-00003.safetensors"),
        "{e}"
    );

    // A tensor the config needs is in no shard: the index and file drop it.
    let mut index = good.clone();
    index["weight_map"].as_object_mut().unwrap().remove(moved);
    write_json(&index_path, &index);
    let file = src.join(was.as_str().unwrap());
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rest: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != moved)
        .collect();
    safetensors::tensor::serialize_to_file(rest, None, &file).unwrap();
    let e = load(&src).unwrap_err().to_string();
    assert!(e.contains("missing tensor `model.norm.weight`"), "{e}");
}

/// `generation_config.json`'s `eos_token_id`, an int or a list, joins the stop ids;
/// the file is saved back as it came (its sampling defaults too), and so is a chat
/// template from `chat_template.jinja`.
#[test]
fn generation_config_and_chat_template_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("m");
    write_bf16_shards(&src, 2, 2);
    let base = load(&src).unwrap().stop_token_ids();
    assert!(!base.contains(&77) && !base.contains(&78));
    let gen_path = src.join("generation_config.json");

    write_json(&gen_path, &json!({"eos_token_id": 77, "temperature": 0.6}));
    let p = load(&src).unwrap();
    let mut want = base.clone();
    want.push(77);
    assert_eq!(p.stop_token_ids(), want);

    let gen = json!({"eos_token_id": [77, 78], "temperature": 0.6, "top_p": 0.95});
    write_json(&gen_path, &gen);
    let p = load(&src).unwrap();
    let mut want = base.clone();
    want.extend([77, 78]);
    assert_eq!(p.stop_token_ids(), want);

    write_json(&gen_path, &json!({"eos_token_id": 100_000}));
    let e = load(&src).unwrap_err().to_string();
    assert!(e.contains("generation_config.json"), "{e}");
    write_json(&gen_path, &json!([1, 2]));
    let e = load(&src).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("object"),
        "{e}"
    );
    write_json(&gen_path, &gen);

    // The chat template from chat_template.jinja (none in tokenizer_config.json).
    let tc_path = src.join("tokenizer_config.json");
    let mut tc = read_json(&tc_path);
    tc.as_object_mut().unwrap().remove("chat_template");
    write_json(&tc_path, &tc);
    let template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}";
    std::fs::write(src.join("chat_template.jinja"), template).unwrap();
    let p = load(&src).unwrap();
    assert_eq!(p.tokenizer.chat_template(), Some(template));

    let out = dir.path().join("out");
    tandem_model::save_hf(&p, &out, p.weights_dtype).unwrap();
    assert_eq!(read_json(&out.join("generation_config.json")), gen);
    assert_eq!(
        read_json(&out.join("tokenizer_config.json"))["chat_template"],
        json!(template)
    );
    let q = load(&out).unwrap();
    assert_eq!(q.stop_token_ids(), p.stop_token_ids());
    assert_eq!(q.tokenizer.chat_template(), Some(template));
    assert_eq!(q.generation_config, Some(gen));
}

/// What Tandem saves (a bf16 model in shards) is what `transformers` loaded when
/// tools/check_saved_checkpoint.py wrote its verdict: the same bytes, the same
/// Tandem-side logits, and transformers' logits within 1e-4 of them.
#[test]
fn transformers_loads_what_tandem_saves() {
    let fx = fixture("saved-checkpoint.json");
    let dir = tempfile::tempdir().unwrap();
    let (out, logits) = saved_for_transformers(dir.path());
    assert_eq!(
        saved_weights_hash(&out),
        fx["weights_sha256"].as_str().unwrap(),
        "what save_hf writes changed: rerun tools/check_saved_checkpoint.py"
    );
    assert_eq!(
        shard_files(&out).len() as u64,
        fx["shards"].as_u64().unwrap()
    );
    let tandem: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    assert_eq!(u32s(&fx["ids"]), IDS.to_vec());
    assert!(max_abs_diff(&tandem, &f64s(&fx["tandem_logits"])) <= 1e-6);
    let d = max_abs_diff(&tandem, &f64s(&fx["transformers_logits"]));
    assert!(d <= 1e-4, "transformers' logits differ by {d}");
    assert_eq!(fx["transformers"]["torch_dtype"], "torch.bfloat16");
    // transformers read the kept generation config and chat template.
    assert_eq!(fx["transformers"]["eos_token_id"], json!([2]));
    assert_eq!(fx["transformers"]["temperature"], json!(0.7));
    let q = load(&out).unwrap();
    let chat = [tandem_model::ChatMessage::user("What is 2+3?")];
    assert_eq!(
        q.tokenizer.apply_chat_template(&chat, true).unwrap(),
        fx["transformers"]["chat_rendered"].as_str().unwrap()
    );
    assert_eq!(fx["verdict"], "pass");
}

/// The checkpoint tools/check_saved_checkpoint.py hands to transformers: the tiny preset
/// (seed 0) as bf16 shards, loaded and saved by Tandem with a 50 kB shard limit.
/// Returns the folder and Tandem's logits of [`IDS`] on it.
fn saved_for_transformers(dir: &Path) -> (std::path::PathBuf, Vec<f32>) {
    let src = dir.join("src");
    write_bf16_shards(&src, 0, 2);
    write_json(
        &src.join("generation_config.json"),
        &json!({"bos_token_id": 1, "eos_token_id": [2], "do_sample": true, "temperature": 0.7}),
    );
    let p = load(&src).unwrap();
    let out = dir.join("saved");
    tandem_model::save_hf_sharded(&p, &out, p.weights_dtype, 50_000).unwrap();
    let q = load(&out).unwrap();
    let logits = logits_of(&q, &IDS);
    (out, logits)
}

/// sha256 over (name, dtype, raw bytes) of every saved tensor, names sorted.
fn saved_weights_hash(dir: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (name, (dtype, _, bytes)) in raw_tensors(dir) {
        h.update(name.as_bytes());
        h.update(format!("{dtype:?}").as_bytes());
        h.update(&bytes);
    }
    hex::encode(h.finalize())
}

/// The Tandem side of tools/check_saved_checkpoint.py: writes the checkpoint and
/// `tandem.json` (ids, logits, weights hash) into `$TANDEM_SAVED_CHECKPOINT_DIR`.
#[test]
#[ignore = "run by tools/check_saved_checkpoint.py"]
fn write_checkpoint_for_transformers() {
    let target = std::path::PathBuf::from(
        std::env::var("TANDEM_SAVED_CHECKPOINT_DIR").expect("TANDEM_SAVED_CHECKPOINT_DIR"),
    );
    std::fs::create_dir_all(&target).unwrap();
    let (out, logits) = saved_for_transformers(&target);
    let meta = json!({
        "folder": out,
        "ids": IDS,
        "logits": logits,
        "vocab_size": 512,
        "shards": shard_files(&out).len(),
        "weights_sha256": saved_weights_hash(&out),
    });
    write_json(&target.join("tandem.json"), &meta);
}

/// A multimodal Gemma 3 checkpoint (`Gemma3ForConditionalGeneration`: the text config
/// under `text_config`, the text weights under `language_model.model.…` or, from newer
/// transformers, `model.language_model.…`, beside a vision tower) loads as its text
/// model: the same logits as the text-only save.
#[test]
fn the_text_model_of_a_multimodal_gemma3_checkpoint_loads() {
    let p = tiny("tiny-gemma3", 3);
    let dir = tempfile::tempdir().unwrap();
    let text_only = dir.path().join("text");
    tandem_model::save_hf(&p, &text_only, DType::F32).unwrap();
    let expected = logits_of(&load(&text_only).unwrap(), &IDS);
    let weights =
        candle_core::safetensors::load(text_only.join("model.safetensors"), &Device::Cpu).unwrap();
    for (style, prefix) in [
        ("old", "language_model.model."),
        ("new", "model.language_model."),
    ] {
        let mm = dir.path().join(style);
        std::fs::create_dir_all(&mm).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(text_only.join(f), mm.join(f)).unwrap();
        }
        let text_config = read_json(&text_only.join("config.json"));
        let config = json!({
            "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
            "text_config": text_config, "vision_config": {"hidden_size": 8},
        });
        write_json(&mm.join("config.json"), &config);
        let mut renamed: std::collections::HashMap<String, candle_core::Tensor> = weights
            .iter()
            .map(|(n, t)| {
                (
                    format!("{prefix}{}", n.strip_prefix("model.").unwrap()),
                    t.clone(),
                )
            })
            .collect();
        let vision = candle_core::Tensor::ones((4, 8), DType::F32, &Device::Cpu).unwrap();
        renamed.insert(
            "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
            vision.clone(),
        );
        renamed.insert(
            "multi_modal_projector.mm_input_projection_weight".into(),
            vision,
        );
        candle_core::safetensors::save(&renamed, mm.join("model.safetensors")).unwrap();
        let loaded = load(&mm).unwrap_or_else(|e| panic!("{style}: {e}"));
        assert_eq!(logits_of(&loaded, &IDS), expected, "{style} names");
    }
}
