//! `tandem train-step` as a user runs it.

mod common;

use std::path::Path;

use common::{assert_clean_failure, init_tiny, ok, train_step};

fn metrics(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
}

fn weights(dir: &Path) -> Vec<f32> {
    let t =
        candle_core::safetensors::load(dir.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    names
        .iter()
        .flat_map(|n| t[*n].flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Two groups of three synthetic rollouts with different rewards.
fn write_rollouts(path: &Path) {
    let mut lines = Vec::new();
    for g in ["g0", "g1"] {
        for k in 0..3u32 {
            let completion: Vec<u32> = (0..4).map(|i| 40 + 7 * k + i).collect();
            lines.push(
                serde_json::json!({
                    "group": g, "prompt_ids": [1, 20 + k, 30], "completion_ids": completion,
                    "behavior_logprobs": [-6.2, -6.3, -6.1, -6.25], "reward": k as f64 * 0.5,
                })
                .to_string(),
            );
        }
    }
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// SGD without clipping moves the weights by exactly lr·‖g‖ in L2, with ‖g‖ the
/// reported grad_norm: the step, the metrics and the saved folder agree.
#[test]
fn sgd_step_moves_weights_by_lr_times_grad_norm() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let rollouts = dir.path().join("r.jsonl");
    write_rollouts(&rollouts);
    for (name, algo) in [
        ("grpo-decoupled-tis", "advantage = \"grpo\"\ncorrection = \"tis\"\ncorrection_level = \"sequence\""),
        ("rloo-bypass-kl", "advantage = \"rloo\"\ncorrection_mode = \"bypass\"\nkl_coef = 0.1\nloss_agg = \"seq_mean_token_mean\""),
        ("reinforce-icepop", "advantage = \"reinforce\"\npolicy_loss = \"reinforce\"\ncorrection = \"icepop\"\nentropy_coef = 0.01"),
    ] {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("[algorithm]\n{algo}\n\n[optimizer]\nname = \"sgd\"\nlr = 0.5\nmax_grad_norm = 0\n")).unwrap();
        let out = dir.path().join(name);
        ok(train_step(&model, &rollouts, &cfg, &out));
        let m = metrics(&out);
        let grad_norm = m["grad_norm"].as_f64().unwrap();
        assert!(m["loss"].as_f64().unwrap().is_finite() && grad_norm > 0.0, "{name}: {m}");
        let (before, after) = (weights(&model), weights(&out));
        let moved = before.iter().zip(&after).map(|(a, b)| ((b - a) as f64).powi(2)).sum::<f64>().sqrt();
        let expect = 0.5 * grad_norm;
        assert!((moved - expect).abs() <= 1e-3 * expect, "{name}: moved {moved}, lr·‖g‖ = {expect}");
    }
}

/// PPO with GAE trains a value head and saves it beside the model; a second step
/// starts from it.
#[test]
fn gae_step_writes_and_reuses_the_value_head() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let rollouts = dir.path().join("r.jsonl");
    write_rollouts(&rollouts);
    let cfg = dir.path().join("gae.toml");
    std::fs::write(
        &cfg,
        "[algorithm]\nadvantage = \"gae\"\ngamma = 0.99\n\n[optimizer]\nname = \"sgd\"\nlr = 0.1\n",
    )
    .unwrap();
    let step = |from: &Path, to: &Path| {
        ok(train_step(from, &rollouts, &cfg, to));
        metrics(to)["value_loss"].as_f64().unwrap()
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let first = step(&model, &one);
    assert!(one.join("value_head.safetensors").exists());
    let second = step(&one, &two);
    assert!(
        first > 0.0 && second < first,
        "the critic learns: value loss {first} then {second}"
    );
}

#[test]
fn bad_rollouts_and_configs_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let good = r#"{"group":"g","prompt_ids":[1],"completion_ids":[5,6],"behavior_logprobs":[-1.0,-2.0],"reward":1.0}"#;
    let cfg = dir.path().join("c.toml");
    let cases: [(&str, &str, &[&str]); 5] = [
        (
            "",
            &good.replace("[-1.0,-2.0]", "[-1.0]"),
            &["r.jsonl:2", "behavior_logprobs"],
        ),
        (
            "",
            &good.replace("-2.0]", "0.3]"),
            &["r.jsonl:2", "behavior_logprobs[1]"],
        ),
        (
            "[algorithm]\nadvantage = \"rloo\"\n",
            &good.replace("\"g\"", "\"h\""),
            &["rloo", "group"],
        ),
        (
            "[algorithm]\nprox_logp = \"loglinear\"\n",
            good,
            &["loglinear", "versions"],
        ),
        (
            "[algorithm]\nclip_epsilon = 0.2\n",
            good,
            &["c.toml", "clip_epsilon"],
        ),
    ];
    for (config, second, needles) in cases {
        std::fs::write(&cfg, config).unwrap();
        let r = dir.path().join("r.jsonl");
        std::fs::write(&r, format!("{good}\n{second}\n")).unwrap();
        let o = train_step(&model, &r, &cfg, &dir.path().join("o"));
        assert_clean_failure(&o, needles);
    }
}

fn adapter_tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let t = candle_core::safetensors::load(
        dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    t.into_iter()
        .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

/// With `[lora]` a step trains the adapter alone: the output is a PEFT folder (no
/// model weights), the base folder is untouched; a step from the saved adapter
/// (`--adapter`, or `[lora] from`) goes on from exactly it: both give the same bits;
/// PPO's value head is trained beside it and saved with it; bad combinations are
/// refused.
#[test]
fn lora_steps_train_the_adapter_alone_and_go_on_from_it_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let rollouts = dir.path().join("r.jsonl");
    write_rollouts(&rollouts);
    let base_before = weights(&model);
    let cfg = dir.path().join("lora.toml");
    let text = "[algorithm]\nadvantage = \"gae\"\nkl_coef = 0.05\n\n[optimizer]\nlr = 0.01\n\n[lora]\nrank = 4\nalpha = 8.0\ntarget_modules = [\"q_proj\", \"v_proj\", \"down_proj\"]\n";
    std::fs::write(&cfg, text).unwrap();
    let one = dir.path().join("one");
    ok(train_step(&model, &rollouts, &cfg, &one));
    assert!(
        one.join("adapter_config.json").exists() && one.join("value_head.safetensors").exists()
    );
    assert!(
        !one.join("model.safetensors").exists(),
        "a LoRA step saves the adapter only"
    );
    assert_eq!(weights(&model), base_before, "the base folder is untouched");
    let first = adapter_tensors(&one);
    assert_eq!(
        first.len(),
        2 * 3 * 2,
        "A and B of 3 projections in 2 layers"
    );
    let b_moved = first
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B.weight"))
        .all(|(_, v)| v.iter().any(|x| *x != 0.0));
    assert!(b_moved, "every B left zero after one step");
    // Go on from the saved adapter, two ways: the same bits.
    let via_flag = dir.path().join("two-flag");
    let o = common::tandem(&[
        "train-step",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        one.to_str().unwrap(),
        "--rollouts",
        rollouts.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        via_flag.to_str().unwrap(),
    ]);
    ok(o);
    let from_cfg = dir.path().join("from.toml");
    std::fs::write(&from_cfg, format!("{text}from = \"{}\"\n", one.display())).unwrap();
    let via_from = dir.path().join("two-from");
    // The value head beside the adapter is read by both routes.
    ok(train_step(&model, &rollouts, &from_cfg, &via_from));
    let (a, b) = (adapter_tensors(&via_flag), adapter_tensors(&via_from));
    assert!(
        a == b,
        "a step from the saved adapter depends on how it was named"
    );
    assert!(a != first, "the second step did not move the adapter");
    // The first step from the saved adapter equals one from the adapter in memory:
    // same metrics line (loss, KL to the base, clip fraction) for both routes.
    let (ma, mb) = (metrics(&via_flag), metrics(&via_from));
    assert_eq!(ma["kl"], mb["kl"]);
    assert!(
        ma["kl"].as_f64().unwrap() > 0.0,
        "the adapted policy differs from the base"
    );
    // Refusals.
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "[optimizer]\nlr = 0.01\n").unwrap();
    let o = common::tandem(&[
        "train-step",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        one.to_str().unwrap(),
        "--rollouts",
        rollouts.to_str().unwrap(),
        "--config",
        plain.to_str().unwrap(),
        "--out",
        dir.path().join("x").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["--adapter", "[lora]"]);
    std::fs::write(&cfg, "[lora]\ntarget_modules = [\"qkv\"]\n").unwrap();
    let o = train_step(&model, &rollouts, &cfg, &dir.path().join("y"));
    assert_clean_failure(&o, &["target_modules", "qkv", "q_proj"]);
}
