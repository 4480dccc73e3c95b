//! Preference losses: reward models (Bradley–Terry, with a margin, Plackett–Luce) and
//! direct alignment (DPO, IPO). Inputs are scores of the preferred and dispreferred
//! responses (rewards for a reward model; summed log-probabilities for DPO); outputs
//! are batch means, with gradients to the inputs.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// log σ(x), computed stably as −softplus(−x) = min(x, 0) − log(1 + e^{−|x|}).
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    let log1p = (neg_abs.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0.0)? - log1p)?)
}

/// Bradley–Terry: L = −mean log σ(r_w − r_l − m), with m = 0 without margins (Llama 2's
/// margin loss with them).
pub fn bradley_terry(r_w: &Tensor, r_l: &Tensor, margin: Option<&Tensor>) -> Result<Tensor> {
    let mut d = (r_w - r_l)?;
    if let Some(m) = margin {
        d = (d - m)?;
    }
    Ok(log_sigmoid(&d)?.mean_all()?.neg()?)
}

/// Plackett–Luce over K responses ranked best first, rewards r (B, K):
///
///   L = −mean_b Σ_{k=1}^{K−1} [ r_{b,k} − log Σ_{j ≥ k} exp r_{b,j} ]
///
/// (K = 2 is Bradley–Terry.)
pub fn plackett_luce(r: &Tensor) -> Result<Tensor> {
    let (_, k) = r.dims2()?;
    if k < 2 {
        return Err(invalid("Plackett–Luce needs at least 2 ranked responses"));
    }
    let mut total: Option<Tensor> = None;
    for i in 0..k - 1 {
        let rest = r.narrow(1, i, k - i)?;
        let lse = {
            let m = rest.max_keepdim(D::Minus1)?;
            (rest
                .broadcast_sub(&m)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                + m)?
        };
        let term = (r.narrow(1, i, 1)? - lse)?.squeeze(1)?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    Ok(total.expect("k ≥ 2").mean_all()?.neg()?)
}

/// The direct-alignment loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirectLoss {
    /// DPO (Rafailov et al. 2023): L = −mean log σ(β·h).
    #[default]
    Dpo,
    /// IPO (Azar et al. 2023): L = mean (h − 1/(2β))².
    Ipo,
}

/// DPO / IPO from summed log-probabilities of the chosen (w) and rejected (l) responses
/// under the policy and the frozen reference:
///
///   h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))
///
/// Returns the loss and the implicit rewards β(log π − log π_ref) of chosen and
/// rejected (detached), for metrics.
pub fn direct(
    kind: DirectLoss,
    beta: f64,
    pi_w: &Tensor,
    pi_l: &Tensor,
    ref_w: &Tensor,
    ref_l: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if !(beta > 0.0 && beta.is_finite()) {
        return Err(invalid(format!("beta must be positive, got {beta}")));
    }
    let lr_w = (pi_w - ref_w)?;
    let lr_l = (pi_l - ref_l)?;
    let h = (&lr_w - &lr_l)?;
    let loss = match kind {
        DirectLoss::Dpo => log_sigmoid(&(h * beta)?)?.mean_all()?.neg()?,
        DirectLoss::Ipo => (h - 1.0 / (2.0 * beta))?.sqr()?.mean_all()?,
    };
    Ok((loss, (lr_w.detach() * beta)?, (lr_l.detach() * beta)?))
}

/// Share of pairs where the preferred response scores higher.
pub fn accuracy(s_w: &Tensor, s_l: &Tensor) -> Result<f64> {
    let w = s_w.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let l = s_l.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    if w.is_empty() {
        return Ok(f64::NAN);
    }
    Ok(w.iter().zip(&l).filter(|(a, b)| a > b).count() as f64 / w.len() as f64)
}
