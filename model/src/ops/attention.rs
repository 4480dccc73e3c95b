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

use super::gemm::{gemm, Blocks, Mat};
use super::{float_kernel, on_cpu_kernel, split_flat, Elem};
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
/// segment. Every sum is checked: a segment or prefix whose end overflows `usize` is
/// refused like one that ends past the row.
pub fn check_segments(segments: &[Segment], t: usize) -> Result<()> {
    let mut next = 0usize;
    for (i, s) in segments.iter().enumerate() {
        if s.start != next || s.len == 0 {
            return Err(Error::invalid(format!(
                "segment {i} starts at {} with {} tokens: segments must tile the packed row in order",
                s.start, s.len
            )));
        }
        next = match s.start.checked_add(s.len) {
            Some(end) if end <= t => end,
            _ => {
                return Err(Error::invalid(format!(
                    "segment {i} starts at {} with {} tokens: it ends past the packed row of {t}",
                    s.start, s.len
                )))
            }
        };
        if let Some((p, n)) = s.prefix {
            if n == 0 || p.checked_add(n).is_none_or(|end| end > s.start) {
                return Err(Error::invalid(format!(
                    "segment {i}: its prefix of {n} tokens from {p} must be non-empty and end \
                     before the segment starts at {}",
                    s.start
                )));
            }
        }
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
    /// Tokens T of the packed row.
    t: usize,
    /// Query row width H·D.
    qw: usize,
    /// KV row width KV·D.
    kw: usize,
    scale: f64,
}

impl Geometry {
    /// The geometry of T tokens of `heads`; an error when the query heads do not share
    /// the KV heads evenly or a row width overflows.
    fn new(heads: Heads, t: usize) -> candle_core::Result<Self> {
        let Heads { query, kv, dim } = heads;
        if kv == 0 || !query.is_multiple_of(kv) {
            candle_core::bail!("segment attention: {query} query heads cannot share {kv} KV heads")
        }
        let (Some(qw), Some(kw)) = (query.checked_mul(dim), kv.checked_mul(dim)) else {
            candle_core::bail!("segment attention: {query} heads of width {dim} overflow a row")
        };
        Ok(Geometry {
            heads,
            t,
            qw,
            kw,
            scale: 1.0 / (dim as f64).sqrt(),
        })
    }

    fn kv_head(&self, h: usize) -> usize {
        h / (self.heads.query / self.heads.kv)
    }

    /// Checks, once per kernel call, that each `(name, len, width)` buffer holds T rows
    /// of its width and that the segments tile 0..T: every block a task writes is then
    /// its own (segments do not overlap, heads' columns do not) and every view the
    /// products take lies inside its buffer.
    fn check(
        &self,
        segments: &[Segment],
        bufs: &[(&str, usize, usize)],
    ) -> candle_core::Result<()> {
        for &(name, len, width) in bufs {
            if self.t.checked_mul(width) != Some(len) {
                candle_core::bail!(
                    "segment attention: {name} holds {len} values, not {} rows of {width}",
                    self.t
                )
            }
        }
        check_segments(segments, self.t).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// P (n × (m + n)) of segment `s` and query head `h` into `p`: scaled scores against
/// the prefix then the segment's own keys, causal in the latter, softmax per row
/// (masked entries exactly 0).
fn probabilities<T: Elem>(
    p: &mut Vec<T>,
    q: &[T],
    k: &[T],
    s: &Segment,
    h: usize,
    g: &Geometry,
) -> candle_core::Result<()> {
    let d = g.heads.dim;
    let kh = g.kv_head(h);
    let (p0, m) = s.prefix_range();
    let n = s.len;
    let w = m + n;
    p.clear();
    p.resize(n * w, T::zero());
    let alpha = T::from_f64(g.scale);
    let qm = Mat::rows(q, s.start * g.qw + h * d, g.qw);
    if m > 0 {
        let km = Mat::cols(k, p0 * g.kw + kh * d, g.kw);
        gemm((n, m, d), p, 0, w, qm, km, alpha, false)?;
    }
    let ks = Mat::cols(k, s.start * g.kw + kh * d, g.kw);
    gemm((n, n, d), p, m, w, qm, ks, alpha, false)?;
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
    Ok(())
}

fn fwd_kernel<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    segments: &[Segment],
    g: &Geometry,
) -> candle_core::Result<Vec<T>> {
    g.check(
        segments,
        &[
            ("q", q.len(), g.qw),
            ("k", k.len(), g.kw),
            ("v", v.len(), g.kw),
        ],
    )?;
    let d = g.heads.dim;
    let mut out = vec![T::zero(); q.len()];
    let blocks = Blocks::new(&mut out);
    let Some(tasks) = segments.len().checked_mul(g.heads.query) else {
        candle_core::bail!("segment attention: too many (segment, head) tasks")
    };
    (0..tasks)
        .into_par_iter()
        .try_for_each_init(Vec::new, |p, task| {
            let (s, h) = (&segments[task / g.heads.query], task % g.heads.query);
            probabilities(p, q, k, s, h, g)?;
            let (p0, m) = s.prefix_range();
            let (n, w, kh) = (s.len, m + s.len, g.kv_head(h));
            let o = s.start * g.qw + h * d;
            if m > 0 {
                let (pm, vm) = (Mat::rows(p, 0, w), Mat::rows(v, p0 * g.kw + kh * d, g.kw));
                // SAFETY: task (s, h) alone writes rows s.start..s.start + n of head h's
                // columns h·d..(h + 1)·d: the segments tile 0..T without overlap and
                // every (segment, head) is one task (`Geometry::check` above).
                unsafe { blocks.gemm((n, d, m), o, g.qw, pm, vm, T::one(), false) }?;
            }
            let (ps, vs) = (
                Mat::rows(p, m, w),
                Mat::rows(v, s.start * g.kw + kh * d, g.kw),
            );
            // SAFETY: the same block of task (s, h) as above.
            unsafe { blocks.gemm((n, d, n), o, g.qw, ps, vs, T::one(), m > 0) }
        })?;
    Ok(out)
}

/// [dq (T·H·D), dk (T·KV·D), dv (T·KV·D)] flattened.
fn bwd_kernel<T: Elem>(
    (q, k, v): (&[T], &[T], &[T]),
    o: &[T],
    dout: &[T],
    segments: &[Segment],
    g: &Geometry,
) -> candle_core::Result<Vec<T>> {
    g.check(
        segments,
        &[
            ("q", q.len(), g.qw),
            ("k", k.len(), g.kw),
            ("v", v.len(), g.kw),
            ("O", o.len(), g.qw),
            ("dO", dout.len(), g.qw),
        ],
    )?;
    let t = g.t;
    let d = g.heads.dim;
    let hq = g.heads.query;
    let mut dq = vec![T::zero(); q.len()];
    let dq_blocks = Blocks::new(&mut dq);
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
                probabilities(&mut p, q, k, s, h, g)?;
                let (p0, m) = s.prefix_range();
                let (n, w) = (s.len, m + s.len);
                let qo = s.start * g.qw + h * d;
                let dom = Mat::rows(dout, qo, g.qw);
                let qm = Mat::rows(q, qo, g.qw);
                ds.clear();
                ds.resize(n * w, T::zero());
                // dP = dO Vᵀ
                if m > 0 {
                    let vm = Mat::cols(v, p0 * g.kw + kh * d, g.kw);
                    gemm((n, m, d), &mut ds, 0, w, dom, vm, T::one(), false)?;
                }
                let vs = Mat::cols(v, s.start * g.kw + kh * d, g.kw);
                gemm((n, n, d), &mut ds, m, w, dom, vs, T::one(), false)?;
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
                // dQ = s · dS K
                if m > 0 {
                    let km = Mat::rows(k, p0 * g.kw + kh * d, g.kw);
                    let dsm = Mat::rows(&ds, 0, w);
                    // SAFETY: task h alone writes head h's columns h·d..(h + 1)·d of dq,
                    // and its segments' rows do not overlap (`Geometry::check` above).
                    unsafe { dq_blocks.gemm((n, d, m), qo, g.qw, dsm, km, scale, false) }?;
                }
                let ks = Mat::rows(k, s.start * g.kw + kh * d, g.kw);
                let dss = Mat::rows(&ds, m, w);
                // SAFETY: the same block of task h as above.
                unsafe { dq_blocks.gemm((n, d, n), qo, g.qw, dss, ks, scale, m > 0) }?;
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
                    )?;
                    gemm(
                        (m, d, n),
                        &mut dv,
                        dst,
                        d,
                        Mat::cols(&p, 0, w),
                        dom,
                        T::one(),
                        true,
                    )?;
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
                )?;
                gemm(
                    (n, d, n),
                    &mut dv,
                    dst,
                    d,
                    Mat::cols(&p, m, w),
                    dom,
                    T::one(),
                    true,
                )?;
            }
            Ok((dk, dv))
        })
        .collect::<candle_core::Result<_>>()?;
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
    Ok(out)
}

impl SegmentAttention {
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<Geometry> {
        let (t, qw) = l1.shape().dims2()?;
        let g = Geometry::new(self.heads, t)?;
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
            |q, k, v| fwd_kernel(q, k, v, &self.segments, &g)?);
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
        bwd_kernel((&q, &k, &v), &o, dout, &self.segments, g)
    }
}

impl candle_core::CustomOp1 for SegmentAttentionGrad {
    fn name(&self) -> &'static str {
        "segment-attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [q, k, v, _] = &self.saved;
        let g = Geometry::new(self.heads, q.dim(0)?)?;
        let out = float_kernel!(self.name(); s: l => |dout| self.run(dout, &g)?);
        let len = q.elem_count() + k.elem_count() + v.elem_count();
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_against_composed, check_finite_differences};
    use candle_core::Var;

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

    /// Segments whose ends wrap around `usize` (they passed the unchecked sums in a
    /// release build and sent the kernel past its buffers): a segment of usize::MAX
    /// tokens after which the sum comes back to the row's length, and a prefix that
    /// starts near usize::MAX and "ends" before its segment.
    fn wrapping_segments() -> [Vec<Segment>; 3] {
        let seg = |start, len, prefix| Segment { start, len, prefix };
        [
            vec![seg(0, 2, None), seg(2, usize::MAX, None), seg(1, 3, None)],
            vec![seg(0, 2, None), seg(2, 2, Some((usize::MAX, 2)))],
            vec![
                seg(0, 2, None),
                seg(2, 2, Some((usize::MAX - 1, usize::MAX))),
            ],
        ]
    }

    #[test]
    fn segments_that_overflow_usize_are_refused() {
        let dev = candle_core::Device::Cpu;
        let q = Tensor::ones((4, 12), DType::F32, &dev).unwrap();
        let kv = Tensor::ones((4, 6), DType::F32, &dev).unwrap();
        for segs in wrapping_segments() {
            let err = check_segments(&segs, 4).unwrap_err().to_string();
            assert!(err.contains("segment 1"), "{segs:?}: {err}");
            let segs = Arc::new(segs);
            assert!(attention(&q, &kv, &kv, &segs, HEADS).is_err(), "{segs:?}");
        }
    }

    /// The kernels check the segments themselves: called without `attention`'s check,
    /// crafted segments and buffers of the wrong length are errors, not reads or writes
    /// out of bounds.
    #[test]
    fn kernels_refuse_unchecked_segments_and_short_buffers() {
        let g = Geometry::new(HEADS, 4).unwrap();
        let (q, kv) = (vec![1f64; 4 * 12], vec![1f64; 4 * 6]);
        for segs in wrapping_segments() {
            assert!(fwd_kernel(&q, &kv, &kv, &segs, &g).is_err(), "{segs:?}");
            let r = bwd_kernel((&q, &kv, &kv), &q, &q, &segs, &g);
            assert!(r.is_err(), "{segs:?}");
        }
        let one = [Segment {
            start: 0,
            len: 4,
            prefix: None,
        }];
        assert_eq!(fwd_kernel(&q, &kv, &kv, &one, &g).unwrap().len(), 4 * 12);
        assert!(fwd_kernel(&q[1..], &kv, &kv, &one, &g).is_err());
        assert!(fwd_kernel(&q, &kv, &kv[1..], &one, &g).is_err());
        assert!(bwd_kernel((&q, &kv, &kv), &q, &q[1..], &one, &g).is_err());
        let big = Heads {
            query: usize::MAX / 2,
            kv: 1,
            dim: 3,
        };
        assert!(Geometry::new(big, 4).is_err());
        let uneven = Heads {
            query: 3,
            kv: 2,
            dim: 3,
        };
        assert!(Geometry::new(uneven, 4).is_err());
    }

    /// A packed row of no tokens (no segments) gives an empty output and gradients.
    #[test]
    fn zero_tokens_give_an_empty_output() {
        let dev = candle_core::Device::Cpu;
        let q = Var::from_tensor(&Tensor::zeros((0, 12), DType::F32, &dev).unwrap()).unwrap();
        let kv = Var::from_tensor(&Tensor::zeros((0, 6), DType::F32, &dev).unwrap()).unwrap();
        let y = attention(
            q.as_tensor(),
            kv.as_tensor(),
            kv.as_tensor(),
            &Arc::new(vec![]),
            HEADS,
        )
        .unwrap();
        assert_eq!(y.dims(), [0, 12]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&q).unwrap().dims(), [0, 12]);
    }
}
