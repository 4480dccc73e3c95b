//! Per-token log-probabilities and entropies of target tokens, fused.
//!
//! For logits l (N, V), targets y (N,) and temperature τ, with z = l / τ:
//!
//!   logprob_n = z_{n,y_n} − logsumexp(z_n)
//!   entropy_n = −Σ_j p_{n,j} log p_{n,j} = logsumexp(z_n) − Σ_j p_{n,j} z_{n,j}
//!
//! The CPU path is one custom op whose backward computes
//!
//!   ∂L/∂l_{n,j} = ( g_lp·(δ_{j,y} − p_j) − g_H·p_j·(log p_j + H) ) / τ
//!
//! directly from the logits, so no full-vocabulary log-softmax (nor its exp, sum and
//! difference intermediates) is ever kept for the batch: only the logits themselves.
//! Other devices use the same formula composed of differentiable candle ops.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use num_traits::Float;
use rayon::prelude::*;

use crate::cpu_storage::contiguous;
use crate::error::{Error, Result};
use crate::ops::float_kernel;

/// logprob and entropy of each row's target, each (N,). Gradients flow to `logits`.
/// Half-precision logits give f32 results: a bf16 logprob near −7 is only good to
/// ±0.03, which would become a 3 % error in every importance ratio and KL term.
pub fn token_logprobs(
    logits: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> Result<(Tensor, Tensor)> {
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::invalid(format!(
            "temperature must be positive and finite, got {temperature}"
        )));
    }
    let (n, v) = logits.dims2()?;
    if targets.dims() != [n] {
        return Err(Error::invalid(format!(
            "targets have shape {:?}, expected [{n}]",
            targets.dims()
        )));
    }
    if n == 0 {
        let empty = Tensor::zeros(0, logits.dtype(), logits.device())?;
        return Ok((empty.clone(), empty));
    }
    let out = if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        logits.contiguous()?.apply_op2(
            &targets.to_dtype(DType::U32)?,
            LogprobEntropy {
                temperature,
                vocab: v,
            },
        )?
    } else {
        composed(logits, targets, temperature)?
    };
    Ok((
        out.narrow(1, 0, 1)?.squeeze(1)?,
        out.narrow(1, 1, 1)?.squeeze(1)?,
    ))
}

/// The same (N, 2) result from differentiable candle ops (any device, any dtype), in
/// f32 for half-precision logits.
fn composed(logits: &Tensor, targets: &Tensor, temperature: f64) -> Result<Tensor> {
    // Half precisions are widened and the result stays wide; f32 and f64 stay as
    // they are.
    let compute = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let z = (logits.to_dtype(compute)? / temperature)?;
    let logp = candle_nn::ops::log_softmax(&z, D::Minus1)?;
    let lp = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    let ent = (logp.exp()? * &logp)?.sum_keepdim(1)?.neg()?;
    Ok(Tensor::cat(&[lp, ent], 1)?)
}

struct LogprobEntropy {
    temperature: f64,
    vocab: usize,
}

/// (logsumexp, Σ p·z) of one row of z = l / τ. Terms are computed in the input's
/// precision and accumulated in f64: over a 50k-token vocabulary an f32 running sum
/// loses ~1e-3 of entropy to rounding.
fn row_stats<T: candle_core::WithDType + Float>(row: &[T], inv_t: f64) -> (f64, f64) {
    let inv = T::from_f64(inv_t);
    let m = row.iter().fold(T::neg_infinity(), |m, &x| Float::max(m, x)) * inv;
    let (mut s, mut sz) = (0.0f64, 0.0f64);
    for &x in row {
        let z = x * inv;
        let e = (z - m).exp().to_f64();
        s += e;
        sz += e * z.to_f64();
    }
    (m.to_f64() + s.ln(), sz / s)
}

fn fwd_kernel<T: Float + candle_core::WithDType + Send + Sync>(
    logits: &[T],
    targets: &[u32],
    vocab: usize,
    temperature: f64,
) -> candle_core::Result<Vec<T>> {
    let inv_t = 1.0 / temperature;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target token id {bad} is not below the vocabulary size {vocab}")
    }
    let mut out = vec![T::zero(); targets.len() * 2];
    out.par_chunks_mut(2)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .for_each(|((o, row), &t)| {
            let (lse, pz) = row_stats(row, inv_t);
            let z_t = row[t as usize].to_f64() * inv_t;
            o[0] = T::from_f64(z_t - lse);
            o[1] = T::from_f64(lse - pz);
        });
    Ok(out)
}

impl CustomOp2 for LogprobEntropy {
    fn name(&self) -> &'static str {
        "token-logprob-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let targets = contiguous::<u32>(s2, l2, self.name())?;
        let n = targets.len();
        let storage = float_kernel!(self.name(); s1: l1 =>
            |logits| fwd_kernel(logits, targets, self.vocab, self.temperature)?);
        Ok((storage, Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = Tensor::cat(&[res, grad], 1)?.contiguous()?;
        let g = logits.apply_op3_no_bwd(
            targets,
            &packed,
            &LogprobEntropyGrad {
                temperature: self.temperature,
                vocab: self.vocab,
            },
        )?;
        Ok((Some(g), None))
    }
}

/// Backward of [`LogprobEntropy`]: inputs logits, targets, and (N, 4) = [logprob,
/// entropy, grad_logprob, grad_entropy].
struct LogprobEntropyGrad {
    temperature: f64,
    vocab: usize,
}

fn bwd_kernel<T: Float + candle_core::WithDType + Send + Sync>(
    logits: &[T],
    targets: &[u32],
    packed: &[T],
    vocab: usize,
    temperature: f64,
) -> Vec<T> {
    let inv_t = T::from(1.0 / temperature).unwrap_or_else(T::one);
    let mut out = vec![T::zero(); logits.len()];
    out.par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter().zip(packed.par_chunks(4)))
        .for_each(|((o, row), (&t, p))| {
            let (lp, h, g_lp, g_h) = (p[0], p[1], p[2], p[3]);
            // logsumexp recovered from the forward result: lse = z_t − logprob_t.
            let lse = row[t as usize] * inv_t - lp;
            for (oj, &x) in o.iter_mut().zip(row) {
                let log_p = x * inv_t - lse;
                let pj = log_p.exp();
                *oj = (-(g_lp * pj) - g_h * pj * (log_p + h)) * inv_t;
            }
            o[t as usize] += g_lp * inv_t;
        });
    out
}

impl CustomOp3 for LogprobEntropyGrad {
    fn name(&self) -> &'static str {
        "token-logprob-entropy-grad"
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
        let targets = contiguous::<u32>(s2, l2, self.name())?;
        let shape = Shape::from((targets.len(), self.vocab));
        let storage = float_kernel!(self.name(); s1: l1, s3: l3 =>
            |logits, packed| bwd_kernel(logits, targets, packed, self.vocab, self.temperature));
        Ok((storage, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn random_logits(n: usize, v: usize, dtype: DType) -> Tensor {
        let data: Vec<f64> = (0..n * v)
            .map(|i| ((i * 7919 % 1000) as f64 / 100.0) - 5.0)
            .collect();
        Tensor::from_vec(data, (n, v), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// bf16 logits give f32 logprobs and entropies: those of the same (bf16-valued)
    /// logits in f32, not rounded back to bf16.
    #[test]
    fn half_precision_logits_give_full_precision_results() {
        let (n, v) = (6, 301);
        let half = random_logits(n, v, DType::BF16);
        let targets = Tensor::new(&[0u32, 300, 5, 17, 5, 99], &Device::Cpu).unwrap();
        let (lp, h) = token_logprobs(&half, &targets, 1.0).unwrap();
        assert_eq!((lp.dtype(), h.dtype()), (DType::F32, DType::F32));
        let wide = half.to_dtype(DType::F32).unwrap();
        let (lp32, h32) = token_logprobs(&wide, &targets, 1.0).unwrap();
        let max_diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // Rounded to bf16, values near −7 would be off by up to 2⁻⁶.
        assert!(max_diff(&lp, &lp32) < 1e-4, "{}", max_diff(&lp, &lp32));
        assert!(max_diff(&h, &h32) < 1e-4, "{}", max_diff(&h, &h32));
        let rounded = lp32
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(
            max_diff(&rounded, &lp32) > 1e-3,
            "the test's logits are too easy"
        );
    }

    /// The fused op and the composed ops agree on values and on gradients.
    #[test]
    fn fused_matches_composed_values_and_gradients() {
        let (n, v) = (5, 37);
        let logits = Var::from_tensor(&random_logits(n, v, DType::F64)).unwrap();
        let targets = Tensor::new(&[0u32, 36, 5, 17, 5], &Device::Cpu).unwrap();
        let w_lp = Tensor::new(&[1.0f64, -2.0, 0.5, 3.0, 1.5], &Device::Cpu).unwrap();
        let w_h = Tensor::new(&[0.3f64, 1.0, -1.0, 2.0, 0.25], &Device::Cpu).unwrap();
        let loss = |lp: &Tensor, h: &Tensor| {
            ((lp * &w_lp).unwrap().sum_all().unwrap() + (h * &w_h).unwrap().sum_all().unwrap())
                .unwrap()
        };

        let (lp, h) = token_logprobs(&logits, &targets, 0.7).unwrap();
        let g_fused = loss(&lp, &h)
            .backward()
            .unwrap()
            .get(&logits)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let out = composed(&logits, &targets, 0.7).unwrap();
        let (lp2, h2) = (
            out.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
            out.narrow(1, 1, 1).unwrap().squeeze(1).unwrap(),
        );
        let g_comp = loss(&lp2, &h2)
            .backward()
            .unwrap()
            .get(&logits)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();

        for (a, b) in lp
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .zip(lp2.to_vec1::<f64>().unwrap())
        {
            assert!((a - b).abs() < 1e-12, "logprob {a} vs {b}");
        }
        for (a, b) in h
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .zip(h2.to_vec1::<f64>().unwrap())
        {
            assert!((a - b).abs() < 1e-12, "entropy {a} vs {b}");
        }
        for (ra, rb) in g_fused.iter().zip(&g_comp) {
            for (a, b) in ra.iter().zip(rb) {
                assert!((a - b).abs() < 1e-12, "grad {a} vs {b}");
            }
        }
    }

    #[test]
    fn rejects_out_of_range_targets_and_bad_temperature() {
        let logits = random_logits(2, 4, DType::F32);
        let bad = Tensor::new(&[0u32, 4], &Device::Cpu).unwrap();
        assert!(token_logprobs(&logits, &bad, 1.0).is_err());
        let ok = Tensor::new(&[0u32, 3], &Device::Cpu).unwrap();
        assert!(token_logprobs(&logits, &ok, 0.0).is_err());
        assert!(token_logprobs(&logits, &ok, f64::NAN).is_err());
    }
}
