//! The sampling engine: continuous batching, prompts prefilled once per request, the
//! paged KV cache. A completion must not depend on how it was batched, shared or
//! paged; the batch must stay full while work waits; the pool must hold its budget.

mod common;

use std::collections::BTreeMap;

use common::*;
use tandem_model::{Completion, Engine, EngineConfig, Model, Request, SamplingParams};

fn params(temperature: f64, max_new_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        max_new_tokens,
        seed,
        ..Default::default()
    }
}

/// Prompts of different lengths (one spans several pages, one is a single token).
fn prompt(i: usize) -> Vec<u32> {
    let len = [9, 2, 23, 1, 5, 17][i % 6];
    (0..len)
        .map(|j| ((i * 37 + j * 11) % 500 + 3) as u32)
        .collect()
}

fn request(i: usize, samples: usize, p: SamplingParams) -> Request {
    Request {
        id: i as u64,
        prompt: prompt(i),
        samples,
        params: p,
        first_stream: 0,
    }
}

/// Runs `reqs` through one engine; completions by request id.
fn run(model: &Model, cfg: EngineConfig, reqs: &[Request]) -> BTreeMap<u64, Vec<Completion>> {
    let mut e = Engine::new(model, cfg).unwrap();
    for r in reqs {
        e.add(model, r.clone()).unwrap();
    }
    e.run_to_completion(model, 0)
        .unwrap()
        .into_iter()
        .map(|f| (f.id, f.completions))
        .collect()
}

/// Each request run alone, with an engine to itself.
fn alone(model: &Model, reqs: &[Request]) -> BTreeMap<u64, Vec<Completion>> {
    reqs.iter()
        .flat_map(|r| run(model, EngineConfig::default(), std::slice::from_ref(r)))
        .collect()
}

fn assert_same(a: &BTreeMap<u64, Vec<Completion>>, b: &BTreeMap<u64, Vec<Completion>>, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: request count");
    for (id, ca) in a {
        let cb = &b[id];
        assert_eq!(ca.len(), cb.len());
        for (j, (x, y)) in ca.iter().zip(cb).enumerate() {
            assert_eq!(x.tokens, y.tokens, "{what}: request {id} sample {j} tokens");
            assert_eq!(x.finish_reason, y.finish_reason);
            let lx: Vec<f64> = x.logprobs.iter().map(|&v| v as f64).collect();
            let ly: Vec<f64> = y.logprobs.iter().map(|&v| v as f64).collect();
            let d = max_abs_diff(&lx, &ly);
            assert!(
                d < 1e-4,
                "{what}: request {id} sample {j} logprobs differ by {d}"
            );
        }
    }
}

#[test]
fn batched_shared_and_paged_output_equals_each_request_alone() {
    for name in tandem_model::preset::TINY_PRESETS {
        let model = tiny(name, 5).model;
        for t in [0.0, 1.0] {
            let reqs: Vec<Request> = (0..6).map(|i| request(i, 3, params(t, 14, 11))).collect();
            let reference = alone(&model, &reqs);
            if t > 0.0 {
                // Samples of one request differ: they fork with their own streams.
                let c = &reference[&0];
                assert!(c[0].tokens != c[1].tokens || c[1].tokens != c[2].tokens);
            }
            let what = format!("{name} T {t}");
            assert_same(
                &run(&model, EngineConfig::default(), &reqs),
                &reference,
                &what,
            );
            let unshared = EngineConfig {
                share_prefix: false,
                ..Default::default()
            };
            assert_same(
                &run(&model, unshared, &reqs),
                &reference,
                &format!("{what} unshared"),
            );
            // Few slots, tiny pages, small prefill chunks: requests queue, prompts are
            // prefilled over several steps, pages straddle them.
            let tight = EngineConfig {
                max_running: 4,
                kv_page_size: 4,
                prefill_chunk: 5,
                ..Default::default()
            };
            assert_same(
                &run(&model, tight, &reqs),
                &reference,
                &format!("{what} tight"),
            );
        }
    }
}

#[test]
fn a_prompt_is_prefilled_once_per_request() {
    let model = tiny("tiny", 5).model;
    let reqs: Vec<Request> = (0..4).map(|i| request(i, 8, params(1.0, 6, 3))).collect();
    let prompt_tokens: u64 = (0..4).map(|i| prompt(i).len() as u64).sum();
    let count = |share_prefix: bool| {
        let mut e = Engine::new(
            &model,
            EngineConfig {
                share_prefix,
                ..Default::default()
            },
        )
        .unwrap();
        for r in &reqs {
            e.add(&model, r.clone()).unwrap();
        }
        e.run_to_completion(&model, 0).unwrap();
        e.stats().prefilled_tokens
    };
    // Single-token prompts are fed as decode rows, not prefill.
    let multi: u64 = (0..4)
        .map(|i| prompt(i).len() as u64)
        .filter(|&n| n > 1)
        .sum();
    assert!(prompt_tokens >= multi);
    assert_eq!(count(true), multi, "one prefill per request");
    assert_eq!(count(false), 8 * multi, "one prefill per sample");
}

#[test]
fn a_long_completion_does_not_idle_the_other_slots() {
    let model = tiny("tiny", 5).model;
    let slots = 4;
    let mut e = Engine::new(
        &model,
        EngineConfig {
            max_running: slots,
            ..Default::default()
        },
    )
    .unwrap();
    // One completion 20× longer than the 15 others.
    e.add(&model, request(0, 1, params(1.0, 200, 1))).unwrap();
    for i in 1..16 {
        e.add(&model, request(i, 1, params(1.0, 10, 1))).unwrap();
    }
    let (mut full, mut short_of_work) = (0, 0);
    let mut finished = 0;
    while !e.is_idle() {
        let out = e.step(&model, 0).unwrap();
        finished += out.finished.len();
        // While requests wait, every slot decodes or prefills.
        if e.queued_requests() > 0 {
            if out.running == slots {
                full += 1;
            } else {
                short_of_work += 1;
            }
        }
    }
    assert_eq!(finished, 16);
    assert_eq!(short_of_work, 0, "a slot idled while requests waited");
    assert!(full >= 30, "the queue drained in {full} steps");
    // A static batch of 4 would hold 3 idle rows for the long one's last 190 steps;
    // here the short ones finish beside it.
    assert!(e.stats().steps < 220, "{} steps", e.stats().steps);
}

#[test]
fn the_pool_holds_its_budget_and_a_starved_sequence_completes() {
    let model = tiny("tiny", 5).model;
    let reqs: Vec<Request> = (0..6).map(|i| request(i, 2, params(0.0, 20, 2))).collect();
    let reference = alone(&model, &reqs);
    let cfg = EngineConfig {
        max_running: 12,
        kv_page_size: 4,
        // Room for about two sequences at their longest: the others must wait or be
        // preempted and recomputed.
        kv_cache_tokens: 48,
        prefill_chunk: 8,
        ..Default::default()
    };
    let mut e = Engine::new(&model, cfg).unwrap();
    for r in &reqs {
        e.add(&model, r.clone()).unwrap();
    }
    let mut out = BTreeMap::new();
    while !e.is_idle() {
        for f in e.step(&model, 0).unwrap().finished {
            out.insert(f.id, f.completions);
        }
        assert!(e.used_pages() <= 12, "{} pages in use", e.used_pages());
    }
    assert!(e.stats().preemptions > 0, "the budget never bit");
    assert!(e.stats().peak_pages <= 12);
    assert_same(&out, &reference, "preempted and recomputed");
}

/// A model with local layers (tiny-gemma3: window 16) gives back the local pages its
/// window has passed: long samples hold a bounded number of local pages while their
/// global pages grow, and what they sample still equals scoring (which has no pages).
#[test]
fn local_layers_hold_only_their_window_and_sample_as_scoring_does() {
    let p = tiny("tiny-gemma3", 4);
    let model = &p.model;
    let reqs: Vec<Request> = (0..2).map(|i| request(i, 3, params(1.0, 120, 5))).collect();
    let cfg = EngineConfig {
        kv_page_size: 4,
        prefill_chunk: 8,
        ..Default::default()
    };
    let mut e = Engine::new(model, cfg).unwrap();
    for r in &reqs {
        e.add(model, r.clone()).unwrap();
    }
    let done = e.run_to_completion(model, 0).unwrap();
    let st = e.stats();
    // Six sequences of up to 9 + 120 tokens: 33 global pages each at the end, local
    // pages at most ⌈(16 + 8) / 4⌉ + 1 = 7 each.
    assert!(st.peak_pages >= 6 * 30, "global pages {}", st.peak_pages);
    assert!(
        st.peak_local_pages > 0 && st.peak_local_pages <= 6 * 7,
        "local pages {}",
        st.peak_local_pages
    );
    assert_eq!(e.used_pages(), 0, "every page given back");
    for f in done {
        let prompt = prompt(f.id as usize);
        for c in &f.completions {
            assert_eq!(c.tokens.len(), 120);
            let seq = [prompt.as_slice(), &c.tokens].concat();
            let scored = model
                .completion_logprobs(&model.weights(), &[seq], &[prompt.len()], 1.0)
                .unwrap();
            let lp: Vec<f64> = scored
                .logprobs
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let rec: Vec<f64> = c.logprobs.iter().map(|&v| v as f64).collect();
            let d = max_abs_diff(&rec, &lp);
            assert!(
                d < 1e-4,
                "request {}: recorded vs scored differ by {d}",
                f.id
            );
        }
    }
}

/// With local layers and a budget of about two sequences, both pools bind: sequences
/// are preempted and recompute, and every completion equals its request run alone.
#[test]
fn a_starved_model_with_local_layers_completes_as_alone() {
    let model = tiny("tiny-gemma3", 5).model;
    let reqs: Vec<Request> = (0..6).map(|i| request(i, 2, params(0.0, 30, 2))).collect();
    let reference = alone(&model, &reqs);
    let cfg = EngineConfig {
        max_running: 12,
        kv_page_size: 4,
        kv_cache_tokens: 64,
        prefill_chunk: 8,
        ..Default::default()
    };
    let mut e = Engine::new(&model, cfg).unwrap();
    for r in &reqs {
        e.add(&model, r.clone()).unwrap();
    }
    let out = e
        .run_to_completion(&model, 0)
        .unwrap()
        .into_iter()
        .map(|f| (f.id, f.completions))
        .collect();
    assert!(e.stats().preemptions > 0, "the budget never bit");
    assert_same(&out, &reference, "local pages under a tight budget");
}

#[test]
fn weights_replaced_between_steps_apply_to_every_running_row() {
    let b = tiny("tiny", 9).model;
    let reqs: Vec<Request> = (0..3).map(|i| request(i, 2, params(0.0, 10, 0))).collect();
    let run_swapping = |swap: Option<&Model>| {
        let model = tiny("tiny", 5).model;
        let mut e = Engine::new(&model, EngineConfig::default()).unwrap();
        for r in &reqs {
            e.add(&model, r.clone()).unwrap();
        }
        // Step 1 prefills and samples the first token; 3 more decode steps.
        for _ in 0..4 {
            e.step(&model, 1).unwrap();
        }
        if let Some(src) = swap {
            model
                .params()
                .assign(&src.params().snapshot().unwrap())
                .unwrap();
        }
        let mut out = BTreeMap::new();
        for f in e.run_to_completion(&model, 2).unwrap() {
            out.insert(f.id, (f.completions, f.tags));
        }
        out
    };
    let plain = run_swapping(None);
    let swapped = run_swapping(Some(&b));
    let mut changed = false;
    for (id, (cs, tags)) in &swapped {
        for (j, (c, t)) in cs.iter().zip(tags).enumerate() {
            let p = &plain[id].0[j];
            assert_eq!(
                c.tokens[..4],
                p.tokens[..4],
                "tokens before the swap are kept"
            );
            assert_eq!(t[..4], [1, 1, 1, 1], "tokens before the swap carry its tag");
            assert!(
                t[4..].iter().all(|&x| x == 2),
                "later tokens carry the new tag"
            );
            changed |= c.tokens[4..] != p.tokens[4..];
        }
    }
    assert!(changed, "the new weights change later tokens");
}

#[test]
fn bad_requests_and_settings_are_errors() {
    let model = tiny("tiny", 5).model;
    let mut e = Engine::new(&model, EngineConfig::default()).unwrap();
    let mut r = request(0, 1, params(0.0, 4, 0));
    r.samples = 0;
    assert!(e
        .add(&model, r)
        .unwrap_err()
        .to_string()
        .contains("samples"));
    e.add(&model, request(0, 1, params(0.0, 4, 0))).unwrap();
    let err = e.add(&model, request(0, 1, params(0.0, 4, 0))).unwrap_err();
    assert!(err.to_string().contains("already pending"), "{err}");
    let small = EngineConfig {
        kv_cache_tokens: 16,
        kv_page_size: 16,
        ..Default::default()
    };
    let mut e = Engine::new(&model, small).unwrap();
    let err = e
        .add(&model, request(2, 1, params(0.0, 40, 0)))
        .unwrap_err();
    assert!(err.to_string().contains("kv_cache_tokens"), "{err}");
    for (bad, needle) in [
        (
            EngineConfig {
                max_running: 0,
                ..Default::default()
            },
            "max_running: must be ≥ 1",
        ),
        (
            EngineConfig {
                kv_cache_tokens: 3,
                ..Default::default()
            },
            "kv_cache_tokens: must hold at least one page",
        ),
    ] {
        let err = Engine::new(&model, bad).err().expect(needle).to_string();
        assert!(err.contains(needle), "{err}");
    }
}

#[test]
fn samples_that_end_at_their_first_token_give_back_every_page() {
    let model = tiny("tiny", 5).model;
    // Forks that finish in the step that forks them (max_new_tokens 1), prompts that
    // fill pages partly and exactly, twice over so that freed pages are reused.
    let cfg = EngineConfig {
        kv_page_size: 4,
        ..Default::default()
    };
    let mut e = Engine::new(&model, cfg).unwrap();
    for round in 0..2 {
        let reqs: Vec<Request> = (0..6)
            .map(|i| Request {
                id: (round * 10 + i) as u64,
                ..request(i, 4, params(1.0, 1, 9))
            })
            .collect();
        for r in &reqs {
            e.add(&model, r.clone()).unwrap();
        }
        let done = e.run_to_completion(&model, 0).unwrap();
        assert_eq!(done.len(), 6);
        assert!(done
            .iter()
            .all(|f| f.completions.iter().all(|c| c.tokens.len() == 1)));
        assert_eq!(e.used_pages(), 0, "round {round}: pages still held");
    }
}

/// Top logprobs asked with a request come with every sampled token of every sample
/// (forked samples too), most likely first, under the distribution the token was drawn
/// from: the sampled token's recorded logprob is its entry whenever it is listed, and
/// asking for them changes no token. More than `MAX_TOP_LOGPROBS` is refused.
#[test]
fn top_logprobs_come_with_each_sampled_token() {
    let model = tiny("tiny", 6).model;
    let p = SamplingParams {
        top_k: 8,
        ..params(0.8, 7, 11)
    };
    let reqs: Vec<Request> = (0..3).map(|i| request(i, 3, p.clone())).collect();
    let mut e = Engine::new(&model, EngineConfig::default()).unwrap();
    for r in &reqs {
        e.add_with_top_logprobs(&model, r.clone(), 5).unwrap();
    }
    let done = e.run_to_completion(&model, 0).unwrap();
    let plain = run(&model, EngineConfig::default(), &reqs);
    let mut listed = 0;
    for f in &done {
        assert_eq!(f.completions, plain[&f.id], "request {}", f.id);
        assert_eq!(f.top_logprobs.len(), f.completions.len());
        for (c, tops) in f.completions.iter().zip(&f.top_logprobs) {
            assert_eq!(tops.len(), c.tokens.len());
            for ((tok, lp), top) in c.tokens.iter().zip(&c.logprobs).zip(tops) {
                assert_eq!(top.len(), 5);
                assert!(top.windows(2).all(|w| w[0].1 >= w[1].1), "{top:?}");
                if let Some(entry) = top.iter().find(|t| t.0 == *tok) {
                    assert!((entry.1 - lp).abs() < 1e-4, "{entry:?} against {lp}");
                    listed += 1;
                }
            }
        }
    }
    assert!(listed > 0);
    let too_many = Engine::new(&model, EngineConfig::default())
        .unwrap()
        .add_with_top_logprobs(
            &model,
            reqs[0].clone(),
            tandem_model::engine::MAX_TOP_LOGPROBS + 1,
        )
        .unwrap_err();
    assert!(too_many.to_string().contains("top logprobs"), "{too_many}");
}
