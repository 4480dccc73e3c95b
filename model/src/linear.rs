//! The linear layer y = x·Wᵀ as one autograd node with a hand-written backward.
//!
//! Through candle's generic ops, x.matmul(W.t()) hands W its gradient as a transposed
//! view, which candle then accumulates with a strided (cache-hostile) add and the
//! optimizer must copy again. This op computes the gradients in W's own layout:
//!
//!   ∂L/∂x = g·W          (rows, out)·(out, in)
//!   ∂L/∂W = gᵀ·x         (out, rows)·(rows, in), contiguous (out, in)
//!
//! The forward is the backend's own matmul on the storages, so every device candle
//! supports runs it; on a CPU with AVX-512 kernels, f32 products (forward and both
//! gradients) run on the packed-panel kernel instead ([`crate::product`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, MetalStorage, Shape, Tensor};

use crate::cpu_storage::contiguous;
use crate::error::Result;

/// x (rows, in) · wᵀ with w (out, in) → (rows, out), differentiable in x and w.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op2(w, Linear)?)
}

struct Linear;

fn dims(l1: &Layout, l2: &Layout) -> candle_core::Result<(usize, usize, usize, Layout)> {
    let (rows, k) = l1.shape().dims2()?;
    let (out, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input has {k} features, weight expects {k2}")
    }
    Ok((rows, out, k, l2.transpose(0, 1)?))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, out, k, wt) = dims(l1, l2)?;
        let panels = crate::simd::isa() == crate::simd::Isa::Avx512
            && l1.is_contiguous()
            && l2.is_contiguous();
        if let (CpuStorage::F32(_), CpuStorage::F32(_), true) = (s1, s2, panels) {
            let x = contiguous::<f32>(s1, l1, "linear")?;
            let w = contiguous::<f32>(s2, l2, "linear")?;
            let y = crate::product::x_wt_slices(x, rows, k, w, out)?;
            return Ok((CpuStorage::F32(y), Shape::from((rows, out))));
        }
        Ok((
            s1.matmul(s2, (1, rows, out, k), l1, &wt)?,
            Shape::from((rows, out)),
        ))
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, out, k, wt) = dims(l1, l2)?;
        Ok((
            s1.matmul(s2, (1, rows, out, k), l1, &wt)?,
            Shape::from((rows, out)),
        ))
    }

    fn metal_fwd(
        &self,
        s1: &MetalStorage,
        l1: &Layout,
        s2: &MetalStorage,
        l2: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let (rows, out, k, wt) = dims(l1, l2)?;
        Ok((
            s1.matmul(s2, (1, rows, out, k), l1, &wt)?,
            Shape::from((rows, out)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen weight (a LoRA base) or an input off the graph gets no gradient:
        // neither product is computed for it.
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let grad_x = need_x.then(|| crate::product::a_b(&g, &w)).transpose()?;
        let grad_w = need_w.then(|| crate::product::at_b(&g, &x)).transpose()?;
        Ok((grad_x, grad_w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn values_and_gradients_match_matmul() {
        let d = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (5, 7), d).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 7), d).unwrap()).unwrap();
        let c = Tensor::randn(0f64, 1.0, (5, 3), d).unwrap();
        let y1 = linear(&x, &w).unwrap();
        let y2 = x.matmul(&w.t().unwrap()).unwrap();
        let g1 = (&y1 * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-12, "{d}");
        };
        close(&y1, &y2);
        close(g1.get(&x).unwrap(), g2.get(&x).unwrap());
        let gw = g1.get(&w).unwrap();
        assert!(gw.is_contiguous());
        close(gw, g2.get(&w).unwrap());
    }
}
