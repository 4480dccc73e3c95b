//! Fused training ops with hand-written backwards: RMSNorm, rotary embeddings, the
//! gated MLP's activation (SwiGLU, GeGLU) and attention over packed segments.
//!
//! candle's autograd records every elementary op of a composed layer: an output
//! allocation per op, a zero-filled gradient buffer per input, and the backward of
//! each op on top. Each op here is one node whose backward computes the input
//! gradients directly from the inputs (recomputing cheap intermediates instead of
//! keeping them). The CPU kernels take f32 and f64; every other device or dtype (CUDA,
//! bf16) runs the same formula composed of differentiable candle ops, so a model
//! trains everywhere. Every op is checked against the composed formula and against
//! f64 central differences.

pub mod attention;
pub mod gated;
pub mod rms_norm;
pub mod rotary;

use candle_core::{DType, Tensor, WithDType};
use num_traits::Float;

/// The element types of the CPU kernels.
pub(crate) trait Elem:
    Float + WithDType + Send + Sync + std::ops::AddAssign + std::ops::MulAssign + 'static
{
}
impl Elem for f32 {}
impl Elem for f64 {}

/// A CPU op's storage: `kernel` run on the inputs' elements as f32 or as f64 (every
/// input of one dtype), `|s1: l1, s2: l2| => |a, b| kernel(a, b, …)`; any other dtype is
/// an error naming the op.
macro_rules! float_kernel {
    ($name:expr; $($s:ident : $l:ident),+ => |$($x:ident),+| $body:expr) => {
        match $crate::ops::common_float(&[$($s),+]) {
            Some(candle_core::DType::F32) => {
                $(let $x: &[f32] = $crate::cpu_storage::contiguous($s, $l, $name)?;)+
                candle_core::CpuStorage::F32($body)
            }
            Some(candle_core::DType::F64) => {
                $(let $x: &[f64] = $crate::cpu_storage::contiguous($s, $l, $name)?;)+
                candle_core::CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 on the CPU only", $name),
        }
    };
}
pub(crate) use float_kernel;

/// The dtype of `storages` when they all hold f32 or all f64.
pub(crate) fn common_float(storages: &[&candle_core::CpuStorage]) -> Option<DType> {
    use candle_core::backend::BackendStorage;
    let d = storages.first()?.dtype();
    (matches!(d, DType::F32 | DType::F64) && storages.iter().all(|s| s.dtype() == d)).then_some(d)
}

/// Whether the CPU kernels serve `t`: f32 or f64 on the CPU.
pub(crate) fn on_cpu_kernel(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// Splits a flat gradient buffer into tensors of the given shapes (views, no copy).
pub(crate) fn split_flat(flat: &Tensor, shapes: &[&[usize]]) -> candle_core::Result<Vec<Tensor>> {
    let mut offset = 0;
    let mut out = Vec::with_capacity(shapes.len());
    for shape in shapes {
        let n: usize = shape.iter().product();
        out.push(flat.narrow(0, offset, n)?.reshape(*shape)?);
        offset += n;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    type Op<'a> = &'a dyn Fn(&[Tensor]) -> crate::Result<Tensor>;

    fn inputs(shapes: &[&[usize]], dtype: DType, seed: u64) -> Vec<Var> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        shapes
            .iter()
            .map(|s| {
                let n: usize = s.iter().product();
                let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.5..1.5)).collect();
                let t = Tensor::from_vec(data, *s, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                Var::from_tensor(&t).unwrap()
            })
            .collect()
    }

    /// Σ y ∘ c for a fixed pseudo-random c: a loss whose gradient reaches every output.
    fn probe_loss(y: &Tensor) -> Tensor {
        let n = y.elem_count();
        let c: Vec<f64> = (0..n)
            .map(|i| ((i * 7919 % 13) as f64 - 6.0) / 6.0)
            .collect();
        let c = Tensor::from_vec(c, y.dims(), y.device())
            .unwrap()
            .to_dtype(y.dtype())
            .unwrap();
        (y * c).unwrap().sum_all().unwrap()
    }

    /// max |a − b| over every element, in f64.
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// The fused op and its composed formula agree in value and in every input's
    /// gradient, in f64 (to 1e-10) and f32 (to 1e-4).
    pub fn check_against_composed(
        shapes: &[&[usize]],
        fused: impl Fn(&[Tensor]) -> crate::Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> crate::Result<Tensor>,
    ) {
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let vars = inputs(shapes, dtype, 7);
            let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let ops: [Op; 2] = [&fused, &composed];
            let [(y1, g1), (y2, g2)] = ops.map(|f| {
                let y = f(&xs).unwrap();
                let g = probe_loss(&y).backward().unwrap();
                (y, g)
            });
            let d = max_diff(&y1, &y2);
            assert!(d < tol, "{dtype:?}: values differ by {d}");
            for (i, v) in vars.iter().enumerate() {
                match (g1.get(v), g2.get(v)) {
                    (Some(a), Some(b)) => {
                        let d = max_diff(a, b);
                        assert!(d < tol, "{dtype:?}: gradient of input {i} differs by {d}");
                    }
                    (None, Some(b)) => {
                        let zero = b.abs().unwrap().sum_all().unwrap();
                        let zero = zero.to_dtype(DType::F64).unwrap().to_scalar::<f64>();
                        assert!(zero.unwrap() < tol, "input {i}: fused op gives no gradient");
                    }
                    _ => {}
                }
            }
        }
    }

    /// Autograd against central differences (h = 1e-6, f64) for every element of every
    /// input that has a gradient: absolute error below 1e-7.
    pub fn check_finite_differences(
        shapes: &[&[usize]],
        op: impl Fn(&[Tensor]) -> crate::Result<Tensor>,
    ) {
        let vars = inputs(shapes, DType::F64, 11);
        let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let grads = probe_loss(&op(&xs).unwrap()).backward().unwrap();
        let h = 1e-6;
        for (i, v) in vars.iter().enumerate() {
            let Some(g) = grads.get(v) else { continue };
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let base = xs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for j in 0..base.len() {
                let eval = |delta: f64| {
                    let mut moved = base.clone();
                    moved[j] += delta;
                    let mut ys = xs.clone();
                    ys[i] = Tensor::from_vec(moved, xs[i].dims(), &Device::Cpu).unwrap();
                    probe_loss(&op(&ys).unwrap()).to_scalar::<f64>().unwrap()
                };
                let fd = (eval(h) - eval(-h)) / (2.0 * h);
                assert!(
                    (fd - g[j]).abs() < 1e-7,
                    "input {i}[{j}]: autograd {} vs finite difference {fd}",
                    g[j]
                );
            }
        }
    }
}
