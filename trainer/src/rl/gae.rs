//! Generalised advantage estimation over tokens, and PPO's clipped value loss — the
//! critic side of PPO with a value model (the seed's "4 models": policy, reference,
//! reward, value).
//!
//! For one completion of T tokens with values V₀..V_{T−1} (V_T = 0, the episode ends)
//! and the reward r on its last token (rₜ = 0 before it):
//!
//!   δₜ = rₜ + γ·V_{t+1} − Vₜ
//!   Aₜ = Σ_{l≥0} (γλ)ˡ δ_{t+l}          (Schulman et al. 2016)
//!   Rₜ = Aₜ + Vₜ                          (the value target)
//!
//! Clipped value loss (PPO2, as verl / OpenRLHF):
//!
//!   ℓₜ = ½ · max((V'ₜ − Rₜ)², (Vₜ + clip(V'ₜ − Vₜ, −ε_v, ε_v) − Rₜ)²)
//!
//! where V' is the value being trained and V the value at the start of the step.

use candle_core::Tensor;

use crate::error::{invalid, Result};

/// Per-token advantages and returns of completions laid out by `offsets`
/// (completion i is `offsets[i]..offsets[i + 1]`), from per-token `values` and one
/// `reward` per completion.
pub fn gae(
    values: &[f64],
    rewards: &[f64],
    offsets: &[usize],
    gamma: f64,
    lambda: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if offsets.len() != rewards.len() + 1
        || offsets.last() != Some(&values.len())
        || offsets.first() != Some(&0)
    {
        return Err(invalid(format!(
            "gae: offsets {offsets:?} must split {} values into {} completions",
            values.len(),
            rewards.len()
        )));
    }
    if !(0.0..=1.0).contains(&gamma) || !(0.0..=1.0).contains(&lambda) {
        return Err(invalid(format!(
            "`gamma` ({gamma}) and `lambda` ({lambda}) must be in [0, 1]"
        )));
    }
    let mut adv = vec![0.0; values.len()];
    for (i, w) in offsets.windows(2).enumerate() {
        let mut running = 0.0;
        for t in (w[0]..w[1]).rev() {
            let next_v = if t + 1 < w[1] { values[t + 1] } else { 0.0 };
            let r = if t + 1 == w[1] { rewards[i] } else { 0.0 };
            let delta = r + gamma * next_v - values[t];
            running = delta + gamma * lambda * running;
            adv[t] = running;
        }
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    Ok((adv, returns))
}

/// Per-token clipped value loss (see the module doc). `new_values` carries gradients.
pub fn value_loss(
    new_values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    clip: f64,
) -> Result<Tensor> {
    if clip.is_nan() || clip <= 0.0 {
        return Err(invalid(format!("`value_clip` must be > 0, got {clip}")));
    }
    let old = old_values.detach();
    let clipped = (&old + (new_values - &old)?.clamp(-clip, clip)?)?;
    let a = (new_values - returns)?.sqr()?;
    let b = (clipped - returns)?.sqr()?;
    Ok((a.maximum(&b)? * 0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_one_gamma_one_gives_reward_minus_value() {
        let (adv, ret) = gae(
            &[0.1, 0.2, 0.3, 0.5, 0.4],
            &[1.0, -1.0],
            &[0, 3, 5],
            1.0,
            1.0,
        )
        .unwrap();
        let expect = [0.9, 0.8, 0.7, -1.5, -1.4];
        for (a, e) in adv.iter().zip(expect) {
            assert!((a - e).abs() < 1e-12, "{a} vs {e}");
        }
        assert!(ret[..3].iter().all(|r| (r - 1.0).abs() < 1e-12));
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(gae(&[0.0], &[1.0], &[0, 1], 1.5, 0.9)
            .unwrap_err()
            .to_string()
            .contains("gamma"));
        assert!(gae(&[0.0, 1.0], &[1.0], &[0, 1], 1.0, 0.9).is_err());
    }
}
