//! The CPU kernel of the packed matmul: y = x·Wᵀ for the engine's batches (tens to
//! hundreds of rows, [`crate::packed_matmul`]) over W packed once into panels of 16
//! output columns, k-major: panel p holds W[16p + c][k] at `(p·K + k)·16 + c`. The
//! kernel keeps an R × 16 block of y in registers and, for each k, loads the panel's 16
//! weights once and broadcasts one x element per row:
//!
//!   y[r][16p + c] = Σ_k x[r][k] · W[16p + c][k]
//!
//! so every weight loaded feeds R rows, and x (rows × K) stays in cache while the
//! panels stream. R is 6 with AVX2 (two 8-lane registers a row: 12 of the 16
//! registers) and 12 with AVX-512 (one 16-lane register a row: 12 of the 32). Panels are split across threads; each task writes its own panel's
//! columns of y through [`PanelOut`], which hands out no reference to y.

use std::marker::PhantomData;
use std::sync::Arc;

use rayon::prelude::*;

use super::simd::Simd;
use crate::error::{Error, Result};

/// Output columns per panel.
const NR: usize = 16;
/// Rows per register block of each build.
fn rows_per_block(simd: Simd) -> usize {
    match simd {
        Simd::Avx512(_) => 12,
        Simd::Avx2(_) | Simd::Portable => 6,
    }
}

/// A weight matrix W (N × K) packed into 16-column panels (columns past N are zero).
#[derive(Clone, Debug)]
pub(crate) struct Panels {
    n: usize,
    k: usize,
    data: Arc<Vec<f32>>,
}

impl Panels {
    /// Packs w (N × K, row-major); an error when w does not hold N rows of K or the
    /// panels overflow `usize`.
    pub(crate) fn pack(src: &[f32], n: usize, k: usize) -> Result<Self> {
        Self::fill(src, n, k, "a weight", |p, panel| {
            for c in 0..NR.min(n - p * NR) {
                let row = &src[(p * NR + c) * k..(p * NR + c + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + c] = v;
                }
            }
        })
    }

    /// Packs the transpose of `src` (K × N, row-major), so that the product is x·src:
    /// panel p takes row k's 16 values from column 16p, a contiguous read. An error
    /// when src does not hold K rows of N or the panels overflow `usize`.
    pub(crate) fn pack_transposed(src: &[f32], k: usize, n: usize) -> Result<Self> {
        Self::fill(src, n, k, "a transposed matrix", |p, panel| {
            let cols = NR.min(n - p * NR);
            for (kk, dst) in panel.chunks_exact_mut(NR).enumerate() {
                dst[..cols].copy_from_slice(&src[kk * n + p * NR..kk * n + p * NR + cols]);
            }
        })
    }

    /// The panels of an N-column, K-deep product, each (its index, its k·16 values)
    /// filled by `panel` in parallel; an error when `src` does not hold N·K values or
    /// the panels overflow `usize`.
    fn fill(
        src: &[f32],
        n: usize,
        k: usize,
        what: &str,
        panel: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Result<Self> {
        if n.checked_mul(k) != Some(src.len()) {
            return Err(Error::invalid(format!(
                "packed matmul: {what} of {} values is not {n} × {k}",
                src.len()
            )));
        }
        let panels = n.div_ceil(NR);
        let Some(len) = panels.checked_mul(k).and_then(|x| x.checked_mul(NR)) else {
            return Err(Error::invalid(format!(
                "packed matmul: {what} of {n} × {k} overflows the packed panels"
            )));
        };
        let mut data = vec![0f32; len];
        // Zero rows or columns: no panel holds a value (and chunks of zero would panic).
        if len > 0 {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, values)| panel(p, values));
        }
        Ok(Panels {
            n,
            k,
            data: Arc::new(data),
        })
    }

    /// Output width N.
    pub(crate) fn out_dim(&self) -> usize {
        self.n
    }
}

/// The output y (rows × n) of one product, written by tasks that each own one panel's
/// columns. It holds y's exclusive borrow and hands out no reference to it; its one
/// accessor, [`PanelOut::block`], writes a register block of one panel's columns.
struct PanelOut<'a> {
    ptr: *mut f32,
    rows: usize,
    n: usize,
    _y: PhantomData<&'a mut [f32]>,
}

// SAFETY: a `PanelOut` is an exclusive borrow of `[f32]` that only `PanelOut::block`
// writes through.
unsafe impl Send for PanelOut<'_> {}
// SAFETY: shared across threads, a `PanelOut` is written only by `PanelOut::block`,
// whose contract makes concurrent calls write disjoint blocks.
unsafe impl Sync for PanelOut<'_> {}

impl<'a> PanelOut<'a> {
    /// y, `rows × n` values (an error otherwise).
    fn new(y: &'a mut [f32], rows: usize, n: usize) -> candle_core::Result<Self> {
        if rows.checked_mul(n) != Some(y.len()) {
            candle_core::bail!(
                "packed-matmul: an output of {} values for {rows} × {n}",
                y.len()
            )
        }
        Ok(PanelOut {
            ptr: y.as_mut_ptr(),
            rows,
            n,
            _y: PhantomData,
        })
    }

    /// y[r0 + r][16p + c] = Σ_k x[r][k] · panel[k][c] for r < R and the panel's columns
    /// inside y (c < min(16, n − 16p)), where `x` holds the R rows (R·k values) and
    /// `panel` the panel's k·16 weights. Panics when the block does not lie inside y or
    /// x or the panel is short (a few comparisons per block, outside the k loop).
    ///
    /// # Safety
    /// No other call may write rows r0..r0 + R of panel p while this one runs:
    /// concurrent calls write different panels or rows.
    #[inline(always)]
    unsafe fn block<const R: usize>(
        &self,
        simd: Simd,
        (x, panel, k): (&[f32], &[f32], usize),
        r0: usize,
        p: usize,
    ) {
        assert!(
            r0 < self.rows
                && R <= self.rows - r0
                && p < self.n.div_ceil(NR)
                && k.checked_mul(R).is_some_and(|len| len <= x.len())
                && k.checked_mul(NR).is_some_and(|len| len <= panel.len()),
            "packed-matmul: block of {R} rows from {r0}, panel {p} outside {} × {}",
            self.rows,
            self.n
        );
        let cols = NR.min(self.n - p * NR);
        // SAFETY: row r0, column 16p lies inside y (r0 < rows, 16p < n: checked above).
        let y = unsafe { self.ptr.add(r0 * self.n + p * NR) };
        // SAFETY: x holds R rows of k values (stride k) and the panel k·16 weights
        // (checked above); the `cols` values from y + r·n, r < R, are row r0 + r's
        // columns 16p.. of panel p inside y, which the caller lets this call alone
        // write; y is valid for writes while `self` holds its borrow.
        unsafe { block::<R>(simd, x, k, panel, k, y, self.n, cols) }
    }
}

/// y[r][c] = Σ_k x[r][k] · panel[k][c] for the `R` rows at `x` (leading dimension
/// `ldx`) and the first `cols` of the panel's 16 columns, into `y` (leading `ldy`).
///
/// # Safety
/// `cols ≤ 16`; `y` must be valid for writes of `cols` values at `y + r·ldy` for every
/// r < R, and nothing else may read or write those values during the call. (x and the
/// panel are read with checked indexing.)
#[inline(always)]
unsafe fn block_portable<const R: usize>(
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    let mut acc = [[0f32; NR]; R];
    for kk in 0..k {
        let w = &panel[kk * NR..kk * NR + NR];
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[r * ldx + kk];
            for c in 0..NR {
                a[c] += xv * w[c];
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: the caller makes y + r·ldy valid for `cols ≤ 16` writes this call
        // alone makes; `a` holds 16 values.
        unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), y.add(r * ldy), cols) };
    }
}

/// [`block_portable`] with AVX2 and FMA: the 16 weights of each k in two registers, one
/// x element broadcast per row.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` must hold R rows of `k` values at stride
/// `ldx` (`(R − 1)·ldx + k ≤ x.len()`) and `panel` at least k·16 values; `y` and `cols`
/// as for [`block_portable`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const R: usize>(
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= (R - 1) * ldx + k && panel.len() >= k * NR && cols <= NR);
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    for kk in 0..k {
        // SAFETY: kk < k, the panel holds k·16 values and x R rows of k at stride ldx
        // (the caller's contract).
        unsafe {
            let w0 = _mm256_loadu_ps(wp.add(kk * NR));
            let w1 = _mm256_loadu_ps(wp.add(kk * NR + 8));
            for r in 0..R {
                let xb = _mm256_broadcast_ss(&*xp.add(r * ldx + kk));
                lo[r] = _mm256_fmadd_ps(xb, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(xb, w1, hi[r]);
            }
        }
    }
    for r in 0..R {
        // SAFETY: the caller makes y + r·ldy valid for `cols ≤ 16` writes this call
        // alone makes; the full-width store writes exactly 16 when cols = 16.
        unsafe {
            let dst = y.add(r * ldy);
            if cols == NR {
                _mm256_storeu_ps(dst, lo[r]);
                _mm256_storeu_ps(dst.add(8), hi[r]);
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo[r]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi[r]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
            }
        }
    }
}

/// [`block_portable`] with AVX-512F: the 16 weights of each k in one register, one x
/// element broadcast per row; a short last panel stored through a lane mask.
///
/// # Safety
/// The CPU must support AVX-512F; `x`, `panel`, `y` and `cols` as for [`block_avx2`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const R: usize>(
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= (R - 1) * ldx + k && panel.len() >= k * NR && cols <= NR);
    let mut acc = [_mm512_setzero_ps(); R];
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    for kk in 0..k {
        // SAFETY: kk < k, the panel holds k·16 values and x R rows of k at stride ldx
        // (the caller's contract).
        unsafe {
            let w = _mm512_loadu_ps(wp.add(kk * NR));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(*xp.add(r * ldx + kk)), w, *a);
            }
        }
    }
    // Lanes 0..cols (cols ≤ 16).
    let mask: __mmask16 = if cols >= NR { !0 } else { (1u16 << cols) - 1 };
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: the caller makes y + r·ldy valid for `cols ≤ 16` writes this call
        // alone makes; the masked store writes lanes 0..cols only.
        unsafe { _mm512_mask_storeu_ps(y.add(r * ldy), mask, *a) };
    }
}

/// One register block of `R` rows, on the build `simd` names.
///
/// # Safety
/// As for [`block_avx2`] (the CPU's support is the token `simd` holds).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<const R: usize>(
    simd: Simd,
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: *mut f32,
    ldy: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match simd {
        // SAFETY: an `Avx512` exists, so the CPU has AVX-512F; x, the panel and y meet
        // the caller's contract, which is block_avx512's.
        Simd::Avx512(_) => return unsafe { block_avx512::<R>(x, ldx, panel, k, y, ldy, cols) },
        // SAFETY: an `Avx2Fma` exists, so the CPU has AVX2 and FMA; x, the panel and y
        // meet the caller's contract, which is block_avx2's.
        Simd::Avx2(_) => return unsafe { block_avx2::<R>(x, ldx, panel, k, y, ldy, cols) },
        Simd::Portable => {}
    }
    let _ = simd;
    // SAFETY: y and cols meet the caller's contract, which includes block_portable's.
    unsafe { block_portable::<R>(x, ldx, panel, k, y, ldy, cols) }
}

/// y_m = x·W_mᵀ for each matrix m (all of width K) over `rows` rows of x: every
/// matrix's panels split across threads together, on the build [`Simd::detect`] picks.
pub(crate) fn multiply(
    mats: &[&Panels],
    x: &[f32],
    rows: usize,
    k: usize,
) -> candle_core::Result<Vec<Vec<f32>>> {
    multiply_on(Simd::detect(), mats, x, rows, k)
}

/// [`multiply`] on the build `simd`.
fn multiply_on(
    simd: Simd,
    mats: &[&Panels],
    x: &[f32],
    rows: usize,
    k: usize,
) -> candle_core::Result<Vec<Vec<f32>>> {
    if let Some(m) = mats.iter().find(|m| m.k != k) {
        candle_core::bail!("packed-matmul: x has {k} columns, W has {}", m.k)
    }
    if rows.checked_mul(k) != Some(x.len()) {
        candle_core::bail!(
            "packed-matmul: x holds {} values, not {rows} rows of {k}",
            x.len()
        )
    }
    let mr = rows_per_block(simd);
    let mut ys = Vec::with_capacity(mats.len());
    for m in mats {
        let Some(len) = rows.checked_mul(m.n) else {
            candle_core::bail!(
                "packed-matmul: {rows} rows × {} outputs overflow usize",
                m.n
            )
        };
        ys.push(vec![0f32; len]);
    }
    let outs = ys
        .iter_mut()
        .zip(mats)
        .map(|(y, m)| PanelOut::new(y, rows, m.n))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tasks: Vec<(usize, usize)> = mats
        .iter()
        .enumerate()
        .flat_map(|(i, m)| (0..m.n.div_ceil(NR)).map(move |p| (i, p)))
        .collect();
    tasks.into_par_iter().with_min_len(4).for_each(|(i, p)| {
        let (m, out) = (mats[i], &outs[i]);
        let panel = &m.data[p * k * NR..(p + 1) * k * NR];
        let mut r = 0;
        while r < rows {
            let xs = (&x[r * k..], panel, k);
            let take = mr.min(rows - r);
            // SAFETY: task (i, p) alone writes panel p of output i: `tasks` lists each
            // (matrix, panel) once, and this task's blocks are different rows.
            unsafe {
                match take {
                    12 => out.block::<12>(simd, xs, r, p),
                    11 => out.block::<11>(simd, xs, r, p),
                    10 => out.block::<10>(simd, xs, r, p),
                    9 => out.block::<9>(simd, xs, r, p),
                    8 => out.block::<8>(simd, xs, r, p),
                    7 => out.block::<7>(simd, xs, r, p),
                    6 => out.block::<6>(simd, xs, r, p),
                    5 => out.block::<5>(simd, xs, r, p),
                    4 => out.block::<4>(simd, xs, r, p),
                    3 => out.block::<3>(simd, xs, r, p),
                    2 => out.block::<2>(simd, xs, r, p),
                    _ => out.block::<1>(simd, xs, r, p),
                }
            }
            r += take;
        }
    });
    drop(outs);
    Ok(ys)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x shorter or longer than rows × K is refused before any block runs.
    #[test]
    fn refuses_x_of_the_wrong_length() {
        let p = Panels::pack(&[1f32; 20 * 8], 20, 8).unwrap();
        let x = vec![1f32; 3 * 8];
        assert_eq!(multiply(&[&p], &x, 3, 8).unwrap()[0], vec![8f32; 3 * 20]);
        assert!(multiply(&[&p], &x[1..], 3, 8).is_err());
        assert!(multiply(&[&p], &x, 4, 8).is_err());
        assert!(multiply(&[&p], &x, usize::MAX, 8).is_err());
    }

    /// Every build this CPU runs gives the portable build's product (the same sums in
    /// another rounding: FMA), for row counts across every block size and a width that
    /// ends in a short panel.
    #[test]
    fn every_build_matches_the_portable_one() {
        let (n, k) = (40, 67);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let p = Panels::pack(&w, n, k).unwrap();
        let builds = Simd::available();
        assert!(!builds.is_empty());
        for rows in [1, 5, 6, 7, 12, 13, 25, 64] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0)
                .collect();
            let want: Vec<f64> = (0..rows * n)
                .map(|i| {
                    let (r, c) = (i / n, i % n);
                    (0..k)
                        .map(|j| x[r * k + j] as f64 * w[c * k + j] as f64)
                        .sum()
                })
                .collect();
            for &simd in &builds {
                let got = multiply_on(simd, &[&p], &x, rows, k).unwrap().remove(0);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{:?}, {rows} rows: {g} vs {e}",
                        simd.isa()
                    );
                }
            }
        }
    }

    /// Packing a matrix's transpose gives the panels of packing the transposed copy.
    #[test]
    fn packing_the_transpose_is_packing_the_transposed_copy() {
        let (k, n) = (7, 37);
        let src: Vec<f32> = (0..k * n).map(|i| i as f32).collect();
        let mut t = vec![0f32; n * k];
        for i in 0..k {
            for j in 0..n {
                t[j * k + i] = src[i * n + j];
            }
        }
        let a = Panels::pack_transposed(&src, k, n).unwrap();
        let b = Panels::pack(&t, n, k).unwrap();
        assert_eq!((a.n, a.k), (b.n, b.k));
        assert_eq!(a.data, b.data);
        assert!(Panels::pack_transposed(&src[1..], k, n).is_err());
    }

    /// A weight that does not hold N × K values is refused.
    #[test]
    fn refuses_a_weight_of_the_wrong_length() {
        assert!(Panels::pack(&[1f32; 20 * 8], 20, 8).is_ok());
        assert!(Panels::pack(&[1f32; 20 * 8 - 1], 20, 8).is_err());
        assert!(Panels::pack(&[1f32; 20 * 8], usize::MAX, 8).is_err());
    }
}
