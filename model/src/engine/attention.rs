//! Attention of one engine step's tokens over the paged KV cache (inference only).
//!
//! A step feeds a few tokens of many sequences at once: one token of each decoding
//! sequence, a chunk of a prompt being prefilled. Query i belongs to sequence s(i) and
//! sees the first `visible(i)` tokens of it (itself included: its key was written
//! before the call), wherever their pages lie. Per query head h (KV head h / (H / KV)),
//! scale s = 1/√D:
//!
//!   o_i = Σ_j softmax_j(s · q_i · k_j) v_j,   j < visible(i), k_j and v_j read at the
//!   slot of token j of s(i)
//!
//! The CPU kernel reads each key row once for the query heads that share it and splits
//! the (query, KV head) pairs across threads; other devices and dtypes gather each
//! sequence's keys and run the same formula from candle ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::ops::attention::Heads;
use crate::simd::{exp_in_place, Avx2Fma};
use crate::transformer::MASKED;

/// Which cached tokens each query of a step sees.
#[derive(Clone, Debug, Default)]
pub struct PagedLayout {
    /// Per query token: (its sequence, the number of that sequence's tokens it sees).
    pub queries: Vec<(u32, u32)>,
    /// Per sequence: the cache slot of each of its tokens (up to its last query).
    pub slots: Vec<Vec<u32>>,
}

impl PagedLayout {
    /// Checks that every query names a sequence and sees at least one of its tokens.
    pub fn check(&self, slots_in_pool: usize) -> Result<()> {
        for (i, &(s, n)) in self.queries.iter().enumerate() {
            let seq = self.slots.get(s as usize).ok_or_else(|| {
                Error::invalid(format!("paged attention: query {i} names sequence {s}"))
            })?;
            if n == 0 || n as usize > seq.len() {
                return Err(Error::invalid(format!(
                    "paged attention: query {i} sees {n} of its sequence's {} tokens",
                    seq.len()
                )));
            }
        }
        if let Some(bad) = self
            .slots
            .iter()
            .flatten()
            .find(|&&x| x as usize >= slots_in_pool)
        {
            return Err(Error::invalid(format!(
                "paged attention: slot {bad} outside a pool of {slots_in_pool}"
            )));
        }
        Ok(())
    }
}

/// The query and KV row widths H·D and KV·D of `heads`; an error when the query heads
/// do not share the KV heads evenly or a width overflows.
fn widths(heads: Heads) -> Result<(usize, usize)> {
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

/// q (N, H·D) over the pools k, v (slots, KV·D) → (N, H·D).
pub fn paged_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &Arc<PagedLayout>,
    heads: Heads,
) -> Result<Tensor> {
    widths(heads)?;
    if layout.queries.len() != q.dim(0)? {
        return Err(Error::invalid(format!(
            "paged attention: {} queries for {} rows",
            layout.queries.len(),
            q.dim(0)?
        )));
    }
    if q.device().is_cpu() && q.dtype() == DType::F32 && k.dtype() == DType::F32 {
        return Ok(q.contiguous()?.apply_op3_no_bwd(
            k,
            v,
            &PagedAttention {
                layout: layout.clone(),
                heads,
            },
        )?);
    }
    composed(q, k, v, layout, heads)
}

/// The same attention from candle ops: each sequence's keys gathered, a mask for the
/// queries that see fewer of them (any device; scores in f32 for half precisions).
pub(crate) fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &PagedLayout,
    heads: Heads,
) -> Result<Tensor> {
    let Heads { query: h, kv, dim } = heads;
    let groups = h / kv;
    let dtype = q.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut outs = Vec::new();
    let mut i = 0;
    while i < layout.queries.len() {
        // The run of consecutive queries of one sequence.
        let s = layout.queries[i].0;
        let n = layout.queries[i..]
            .iter()
            .take_while(|(x, _)| *x == s)
            .count();
        let run = &layout.queries[i..i + n];
        let width = run.iter().map(|&(_, vis)| vis as usize).max().unwrap_or(0);
        let idx = Tensor::from_slice(&layout.slots[s as usize][..width], width, q.device())?;
        let kh = k
            .index_select(&idx, 0)?
            .reshape((width, kv, dim))?
            .transpose(0, 1)?;
        let vh = v
            .index_select(&idx, 0)?
            .reshape((width, kv, dim))?
            .transpose(0, 1)?;
        let mut mask = vec![0f32; n * width];
        for (r, &(_, vis)) in run.iter().enumerate() {
            mask[r * width + vis as usize..(r + 1) * width].fill(MASKED as f32);
        }
        let mask = Tensor::from_vec(mask, (n, width), q.device())?.to_dtype(compute)?;
        // (KV, groups·n, D): query heads sharing a KV head stacked along the query axis.
        let qh = q
            .narrow(0, i, n)?
            .reshape((n, h, dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((kv, groups * n, dim))?;
        let scores = qh
            .to_dtype(compute)?
            .matmul(&kh.contiguous()?.to_dtype(compute)?.t()?)?
            .affine(1.0 / (dim as f64).sqrt(), 0.0)?
            .reshape((h, n, width))?
            .broadcast_add(&mask)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
        let out = probs
            .reshape((kv, groups * n, width))?
            .matmul(&vh.contiguous()?)?;
        outs.push(
            out.reshape((h, n, dim))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((n, h * dim))?,
        );
        i += n;
    }
    Ok(Tensor::cat(&outs, 0)?)
}

struct PagedAttention {
    layout: Arc<PagedLayout>,
    heads: Heads,
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

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use crate::cpu_storage::contiguous;
        let q = contiguous::<f32>(s1, l1, self.name())?;
        let k = contiguous::<f32>(s2, l2, self.name())?;
        let v = contiguous::<f32>(s3, l3, self.name())?;
        let heads = self.heads;
        let (qw, kw) = widths(heads).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (n, q_width) = l1.shape().dims2()?;
        let (slots_in_pool, k_width) = l2.shape().dims2()?;
        if q_width != qw || k_width != kw || l3.shape() != l2.shape() {
            candle_core::bail!(
                "paged-attention: q {:?}, k {:?}, v {:?} do not fit {heads:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        if self.layout.queries.len() != n {
            candle_core::bail!(
                "paged-attention: {} queries in the layout for {n} rows of q",
                self.layout.queries.len()
            )
        }
        // Every slot inside the pools: with k and v of (slots_in_pool, KV·D) each, the
        // contract of the vector kernel's reads.
        self.layout
            .check(slots_in_pool)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let gd = heads.query / heads.kv * heads.dim;
        let mut out = vec![0f32; q.len()];
        // No query or zero-width heads: nothing to attend (and chunks of zero panic).
        if gd == 0 || out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((n, qw))));
        }
        let simd = Avx2Fma::detect();
        // The vector kernel's head widths: 16, 32, 64, 128.
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
                let (s, vis) = self.layout.queries[i];
                let slots = &self.layout.slots[s as usize][..vis as usize];
                let qi = &q[i * qw + kh * gd..][..gd];
                #[cfg(target_arch = "x86_64")]
                if let Some(_cpu) = simd {
                    // SAFETY: an `Avx2Fma` exists, so the CPU has AVX2 and FMA; `chunks`
                    // picks CH = dim / 8; kh < kv; qi and o hold gd = groups·dim values;
                    // every slot is below `slots_in_pool` (`PagedLayout::check` above) and
                    // k and v hold `slots_in_pool` rows of KV·D (their shapes, checked).
                    unsafe {
                        match chunks {
                            2 => return attend_avx2::<2>(o, qi, k, v, slots, kh, heads, p),
                            4 => return attend_avx2::<4>(o, qi, k, v, slots, kh, heads, p),
                            8 => return attend_avx2::<8>(o, qi, k, v, slots, kh, heads, p),
                            16 => return attend_avx2::<16>(o, qi, k, v, slots, kh, heads, p),
                            _ => {}
                        }
                    }
                }
                let _ = (simd, chunks);
                attend(o, qi, k, v, slots, kh, heads, p)
            });
        Ok((CpuStorage::F32(out), Shape::from((n, qw))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::max_diff as max_abs;
    use candle_core::Device;

    #[test]
    fn kernel_matches_the_composed_formula_on_scattered_pages() {
        // Head widths on the portable kernel (20) and on the vector one (16, 64).
        for dim in [20, 16, 64] {
            let heads = Heads {
                query: 6,
                kv: 2,
                dim,
            };
            let dev = Device::Cpu;
            let pool = 64;
            let k = Tensor::randn(0f32, 1.0, (pool, heads.kv * dim), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (pool, heads.kv * dim), &dev).unwrap();
            // Sequence 0: a prefill chunk of 3 queries over 9 tokens in pages far
            // apart; sequence 1 decodes one token seeing 5; sequence 2 one seeing 1.
            let layout = Arc::new(PagedLayout {
                queries: vec![(0, 7), (0, 8), (0, 9), (1, 5), (2, 1)],
                slots: vec![
                    vec![40, 41, 42, 43, 8, 9, 10, 11, 60],
                    vec![12, 13, 14, 15, 44],
                    vec![3],
                ],
            });
            let q = Tensor::randn(0f32, 1.0, (5, heads.query * dim), &dev).unwrap();
            let fast = paged_attention(&q, &k, &v, &layout, heads).unwrap();
            let slow = composed(&q, &k, &v, &layout, heads).unwrap();
            let d = max_abs(&fast, &slow);
            assert!(d < 1e-5, "dim {dim}: {d}");
            // A query that sees one token returns that token's value rows.
            let last = fast.narrow(0, 4, 1).unwrap().reshape((6, dim)).unwrap();
            let v3 = v.narrow(0, 3, 1).unwrap().reshape((2, dim)).unwrap();
            for h in 0..6 {
                let d = max_abs(
                    &last.narrow(0, h, 1).unwrap(),
                    &v3.narrow(0, h / 3, 1).unwrap(),
                );
                assert!(d < 1e-6, "dim {dim} head {h}: {d}");
            }
        }
    }

    #[test]
    fn a_query_past_its_sequence_is_refused() {
        let heads = Heads {
            query: 2,
            kv: 1,
            dim: 4,
        };
        let k = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
        let q = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
        let layout = Arc::new(PagedLayout {
            queries: vec![(0, 3)],
            slots: vec![vec![0, 1]],
        });
        assert!(paged_attention(&q, &k, &k, &layout, heads).is_err());
    }

    /// Slots outside the pool, a query naming no sequence, heads that do not share their
    /// KV heads, and pools of the wrong width are errors before any key is read.
    #[test]
    fn layouts_and_shapes_outside_the_pool_are_refused() {
        let heads = Heads {
            query: 2,
            kv: 1,
            dim: 8,
        };
        let dev = Device::Cpu;
        let k = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
        let q = Tensor::ones((1, 16), DType::F32, &dev).unwrap();
        let run = |queries: Vec<(u32, u32)>, slots: Vec<Vec<u32>>, heads, k: &Tensor| {
            let layout = Arc::new(PagedLayout { queries, slots });
            paged_attention(&q, k, k, &layout, heads)
        };
        assert!(run(vec![(0, 2)], vec![vec![0, 3]], heads, &k).is_ok());
        for slot in [4, u32::MAX] {
            assert!(run(vec![(0, 2)], vec![vec![0, slot]], heads, &k).is_err());
        }
        assert!(run(vec![(1, 1)], vec![vec![0]], heads, &k).is_err());
        assert!(run(vec![(u32::MAX, 1)], vec![vec![0]], heads, &k).is_err());
        for (query, kv) in [(2, 0), (3, 2)] {
            let bad = Heads { query, kv, dim: 8 };
            assert!(run(vec![(0, 1)], vec![vec![0]], bad, &k).is_err());
        }
        let huge = Heads {
            query: usize::MAX,
            kv: 1,
            dim: 2,
        };
        assert!(run(vec![(0, 1)], vec![vec![0]], huge, &k).is_err());
        let narrow = Tensor::ones((4, 7), DType::F32, &dev).unwrap();
        assert!(run(vec![(0, 1)], vec![vec![0]], heads, &narrow).is_err());
    }

    /// No queries, or heads of width 0: an empty output, no panic.
    #[test]
    fn empty_steps_give_empty_outputs() {
        let dev = Device::Cpu;
        let heads = Heads {
            query: 2,
            kv: 1,
            dim: 8,
        };
        let k = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
        let q = Tensor::ones((0, 16), DType::F32, &dev).unwrap();
        let none = Arc::new(PagedLayout::default());
        let y = paged_attention(&q, &k, &k, &none, heads).unwrap();
        assert_eq!(y.dims(), [0, 16]);
        let flat = Heads { dim: 0, ..heads };
        let (q, k) = (
            Tensor::ones((1, 0), DType::F32, &dev).unwrap(),
            Tensor::ones((4, 0), DType::F32, &dev).unwrap(),
        );
        let layout = Arc::new(PagedLayout {
            queries: vec![(0, 2)],
            slots: vec![vec![1, 2]],
        });
        let y = paged_attention(&q, &k, &k, &layout, flat).unwrap();
        assert_eq!(y.dims(), [1, 0]);
    }
}
