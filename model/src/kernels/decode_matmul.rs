//! The CPU kernel of the decode matmul: y = x·Wᵀ for the 1–16 activation rows of a
//! decode step ([`crate::decode_matmul`]), where the work is reading the weights. Each
//! weight row is streamed once and dotted with every activation row while it is in L1;
//! the weight rows are split across threads. The only `unsafe` is the call of the
//! AVX2 + FMA build of the dot product, made with an [`Avx2Fma`] token.

use rayon::prelude::*;

use super::simd::Avx2Fma;

/// y (rows × n) = x (rows × k) · wᵀ with w (n × k), both row-major. An error, and
/// nothing read, when x or w does not hold its rows.
pub(crate) fn matmul_t(
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
