//! LoRA: a fresh adapter is the base; merged and unmerged adapters give the same
//! numbers and the same samples; only the adapter gets gradients; PEFT's format round
//! trips exactly and what Tandem cannot apply is refused by field.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use tandem_model::lora::{self, Adapter, LoraInit, LoraSection, LoraSpec, Target};
use tandem_model::{preset, Engine, EngineConfig, Model, Request, SamplingParams};

fn spec(rank: usize, targets: &[Target], rslora: bool) -> LoraSpec {
    LoraSpec {
        rank,
        alpha: 2.0 * rank as f64 + 1.0,
        rslora,
        targets: targets.to_vec(),
    }
}

/// `model` with an adapter whose B is not zero (a trained one), seeded.
fn adapted(model: &Model, spec: LoraSpec, seed: u64) -> Model {
    let a = Adapter::init(
        model.config(),
        spec,
        LoraInit::Kaiming,
        seed,
        model.dtype(),
        &Device::Cpu,
    )
    .unwrap();
    let mut b = HashMap::new();
    for (name, v) in a.params().iter() {
        if name.ends_with("lora_B.weight") {
            let t = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
            b.insert(name.to_string(), t.to_dtype(model.dtype()).unwrap());
        }
    }
    a.params().assign(&b).unwrap();
    model.clone().with_adapter(a).unwrap()
}

/// `requests` prompts of different lengths, `samples` completions each of at most
/// `max_new` tokens, seeded, on one engine; the tokens by request id.
fn sample(
    model: &Model,
    requests: u64,
    samples: usize,
    max_new: usize,
) -> Vec<(u64, Vec<Vec<u32>>)> {
    let mut e = Engine::new(model, EngineConfig::default()).unwrap();
    for i in 0..requests {
        let prompt: Vec<u32> = (0..(3 + 4 * i as usize))
            .map(|j| (j * 13 + i as usize * 7) as u32 % 400 + 3)
            .collect();
        let params = SamplingParams {
            temperature: 1.0,
            max_new_tokens: max_new,
            seed: 40 + i,
            ..Default::default()
        };
        e.add(
            model,
            Request {
                id: i,
                prompt,
                samples,
                params,
                first_stream: 0,
            },
        )
        .unwrap();
    }
    let mut out: Vec<_> = e
        .run_to_completion(model, 0)
        .unwrap()
        .into_iter()
        .map(|f| {
            (
                f.id,
                f.completions
                    .into_iter()
                    .map(|c| c.tokens)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    out.sort();
    out
}

const IDS: [u32; 12] = [5, 17, 99, 3, 250, 7, 8, 300, 41, 2, 11, 60];

#[test]
fn a_fresh_adapter_is_the_base_model() {
    for name in preset::TINY_PRESETS {
        let p = tiny(name, 1);
        let spec = LoraSection::default().spec().unwrap();
        let a = Adapter::init(
            p.model.config(),
            spec,
            LoraInit::Kaiming,
            7,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        // A is Kaiming-uniform within ±1/√in, B is zero.
        for (n, v) in a.params().iter() {
            let vals = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let max = vals.iter().fold(0f32, |m, x| m.max(x.abs()));
            if n.ends_with("lora_B.weight") {
                assert_eq!(max, 0.0, "{name}: {n}");
            } else {
                let bound = 1.0 / (v.dim(1).unwrap() as f32).sqrt();
                assert!(
                    max > 0.5 * bound && max <= bound,
                    "{name}: {n} max {max} bound {bound}"
                );
            }
        }
        let with = p.model.clone().with_adapter(a).unwrap();
        assert_eq!(
            score(&with, &IDS, 1.0),
            score(&p.model, &IDS, 1.0),
            "{name}"
        );
    }
}

#[test]
fn merged_and_unmerged_adapters_give_the_same_logprobs_in_f64() {
    for name in preset::TINY_PRESETS {
        let cfg = preset::preset_config(name).unwrap();
        let base = Model::random(cfg, 3, DType::F64, &Device::Cpu).unwrap();
        for (targets, rslora) in [
            (&Target::ALL[..], false),
            (&[Target::K, Target::Down][..], true),
        ] {
            let m = adapted(&base, spec(3, targets, rslora), 5);
            let merged = m.merged().unwrap();
            assert!(merged.adapter().is_none());
            let (lu, eu) = score(&m, &IDS, 0.8);
            let (lm, em) = score(&merged, &IDS, 0.8);
            let (lb, _) = score(&base, &IDS, 0.8);
            assert!(
                max_abs_diff(&lu, &lm) < 1e-6,
                "{name}: {}",
                max_abs_diff(&lu, &lm)
            );
            assert!(max_abs_diff(&eu, &em) < 1e-6, "{name}");
            // The adapter changes the model (so the comparison means something).
            assert!(
                max_abs_diff(&lu, &lb) > 1e-4,
                "{name}: the adapter did nothing"
            );
        }
    }
}

/// The engine on an unmerged adapter samples exactly what it samples on the merged
/// model: a generator that received an adapter-only version is the one that fetched
/// the merged weights.
#[test]
fn the_engine_samples_the_same_with_the_adapter_unmerged_or_merged() {
    for name in preset::TINY_PRESETS {
        let p = tiny(name, 2);
        let m = adapted(&p.model, spec(4, &Target::ALL, false), 9);
        let merged = m.merged().unwrap();
        let run = |model: &Model| sample(model, 6, 4, 12);
        let (a, b) = (run(&m), run(&merged));
        assert_eq!(a, b, "{name}");
        assert_ne!(
            a,
            run(&p.model),
            "{name}: the adapter did not change what is sampled"
        );
    }
}

#[test]
fn only_the_adapter_gets_gradients_with_and_without_checkpointing() {
    for name in preset::TINY_PRESETS {
        let p = tiny(name, 4);
        let m = adapted(
            &p.model,
            spec(2, &[Target::Q, Target::O, Target::Up], false),
            1,
        );
        let seqs = vec![IDS.to_vec(), IDS[..7].to_vec()];
        for checkpoint in [false, true] {
            let opts = tandem_model::packing::ForwardOptions {
                packing: tandem_model::packing::Packing::Packed,
                checkpoint_layers: checkpoint,
            };
            let out = m
                .completion_logprobs_with(&m.weights(), &seqs, &[3, 2], 1.0, opts)
                .unwrap();
            let loss = out.logprobs.sum_all().unwrap();
            let grads = out.backward(&loss).unwrap();
            for (n, v) in m.params().iter() {
                assert!(grads.get(v).is_none(), "{name}: frozen {n} got a gradient");
            }
            for (n, v) in m.trainable().iter() {
                let g = grads
                    .get(v)
                    .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // B is non-zero, so A's gradient is too; B's always is.
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{name}: {n} gradient norm {norm}"
                );
            }
        }
    }
}

#[test]
fn peft_format_round_trips_exactly_and_refuses_what_it_cannot_apply() {
    let p = tiny("tiny-qwen3", 5);
    let m = adapted(&p.model, spec(4, &[Target::V, Target::Gate], true), 3);
    let dir = tempfile::tempdir().unwrap();
    let a = m.adapter().unwrap();
    lora::save_peft(a, dir.path(), "preset:tiny-qwen3", DType::F32).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(lora::ADAPTER_CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["use_rslora"], true);
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["v_proj", "gate_proj"])
    );
    let back = lora::load_peft(dir.path(), m.config(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.spec(), a.spec());
    for ((n1, v1), (n2, v2)) in a.params().iter().zip(back.params().iter()) {
        assert_eq!(n1, n2);
        assert!(n1.starts_with("base_model.model.model.layers."), "{n1}");
        let (x, y) = (
            v1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{n1}");
    }
    // A base of another shape is refused with the reason.
    let mut other = m.config().clone();
    other.intermediate_size += 8;
    let e = lora::load_peft(dir.path(), &other, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("base model") && e.contains("gate_proj"), "{e}");
    // Fields Tandem cannot honour are refused by name.
    for (field, value) in [
        ("use_dora", serde_json::json!(true)),
        ("bias", serde_json::json!("all")),
        ("modules_to_save", serde_json::json!(["lm_head"])),
        ("target_modules", serde_json::json!(".*proj")),
        ("target_modules", serde_json::json!(["c_attn"])),
        ("peft_type", serde_json::json!("IA3")),
        ("rank_pattern", serde_json::json!({"q_proj": 8})),
        ("r", serde_json::json!(0)),
    ] {
        let mut bad = cfg.clone();
        bad[field] = value;
        std::fs::write(dir.path().join(lora::ADAPTER_CONFIG_FILE), bad.to_string()).unwrap();
        let e = lora::read_spec(dir.path()).unwrap_err().to_string();
        assert!(e.contains(field), "{field}: {e}");
    }
    // Missing weights are named.
    std::fs::write(dir.path().join(lora::ADAPTER_CONFIG_FILE), cfg.to_string()).unwrap();
    std::fs::remove_file(dir.path().join(lora::ADAPTER_WEIGHTS_FILE)).unwrap();
    let e = lora::load_peft(dir.path(), m.config(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains(lora::ADAPTER_WEIGHTS_FILE), "{e}");
}

/// A generator folds its adapter into the weights (W₀ + s·B·A) and refolds it at each
/// new adapter version: it samples exactly what the merged model samples, before and
/// after a new version, and the new version is folded from W₀ (no drift).
#[test]
fn a_folded_adapter_samples_the_merged_model_and_refolds_each_version() {
    let run = |model: &Model| sample(model, 4, 20, 10);
    for name in preset::TINY_PRESETS {
        let p = tiny(name, 6);
        let unfolded = adapted(
            &p.model,
            spec(4, &[Target::Q, Target::Up, Target::Down], false),
            2,
        );
        let merged = unfolded.merged().unwrap();
        let folded = unfolded.clone().fold_adapter().unwrap();
        assert!(folded.is_folded());
        // The folded model shares the adapter's storage with `unfolded`, not the base's.
        assert_eq!(run(&folded), run(&merged), "{name}: folded vs merged");
        // A new version: new adapter values, refolded from W₀. (Folding wrote into the
        // parameters every clone of `p.model` shares: the reference loads the base again.)
        let fresh = tiny(name, 6);
        let next = adapted(
            &fresh.model,
            spec(4, &[Target::Q, Target::Up, Target::Down], false),
            3,
        );
        let bytes = next.trainable().to_bytes().unwrap();
        folded.trainable().assign_bytes(&bytes.0, bytes.1).unwrap();
        folded.refold().unwrap();
        let next_merged = next.merged().unwrap();
        assert_eq!(
            run(&folded),
            run(&next_merged),
            "{name}: after a new version"
        );
        let (lf, _) = score(&folded, &IDS, 1.0);
        let (lm, _) = score(&next_merged, &IDS, 1.0);
        assert!(
            max_abs_diff(&lf, &lm) < 1e-5,
            "{name}: drift {}",
            max_abs_diff(&lf, &lm)
        );
    }
}
