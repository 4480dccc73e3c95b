//! y = x·Wᵀ for the batches the sampling engine runs (tens to hundreds of rows), on
//! CPU, with W packed once per weight version.
//!
//! A general GEMM repacks W into its kernel's panel layout on every call; with a few
//! dozen activation rows that repacking costs about as much as the product (W is read,
//! written and read again per call). Here W (N × K) is packed once into panels of 16
//! output columns, k-major, and the kernel ([`crate::kernels::packed_matmul`]) keeps a
//! 6 × 16 block of y in registers:
//!
//!   y[r][16p + c] = Σ_k x[r][k] · W[16p + c][k]
//!
//! so every weight loaded feeds six rows, and x (rows × K) stays in cache while the
//! panels stream. Panels are split across threads. Inference only (no backward); the
//! engine repacks when the parameters are assigned ([`crate::params::ParamStore`]'s
//! generation changes) and the result matches the differentiable matmul (tested).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_storage::{contiguous, cpu_slice};
use crate::error::{Error, Result};
use crate::kernels::packed_matmul::{multiply, Panels};
use crate::transformer::Weights;

/// A weight matrix W (N × K) packed into 16-column panels.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    panels: Panels,
}

impl PackedMatrix {
    /// Packs w (N, K), f32 on the CPU.
    pub fn pack(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !w.device().is_cpu() || w.dtype() != candle_core::DType::F32 {
            return Err(Error::invalid("packed matmul: f32 weights on the CPU only"));
        }
        let w = w.contiguous()?;
        let src = cpu_slice::<f32>(&w, "packed matmul")?;
        Ok(PackedMatrix {
            panels: Panels::pack(&src, n, k)?,
        })
    }

    /// Output width N.
    pub fn out_dim(&self) -> usize {
        self.panels.out_dim()
    }

    /// x (rows, K) f32 → x·Wᵀ (rows, N).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
    }

    /// x (rows, K) f32 → [x·W₁ᵀ, x·W₂ᵀ, …] for matrices of the same K, in one parallel
    /// pass over all their panels: one hand-off between threads instead of one per
    /// matrix, and the small matrices' few panels balance across threads with the
    /// large ones' (Q, K and V of a layer; its gate and up projections).
    pub fn matmul_each<const N: usize>(
        mats: [&PackedMatrix; N],
        x: &Tensor,
    ) -> Result<[Tensor; N]> {
        let (rows, k) = x.dims2()?;
        let x = x.contiguous()?;
        let xs = cpu_slice::<f32>(&x, "packed matmul")?;
        let ys = multiply(&mats.map(|m| &m.panels), &xs, rows, k)?;
        let mut out = Vec::with_capacity(N);
        for (y, m) in ys.into_iter().zip(mats) {
            out.push(Tensor::from_vec(y, (rows, m.out_dim()), x.device())?);
        }
        Ok(out.try_into().expect("one output per matrix"))
    }
}

/// One decoder layer's projections, packed.
#[derive(Clone, Debug)]
pub struct PackedLayer {
    pub q: PackedMatrix,
    pub k: PackedMatrix,
    pub v: PackedMatrix,
    pub o: PackedMatrix,
    pub gate: PackedMatrix,
    pub up: PackedMatrix,
    pub down: PackedMatrix,
}

/// Packed copies of a model's projections, rebuilt when the parameters change.
#[derive(Clone, Debug, Default)]
pub struct PackedWeights {
    generation: Option<u64>,
    layers: Vec<Arc<PackedLayer>>,
    head: Option<PackedMatrix>,
}

impl PackedWeights {
    /// `w` (inference weights of `model`) with the packed projections attached,
    /// packing them first if the parameters changed since the last call. Only f32 on
    /// the CPU is packed; anything else returns `w` unchanged.
    pub fn attach(&mut self, model: &crate::Model, mut w: Weights) -> Result<Weights> {
        if !model.device().is_cpu() || model.dtype() != candle_core::DType::F32 {
            return Ok(w);
        }
        let generation = model.params().generation();
        if self.generation != Some(generation) {
            self.layers = w
                .layers
                .par_iter()
                .map(|l| {
                    Ok(Arc::new(PackedLayer {
                        q: PackedMatrix::pack(&l.q)?,
                        k: PackedMatrix::pack(&l.k)?,
                        v: PackedMatrix::pack(&l.v)?,
                        o: PackedMatrix::pack(&l.o)?,
                        gate: PackedMatrix::pack(&l.gate)?,
                        up: PackedMatrix::pack(&l.up)?,
                        down: PackedMatrix::pack(&l.down)?,
                    }))
                })
                .collect::<Result<_>>()?;
            self.head = Some(PackedMatrix::pack(w.head())?);
            self.generation = Some(generation);
        }
        for (l, p) in w.layers.iter_mut().zip(&self.layers) {
            l.packed = Some(p.clone());
        }
        w.head_packed = self.head.clone();
        Ok(w)
    }
}

impl CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, self.name())?;
        let (rows, k) = l.shape().dims2()?;
        let y = multiply(&[&self.panels], x, rows, k)?
            .pop()
            .expect("one output");
        Ok((CpuStorage::F32(y), Shape::from((rows, self.out_dim()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_matmul_for_every_row_block_and_column_tail() {
        for (rows, n, k) in [(1, 16, 8), (7, 37, 19), (64, 130, 77), (13, 5, 3)] {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let a = PackedMatrix::pack(&w)
                .unwrap()
                .matmul(&x)
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
            assert!(d < 1e-4, "rows {rows} n {n} k {k}: {d}");
        }
    }

    #[test]
    fn several_matrices_in_one_pass_equal_each_alone() {
        let x = Tensor::randn(0f32, 1.0, (11, 40), &Device::Cpu).unwrap();
        let ws: Vec<Tensor> = [48, 5, 16]
            .iter()
            .map(|&n| Tensor::randn(0f32, 1.0, (n, 40), &Device::Cpu).unwrap())
            .collect();
        let ps: Vec<PackedMatrix> = ws.iter().map(|w| PackedMatrix::pack(w).unwrap()).collect();
        let ys = PackedMatrix::matmul_each([&ps[0], &ps[1], &ps[2]], &x).unwrap();
        for (y, p) in ys.iter().zip(&ps) {
            let alone = p.matmul(&x).unwrap();
            assert_eq!(y.dims(), alone.dims());
            let same = y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == alone.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(same, "the pass over several matrices changed a product");
        }
        let other = PackedMatrix::pack(
            &Tensor::zeros((4, 39), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert!(PackedMatrix::matmul_each([&ps[0], &other], &x).is_err());
    }

    /// Zero rows, zero outputs or zero columns: packing and the product give the
    /// (rows, n) result, empty or all zeros, and no panic.
    #[test]
    fn empty_shapes_give_empty_or_zero_products() {
        let dev = Device::Cpu;
        for (rows, n, k) in [(0, 37, 19), (0, 0, 0), (5, 0, 19), (5, 37, 0), (0, 37, 0)] {
            let x = Tensor::ones((rows, k), candle_core::DType::F32, &dev).unwrap();
            let w = Tensor::ones((n, k), candle_core::DType::F32, &dev).unwrap();
            let p = PackedMatrix::pack(&w).unwrap();
            let [y, z] = PackedMatrix::matmul_each([&p, &p], &x).unwrap();
            for y in [p.matmul(&x).unwrap(), y, z] {
                assert_eq!(y.dims(), [rows, n], "rows {rows} n {n} k {k}");
                let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(
                    y.iter().all(|&v| v == 0.0),
                    "rows {rows} n {n} k {k}: {y:?}"
                );
            }
        }
    }
}
