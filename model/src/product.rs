//! The three f32 products of a linear layer's training step on CPUs whose kernels are
//! AVX-512 ([`crate::simd::isa`]), on the packed-panel kernel
//! ([`crate::kernels::packed_matmul`]) instead of the backend's GEMM:
//!
//!   forward  y  = x·Wᵀ     W (out, in) packed as it is stored
//!   backward ∂x = g·W      W read as Wᵀ's panels (rows of W copied, no transpose)
//!   backward ∂W = gᵀ·x     x read as panels, gᵀ made contiguous (out, rows)
//!
//! candle's CPU matmul runs the `gemm` crate, whose AVX-512 kernels need a nightly
//! compiler: on a stable build it multiplies 8 lanes at a time, and the training step
//! spends half its time there. The panel kernel keeps a 12 × 16 block of the product in
//! AVX-512 registers and reaches about 1.6× that rate on the development VM
//! (docs/benchmarks.md); packing costs one pass over the packed operand per call.
//! Elsewhere (AVX2, other dtypes, strided inputs, other devices) each product is the
//! backend's matmul, as before.

use candle_core::{DType, Tensor};

use crate::cpu_storage::cpu_slice;
use crate::kernels::packed_matmul::{multiply, Panels};
use crate::simd::{isa, Isa};

/// Whether `ts` take the panel kernel: f32, contiguous, on the CPU, with AVX-512
/// kernels in use.
fn on_panels(ts: &[&Tensor]) -> bool {
    isa() == Isa::Avx512
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// y (rows, n) = a (rows, k) · b (k, n).
pub fn a_b(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !on_panels(&[a, b]) {
        return a.matmul(b);
    }
    panels_a_b(a, b)
}

/// y (m, n) = aᵀ · b with a (k, m) and b (k, n): a weight's gradient gᵀ·x.
pub fn at_b(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !on_panels(&[a, b]) {
        return a.t()?.matmul(b);
    }
    panels_at_b(a, b)
}

/// x·Wᵀ on the panel kernel (f32, contiguous, CPU), as [`crate::linear`]'s forward
/// computes it on the storages.
#[cfg(test)]
fn panels_x_wt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, k), (n, k2)) = (x.dims2()?, w.dims2()?);
    check(k, k2, "x·Wᵀ")?;
    let y = x_wt_slices(
        &cpu_slice::<f32>(x, "x·Wᵀ")?,
        rows,
        k,
        &cpu_slice::<f32>(w, "x·Wᵀ")?,
        n,
    )?;
    Tensor::from_vec(y, (rows, n), x.device())
}

/// x (rows × k) · wᵀ with w (n × k), both row-major slices, on the panel kernel: the
/// forward of [`crate::linear`] on the storages.
pub(crate) fn x_wt_slices(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
) -> candle_core::Result<Vec<f32>> {
    let panels = Panels::pack(w, n, k).map_err(msg)?;
    Ok(multiply(&[&panels], x, rows, k)?
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// [`a_b`] on the panel kernel.
fn panels_a_b(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let ((rows, k), (k2, n)) = (a.dims2()?, b.dims2()?);
    check(k, k2, "a·b")?;
    let panels = Panels::pack_transposed(&cpu_slice::<f32>(b, "a·b")?, k, n).map_err(msg)?;
    let y = multiply(&[&panels], &cpu_slice::<f32>(a, "a·b")?, rows, k)?;
    out(y, (rows, n), a)
}

/// [`at_b`] on the panel kernel.
fn panels_at_b(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let ((k, m), (k2, n)) = (a.dims2()?, b.dims2()?);
    check(k, k2, "aᵀ·b")?;
    let panels = Panels::pack_transposed(&cpu_slice::<f32>(b, "aᵀ·b")?, k, n).map_err(msg)?;
    let at = a.t()?.contiguous()?;
    let y = multiply(&[&panels], &cpu_slice::<f32>(&at, "aᵀ·b")?, m, k)?;
    out(y, (m, n), a)
}

fn check(k: usize, k2: usize, what: &str) -> candle_core::Result<()> {
    if k != k2 {
        candle_core::bail!("{what}: inner dimensions {k} and {k2} differ")
    }
    Ok(())
}

/// A kernel's error as candle's (these products run inside candle's backward).
fn msg(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

fn out(y: Vec<Vec<f32>>, shape: (usize, usize), like: &Tensor) -> candle_core::Result<Tensor> {
    let y = y.into_iter().next().unwrap_or_default();
    Tensor::from_vec(y, shape, like.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor, what: &str) {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d <= 1e-5 * (1.0 + scale), "{what}: {d} (scale {scale})");
    }

    /// Each product on the panel kernel (whatever this CPU's kernels) and on the path
    /// this CPU takes equals candle's matmul (in f32, up to summation order), with
    /// shapes that end in short panels and blocks; mismatched shapes are refused.
    #[test]
    fn the_products_match_the_backend_matmul() {
        let d = &Device::Cpu;
        let (rows, k, n) = (37, 70, 45);
        let x = Tensor::randn(0f32, 1.0, (rows, k), d).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), d).unwrap();
        let g = Tensor::randn(0f32, 1.0, (rows, n), d).unwrap();
        let want = [
            x.matmul(&w.t().unwrap()).unwrap(),
            g.matmul(&w).unwrap(),
            g.t().unwrap().matmul(&x).unwrap(),
        ];
        let panels = [
            panels_x_wt(&x, &w).unwrap(),
            panels_a_b(&g, &w).unwrap(),
            panels_at_b(&g, &x).unwrap(),
        ];
        let dispatched = [
            crate::linear::linear(&x, &w).unwrap(),
            a_b(&g, &w).unwrap(),
            at_b(&g, &x).unwrap(),
        ];
        for (i, what) in ["x·Wᵀ", "g·W", "gᵀ·x"].into_iter().enumerate() {
            close(&panels[i], &want[i], what);
            close(&dispatched[i], &want[i], what);
        }
        assert!(panels_x_wt(&x, &g).is_err());
        assert!(panels_at_b(&x, &w).is_err());
        assert!(panels_a_b(&x, &x).is_err());
    }
}
