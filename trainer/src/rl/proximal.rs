//! The proximal policy π_prox of decoupled PPO: recomputed by a forward pass at the
//! step's start, or approximated without one from the versions that produced each
//! token (AReaL's log-linear interpolation).
//!
//! π_prox is "the policy one update behind the current one": version v_prox = v_θ − 1
//! when the trainer holds version v_θ. A token sampled by version v_b lies on the
//! path μ = π_{v_b} → π_θ, and the approximation places π_prox on that path in log
//! space, in proportion to versions.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// `[algorithm] prox_logp`: how log π_prox is obtained in decoupled mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxLogp {
    /// A forward pass of the current weights, without gradient, at the step's start.
    Recompute,
    /// log μ + α·(log π_θ − log μ) with α from the token versions; no extra pass.
    Loglinear,
}

/// The interpolation weight of each token:
///
///   α = (v_prox − v_b) / (v_θ − v_b),  v_prox = v_θ − 1,  clamped to [0, 1],
///
/// and α = 0 where v_b ≥ v_θ (the token came from the current policy: π_prox = μ).
/// A token from the version just before the current one also gets α = 0 (it was
/// sampled by π_prox itself); older tokens move toward π_θ: α = ½ at two versions
/// behind, ⅔ at three.
///
/// A version newer than `policy_version` cannot exist: it is an error naming the token.
pub fn loglinear_alpha(versions: &[u64], policy_version: u64) -> Result<Vec<f64>> {
    let v_theta = policy_version as f64;
    versions
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v > policy_version {
                return Err(invalid(format!(
                    "token {i} has version {v}, newer than the policy's version {policy_version}"
                )));
            }
            let vb = v as f64;
            Ok(if v < policy_version {
                ((v_theta - 1.0 - vb) / (v_theta - vb)).clamp(0.0, 1.0)
            } else {
                0.0
            })
        })
        .collect()
}

/// log π_prox ≈ log μ + α·(log π_θ − log μ), all (N,), without gradient (π_θ is the
/// current forward's logprobs, detached).
pub fn loglinear(behaviour_logp: &Tensor, current_logp: &Tensor, alpha: &Tensor) -> Result<Tensor> {
    let mu = behaviour_logp.detach();
    let delta = (current_logp.detach() - &mu)?;
    Ok((mu + (delta * alpha)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpha_follows_the_version_gap() {
        let a = loglinear_alpha(&[5, 4, 3, 2, 1], 5).unwrap();
        let expect = [0.0, 0.0, 0.5, 2.0 / 3.0, 0.75];
        for (x, y) in a.iter().zip(expect) {
            assert!((x - y).abs() < 1e-15, "{a:?}");
        }
        let e = loglinear_alpha(&[2, 7], 5).unwrap_err().to_string();
        assert!(e.contains("token 1") && e.contains('7'), "{e}");
    }
}
