//! y = x·Wᵀ for the batches the sampling engine runs (tens to hundreds of rows), on
//! CPU, with W packed once per weight version.
//!
//! A general GEMM repacks W into its kernel's panel layout on every call; with a few
//! dozen activation rows that repacking costs about as much as the product (W is read,
//! written and read again per call). Here W (N × K) is packed once into panels of 16
//! output columns, k-major: panel p holds W[16p + c][k] at `(p·K + k)·16 + c`. The
//! kernel keeps a 6 × 16 block of y in registers and, for each k, loads the panel's 16
//! weights once and broadcasts one x element per row:
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
use crate::transformer::Weights;

/// Output columns per panel.
const NR: usize = 16;
/// Rows per register block.
const MR: usize = 6;

/// A weight matrix W (N × K) packed into 16-column panels.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    n: usize,
    k: usize,
    data: Arc<Vec<f32>>,
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
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for c in 0..NR.min(n - p * NR) {
                    let row = &src[(p * NR + c) * k..(p * NR + c + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * NR + c] = v;
                    }
                }
            });
        Ok(PackedMatrix {
            n,
            k,
            data: Arc::new(data),
        })
    }

    /// Output width N.
    pub fn out_dim(&self) -> usize {
        self.n
    }

    /// x (rows, K) f32 → x·Wᵀ (rows, N).
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.contiguous()?.apply_op1_no_bwd(self)?)
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

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `off` must stay inside the output buffer.
    unsafe fn add(self, off: usize) -> Out {
        Out(unsafe { self.0.add(off) })
    }
}

/// y[r][c] = Σ_k x[r][k] · panel[k][c] for the `R` rows at `x` (leading dimension
/// `ldx`) and the first `cols` of the panel's 16 columns, into `y` (leading `ldy`).
#[inline(always)]
fn block_portable<const R: usize>(
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: Out,
    ldy: usize,
    cols: usize,
) {
    let mut acc = [[0f32; NR]; R];
    for kk in 0..k {
        let w = &panel[kk * NR..kk * NR + NR];
        for (r, a) in acc.iter_mut().enumerate() {
            let xv = x[r * ldx + kk];
            for c in 0..NR {
                a[c] += xv * w[c];
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: the caller owns columns ..cols of these R rows of y.
        unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), y.0.add(r * ldy), cols) };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const R: usize>(
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: Out,
    ldy: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() >= (R - 1) * ldx + k && panel.len() >= k * NR);
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    let (xp, wp) = (x.as_ptr(), panel.as_ptr());
    for kk in 0..k {
        // SAFETY: kk < k and the panel holds k·16 values; x holds R rows of k.
        unsafe {
            let w0 = _mm256_loadu_ps(wp.add(kk * NR));
            let w1 = _mm256_loadu_ps(wp.add(kk * NR + 8));
            for r in 0..R {
                let xb = _mm256_broadcast_ss(&*xp.add(r * ldx + kk));
                lo[r] = _mm256_fmadd_ps(xb, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(xb, w1, hi[r]);
            }
        }
    }
    for r in 0..R {
        // SAFETY: the caller owns columns ..cols of these R rows of y.
        unsafe {
            let dst = y.0.add(r * ldy);
            if cols == NR {
                _mm256_storeu_ps(dst, lo[r]);
                _mm256_storeu_ps(dst.add(8), hi[r]);
            } else {
                let mut tmp = [0f32; NR];
                _mm256_storeu_ps(tmp.as_mut_ptr(), lo[r]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi[r]);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, cols);
            }
        }
    }
}

/// One register block of `R` rows, on the best kernel the CPU has.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<const R: usize>(
    avx2: bool,
    x: &[f32],
    ldx: usize,
    panel: &[f32],
    k: usize,
    y: Out,
    ldy: usize,
    cols: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: only when the CPU reports AVX2 and FMA.
        return unsafe { block_avx2::<R>(x, ldx, panel, k, y, ldy, cols) };
    }
    let _ = avx2;
    block_portable::<R>(x, ldx, panel, k, y, ldy, cols)
}

impl PackedMatrix {
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
        let ys = multiply(&mats, &xs, rows, k)?;
        let mut out = Vec::with_capacity(N);
        for (y, m) in ys.into_iter().zip(mats) {
            out.push(Tensor::from_vec(y, (rows, m.n), x.device())?);
        }
        Ok(out.try_into().expect("one output per matrix"))
    }
}

/// y_m = x·W_mᵀ for each matrix m (all of width K) over `rows` rows of x: every
/// matrix's panels split across threads together.
fn multiply(
    mats: &[&PackedMatrix],
    x: &[f32],
    rows: usize,
    k: usize,
) -> candle_core::Result<Vec<Vec<f32>>> {
    if let Some(m) = mats.iter().find(|m| m.k != k) {
        candle_core::bail!("packed-matmul: x has {k} columns, W has {}", m.k)
    }
    let avx2 = crate::simd::avx2_fma();
    let mut ys: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; rows * m.n]).collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    let tasks: Vec<(usize, usize)> = mats
        .iter()
        .enumerate()
        .flat_map(|(i, m)| (0..m.n.div_ceil(NR)).map(move |p| (i, p)))
        .collect();
    tasks.into_par_iter().with_min_len(4).for_each(|(i, p)| {
        let (m, out) = (mats[i], outs[i]);
        let n = m.n;
        let panel = &m.data[p * k * NR..(p + 1) * k * NR];
        let cols = NR.min(n - p * NR);
        let mut r = 0;
        while r < rows {
            let xs = &x[r * k..];
            // SAFETY (pointer arithmetic): row r, column 16p lies inside y.
            let yo = unsafe { out.add(r * n + p * NR) };
            let take = MR.min(rows - r);
            match take {
                6 => block::<6>(avx2, xs, k, panel, k, yo, n, cols),
                5 => block::<5>(avx2, xs, k, panel, k, yo, n, cols),
                4 => block::<4>(avx2, xs, k, panel, k, yo, n, cols),
                3 => block::<3>(avx2, xs, k, panel, k, yo, n, cols),
                2 => block::<2>(avx2, xs, k, panel, k, yo, n, cols),
                _ => block::<1>(avx2, xs, k, panel, k, yo, n, cols),
            }
            r += take;
        }
    });
    Ok(ys)
}

impl CustomOp1 for PackedMatrix {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, self.name())?;
        let (rows, k) = l.shape().dims2()?;
        let y = multiply(&[self], x, rows, k)?.pop().expect("one output");
        Ok((CpuStorage::F32(y), Shape::from((rows, self.n))))
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
}
