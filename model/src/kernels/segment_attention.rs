//! The CPU kernels of causal attention over packed segments (training): the forward
//! O = P V and the backward of [`crate::ops::attention`]'s formulas, one (segment, head)
//! block per task on the checked strided product of [`super::gemm`].
//!
//! Per segment and query head h (KV head h / (H / KV)), with the visible keys
//! K = [K_prefix; K_self] and values V likewise, scale s = 1/√D:
//!
//!   S = s · Q Kᵀ (causal in the self block; in a local layer also only the last
//!   `window` keys),  P = softmax_rows(S),  O = P V
//!
//!   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − Δ),  dQ = s · dS K,  dK = s · dSᵀ Q
//!
//! with Δ_i = Σ_c dO_ic · O_ic. Parallel tasks write disjoint blocks of one output
//! through [`Blocks`]: [`Geometry::check`] makes the buffers hold T rows and the
//! segments tile 0..T before any task starts, so every task's block is its own.

use num_traits::Float;
use rayon::prelude::*;

use super::gemm::{gemm, Blocks, Mat};
use crate::ops::attention::{check_segments, Heads, Segment};
use crate::ops::Elem;

/// Row-major offsets and widths of the packed q / kv rows.
pub(crate) struct Geometry {
    heads: Heads,
    /// Tokens T of the packed row.
    t: usize,
    /// Query row width H·D.
    qw: usize,
    /// KV row width KV·D.
    kw: usize,
    scale: f64,
    /// A query sees only the last `window` keys up to itself (local attention).
    window: Option<usize>,
}

impl Geometry {
    /// The geometry of T tokens of `heads`; an error when the query heads do not share
    /// the KV heads evenly or a row width overflows.
    pub(crate) fn new(heads: Heads, t: usize) -> candle_core::Result<Self> {
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
            window: None,
        })
    }

    /// The same geometry with a query seeing only its last `window` keys (itself
    /// included): key column c of a segment's [prefix; self] block is position c, so
    /// query r (position m + r) sees columns m + r + 1 − window ..= m + r.
    pub(crate) fn windowed(self, window: Option<usize>) -> Self {
        Geometry { window, ..self }
    }

    /// Query row width H·D.
    pub(crate) fn qw(&self) -> usize {
        self.qw
    }

    /// KV row width KV·D.
    pub(crate) fn kw(&self) -> usize {
        self.kw
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
/// the prefix then the segment's own keys, causal in the latter and within the window
/// when there is one, softmax per row (masked entries exactly 0).
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
        let first = g.window.map_or(0, |w| visible.saturating_sub(w));
        let mx = row[first..visible]
            .iter()
            .fold(T::neg_infinity(), |a, &b| Float::max(a, b));
        let mut sum = 0f64;
        for x in &mut row[first..visible] {
            *x = (*x - mx).exp();
            sum += x.to_f64();
        }
        let inv = T::from_f64(1.0 / sum);
        for x in &mut row[first..visible] {
            *x *= inv;
        }
        row[..first].fill(T::zero());
        row[visible..].fill(T::zero());
    }
    Ok(())
}

/// O (T·H·D) of q (T, H·D) over k, v (T, KV·D): one (segment, head) task per block of
/// O. An error, and nothing written, when a buffer does not hold T rows of its width or
/// the segments do not tile 0..T.
pub(crate) fn forward<T: Elem>(
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

/// [dq (T·H·D), dk (T·KV·D), dv (T·KV·D)] flattened, from q, k, v, the forward's
/// output O and its gradient dO; checked like [`forward`].
pub(crate) fn backward<T: Elem>(
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
                score_gradient(&mut ds, &p, (v, o, dout), s, h, g)?;
                // dQ = s · dS K
                let (p0, m) = s.prefix_range();
                let (n, w) = (s.len, m + s.len);
                let qo = s.start * g.qw + h * d;
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
                accumulate_kv_gradients((&mut dk, &mut dv), (&p, &ds), (q, dout), s, h, g)?;
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

/// dS (n × (m + n)) of segment `s` and query head `h` into `ds`, from its P (n × (m + n)):
/// dP = dO Vᵀ against the prefix's values then the segment's own, and
/// dS = P ∘ (dP − Δ) with Δ_r = Σ_c dO_rc · O_rc.
fn score_gradient<T: Elem>(
    ds: &mut Vec<T>,
    p: &[T],
    (v, o, dout): (&[T], &[T], &[T]),
    s: &Segment,
    h: usize,
    g: &Geometry,
) -> candle_core::Result<()> {
    let (d, kh) = (g.heads.dim, g.kv_head(h));
    let (p0, m) = s.prefix_range();
    let (n, w) = (s.len, m + s.len);
    let qo = s.start * g.qw + h * d;
    let dom = Mat::rows(dout, qo, g.qw);
    ds.clear();
    ds.resize(n * w, T::zero());
    if m > 0 {
        let vm = Mat::cols(v, p0 * g.kw + kh * d, g.kw);
        gemm((n, m, d), ds, 0, w, dom, vm, T::one(), false)?;
    }
    let vs = Mat::cols(v, s.start * g.kw + kh * d, g.kw);
    gemm((n, n, d), ds, m, w, dom, vs, T::one(), false)?;
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
    Ok(())
}

/// dK += s · dSᵀ Q and dV += Pᵀ dO of segment `s` and query head `h`, into the head's own
/// (T × D) buffers: the prefix's rows, then the segment's.
fn accumulate_kv_gradients<T: Elem>(
    (dk, dv): (&mut [T], &mut [T]),
    (p, ds): (&[T], &[T]),
    (q, dout): (&[T], &[T]),
    s: &Segment,
    h: usize,
    g: &Geometry,
) -> candle_core::Result<()> {
    let d = g.heads.dim;
    let scale = T::from_f64(g.scale);
    let (p0, m) = s.prefix_range();
    let (n, w) = (s.len, m + s.len);
    let qo = s.start * g.qw + h * d;
    let (qm, dom) = (Mat::rows(q, qo, g.qw), Mat::rows(dout, qo, g.qw));
    if m > 0 {
        let dst = p0 * d;
        gemm((m, d, n), dk, dst, d, Mat::cols(ds, 0, w), qm, scale, true)?;
        gemm(
            (m, d, n),
            dv,
            dst,
            d,
            Mat::cols(p, 0, w),
            dom,
            T::one(),
            true,
        )?;
    }
    let dst = s.start * d;
    gemm((n, d, n), dk, dst, d, Mat::cols(ds, m, w), qm, scale, true)?;
    gemm(
        (n, d, n),
        dv,
        dst,
        d,
        Mat::cols(p, m, w),
        dom,
        T::one(),
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::tests::{wrapping_segments, HEADS};

    /// The kernels check the segments themselves: called without `attention`'s check,
    /// crafted segments and buffers of the wrong length are errors, not reads or writes
    /// out of bounds.
    #[test]
    fn kernels_refuse_unchecked_segments_and_short_buffers() {
        let g = Geometry::new(HEADS, 4).unwrap();
        let (q, kv) = (vec![1f64; 4 * 12], vec![1f64; 4 * 6]);
        for segs in wrapping_segments() {
            assert!(forward(&q, &kv, &kv, &segs, &g).is_err(), "{segs:?}");
            let r = backward((&q, &kv, &kv), &q, &q, &segs, &g);
            assert!(r.is_err(), "{segs:?}");
        }
        let one = [Segment {
            start: 0,
            len: 4,
            prefix: None,
        }];
        assert_eq!(forward(&q, &kv, &kv, &one, &g).unwrap().len(), 4 * 12);
        assert!(forward(&q[1..], &kv, &kv, &one, &g).is_err());
        assert!(forward(&q, &kv, &kv[1..], &one, &g).is_err());
        assert!(backward((&q, &kv, &kv), &q, &q[1..], &one, &g).is_err());
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
}
