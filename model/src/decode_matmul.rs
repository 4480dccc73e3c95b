//! y = x·Wᵀ for the few rows of a decode step, on CPU.
//!
//! A decode step multiplies 1–16 activation rows by every weight matrix: the work is
//! reading the weights, not arithmetic. This kernel streams each weight row once,
//! dots it with every activation row while it is in L1, and splits the weight rows
//! across threads, so a step costs about one pass over the weights at the memory
//! bandwidth of all cores. Inference only (no backward); `transformer::project` uses it
//! on detached weights and its results match the differentiable matmul (tested).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_storage::contiguous;
use crate::error::Result;
use crate::simd::Avx2Fma;

/// The largest number of activation rows the kernel takes.
pub const MAX_ROWS: usize = 16;

/// Whether x (rows, k) · wᵀ can take this kernel.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(0).is_ok_and(|r| r <= MAX_ROWS)
        && w.is_contiguous()
}

/// x (rows, k) · wᵀ with w (n, k) → (rows, n).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2_no_bwd(w, &DecodeMatmul)?)
}

struct DecodeMatmul;

/// Dots one weight row with up to four activation rows at once: each weight element
/// is loaded once for four multiply-adds, and eight independent lanes per row let the
/// compiler vectorise without reassociating.
#[inline(always)]
fn dot4_portable(w: &[f32], xs: [&[f32]; 4], n: usize, out: &mut [f32]) {
    let mut acc = [[0f32; 8]; 4];
    let chunks = w.len() / 8;
    for c in 0..chunks {
        let wc = &w[c * 8..c * 8 + 8];
        for (r, a) in acc.iter_mut().enumerate().take(n) {
            let xc = &xs[r][c * 8..c * 8 + 8];
            for i in 0..8 {
                a[i] += wc[i] * xc[i];
            }
        }
    }
    for (r, o) in out.iter_mut().enumerate().take(n) {
        let tail: f32 = w[chunks * 8..]
            .iter()
            .zip(&xs[r][chunks * 8..])
            .map(|(a, b)| a * b)
            .sum();
        *o = acc[r].iter().sum::<f32>() + tail;
    }
}

/// [`dot4_portable`] compiled for AVX2 and FMA (safe code; only the call needs the CPU
/// to have them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot4_avx2(w: &[f32], xs: [&[f32]; 4], n: usize, out: &mut [f32]) {
    dot4_portable(w, xs, n, out)
}

/// out[r] = w · x_r for the (up to four) rows in `xs`; `n` of them are real.
fn dot4(w: &[f32], xs: [&[f32]; 4], n: usize, out: &mut [f32], simd: Option<Avx2Fma>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(_cpu) = simd {
        // SAFETY: an `Avx2Fma` exists: the CPU reports AVX2 and FMA.
        return unsafe { dot4_avx2(w, xs, n, out) };
    }
    let _ = simd;
    dot4_portable(w, xs, n, out)
}

impl CustomOp2 for DecodeMatmul {
    fn name(&self) -> &'static str {
        "decode-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("decode-matmul: x has {k} columns, w has {k2}")
        }
        let x = contiguous::<f32>(s1, l1, self.name())?;
        let w = contiguous::<f32>(s2, l2, self.name())?;
        let Some(len) = rows.checked_mul(n) else {
            candle_core::bail!("decode-matmul: {rows} rows × {n} outputs overflow usize")
        };
        // Zero rows, outputs or columns: nothing to dot (y is empty or all zeros).
        if len == 0 || k == 0 {
            return Ok((CpuStorage::F32(vec![0f32; len]), Shape::from((rows, n))));
        }
        let simd = Avx2Fma::detect();
        // Output transposed (n, rows) so each task writes one contiguous block.
        const BLOCK: usize = 64;
        let mut yt = vec![0f32; len];
        yt.par_chunks_mut(BLOCK.saturating_mul(rows))
            .enumerate()
            .for_each(|(blk, out)| {
                let first = blk * BLOCK;
                for (j, o) in out.chunks_mut(rows).enumerate() {
                    let wr = &w[(first + j) * k..(first + j + 1) * k];
                    for (g, o) in o.chunks_mut(4).enumerate() {
                        let row = |i: usize| {
                            let r = (g * 4 + i).min(rows - 1);
                            &x[r * k..(r + 1) * k]
                        };
                        dot4(wr, [row(0), row(1), row(2), row(3)], o.len(), o, simd);
                    }
                }
            });
        let y = if rows == 1 {
            yt
        } else {
            let mut y = vec![0f32; len];
            for j in 0..n {
                for r in 0..rows {
                    y[r * n + j] = yt[j * rows + r];
                }
            }
            y
        };
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_matmul() {
        for rows in [1, 3, 16] {
            let x = Tensor::randn(0f32, 1.0, (rows, 77), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (130, 77), &Device::Cpu).unwrap();
            let a = matmul_t(&x, &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "rows {rows}: {d}");
        }
    }

    /// Zero rows, zero outputs or zero columns: the (rows, n) product, empty or all
    /// zeros, and no panic.
    #[test]
    fn empty_shapes_give_empty_or_zero_products() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(0, 130, 77), (0, 0, 0), (3, 0, 77), (3, 5, 0), (0, 5, 0)] {
            let x = Tensor::zeros((rows, k), candle_core::DType::F32, &dev).unwrap();
            let w = Tensor::ones((n, k), candle_core::DType::F32, &dev).unwrap();
            let y = matmul_t(&x, &w).unwrap();
            assert_eq!(y.dims(), [rows, n], "rows {rows} n {n} k {k}");
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                y.iter().all(|&v| v == 0.0),
                "rows {rows} n {n} k {k}: {y:?}"
            );
        }
    }
}
