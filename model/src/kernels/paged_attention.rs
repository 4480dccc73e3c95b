//! The CPU kernel of paged attention (f32): the queries of one engine step over the
//! paged KV cache ([`crate::engine::attention`]). Query i belongs to sequence s(i) and
//! sees its first `visible(i)` tokens; per query head h (KV head h / (H / KV)), scale
//! s = 1/√D:
//!
//!   o_i = Σ_j softmax_j(s · q_i · k_j) v_j,   j < visible(i), k_j and v_j read at the
//!   slot of token j of s(i)
//!
//! Each key row is read once for the query heads that share it, and the (query, KV
//! head) pairs are split across threads, each writing its own block of the output.
//! Head widths of 16, 32, 64 and 128 run on an AVX2 kernel that reads keys and values
//! through raw pointers; [`forward`] first puts every slot of the layout inside the
//! pools ([`PagedLayout::check`]) and every buffer at its length.

use rayon::prelude::*;

use super::simd::{exp_in_place, Avx2Fma};
use crate::engine::attention::PagedLayout;
use crate::error::{Error, Result};
use crate::ops::attention::Heads;

/// The query and KV row widths H·D and KV·D of `heads`; an error when the query heads
/// do not share the KV heads evenly or a width overflows.
pub(crate) fn widths(heads: Heads) -> Result<(usize, usize)> {
    let Heads { query, kv, dim } = heads;
    if kv == 0 || !query.is_multiple_of(kv) {
        return Err(Error::invalid(format!(
            "paged attention: {query} query heads cannot share {kv} KV heads"
        )));
    }
    match (query.checked_mul(dim), kv.checked_mul(dim)) {
        (Some(qw), Some(kw)) => Ok((qw, kw)),
        _ => Err(Error::invalid(format!(
            "paged attention: {query} heads of width {dim} overflow a row"
        ))),
    }
}

/// out (N, H·D) of the queries q (N, H·D) over the pools k and v (`pool` slots of
/// KV·D each), query i seeing the tokens `layout` gives it. An error, and nothing read,
/// when the query heads do not share the KV heads evenly, q does not hold one row per
/// query of the layout, k or v does not hold `pool` rows, or a slot of the layout lies
/// outside the pools.
pub(crate) fn forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pool: usize,
    layout: &PagedLayout,
    heads: Heads,
    window: Option<usize>,
) -> candle_core::Result<Vec<f32>> {
    let msg = |e: Error| candle_core::Error::Msg(e.to_string());
    let (qw, kw) = widths(heads).map_err(msg)?;
    let n = layout.queries.len();
    let holds = |len: usize, rows: usize, width: usize| rows.checked_mul(width) == Some(len);
    if !holds(q.len(), n, qw) || !holds(k.len(), pool, kw) || !holds(v.len(), pool, kw) {
        candle_core::bail!(
            "paged-attention: q holds {} values for {n} queries of {qw}, k {} and v {} \
             for {pool} slots of {kw}",
            q.len(),
            k.len(),
            v.len()
        )
    }
    // Every slot inside the pools: with k and v of `pool` rows of KV·D each, the
    // contract of the vector kernel's reads.
    layout.check(pool).map_err(msg)?;
    let gd = heads.query / heads.kv * heads.dim;
    let mut out = vec![0f32; q.len()];
    // No query or zero-width heads: nothing to attend (and chunks of zero panic).
    if gd == 0 || out.is_empty() {
        return Ok(out);
    }
    let simd = Avx2Fma::detect();
    // The vector kernel's head widths: 16, 32, 64, 128, 256 (Gemma 3).
    let chunks = if heads.dim.is_multiple_of(8) {
        heads.dim / 8
    } else {
        0
    };
    // Task (i, kh) writes query i's heads of KV head kh: one contiguous gd block.
    out.par_chunks_mut(gd)
        .enumerate()
        .for_each_init(Vec::new, |p, (task, o)| {
            let (i, kh) = (task / heads.kv, task % heads.kv);
            let (s, vis) = layout.queries[i];
            let first = window.map_or(0, |w| (vis as usize).saturating_sub(w));
            let slots = &layout.slots[s as usize][first..vis as usize];
            let qi = &q[i * qw + kh * gd..][..gd];
            #[cfg(target_arch = "x86_64")]
            if let Some(_cpu) = simd {
                // SAFETY: an `Avx2Fma` exists, so the CPU has AVX2 and FMA; `chunks`
                // picks CH = dim / 8; kh < kv; qi and o hold gd = groups·dim values;
                // every slot is below `pool` (`PagedLayout::check` above) and k and v
                // hold `pool` rows of KV·D (their lengths, checked above).
                unsafe {
                    match chunks {
                        2 => return attend_avx2::<2>(o, qi, k, v, slots, kh, heads, p),
                        4 => return attend_avx2::<4>(o, qi, k, v, slots, kh, heads, p),
                        8 => return attend_avx2::<8>(o, qi, k, v, slots, kh, heads, p),
                        16 => return attend_avx2::<16>(o, qi, k, v, slots, kh, heads, p),
                        32 => return attend_avx2::<32>(o, qi, k, v, slots, kh, heads, p),
                        _ => {}
                    }
                }
            }
            let _ = (simd, chunks);
            attend(o, qi, k, v, slots, kh, heads, p)
        });
    Ok(out)
}

/// Σ a_i b_i over eight independent lanes (vectorised without reassociation).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = a[chunks * 8..]
        .iter()
        .zip(&b[chunks * 8..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// out (groups·D) = the attention of the `groups` query heads `q` (groups·D) sharing KV
/// head `kh`, over the keys at `slots`. `p` is scratch.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    kh: usize,
    heads: Heads,
    p: &mut Vec<f32>,
) {
    let (d, kw) = (heads.dim, heads.kv * heads.dim);
    let groups = heads.query / heads.kv;
    let n = slots.len();
    let scale = 1.0 / (d as f32).sqrt();
    p.clear();
    p.resize(groups * n, 0.0);
    for (j, &s) in slots.iter().enumerate() {
        let kr = &k[s as usize * kw + kh * d..][..d];
        for g in 0..groups {
            p[g * n + j] = dot(&q[g * d..(g + 1) * d], kr) * scale;
        }
    }
    softmax_rows(p, groups, n);
    out.fill(0.0);
    for (j, &s) in slots.iter().enumerate() {
        let vr = &v[s as usize * kw + kh * d..][..d];
        for g in 0..groups {
            let w = p[g * n + j];
            let o = &mut out[g * d..(g + 1) * d];
            for (o, &x) in o.iter_mut().zip(vr) {
                *o += w * x;
            }
        }
    }
}

/// [`attend`] with AVX2 and FMA for head widths of `CH` · 8: four keys' scores at a
/// time with the query in registers (one horizontal reduction per four keys), and
/// each head's output accumulated in registers over the keys.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `heads.dim` must be `CH · 8` and `kh < heads.kv`;
/// `q` and `out` must hold the `groups · dim` values of the query heads of KV head
/// `kh`; and every slot s of `slots` must lie inside both pools:
/// `(s + 1) · kv · dim ≤ k.len()` and `≤ v.len()`. (The keys and values are read through
/// raw pointers; everything else with checked indexing.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2<const CH: usize>(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    slots: &[u32],
    kh: usize,
    heads: Heads,
    p: &mut Vec<f32>,
) {
    use std::arch::x86_64::*;
    let d = CH * 8;
    debug_assert_eq!(heads.dim, d);
    let kw = heads.kv * d;
    let groups = heads.query / heads.kv;
    let n = slots.len();
    let scale = 1.0 / (d as f32).sqrt();
    p.clear();
    p.resize(groups * n, 0.0);
    debug_assert!(slots
        .iter()
        .all(|&s| (s as usize + 1) * kw <= k.len().min(v.len())));
    debug_assert!(kh < heads.kv && q.len() >= groups * d && out.len() >= groups * d);
    // SAFETY: the caller's contract: every slot's row lies inside k and v, and its kh-th
    // d values with it (kh < kv); q and out hold groups·d values; p holds groups·n
    // (resized above), of which each store writes j..j + 4 ≤ n or j < n of row g.
    unsafe {
        let row = |base: &[f32], j: usize| base.as_ptr().add(slots[j] as usize * kw + kh * d);
        for g in 0..groups {
            let mut qv = [_mm256_setzero_ps(); CH];
            for (c, x) in qv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(q.as_ptr().add(g * d + c * 8));
            }
            let pg = p.as_mut_ptr().add(g * n);
            let mut j = 0;
            while j + 4 <= n {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (t, a) in acc.iter_mut().enumerate() {
                    let kr = row(k, j + t);
                    for (c, x) in qv.iter().enumerate() {
                        *a = _mm256_fmadd_ps(*x, _mm256_loadu_ps(kr.add(c * 8)), *a);
                    }
                }
                let h = _mm256_hadd_ps(
                    _mm256_hadd_ps(acc[0], acc[1]),
                    _mm256_hadd_ps(acc[2], acc[3]),
                );
                let sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
                _mm_storeu_ps(pg.add(j), _mm_mul_ps(sums, _mm_set1_ps(scale)));
                j += 4;
            }
            for j in j..n {
                let kr = std::slice::from_raw_parts(row(k, j), d);
                *pg.add(j) = dot(&q[g * d..(g + 1) * d], kr) * scale;
            }
        }
        softmax_rows(p, groups, n);
        for g in 0..groups {
            let mut acc = [_mm256_setzero_ps(); CH];
            for j in 0..n {
                let w = _mm256_set1_ps(p[g * n + j]);
                let vr = row(v, j);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr.add(c * 8)), *a);
                }
            }
            for (c, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(g * d + c * 8), *a);
            }
        }
    }
}

/// Softmax of each of the `rows` rows of `n` scores in `p`, in place: the max and the
/// sum over eight independent lanes (a single running max or sum is a chain of
/// dependent operations the CPU cannot overlap), the exponentials by [`exp_in_place`].
#[inline(always)]
fn softmax_rows(p: &mut [f32], rows: usize, n: usize) {
    for g in 0..rows {
        let row = &mut p[g * n..(g + 1) * n];
        let mx = lanes(row, f32::NEG_INFINITY, f32::max)
            .into_iter()
            .fold(f32::NEG_INFINITY, f32::max);
        for x in row.iter_mut() {
            *x -= mx;
        }
        exp_in_place(row);
        let inv = 1.0 / lanes(row, 0.0, |a, b| a + b).iter().sum::<f32>();
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// `f` folded over `xs` in eight independent lanes (lane l takes xs[l], xs[l + 8], …).
#[inline(always)]
fn lanes(xs: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 8] {
    let mut acc = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] = f(acc[l], x);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Buffers that do not hold their rows, or a pool larger than k and v, are refused
    /// before any slot is read.
    #[test]
    fn buffers_of_the_wrong_length_are_refused() {
        let heads = Heads {
            query: 2,
            kv: 1,
            dim: 8,
        };
        let layout = PagedLayout {
            queries: vec![(0, 2)],
            slots: vec![vec![0, 3]],
        };
        let (q, kv) = (vec![1f32; 16], vec![1f32; 4 * 8]);
        let out = forward(&q, &kv, &kv, 4, &layout, heads, None).unwrap();
        assert!(out.iter().all(|&x| (x - 1.0).abs() < 1e-6), "{out:?}");
        assert!(forward(&q[1..], &kv, &kv, 4, &layout, heads, None).is_err());
        assert!(forward(&q, &kv[..24], &kv, 4, &layout, heads, None).is_err());
        assert!(forward(&q, &kv, &kv[..24], 4, &layout, heads, None).is_err());
        assert!(forward(&q, &kv, &kv, 5, &layout, heads, None).is_err());
        assert!(forward(&q, &kv, &kv, usize::MAX, &layout, heads, None).is_err());
    }
}
