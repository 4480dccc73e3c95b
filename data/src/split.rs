//! `[data] eval_fraction`: a file's records split into those trained on and those held
//! out for evaluation, disjoint by construction.
//!
//! Record i (its position among the file's records, from 0; blank JSONL lines do not
//! count) is held out when
//!
//!   h(i) / 2^64 < eval_fraction,   h(i) = SplitMix64's output i of the fixed seed K
//!
//! (a keyed hash of the index alone: the same records for every run on the same file
//! and fraction, whatever `[data] seed`, `shuffle` or the number of epochs; a larger
//! fraction holds out a superset). The training stream is the other records, visited in
//! each epoch's order; the evaluation reads the held-out ones in file order. No record
//! is on both sides, and every record is on one.

use crate::permutation::mix;

/// K: the split's own key (the digits of e, so no other seed of Tandem collides).
const SPLIT_KEY: u64 = 0x2B7E_1516_28AE_D2A6;

/// SplitMix64's step.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// Whether record `index` is held out for evaluation at `fraction` (0 = never).
pub fn held_out(index: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let h = mix(SPLIT_KEY.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    // The top 53 bits as a fraction of 1, exactly representable.
    ((h >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_out_share_is_the_fraction_and_grows_with_it() {
        let n = 100_000u64;
        for f in [0.01, 0.05, 0.3] {
            let k = (0..n).filter(|&i| held_out(i, f)).count() as f64;
            let sd = (n as f64 * f * (1.0 - f)).sqrt();
            assert!((k - n as f64 * f).abs() < 5.0 * sd, "{f}: {k} of {n}");
        }
        assert!((0..n).all(|i| !held_out(i, 0.0)));
        // A larger fraction holds out a superset.
        assert!((0..n).all(|i| !held_out(i, 0.05) || held_out(i, 0.1)));
    }
}
