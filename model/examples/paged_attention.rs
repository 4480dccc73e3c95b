//! Times the engine's paged-attention kernel on a decode step shaped like the
//! `bench generate` workload: 8 prompts of 128 tokens × 8 samples that share their
//! prompt's pages, `OWN` tokens of their own, SmolLM2-135M's heads (9 query, 3 KV,
//! 64 wide; `HEADS`, `KV_HEADS`, `HEAD_DIM` set others), one pool per layer for 30
//! layers (`LAYERS`; so the keys come from memory, as in a real step). Prints the
//! median step time and the attention's FLOP rate.
//!
//!   RAYON_NUM_THREADS=2 cargo run --release -p tandem-model --example paged_attention
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use tandem_model::engine::{paged_attention, PagedLayout};
use tandem_model::ops::attention::Heads;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // HEADS=4 KV_HEADS=1 HEAD_DIM=256 gives Gemma 3 270M's heads.
    let heads = Heads {
        query: env("HEADS", 9),
        kv: env("KV_HEADS", 3),
        dim: env("HEAD_DIM", 64),
    };
    let (groups, samples, prompt) = (8usize, 8usize, 128usize);
    let layers: usize = std::env::var("LAYERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let own: usize = std::env::var("OWN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let pool = groups * prompt + groups * samples * own;
    let dev = Device::Cpu;
    let mut slots = Vec::new();
    for g in 0..groups {
        for s in 0..samples {
            let mut v: Vec<u32> = (g * prompt..(g + 1) * prompt).map(|x| x as u32).collect();
            let base = groups * prompt + (g * samples + s) * own;
            v.extend((base..base + own).map(|x| x as u32));
            slots.push(v);
        }
    }
    let n = groups * samples;
    let layout = Arc::new(PagedLayout {
        queries: (0..n).map(|i| (i as u32, (prompt + own) as u32)).collect(),
        slots,
    });
    let kw = heads.kv * heads.dim;
    let pools: Vec<(Tensor, Tensor)> = (0..layers)
        .map(|_| {
            (
                Tensor::randn(0f32, 1.0, (pool, kw), &dev).unwrap(),
                Tensor::randn(0f32, 1.0, (pool, kw), &dev).unwrap(),
            )
        })
        .collect();
    let q = Tensor::randn(0f32, 1.0, (n, heads.query * heads.dim), &dev).unwrap();
    let step = || {
        for (k, v) in &pools {
            paged_attention(&q, k, v, &layout, heads, None).unwrap();
        }
    };
    step();
    let iters: usize = std::env::var("ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let mut ts: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            step();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    let flops = (4 * n * heads.query * heads.dim * (prompt + own) * layers) as f64;
    println!(
        "{n} sequences seeing {} tokens, {layers} layers: {:.2} ms per step, {:.1} GFLOP/s",
        prompt + own,
        ts[iters / 2] * 1e3,
        flops / ts[iters / 2] / 1e9
    );
}
