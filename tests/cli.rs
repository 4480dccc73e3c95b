//! The `tandem` binary as a user runs it: real processes, real files.

mod common;

use std::path::PathBuf;

use common::{assert_clean_failure, init_tiny, ok, replace_once, stderr, tandem};

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `tandem score` on the tiny model gives transformers' logprobs (fixture), per line.
#[test]
fn score_matches_the_reference_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let fx = fixture();
    let cases: Vec<&serde_json::Value> = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["temperature"] == 0.7)
        .collect();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = cases
        .iter()
        .map(|c| {
            let ids: Vec<u64> = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            serde_json::json!({"prompt_ids": &ids[..1], "completion_ids": &ids[1..]}).to_string()
        })
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let o = tandem(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--temperature",
        "0.7",
        "--batch-size",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), cases.len());
    for (g, c) in got.iter().zip(&cases) {
        for key in ["logprobs", "entropy"] {
            let a = g[key].as_array().unwrap();
            let b = c[key].as_array().unwrap();
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-4,
                    "{key}: {x} vs {y}"
                );
            }
        }
    }
}

#[test]
fn score_accepts_text_fields() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"What is 2 + 3?\", \"completion\": \" 5\"}\n",
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let o = tandem(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&output).unwrap().trim()).unwrap();
    let n = line["logprobs"].as_array().unwrap().len();
    assert!(n >= 1 && n == line["entropy"].as_array().unwrap().len());
    assert!(line["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_f64().unwrap() <= 0.0));
}

/// Bad input: each case fails with a message naming the file, line or field; the
/// output file is not written.
#[test]
fn score_rejects_bad_input_with_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let m = model.to_str().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("{\"prompt_ids\": [1, 2], \"completion_ids\": [3, 99999]}\n", &["in.jsonl:1", "completion_ids[1]", "vocabulary"]),
        ("{\"prompt_ids\": [1], \"completion_ids\": [3]}\n{\"prompt_ids\": [1], \"completion_ids\": []}\n", &["in.jsonl:2", "completion is empty"]),
        ("{\"prompt_ids\": [1], \"completion_ids\": [3]}\n{not json\n", &["in.jsonl:2", "not valid JSON"]),
        ("{\"prompt_ids\": [1, -4], \"completion_ids\": [3]}\n", &["in.jsonl:1", "prompt_ids[1]"]),
        ("{\"completion_ids\": [3]}\n", &["in.jsonl:1", "prompt_ids"]),
        ("[1, 2]\n", &["in.jsonl:1", "JSON object"]),
    ];
    for (content, needles) in cases {
        let input = dir.path().join("in.jsonl");
        std::fs::write(&input, content).unwrap();
        let output = dir.path().join("out.jsonl");
        let o = tandem(&[
            "score",
            "--model",
            m,
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, needles);
        assert!(!output.exists(), "no output on failure");
    }
}

#[test]
fn bad_models_are_reported_by_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let o = tandem(&[
        "score",
        "--model",
        missing.to_str().unwrap(),
        "--input",
        "x",
        "--output",
        "y",
    ]);
    assert_clean_failure(&o, &["nope", "no such file"]);

    let model = init_tiny(dir.path());
    let cfg_path = model.join("config.json");
    let cfg = replace_once(
        &std::fs::read_to_string(&cfg_path).unwrap(),
        "\"LlamaForCausalLM\"",
        "\"GPTNeoXForCausalLM\"",
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    let o = tandem(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clean_failure(
        &o,
        &[
            "config.json",
            "unsupported architecture `GPTNeoXForCausalLM`",
        ],
    );

    let model = init_tiny(&dir.path().join("b"));
    std::fs::write(
        model.join("config.json"),
        "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64}",
    )
    .unwrap();
    let o = tandem(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clean_failure(&o, &["config.json", "missing field `num_attention_heads`"]);

    let model = init_tiny(&dir.path().join("c"));
    std::fs::write(model.join("model.safetensors"), b"garbage").unwrap();
    let o = tandem(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
    ]);
    assert_clean_failure(&o, &["model.safetensors"]);

    let bogus = dir.path().join("bogus.gguf");
    std::fs::write(&bogus, b"not a gguf").unwrap();
    let o = tandem(&[
        "model",
        "convert",
        "--input",
        bogus.to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, &["bogus.gguf", "GGUF"]);
}

#[test]
fn bad_arguments_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let m = model.to_str().unwrap();
    assert_clean_failure(
        &tandem(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "hi",
            "--temperature=-1",
        ]),
        &["temperature"],
    );
    assert_clean_failure(
        &tandem(&["generate", "--model", m, "--prompt", "hi", "--top-p", "1.5"]),
        &["top_p"],
    );
    assert_clean_failure(
        &tandem(&["generate", "--model", m, "--prompt", "hi", "-n", "0"]),
        &["--samples"],
    );
    // Template variables: a reserved name, and something that is not an object.
    assert_clean_failure(
        &tandem(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "hi",
            "--chat",
            "--chat-template-kwargs",
            r#"{"enable_thinking": false, "messages": []}"#,
        ]),
        &["--chat-template-kwargs.messages", "reserved"],
    );
    assert_clean_failure(
        &tandem(&[
            "generate",
            "--model",
            m,
            "--prompt",
            "hi",
            "--chat-template-kwargs",
            "[1]",
        ]),
        &["--chat-template-kwargs", "JSON object"],
    );
    assert_clean_failure(
        &tandem(&[
            "model",
            "init",
            "--preset",
            "huge",
            "--out",
            dir.path().join("h").to_str().unwrap(),
        ]),
        &["unknown preset `huge`"],
    );
    // Weak tokens stop a process before it dials anything.
    let status = |token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["status", "127.0.0.1:1"])
            .env("TANDEM_TOKEN", token)
            .output()
            .unwrap()
    };
    assert_clean_failure(&status("short-token"), &["TANDEM_TOKEN", "at least 16"]);
    assert_clean_failure(
        &status("change-me-to-a-random-secret"),
        &["placeholder", "deploy/k8s/secret.yaml"],
    );
}

/// `TANDEM_TLS_CLIENT_AUTH` takes the spellings docs/operations.md gives: with it on
/// and no certificates, the process stops with the mTLS requirement; off, it goes on
/// (and fails only to reach a coordinator that is not there).
#[test]
fn tls_client_auth_from_the_environment_accepts_1_true_and_yes() {
    let run = |value: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["status", "127.0.0.1:1"])
            .env("TANDEM_LOG", "warn")
            .env("TANDEM_TOKEN", "a-token-long-enough-for-anything")
            .env("TANDEM_TLS_CLIENT_AUTH", value)
            .output()
            .unwrap()
    };
    for on in ["1", "true", "yes", "TRUE"] {
        assert_clean_failure(&run(on), &["client_auth (mTLS) needs ca, cert and key"]);
    }
    for off in ["0", "false", "no"] {
        let e = stderr(&run(off));
        assert!(
            !e.contains("mTLS") && !e.contains("invalid value"),
            "{off}: {e}"
        );
    }
    assert_clean_failure(&run("maybe"), &["maybe", "--tls-client-auth"]);
}

/// `[trainer] broadcast = "nccl"` on a build without NCCL stops before anything starts,
/// naming the build that has it.
#[test]
#[cfg_attr(
    feature = "nccl",
    ignore = "this build has NCCL: the refusal is of builds without it"
)]
fn a_broadcast_this_build_cannot_run_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let config = format!("{}/examples/tiny-grpo.toml", env!("CARGO_MANIFEST_DIR"));
    let o = tandem(&[
        "run",
        &config,
        "--set",
        "trainer.broadcast=\"nccl\"",
        "--set",
        &format!("run.run_dir={}", run_dir.display()),
    ]);
    assert_clean_failure(&o, &["[trainer] broadcast", "scripts/build-cuda.sh --nccl"]);
    assert!(!run_dir.join("logs").exists(), "it started the run");
}

#[test]
fn generate_prints_samples() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let o = tandem(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "What is 1 + 1?",
        "--chat",
        "-n",
        "3",
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.matches("--- sample").count(), 3, "{text}");
}

/// `tandem model convert` writes an HF folder whose scores equal the GGUF's.
#[test]
fn convert_smollm2_then_score_identically() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = tandem(&["model", "fetch", "smollm2"]);
    assert!(gguf.status.success(), "{}", stderr(&gguf));
    let gguf = String::from_utf8_lossy(&gguf.stdout).trim().to_string();
    let hf = dir.path().join("smollm2-hf");
    let o = tandem(&[
        "model",
        "convert",
        "--input",
        &gguf,
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"<|im_start|>user\\nWhat is 2+3?<|im_end|>\\n<|im_start|>assistant\\n\", \"completion\": \"2 + 3 = 5<|im_end|>\"}\n").unwrap();
    let mut outs = Vec::new();
    for (k, model) in [gguf.as_str(), hf.to_str().unwrap()]
        .into_iter()
        .enumerate()
    {
        let out = dir.path().join(format!("out{k}.jsonl"));
        let o = tandem(&[
            "score",
            "--model",
            model,
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(std::fs::read_to_string(out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
}

/// `tandem sft` on a chat JSONL file: a bad record stops it before anything is written,
/// naming the file, line and field; good records train (the validation loss falls) and
/// leave the final model, the metrics and a summary.
#[test]
fn sft_checks_every_record_then_trains() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("chat.jsonl");
    let out = dir.path().join("out");
    let good = r#"{"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}"#;
    let cfg = dir.path().join("sft.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"preset:tiny\"\n[data]\nkind = \"jsonl\"\npath = \"{}\"\nchat = true\n[train]\nepochs = 30\nbatch_size = 4\nval_fraction = 0.25\nout_dir = \"{}\"\n[optimizer]\nlr = 3e-3\n",
            data.display(),
            out.display()
        ),
    )
    .unwrap();
    std::fs::write(
        &data,
        format!(
            "{good}\n{good}\n{}\n",
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#
        ),
    )
    .unwrap();
    let o = tandem(&["sft", cfg.to_str().unwrap()]);
    assert_clean_failure(&o, &["chat.jsonl:3", "no assistant turn"]);
    assert!(
        !out.exists(),
        "nothing may be written before every record is checked"
    );

    let rows: Vec<String> = (0..8)
        .map(|i| format!(r#"{{"prompt": "{i} + 1?", "completion": "{}"}}"#, i + 1))
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let o = tandem(&["sft", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (before, after) = (
        s["before"]["val_loss"].as_f64().unwrap(),
        s["after"]["val_loss"].as_f64().unwrap(),
    );
    assert!(after < before - 0.5, "validation loss {before} → {after}");
    assert!(out.join("final/model.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count() as u64,
        s["steps"].as_u64().unwrap()
    );
}

/// The tiny pipeline of examples/: SFT; rejection sampling into new SFT data (and SFT on
/// it); a reward model on the synthetic preference task (the better answer is correct
/// and short) that reaches ≥ 90% held-out accuracy
/// and saves its head beside the model; DPO and IPO make the implicit reward prefer the
/// chosen answers; and `tandem run` optimises the policy against the reward model (the
/// rewards trained on are the reward model's scores, not the built-in verifiers').
#[test]
fn sft_reward_model_dpo_and_rlhf_on_the_tiny_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let example = |name: &str| format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let summary = |out: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
    };
    let run = |args: &[&str]| {
        let o = tandem(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    let sft = dir.path().join("sft");
    run(&[
        "sft",
        &example("tiny-sft.toml"),
        "--set",
        &format!("train.out_dir={}", path(&sft)),
    ]);
    let sft_model = format!("model.path={}", path(&sft.join("final")));

    // Rejection sampling keeps only correct answers, one per prompt, as SFT data, then
    // (`[rejection] sft`) trains on it.
    let rs = dir.path().join("rs/sft.jsonl");
    let rs_sft = dir.path().join("rs-sft");
    let rs_cfg = dir.path().join("rs-sft.toml");
    std::fs::write(
        &rs_cfg,
        format!(
            "[model]\npath = \"{}\"\n[data]\nkind = \"jsonl\"\nchat = false\n[train]\nbatch_size = 8\nmax_len = 32\nval_fraction = 0.0\nout_dir = \"{}\"\n[optimizer]\nlr = 1e-3\n",
            path(&sft.join("final")),
            path(&rs_sft)
        ),
    )
    .unwrap();
    run(&[
        "rejection-sample",
        &example("tiny-rejection.toml"),
        "--set",
        &sft_model,
        "--set",
        "rejection.prompts=40",
        "--set",
        "rejection.n=8",
        "--set",
        &format!("rejection.out={}", path(&rs)),
        "--set",
        &format!("rejection.sft={}", path(&rs_cfg)),
    ]);
    let kept: Vec<serde_json::Value> = std::fs::read_to_string(&rs)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!kept.is_empty() && kept.len() <= 40);
    for k in &kept {
        let q = k["prompt"].as_str().unwrap();
        let (a, b) = q.trim_end_matches(" =").split_once(" + ").unwrap();
        let sum: i64 = a.parse::<i64>().unwrap() + b.parse::<i64>().unwrap();
        assert_eq!(
            k["completion"].as_str().unwrap().trim(),
            sum.to_string(),
            "{k}"
        );
    }
    let rs_summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rs.with_extension("summary.json")).unwrap())
            .unwrap();
    assert!(rs_summary["mean_reward_sampled"].as_f64().unwrap() < 1.0);
    assert_eq!(rs_summary["mean_reward_kept"].as_f64().unwrap(), 1.0);
    assert!(rs_sft.join("final/model.safetensors").exists());
    let o = tandem(&[
        "rejection-sample",
        &example("tiny-rejection.toml"),
        "--set",
        "rejection.keep=\"top_k\"",
    ]);
    assert_clean_failure(&o, &["top_k"]);

    let rm = dir.path().join("rm");
    run(&[
        "rm",
        &example("tiny-rm.toml"),
        "--set",
        &sft_model,
        "--set",
        &format!("train.out_dir={}", path(&rm)),
    ]);
    let acc = summary(&rm)["after"]["val_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.9, "held-out preference accuracy {acc}");
    assert!(rm.join("final/reward_head.safetensors").exists());

    for loss in ["dpo", "ipo"] {
        let out = dir.path().join(loss);
        run(&[
            "dpo",
            &example("tiny-dpo.toml"),
            "--set",
            &sft_model,
            "--set",
            &format!("dpo.loss={loss}"),
            "--set",
            "dpo.examples=400",
            "--set",
            &format!("train.out_dir={}", path(&out)),
        ]);
        let s = summary(&out);
        let (before, after) = (&s["before"], &s["after"]);
        assert!(
            after["val_loss"].as_f64().unwrap() < before["val_loss"].as_f64().unwrap(),
            "{loss}: {s}"
        );
        assert!(
            after["val_reward_accuracy"].as_f64().unwrap() >= 0.9,
            "{loss}: {s}"
        );
    }

    let rl = dir.path().join("rlhf");
    run(&[
        "run",
        &example("tiny-rlhf.toml"),
        "--set",
        &sft_model,
        "--set",
        &format!("reward.model={}", path(&rm.join("final"))),
        "--set",
        "run.steps=6",
        "--set",
        "trainer.dump_batches=true",
        "--set",
        &format!("run.run_dir={}", path(&rl)),
    ]);
    let rewards = batch_rewards(&rl);
    assert!(rewards.len() >= 6 * 4 * 8, "{} rewards", rewards.len());
    // Reward-model scores are real numbers, not the 0 / 1 of a verifier, and differ.
    assert!(rewards.iter().any(|r| r.fract() != 0.0));
    let (lo, hi) = rewards
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &r| (a.min(r), b.max(r)));
    assert!(hi - lo > 0.5, "rewards span {lo}..{hi}");

    // An LLM judge (here the SFT model asked "{completion} + 0 =") scores by the last
    // number of its greedy verdict: whole numbers, not all the same.
    let judged = dir.path().join("judge");
    run(&[
        "run",
        &example("tiny-sft-grpo.toml"),
        "--set",
        &sft_model,
        "--set",
        "reward.math=0.0",
        "--set",
        &format!("reward.judge={}", path(&sft.join("final"))),
        "--set",
        "reward.judge_chat=false",
        "--set",
        "reward.judge_template=\"{completion} + 0 =\"",
        "--set",
        "reward.judge_scale=1.0",
        "--set",
        "run.steps=3",
        "--set",
        "trainer.dump_batches=true",
        "--set",
        &format!("run.run_dir={}", path(&judged)),
    ]);
    let scores = batch_rewards(&judged);
    assert!(
        !scores.is_empty() && scores.iter().all(|r| r.fract() == 0.0),
        "{scores:?}"
    );
    assert!(scores.iter().any(|&r| r != scores[0]), "{scores:?}");
}

/// Every stage on a Gemma 3 model (tiny-gemma3: local layers around a global one):
/// SFT, a reward model of that family on the SFT model, DPO, and `tandem run` with the
/// Gemma reward model scoring the Gemma policy's completions. Each stage's output is a
/// Gemma 3 checkpoint; the reward model's scores are real numbers.
#[test]
fn every_stage_runs_on_a_gemma3_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let example = |name: &str| format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let run = |args: &[&str]| {
        let o = tandem(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    let is_gemma3 = |folder: &std::path::Path| {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(c["model_type"], "gemma3_text", "{}", folder.display());
    };
    let (sft, rm, dpo, rl) = (
        dir.path().join("sft"),
        dir.path().join("rm"),
        dir.path().join("dpo"),
        dir.path().join("rl"),
    );
    run(&[
        "sft",
        &example("tiny-sft.toml"),
        "--set",
        "model.path=\"preset:tiny-gemma3\"",
        "--set",
        "sft.examples=600",
        "--set",
        "train.epochs=1",
        "--set",
        &format!("train.out_dir={}", path(&sft)),
    ]);
    is_gemma3(&sft.join("final"));
    let sft_model = format!("model.path={}", path(&sft.join("final")));
    run(&[
        "rm",
        &example("tiny-rm.toml"),
        "--set",
        &sft_model,
        "--set",
        "rm.examples=300",
        "--set",
        "train.epochs=1",
        "--set",
        &format!("train.out_dir={}", path(&rm)),
    ]);
    is_gemma3(&rm.join("final"));
    assert!(rm.join("final/reward_head.safetensors").exists());
    run(&[
        "dpo",
        &example("tiny-dpo.toml"),
        "--set",
        &sft_model,
        "--set",
        "dpo.examples=200",
        "--set",
        &format!("train.out_dir={}", path(&dpo)),
    ]);
    is_gemma3(&dpo.join("final"));
    run(&[
        "run",
        &example("tiny-rlhf.toml"),
        "--set",
        &sft_model,
        "--set",
        &format!("reward.model={}", path(&rm.join("final"))),
        "--set",
        "run.steps=3",
        "--set",
        "trainer.dump_batches=true",
        "--set",
        &format!("run.run_dir={}", path(&rl)),
    ]);
    is_gemma3(&rl.join("final"));
    let rewards = batch_rewards(&rl);
    assert!(
        !rewards.is_empty() && rewards.iter().any(|r| r.fract() != 0.0),
        "{rewards:?}"
    );
}

/// The rewards of every trained rollout of a run (its batch dumps).
fn batch_rewards(run_dir: &std::path::Path) -> Vec<f64> {
    std::fs::read_dir(run_dir.join("batches"))
        .unwrap()
        .flat_map(|f| {
            std::fs::read_to_string(f.unwrap().path())
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"]
                        .as_f64()
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Bad preference records stop `tandem rm` before anything is written, naming the
/// file, the line and the field.
#[test]
fn bad_preference_records_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("prefs.jsonl");
    let out = dir.path().join("out");
    let cfg = dir.path().join("rm.toml");
    std::fs::write(
        &cfg,
        format!("[model]\npath = \"preset:tiny\"\n[data]\nkind = \"jsonl\"\npath = \"{}\"\nchat = false\n[train]\nout_dir = \"{}\"\n", data.display(), out.display()),
    )
    .unwrap();
    let good = r#"{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}"#;
    for (line, needle) in [
        (
            r#"{"prompt": "2 + 2 =", "chosen": "", "rejected": " 5"}"#,
            "`chosen` is empty",
        ),
        (
            r#"{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 4"}"#,
            "repeats",
        ),
        (
            r#"{"prompt": "2 + 2 =", "chosen": 4, "rejected": " 5"}"#,
            "`chosen` must be",
        ),
        (
            r#"{"prompt": "2 + 2 =", "chosen": " 4"}"#,
            "needs a `rejected`",
        ),
        (r#"{"chosen": " 4", "rejected": " 5"}"#, "needs `prompt`"),
        (
            r#"{"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5", "margin": "big"}"#,
            "`margin`",
        ),
        (r#"{"prompt": "2 + 2 =", "ranked": [" 4"]}"#, "at least 2"),
        ("not json", "prefs.jsonl:2"),
    ] {
        std::fs::write(&data, format!("{good}\n{line}\n")).unwrap();
        let o = tandem(&["rm", cfg.to_str().unwrap()]);
        assert_clean_failure(&o, &["prefs.jsonl:2", needle]);
        assert!(!out.exists(), "{line}: nothing may be written");
    }
}

/// `tandem eval` on the tiny model with four samples per held-out prompt (each line
/// with its prompt's text): the
/// report's accuracy, pass@1, pass@4 and mean length equal what the test computes by
/// hand from the samples it wrote (pass@k from the binomial definition); bad `[eval]`
/// values are refused by name.
#[test]
fn eval_reports_pass_at_k_computed_from_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let cfg = dir.path().join("eval.toml");
    // The share of digits scores each sample; half counts as correct.
    std::fs::write(
        &cfg,
        "[data]\nkind = \"arithmetic\"\nchat = false\ntemplate = \"{question} =\"\n\n\
         [generator]\nmax_new_tokens = 6\n\n\
         [reward]\nmath = 0.0\nformat = 1.0\nformat_kind = \"digits\"\n\n\
         [eval]\nprompts = 12\nsamples = 4\ntemperature = 1.0\ncorrect_at = 0.5\nbatch_prompts = 5\n",
    )
    .unwrap();
    let (json, samples) = (dir.path().join("r.json"), dir.path().join("s.jsonl"));
    let o = ok(tandem(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--samples",
        samples.to_str().unwrap(),
    ]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("pass@4"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 48);
    // Each sample names its prompt by index and by text, as the model saw it rendered.
    for x in &rows {
        let text = x["prompt_text"].as_str().unwrap_or_else(|| panic!("{x}"));
        assert!(text.ends_with(" =") && text.len() > 2, "{x}");
    }
    let first = |p: u64| rows.iter().find(|x| x["prompt"] == p).unwrap()["prompt_text"].clone();
    assert!((1..12).any(|p| first(p) != first(0)), "{rows:?}");
    let choose =
        |n: u64, k: u64| -> f64 { (0..k).map(|i| (n - i) as f64 / (k - i) as f64).product() };
    let (mut pass1, mut pass4) = (0.0, 0.0);
    for p in 0..12 {
        let c = rows
            .iter()
            .filter(|x| x["prompt"] == p && x["reward"].as_f64().unwrap() >= 0.5)
            .count() as u64;
        pass1 += 1.0 - choose(4 - c, 1) / choose(4, 1);
        pass4 += if c > 0 { 1.0 } else { 0.0 };
    }
    let close = |key: &str, want: f64| {
        let got = r["metrics"][key].as_f64().unwrap();
        assert!((got - want).abs() < 1e-9, "{key}: {got} vs {want}");
    };
    close("eval_pass_at_1", pass1 / 12.0);
    close("eval_pass_at_4", pass4 / 12.0);
    let mean = |k: &str| rows.iter().map(|x| x[k].as_f64().unwrap()).sum::<f64>() / 48.0;
    close("eval_accuracy", mean("reward"));
    close("eval_mean_length", mean("tokens"));
    // No maj@n without an answer-extracting reward.
    assert!(r["metrics"].get("eval_maj_at_4").is_none());
    assert_clean_failure(
        &tandem(&[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            "eval.path=\"prompts.csv\"",
        ]),
        &["[eval] path", ".jsonl"],
    );
}

/// `tandem eval` on a file dataset with `[data] eval_fraction`: it evaluates exactly
/// the records the split holds out (none it trains on), reports their number, and
/// without a split or `[eval] path` it is refused with the fix.
#[test]
fn eval_reads_the_held_out_split_of_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let data = dir.path().join("prompts.jsonl");
    let n = 30u64;
    let text: String = (0..n)
        .map(|i| format!("{{\"prompt\": \"r{i} =\", \"answer\": {i}}}\n"))
        .collect();
    std::fs::write(&data, text).unwrap();
    let cfg = dir.path().join("eval.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\nkind = \"jsonl\"\npath = {:?}\nchat = false\neval_fraction = 0.2\n\n\
             [generator]\nmax_new_tokens = 3\n\n[eval]\nprompts = 100\nsamples = 1\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let held: Vec<u64> = (0..n)
        .filter(|&i| tandem_data::split::held_out(i, 0.2))
        .collect();
    assert!(!held.is_empty() && held.len() < n as usize);
    let (json, samples) = (dir.path().join("r.json"), dir.path().join("s.jsonl"));
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--samples",
            samples.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        tandem(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let o = ok(run(&[]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("of {} held-out records", held.len())),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["held_out"].as_u64(), Some(held.len() as u64), "{r}");
    assert_eq!(
        r["metrics"]["eval_held_out"].as_f64(),
        Some(held.len() as f64)
    );
    assert_eq!(
        r["metrics"]["eval_prompts"].as_f64(),
        Some(held.len() as f64)
    );
    let texts: Vec<String> = std::fs::read_to_string(&samples)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["prompt_text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(texts.len(), held.len());
    for (t, i) in texts.iter().zip(&held) {
        assert!(
            t.ends_with(&format!("r{i} =")),
            "{t:?} is not held-out record {i}"
        );
    }
    // Neither a split nor a path: the training prompts would be evaluated.
    assert_clean_failure(
        &run(&["--set", "data.eval_fraction=0.0"]),
        &["set [data] eval_fraction = 0.05 or [eval] path"],
    );
}

/// `[sft] tools`: the synthetic task as tool-use transcripts teaches the tiny model the
/// call format (the loss falls); without the chat template it is refused by name.
#[test]
fn sft_on_tool_transcripts_trains() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sft");
    let cfg = dir.path().join("sft.toml");
    let text = format!(
        r#"
[model]
path = "preset:tiny"

[data]
kind = "arithmetic"
digits = 2
operators = ["*"]
chat = true
template = "What is {{question}}?"

[sft]
examples = 96
tools = ["calculator"]

[train]
epochs = 2
batch_size = 16
max_len = 512
val_fraction = 0.1
eval_every = 5
out_dir = "{}"

[optimizer]
lr = 3e-3
"#,
        out.display()
    );
    std::fs::write(&cfg, &text).unwrap();
    ok(tandem(&["sft", cfg.to_str().unwrap()]));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let (first, last) = (
        summary["first_loss"].as_f64().unwrap_or(f64::NAN),
        summary["last_loss"].as_f64().unwrap_or(f64::NAN),
    );
    assert!(out.join("final/model.safetensors").exists(), "{summary}");
    assert!(last < first, "{summary}");
    assert_clean_failure(
        &tandem(&["sft", cfg.to_str().unwrap(), "--set", "data.chat=false"]),
        &["[sft] tools"],
    );
}

/// Every offline stage trains a LoRA adapter on a frozen base and saves it in PEFT's
/// format (the reward model's head beside it); the SFT adapter lowers the loss;
/// `tandem model merge` folds an adapter into its base (heads copied along) into a
/// model that scores otherwise than the base; a merge onto another base is refused.
/// (The merged weights against PEFT's: model/tests/lora.rs and
/// tools/lora_reference.py check-saved.)
#[test]
fn offline_stages_train_lora_adapters_and_merge_writes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let example = |name: &str| format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let run = |args: &[&str]| {
        let o = tandem(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    };
    let summary = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap()
    };
    let (base, sft, rm, dpo) = (
        dir.path().join("base"),
        dir.path().join("sft-lora"),
        dir.path().join("rm-lora"),
        dir.path().join("dpo-lora"),
    );
    // A base that has learned something (a random tiny model's frozen head caps what
    // an adapter can do), then adapters on it.
    run(&[
        "sft",
        &example("tiny-sft.toml"),
        "--set",
        "sft.examples=600",
        "--set",
        "train.epochs=1",
        "--set",
        &format!("train.out_dir={}", path(&base)),
    ]);
    let base_model = base.join("final");
    let on_base = format!("model.path={}", path(&base_model));
    let lora = ["--set", "lora.rank=8", "--set", "lora.alpha=16.0"];
    let stage = |cmd: &str, file: &str, out: &std::path::Path, extra: &[&str]| {
        let out_dir = format!("train.out_dir={}", path(out));
        let mut args = vec![
            cmd,
            file,
            "--set",
            on_base.as_str(),
            "--set",
            out_dir.as_str(),
        ];
        args.extend(lora);
        args.extend(extra);
        run(&args);
        let f = out.join("final");
        assert!(
            f.join("adapter_config.json").exists() && f.join("adapter_model.safetensors").exists()
        );
        assert!(
            !f.join("model.safetensors").exists(),
            "{cmd}: saves the adapter alone"
        );
    };
    let sft_file = example("tiny-sft.toml");
    stage(
        "sft",
        &sft_file,
        &sft,
        &[
            "--set",
            "sft.examples=600",
            "--set",
            "train.epochs=1",
            "--set",
            "optimizer.lr=1e-2",
        ],
    );
    let s = summary(&sft);
    let (before, after) = (
        s["before"]["val_loss"].as_f64().unwrap(),
        s["after"]["val_loss"].as_f64().unwrap(),
    );
    assert!(after < before, "the SFT adapter learns: {before} → {after}");
    stage(
        "rm",
        &example("tiny-rm.toml"),
        &rm,
        &["--set", "rm.examples=300", "--set", "train.epochs=1"],
    );
    assert!(rm.join("final/reward_head.safetensors").exists());
    stage(
        "dpo",
        &example("tiny-dpo.toml"),
        &dpo,
        &["--set", "dpo.examples=200"],
    );
    // Merge the SFT adapter: a plain HF folder.
    let merged = dir.path().join("merged");
    run(&[
        "model",
        "merge",
        "--base",
        &path(&base_model),
        "--adapter",
        &path(&sft.join("final")),
        "--out",
        &path(&merged),
    ]);
    assert!(merged.join("model.safetensors").exists() && merged.join("config.json").exists());
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"prompt\": \"3 + 4 =\", \"completion\": \" 7\"}\n{\"prompt\": \"2 + 5 =\", \"completion\": \" 7\"}\n").unwrap();
    let score = |model: &std::path::Path| -> f64 {
        let out = dir.path().join("scored.jsonl");
        run(&[
            "score",
            "--model",
            &path(model),
            "--input",
            &path(&input),
            "--output",
            &path(&out),
        ]);
        std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .sum::<f64>()
            })
            .sum()
    };
    let (b, m) = (score(&base_model), score(&merged));
    assert!(m != b, "the merged model scores as the base: {b}");
    // The reward model's head comes along.
    let rm_merged = dir.path().join("rm-merged");
    run(&[
        "model",
        "merge",
        "--base",
        &path(&base_model),
        "--adapter",
        &path(&rm.join("final")),
        "--out",
        &path(&rm_merged),
        "--dtype",
        "bf16",
    ]);
    assert!(rm_merged.join("reward_head.safetensors").exists());
    // Onto another base (other shapes): refused, naming the adapter.
    let o = tandem(&[
        "model",
        "merge",
        "--base",
        "preset:tiny-gemma3",
        "--adapter",
        &path(&sft.join("final")),
        "--out",
        &path(&dir.path().join("x")),
    ]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--adapter") && e.contains("base model"), "{e}");
}
