use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    for (n, k) in [(1536usize, 576usize), (576, 1536), (49152, 576), (192, 576)] {
        for m in [64usize, 128, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let wt = w.t().unwrap().contiguous().unwrap();
            let time = |f: &dyn Fn() -> Tensor| {
                f();
                let mut ts = vec![];
                for _ in 0..7 {
                    let t = Instant::now();
                    f();
                    ts.push(t.elapsed().as_secs_f64());
                }
                ts.sort_by(f64::total_cmp);
                ts[3]
            };
            let a = time(&|| x.matmul(&w.t().unwrap()).unwrap());
            let _ = &wt;
            let pk = tandem_model::packed_matmul::PackedMatrix::pack(&w).unwrap();
            let b = time(&|| pk.matmul(&x).unwrap());
            let fl = 2.0 * (m * n * k) as f64;
            println!(
                "m {m} n {n} k {k}: W^T view {:.1} GF/s, packed {:.1} GF/s",
                fl / a / 1e9,
                fl / b / 1e9
            );
        }
    }
}
#[allow(dead_code)]
fn unused() {}
