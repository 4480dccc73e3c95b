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
//! prompt's gradient collects every completion's. The CPU kernels
//! ([`crate::kernels::segment_attention`]) run the products on the `gemm` kernels
//! candle itself uses, one (segment, head) block per task.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use super::{float_kernel, on_cpu_kernel, split_flat, Elem};
use crate::cpu_storage::cpu_slice;
use crate::error::{Error, Result};
use crate::kernels::segment_attention::{self, Geometry};
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
    /// (start, len) of the prefix; (0, 0) when there is none.
    pub(crate) fn prefix_range(&self) -> (usize, usize) {
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

/// Attention of q (T, H·D) over k, v (T, KV·D), already rotated, → (T, H·D), each
/// query seeing only its last `window` keys when there is a window.
/// Differentiable in q, k and v.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &Arc<Vec<Segment>>,
    heads: Heads,
    window: Option<usize>,
) -> Result<Tensor> {
    if window == Some(0) {
        return Err(Error::invalid("attention window must be positive"));
    }
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
                window,
            },
        )?);
    }
    composed(q, k, v, segments, heads, window)
}

/// The additive (T, T) mask of the segments: 0 where query i sees key j, else
/// [`MASKED`]; within the last `window` positions when there is a window.
pub fn dense_mask(segments: &[Segment], t: usize, window: Option<usize>) -> Vec<f32> {
    let mut mask = vec![MASKED as f32; t * t];
    for s in segments {
        let (p0, m) = s.prefix_range();
        for (r, i) in (s.start..s.start + s.len).enumerate() {
            let row = &mut mask[i * t..(i + 1) * t];
            // Keys are the prefix's columns then the segment's: column c at position c.
            let first = window.map_or(0, |w| (m + r + 1).saturating_sub(w));
            if first < m {
                row[p0 + first..p0 + m].fill(0.0);
            }
            row[s.start + first.saturating_sub(m)..=i].fill(0.0);
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
    window: Option<usize>,
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
    let mask =
        Tensor::from_vec(dense_mask(segments, t, window), (t, t), q.device())?.to_dtype(compute)?;
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
    window: Option<usize>,
}

impl SegmentAttention {
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<Geometry> {
        let (t, qw) = l1.shape().dims2()?;
        let g = Geometry::new(self.heads, t)?.windowed(self.window);
        let (t2, kw) = l2.shape().dims2()?;
        if qw != g.qw() || kw != g.kw() || t2 != t || l3.shape() != l2.shape() {
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
            |q, k, v| segment_attention::forward(q, k, v, &self.segments, &g)?);
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
            window: self.window,
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
    window: Option<usize>,
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
        segment_attention::backward((&q, &k, &v), &o, dout, &self.segments, g)
    }
}

impl candle_core::CustomOp1 for SegmentAttentionGrad {
    fn name(&self) -> &'static str {
        "segment-attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let [q, k, v, _] = &self.saved;
        let g = Geometry::new(self.heads, q.dim(0)?)?.windowed(self.window);
        let out = float_kernel!(self.name(); s: l => |dout| self.run(dout, &g)?);
        let len = q.elem_count() + k.elem_count() + v.elem_count();
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    pub(crate) const HEADS: Heads = Heads {
        query: 4,
        kv: 2,
        dim: 3,
    };

    #[test]
    fn matches_dense_masked_attention_and_finite_differences() {
        let segs = segments();
        // Windows that cut into the prefix, into the segment itself, and none.
        for window in [None, Some(1), Some(2), Some(4), Some(50)] {
            let f = |xs: &[Tensor]| attention(&xs[0], &xs[1], &xs[2], &segs, HEADS, window);
            let c = |xs: &[Tensor]| composed(&xs[0], &xs[1], &xs[2], &segs, HEADS, window);
            check_against_composed(&[&[12, 12], &[12, 6], &[12, 6]], f, c);
            check_finite_differences(&[&[12, 12], &[12, 6], &[12, 6]], f);
        }
    }

    /// The dense mask against the rule written out from positions: query i sees key j
    /// when j is its segment's (up to itself) or its prefix's, and, with a window,
    /// pos(i) − pos(j) < window, where a plain segment's or a prefix's positions start
    /// at 0 and a segment with a prefix continues after it.
    #[test]
    fn the_windowed_mask_keeps_the_last_keys_by_position() {
        let segs = segments();
        let t = 12;
        let mut pos = vec![0usize; t];
        let mut seg_of = vec![0usize; t];
        for (n, s) in segs.iter().enumerate() {
            let base = s.prefix.map_or(0, |(_, m)| m);
            for r in 0..s.len {
                pos[s.start + r] = base + r;
                seg_of[s.start + r] = n;
            }
        }
        for window in [None, Some(1), Some(3), Some(5)] {
            let mask = dense_mask(&segs, t, window);
            for i in 0..t {
                let s = segs[seg_of[i]];
                for j in 0..t {
                    let (p0, m) = s.prefix_range();
                    let structural = (j >= s.start && j <= i) || (j >= p0 && j < p0 + m);
                    let near = window.is_none_or(|w| pos[i] < pos[j] + w);
                    let seen = mask[i * t + j] == 0.0;
                    assert_eq!(
                        seen,
                        structural && near,
                        "window {window:?}: query {i}, key {j}"
                    );
                }
            }
        }
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
        for window in [None, Some(100)] {
            let f = |xs: &[Tensor]| attention(&xs[0], &xs[1], &xs[2], &segs, heads, window);
            let c = |xs: &[Tensor]| composed(&xs[0], &xs[1], &xs[2], &segs, heads, window);
            check_against_composed(&[&[284, 8], &[284, 4], &[284, 4]], f, c);
        }
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
    pub(crate) fn wrapping_segments() -> [Vec<Segment>; 3] {
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
            assert!(
                attention(&q, &kv, &kv, &segs, HEADS, None).is_err(),
                "{segs:?}"
            );
        }
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
            None,
        )
        .unwrap();
        assert_eq!(y.dims(), [0, 12]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&q).unwrap().dims(), [0, 12]);
    }
}
