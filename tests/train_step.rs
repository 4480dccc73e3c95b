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
