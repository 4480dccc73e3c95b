//! Choosing the next token from one row of logits, and the logprob it is recorded with.
//!
//! The recorded logprob is that of the chosen token under the distribution it was
//! actually drawn from (ARCHITECTURE.md, "Logprob semantics"): softmax(logits / τ), restricted to the
//! top-k / top-p set and renormalised when those are enabled. Greedy decoding
//! (τ = 0) records the logprob under softmax(logits) (τ = 1, untruncated), which is
//! what `tandem score` computes at its default temperature.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to sample completions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    pub top_p: f64,
    /// Upper bound on completion length.
    pub max_new_tokens: usize,
    /// A completion ends after any of these tokens (the token is kept in the completion).
    pub stop_token_ids: Vec<u32>,
    /// Seed of the per-sequence random streams: sequence i of a request draws from
    /// stream i, so its tokens do not depend on what else is in the batch.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 256,
            stop_token_ids: Vec::new(),
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(format!(
                "`temperature` must be ≥ 0 and finite, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "`top_p` must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::invalid("`max_new_tokens` must be at least 1"));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// log Σ exp(x) over `xs` (numerically stable); −∞ for an empty slice.
fn logsumexp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

/// Picks a token from `logits` and returns it with its recorded logprob.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> (u32, f32) {
    if p.is_greedy() {
        let (best, _) =
            logits
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                });
        let lse = logsumexp(logits.iter().map(|&x| x as f64));
        return (best as u32, (logits[best] as f64 - lse) as f32);
    }
    let inv_t = 1.0 / p.temperature;
    let z = |i: usize| logits[i] as f64 * inv_t;
    match candidates(logits, p) {
        None => {
            let (i, lp) = draw(0..logits.len(), z, rng);
            (i as u32, lp as f32)
        }
        Some(idx) => {
            let (i, lp) = draw(idx.iter().copied(), z, rng);
            (i as u32, lp as f32)
        }
    }
}

/// The top-k / top-p candidate set of a temperature draw, most likely first (ties by
/// the lower id); `None` when neither is on (every token is a candidate).
fn candidates(logits: &[f32], p: &SamplingParams) -> Option<Vec<usize>> {
    if p.top_k == 0 && p.top_p >= 1.0 {
        return None;
    }
    let inv_t = 1.0 / p.temperature;
    let z = |i: usize| logits[i] as f64 * inv_t;
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(p.top_k);
    }
    idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_p < 1.0 {
        let lse = logsumexp(idx.iter().map(|&i| z(i)));
        let mut cum = 0.0;
        let mut keep = idx.len();
        for (n, &i) in idx.iter().enumerate() {
            cum += (z(i) - lse).exp();
            if cum >= p.top_p {
                keep = n + 1;
                break;
            }
        }
        idx.truncate(keep);
    }
    Some(idx)
}

/// The `k` most likely tokens of one row of `logits` with their logprobs under the
/// distribution [`sample`] draws from and records: log softmax(logits / τ) over the
/// top-k / top-p set (renormalised there; tokens outside it have probability 0 and are
/// never listed), and log softmax(logits) (τ = 1, untruncated) when greedy. Most likely
/// first, ties by the lower id; fewer than `k` when the set is smaller. The sampled
/// token's recorded logprob equals its entry here when it is listed.
pub fn top_logprobs(logits: &[f32], p: &SamplingParams, k: usize) -> Vec<(u32, f32)> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    let (inv_t, set) = if p.is_greedy() {
        (1.0, None)
    } else {
        (1.0 / p.temperature, candidates(logits, p))
    };
    let z = |i: usize| logits[i] as f64 * inv_t;
    let by_logit = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let (lse, mut top) = match set {
        Some(idx) => {
            let lse = logsumexp(idx.iter().map(|&i| z(i)));
            (lse, idx.into_iter().take(k).collect::<Vec<_>>())
        }
        None => {
            let lse = logsumexp((0..logits.len()).map(z));
            let mut idx: Vec<usize> = (0..logits.len()).collect();
            if k < idx.len() {
                idx.select_nth_unstable_by(k - 1, by_logit);
                idx.truncate(k);
            }
            (lse, idx)
        }
    };
    top.sort_unstable_by(by_logit);
    top.into_iter()
        .map(|i| (i as u32, (z(i) - lse) as f32))
        .collect()
}

/// Draws from softmax(z) over the candidates `idx` in one pass of exponentials:
/// w_i = exp(z_i − m) with m = max z (f32 exponentials, f64 sums), the first candidate
/// whose running sum of w exceeds u · Σw (u uniform in [0, 1)), and its logprob
/// z_i − (m + ln Σw).
fn draw(
    idx: impl Iterator<Item = usize> + Clone,
    z: impl Fn(usize) -> f64,
    rng: &mut impl Rng,
) -> (usize, f64) {
    let m = idx.clone().map(&z).fold(f64::NEG_INFINITY, f64::max);
    let mut w: Vec<f32> = idx.clone().map(|i| (z(i) - m) as f32).collect();
    crate::kernels::simd::exp_in_place(&mut w);
    let total: f64 = w.iter().map(|&x| x as f64).sum();
    let target = rng.random::<f64>() * total;
    let mut cum = 0.0;
    let mut chosen = None;
    for (i, &x) in idx.clone().zip(&w) {
        cum += x as f64;
        if target < cum {
            chosen = Some(i);
            break;
        }
    }
    // Rounding may leave the target past the sum: the last candidate.
    let chosen = chosen.or_else(|| idx.last()).unwrap_or(0);
    (chosen, z(chosen) - m - total.ln())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn params(t: f64, k: usize, p: f64) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_argmax_with_untruncated_logprob() {
        let logits = [0.0f32, 2.0, 1.0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (tok, lp) = sample(&logits, &params(0.0, 0, 1.0), &mut rng);
        assert_eq!(tok, 1);
        let lse = (1f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((lp as f64 - (2.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_deterministic_with_logprob_zero() {
        let logits = [0.5f32, 0.1, 3.0, 2.9];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let (tok, lp) = sample(&logits, &params(1.0, 1, 1.0), &mut rng);
            assert_eq!((tok, lp), (2, 0.0));
        }
    }

    #[test]
    fn top_p_restricts_to_the_nucleus_and_renormalises() {
        // probabilities ≈ [0.64, 0.24, 0.09, 0.03]; top_p 0.8 keeps the first two.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let kept_lse = (3f64.exp() + 2f64.exp()).ln();
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            let (tok, lp) = sample(&logits, &params(1.0, 0, 0.8), &mut rng);
            seen[tok as usize] += 1;
            assert!((lp as f64 - (logits[tok as usize] as f64 - kept_lse)).abs() < 1e-6);
        }
        assert_eq!(seen[2] + seen[3], 0);
        let frac = seen[0] as f64 / 2000.0;
        let expect = 3f64.exp() / (3f64.exp() + 2f64.exp());
        assert!((frac - expect).abs() < 0.05, "{frac} vs {expect}");
    }

    #[test]
    fn temperature_sampling_matches_the_distribution() {
        let logits = [1.0f32, 0.0, -1.0];
        let t = 0.5;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut seen = [0usize; 3];
        let n = 4000;
        for _ in 0..n {
            seen[sample(&logits, &params(t, 0, 1.0), &mut rng).0 as usize] += 1;
        }
        let z: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
        let s: f64 = z.iter().sum();
        for i in 0..3 {
            assert!((seen[i] as f64 / n as f64 - z[i] / s).abs() < 0.03);
        }
    }

    /// The listed logprobs are those `sample` records: at τ over the whole vocabulary,
    /// renormalised over the top-k / top-p set, at τ = 1 when greedy.
    #[test]
    fn top_logprobs_are_the_recorded_distribution() {
        let logits = [3.0f32, 2.0, 1.0, 0.0, 2.0];
        let lse = |t: f64, ids: &[usize]| {
            ids.iter()
                .map(|&i| (logits[i] as f64 / t).exp())
                .sum::<f64>()
                .ln()
        };
        let all = [0, 1, 2, 3, 4];
        let top = top_logprobs(&logits, &params(0.5, 0, 1.0), 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [0, 1, 4], "most likely first, ties by the lower id");
        for &(i, lp) in &top {
            let want = logits[i as usize] as f64 / 0.5 - lse(0.5, &all);
            assert!((lp as f64 - want).abs() < 1e-6);
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for t in [0.0, 0.7] {
            for (k, p) in [(0, 1.0), (2, 1.0), (0, 0.6)] {
                let sp = params(t, k, p);
                let listed = top_logprobs(&logits, &sp, 10);
                for _ in 0..50 {
                    let (tok, lp) = sample(&logits, &sp, &mut rng);
                    let entry = listed.iter().find(|e| e.0 == tok).unwrap();
                    assert!((entry.1 - lp).abs() < 1e-5, "{t} {k} {p}: {entry:?} {lp}");
                }
                if k == 2 && t > 0.0 {
                    assert_eq!(listed.len(), 2, "only the top-k set");
                }
            }
        }
        assert!(top_logprobs(&logits, &params(1.0, 0, 1.0), 0).is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let e = params(-1.0, 0, 1.0).validate().unwrap_err().to_string();
        assert!(e.contains("temperature"));
        let e = params(1.0, 0, 0.0).validate().unwrap_err().to_string();
        assert!(e.contains("top_p"));
    }
}
