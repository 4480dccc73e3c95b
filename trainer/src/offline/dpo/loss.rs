//! Direct preference optimisation: the policy learns from chosen / rejected pairs
//! against a frozen reference, with no reward model. The reference's log-probabilities
//! are computed once, before training; the loss (DPO or IPO) is in
//! [`crate::offline::preference::direct`], plus an optional NLL term on the chosen response
//! (RPO, Pang et al. 2024).

use candle_core::{DType, Tensor};
use serde::Serialize;
use tandem_model::{Model, Weights};

use super::data::Pair;
use crate::error::{invalid, Result};
use crate::offline::preference::{self, DirectLoss};
use crate::offline::sft::data::Tokenized;

/// Summed log-probabilities (N,) of each sequence's target tokens, and the tokens
/// scored per sequence.
pub fn sequence_logps(
    model: &Model,
    w: &Weights,
    seqs: &[&Tokenized],
) -> Result<(Tensor, Vec<usize>)> {
    let ids: Vec<Vec<u32>> = seqs.iter().map(|t| t.ids.clone()).collect();
    let targets: Vec<Vec<usize>> = seqs.iter().map(|t| t.targets.clone()).collect();
    let out = model.target_logprobs(w, &ids, &targets, 1.0)?;
    let mut sums = Vec::with_capacity(seqs.len());
    let mut counts = Vec::with_capacity(seqs.len());
    for win in out.offsets.windows(2) {
        let n = win[1] - win[0];
        if n == 0 {
            return Err(invalid("a response has no token to score"));
        }
        sums.push(out.logprobs.narrow(0, win[0], n)?.sum_all()?);
        counts.push(n);
    }
    Ok((Tensor::stack(&sums, 0)?, counts))
}

/// What one DPO step (or an evaluation) measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Metrics {
    pub loss: f64,
    /// Share of pairs whose implicit reward β(log π − log π_ref) is higher for chosen.
    pub reward_accuracy: f64,
    /// Mean implicit reward of chosen minus rejected.
    pub reward_margin: f64,
    pub chosen_logps: f64,
    pub rejected_logps: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// Settings of the DPO loss.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub loss: DirectLoss,
    pub beta: f64,
    /// Weight of the NLL (token mean) of the chosen responses; 0 = off.
    pub nll_coef: f64,
}

/// The loss of a batch and its metrics (grad_norm and lr left at 0).
pub fn loss(model: &Model, w: &Weights, s: Settings, batch: &[Pair]) -> Result<(Tensor, Metrics)> {
    let seqs: Vec<&Tokenized> = batch
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .collect();
    let (lp, counts) = sequence_logps(model, w, &seqs)?;
    let b = batch.len();
    let lp = lp.reshape((b, 2))?;
    let pi_w = lp.narrow(1, 0, 1)?.squeeze(1)?;
    let pi_l = lp.narrow(1, 1, 1)?.squeeze(1)?;
    let dev = lp.device();
    let refs = |f: fn(&Pair) -> f64| -> Result<Tensor> {
        Ok(
            Tensor::from_vec(batch.iter().map(f).collect::<Vec<f64>>(), b, dev)?
                .to_dtype(lp.dtype())?,
        )
    };
    let (ref_w, ref_l) = (refs(|p| p.ref_chosen)?, refs(|p| p.ref_rejected)?);
    let (mut total, rw, rl) = preference::direct(s.loss, s.beta, &pi_w, &pi_l, &ref_w, &ref_l)?;
    if s.nll_coef > 0.0 {
        let chosen_tokens: usize = counts.iter().step_by(2).sum();
        let nll = (pi_w.sum_all()?.neg()? / chosen_tokens as f64)?;
        total = (total + (nll * s.nll_coef)?)?;
    }
    let f =
        |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?) };
    let m = Metrics {
        loss: f(&total)?,
        reward_accuracy: preference::accuracy(&rw, &rl)?,
        reward_margin: f(&(&rw - &rl)?)?,
        chosen_logps: f(&pi_w)?,
        rejected_logps: f(&pi_l)?,
        ..Default::default()
    };
    Ok((total, m))
}

/// One optimizer step on `batch`.
pub fn step(
    model: &Model,
    opt: &mut crate::optimizer::Optimizer,
    opt_cfg: &crate::config::OptimizerConfig,
    s: Settings,
    batch: &[Pair],
    step: u64,
) -> Result<Metrics> {
    let (l, mut m) = loss(model, &model.weights(), s, batch)?;
    if !m.loss.is_finite() {
        return Err(invalid(format!("DPO loss is {} at step {step}", m.loss)));
    }
    let grads = l.backward()?;
    m.lr = opt_cfg.lr_at(step);
    m.grad_norm = opt.apply(&grads, m.lr, opt_cfg.max_grad_norm())?.grad_norm;
    Ok(m)
}
