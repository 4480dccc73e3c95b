//! `generate`: batch-invariant, consistent with scoring, stop tokens, errors.

mod common;

use candle_core::DType;
use common::*;
use tandem_model::{generate, FinishReason, Model, SamplingParams};

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 99, 3, 250, 7, 8, 40, 41],
        vec![11, 400],
        vec![300, 301, 302, 9, 10],
    ]
}

fn params(temperature: f64, max_new_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature,
        max_new_tokens,
        seed: 7,
        ..Default::default()
    }
}

fn assert_close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    let a: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let d = max_abs_diff(&a, b);
    assert!(d <= tol, "{what}: max |Δ| = {d}");
}

/// Greedy: each prompt alone gives the tokens it gets inside a batch of prompts of
/// other lengths (left padding, masks and per-row positions are exact).
fn batch_invariance(model: &Model) {
    let batched = generate(model, prompts(), params(0.0, 12)).unwrap();
    for (i, prompt) in prompts().into_iter().enumerate() {
        let alone = generate(model, vec![prompt], params(0.0, 12))
            .unwrap()
            .remove(0);
        assert_eq!(
            alone.tokens, batched[i].tokens,
            "prompt {i}: batched tokens differ from alone"
        );
        let lp: Vec<f64> = alone.logprobs.iter().map(|&x| x as f64).collect();
        assert_close(&batched[i].logprobs, &lp, 1e-4, "batched vs alone logprobs");
    }
}

#[test]
fn greedy_batched_equals_alone() {
    for name in tandem_model::preset::TINY_PRESETS {
        batch_invariance(&tiny(name, 5).model);
    }
}

#[test]
fn recorded_logprobs_equal_scoring() {
    for name in tandem_model::preset::TINY_PRESETS {
        recorded_equal_scored(name);
    }
}

/// The engine's recorded logprobs of preset `name` equal the training forward's.
fn recorded_equal_scored(name: &str) {
    let p = tiny(name, 6);
    // Greedy records logprobs at temperature 1; sampling at its own temperature.
    for (gen_t, score_t) in [(0.0, 1.0), (0.7, 0.7), (1.3, 1.3)] {
        let out = generate(&p.model, prompts(), params(gen_t, 16)).unwrap();
        for (prompt, c) in prompts().iter().zip(&out) {
            assert_eq!(c.tokens.len(), 16);
            assert_eq!(c.finish_reason, Some(FinishReason::Length));
            let seq = [prompt.as_slice(), c.tokens.as_slice()].concat();
            let scored = p
                .model
                .completion_logprobs(&p.model.weights(), &[seq], &[prompt.len()], score_t)
                .unwrap();
            let lp: Vec<f64> = scored
                .logprobs
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_close(
                &c.logprobs,
                &lp,
                1e-4,
                &format!("{name} T {gen_t}: recorded vs scored"),
            );
        }
    }
}

#[test]
fn stop_tokens_end_a_completion_and_are_kept() {
    let p = tiny("tiny", 5);
    let free = generate(&p.model, prompts(), params(0.0, 10)).unwrap();
    // Stop on the third token the first prompt produces greedily.
    let stop = free[0].tokens[2];
    let mut sp = params(0.0, 10);
    sp.stop_token_ids = vec![stop];
    let stopped = generate(&p.model, prompts(), sp).unwrap();
    let first = stopped[0].tokens.iter().position(|&t| t == stop).unwrap();
    assert_eq!(stopped[0].tokens, free[0].tokens[..=first]);
    assert_eq!(stopped[0].finish_reason, Some(FinishReason::Stop));
    // Rows that leave the batch early do not disturb the others.
    for i in 1..3 {
        let n = stopped[i].tokens.len();
        assert_eq!(stopped[i].tokens, free[i].tokens[..n]);
    }
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let p = tiny("tiny", 5);
    let vocab = p.model.config().vocab_size as u32;
    assert!(generate(&p.model, vec![vec![1, vocab]], params(0.0, 4))
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    assert!(generate(&p.model, vec![vec![]], params(0.0, 4))
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert!(generate(&p.model, vec![vec![1]], params(0.0, 100_000))
        .unwrap_err()
        .to_string()
        .contains("context"));
    assert!(generate(&p.model, vec![vec![1]], params(-1.0, 4))
        .unwrap_err()
        .to_string()
        .contains("temperature"));
    let err = p
        .model
        .completion_logprobs(&p.model.weights(), &[vec![1, vocab + 3]], &[1], 1.0)
        .unwrap_err();
    assert!(err.to_string().contains("sequence 0"), "{err}");
    let long = vec![1u32; p.model.config().max_position_embeddings + 1];
    let err = p
        .model
        .completion_logprobs(&p.model.weights(), &[long], &[1], 1.0)
        .unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}
