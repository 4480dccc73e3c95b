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
//! On CPU in f32 the kernel of [`crate::kernels::paged_attention`] runs it (each key row
//! read once for the query heads that share it, the (query, KV head) pairs split across
//! threads); other devices and dtypes gather each sequence's keys and run the same
//! formula from candle ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};

use crate::error::{Error, Result};
use crate::kernels::paged_attention::{self as kernel, widths};
use crate::ops::attention::Heads;
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

/// q (N, H·D) over the pools k, v (slots, KV·D) → (N, H·D); with a `window`, query i
/// sees only the last `window` of its `visible(i)` tokens (a local layer).
pub fn paged_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &Arc<PagedLayout>,
    heads: Heads,
    window: Option<usize>,
) -> Result<Tensor> {
    if window == Some(0) {
        return Err(Error::invalid(
            "paged attention: the window must be positive",
        ));
    }
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
                window,
            },
        )?);
    }
    composed(q, k, v, layout, heads, window)
}

/// The same attention from candle ops: each sequence's keys gathered, a mask for the
/// queries that see fewer of them (any device; scores in f32 for half precisions).
pub(crate) fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: &PagedLayout,
    heads: Heads,
    window: Option<usize>,
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
            let first = window.map_or(0, |w| (vis as usize).saturating_sub(w));
            mask[r * width..r * width + first].fill(MASKED as f32);
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
    window: Option<usize>,
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
        let out = kernel::forward(q, k, v, slots_in_pool, &self.layout, heads, self.window)?;
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
            // Windows that cut the prefill chunk's keys, and a local layer's of 1.
            for window in [Some(4), Some(1), Some(100)] {
                let fast = paged_attention(&q, &k, &v, &layout, heads, window).unwrap();
                let slow = composed(&q, &k, &v, &layout, heads, window).unwrap();
                let d = max_abs(&fast, &slow);
                assert!(d < 1e-5, "dim {dim}, window {window:?}: {d}");
            }
            // A window of one: each query returns its own (last) token's value rows.
            let own = paged_attention(&q, &k, &v, &layout, heads, Some(1)).unwrap();
            let v60 = v.narrow(0, 60, 1).unwrap().reshape((2, dim)).unwrap();
            let third = own.narrow(0, 2, 1).unwrap().reshape((6, dim)).unwrap();
            for h in 0..6 {
                let d = max_abs(
                    &third.narrow(0, h, 1).unwrap(),
                    &v60.narrow(0, h / 3, 1).unwrap(),
                );
                assert!(d < 1e-6, "dim {dim} head {h}: {d}");
            }
            let fast = paged_attention(&q, &k, &v, &layout, heads, None).unwrap();
            let slow = composed(&q, &k, &v, &layout, heads, None).unwrap();
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
        assert!(paged_attention(&q, &k, &k, &layout, heads, None).is_err());
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
            paged_attention(&q, k, k, &layout, heads, None)
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
        let y = paged_attention(&q, &k, &k, &none, heads, None).unwrap();
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
        let y = paged_attention(&q, &k, &k, &layout, flat, None).unwrap();
        assert_eq!(y.dims(), [1, 0]);
    }
}
