//! DAPO's soft overlong punishment (Yu et al. 2025): a completion that runs into the
//! last `L_c` tokens before the length limit `L_max` has its reward lowered, linearly
//! to −p at the limit, before advantages are computed.

use crate::error::{invalid, Result};

/// The reward added for a completion of `len` trained tokens |y| (Σ m), with
/// L_max = `max_len`, L_c = `buffer_len` (0 = off) and p = `penalty`:
///
///   0                                  if |y| ≤ L_max − L_c
///   −p · (|y| − (L_max − L_c)) / L_c   if L_max − L_c < |y| ≤ L_max
///   −p                                 if |y| > L_max
pub fn overlong_penalty(
    len: usize,
    max_len: usize,
    buffer_len: usize,
    penalty: f64,
) -> Result<f64> {
    if buffer_len == 0 {
        return Ok(0.0);
    }
    if buffer_len > max_len {
        return Err(invalid(format!(
            "[algorithm] overlong_buffer_len = {buffer_len} exceeds max_completion_len = {max_len}"
        )));
    }
    let free = max_len - buffer_len;
    Ok(if len <= free {
        0.0
    } else if len <= max_len {
        -penalty * (len - free) as f64 / buffer_len as f64
    } else {
        -penalty
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_is_zero_then_linear_then_capped() {
        let p = |len| overlong_penalty(len, 20, 4, 0.5).unwrap();
        assert_eq!(p(16), 0.0);
        assert_eq!(p(17), -0.125);
        assert_eq!(p(20), -0.5);
        assert_eq!(p(25), -0.5);
        assert_eq!(overlong_penalty(100, 20, 0, 0.5).unwrap(), 0.0);
        assert!(overlong_penalty(1, 20, 21, 0.5).is_err());
    }
}
