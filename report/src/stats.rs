//! The statistics of a report: medians, trailing means (the reward smoothed over a
//! window of steps) and the time a run took to reach a reward.

use serde_json::Value;

use crate::log::field;

/// The median of `xs` (`None` when empty); with an even count, the mean of the middle
/// two.
pub fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// The mean of `xs` (`None` when empty).
pub fn mean(xs: &[f64]) -> Option<f64> {
    (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
}

/// Trailing means: element `i` is the mean of `xs[i + 1 - window ..= i]`, for every `i`
/// with a full window (so `xs.len() + 1 - window` of them; none when `window` is 0 or
/// longer than `xs`).
pub fn trailing_means(xs: &[f64], window: usize) -> Vec<f64> {
    if window == 0 {
        return Vec::new();
    }
    xs.windows(window)
        .map(|w| w.iter().sum::<f64>() / window as f64)
        .collect()
}

/// The first step (and its `unix_time`) at which the mean `reward_mean` of the last
/// `window` steps reaches `target`. A row without a reward counts as NaN, so no window
/// holding it reaches a target.
pub fn time_to_target(rows: &[Value], target: f64, window: usize) -> Option<(f64, f64)> {
    let rewards: Vec<f64> = rows
        .iter()
        .map(|r| field(r, "reward_mean").unwrap_or(f64::NAN))
        .collect();
    let end = trailing_means(&rewards, window)
        .iter()
        .position(|&m| m >= target)?
        + window;
    let row = &rows[end - 1];
    Some((field(row, "step")?, field(row, "unix_time")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_to_target_is_the_first_full_window_at_the_target() {
        let rows: Vec<Value> = [0.2, 0.9, 1.0, 0.9, 0.8, 0.9, 1.0, 1.0]
            .iter()
            .enumerate()
            .map(|(i, r)| serde_json::json!({"step": i + 1, "unix_time": 100.0 + 10.0 * i as f64, "reward_mean": r}))
            .collect();
        // Windows of 3: means 0.7, 0.93 → steps 2..4 reach 0.9 first, at step 4.
        assert_eq!(time_to_target(&rows, 0.9, 3), Some((4.0, 130.0)));
        assert_eq!(time_to_target(&rows, 1.1, 3), None);
        assert_eq!(time_to_target(&rows[..2], 0.1, 3), None);
        // A step without a reward breaks every window it is in.
        let mut full: Vec<Value> = (1..=5)
            .map(|i| serde_json::json!({"step": i, "unix_time": 10.0 * i as f64, "reward_mean": 1.0}))
            .collect();
        assert_eq!(time_to_target(&full, 1.0, 2), Some((2.0, 20.0)));
        full[1] = serde_json::json!({"step": 2, "unix_time": 20.0});
        assert_eq!(time_to_target(&full, 1.0, 2), Some((4.0, 40.0)));
    }

    #[test]
    fn medians_means_and_trailing_means() {
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![]), None);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), Some(3.0));
        assert_eq!(mean(&[]), None);
        assert_eq!(
            trailing_means(&[1.0, 2.0, 3.0, 6.0], 2),
            vec![1.5, 2.5, 4.5]
        );
        assert!(trailing_means(&[1.0], 2).is_empty());
        assert!(trailing_means(&[1.0], 0).is_empty());
    }
}
