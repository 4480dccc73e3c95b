//! y = x·Wᵀ for the few rows of a decode step, on CPU.
//!
//! A decode step multiplies 1–16 activation rows by every weight matrix: the work is
//! reading the weights, not arithmetic. The kernel ([`crate::kernels::decode_matmul`])
//! streams each weight row once, dots it with every activation row while it is in L1,
//! and splits the weight rows across threads, so a step costs about one pass over the
//! weights at the memory bandwidth of all cores. Inference only (no backward);
//! `transformer::project` uses it on detached weights and its results match the
//! differentiable matmul (tested).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::cpu_storage::contiguous;
use crate::error::Result;
use crate::kernels::decode_matmul as kernel;

/// The largest number of activation rows the kernel takes.
pub const MAX_ROWS: usize = 16;

/// Whether x (rows, k) · wᵀ can take this kernel.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 2
        && w.rank() == 2
        && x.dim(0).is_ok_and(|r| r <= MAX_ROWS)
        && w.is_contiguous()
}

/// x (rows, k) · wᵀ with w (n, k) → (rows, n).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2_no_bwd(w, &DecodeMatmul)?)
}

struct DecodeMatmul;

impl CustomOp2 for DecodeMatmul {
    fn name(&self) -> &'static str {
        "decode-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("decode-matmul: x has {k} columns, w has {k2}")
        }
        let x = contiguous::<f32>(s1, l1, self.name())?;
        let w = contiguous::<f32>(s2, l2, self.name())?;
        let y = kernel::matmul_t(x, w, (rows, n, k))?;
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_matmul() {
        for rows in [1, 3, 16] {
            let x = Tensor::randn(0f32, 1.0, (rows, 77), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (130, 77), &Device::Cpu).unwrap();
            let a = matmul_t(&x, &w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let b = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let d = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "rows {rows}: {d}");
        }
    }

    /// Zero rows, zero outputs or zero columns: the (rows, n) product, empty or all
    /// zeros, and no panic.
    #[test]
    fn empty_shapes_give_empty_or_zero_products() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(0, 130, 77), (0, 0, 0), (3, 0, 77), (3, 5, 0), (0, 5, 0)] {
            let x = Tensor::zeros((rows, k), candle_core::DType::F32, &dev).unwrap();
            let w = Tensor::ones((n, k), candle_core::DType::F32, &dev).unwrap();
            let y = matmul_t(&x, &w).unwrap();
            assert_eq!(y.dims(), [rows, n], "rows {rows} n {n} k {k}");
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                y.iter().all(|&v| v == 0.0),
                "rows {rows} n {n} k {k}: {y:?}"
            );
        }
    }
}
