//! RMSNorm as one autograd node.
//!
//! For a row x ∈ ℝᵈ and weight w, with r = 1 / sqrt(mean(x²) + ε):
//!
//!   y_j = x_j · r · w_j
//!   ∂L/∂x_j = r · w_j · g_j − x_j · r³ · (Σ_k g_k w_k x_k) / d
//!   ∂L/∂w_j = Σ_rows g_j · x_j · r
//!
//! r is recomputed in the backward (one pass over the row), so nothing but the input
//! is kept.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{float_kernel, on_cpu_kernel, split_flat, Elem};
use crate::error::Result;

/// RMSNorm of x (..., d) with weight w (d), differentiable in both. Half precisions
/// and non-CPU devices compute in f32 through composed ops (`fused` = candle's
/// inference kernel, no backward).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if on_cpu_kernel(x) && x.dtype() == w.dtype() {
        let dims = x.dims().to_vec();
        let d = *dims.last().unwrap_or(&0);
        let x2 = x.reshape((x.elem_count() / d.max(1), d))?.contiguous()?;
        return Ok(x2
            .apply_op2(&w.contiguous()?, RmsNorm { eps })?
            .reshape(dims)?);
    }
    composed(x, w, eps, fused)
}

/// The same formula from candle ops, in at least f32.
pub(crate) fn composed(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if fused && x.dtype() != DType::F64 {
        return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, w, eps as f32)?);
    }
    let dtype = x.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xf = x.to_dtype(compute)?;
    let denom = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
    let normed = xf.broadcast_div(&denom)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(w)?)
}

struct RmsNorm {
    eps: f64,
}

/// r = 1 / sqrt(mean(x²) + ε) of one row, accumulated in f64.
fn inv_rms<T: Elem>(row: &[T], eps: f64) -> f64 {
    let ss: f64 = row.iter().map(|&v| v.to_f64() * v.to_f64()).sum();
    1.0 / (ss / row.len() as f64 + eps).sqrt()
}

fn fwd_kernel<T: Elem>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| {
            let r = T::from_f64(inv_rms(row, eps));
            for ((o, &xv), &wv) in o.iter_mut().zip(row).zip(w) {
                *o = xv * r * wv;
            }
        });
    out
}

/// [dx (N·d), dw (d)] flattened.
fn bwd_kernel<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let d = w.len();
    let n = x.len() / d.max(1);
    let mut out = vec![T::zero(); x.len() + d];
    let (dx, dw) = out.split_at_mut(x.len());
    // Rows in chunks: each chunk writes its dx rows and returns its partial dw.
    let chunk = n.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(chunk * d)
        .zip(x.par_chunks(chunk * d).zip(g.par_chunks(chunk * d)))
        .map(|(dx, (x, g))| {
            let mut dw = vec![0f64; d];
            for ((dx, x), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
                let r = inv_rms(x, eps);
                let dot: f64 = (0..d)
                    .map(|j| g[j].to_f64() * w[j].to_f64() * x[j].to_f64())
                    .sum();
                let c = T::from_f64(r * r * r * dot / d as f64);
                let rt = T::from_f64(r);
                for j in 0..d {
                    dx[j] = rt * w[j] * g[j] - x[j] * c;
                    dw[j] += g[j].to_f64() * x[j].to_f64() * r;
                }
            }
            dw
        })
        .collect();
    for p in partials {
        for (o, v) in dw.iter_mut().zip(p) {
            *o += T::from_f64(v);
        }
    }
    out
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage =
            float_kernel!(self.name(); s1: l1, s2: l2 => |x, w| fwd_kernel(x, w, self.eps));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = x.apply_op3_no_bwd(w, &g.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        let parts = split_flat(&flat, &[x.dims(), w.dims()])?;
        // A frozen weight (a LoRA base) gets no gradient.
        let dw = w.track_op().then(|| parts[1].clone());
        Ok((Some(parts[0].clone()), dw))
    }
}

struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
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
        let storage = float_kernel!(self.name(); s1: l1, s2: l2, s3: l3 =>
            |x, w, g| bwd_kernel(x, w, g, self.eps));
        Ok((
            storage,
            Shape::from(l1.shape().elem_count() + l2.shape().elem_count()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_against_composed, check_finite_differences};

    #[test]
    fn matches_composed_and_finite_differences() {
        let f = |xs: &[Tensor]| rms_norm(&xs[0], &xs[1], 1e-5, false);
        let c = |xs: &[Tensor]| composed(&xs[0], &xs[1], 1e-5, false);
        check_against_composed(&[&[5, 7], &[7]], f, c);
        check_finite_differences(&[&[3, 6], &[6]], f);
    }
}
