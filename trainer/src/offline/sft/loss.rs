//! The SFT loss: the negative log-likelihood of the trained tokens, its validation
//! form, and one optimizer step.

use candle_core::{DType, Tensor};
use serde::Serialize;
use tandem_model::{Model, Weights};

use super::data::Tokenized;
use crate::error::{invalid, Result};

/// The SFT loss of a batch and the number of tokens it trains:
///
///   L = −(1/N) Σ_i Σ_{t ∈ T_i} log π(x_{i,t} | x_{i,<t}),   N = Σ_i |T_i|
///
/// the mean over every trained token of the batch (as `cross_entropy` with
/// `ignore_index` on prompt positions).
pub fn loss(model: &Model, w: &Weights, batch: &[Tokenized]) -> Result<(Tensor, usize)> {
    let seqs: Vec<Vec<u32>> = batch.iter().map(|t| t.ids.clone()).collect();
    let targets: Vec<Vec<usize>> = batch.iter().map(|t| t.targets.clone()).collect();
    let out = model.target_logprobs(w, &seqs, &targets, 1.0)?;
    let n = out.logprobs.dim(0)?;
    if n == 0 {
        return Err(invalid("the batch trains no token"));
    }
    Ok((masked_nll(&out.logprobs)?, n))
}

/// −mean of the trained tokens' log-probabilities (N,) → scalar.
pub fn masked_nll(logprobs: &Tensor) -> Result<Tensor> {
    Ok(logprobs.mean_all()?.neg()?)
}

/// The summed NLL of a batch and its token count (validation: pass detached weights;
/// sum over batches, then divide, for the mean over every validation token).
pub fn eval_nll(model: &Model, w: &Weights, batch: &[Tokenized]) -> Result<(f64, usize)> {
    let (l, n) = loss(model, w, batch)?;
    Ok((l.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64, n))
}

/// What one SFT step measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub tokens: usize,
    pub grad_norm: f64,
    pub lr: f64,
}

/// One optimizer step on `batch`.
pub fn step(
    model: &Model,
    opt: &mut crate::optimizer::Optimizer,
    opt_cfg: &crate::config::OptimizerConfig,
    batch: &[Tokenized],
    step: u64,
) -> Result<StepMetrics> {
    let (l, tokens) = loss(model, &model.weights(), batch)?;
    let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !value.is_finite() {
        return Err(invalid(format!(
            "SFT loss is {value} at step {step}: refusing to update"
        )));
    }
    let grads = l.backward()?;
    let lr = opt_cfg.lr_at(step);
    let stats = opt.apply(&grads, lr, opt_cfg.max_grad_norm())?;
    Ok(StepMetrics {
        step: step + 1,
        loss: value,
        tokens,
        grad_norm: stats.grad_norm,
        lr,
    })
}
