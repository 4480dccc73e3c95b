//! The engine's two matmuls on the shapes a decode step multiplies (SmolLM2's
//! projections and head at 64–256 rows) and on the square product that measures the
//! machine: candle's GEMM (x·Wᵀ, W viewed transposed) beside the packed matmul (W
//! packed once, not timed). Medians of 7 after a warm-up. Then a layer's Q, K and V
//! (and its gate and up) products, matrix by matrix beside one pass over all their
//! panels ([`PackedMatrix::matmul_each`]).
//!
//! `cargo run --release -p tandem-model --example gemm_layout`
use std::time::Instant;

use candle_core::{Device, Tensor};
use tandem_model::packed_matmul::PackedMatrix;

fn median_secs(f: &dyn Fn() -> Tensor) -> f64 {
    f();
    let mut ts: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(f64::total_cmp);
    ts[3]
}

fn main() {
    let dev = Device::Cpu;
    let decode = [(1536usize, 576usize), (576, 1536), (49152, 576), (192, 576)]
        .into_iter()
        .flat_map(|(n, k)| [64usize, 128, 256].map(|m| (m, n, k)));
    for (m, n, k) in decode.chain([(1024, 1536, 576), (2048, 2048, 2048)]) {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let candle = median_secs(&|| x.matmul(&w.t().unwrap()).unwrap());
        let pk = PackedMatrix::pack(&w).unwrap();
        let packed = median_secs(&|| pk.matmul(&x).unwrap());
        let flops = 2.0 * (m * n * k) as f64;
        println!(
            "m {m:>4} n {n:>5} k {k:>4}: candle {:6.1} GF/s, packed {:6.1} GF/s",
            flops / candle / 1e9,
            flops / packed / 1e9
        );
    }
    for m in [16usize, 64, 256] {
        let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
        let pack = |n: usize| {
            PackedMatrix::pack(&Tensor::randn(0f32, 1.0, (n, 576), &dev).unwrap()).unwrap()
        };
        let (q, k, v, gate, up) = (pack(576), pack(192), pack(192), pack(1536), pack(1536));
        let one_by_one = median_secs(&|| {
            for p in [&q, &k, &v] {
                p.matmul(&x).unwrap();
            }
            gate.matmul(&x).unwrap();
            up.matmul(&x).unwrap()
        });
        let together = median_secs(&|| {
            PackedMatrix::matmul_each([&q, &k, &v], &x).unwrap();
            let [_, u] = PackedMatrix::matmul_each([&gate, &up], &x).unwrap();
            u
        });
        println!(
            "m {m:>4} q,k,v + gate,up: one matrix at a time {:7.1} µs, one pass each {:7.1} µs",
            one_by_one * 1e6,
            together * 1e6
        );
    }
}
