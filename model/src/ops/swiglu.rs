//! The SwiGLU gate silu(a) · b as one autograd node.
//!
//! With σ the logistic function and silu(a) = a·σ(a):
//!
//!   y = silu(a) · b
//!   ∂L/∂a = g · b · σ(a) · (1 + a · (1 − σ(a)))
//!   ∂L/∂b = g · silu(a)

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{float_kernel, on_cpu_kernel, split_flat, Elem};
use crate::error::Result;

/// silu(a) · b for a and b of one shape, differentiable in both.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if on_cpu_kernel(a) && a.dtype() == b.dtype() && a.dims() == b.dims() {
        return Ok(a.contiguous()?.apply_op2(&b.contiguous()?, SwiGlu)?);
    }
    composed(a, b)
}

/// The same product from candle ops.
pub(crate) fn composed(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a.silu()? * b)?)
}

struct SwiGlu;

fn sigmoid<T: Elem>(a: T) -> T {
    T::one() / (T::one() + (-a).exp())
}

const CHUNK: usize = 4096;

fn fwd_kernel<T: Elem>(a: &[T], b: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a * sigmoid(a) * b;
            }
        });
    out
}

/// [da, db] flattened.
fn bwd_kernel<T: Elem>(a: &[T], b: &[T], g: &[T]) -> Vec<T> {
    let n = a.len();
    let mut out = vec![T::zero(); 2 * n];
    let (da, db) = out.split_at_mut(n);
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((da, db), (a, b)), g)| {
            for i in 0..a.len() {
                let s = sigmoid(a[i]);
                da[i] = g[i] * b[i] * s * (T::one() + a[i] * (T::one() - s));
                db[i] = g[i] * a[i] * s;
            }
        });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = float_kernel!(self.name(); s1: l1, s2: l2 => |a, b| fwd_kernel(a, b));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = a.apply_op3_no_bwd(b, &g.contiguous()?, &SwiGluGrad)?;
        let parts = split_flat(&flat, &[a.dims(), b.dims()])?;
        Ok((Some(parts[0].clone()), Some(parts[1].clone())))
    }
}

struct SwiGluGrad;

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "swiglu-grad"
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
        let storage =
            float_kernel!(self.name(); s1: l1, s2: l2, s3: l3 => |a, b, g| bwd_kernel(a, b, g));
        Ok((storage, Shape::from(2 * l1.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_against_composed, check_finite_differences};

    #[test]
    fn matches_composed_and_finite_differences() {
        let f = |xs: &[Tensor]| swiglu(&xs[0], &xs[1]);
        let c = |xs: &[Tensor]| composed(&xs[0], &xs[1]);
        check_against_composed(&[&[6, 9], &[6, 9]], f, c);
        check_finite_differences(&[&[3, 5], &[3, 5]], f);
    }
}
