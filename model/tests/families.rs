//! Qwen3 and Gemma 3 against transformers in f64 (tests/fixtures/qwen3.json and
//! gemma3.json, written by tools/make_fixtures.py): tiny random `Qwen3ForCausalLM` and
//! `Gemma3ForCausalLM` models in the awkward shapes (head_dim ≠ hidden / heads, GQA 3:1
//! and 1:1, tied and untied embeddings; for Gemma 3 local layers whose window is
//! shorter than the sequences, a shared prompt crossing it, a soft-capped output and
//! linear RoPE scaling), their `config.json` as transformers saved it, weights from a
//! generator both sides compute exactly. The reference is f64 throughout (the fixture
//! script keeps transformers' RMSNorm, RoPE tables and softmax out of f32), so the
//! bounds are tight: per-token logprobs and entropies to 1e-9, the gradient of every
//! parameter to 1e-9 relative (measured: about 1e-15 for both), on every layout and
//! with activation checkpointing. A misplaced ε in a norm moves them by about 1e-6.
//!
//! LoRA against PEFT (tests/fixtures/lora.json, tools/lora_reference.py): the same
//! models with adapters on all or some projections, with and without rsLoRA; the
//! adapted logprobs, the gradients of A and B (the base frozen) and one AdamW step.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use serde_json::Value;
use tandem_model::packing::{ForwardOptions, Packing};
use tandem_model::params::expected_params;
use tandem_model::{Architecture, Model, ModelConfig};

/// Absolute for logprobs and entropies, relative to the gradient's norm for gradients.
const TOL: f64 = 1e-9;

const MASK: u64 = u64::MAX;

fn fnv1a64(text: &str) -> u64 {
    text.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3) & MASK
    })
}

fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The values `det_values` of tools/make_fixtures.py gives parameter `name`.
fn det_values(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    let (base, scale) = if name.ends_with("norm.weight") {
        (1.0, 0.4)
    } else {
        (0.0, 0.5)
    };
    (0..n as u64)
        .map(|i| {
            let u = (splitmix64(seed.wrapping_add(i)) >> 11) as f64 / (1u64 << 53) as f64;
            base + scale * (u - 0.5)
        })
        .collect()
}

/// The fixture's model: its saved `config.json` parsed by Tandem, the shared weights.
fn build(case: &Value) -> Model {
    let name = case["name"].as_str().unwrap();
    let cfg = ModelConfig::from_hf_json(&case["config"].to_string(), Path::new(name))
        .unwrap_or_else(|e| panic!("{name}: config.json: {e}"));
    let c = &case["config"];
    assert_eq!(
        cfg.head_dim as u64,
        c["head_dim"].as_u64().unwrap(),
        "{name}"
    );
    assert_ne!(cfg.head_dim * cfg.num_attention_heads, cfg.hidden_size);
    match cfg.architecture {
        Architecture::Qwen3 => assert_eq!(
            cfg.rope_theta,
            c["rope_parameters"]["rope_theta"].as_f64().unwrap(),
            "{name}: rope_theta from rope_parameters"
        ),
        Architecture::Gemma3 => check_gemma3_config(&cfg, c, name),
        other => panic!("{name}: {other:?} has no family fixture"),
    }
    assert_eq!(cfg.rms_norm_eps, c["rms_norm_eps"].as_f64().unwrap());
    assert_eq!(
        cfg.tie_word_embeddings,
        c["tie_word_embeddings"].as_bool().unwrap()
    );
    assert!(!cfg.attention_bias, "{name}: Qwen3 has no q/k/v bias");
    let tensors: HashMap<String, Tensor> = expected_params(&cfg)
        .into_iter()
        .map(|(n, shape)| {
            let count = shape.iter().product();
            let t = Tensor::from_vec(det_values(&n, count), shape, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    Model::from_tensors(cfg, tensors, DType::F64, &Device::Cpu).unwrap()
}

/// Gemma 3's own fields as Tandem reads them from transformers' saved config.
fn check_gemma3_config(cfg: &ModelConfig, c: &Value, name: &str) {
    let rope = &c["rope_parameters"];
    assert_eq!(
        cfg.rope_theta,
        rope["full_attention"]["rope_theta"].as_f64().unwrap(),
        "{name}"
    );
    let sw = cfg.sliding_window.as_ref().expect("local layers");
    assert_eq!(
        sw.rope_theta,
        rope["sliding_attention"]["rope_theta"].as_f64().unwrap(),
        "{name}"
    );
    assert_eq!(
        sw.size as u64,
        c["sliding_window"].as_u64().unwrap(),
        "{name}"
    );
    let kinds: Vec<bool> = c["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t == "sliding_attention")
        .collect();
    assert_eq!(sw.local, kinds, "{name}: layer_types");
    assert!(
        kinds.contains(&true) && kinds.contains(&false),
        "{name}: both kinds of layer"
    );
    assert_eq!(
        cfg.query_pre_attn_scalar,
        c["query_pre_attn_scalar"].as_f64(),
        "{name}"
    );
    assert_eq!(
        cfg.final_logit_softcapping,
        c["final_logit_softcapping"].as_f64(),
        "{name}"
    );
    // The sequences are longer than the window: local layers cut keys off.
    assert!(
        sw.size < 9,
        "{name}: the window must be shorter than the shared prompt"
    );
}

/// Each family's fixture: its models, with the awkward shapes all there.
fn models() -> Vec<Value> {
    let mut all = Vec::new();
    for family in ["qwen3.json", "gemma3.json"] {
        all.extend(family_models(family));
    }
    let gemma = |m: &&Value| m["config"]["model_type"] == "gemma3_text";
    // Gemma 3: a soft-capped output, linear RoPE scaling on the global layers.
    assert!(all
        .iter()
        .filter(gemma)
        .any(|m| m["config"]["final_logit_softcapping"].is_f64()));
    assert!(all
        .iter()
        .filter(gemma)
        .any(|m| m["config"]["rope_parameters"]["full_attention"]["rope_type"] == "linear"));
    all
}

fn family_models(file: &str) -> Vec<Value> {
    let fx = fixture(file);
    let models = fx["models"].as_array().unwrap().clone();
    let shapes: Vec<(u64, u64, bool)> = models
        .iter()
        .map(|m| {
            let c = &m["config"];
            (
                c["num_attention_heads"].as_u64().unwrap(),
                c["num_key_value_heads"].as_u64().unwrap(),
                c["tie_word_embeddings"].as_bool().unwrap(),
            )
        })
        .collect();
    // The awkward cases are all there: GQA 3:1 and 1:1, tied and untied.
    assert!(shapes.iter().any(|&(q, kv, _)| q == 3 * kv));
    assert!(shapes.iter().any(|&(q, kv, _)| q == kv));
    assert!(shapes.iter().any(|s| s.2) && shapes.iter().any(|s| !s.2));
    models
}

#[test]
fn family_logprobs_and_entropies_match_transformers_in_f64() {
    for case in models() {
        let name = case["name"].as_str().unwrap();
        let model = build(&case);
        for sc in case["cases"].as_array().unwrap() {
            let ids = u32s(&sc["ids"]);
            let t = sc["temperature"].as_f64().unwrap();
            // Both forward paths: the differentiable one and the inference one.
            for w in [model.weights(), model.inference_weights()] {
                let out = model
                    .completion_logprobs(&w, std::slice::from_ref(&ids), &[1], t)
                    .unwrap();
                let lp: Vec<f64> = out.logprobs.to_vec1().unwrap();
                let ent: Vec<f64> = out.entropy.to_vec1().unwrap();
                let d_lp = max_abs_diff(&lp, &f64s(&sc["logprobs"]));
                let d_ent = max_abs_diff(&ent, &f64s(&sc["entropy"]));
                eprintln!(
                    "{name} len {} T {t} fused {}: |Δlogprob| {d_lp:.1e}, |Δentropy| {d_ent:.1e}",
                    ids.len(),
                    w.fused
                );
                assert!(d_lp <= TOL, "{name}: logprobs differ by {d_lp} (T {t})");
                assert!(d_ent <= TOL, "{name}: entropies differ by {d_ent} (T {t})");
            }
        }
    }
}

/// The fixture's loss Σ aₜ·logprobₜ + Σ bₜ·entropyₜ over two completions of one prompt.
fn loss_and_grads(
    model: &Model,
    case: &Value,
    options: ForwardOptions,
) -> (f64, HashMap<String, Vec<f64>>) {
    let prompt = u32s(&case["prompt"]);
    let seqs: Vec<Vec<u32>> = case["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| [prompt.as_slice(), &u32s(c)].concat())
        .collect();
    let starts = vec![prompt.len(); seqs.len()];
    let t = case["temperature"].as_f64().unwrap();
    let out = model
        .completion_logprobs_with(&model.weights(), &seqs, &starts, t, options)
        .unwrap();
    let n = out.logprobs.dim(0).unwrap();
    let a: Vec<f64> = (0..n).map(|i| 1.0 + 0.1 * i as f64).collect();
    let b: Vec<f64> = (0..n).map(|i| 0.5 - 0.05 * i as f64).collect();
    let a = Tensor::from_vec(a, n, &Device::Cpu).unwrap();
    let b = Tensor::from_vec(b, n, &Device::Cpu).unwrap();
    let loss = ((&out.logprobs * a).unwrap().sum_all().unwrap()
        + (&out.entropy * b).unwrap().sum_all().unwrap())
    .unwrap();
    let grads = out.backward(&loss).unwrap();
    let by_name = model
        .trainable()
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (name.to_string(), g)
        })
        .collect();
    (loss.to_scalar::<f64>().unwrap(), by_name)
}

/// Gradients of every parameter against transformers in f64, as the Llama gradient
/// parity test checks them (norm and first 16 entries, relative to the norm),
/// in every packing and with the layers checkpointed.
#[test]
fn family_gradients_match_transformers_in_f64() {
    let layouts = [Packing::Padded, Packing::Packed, Packing::SharedPrefix];
    for case in models() {
        let name = case["name"].as_str().unwrap();
        let model = build(&case);
        let reference = case["gradients"].as_object().unwrap();
        assert_eq!(
            reference.len(),
            model.params().iter().count(),
            "{name}: parameter count"
        );
        for packing in layouts {
            for checkpoint_layers in [false, true] {
                let options = ForwardOptions {
                    packing,
                    checkpoint_layers,
                };
                let what = format!("{name} {packing:?} checkpointed {checkpoint_layers}");
                let (value, grads) = loss_and_grads(&model, &case, options);
                let mut worst = 0f64;
                let expect = case["loss"].as_f64().unwrap();
                assert!(
                    (value - expect).abs() < TOL * expect.abs().max(1.0),
                    "{what}: loss {value} vs {expect}"
                );
                for (pname, g) in &grads {
                    let r = &reference[pname];
                    let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                    let r_norm = r["norm"].as_f64().unwrap();
                    assert!(
                        r_norm > 0.0 && (norm - r_norm).abs() <= TOL * r_norm,
                        "{what} {pname}: gradient norm {norm} vs transformers {r_norm}"
                    );
                    let head = f64s(&r["head"]);
                    let d = max_abs_diff(&g[..head.len()], &head);
                    assert!(
                        d <= TOL * r_norm,
                        "{what} {pname}: gradient entries differ by {d} (norm {r_norm})"
                    );
                    worst = worst.max(d / r_norm).max((norm - r_norm).abs() / r_norm);
                }
                eprintln!("{what}: worst relative gradient error {worst:.1e}");
            }
        }
    }
}

/// A config.json of a family Tandem does not run is refused, naming the ones it does.
#[test]
fn an_unknown_architecture_is_refused_with_the_known_list() {
    for text in [
        r#"{"architectures": ["Gemma2ForCausalLM"], "hidden_size": 64}"#,
        r#"{"architectures": ["Gemma3nForCausalLM"], "hidden_size": 64}"#,
        r#"{"model_type": "qwen3_moe", "hidden_size": 64}"#,
    ] {
        let err = ModelConfig::from_hf_json(text, Path::new("config.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported architecture"), "{err}");
        for known in [
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
            "Qwen3ForCausalLM",
            "Gemma3ForCausalLM",
            "Gemma3ForConditionalGeneration",
        ] {
            assert!(err.contains(known), "{err} should name {known}");
        }
    }
}

/// A Qwen3 config written by Tandem is read back the same, and says `qwen3`.
#[test]
fn a_qwen3_config_round_trips() {
    let cfg = tandem_model::preset::preset_config("tiny-qwen3").unwrap();
    let v = cfg.to_hf_json();
    assert_eq!(v["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(v["model_type"], "qwen3");
    assert_eq!(v["attention_bias"], false);
    let back = ModelConfig::from_hf_json(&v.to_string(), Path::new("config.json")).unwrap();
    assert_eq!(back, cfg);
}

/// A Gemma 3 config written by Tandem is read back the same and says `gemma3_text`.
#[test]
fn a_gemma3_config_round_trips() {
    let cfg = tandem_model::preset::preset_config("tiny-gemma3").unwrap();
    let v = cfg.to_hf_json();
    assert_eq!(v["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(v["model_type"], "gemma3_text");
    assert_eq!(v["hidden_activation"], "gelu_pytorch_tanh");
    let back = ModelConfig::from_hf_json(&v.to_string(), Path::new("config.json")).unwrap();
    assert_eq!(back, cfg);
}

/// The multimodal checkpoint's config: the text model is read from `text_config`, with
/// transformers' defaults for what it leaves out and the older `rope_scaling`,
/// `rope_local_base_freq` and `sliding_window_pattern` fields.
#[test]
fn a_gemma3_multimodal_config_gives_its_text_model() {
    let text = r#"{"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
          "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
          "sliding_window": 1024, "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0},
        "vision_config": {"hidden_size": 1152}}"#;
    let cfg = ModelConfig::from_hf_json(text, Path::new("config.json")).unwrap();
    assert_eq!(cfg.architecture, Architecture::Gemma3);
    assert_eq!(
        (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size),
        (2560, 34, 262_208)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (8, 4, 256)
    );
    assert_eq!(cfg.rope_theta, 1_000_000.0);
    assert_eq!(
        cfg.rope_scaling,
        Some(tandem_model::config::RopeScaling::Linear { factor: 8.0 })
    );
    let sw = cfg.sliding_window.unwrap();
    assert_eq!((sw.size, sw.rope_theta), (1024, 10_000.0));
    let globals: Vec<usize> = (0..34).filter(|&l| !sw.local[l]).collect();
    assert_eq!(globals, [5, 11, 17, 23, 29]);
    assert!(cfg.tie_word_embeddings);
}

/// What Tandem cannot run is refused by name: attention soft-capping (Gemma 2),
/// bidirectional attention (an embedding model), a `layer_types` of the wrong length
/// or kind, another activation, a missing `text_config`.
#[test]
fn gemma3_configs_tandem_cannot_run_are_refused_by_field() {
    let base = tandem_model::preset::preset_config("tiny-gemma3")
        .unwrap()
        .to_hf_json();
    let with = |k: &str, v: Value| {
        let mut c = base.clone();
        c[k] = v;
        ModelConfig::from_hf_json(&c.to_string(), Path::new("config.json"))
            .unwrap_err()
            .to_string()
    };
    let cases = [
        ("attn_logit_softcapping", serde_json::json!(50.0)),
        ("use_bidirectional_attention", serde_json::json!(true)),
        ("layer_types", serde_json::json!(["sliding_attention"])),
        (
            "layer_types",
            serde_json::json!(["sliding_attention", "chunked", "full_attention"]),
        ),
        ("hidden_activation", serde_json::json!("silu")),
        ("sliding_window", serde_json::json!(0)),
        ("query_pre_attn_scalar", serde_json::json!(-1.0)),
    ];
    for (key, value) in cases {
        let err = with(key, value.clone());
        let named = key.split('_').next().unwrap();
        assert!(err.contains(named), "{key} = {value}: {err}");
    }
    let err = ModelConfig::from_hf_json(
        r#"{"architectures": ["Gemma3ForConditionalGeneration"]}"#,
        Path::new("c.json"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("text_config"), "{err}");
}

/// The fixture's adapter on its base: A and B from `det_values` of PEFT's names.
fn build_adapted(case: &Value) -> Model {
    use tandem_model::lora::{self, Adapter, LoraSpec};
    let base = build(case);
    let l = &case["lora"];
    let names: Vec<String> = l["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let spec = LoraSpec {
        rank: l["r"].as_u64().unwrap() as usize,
        alpha: l["lora_alpha"].as_f64().unwrap(),
        rslora: l["use_rslora"].as_bool().unwrap(),
        targets: lora::config::parse_targets(&names).unwrap(),
    };
    let tensors = lora::expected_adapter_params(base.config(), &spec)
        .into_iter()
        .map(|(n, shape)| {
            let count = shape.iter().product();
            let t = Tensor::from_vec(det_values(&n, count), shape, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    let a = Adapter::from_tensors(base.config(), spec, tensors, DType::F64, &Device::Cpu).unwrap();
    base.with_adapter(a).unwrap()
}

/// LoRA against PEFT + transformers in f64: the adapted model's logprobs, the loss, the
/// gradients of every A and B (and none of the frozen base), in every layout and
/// checkpointed, then one AdamW step over the adapter only.
#[test]
fn lora_gradients_and_update_match_peft_in_f64() {
    use tandem_model::optim::{AdamW, AdamWConfig};
    let fx = fixture("lora.json");
    let cases = fx["models"].as_array().unwrap();
    assert!(cases.iter().any(|c| c["lora"]["use_rslora"] == true));
    assert!(
        cases.iter().any(|c| c["family"] == "gemma3")
            && cases.iter().any(|c| c["family"] == "qwen3")
    );
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let model = build_adapted(case);
        for sc in case["cases"].as_array().unwrap() {
            let ids = u32s(&sc["ids"]);
            let t = sc["temperature"].as_f64().unwrap();
            for w in [model.weights(), model.inference_weights()] {
                let out = model
                    .completion_logprobs(&w, std::slice::from_ref(&ids), &[1], t)
                    .unwrap();
                let lp: Vec<f64> = out.logprobs.to_vec1().unwrap();
                let d = max_abs_diff(&lp, &f64s(&sc["logprobs"]));
                assert!(d <= TOL, "{name}: adapted logprobs differ by {d}");
            }
        }
        let reference = case["gradients"].as_object().unwrap();
        assert_eq!(
            reference.len(),
            model.trainable().len(),
            "{name}: adapter tensors"
        );
        for packing in [Packing::Packed, Packing::SharedPrefix] {
            for checkpoint_layers in [false, true] {
                let what = format!("{name} {packing:?} checkpointed {checkpoint_layers}");
                let options = ForwardOptions {
                    packing,
                    checkpoint_layers,
                };
                let (value, grads) = loss_and_grads(&model, case, options);
                let expect = case["loss"].as_f64().unwrap();
                assert!(
                    (value - expect).abs() < TOL * expect.abs().max(1.0),
                    "{what}: loss {value} vs {expect}"
                );
                for (pname, g) in &grads {
                    let r = &reference[pname];
                    let r_norm = r["norm"].as_f64().unwrap();
                    let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                    assert!(
                        r_norm > 0.0 && (norm - r_norm).abs() <= TOL * r_norm,
                        "{what} {pname}: norm {norm} vs {r_norm}"
                    );
                    let head = f64s(&r["head"]);
                    let d = max_abs_diff(&g[..head.len()], &head);
                    assert!(d <= TOL * r_norm, "{what} {pname}: entries differ by {d}");
                }
            }
        }
        // One AdamW step over the adapter, on the gradients of the same loss.
        let h = &case["adamw"];
        let betas = f64s(&h["betas"]);
        let config = AdamWConfig {
            lr: h["lr"].as_f64().unwrap(),
            beta1: betas[0],
            beta2: betas[1],
            eps: h["eps"].as_f64().unwrap(),
            weight_decay: h["weight_decay"].as_f64().unwrap(),
        };
        let params = model
            .trainable()
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        let mut opt = AdamW::new(params, config).unwrap();
        let seqs: Vec<Vec<u32>> = case["completions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| [u32s(&case["prompt"]), u32s(c)].concat())
            .collect();
        let starts = vec![u32s(&case["prompt"]).len(); seqs.len()];
        let out = model
            .completion_logprobs(
                &model.weights(),
                &seqs,
                &starts,
                case["temperature"].as_f64().unwrap(),
            )
            .unwrap();
        let n = out.logprobs.dim(0).unwrap();
        let a = Tensor::from_vec(
            (0..n).map(|i| 1.0 + 0.1 * i as f64).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )
        .unwrap();
        let b = Tensor::from_vec(
            (0..n).map(|i| 0.5 - 0.05 * i as f64).collect::<Vec<_>>(),
            n,
            &Device::Cpu,
        )
        .unwrap();
        let loss = ((&out.logprobs * a).unwrap().sum_all().unwrap()
            + (&out.entropy * b).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = out.backward(&loss).unwrap();
        let before = model.params().snapshot().unwrap();
        opt.step(&grads, None).unwrap();
        for (pname, v) in model.trainable().iter() {
            let r = &case["updated"][pname];
            let vals: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
            let norm = vals.iter().map(|x| x * x).sum::<f64>().sqrt();
            let r_norm = r["norm"].as_f64().unwrap();
            assert!(
                (norm - r_norm).abs() <= 1e-9 * r_norm,
                "{name} {pname}: updated norm {norm} vs {r_norm}"
            );
            let d = max_abs_diff(&vals[..16.min(vals.len())], &f64s(&r["head"]));
            assert!(d <= 1e-9, "{name} {pname}: updated entries differ by {d}");
        }
        // The base did not move.
        for (pname, v) in model.params().iter() {
            let now: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
            let was: Vec<f64> = before[pname].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(now, was, "{name}: frozen {pname} changed");
        }
    }
}
