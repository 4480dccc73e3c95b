//! Rewards: the `[reward]` section and the built-in verifiers combined with weights;
//! the judge (`judge.rs`), the external reward service (`reward_service.rs`) and a
//! reward model add their weighted scores in the scorer stage.
//!
//!   r = w_math·math + w_format·format + w_exact·exact_match
//!       (+ w_judge·judge + w_service·service + w_env·env + w_model·RM)

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// `[reward]`: the weight of each verifier (0 = off).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    /// 1 when the final answer equals the reference numerically (or as text).
    pub math: f64,
    /// 1 when the completion has the expected form (`format_kind`).
    pub format: f64,
    /// answer_tags | boxed | number.
    pub format_kind: FormatKind,
    /// 1 when the trimmed completion equals the trimmed reference.
    pub exact_match: f64,
    /// An external reward service (`http://host:port`), scored per group.
    pub service: Option<String>,
    /// The reward service's own token (`TANDEM_REWARD_TOKEN` in the generator's
    /// environment wins): the token this generator holds is never sent to it.
    pub service_token: Option<String>,
    pub service_weight: f64,
    /// A reward model (`tandem rm` output: an HF folder with `reward_head.safetensors`)
    /// that scores prompt + completion on each generator.
    pub model: Option<String>,
    pub model_weight: f64,
    /// An LLM judge (a model path, as `[model] path`): it reads `judge_template` with
    /// `{prompt}`, `{completion}` and `{answer}` filled in, answers greedily, and the
    /// last number of its answer divided by `judge_scale` is the score (0 without one).
    pub judge: Option<String>,
    pub judge_template: String,
    /// Render the judge's prompt as a user turn of its chat template.
    pub judge_chat: bool,
    pub judge_max_new_tokens: usize,
    pub judge_scale: f64,
    pub judge_weight: f64,
    /// A completion's reward r must satisfy |r| ≤ bound: the trainer refuses a group
    /// with one beyond it, and a generator gives back the lease of a group whose reward
    /// (a reward service's score, say) lands beyond it rather than push it.
    pub bound: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    /// `<answer>…</answer>` with something inside.
    AnswerTags,
    /// `\boxed{…}`.
    Boxed,
    /// Any number.
    Number,
    /// The fraction of non-space characters that are digits: a dense shaping reward
    /// for numeric answers (the only kind that is not 0 or 1).
    Digits,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            math: 1.0,
            format: 0.0,
            format_kind: FormatKind::AnswerTags,
            exact_match: 0.0,
            service: None,
            service_token: None,
            service_weight: 1.0,
            model: None,
            model_weight: 1.0,
            judge: None,
            judge_template: "Rate how well the answer solves the question, from 0 (wrong) to 10 (right).\nQuestion: {prompt}\nAnswer: {completion}\nReply with the score only.".into(),
            judge_chat: true,
            judge_max_new_tokens: 8,
            judge_scale: 10.0,
            judge_weight: 1.0,
            bound: tandem_proto::limits::REWARD_BOUND,
        }
    }
}

impl RewardConfig {
    /// Checks every weight and the judge's settings; some reward must be set.
    pub fn validate(&self) -> Result<()> {
        self.validate_for(false)
    }

    /// [`RewardConfig::validate`], where `unrewarded_ok` lets every weight be 0: a run
    /// that learns from something else (on-policy distillation's teacher, an
    /// Environment service's rewards) scores 0 here.
    pub fn validate_for(&self, unrewarded_ok: bool) -> Result<()> {
        for (key, w) in [
            ("math", self.math),
            ("format", self.format),
            ("exact_match", self.exact_match),
            ("service_weight", self.service_weight),
            ("model_weight", self.model_weight),
            ("judge_weight", self.judge_weight),
        ] {
            if !w.is_finite() {
                return Err(invalid(format!("[reward] {key}: must be a finite weight")));
            }
        }
        if !(self.bound.is_finite() && self.bound > 0.0) {
            return Err(invalid(
                "[reward] bound: must be a finite number > 0 (the largest |reward| accepted)",
            ));
        }
        if !unrewarded_ok
            && self.math == 0.0
            && self.format == 0.0
            && self.exact_match == 0.0
            && self.service.is_none()
            && self.model.is_none()
            && self.judge.is_none()
        {
            return Err(invalid(
                "[reward]: every weight is 0; set math, format or exact_match, a service or a model (or [algorithm] teacher for pure distillation, or an [env] service or agent that rewards)",
            ));
        }
        if self.judge.is_some() {
            if !self.judge_template.contains("{completion}") {
                return Err(invalid(
                    "[reward] judge_template: must contain {completion} (and usually {prompt})",
                ));
            }
            if !(self.judge_scale > 0.0 && self.judge_scale.is_finite()) {
                return Err(invalid("[reward] judge_scale: must be positive"));
            }
            if self.judge_max_new_tokens == 0 {
                return Err(invalid("[reward] judge_max_new_tokens: must be ≥ 1"));
            }
        }
        if self.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            return Err(invalid("[reward] model: give the folder `tandem rm` wrote"));
        }
        Ok(())
    }

    /// The built-in part of the reward of one completion.
    pub fn score(&self, completion: &str, answer: Option<&str>) -> f64 {
        let mut r = 0.0;
        if self.math != 0.0 {
            r += self.math * answer.map_or(0.0, |a| f64::from(math_correct(completion, a)));
        }
        if self.format != 0.0 {
            r += self.format * format_score(completion, self.format_kind);
        }
        if self.exact_match != 0.0 {
            r +=
                self.exact_match * answer.map_or(0.0, |a| f64::from(completion.trim() == a.trim()));
        }
        r
    }
}

/// The final answer of a completion: the last number inside the last
/// `<answer>…</answer>` (or its text when it holds none), else the inside of the last
/// `\boxed{…}`, else the last number in the text.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(inner) = last_answer_tag(text) {
        return Some(last_number(inner).unwrap_or_else(|| inner.trim().to_string()));
    }
    if let Some(inner) = last_boxed(text) {
        return Some(inner.trim().to_string());
    }
    last_number(text)
}

/// Whether the final answer equals `reference`: as numbers (|a − b| ≤ 1e-6·max(1, |b|),
/// thousands separators ignored) when both parse, else as trimmed text.
pub fn math_correct(completion: &str, reference: &str) -> bool {
    let Some(got) = final_answer(completion) else {
        return false;
    };
    let num = |s: &str| s.trim().replace(',', "").parse::<f64>().ok();
    match (num(&got), num(reference)) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * b.abs().max(1.0),
        _ => got.trim() == reference.trim(),
    }
}

/// The format reward in [0, 1]: 1 or 0 for the structural kinds, the digit fraction
/// for `digits`.
pub fn format_score(completion: &str, kind: FormatKind) -> f64 {
    let yes = |b: bool| f64::from(u8::from(b));
    match kind {
        FormatKind::AnswerTags => {
            yes(last_answer_tag(completion).is_some_and(|s| !s.trim().is_empty()))
        }
        FormatKind::Boxed => yes(last_boxed(completion).is_some()),
        FormatKind::Number => yes(last_number(completion).is_some()),
        FormatKind::Digits => {
            let chars: Vec<char> = completion.chars().filter(|c| !c.is_whitespace()).collect();
            if chars.is_empty() {
                0.0
            } else {
                chars.iter().filter(|c| c.is_ascii_digit()).count() as f64 / chars.len() as f64
            }
        }
    }
}

fn last_answer_tag(text: &str) -> Option<&str> {
    let start = text.rfind("<answer>")? + "<answer>".len();
    let end = text[start..].find("</answer>")? + start;
    Some(&text[start..end])
}

/// The inside of the last `\boxed{…}`, braces balanced.
fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed{")? + "\\boxed{".len();
    let mut depth = 1usize;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The last number: an optional minus, digits (commas between digit groups allowed)
/// and an optional decimal part.
pub(crate) fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut found = None;
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
            let mut j = i;
            while j < b.len()
                && (b[j].is_ascii_digit()
                    || (b[j] == b',' && j + 1 < b.len() && b[j + 1].is_ascii_digit() && j > i))
            {
                j += 1;
            }
            if j + 1 < b.len() && b[j] == b'.' && b[j + 1].is_ascii_digit() {
                j += 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
            }
            found = Some(text[start..j].replace(',', ""));
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers() {
        for (text, expect) in [
            ("The answer is 42.", Some("42")),
            ("3 + 4 = 7", Some("7")),
            ("It is -5", Some("-5")),
            ("about 1,234.5 units", Some("1234.5")),
            ("so \\boxed{\\frac{1}{2}} done 9", Some("\\frac{1}{2}")),
            ("\\boxed{12} and later 13", Some("12")),
            ("<answer> 8 </answer> then 9", Some("8")),
            ("<answer>x=3</answer>", Some("3")),
            ("<answer>yes</answer>", Some("yes")),
            ("no digits here", None),
            ("3. Then", Some("3")),
        ] {
            assert_eq!(final_answer(text).as_deref(), expect, "{text}");
        }
    }

    #[test]
    fn weighted_verifiers() {
        let cfg = RewardConfig {
            math: 1.0,
            format: 0.5,
            format_kind: FormatKind::AnswerTags,
            exact_match: 0.25,
            ..Default::default()
        };
        assert_eq!(cfg.score("<answer>7</answer>", Some("7")), 1.5);
        assert_eq!(cfg.score("7", Some("7")), 1.25);
        assert_eq!(cfg.score("7.0", Some("7")), 1.0);
        assert_eq!(cfg.score("<answer>8</answer>", Some("7")), 0.5);
        assert_eq!(cfg.score("nothing", None), 0.0);
        assert!(math_correct("1,000", "1000"));
        assert!(!math_correct("100", "1000"));
        assert_eq!(format_score("x \\boxed{3}", FormatKind::Boxed), 1.0);
        assert_eq!(format_score("x \\boxed{3", FormatKind::Boxed), 0.0);
        assert_eq!(format_score("a 3", FormatKind::Number), 1.0);
        assert_eq!(
            format_score("<answer> </answer>", FormatKind::AnswerTags),
            0.0
        );
        assert_eq!(format_score("12 ab", FormatKind::Digits), 0.5);
        assert_eq!(format_score("  ", FormatKind::Digits), 0.0);
        let off = RewardConfig {
            math: 0.0,
            ..Default::default()
        };
        assert!(off
            .validate()
            .unwrap_err()
            .to_string()
            .contains("every weight is 0"));
        off.validate_for(true).unwrap();
        let nan = RewardConfig {
            format: f64::NAN,
            ..Default::default()
        };
        assert!(nan
            .validate()
            .unwrap_err()
            .to_string()
            .contains("[reward] format"));
    }
}
