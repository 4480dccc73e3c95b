//! `tandem bench model`: decode, fwd+bwd and optimizer-step speed of the model engine,
//! side by side with the transformers reference (tools/bench_transformers.py) in the
//! same run, on the same GGUF, thread count, prompt, lengths and batch sizes. With
//! `--preset NAME` both sides measure a random model of the preset's shape (Tandem's
//! `preset:NAME`; the script builds it from the preset's `config.json`), e.g.
//! `qwen3-0.6b` for Qwen3-0.6B's speed and memory without its weights.
//!
//! Each phase runs in its own child process so that its peak RSS is its own. The
//! device and dtype are the binary's (`TANDEM_DEVICE`, `TANDEM_DTYPE`, inherited by the
//! phases); on a GPU every timed phase ends with a device synchronisation.
//!

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};
use tandem_model::optim::{AdamW, AdamWConfig};
use tandem_model::SamplingParams;

use crate::error::{bail, ensure, Context, Result};
use crate::reference::ModelReference;
use crate::timing::{peak_rss_mib, reset_peak_rss, run_child, timed};

#[derive(Args, Clone)]
pub struct ModelBench {
    /// Model: `smollm2`, a .gguf file or an HF folder.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// Instead of --model, a random model of a preset's shape (`tandem model init
    /// --preset`: qwen3-0.6b, gemma3-270m, tiny, …), the reference the same shape.
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Decode batch sizes, comma-separated.
    #[arg(long, default_value = "1,8")]
    decode_batches: String,
    #[arg(long, default_value_t = 4)]
    train_batch: usize,
    #[arg(long, default_value_t = 128)]
    train_len: usize,
    /// Timed repetitions per phase (median reported), after one warm-up.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Threads for both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Reference script to run side by side (tools/bench_transformers.py; its output
    /// format: tools/bench_protocol.py).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Python interpreter with torch + transformers for --reference.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the combined JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: run one phase in this process and print its JSON.
    #[arg(long, hide = true)]
    phase: Option<String>,
}

/// The fixed 16-token prompt both engines decode from.
const PROMPT: std::ops::Range<u32> = 100..116;

/// Runs the benchmark, or (with the hidden `--phase`) one of its phases in this process.
pub fn run(m: ModelBench) -> Result<()> {
    match m.phase.clone() {
        Some(phase) => run_phase(&m, &phase),
        None => run_all(&m),
    }
}

fn phases(m: &ModelBench) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for b in m
        .decode_batches
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let b: usize = b
            .parse()
            .with_context(|| format!("--decode-batches: `{b}` is not a batch size"))?;
        if b == 0 {
            bail!("--decode-batches: batch sizes must be positive");
        }
        out.push(format!("decode_b{b}"));
    }
    out.push("fwd_bwd".into());
    out.push("optimizer_step".into());
    Ok(out)
}

fn run_phase(m: &ModelBench, phase: &str) -> Result<()> {
    let t = Instant::now();
    let p = tandem_model::load_model(&m.model)?;
    let model = &p.model;
    let device = model.device().clone();
    let load_peak = peak_rss_mib();
    let mut out = json!({
        "load_seconds": t.elapsed().as_secs_f64(),
        "load_peak_rss_mib": load_peak,
        "device": format!("{:?}", device.location()),
        "dtype": format!("{:?}", model.dtype()).to_lowercase(),
    });
    let can_reset = reset_peak_rss();
    if let Some(b) = phase.strip_prefix("decode_b") {
        let b: usize = b
            .parse()
            .with_context(|| format!("phase `{phase}`: not a batch size"))?;
        let params = |n| SamplingParams {
            temperature: 0.0,
            max_new_tokens: n,
            stop_token_ids: vec![],
            ..Default::default()
        };
        let prompts = vec![PROMPT.collect::<Vec<u32>>(); b];
        tandem_model::generate(model, prompts.clone(), params(4))?;
        let secs = timed(m.reps, || {
            let c = tandem_model::generate(model, prompts.clone(), params(m.new_tokens))?;
            ensure!(
                c.iter().all(|c| c.tokens.len() == m.new_tokens),
                "short completion"
            );
            Ok(())
        })?;
        out["seconds"] = json!(secs);
        out["tokens_per_s"] = json!((b * m.new_tokens) as f64 / secs);
    } else if phase == "fwd_bwd" {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let vocab = model.config().vocab_size as u32;
        let seqs: Vec<Vec<u32>> = (0..m.train_batch)
            .map(|_| {
                (0..m.train_len)
                    .map(|_| rng.random_range(0..vocab))
                    .collect()
            })
            .collect();
        let starts = vec![1; m.train_batch];
        let mut loss_value = 0.0;
        let secs = timed(m.reps, || {
            let out = model.completion_logprobs(&model.weights(), &seqs, &starts, 1.0)?;
            let loss = out.logprobs.mean_all()?.neg()?;
            let _grads = loss.backward()?;
            loss_value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            device.synchronize()?;
            Ok(())
        })?;
        out["seconds"] = json!(secs);
        out["tokens_per_s"] = json!((m.train_batch * m.train_len) as f64 / secs);
        out["loss"] = json!(loss_value);
    } else if phase == "optimizer_step" {
        let seq: Vec<u32> = PROMPT.collect();
        let lp = model.completion_logprobs(&model.weights(), &[seq], &[1], 1.0)?;
        let grads = lp.logprobs.mean_all()?.neg()?.backward()?;
        let named = model
            .params()
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        let mut opt = AdamW::new(
            named,
            AdamWConfig {
                lr: 1e-6,
                ..Default::default()
            },
        )?;
        let secs = timed(m.reps, || {
            opt.step(&grads, None)?;
            device.synchronize()?;
            Ok(())
        })?;
        out["seconds"] = json!(secs);
        out["n_params"] = json!(model.params().numel());
    } else {
        bail!("unknown phase `{phase}`");
    }
    if let candle_core::Device::Cuda(_) = &device {
        out["gpu_memory_used_mib"] = json!(gpu_memory_used_mib(&device));
    }
    out["peak_rss_mib"] = json!(load_peak.max(peak_rss_mib()));
    if can_reset {
        out["phase_peak_rss_mib"] = json!(peak_rss_mib());
    }
    println!("{out}");
    Ok(())
}

fn run_all(m: &ModelBench) -> Result<()> {
    let phases = phases(m)?;
    let model = crate::reference::model_spec(&m.model, m.preset.as_deref())?;
    let exe = std::env::current_exe()?;
    let threads = m.threads.to_string();
    let bar = indicatif::ProgressBar::new(
        phases.len() as u64 * if m.reference.is_some() { 2 } else { 1 },
    );
    let mut tandem = serde_json::Map::new();
    for ph in &phases {
        bar.set_message(format!("tandem {ph}"));
        let mut cmd = Command::new(&exe);
        cmd.env("RAYON_NUM_THREADS", &threads)
            .args(["bench", "model", "--model", &model, "--phase", ph]);
        cmd.args([
            "--new-tokens",
            &m.new_tokens.to_string(),
            "--train-batch",
            &m.train_batch.to_string(),
        ]);
        cmd.args([
            "--train-len",
            &m.train_len.to_string(),
            "--reps",
            &m.reps.to_string(),
        ]);
        tandem.insert(ph.clone(), run_child(cmd, &format!("tandem phase {ph}"))?);
        bar.inc(1);
    }
    let mut result = json!({"threads": m.threads, "model": model, "tandem": {"engine": "tandem", "phases": tandem}});
    if let Some(script) = &m.reference {
        let (model_args, _config_dir) = crate::reference::model_args(&model)?;
        bar.set_message("transformers (all phases)");
        let mut cmd = Command::new(&m.python);
        cmd.arg(script).args(&model_args);
        cmd.args([
            "--threads",
            &threads,
            "--new-tokens",
            &m.new_tokens.to_string(),
            "--decode-batches",
            &m.decode_batches,
        ]);
        cmd.args([
            "--train-batch",
            &m.train_batch.to_string(),
            "--train-len",
            &m.train_len.to_string(),
            "--reps",
            &m.reps.to_string(),
        ]);
        let (reference, printed) = crate::reference::run::<ModelReference>(cmd)?;
        reference.check(&phases, m.threads)?;
        result["reference"] = printed;
        bar.inc(phases.len() as u64);
    }
    bar.finish_and_clear();
    print_table(&result, &phases);
    result["cpu"] = crate::timing::cpu();
    if let Some(path) = &m.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A markdown table: one row per phase, Tandem beside the reference.
fn print_table(result: &Value, phases: &[String]) {
    let get = |side: &str, ph: &str, key: &str| result[side]["phases"][ph][key].as_f64();
    println!("| phase | tandem s | ref s | tandem tok/s | ref tok/s | speed-up | tandem peak RSS MiB | ref peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    let f = |x: Option<f64>, p: usize| x.map_or("–".to_string(), |v| format!("{v:.p$}"));
    for ph in phases {
        let (ts, rs) = (
            get("tandem", ph, "seconds"),
            get("reference", ph, "seconds"),
        );
        let speedup = match (ts, rs) {
            (Some(t), Some(r)) if t > 0.0 => Some(r / t),
            _ => None,
        };
        let rss = |side| get(side, ph, "phase_peak_rss_mib").or(get(side, ph, "peak_rss_mib"));
        println!(
            "| {ph} | {} | {} | {} | {} | {} | {} | {} |",
            f(ts, 3),
            f(rs, 3),
            f(get("tandem", ph, "tokens_per_s"), 1),
            f(get("reference", ph, "tokens_per_s"), 1),
            speedup.map_or("–".into(), |s| format!("{s:.2}×")),
            f(rss("tandem"), 0),
            f(rss("reference"), 0),
        );
    }
}

/// Memory in use on the model's GPU (whole device, all processes), MiB.
#[cfg(feature = "cuda")]
fn gpu_memory_used_mib(device: &candle_core::Device) -> Option<f64> {
    let candle_core::Device::Cuda(d) = device else {
        return None;
    };
    let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
    Some((total - free) as f64 / (1 << 20) as f64)
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory_used_mib(_: &candle_core::Device) -> Option<f64> {
    None
}
