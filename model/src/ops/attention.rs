//! Causal attention over packed segments, as one autograd node.
//!
//! The tokens of a batch lie in one row of T tokens, cut into segments. A query of a
//! segment sees its segment's keys up to itself (causal) and, when the segment has a
//! prefix, every key of that prefix: a completion attends to its group's prompt laid
//! out once (prefix-shared, "tree" attention), a plain sequence is one segment. No
//! padding is computed and no (T × T) mask exists.
//!
//! Per segment and query head h (grouped-query: KV head h / (H / KV)), with the
//! visible keys K = [K_prefix; K_self] and values V likewise, scale s = 1/√D:
//!
//!   S = s · Q Kᵀ (causal in the self block),  P = softmax_rows(S),  O = P V
//!
//! The backward recomputes P from Q and K (nothing but O is kept) and, with
//! Δ_i = Σ_c dO_ic · O_ic:
//!
//!   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − Δ),  dQ = s · dS K,  dK = s · dSᵀ Q
//!
//! A prefix's dK and dV sum the contributions of every segment that sees it, so the
//! prompt's gradient collects every completion's. The products run on the `gemm`
//! kernels candle itself uses, one (segment, head) block per task.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use num_traits::Float;

use super::{float_kernel, gemm, on_cpu_kernel, split_flat, Elem, Mat};
use crate::cpu_storage::cpu_slice;
use crate::error::{Error, Result};
use crate::transformer::MASKED;

/// A run of consecutive packed tokens that attend causally to each other and to all of
/// an optional earlier prefix run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    /// (start, len) of the prefix every token of the segment also sees.
    pub prefix: Option<(usize, usize)>,
}

impl Segment {
    fn prefix_range(&self) -> (usize, usize) {
        self.prefix.unwrap_or((0, 0))
    }
}

/// Head counts and width of the attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    pub query: usize,
    pub kv: usize,
    pub dim: usize,
}

/// Checks that `segments` tile 0..t in order and that every prefix lies before its
/// segment.
pub fn check_segments(segments: &[Segment], t: usize) -> Result<()> {
    let mut next = 0;
    for (i, s) in segments.iter().enumerate() {
        if s.start != next || s.len == 0 {
            return Err(Error::invalid(format!(
                "segment {i} starts at {} with {} tokens: segments must tile the packed row in order",
                s.start, s.len
            )));
        }
        if let Some((p, n)) = s.prefix {
            if n == 0 || p + n > s.start {
                return Err(Error::invalid(format!(
                    "segment {i}: its prefix {p}..{} must be non-empty and end before it starts at {}",
                    p + n,
                    s.start
                )));
            }
        }
        next += s.len;
    }
    if next != t {
        return Err(Error::invalid(format!(
            "segments cover {next} tokens of a packed row of {t}"
        )));
    }
    Ok(())
}

/// Attention of q (T, H·D) over k, v (T, KV·D), already rotated, → (T, H·D).
/// Differentiable in q, k and v.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Arc<Vec<Segment>>,
    heads: Heads,
) -> Result<Tensor> {
    if heads.kv == 0 || !heads.query.is_multiple_of(heads.kv) {
        return Err(Error::invalid(format!(
            "{} query heads cannot share {} KV heads",
            heads.query, heads.kv
        )));
    }
    check_segments(segments, q.dim(0)?)?;
    if on_cpu_kernel(q) && q.dtype() == k.dtype() && q.dtype() == v.dtype() {
        return Ok(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            SegmentAttention {
                segments: segments.clone(),
                heads,
            },
        )?);
    }
    composed(q, k, v, segments, heads)
}

/// The additive (T, T) mask of the segments: 0 where query i sees key j, else
/// [`MASKED`].
pub fn dense_mask(segments: &[Segment], t: usize) -> Vec<f32> {
    let mut mask = vec![MASKED as f32; t * t];
    for s in segments {
        let (p0, m) = s.prefix_range();
        for i in s.start..s.start + s.len {
            let row = &mut mask[i * t..(i + 1) * t];
            row[p0..p0 + m].fill(0.0);
            row[s.start..=i].fill(0.0);
        }
    }
    mask
}

/// The same attention from candle ops with a dense mask (any device and dtype; scores
/// and softmax in f32 for half precisions, as fused attention kernels do).
pub(crate) fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[Segment],
    heads: Heads,
) -> Result<Tensor> {
    let t = q.dim(0)?;
    let Heads { query: h, kv, dim } = heads;
    let groups = h / kv;
    let dtype = q.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mask = Tensor::from_vec(dense_mask(segments, t), (t, t), q.device())?.to_dtype(compute)?;
    // (KV, groups·T, D): the query heads sharing a KV head stacked along the query axis.
    let qh = q
        .reshape((t, h, dim))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv, groups * t, dim))?;
    let kh = k.reshape((t, kv, dim))?.transpose(0, 1)?.contiguous()?;
    let vh = v.reshape((t, kv, dim))?.transpose(0, 1)?.contiguous()?;
    let scores = qh
        .to_dtype(compute)?
        .matmul(&kh.to_dtype(compute)?.t()?)?
        .affine(1.0 / (dim as f64).sqrt(), 0.0)?
        .reshape((h, t, t))?
        .broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
    let out = probs.reshape((kv, groups * t, t))?.matmul(&vh)?;
    Ok(out
        .reshape((h, t, dim))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((t, h * dim))?)
}

struct SegmentAttention {
    segments: Arc<Vec<Segment>>,
    heads: Heads,
}

/// Row-major offsets and widths of the packed q / kv rows.
struct Geometry {
    heads: Heads,
    /// Query row width H·D.
    qw: usize,
    /// KV row width KV·D.
    kw: usize,
    scale: f64,
}

impl Geometry {
    fn new(heads: Heads) -> Self {
        Geometry {
            heads,
            qw: heads.query * heads.dim,
            kw: heads.kv * heads.dim,
            scale: 1.0 / (heads.dim as f64).sqrt(),
        }
    }

    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads.query / self.heads.kv)
    }
}

/// P (n × (m + n)) of segment `s` and query head `h` into `p`: scaled scores against
/// the prefix then the segment's own keys, causal in the latter, softmax per row
/// (masked entries exactly 0).
fn probabilities<T: Elem>(p: &mut Vec<T>, q: &[T], k: &[T], s: &Segment, h: usize, g: &Geometry) {
    let d = g.heads.dim;
    let kh = g.kv_head(h);
    let (p0, m) = s.prefix_range();
    let n = s.len;
    let w = m + n;
    p.clear();
    p.resize(n * w, T::zero());
    let alpha = T::from_f64(g.scale);
    let qm = Mat::rows(q, s.start * g.qw + h * d, g.qw);
    // SAFETY: the blocks lie inside q (T × H·D), k (T × KV·D) and p (n × w).
    unsafe {
        if m > 0 {
            let km = Mat::cols(k, p0 * g.kw + kh * d, g.kw);
            gemm((n, m, d), p, 0, w, qm, km, alpha, false);
        }
        let ks = Mat::cols(k, s.start * g.kw + kh * d, g.kw);
        gemm((n, n, d), p, m, w, qm, ks, alpha, false);
    }
    for r in 0..n {
        let row = &mut p[r * w..(r + 1) * w];
        let visible = m + r + 1;
        let mx = row[..visible]
            .iter()
            .fold(T::neg_infinity(), |a, &b| Float::max(a, b));
        let mut sum = 0f64;
        for x in &mut row[..visible] {
            *x = (*x - mx).exp();
            sum += x.to_f64();
        }
        let inv = T::from_f64(1.0 / sum);
        for x in &mut row[..visible] {
            *x *= inv;
        }
        row[visible..].fill(T::zero());
    }
}

/// A raw pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T, usize);
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    fn new(v: &mut [T]) -> Self {
        Shared(v.as_mut_ptr(), v.len())
    }
    /// # Safety
    /// Concurrent users must touch disjoint elements.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self) -> &mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
    }
}

fn fwd_kernel<T: Elem>(q: &[T], k: &[T], v: &[T], segments: &[Segment], g: &Geometry) -> Vec<T> {
    let t = q.len() / g.qw;
    let d = g.heads.dim;
    let mut out = vec![T::zero(); t * g.qw];
    let shared = Shared::new(&mut out);
    let tasks = segments.len() * g.heads.query;
    (0..tasks)
        .into_par_iter()
        .for_each_init(Vec::new, |p, task| {
            let (s, h) = (&segments[task / g.heads.query], task % g.heads.query);
            probabilities(p, q, k, s, h, g);
            let (p0, m) = s.prefix_range();
            let (n, w, kh) = (s.len, m + s.len, g.kv_head(h));
            // SAFETY: task (s, h) writes only rows s.start.. of head h's columns.
            unsafe {
                let out = shared.slice();
                let o = s.start * g.qw + h * d;
                if m > 0 {
                    let vm = Mat::rows(v, p0 * g.kw + kh * d, g.kw);
                    gemm(
                        (n, d, m),
                        out,
                        o,
                        g.qw,
                        Mat::rows(p, 0, w),
                        vm,
                        T::one(),
                        false,
                    );
                }
                let vs = Mat::rows(v, s.start * g.kw + kh * d, g.kw);
                gemm(
                    (n, d, n),
                    out,
                    o,
                    g.qw,
                    Mat::rows(p, m, w),
                    vs,
                    T::one(),
                    m > 0,
                );
            }
        });
    out
}

/// [dq (T·H·D), dk (T·KV·D), dv (T·KV·D)] flattened.
fn bwd_kernel<T: Elem>(
    (q, k, v): (&[T], &[T], &[T]),
    o: &[T],
    dout: &[T],
    segments: &[Segment],
    g: &Geometry,
) -> Vec<T> {
    let t = q.len() / g.qw;
    let d = g.heads.dim;
    let hq = g.heads.query;
    let mut dq = vec![T::zero(); t * g.qw];
    let shared_dq = Shared::new(&mut dq);
    // Per query head, dK and dV (T × D) of its KV head: heads run in parallel without
    // sharing a buffer; the heads of a group are summed afterwards.
    let per_head: Vec<(Vec<T>, Vec<T>)> = (0..hq)
        .into_par_iter()
        .map(|h| {
            let kh = g.kv_head(h);
            let mut dk = vec![T::zero(); t * d];
            let mut dv = vec![T::zero(); t * d];
            let (mut p, mut ds) = (Vec::new(), Vec::new());
            let scale = T::from_f64(g.scale);
            for s in segments {
                probabilities(&mut p, q, k, s, h, g);
                let (p0, m) = s.prefix_range();
                let (n, w) = (s.len, m + s.len);
                let qo = s.start * g.qw + h * d;
                let dom = Mat::rows(dout, qo, g.qw);
                let qm = Mat::rows(q, qo, g.qw);
                ds.clear();
                ds.resize(n * w, T::zero());
                // SAFETY: every block lies inside its buffer; dq's block (rows of s, head
                // h's columns) belongs to this task alone.
                unsafe {
                    // dP = dO Vᵀ
                    if m > 0 {
                        let vm = Mat::cols(v, p0 * g.kw + kh * d, g.kw);
                        gemm((n, m, d), &mut ds, 0, w, dom, vm, T::one(), false);
                    }
                    let vs = Mat::cols(v, s.start * g.kw + kh * d, g.kw);
                    gemm((n, n, d), &mut ds, m, w, dom, vs, T::one(), false);
                }
                // dS = P ∘ (dP − Δ)
                for r in 0..n {
                    let row = qo + r * g.qw;
                    let delta: f64 = (0..d)
                        .map(|c| dout[row + c].to_f64() * o[row + c].to_f64())
                        .sum();
                    let delta = T::from_f64(delta);
                    for c in 0..w {
                        ds[r * w + c] = p[r * w + c] * (ds[r * w + c] - delta);
                    }
                }
                unsafe {
                    let dq = shared_dq.slice();
                    // dQ = s · dS K
                    if m > 0 {
                        let km = Mat::rows(k, p0 * g.kw + kh * d, g.kw);
                        gemm(
                            (n, d, m),
                            dq,
                            qo,
                            g.qw,
                            Mat::rows(&ds, 0, w),
                            km,
                            scale,
                            false,
                        );
                    }
                    let ks = Mat::rows(k, s.start * g.kw + kh * d, g.kw);
                    gemm(
                        (n, d, n),
                        dq,
                        qo,
                        g.qw,
                        Mat::rows(&ds, m, w),
                        ks,
                        scale,
                        m > 0,
                    );
                    // dK += s · dSᵀ Q, dV += Pᵀ dO
                    if m > 0 {
                        let dst = p0 * d;
                        gemm(
                            (m, d, n),
                            &mut dk,
                            dst,
                            d,
                            Mat::cols(&ds, 0, w),
                            qm,
                            scale,
                            true,
                        );
                        gemm(
                            (m, d, n),
                            &mut dv,
                            dst,
                            d,
                            Mat::cols(&p, 0, w),
                            dom,
                            T::one(),
                            true,
                        );
                    }
                    let dst = s.start * d;
                    gemm(
                        (n, d, n),
                        &mut dk,
                        dst,
                        d,
                        Mat::cols(&ds, m, w),
                        qm,
                        scale,
                        true,
                    );
                    gemm(
                        (n, d, n),
                        &mut dv,
                        dst,
                        d,
                        Mat::cols(&p, m, w),
                        dom,
                        T::one(),
                        true,
                    );
                }
            }
            (dk, dv)
        })
        .collect();
    let kvw = g.kw;
    let mut out = dq;
    out.resize(t * g.qw + 2 * t * kvw, T::zero());
    let (_, rest) = out.split_at_mut(t * g.qw);
    let (dk, dv) = rest.split_at_mut(t * kvw);
    for (h, (hk, hv)) in per_head.iter().enumerate() {
        let kh = g.kv_head(h);
        for row in 0..t {
            let dst = row * kvw + kh * d;
            for c in 0..d {
                dk[dst + c] += hk[row * d + c];
                dv[dst + c] += hv[row * d + c];
            }
        }
    }
    out
}

impl SegmentAttention {
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<Geometry> {
        let g = Geometry::new(self.heads);
        let (t, qw) = l1.shape().dims2()?;
        let (t2, kw) = l2.shape().dims2()?;
        if qw != g.qw || kw != g.kw || t2 != t || l3.shape() != l2.shape() {
            candle_core::bail!(
                "segment attention: q {:?}, k {:?}, v {:?} do not fit {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.heads
            )
        }
        Ok(g)
    }
}

impl CustomOp3 for SegmentAttention {
    fn name(&self) -> &'static str {
        "segment-attention"
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
        let g = self.check(l1, l2, l3)?;
        let storage = float_kernel!(self.name(); s1: l1, s2: l2, s3: l3 =>
            |q, k, v| fwd_kernel(q, k, v, &self.segments, &g));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = grad.contiguous()?.apply_op1_no_bwd(&SegmentAttentionGrad {
            segments: self.segments.clone(),
            heads: self.heads,
            saved: [q.clone(), k.clone(), v.clone(), res.clone()],
        })?;
        let parts = split_flat(&flat, &[q.dims(), k.dims(), v.dims()])?;
        Ok((
            Some(parts[0].clone()),
            Some(parts[1].clone()),
            Some(parts[2].clone()),
        ))
    }
}

/// The backward, applied to dO: q, k, v and O are held by the op.
struct SegmentAttentionGrad {
    segments: Arc<Vec<Segment>>,
    heads: Heads,
    saved: [Tensor; 4],
}

impl SegmentAttentionGrad {
    fn run<T: Elem>(&self, dout: &[T], g: &Geometry) -> candle_core::Result<Vec<T>> {
        let n = "segment-attention-grad";
        let [q, k, v, o] = &self.saved;
        let (q, k, v, o) = (
            cpu_slice::<T>(q, n)?,
            cpu_slice::<T>(k, n)?,
            cpu_slice::<T>(v, n)?,
            cpu_slice::<T>(o, n)?,
        );
        Ok(bwd_kernel((&q, &k, &v), &o, dout, &self.segments, g))
    }
}

impl candle_core::CustomOp1 for SegmentAttentionGrad {
    fn name(&self) -> &'static str {
        "segment-attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = Geometry::new(self.heads);
        let out = float_kernel!(self.name(); s: l => |dout| self.run(dout, &g)?);
        let [q, k, v, _] = &self.saved;
        let len = q.elem_count() + k.elem_count() + v.elem_count();
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_against_composed, check_finite_differences};

    /// Two groups: a prompt of 3 shared by completions of 2 and 4 tokens, then a plain
    /// sequence of 3 — every case the kernel distinguishes.
    fn segments() -> Arc<Vec<Segment>> {
        Arc::new(vec![
            Segment {
                start: 0,
                len: 3,
                prefix: None,
            },
            Segment {
                start: 3,
                len: 2,
                prefix: Some((0, 3)),
            },
            Segment {
                start: 5,
                len: 4,
                prefix: Some((0, 3)),
            },
            Segment {
                start: 9,
                len: 3,
                prefix: None,
            },
        ])
    }

    const HEADS: Heads = Heads {
        query: 4,
        kv: 2,
        dim: 3,
    };

    #[test]
    fn matches_dense_masked_attention_and_finite_differences() {
        let segs = segments();
        let f = |xs: &[Tensor]| attention(&xs[0], &xs[1], &xs[2], &segs, HEADS);
        let c = |xs: &[Tensor]| composed(&xs[0], &xs[1], &xs[2], &segs, HEADS);
        check_against_composed(&[&[12, 12], &[12, 6], &[12, 6]], f, c);
        check_finite_differences(&[&[12, 12], &[12, 6], &[12, 6]], f);
    }

    /// Segments of dozens to hundreds of tokens (prefix 70, self 150, a plain 64).
    #[test]
    fn long_segments_match_dense_masked_attention() {
        let segs = Arc::new(vec![
            Segment {
                start: 0,
                len: 70,
                prefix: None,
            },
            Segment {
                start: 70,
                len: 150,
                prefix: Some((0, 70)),
            },
            Segment {
                start: 220,
                len: 64,
                prefix: None,
            },
        ]);
        let heads = Heads {
            query: 2,
            kv: 1,
            dim: 4,
        };
        let f = |xs: &[Tensor]| attention(&xs[0], &xs[1], &xs[2], &segs, heads);
        let c = |xs: &[Tensor]| composed(&xs[0], &xs[1], &xs[2], &segs, heads);
        check_against_composed(&[&[284, 8], &[284, 4], &[284, 4]], f, c);
    }

    #[test]
    fn rejects_segments_that_do_not_tile_the_row() {
        let bad = vec![Segment {
            start: 0,
            len: 2,
            prefix: Some((0, 1)),
        }];
        assert!(check_segments(&bad, 2).is_err());
        assert!(check_segments(&segments(), 11).is_err());
        assert!(check_segments(&segments(), 12).is_ok());
    }
}
