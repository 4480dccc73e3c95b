//! `tandem bench generate`: the sampling engine's throughput beside the machine's
//! compute ceiling and beside transformers' `generate` on the same prompts.
//!
//! The workload (fixed seed): `prompts` chat prompts of about `prompt_tokens` tokens
//! (windows of a fixed English text), `samples` samples each, temperature 1, up to
//! `max_new_tokens` new tokens, stopping at the model's end-of-turn tokens. tok/s
//! counts generated tokens over the wall time, prefill included.
//!
//! In the same run it measures the machine's GEMM rate with the engine's own matmuls
//! (`gemm_size`³ in the model's dtype, f32 on CPU: candle's and the packed matmul of
//! the projections, the faster taken; before and after the other runs, the higher
//! taken) and derives `ceiling_tok_per_s` = FLOP/s ÷ (2 × parameters), the rate at
//! which decoding would run if every token cost only its weight products at that
//! rate.
//!
//! Each measurement runs in its own process (its peak RSS is its own): the default
//! engine, the same workload at 1, 8, 64 and 256 concurrent sequences (`c / samples`
//! prompts, or one prompt with `c` samples when fewer, with `max_running` = c), and
//! each piece switched off in turn: static batches instead of continuous batching (on
//! a queue of twice the slots whose requests stop at uneven lengths, 1/8 to 8/8 of
//! `max_new_tokens`, beside continuous batching on the same queue), every sample
//! prefilling its prompt, and one contiguous region of prompt + `max_new_tokens` per
//! sequence instead of pages.
//!
//! With `--turns K` (K > 1) it also runs multi-turn episodes, as an environment's
//! are sampled, with the prefix cache on (`--prefix-cache-tokens`) and off: each
//! prompt's `samples` samples start as one request, and each sample's turn k + 1 is a
//! request of its own whose prompt is turn k's prompt, its completion and
//! `--turn-tokens` new tokens (a tool's answer); it reports the prompt tokens computed
//! per turn (`prefill_tokens_per_turn`), those the cache served, and tok/s.
//!
//! With `--preset NAME` the model is a random one of the preset's shape (Tandem's
//! `preset:NAME`; the reference script builds it from the preset's `config.json`):
//! `qwen3-0.6b` measures at Qwen3-0.6B's size without its weights (its prompts from the
//! preset's tokenizer, a random model's completions running to `max_new_tokens` on
//! both sides).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};
use tandem_model::{ChatMessage, Engine, EngineConfig, Request, SamplingParams};

use crate::error::{bail, Context, Result};
use crate::reference::GenerateReference;
use crate::timing::{median, peak_rss_mib, run_child};

#[derive(Args, Clone)]
pub struct GenerateBench {
    /// Model: `smollm2`, a .gguf file or an HF folder.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Instead of --model, a random model of a preset's shape (`tandem model init
    /// --preset`: qwen3-0.6b, gemma3-270m, tiny, …), the reference the same shape.
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Samples per prompt (a group).
    #[arg(long, default_value_t = 8)]
    samples: usize,
    /// Approximate prompt length, chat template included.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences decoding at once in the default run (`[generator] max_running`).
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Concurrency sweep: total sequences = max_running = each value.
    #[arg(long, default_value = "1,8,64,256")]
    concurrency: String,
    /// Pieces to switch off in turn (no_continuous_batching, no_shared_prefill,
    /// no_paging), or `lora` / `lora_unmerged` (a rank-16 adapter on every projection,
    /// folded into the weights as a generator holds it, or applied beside each
    /// projection), or `kernels_avx2` / `kernels_portable` (the CPU kernels' lower
    /// builds, `TANDEM_CPU_KERNELS`); empty for none.
    #[arg(
        long,
        default_value = "no_continuous_batching,no_shared_prefill,no_paging"
    )]
    ablations: String,
    /// Model turns per episode of the multi-turn runs (prefix cache on and off); 1 =
    /// no multi-turn runs.
    #[arg(long, default_value_t = 1)]
    turns: usize,
    /// New tokens (a tool's answer) between two turns of the multi-turn runs.
    #[arg(long, default_value_t = 16)]
    turn_tokens: usize,
    /// `[generator] prefix_cache_tokens` of every run but the multi-turn one without
    /// the cache.
    #[arg(long, default_value_t = EngineConfig::default().prefix_cache_tokens)]
    prefix_cache_tokens: usize,
    /// Side of the square f32 GEMM that measures the machine's FLOP/s.
    #[arg(long, default_value_t = 2048)]
    gemm_size: usize,
    /// Threads for both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Reference script to run side by side (tools/bench_generate.py; its output
    /// format: tools/bench_protocol.py).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Python interpreter with torch + transformers for --reference.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the combined JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one measurement in this process on this workload file.
    #[arg(long, hide = true)]
    variant: Option<String>,
    #[arg(long, hide = true)]
    workload: Option<PathBuf>,
}

/// A few hundred words of plain English the prompts are cut from.
const TEXT: &str = "The lighthouse keeper kept a logbook of every ship that passed the point, \
    and over forty years the entries grew from plain notes about weather and tides into \
    long letters to no one in particular. She wrote about the fog that came in without \
    warning in late summer, about the gulls that learned to open the tin where she kept \
    the biscuits, and about the night the lamp failed and she turned the lens by hand \
    until dawn so that the fishing boats could find the harbour. Visitors sometimes asked \
    whether she was lonely. She told them that a lighthouse is never lonely, because it \
    is always speaking to someone who cannot answer: a sailor far out on the water, a \
    child on a cliff path, a traveller on the coast road who sees the beam sweep across \
    the hills and knows that the sea is near. When the light was finally automated and \
    the keeper moved to the village, she took the logbooks with her, and in the evenings \
    she read them aloud to her neighbours, who had never known how many storms had been \
    weathered a mile from their doors. Some of the entries were about engines and brass \
    and the price of paraffin; others were about a whale that surfaced beside the rocks \
    one April morning and looked at the tower for a long time before it swam away. The \
    neighbours liked those best. A teacher from the school asked whether the children \
    might copy some pages, and soon the whole village knew the names of boats that had \
    sunk before their grandparents were born, and the words for eleven kinds of cloud, \
    and the way to tell a squall from a passing shower by the colour of the sea.";

/// The prompts as token ids: prompt i asks to continue a window of the text that
/// starts at word 7·i, grown word by word until the templated prompt reaches
/// `target` tokens.
fn prompts(tok: &tandem_model::Tokenizer, n: usize, target: usize) -> Result<Vec<Vec<u32>>> {
    let words: Vec<&str> = TEXT.split_whitespace().collect();
    (0..n)
        .map(|i| {
            let start = (7 * i) % (words.len() / 2);
            let mut ids = Vec::new();
            for end in start + 1..=words.len() {
                let msg = format!(
                    "Continue this passage in the same style:\n{}",
                    words[start..end].join(" ")
                );
                let text = tok.apply_chat_template(&[ChatMessage::user(msg)], true)?;
                ids = tok.encode(&text)?;
                if ids.len() >= target {
                    break;
                }
            }
            Ok(ids)
        })
        .collect()
}

/// Runs the benchmark, or (with the hidden `--variant`) one measurement here.
pub fn run(mut b: GenerateBench) -> Result<()> {
    // From here on the model is its spec: `preset:NAME` for --preset.
    b.model = crate::reference::model_spec(&b.model, b.preset.take().as_deref())?;
    match (&b.variant, &b.workload) {
        (Some(v), Some(w)) => run_variant(&b, v, w),
        _ => run_all(&b),
    }
}

/// A tool's answer between two turns of the multi-turn runs: `n` token ids.
fn turn_ids(tok: &tandem_model::Tokenizer, n: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(tok.encode("\nThe calculator answered 4096. Continue.\n")?);
    }
    ids.truncate(n);
    Ok(ids)
}

/// The engine's settings and the workload's shape (prompts, samples) for a variant.
fn variant(b: &GenerateBench, name: &str) -> Result<(EngineConfig, usize, usize)> {
    // Prompts are about `prompt_tokens` long: room for twice that.
    let longest = b.prompt_tokens * 2 + b.max_new_tokens;
    let base = EngineConfig {
        max_running: b.max_running,
        prefix_cache_tokens: b.prefix_cache_tokens,
        ..EngineConfig::default()
    };
    let sized = |cfg: EngineConfig, prompts: usize, samples: usize| {
        (cfg.with_room(prompts, samples, longest), prompts, samples)
    };
    Ok(match name {
        // `lora`: the default run with a rank-16 adapter on every projection folded into
        // the weights, as a generator holds it; `lora_unmerged`: applied beside each
        // projection instead.
        // `kernels_avx2`, `kernels_portable`: the default run on a lower build of the
        // CPU kernels (`TANDEM_CPU_KERNELS` in the child).
        "default" | "lora" | "lora_unmerged" | "kernels_avx2" | "kernels_portable" => {
            sized(base, b.prompts, b.samples)
        }
        // Every episode's whole conversation fits at once.
        "turns_prefix_cache" | "turns_no_prefix_cache" => {
            let cfg = EngineConfig {
                prefix_cache_tokens: match name {
                    "turns_prefix_cache" => b.prefix_cache_tokens,
                    _ => 0,
                },
                ..base
            };
            let longest = b.prompt_tokens * 2 + b.turns * (b.max_new_tokens + b.turn_tokens);
            (cfg.with_room(b.prompts, b.samples, longest), b.prompts, b.samples)
        }
        // A queue of twice the slots: static batches idle the slots of finished rows.
        "no_continuous_batching" | "continuous_batching_queue" => {
            let cfg = EngineConfig {
                continuous: name == "continuous_batching_queue",
                ..base
            };
            sized(cfg, b.prompts * 2, b.samples)
        }
        "no_shared_prefill" => {
            let cfg = EngineConfig {
                share_prefix: false,
                ..base
            };
            sized(cfg, b.prompts, b.samples)
        }
        // One page per sequence holding its longest: a contiguous region per row.
        "no_paging" => {
            let cfg = EngineConfig {
                kv_page_size: longest,
                ..base
            };
            sized(cfg, b.prompts, b.samples)
        }
        other => match other.strip_prefix("concurrency_").map(str::parse::<usize>) {
            Some(Ok(c)) if c > 0 => {
                let (prompts, samples) = if c >= b.samples {
                    (c.div_ceil(b.samples), b.samples)
                } else {
                    (1, c)
                };
                let cfg = EngineConfig {
                    max_running: c,
                    ..base
                };
                sized(cfg, prompts, samples)
            }
            _ => bail!(
                "unknown variant `{other}` (default, lora, lora_unmerged, kernels_avx2, kernels_portable, no_continuous_batching, no_shared_prefill, no_paging, concurrency_N, turns_prefix_cache, turns_no_prefix_cache)"
            ),
        },
    })
}

fn run_variant(b: &GenerateBench, name: &str, workload: &PathBuf) -> Result<()> {
    let mut p = tandem_model::load_model(&b.model)?;
    if name.starts_with("lora") {
        let section = tandem_model::LoraSection {
            rank: 16,
            ..Default::default()
        };
        p.model = section.attach(p.model)?;
        if name == "lora" {
            p.model = p.model.fold_adapter()?;
        }
    }
    if name.starts_with("gemm") {
        return gemm_rate(b.gemm_size, &p.model);
    }
    let (cfg, n_prompts, samples) = variant(b, name)?;
    let text = std::fs::read_to_string(workload)
        .with_context(|| format!("reading {}", workload.display()))?;
    let w: Value = serde_json::from_str(&text)?;
    let all: Vec<Vec<u32>> = serde_json::from_value(w["prompts"].clone())?;
    let stop: Vec<u32> = serde_json::from_value(w["stop_token_ids"].clone())?;
    let mut engine = Engine::new(&p.model, cfg.clone())?;
    if name.starts_with("turns_") {
        let between: Vec<u32> = serde_json::from_value(w["turn_ids"].clone())?;
        let params = SamplingParams {
            temperature: b.temperature,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: b.max_new_tokens,
            stop_token_ids: stop,
            seed: b.seed,
        };
        let r = run_turns(
            b,
            &p.model,
            &mut engine,
            (&all[..n_prompts], samples),
            &between,
            params,
        )?;
        println!("{r}");
        return Ok(());
    }
    // The queue runs of continuous vs static batching give requests uneven lengths,
    // as RL completions are: request i stops by (1 + 5i mod 8)/8 of max_new_tokens.
    let uneven = matches!(name, "no_continuous_batching" | "continuous_batching_queue");
    for i in 0..n_prompts {
        let params = SamplingParams {
            temperature: b.temperature,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: if uneven {
                (b.max_new_tokens * (1 + (5 * i) % 8) / 8).max(1)
            } else {
                b.max_new_tokens
            },
            stop_token_ids: stop.clone(),
            seed: b.seed.wrapping_add(i as u64),
        };
        engine.add(
            &p.model,
            Request {
                id: i as u64,
                prompt: all[i % all.len()].clone(),
                samples,
                params,
                first_stream: 0,
            },
        )?;
    }
    let t0 = Instant::now();
    let done = engine.run_to_completion(&p.model, 0)?;
    let secs = t0.elapsed().as_secs_f64();
    let tokens: usize = done
        .iter()
        .flat_map(|f| &f.completions)
        .map(|c| c.tokens.len())
        .sum();
    let st = engine.stats();
    let kv_peak_bytes = tandem_model::engine::KvPages::bytes_in_pages(
        p.model.config(),
        p.model.dtype(),
        cfg.kv_page_size,
        (st.peak_pages, st.peak_local_pages),
    );
    println!(
        "{}",
        json!({
            "tok_per_s": tokens as f64 / secs,
            "seconds": secs,
            "tokens": tokens,
            "sequences": n_prompts * samples,
            "max_running": cfg.max_running,
            "steps": st.steps,
            "prefilled_tokens": st.prefilled_tokens,
            "prefix_cache_hit_tokens": st.prefix_cache_hit_tokens,
            "preemptions": st.preemptions,
            "peak_running": st.peak_running,
            "kv_peak_mib": kv_peak_bytes as f64 / (1 << 20) as f64,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}

/// Multi-turn episodes on `engine`: `samples` samples of each of `prompts` as one
/// request each (prefilled once, forked), then each sample's next turn a request of its
/// own (its stream: sample j of turn t draws from stream j + t · samples), whose prompt
/// is the previous turn's, its completion and `between`, for `--turns` turns. Reports
/// the tokens generated per second and the prompt tokens computed and cached per turn
/// request.
fn run_turns(
    b: &GenerateBench,
    model: &tandem_model::Model,
    engine: &mut Engine,
    (prompts, samples): (&[Vec<u32>], usize),
    between: &[u32],
    params: SamplingParams,
) -> Result<Value> {
    // Request id → (its prompt, its turn (1 = the first), its sample index).
    let mut live = std::collections::HashMap::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let params = SamplingParams {
            seed: b.seed.wrapping_add(i as u64),
            ..params.clone()
        };
        let id = i as u64;
        engine.add(
            model,
            Request {
                id,
                prompt: prompt.clone(),
                samples,
                params,
                first_stream: 0,
            },
        )?;
        live.insert(id, (prompt.clone(), 1usize, i, 0usize));
    }
    let (mut next_id, mut requests, mut tokens) = (prompts.len() as u64, prompts.len(), 0usize);
    let t0 = Instant::now();
    while !engine.is_idle() {
        for f in engine.step(model, 0)?.finished {
            let (prompt, turn, group, sample) = live.remove(&f.id).expect("a live request");
            for (j, c) in f.completions.iter().enumerate() {
                tokens += c.tokens.len();
                if turn >= b.turns {
                    continue;
                }
                let j = if f.completions.len() > 1 { j } else { sample };
                let next = [prompt.as_slice(), &c.tokens, between].concat();
                let r = Request {
                    id: next_id,
                    prompt: next.clone(),
                    samples: 1,
                    params: SamplingParams {
                        seed: b.seed.wrapping_add(group as u64),
                        ..params.clone()
                    },
                    first_stream: (j + turn * samples) as u64,
                };
                engine
                    .add(model, r)
                    .with_context(|| format!("turn {} of episode {group}/{j}", turn + 1))?;
                live.insert(next_id, (next, turn + 1, group, j));
                next_id += 1;
                requests += 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let st = engine.stats();
    let per = |n: u64| n as f64 / requests as f64;
    Ok(json!({
        "tok_per_s": tokens as f64 / secs,
        "seconds": secs,
        "tokens": tokens,
        "sequences": prompts.len() * samples,
        "turn_requests": requests,
        "max_running": engine.config().max_running,
        "prefix_cache_tokens": engine.config().prefix_cache_tokens,
        "steps": st.steps,
        "prefill_tokens": st.prefilled_tokens,
        "prefix_cache_hit_tokens": st.prefix_cache_hit_tokens,
        "prefill_tokens_per_turn": per(st.prefilled_tokens),
        "prefix_cache_hit_tokens_per_turn": per(st.prefix_cache_hit_tokens),
        "prefix_cache_evictions": st.prefix_cache_evictions,
        "preemptions": st.preemptions,
        "peak_running": st.peak_running,
        "peak_rss_mib": peak_rss_mib(),
    }))
}

/// The machine's GEMM rate on an n×n×n product in the model's dtype (f32 on CPU,
/// bf16 on CUDA) with each matmul the engine has, the fastest taken so the ceiling is
/// never understated: candle's (x·Wᵀ through `tandem_model::linear`) and, on CPU, the
/// packed matmul of the engine's projections (W packed once, outside the timing).
/// GFLOP/s, the median of 5 after a warm-up.
fn gemm_rate(n: usize, model: &tandem_model::Model) -> Result<()> {
    let dev = model.device();
    let x = candle_core::Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(model.dtype())?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(model.dtype())?;
    let rate = |f: &dyn Fn() -> Result<candle_core::Tensor>| -> Result<f64> {
        let mut times = Vec::new();
        for rep in 0..6 {
            let t0 = Instant::now();
            let y = f()?;
            dev.synchronize()?;
            drop(y);
            if rep > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        Ok(2.0 * (n as f64).powi(3) / median(times) / 1e9)
    };
    let linear = rate(&|| Ok(tandem_model::linear::linear(&x, &w)?))?;
    let packed = match dev.is_cpu() && model.dtype() == candle_core::DType::F32 {
        true => {
            let p = tandem_model::packed_matmul::PackedMatrix::pack(&w)?;
            Some(rate(&|| Ok(p.matmul(&x)?))?)
        }
        false => None,
    };
    println!(
        "{}",
        json!({
            "gemm_gflops": packed.unwrap_or(0.0).max(linear),
            "gemm_gflops_linear": linear,
            "gemm_gflops_packed": packed,
            "gemm_size": n,
        })
    );
    Ok(())
}

/// `--concurrency` and `--ablations`, checked.
fn parse_lists(b: &GenerateBench) -> Result<(Vec<usize>, Vec<String>)> {
    let concurrency: Vec<usize> = b
        .concurrency
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim().parse::<usize>() {
            Ok(c) if c > 0 => Ok(c),
            _ => bail!("--concurrency: `{s}` is not a positive count"),
        })
        .collect::<Result<_>>()?;
    let ablations: Vec<String> = b
        .ablations
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    for a in &ablations {
        variant(b, a)?;
        if let Some(kind) = a.strip_prefix("kernels_") {
            tandem_model::simd::Isa::choose(kind, tandem_model::simd::Isa::best())
                .map_err(|why| crate::error::Error::Invalid(format!("--ablations {a}: {why}")))?;
        }
    }
    Ok((concurrency, ablations))
}

/// Every Tandem run of the bench, each in a child process of its own (`--variant`), in
/// the order of `runs`; their printed results by name.
fn measure_variants(
    b: &GenerateBench,
    runs: &[String],
    workload: &Path,
    bar: &indicatif::ProgressBar,
) -> Result<serde_json::Map<String, Value>> {
    let exe = std::env::current_exe()?;
    let mut measured = serde_json::Map::new();
    for v in runs {
        bar.set_message(format!("tandem {v}"));
        let mut cmd = Command::new(&exe);
        cmd.env("RAYON_NUM_THREADS", b.threads.to_string())
            .args(["bench", "generate", "--model", &b.model, "--variant", v])
            .arg("--workload")
            .arg(workload)
            .args(["--prompts", &b.prompts.to_string()])
            .args(["--samples", &b.samples.to_string()])
            .args(["--prompt-tokens", &b.prompt_tokens.to_string()])
            .args(["--max-new-tokens", &b.max_new_tokens.to_string()])
            .args(["--temperature", &b.temperature.to_string()])
            .args(["--seed", &b.seed.to_string()])
            .args(["--max-running", &b.max_running.to_string()])
            .args(["--turns", &b.turns.to_string()])
            .args(["--turn-tokens", &b.turn_tokens.to_string()])
            .args(["--prefix-cache-tokens", &b.prefix_cache_tokens.to_string()])
            .args(["--gemm-size", &b.gemm_size.to_string()]);
        if let Some(kind) = v.strip_prefix("kernels_") {
            cmd.env("TANDEM_CPU_KERNELS", kind);
        }
        measured.insert(v.clone(), run_child(cmd, &format!("tandem {v}"))?);
        bar.inc(1);
    }
    Ok(measured)
}

/// The reference script on the same workload (its first `prompts` prompts): its
/// printed result, checked to have generated every sequence asked for.
fn run_reference(
    b: &GenerateBench,
    script: &Path,
    workload: &Path,
    prompts: usize,
) -> Result<Value> {
    let (model_args, _config_dir) = crate::reference::model_args(&b.model)?;
    let mut cmd = Command::new(&b.python);
    cmd.arg(script)
        .args(&model_args)
        .arg("--workload")
        .arg(workload)
        .args(["--prompts", &b.prompts.to_string()])
        .args(["--threads", &b.threads.to_string()]);
    // The reference runs where Tandem runs: CUDA in bf16, else the CPU in f32.
    if tandem_model::process_device()?.is_cuda() {
        cmd.args(["--device", "cuda", "--dtype", "bf16"]);
    }
    let (reference, printed) = crate::reference::run::<GenerateReference>(cmd)?;
    let asked = prompts * b.samples;
    if reference.sequences as usize != asked {
        bail!(
            "the reference script generated {} sequences, not the {asked} of the workload's first {prompts} prompts × {} samples",
            reference.sequences,
            b.samples
        );
    }
    Ok(printed)
}

fn run_all(b: &GenerateBench) -> Result<()> {
    if b.prompts == 0 || b.samples == 0 || b.max_new_tokens == 0 || b.turns == 0 {
        bail!("--prompts, --samples, --max-new-tokens and --turns must be ≥ 1");
    }
    let (concurrency, ablations) = parse_lists(b)?;
    let p = tandem_model::load_model(&b.model)?;
    let params: usize = p.model.params().iter().map(|(_, v)| v.elem_count()).sum();
    let most = concurrency.iter().copied().max().unwrap_or(0);
    let n_prompts = (b.prompts * 2).max(most.div_ceil(b.samples));
    let prompts = prompts(&p.tokenizer, n_prompts, b.prompt_tokens)?;
    let stop = p.stop_token_ids();
    let between = turn_ids(&p.tokenizer, b.turn_tokens)?;
    drop(p);
    let dir = tempfile::tempdir()?;
    let workload = dir.path().join("workload.json");
    std::fs::write(
        &workload,
        serde_json::to_string(&json!({
            "prompts": prompts,
            "stop_token_ids": stop,
            "turn_ids": between,
            "samples": b.samples,
            "max_new_tokens": b.max_new_tokens,
            "temperature": b.temperature,
            "seed": b.seed,
        }))?,
    )?;
    let mut runs: Vec<String> = vec!["gemm".into(), "default".into()];
    runs.extend(concurrency.iter().map(|c| format!("concurrency_{c}")));
    for a in &ablations {
        if a == "no_continuous_batching" {
            runs.push("continuous_batching_queue".into());
        }
        runs.push(a.clone());
    }
    let turns = ["turns_prefix_cache", "turns_no_prefix_cache"];
    if b.turns > 1 {
        runs.extend(turns.map(String::from));
    }
    // The machine's rate drifts (a shared VM): measured before and after, the higher
    // taken, so the ceiling is never understated.
    runs.push("gemm_after".into());
    let bar = indicatif::ProgressBar::new(runs.len() as u64 + u64::from(b.reference.is_some()));
    let measured = measure_variants(b, &runs, &workload, &bar)?;
    let rates: Vec<f64> = ["gemm", "gemm_after"]
        .iter()
        .filter_map(|g| measured[*g]["gemm_gflops"].as_f64())
        .collect();
    let gflops = rates.iter().copied().fold(0.0, f64::max);
    let ceiling = gflops * 1e9 / (2.0 * params as f64);
    let mut result = json!({
        "model": b.model,
        "threads": b.threads,
        "parameters": params,
        "gemm_gflops": gflops,
        "gemm_gflops_runs": rates,
        "gemm_runs": [measured["gemm"], measured["gemm_after"]],
        "gemm_size": b.gemm_size,
        "ceiling_tok_per_s": ceiling,
        "workload": {
            "prompts": b.prompts, "samples": b.samples,
            "prompt_tokens": prompts.iter().take(b.prompts).map(Vec::len).collect::<Vec<_>>(),
            "max_new_tokens": b.max_new_tokens, "temperature": b.temperature, "seed": b.seed,
        },
        "tandem": measured["default"],
        "concurrency": concurrency.iter().map(|c| (c.to_string(), measured[&format!("concurrency_{c}")].clone())).collect::<serde_json::Map<_, _>>(),
        "ablations": ablations.iter().map(|a| (a.clone(), measured[a].clone())).collect::<serde_json::Map<_, _>>(),
    });
    if b.turns > 1 {
        result["turns"] = json!({
            "turns": b.turns,
            "turn_tokens": b.turn_tokens,
            "prefix_cache": measured["turns_prefix_cache"],
            "no_prefix_cache": measured["turns_no_prefix_cache"],
        });
    }
    if ablations.iter().any(|a| a == "no_continuous_batching") {
        result["ablations"]["continuous_batching_queue"] =
            measured["continuous_batching_queue"].clone();
    }
    if let Some(script) = &b.reference {
        bar.set_message("reference");
        result["reference"] = run_reference(b, script, &workload, b.prompts.min(n_prompts))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_table(&result);
    result["cpu"] = crate::timing::cpu();
    if let Some(path) = &b.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn print_table(r: &Value) {
    let ceiling = r["ceiling_tok_per_s"].as_f64().unwrap_or(f64::NAN);
    let reference = r["reference"]["tok_per_s"].as_f64();
    println!(
        "GEMM {:.1} GFLOP/s ({}³, the model's dtype) → ceiling {ceiling:.1} tok/s for {} parameters",
        r["gemm_gflops"].as_f64().unwrap_or(0.0),
        r["gemm_size"],
        r["parameters"]
    );
    if let Some(runs) = r["gemm_runs"].as_array() {
        let gf = |v: &Value, k: &str| v[k].as_f64().map_or("–".into(), |x| format!("{x:.1}"));
        for (when, g) in ["before", "after"].iter().zip(runs) {
            println!(
                "  GEMM {when}: candle {} GFLOP/s, packed {} GFLOP/s",
                gf(g, "gemm_gflops_linear"),
                gf(g, "gemm_gflops_packed")
            );
        }
    }
    println!("| run | sequences | max_running | tok/s | × ceiling | × reference | steps | KV peak MiB | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let row = |name: &str, v: &Value| {
        let t = v["tok_per_s"].as_f64().unwrap_or(f64::NAN);
        let f = |k: &str| v[k].as_f64().map_or("–".into(), |x| format!("{x:.0}"));
        println!(
            "| {name} | {} | {} | {t:.1} | {:.2} | {} | {} | {} | {} |",
            f("sequences"),
            f("max_running"),
            t / ceiling,
            reference.map_or("–".into(), |r| format!("{:.2}", t / r)),
            f("steps"),
            f("kv_peak_mib"),
            f("peak_rss_mib"),
        );
    };
    row("tandem", &r["tandem"]);
    if let Some(m) = r["concurrency"].as_object() {
        for (c, v) in m {
            row(&format!("tandem, {c} concurrent"), v);
        }
    }
    if let Some(m) = r["ablations"].as_object() {
        for (a, v) in m {
            row(&format!("tandem {a}"), v);
        }
    }
    if !r["reference"].is_null() {
        row("transformers generate", &r["reference"]);
    }
    if r["turns"].is_object() {
        println!(
            "\nmulti-turn: {} turns, {} new tokens between turns",
            r["turns"]["turns"], r["turns"]["turn_tokens"]
        );
        println!("| run | turn requests | prefill tok/turn | cached tok/turn | tok/s | steps | preemptions |");
        println!("|---|---|---|---|---|---|---|");
        for (name, key) in [
            ("prefix cache", "prefix_cache"),
            ("no prefix cache", "no_prefix_cache"),
        ] {
            let v = &r["turns"][key];
            let f = |k: &str, d: usize| v[k].as_f64().map_or("–".into(), |x| format!("{x:.d$}"));
            println!(
                "| {name} | {} | {} | {} | {} | {} | {} |",
                f("turn_requests", 0),
                f("prefill_tokens_per_turn", 1),
                f("prefix_cache_hit_tokens_per_turn", 1),
                f("tok_per_s", 1),
                f("steps", 0),
                f("preemptions", 0),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        b: GenerateBench,
    }

    #[test]
    fn variants_shape_the_workload_and_unknown_ones_are_refused() {
        let b = Cli::parse_from(["x"]).b;
        let (cfg, p, s) = variant(&b, "default").unwrap();
        assert_eq!((p, s, cfg.max_running), (8, 8, 64));
        assert!(cfg.continuous && cfg.share_prefix);
        let (cfg, p, _) = variant(&b, "no_continuous_batching").unwrap();
        assert!(!cfg.continuous);
        assert_eq!(p, 16, "a queue of twice the slots");
        assert!(!variant(&b, "no_shared_prefill").unwrap().0.share_prefix);
        assert_eq!(variant(&b, "no_paging").unwrap().0.kv_page_size, 512);
        let (cfg, p, s) = variant(&b, "turns_prefix_cache").unwrap();
        assert_eq!((p, s), (8, 8));
        assert_eq!(cfg.prefix_cache_tokens, b.prefix_cache_tokens);
        assert!(b.prefix_cache_tokens > 0);
        assert_eq!(
            variant(&b, "turns_no_prefix_cache")
                .unwrap()
                .0
                .prefix_cache_tokens,
            0
        );
        assert_eq!(variant(&b, "concurrency_1").unwrap().1, 1);
        let (cfg, p, s) = variant(&b, "concurrency_256").unwrap();
        assert_eq!((cfg.max_running, p, s), (256, 32, 8));
        let (_, p, s) = variant(&b, "concurrency_4").unwrap();
        assert_eq!((p, s), (1, 4));
        for bad in ["fast", "concurrency_0"] {
            let e = variant(&b, bad).unwrap_err().to_string();
            assert!(e.contains(&format!("unknown variant `{bad}`")), "{e}");
        }
    }

    #[test]
    fn prompts_reach_the_target_length() {
        let p = tandem_model::preset::init("tiny", 1, &candle_core::Device::Cpu).unwrap();
        let ids = prompts(&p.tokenizer, 3, 60).unwrap();
        assert_eq!(ids.len(), 3);
        for x in &ids {
            assert!(x.len() >= 60 && x.len() < 90, "{}", x.len());
        }
        assert_ne!(ids[0], ids[1]);
    }
}
