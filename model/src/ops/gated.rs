//! The gate of a gated MLP, act(a) · b, as one autograd node: SwiGLU (silu) and
//! GeGLU (the tanh approximation of GELU, Gemma 3's `gelu_pytorch_tanh`).
//!
//! With σ the logistic function and silu(a) = a·σ(a):
//!
//!   y = silu(a) · b
//!   ∂L/∂a = g · b · σ(a) · (1 + a · (1 − σ(a)))
//!   ∂L/∂b = g · silu(a)
//!
//! With u = √(2/π) (a + 0.044715 a³), t = tanh(u), gelu(a) = ½ a (1 + t):
//!
//!   y = gelu(a) · b
//!   ∂L/∂a = g · b · (½ (1 + t) + ½ a (1 − t²) √(2/π) (1 + 3 · 0.044715 a²))
//!   ∂L/∂b = g · gelu(a)
//!
//! (candle's own GELU backward uses constants rounded to six digits: its gradients
//! are off by about 1e-6 relative, which the exact derivative here is not.)

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{float_kernel, on_cpu_kernel, split_flat, Elem};
use crate::config::Activation;
use crate::error::Result;

/// act(a) · b for a and b of one shape, differentiable in both.
pub fn gated(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    if on_cpu_kernel(a) && a.dtype() == b.dtype() && a.dims() == b.dims() {
        return Ok(a.contiguous()?.apply_op2(&b.contiguous()?, Gated(act))?);
    }
    composed(a, b, act)
}

/// The same product from candle ops (GELU written out: candle's `gelu` backward
/// rounds its constants).
pub(crate) fn composed(a: &Tensor, b: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Silu => Ok((a.silu()? * b)?),
        Activation::GeluTanh => {
            let inner = (a + (a.sqr()? * a)?.affine(GELU_CUBIC, 0.0)?)?;
            let t = inner.affine(SQRT_2_OVER_PI, 0.0)?.tanh()?;
            let gelu = (a * t.affine(0.5, 0.5)?)?;
            Ok((gelu * b)?)
        }
    }
}

struct Gated(Activation);

fn sigmoid<T: Elem>(a: T) -> T {
    T::one() / (T::one() + (-a).exp())
}

/// √(2/π) and the cubic coefficient of the tanh GELU.
const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

/// (gelu(a), gelu′(a)) of the tanh GELU.
#[inline(always)]
fn gelu_and_slope<T: Elem>(a: T) -> (T, T) {
    let (k, c, half) = (
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(GELU_CUBIC),
        T::from_f64(0.5),
    );
    let t = (k * (a + c * a * a * a)).tanh();
    let slope = half * (T::one() + t)
        + half * a * (T::one() - t * t) * k * (T::one() + T::from_f64(3.0) * c * a * a);
    (half * a * (T::one() + t), slope)
}

const CHUNK: usize = 4096;

fn fwd_kernel<T: Elem>(act: Activation, a: &[T], b: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| match act {
            Activation::Silu => {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = a * sigmoid(a) * b;
                }
            }
            Activation::GeluTanh => {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = gelu_and_slope(a).0 * b;
                }
            }
        });
    out
}

/// [da, db] flattened.
fn bwd_kernel<T: Elem>(act: Activation, a: &[T], b: &[T], g: &[T]) -> Vec<T> {
    let n = a.len();
    let mut out = vec![T::zero(); 2 * n];
    let (da, db) = out.split_at_mut(n);
    da.par_chunks_mut(CHUNK)
        .zip(db.par_chunks_mut(CHUNK))
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((da, db), (a, b)), g)| match act {
            // SwiGLU's products in the order they always had (bit-identical training).
            Activation::Silu => {
                for i in 0..a.len() {
                    let s = sigmoid(a[i]);
                    da[i] = g[i] * b[i] * s * (T::one() + a[i] * (T::one() - s));
                    db[i] = g[i] * a[i] * s;
                }
            }
            Activation::GeluTanh => {
                for i in 0..a.len() {
                    let (y, slope) = gelu_and_slope(a[i]);
                    da[i] = g[i] * b[i] * slope;
                    db[i] = g[i] * y;
                }
            }
        });
    out
}

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        match self.0 {
            Activation::Silu => "swiglu",
            Activation::GeluTanh => "geglu",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let storage = float_kernel!(self.name(); s1: l1, s2: l2 => |a, b| fwd_kernel(self.0, a, b));
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flat = a.apply_op3_no_bwd(b, &g.contiguous()?, &GatedGrad(self.0))?;
        let parts = split_flat(&flat, &[a.dims(), b.dims()])?;
        Ok((Some(parts[0].clone()), Some(parts[1].clone())))
    }
}

struct GatedGrad(Activation);

impl CustomOp3 for GatedGrad {
    fn name(&self) -> &'static str {
        "gated-grad"
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
        let storage = float_kernel!(self.name(); s1: l1, s2: l2, s3: l3 => |a, b, g| bwd_kernel(self.0, a, b, g));
        Ok((storage, Shape::from(2 * l1.shape().elem_count())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tests::{check_against_composed, check_finite_differences};

    #[test]
    fn matches_composed_and_finite_differences() {
        for act in [Activation::Silu, Activation::GeluTanh] {
            let f = |xs: &[Tensor]| gated(&xs[0], &xs[1], act);
            let c = |xs: &[Tensor]| composed(&xs[0], &xs[1], act);
            check_against_composed(&[&[6, 9], &[6, 9]], f, c);
            check_finite_differences(&[&[3, 5], &[3, 5]], f);
        }
    }

    /// The tanh GELU against its definition at a few points (and the well-known
    /// values gelu(0) = 0, gelu(a) → a for large a, → 0 for very negative a).
    #[test]
    fn the_tanh_gelu_is_pytorchs() {
        for a in [-6.0f64, -1.5, -0.3, 0.0, 0.7, 2.0, 8.0] {
            let (y, _) = gelu_and_slope(a);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (a + 0.044715 * a.powi(3));
            assert!((y - 0.5 * a * (1.0 + u.tanh())).abs() < 1e-15, "{a}");
        }
        assert_eq!(gelu_and_slope(0.0f64).0, 0.0);
        assert!((gelu_and_slope(8.0f64).0 - 8.0).abs() < 1e-12);
    }
}
