//! Rotary position embeddings on packed rows, as one autograd node.
//!
//! x is (T, n·D): T tokens, n heads of D dims; cos and sin are (T, D/2), gathered at
//! each token's position. In the "rotate half" layout (Hugging Face's), for i < D/2:
//!
//!   y_i       = x_i · cos_i − x_{i+D/2} · sin_i
//!   y_{i+D/2} = x_{i+D/2} · cos_i + x_i · sin_i
//!
//! y = R(θ)·x with R a rotation, so ∂L/∂x = R(θ)ᵀ·g = R(−θ)·g: the backward is the same
//! kernel with sin negated. cos and sin are constants (no gradient).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{float_kernel, on_cpu_kernel, Elem};
use crate::error::Result;

/// RoPE of x (T, heads·head_dim) with cos, sin (T, head_dim / 2); differentiable in x.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (cos, sin) = (cos.detach(), sin.detach());
    if on_cpu_kernel(x) && x.dtype() == cos.dtype() {
        return Ok(x.contiguous()?.apply_op3(
            &cos.contiguous()?,
            &sin.contiguous()?,
            Rotary {
                heads,
                inverse: false,
            },
        )?);
    }
    composed(x, &cos, &sin, heads)
}

/// The same rotation from candle ops.
pub(crate) fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (t, width) = x.dims2()?;
    let d = width / heads;
    let x = x.reshape((t, heads, d))?;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?.reshape((t, width))?)
}

struct Rotary {
    heads: usize,
    /// Rotate by −θ (the backward).
    inverse: bool,
}

fn kernel<T: Elem>(
    x: &[T],
    (cos, sin): (&[T], &[T]),
    heads: usize,
    half: usize,
    inverse: bool,
) -> Vec<T> {
    let width = heads * 2 * half;
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .enumerate()
        .for_each(|(t, (o, row))| {
            let c = &cos[t * half..][..half];
            let s = &sin[t * half..][..half];
            for (o, xh) in o.chunks_mut(2 * half).zip(row.chunks(2 * half)) {
                let (x1, x2) = xh.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                for i in 0..half {
                    let si = if inverse { -s[i] } else { s[i] };
                    o1[i] = x1[i] * c[i] - x2[i] * si;
                    o2[i] = x2[i] * c[i] + x1[i] * si;
                }
            }
        });
    out
}

impl CustomOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rotary"
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
        let (t, width) = l1.shape().dims2()?;
        let (t2, half) = l2.shape().dims2()?;
        if t != t2 || width != self.heads * 2 * half || l3.shape() != l2.shape() {
            candle_core::bail!(
                "rotary: x {:?}, cos {:?}, sin {:?} do not fit {} heads",
                l1.shape(),
                l2.shape(),
                l3.shape(),
                self.heads
            )
        }
        let storage = float_kernel!(self.name(); s1: l1, s2: l2, s3: l3 =>
            |x, cos, sin| kernel(x, (cos, sin), self.heads, half, self.inverse));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = g.contiguous()?.apply_op3_no_bwd(
            cos,
            sin,
            &Rotary {
                heads: self.heads,
                inverse: !self.inverse,
            },
        )?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_against_composed, check_finite_differences};

    #[test]
    fn matches_composed_and_finite_differences() {
        // Angles as a real table would hold them (cos² + sin² = 1 is not assumed).
        let f = |xs: &[Tensor]| rotary(&xs[0], &xs[1], &xs[2], 3);
        // cos and sin are constants of the model: neither form differentiates them.
        let c = |xs: &[Tensor]| composed(&xs[0], &xs[1].detach(), &xs[2].detach(), 3);
        check_against_composed(&[&[5, 12], &[5, 2], &[5, 2]], f, c);
        check_finite_differences(&[&[4, 12], &[4, 2], &[4, 2]], f);
    }
}
