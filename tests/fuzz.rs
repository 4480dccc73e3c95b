//! Property-based tests of every decoder of outside input (proptest): rollout groups
//! as ingest sees them, rollout JSONL lines, GGUF and safetensors files, tokenizer
//! JSON, config TOML and dataset lines. Each input is random or a random corruption of
//! a valid one; the decoder must return a value or a clear error — never panic — and
//! every case is small, so the whole file runs in seconds.

use std::path::Path;

use candle_core::{DType, Device};
use proptest::prelude::*;
use tandem_proto::v1::{Completion, RolloutGroup};
use tandem_trainer::node::ingest::{check_group, Limits};

/// Cases per property: enough to reach the odd corners, bounded for CI.
fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `bytes` with `flips` (position, value) applied and cut to `keep` of its length.
fn corrupt(bytes: &[u8], flips: &[(usize, u8)], keep: f64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for &(i, v) in flips {
        if !b.is_empty() {
            let n = b.len();
            b[i % n] = v;
        }
    }
    b.truncate((b.len() as f64 * keep) as usize);
    b
}

fn completion() -> impl Strategy<Value = Completion> {
    (
        proptest::collection::vec(any::<u32>(), 0..6),
        proptest::collection::vec(any::<f32>(), 0..6),
        proptest::collection::vec(any::<u64>(), 0..6),
        any::<f64>(),
        "[a-z]{0,8}",
        proptest::collection::vec(0u32..3, 0..6),
    )
        .prop_map(|(ids, lps, vs, reward, reason, mask)| Completion {
            completion_ids: ids,
            behavior_logprobs: lps,
            versions: vs,
            reward,
            finish_reason: reason,
            loss_mask: mask,
            ..Default::default()
        })
}

proptest! {
    #![proptest_config(cases(512))]

    /// Any group, however malformed, gets a verdict from ingest, and one that passes
    /// is consistent.
    #[test]
    fn ingest_judges_any_group(
        lease in any::<u64>(),
        prompt in proptest::collection::vec(any::<u32>(), 0..8),
        completions in proptest::collection::vec(completion(), 0..4),
        version in 0u64..4,
    ) {
        let g = RolloutGroup { seq: 1, lease_id: lease, prompt_index: 0, worker_id: 1, prompt_ids: prompt, completions, session_token: String::new(), ..Default::default() };
        let limits = Limits { vocab_size: 100, group_size: 2, samples_per_episode: 1, max_completion_tokens: 5, max_context_tokens: 12, filter_zero_std: false, reward_bound: 1e6 };
        if check_group(&g, &limits, version).is_ok() {
            for c in &g.completions {
                prop_assert_eq!(c.behavior_logprobs.len(), c.completion_ids.len());
                prop_assert!(c.completion_ids.iter().all(|&t| t < 100));
                prop_assert!(c.reward.is_finite());
            }
        }
    }

    /// Rollout JSONL: random text and mutations of a valid line parse or fail cleanly.
    #[test]
    fn rollout_lines_parse_or_fail_cleanly(
        noise in "\\PC{0,80}",
        flips in proptest::collection::vec((any::<usize>(), 32u8..127), 0..4),
        keep in 0.0f64..1.0,
    ) {
        let ok = r#"{"group":"g","prompt_ids":[1,2],"completion_ids":[3,4],"behavior_logprobs":[-0.5,-1.0],"reward":1.0,"loss_mask":[1,0],"finish_reason":"stop","versions":[0,1]}"#;
        let mutated = String::from_utf8_lossy(&corrupt(ok.as_bytes(), &flips, 0.5 + keep / 2.0)).into_owned();
        for text in [noise.as_str(), mutated.as_str()] {
            let _ = tandem_trainer::rl::rollout::parse_jsonl(text, "fuzz.jsonl", 10);
        }
    }

    /// Config sections: any TOML text is parsed or refused with an error.
    #[test]
    fn config_text_parses_or_fails_cleanly(
        key in "[a-z_]{1,12}",
        value in prop_oneof![Just("1".to_string()), Just("-1e309".to_string()), Just("\"x\"".to_string()), Just("nan".to_string()), Just("[1, \"a\"]".to_string()), "\\PC{0,12}"],
        section in prop_oneof![Just("algorithm"), Just("trainer"), Just("optimizer"), Just("generator")],
    ) {
        let text = format!("[{section}]\n{key} = {value}\n");
        let _ = tandem_trainer::config::TrainConfig::from_toml(&text);
        let _ = toml::from_str::<tandem_generator::config::GeneratorConfig>(&text)
            .map(|c| c.validate());
    }

    /// Dataset lines: random JSONL prompt records are read or refused with file and line.
    #[test]
    fn dataset_lines_read_or_fail_cleanly(
        lines in proptest::collection::vec(prop_oneof![
            Just(r#"{"prompt": "What is 1 + 1?", "answer": "2"}"#.to_string()),
            Just(r#"{"messages": [{"role": "user", "content": "hi"}]}"#.to_string()),
            Just(r#"{"prompt": 7}"#.to_string()),
            Just(r#"{"messages": [{"role": 1}]}"#.to_string()),
            "\\PC{0,40}",
        ], 0..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prompts.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        if let Err(e) = tandem_data::read_prompts(&p, false) {
            prop_assert!(e.to_string().contains("prompts.jsonl"), "{}", e);
        }
    }
}

/// A valid tiny model folder to corrupt.
fn tiny_folder(dir: &Path) -> std::path::PathBuf {
    let p = tandem_model::preset::init("tiny", 0, &Device::Cpu).unwrap();
    let out = dir.join("tiny");
    tandem_model::save_hf(&p, &out, DType::F32).unwrap();
    out
}

proptest! {
    #![proptest_config(cases(24))]

    /// A model folder with one file (weights, config, tokenizer) corrupted: loading it
    /// returns the model or an error, never a panic.
    #[test]
    fn corrupt_model_files_fail_cleanly(
        file in prop_oneof![Just("model.safetensors"), Just("config.json"), Just("tokenizer.json")],
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        keep in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let folder = tiny_folder(dir.path());
        let path = folder.join(file);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, corrupt(&bytes, &flips, keep)).unwrap();
        let _ = tandem_model::load(folder.to_str().unwrap(), DType::F32, &Device::Cpu);
    }

    /// GGUF: random bytes behind a real magic, and truncated headers.
    #[test]
    fn corrupt_gguf_fails_cleanly(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        version in 0u32..5,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        let mut bytes = b"GGUF".to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&body);
        std::fs::write(&p, bytes).unwrap();
        prop_assert!(tandem_model::gguf::load(&p).is_err());
    }
}
