//! Advantage estimators: from one scalar reward per completion to one advantage per
//! completion (every token of a completion shares it).
//!
//! Completions come in groups (the K samples of one prompt); `group_of[i]` names the
//! group of sample i. Group statistics use only that group's samples.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// Which estimator (`[algorithm] advantage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// REINFORCE with the batch-mean baseline: Aᵢ = rᵢ − mean(r).
    Reinforce,
    /// REINFORCE without a baseline: Aᵢ = rᵢ.
    ReinforceNoBaseline,
    /// RLOO (Ahmadian et al. 2024): Aᵢ = rᵢ − (1/(K−1)) Σ_{j≠i} r_j within the group.
    Rloo,
    /// GRPO (Shao et al. 2024; TRL): Aᵢ = (rᵢ − mean_g) / (std_g + 1e-6), std unbiased.
    Grpo,
    /// Dr. GRPO (Liu et al. 2025): Aᵢ = rᵢ − mean_g, no std normalisation.
    Drgrpo,
    /// REINFORCE++ with baseline (Hu 2025; OpenRLHF): aᵢ = rᵢ − mean_g, then whitened
    /// over the batch: Aᵢ = (aᵢ − mean(a)) / (std(a) + 1e-8), std biased.
    ReinforcePp,
    /// PPO with a value head: per-token GAE(γ, λ), see [`crate::rl::gae`]; computed by the
    /// train step from the critic's values, not by [`compute`].
    Gae,
}

/// GRPO's ε in the denominator, as TRL.
pub const GRPO_EPS: f64 = 1e-6;
/// REINFORCE++'s ε in the batch whitening, as OpenRLHF.
pub const WHITEN_EPS: f64 = 1e-8;

/// Advantages and what the estimator noticed.
#[derive(Clone, Debug, PartialEq)]
pub struct Advantages {
    pub values: Vec<f64>,
    /// Groups whose rewards are all equal (their GRPO / RLOO / Dr. GRPO advantages are 0).
    pub zero_std_groups: usize,
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Indices of each group's samples, in first-seen group order.
fn groups(group_of: &[usize]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = Vec::new();
    let mut members: std::collections::HashMap<usize, Vec<usize>> =
        std::collections::HashMap::new();
    for (i, &g) in group_of.iter().enumerate() {
        members
            .entry(g)
            .or_insert_with(|| {
                order.push(g);
                Vec::new()
            })
            .push(i);
    }
    order
        .into_iter()
        .map(|g| members.remove(&g).unwrap_or_default())
        .collect()
}

/// Computes advantages. `rewards[i]` and `group_of[i]` describe sample i.
pub fn compute(estimator: Estimator, rewards: &[f64], group_of: &[usize]) -> Result<Advantages> {
    if rewards.len() != group_of.len() {
        return Err(invalid(format!(
            "{} rewards but {} group labels",
            rewards.len(),
            group_of.len()
        )));
    }
    if rewards.is_empty() {
        return Err(invalid("no samples to compute advantages for"));
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(invalid(format!(
            "sample {i}: reward {} is not finite",
            rewards[i]
        )));
    }
    if estimator == Estimator::Gae {
        return Err(invalid(
            "gae advantages are per token: they come from gae::gae with the critic's values",
        ));
    }
    let mut values = vec![0.0; rewards.len()];
    let mut zero_std_groups = 0;
    let all_groups = groups(group_of);
    for members in &all_groups {
        let r: Vec<f64> = members.iter().map(|&i| rewards[i]).collect();
        if r.iter().all(|&x| x == r[0]) {
            zero_std_groups += 1;
        }
    }
    match estimator {
        Estimator::Reinforce => {
            let m = mean(rewards);
            values.iter_mut().zip(rewards).for_each(|(a, r)| *a = r - m);
        }
        Estimator::ReinforceNoBaseline => values.copy_from_slice(rewards),
        Estimator::Gae => unreachable!("returned above"),
        Estimator::Rloo | Estimator::Grpo | Estimator::Drgrpo | Estimator::ReinforcePp => {
            for members in &all_groups {
                let k = members.len();
                let r: Vec<f64> = members.iter().map(|&i| rewards[i]).collect();
                let sum: f64 = r.iter().sum();
                let m = sum / k as f64;
                for (&i, &ri) in members.iter().zip(&r) {
                    values[i] = match estimator {
                        Estimator::Rloo => {
                            if k < 2 {
                                return Err(invalid(format!(
                                    "rloo needs at least 2 samples per group; group of sample {i} has 1 (raise group_size or use another estimator)"
                                )));
                            }
                            ri - (sum - ri) / (k - 1) as f64
                        }
                        Estimator::Grpo => {
                            // A one-sample group has no spread: zero advantage.
                            let std = if k < 2 {
                                0.0
                            } else {
                                (r.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (k - 1) as f64)
                                    .sqrt()
                            };
                            (ri - m) / (std + GRPO_EPS)
                        }
                        _ => ri - m,
                    };
                }
            }
            if estimator == Estimator::ReinforcePp {
                let m = mean(&values);
                let std = (values.iter().map(|a| (a - m).powi(2)).sum::<f64>()
                    / values.len() as f64)
                    .sqrt();
                values
                    .iter_mut()
                    .for_each(|a| *a = (*a - m) / (std + WHITEN_EPS));
            }
        }
    }
    Ok(Advantages {
        values,
        zero_std_groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rloo_rejects_single_sample_groups() {
        let e = compute(Estimator::Rloo, &[1.0, 0.0, 1.0], &[0, 0, 1])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rloo") && e.contains("group"), "{e}");
    }

    #[test]
    fn equal_rewards_give_zero_group_advantages() {
        for est in [Estimator::Grpo, Estimator::Drgrpo, Estimator::Rloo] {
            let a = compute(est, &[0.5, 0.5, 0.5, 1.0, 0.0], &[0, 0, 0, 1, 1]).unwrap();
            assert_eq!(&a.values[..3], &[0.0, 0.0, 0.0]);
            assert_eq!(a.zero_std_groups, 1);
        }
    }

    #[test]
    fn rejects_non_finite_rewards_and_mismatched_lengths() {
        assert!(compute(Estimator::Grpo, &[f64::NAN], &[0])
            .unwrap_err()
            .to_string()
            .contains("sample 0"));
        assert!(compute(Estimator::Grpo, &[1.0, 2.0], &[0]).is_err());
    }
}
