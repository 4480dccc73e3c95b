//! The CPU kernel of the decode matmul: y = x·Wᵀ for the 1–16 activation rows of a
//! decode step ([`crate::decode_matmul`]), where the work is reading the weights. Each
//! weight row is streamed once and dotted with every activation row while it is in L1;
//! the weight rows are split across threads. The only `unsafe` is the call of the
//! AVX2 + FMA or AVX-512 build of the dot product, made with the token of its kind
//! ([`Simd`]).

use rayon::prelude::*;

use super::simd::Simd;

/// y (rows × n) = x (rows × k) · wᵀ with w (n × k), both row-major. An error, and
/// nothing read, when x or w does not hold its rows.
pub(crate) fn matmul_t(
    x: &[f32],
    w: &[f32],
    shape: (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    matmul_t_on(Simd::detect(), x, w, shape)
}

/// [`matmul_t`] on the build `simd`.
fn matmul_t_on(
    simd: Simd,
    x: &[f32],
    w: &[f32],
    (rows, n, k): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    let holds = |len: usize, rows: usize| rows.checked_mul(k) == Some(len);
    if !holds(x.len(), rows) || !holds(w.len(), n) {
        candle_core::bail!(
            "decode-matmul: x holds {} values for {rows} rows of {k}, w {} for {n} rows",
            x.len(),
            w.len()
        )
    }
    let Some(len) = rows.checked_mul(n) else {
        candle_core::bail!("decode-matmul: {rows} rows × {n} outputs overflow usize")
    };
    // Zero rows, outputs or columns: nothing to dot (y is empty or all zeros).
    if len == 0 || k == 0 {
        return Ok(vec![0f32; len]);
    }
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
    Ok(y)
}

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

/// [`dot4_portable`] with 16-lane AVX-512 registers over the `N` real rows only (at
/// batch 1 the weights stream past one row), two accumulators per row (32 weights a
/// step) and, for one row, four (64 a step), so at least four FMA chains are in flight.
///
/// # Safety
/// The CPU must support AVX-512F. (Every row of `xs` is at least as long as `w`; the
/// loads are within `w.len()`.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512<const N: usize>(w: &[f32], xs: [&[f32]; 4], out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(N <= 4 && xs.iter().all(|x| x.len() >= w.len()) && out.len() >= N);
    // Registers per row a step: 4 for one row, 2 otherwise.
    const fn lanes(n: usize) -> usize {
        if n == 1 {
            4
        } else {
            2
        }
    }
    let per = lanes(N);
    let k = w.len();
    let step = 16 * per;
    let body = k - k % step;
    let mut acc = [[_mm512_setzero_ps(); 4]; N];
    let wp = w.as_ptr();
    let mut c = 0;
    while c < body {
        for u in 0..per {
            // SAFETY: c + 16·(u + 1) ≤ c + step ≤ body ≤ k = w.len() ≤ every row's length
            // (asserted above).
            unsafe {
                let wv = _mm512_loadu_ps(wp.add(c + 16 * u));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xs[r].as_ptr().add(c + 16 * u));
                    a[u] = _mm512_fmadd_ps(xv, wv, a[u]);
                }
            }
        }
        c += step;
    }
    for (r, a) in acc.iter().enumerate() {
        let tail: f32 = w[body..]
            .iter()
            .zip(&xs[r][body..k])
            .map(|(a, b)| a * b)
            .sum();
        let sum = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        out[r] = _mm512_reduce_add_ps(sum) + tail;
    }
}

/// out[r] = w · x_r for the (up to four) rows in `xs`; `n` of them are real.
fn dot4(w: &[f32], xs: [&[f32]; 4], n: usize, out: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        Simd::Avx512(_) => {
            // SAFETY: an `Avx512` exists: the CPU reports AVX-512F.
            return unsafe {
                match n {
                    1 => dot_avx512::<1>(w, xs, out),
                    2 => dot_avx512::<2>(w, xs, out),
                    3 => dot_avx512::<3>(w, xs, out),
                    _ => dot_avx512::<4>(w, xs, out),
                }
            };
        }
        // SAFETY: an `Avx2Fma` exists: the CPU reports AVX2 and FMA.
        Simd::Avx2(_) => return unsafe { dot4_avx2(w, xs, n, out) },
        Simd::Portable => {}
    }
    let _ = simd;
    dot4_portable(w, xs, n, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every build this CPU runs gives the f64 product, for 1 to 9 rows and widths with
    /// and without a tail past the vector body.
    #[test]
    fn every_build_matches_the_exact_product() {
        for (rows, n, k) in [(1, 70, 576), (3, 65, 100), (4, 9, 31), (9, 64, 1536)] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                .collect();
            for simd in Simd::available() {
                let y = matmul_t_on(simd, &x, &w, (rows, n, k)).unwrap();
                for r in 0..rows {
                    for j in 0..n {
                        let e: f64 = (0..k)
                            .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                            .sum();
                        let g = y[r * n + j] as f64;
                        assert!(
                            (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                            "{:?} ({rows}, {n}, {k}) [{r}][{j}]: {g} vs {e}",
                            simd.isa()
                        );
                    }
                }
            }
        }
    }
}
