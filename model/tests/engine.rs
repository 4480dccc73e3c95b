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

/// Requests over prompts that share prefixes of many lengths with a base text (pages of
/// 4): ending on a page's end and mid-page, the same prompt twice (whole prompt cached:
/// its last page is computed again for the logits), a prompt one token past cached
/// pages (only its last token fed), a single token, and a prompt whose cached prefix
/// another request computed.
fn shared_prefix_requests(t: f64) -> Vec<Request> {
    let base: Vec<u32> = (0..40).map(|j| ((j * 29 + 7) % 480 + 3) as u32).collect();
    let prompts: Vec<Vec<u32>> = vec![
        base[..16].to_vec(),
        base[..16].to_vec(),
        base[..17].to_vec(),
        [&base[..10], &[490, 491, 492][..]].concat(),
        [&base[..13], &[493; 6][..]].concat(),
        [&base[..8], &[494][..]].concat(),
        base[..1].to_vec(),
        base[..40].to_vec(),
        base[..24].to_vec(),
    ];
    prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| Request {
            id: i as u64,
            prompt,
            samples: 2,
            params: params(t, 10, 3 + i as u64),
            first_stream: 0,
        })
        .collect()
}

/// Each request added when the one before it has finished, through one engine (so each
/// finds the cached pages of those before it); completions by id.
fn one_after_another(
    e: &mut Engine,
    model: &Model,
    reqs: &[Request],
) -> BTreeMap<u64, Vec<Completion>> {
    let mut out = BTreeMap::new();
    for r in reqs {
        e.add(model, r.clone()).unwrap();
        for f in e.run_to_completion(model, 0).unwrap() {
            out.insert(f.id, f.completions);
        }
    }
    out
}

fn has_local_layers(model: &Model) -> bool {
    tandem_model::engine::local::LocalLayers::of(model.config()).is_some()
}

/// A completion does not depend on whether its prefix came from the prefix cache: the
/// same tokens (greedy and T = 1) and logprobs as the request run alone, cache on or
/// off, one request after another or all at once through a pool so small that cached
/// pages are evicted and sequences preempted. Models with local layers cache nothing.
#[test]
fn a_completion_does_not_depend_on_the_prefix_cache() {
    for name in tandem_model::preset::TINY_PRESETS {
        let model = tiny(name, 5).model;
        let local = has_local_layers(&model);
        for t in [0.0, 1.0] {
            let reqs = shared_prefix_requests(t);
            let reference = alone(&model, &reqs);
            let what = format!("{name} T {t}");
            let cfg = |prefix_cache_tokens| EngineConfig {
                kv_page_size: 4,
                prefill_chunk: 8,
                prefix_cache_tokens,
                ..Default::default()
            };
            let mut e = Engine::new(&model, cfg(4096)).unwrap();
            assert_same(
                &one_after_another(&mut e, &model, &reqs),
                &reference,
                &format!("{what} cached"),
            );
            let st = e.stats().clone();
            let prompt_tokens: u64 = reqs.iter().map(|r| r.prompt.len() as u64).sum();
            assert_eq!(st.preemptions, 0);
            assert_eq!(
                st.prompts,
                reqs.len() as u64,
                "{what}: one prompt a request"
            );
            assert_eq!(
                st.prefilled_tokens + st.prefix_cache_hit_tokens,
                prompt_tokens,
                "{what}: every prompt token computed or cached, once per request"
            );
            // Pages of 4 cached from earlier requests: 12 + 16 + 8 + 12 + 8 + 0 + 16 + 20.
            let hits = if local { 0 } else { 92 };
            assert_eq!(st.prefix_cache_hit_tokens, hits, "{what}");
            assert_eq!(e.used_pages(), 0, "{what}: no sequence holds a page");
            assert_eq!(e.cached_pages() > 0, !local, "{what}");

            let mut off = Engine::new(&model, cfg(0)).unwrap();
            assert_same(
                &one_after_another(&mut off, &model, &reqs),
                &reference,
                &format!("{what} uncached"),
            );
            assert_eq!(off.stats().prefix_cache_hit_tokens, 0);
            assert_eq!(off.stats().prefilled_tokens, prompt_tokens);
            assert_eq!(off.cached_pages(), 0);

            // All at once, with few slots and a pool of 24 pages: requests start from
            // pages others are still computing, cached pages are evicted for room.
            let tight = EngineConfig {
                max_running: 4,
                kv_cache_tokens: 96,
                ..cfg(4096)
            };
            let mut e = Engine::new(&model, tight).unwrap();
            for r in &reqs {
                e.add(&model, r.clone()).unwrap();
            }
            let out = e
                .run_to_completion(&model, 0)
                .unwrap()
                .into_iter()
                .map(|f| (f.id, f.completions))
                .collect();
            assert_same(&out, &reference, &format!("{what} tight"));
            if !local {
                let st = e.stats();
                assert!(st.prefix_cache_hit_tokens > 0, "{what}: no hit");
                assert!(st.prefix_cache_evictions > 0, "{what}: no eviction");
            }
        }
    }
}

/// A conversation's next turn (the previous turn's prompt, its completion and new
/// tokens, ending mid-page) computes only what the cache does not hold: the tokens
/// after the previous turn's last full page. Its completions equal each turn run alone.
#[test]
fn a_next_turn_prefills_only_its_new_tokens() {
    let model = tiny("tiny-qwen3", 3).model;
    let ps = 4;
    let mut e = Engine::new(
        &model,
        EngineConfig {
            kv_page_size: ps,
            ..Default::default()
        },
    )
    .unwrap();
    let mut conversation = prompt(2);
    for turn in 0..4u64 {
        let r = Request {
            id: turn,
            prompt: conversation.clone(),
            samples: 1,
            params: params(1.0, 9 + turn as usize, 8 + turn),
            first_stream: 0,
        };
        let before = e.stats().clone();
        let got = one_after_another(&mut e, &model, std::slice::from_ref(&r));
        assert_same(
            &got,
            &alone(&model, std::slice::from_ref(&r)),
            &format!("turn {turn}"),
        );
        let st = e.stats();
        let prefilled = st.prefilled_tokens - before.prefilled_tokens;
        let cached = st.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens;
        assert_eq!(prefilled + cached, conversation.len() as u64);
        if turn > 0 {
            // Everything but the new tokens and at most one page before them.
            assert!(
                prefilled as usize <= 3 + turn as usize + ps,
                "turn {turn}: {prefilled} of {} tokens computed",
                conversation.len()
            );
        }
        let completion = &got[&turn][0].tokens;
        conversation.extend(completion);
        conversation.extend((0..3 + turn as u32).map(|k| 400 + k));
    }
}

/// A new version assigned into a model in place.
type Update = dyn Fn(&Model);

/// Weights assigned in place (a full version, or a LoRA adapter's version) are never
/// served keys and values of the old ones: the next request computes its whole prompt
/// and samples exactly what a fresh engine on the new weights samples; the same
/// weights again hit.
#[test]
fn new_weights_are_never_served_from_the_cache() {
    use candle_core::{Device, Tensor};
    use std::collections::HashMap;
    use tandem_model::LoraSection;

    for name in tandem_model::preset::TINY_PRESETS {
        if has_local_layers(&tiny(name, 1).model) {
            continue; // nothing cached (tested above)
        }
        let full = tiny(name, 5).model;
        let lora = LoraSection::default().attach(tiny(name, 5).model).unwrap();
        let versions: [(&str, Model, Box<Update>); 2] = [
            (
                "full",
                full,
                Box::new(|m: &Model| {
                    m.params()
                        .assign(&tiny(name, 9).model.params().snapshot().unwrap())
                        .unwrap()
                }),
            ),
            (
                "lora",
                lora,
                Box::new(|m: &Model| {
                    let donor = LoraSection::default().attach(tiny(name, 5).model).unwrap();
                    let mut b = HashMap::new();
                    for (n, v) in donor.trainable().iter() {
                        if n.ends_with("lora_B.weight") {
                            let t = Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap();
                            b.insert(n.to_string(), t);
                        }
                    }
                    donor.trainable().assign(&b).unwrap();
                    let (bytes, dtype) = donor.trainable().to_bytes().unwrap();
                    m.trainable().assign_bytes(&bytes, dtype).unwrap();
                }),
            ),
        ];
        for (kind, model, update) in versions {
            let what = format!("{name} {kind}");
            let req = |id: u64| Request {
                id,
                prompt: prompt(2),
                samples: 2,
                params: params(1.0, 8, 4),
                first_stream: 0,
            };
            let cfg = EngineConfig {
                kv_page_size: 4,
                ..Default::default()
            };
            let mut e = Engine::new(&model, cfg).unwrap();
            let old = one_after_another(&mut e, &model, &[req(0)]);
            let cached = |e: &Engine| e.stats().prefix_cache_hit_tokens;
            assert_same(&one_after_another(&mut e, &model, &[req(0)]), &old, &what);
            let hit = cached(&e);
            assert!(hit > 0, "{what}: the same weights hit");
            update(&model);
            let new = one_after_another(&mut e, &model, &[req(0)]);
            assert_same(
                &new,
                &alone(&model, &[req(0)]),
                &format!("{what} new weights"),
            );
            assert_eq!(cached(&e), hit, "{what}: new weights hit the cache");
            let lp = |c: &BTreeMap<u64, Vec<Completion>>| -> Vec<f64> {
                c[&0][0].logprobs.iter().map(|&v| v as f64).collect()
            };
            assert!(
                max_abs_diff(&lp(&old), &lp(&new)) > 1e-3,
                "{what}: the new version changed nothing"
            );
            assert_same(&one_after_another(&mut e, &model, &[req(0)]), &new, &what);
            assert!(cached(&e) > hit, "{what}: the new weights' pages hit again");
        }
    }
}

/// Cached pages make way for running sequences: a batch that needs the whole pool
/// after earlier requests filled it with cached pages evicts them and preempts nothing.
#[test]
fn cached_pages_are_evicted_before_a_sequence_is_preempted() {
    let model = tiny("tiny", 5).model;
    let cfg = EngineConfig {
        kv_page_size: 4,
        kv_cache_tokens: 64,
        prefix_cache_tokens: 64,
        ..Default::default()
    };
    let mut e = Engine::new(&model, cfg).unwrap();
    one_after_another(&mut e, &model, &[request(2, 1, params(0.0, 30, 1))]);
    assert!(e.cached_pages() >= 12, "{} pages cached", e.cached_pages());
    // Sequences of 9 + 24 and 5 + 24 tokens: 8 and 7 pages, 15 of the 16 (13 cached).
    let reqs: Vec<Request> = [0, 4]
        .into_iter()
        .map(|i| Request {
            id: 10 + i as u64,
            ..request(i, 1, params(0.0, 24, 1))
        })
        .collect();
    for r in &reqs {
        e.add(&model, r.clone()).unwrap();
    }
    let out: BTreeMap<u64, Vec<Completion>> = e
        .run_to_completion(&model, 0)
        .unwrap()
        .into_iter()
        .map(|f| (f.id, f.completions))
        .collect();
    let st = e.stats();
    assert_eq!(st.preemptions, 0, "a running sequence was preempted");
    assert!(st.prefix_cache_evictions > 0);
    assert_eq!(st.peak_pages, 15);
    assert_same(&out, &alone(&model, &reqs), "after evictions");
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
    assert_eq!(count(true), prompt_tokens, "one prefill per request");
    assert_eq!(count(false), 8 * prompt_tokens, "one prefill per sample");
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
