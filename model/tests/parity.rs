//! Logprobs, entropies, logits and tokenization against transformers (fixtures written
//! by tools/make_fixtures.py).

mod common;

use candle_core::{DType, Device};
use common::*;
use tandem_model::ChatMessage;

fn check_tokenizer(tok: &tandem_model::Tokenizer, fx: &serde_json::Value) {
    for case in fx["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            u32s(&case["ids"]),
            "tokenization of {text:?}"
        );
    }
    let msgs: Vec<ChatMessage> = serde_json::from_value(fx["chat"]["messages"].clone()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&msgs, true).unwrap(),
        fx["chat"]["rendered"].as_str().unwrap()
    );
}

/// A preset written as an HF folder, loaded back, compared with transformers loading
/// the same folder.
fn preset_parity(preset: &str) {
    let fx = fixture(&format!("{preset}.json"));
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(preset, 0);
    tandem_model::save_hf(&p, &dir.path().join("m"), DType::F32).unwrap();
    let loaded = tandem_model::load(
        dir.path().join("m").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        weights_hash(&loaded.model),
        fx["weights_sha256"].as_str().unwrap(),
        "the {preset} preset's weights changed: regenerate the fixtures with tools/make_fixtures.py"
    );
    for case in fx["cases"].as_array().unwrap() {
        let ids = u32s(&case["ids"]);
        let t = case["temperature"].as_f64().unwrap();
        let (lp, ent) = score(&loaded.model, &ids, t);
        let d_lp = max_abs_diff(&lp, &f64s(&case["logprobs"]));
        let d_ent = max_abs_diff(&ent, &f64s(&case["entropy"]));
        assert!(
            d_lp <= 1e-4,
            "{preset}: logprobs differ by {d_lp} (len {}, T {t})",
            ids.len()
        );
        assert!(
            d_ent <= 1e-4,
            "{preset}: entropies differ by {d_ent} (len {}, T {t})",
            ids.len()
        );
    }
    // Full logits, on both forward paths (differentiable and fused inference kernels).
    let ids = u32s(&fx["logits"]["ids"]);
    let expect: Vec<f64> = fx["logits"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(f64s)
        .collect();
    for w in [loaded.model.weights(), loaded.model.inference_weights()] {
        let logits = loaded
            .model
            .sequence_logits(&w, std::slice::from_ref(&ids))
            .unwrap();
        let got: Vec<f64> = logits
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let d = max_abs_diff(&got, &expect);
        assert!(
            d <= 1e-4,
            "{preset}: logits differ by {d} (fused = {})",
            w.fused
        );
    }
    check_tokenizer(&loaded.tokenizer, &fx["tokenizer"]);
}

#[test]
fn tiny_llama_matches_transformers() {
    preset_parity("tiny");
}

#[test]
fn tiny_qwen2_matches_transformers() {
    preset_parity("tiny-qwen2");
}

/// Qwen3 as Tandem saves it (config.json, weights with q_norm / k_norm), loaded by
/// transformers' `Qwen3ForCausalLM`; the f64 models of every awkward shape are in
/// tests/qwen3.rs.
#[test]
fn tiny_qwen3_matches_transformers() {
    preset_parity("tiny-qwen3");
}

/// Gemma 3 as Tandem saves it (config.json with `layer_types`, `query_pre_attn_scalar`,
/// `rope_local_base_freq`; the four norms per layer), loaded by transformers'
/// `Gemma3ForCausalLM`; sequences longer than the preset's window of 16.
#[test]
fn tiny_gemma3_matches_transformers() {
    preset_parity("tiny-gemma3");
}

/// SmolLM2-135M-Instruct from its Q4_1 GGUF (fetched into the cache on first use),
/// dequantized to f32, against transformers' own GGUF loader.
#[test]
fn smollm2_gguf_matches_transformers() {
    let fx = fixture("smollm2.json");
    let p =
        tandem_model::load("smollm2", DType::F32, &Device::Cpu).expect("fetch and load smollm2");
    for case in fx["cases"].as_array().unwrap() {
        let ids = u32s(&case["ids"]);
        let t = case["temperature"].as_f64().unwrap();
        let (lp, ent) = score(&p.model, &ids, t);
        let d_lp = max_abs_diff(&lp, &f64s(&case["logprobs"]));
        let d_ent = max_abs_diff(&ent, &f64s(&case["entropy"]));
        eprintln!(
            "smollm2 len {} T {t}: max |dlogprob| {d_lp:.2e}, max |dentropy| {d_ent:.2e}",
            ids.len()
        );
        assert!(
            d_lp <= 2e-3,
            "smollm2: logprobs differ by {d_lp} (len {}, T {t})",
            ids.len()
        );
        assert!(
            d_ent <= 2e-3,
            "smollm2: entropies differ by {d_ent} (len {}, T {t})",
            ids.len()
        );
    }
    check_tokenizer(&p.tokenizer, &fx["tokenizer"]);
    assert_eq!(
        p.stop_token_ids(),
        vec![2],
        "eos of SmolLM2 is <|im_end|> = 2"
    );
}

/// Gradients of every parameter against transformers in f64: one prompt shared by two
/// completions (so the fused ops, the packed attention and the prompt sharing are all
/// on the path), loss Σ aₜ·logprobₜ + Σ bₜ·entropyₜ as tools/make_fixtures.py computes it.
/// Agreement to 1e-6 relative: transformers takes RMSNorm and the RoPE tables through
/// f32 even in an f64 model (about 1e-8 relative apart); a wrong gradient is off by
/// order one.
fn gradient_parity(preset: &str) {
    let fx = fixture(&format!("gradients-{preset}.json"));
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(preset, 0);
    tandem_model::save_hf(&p, &dir.path().join("m"), DType::F32).unwrap();
    let model = tandem_model::load(
        dir.path().join("m").to_str().unwrap(),
        DType::F64,
        &Device::Cpu,
    )
    .unwrap()
    .model;
    assert_eq!(
        weights_hash(&model),
        fx["weights_sha256"].as_str().unwrap(),
        "the {preset} preset's weights changed: regenerate the fixtures with tools/make_fixtures.py"
    );
    let prompt = u32s(&fx["prompt"]);
    let completions: Vec<Vec<u32>> = fx["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(u32s)
        .collect();
    let seqs: Vec<Vec<u32>> = completions
        .iter()
        .map(|c| [prompt.as_slice(), c].concat())
        .collect();
    let starts = vec![prompt.len(); seqs.len()];
    let t = fx["temperature"].as_f64().unwrap();
    let out = model
        .completion_logprobs(&model.weights(), &seqs, &starts, t)
        .unwrap();
    let n = out.logprobs.dim(0).unwrap();
    let a: Vec<f64> = (0..n).map(|i| 1.0 + 0.1 * i as f64).collect();
    let b: Vec<f64> = (0..n).map(|i| 0.5 - 0.05 * i as f64).collect();
    let a = candle_core::Tensor::from_vec(a, n, &Device::Cpu).unwrap();
    let b = candle_core::Tensor::from_vec(b, n, &Device::Cpu).unwrap();
    let loss = ((&out.logprobs * a).unwrap().sum_all().unwrap()
        + (&out.entropy * b).unwrap().sum_all().unwrap())
    .unwrap();
    let value = loss.to_scalar::<f64>().unwrap();
    let expect = fx["loss"].as_f64().unwrap();
    assert!(
        (value - expect).abs() < 1e-6 * expect.abs().max(1.0),
        "{preset}: loss {value} vs {expect}"
    );
    let grads = loss.backward().unwrap();
    let reference = fx["gradients"].as_object().unwrap();
    assert_eq!(
        reference.len(),
        model.params().iter().count(),
        "{preset}: parameter count"
    );
    for (name, var) in model.params().iter() {
        let r = &reference[&name.to_string()];
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{preset} {name}: no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let r_norm = r["norm"].as_f64().unwrap();
        assert!(
            (norm - r_norm).abs() <= 1e-6 * r_norm.max(1e-12),
            "{preset} {name}: gradient norm {norm} vs transformers {r_norm}"
        );
        let head = f64s(&r["head"]);
        let d = max_abs_diff(&g[..head.len()], &head);
        assert!(
            d <= 1e-6 * r_norm.max(1e-12),
            "{preset} {name}: gradient entries differ by {d} (norm {r_norm})"
        );
    }
}

#[test]
fn tiny_llama_gradients_match_transformers() {
    gradient_parity("tiny");
}

#[test]
fn tiny_qwen2_gradients_match_transformers() {
    gradient_parity("tiny-qwen2");
}

#[test]
fn tiny_qwen3_gradients_match_transformers() {
    gradient_parity("tiny-qwen3");
}

#[test]
fn tiny_gemma3_gradients_match_transformers() {
    gradient_parity("tiny-gemma3");
}
