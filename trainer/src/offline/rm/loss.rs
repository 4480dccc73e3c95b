//! A reward model: the transformer with a scalar head on the final hidden state of the
//! last token, r(x, y) = h_last · w + b, trained on ranked responses (Bradley–Terry,
//! with a margin when the data gives one, or Plackett–Luce for K > 2). Saved as an HF
//! folder with the head in [`tandem_model::REWARD_HEAD_FILE`] beside it.

use candle_core::{DType, Tensor};
use serde::Serialize;
use tandem_model::{Model, ScalarHead, Weights};

use super::data::Tokens;
use crate::error::{invalid, Result};
use crate::offline::preference;

/// The loss of a batch of comparisons (all with the same number K of responses) and
/// the rewards (B, K), detached. K = 2 is Bradley–Terry (with margins when every record
/// has one); K > 2 is Plackett–Luce.
pub fn loss(
    model: &Model,
    w: &Weights,
    head: &ScalarHead,
    batch: &[Tokens],
) -> Result<(Tensor, Tensor)> {
    let k = batch
        .first()
        .map(|t| t.responses.len())
        .ok_or_else(|| invalid("empty batch"))?;
    if batch.iter().any(|t| t.responses.len() != k) {
        return Err(invalid(
            "every comparison of a batch needs the same number of responses",
        ));
    }
    let seqs: Vec<Vec<u32>> = batch
        .iter()
        .flat_map(|t| t.responses.iter().map(|r| r.ids.clone()))
        .collect();
    let r = head
        .sequence_scores(model, w, &seqs)?
        .reshape((batch.len(), k))?;
    let loss = if k == 2 {
        let margins: Option<Vec<f64>> = batch.iter().map(|t| t.margin).collect();
        let m = margins
            .map(|m| Tensor::from_vec(m, batch.len(), r.device())?.to_dtype(r.dtype()))
            .transpose()?;
        let col = |i| -> Result<Tensor> { Ok(r.narrow(1, i, 1)?.squeeze(1)?) };
        preference::bradley_terry(&col(0)?, &col(1)?, m.as_ref())?
    } else {
        preference::plackett_luce(&r)?
    };
    Ok((loss, r.detach()))
}

/// Share of comparisons whose best response gets the highest reward; (B, K) rewards.
pub fn top1_accuracy(r: &Tensor) -> Result<f64> {
    let rows = r.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    if rows.is_empty() {
        return Ok(f64::NAN);
    }
    let hit = rows
        .iter()
        .filter(|row| row[1..].iter().all(|x| row[0] > *x))
        .count();
    Ok(hit as f64 / rows.len() as f64)
}

/// What one reward-model step measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepMetrics {
    pub loss: f64,
    pub accuracy: f64,
    /// Mean of r(best) − r(second).
    pub margin: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// One optimizer step on `batch`.
pub fn step(
    model: &Model,
    head: &ScalarHead,
    opt: &mut crate::optimizer::Optimizer,
    opt_cfg: &crate::config::OptimizerConfig,
    batch: &[Tokens],
    step: u64,
) -> Result<StepMetrics> {
    let (l, r) = loss(model, &model.weights(), head, batch)?;
    let value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !value.is_finite() {
        return Err(invalid(format!(
            "reward-model loss is {value} at step {step}"
        )));
    }
    let grads = l.backward()?;
    let lr = opt_cfg.lr_at(step);
    let stats = opt.apply(&grads, lr, opt_cfg.max_grad_norm())?;
    Ok(StepMetrics {
        loss: value,
        accuracy: top1_accuracy(&r)?,
        margin: mean_margin(&r)?,
        grad_norm: stats.grad_norm,
        lr,
    })
}

/// Mean of r(best) − r(second) over a (B, K) reward matrix.
pub fn mean_margin(r: &Tensor) -> Result<f64> {
    let d = (r.narrow(1, 0, 1)? - r.narrow(1, 1, 1)?)?;
    Ok(d.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}
