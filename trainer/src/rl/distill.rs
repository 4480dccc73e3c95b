//! On-policy distillation (Agarwal et al. 2024; Thinking Machines 2025; Qwen3): the
//! student samples, a frozen teacher scores the sampled tokens, and each token's
//! advantage gains the negative per-token reverse KL to the teacher:
//!
//!   A_t ← A_t + λ·(log π_teacher,t − log μ_t)
//!
//! with μ the sampling policy's logprob and λ = `[algorithm] distill_coef`. With no
//! reward (every `[reward]` weight 0) the advantages are that term alone: pure
//! distillation. The teacher must tokenize as the student does.

use crate::error::{invalid, Result};
use tandem_model::Pretrained;

/// Adds λ·(log π_teacher − log μ) to `adv` on the trained tokens (mask > 0); returns the
/// mean reverse KL estimate log μ − log π_teacher over them.
pub fn add_teacher_term(
    adv: &mut [f64],
    teacher_logp: &[f64],
    behaviour_logp: &[f64],
    mask: &[f64],
    coef: f64,
) -> Result<f64> {
    let n = adv.len();
    if teacher_logp.len() != n || behaviour_logp.len() != n || mask.len() != n {
        return Err(invalid(format!(
            "distillation: {n} advantages, {} teacher logprobs, {} behaviour logprobs, {} mask entries",
            teacher_logp.len(),
            behaviour_logp.len(),
            mask.len()
        )));
    }
    let (mut kl, mut trained) = (0.0, 0.0);
    for t in 0..n {
        if mask[t] > 0.0 {
            let d = teacher_logp[t] - behaviour_logp[t];
            adv[t] += coef * d;
            kl -= d;
            trained += 1.0;
        }
    }
    Ok(if trained > 0.0 { kl / trained } else { 0.0 })
}

/// Loads the teacher at `path` and checks that it shares the student's tokenizer and
/// vocabulary size (the teacher scores the student's token ids).
pub fn load_teacher(path: &str, student: &Pretrained) -> Result<Pretrained> {
    let teacher =
        tandem_model::load_model(path).map_err(|e| invalid(format!("[algorithm] teacher: {e}")))?;
    if let Some(why) = student.tokenizer.vocabulary_difference(&teacher.tokenizer) {
        return Err(invalid(format!(
            "[algorithm] teacher `{path}` does not share the policy's tokenizer ({why}); distil from a teacher of the same family"
        )));
    }
    let (s, t) = (
        student.model.config().vocab_size,
        teacher.model.config().vocab_size,
    );
    if s != t {
        return Err(invalid(format!(
            "[algorithm] teacher `{path}` has {t} logits per token, the policy {s}"
        )));
    }
    Ok(teacher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_term_is_added_to_trained_tokens_only() {
        let mut adv = vec![0.5, 0.5, -1.0];
        let kl = add_teacher_term(
            &mut adv,
            &[-1.0, -2.0, -0.5],
            &[-1.5, -1.0, -9.0],
            &[1.0, 1.0, 0.0],
            0.5,
        )
        .unwrap();
        assert_eq!(adv, vec![0.75, 0.0, -1.0]);
        // log μ − log π_teacher over the two trained tokens: (−0.5 + 1.0) / 2.
        assert_eq!(kl, 0.25);
        assert!(add_teacher_term(&mut adv, &[0.0], &[0.0], &[1.0], 1.0).is_err());
    }
}
