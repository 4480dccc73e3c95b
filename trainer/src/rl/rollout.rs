//! A rollout: one completion of one prompt, with what the generator recorded.
//!
//! JSONL form (one per line), as `tandem train-step` reads and the trainer dumps:
//! `{"group": "g0", "prompt_ids": [...], "completion_ids": [...],
//!   "behavior_logprobs": [...], "reward": 1.0, "versions": [...],
//!   "loss_mask": [1, 1, 0, ...], "finish_reason": "stop"}` (the last three optional).
//! A batch dump (`[trainer] dump_batches`) also carries `prompt_text` and
//! `completion_text`, the ids decoded, and `info`, the dataset record's info (when it
//! has one); [`parse_jsonl`] ignores them (the ids are what is trained).
//!
//! A token whose `loss_mask` entry is 0 (tool output inside a multi-turn episode, say)
//! is context only: it gets no loss, counts in no denominator, and its
//! `behavior_logprobs` and `versions` entries are not used (any logprob ≤ 0 is
//! accepted there).

use serde::{Deserialize, Serialize};
pub use tandem_model::FinishReason;

use crate::error::{invalid, Result};

/// One sampled completion and its score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Completions of the same prompt share a group (GRPO / RLOO statistics).
    pub group: String,
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// log μ of each completion token, as the generator sampled it.
    pub behavior_logprobs: Vec<f64>,
    pub reward: f64,
    /// Policy version that produced each completion token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<u64>>,
    /// 1 = the token is trained, 0 = context only; absent = every token trained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_mask: Option<Vec<u8>>,
    /// Why the completion ended: `stop` (a stop token) or `length` (the token limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<FinishReason>,
    /// A multi-turn episode's turns and tool use (absent: one turn, no tools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub episode: Option<EpisodeStats>,
}

impl EpisodeStats {
    /// At least one turn, no more failed calls than calls, finite non-negative seconds.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.turns == 0 {
            return Err("turns must be ≥ 1".into());
        }
        if self.tool_errors > self.tool_calls {
            return Err(format!(
                "tool_errors ({}) exceeds tool_calls ({})",
                self.tool_errors, self.tool_calls
            ));
        }
        if !(self.tool_seconds.is_finite()
            && (0.0..=tandem_proto::limits::TOOL_SECONDS).contains(&self.tool_seconds))
        {
            return Err(format!(
                "tool_seconds = {} must be finite and in [0, {}] (tandem_proto::limits::TOOL_SECONDS)",
                self.tool_seconds,
                tandem_proto::limits::TOOL_SECONDS
            ));
        }
        Ok(())
    }
}

/// What a multi-turn episode did (`[env]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpisodeStats {
    /// Model turns (≥ 1).
    pub turns: u32,
    pub tool_calls: u32,
    /// Calls that failed (≤ `tool_calls`).
    pub tool_errors: u32,
    pub tool_seconds: f64,
}

impl Rollout {
    /// Whether completion token `t` is trained (its `loss_mask` entry is 1 or absent).
    pub fn is_trained(&self, t: usize) -> bool {
        self.loss_mask.as_ref().is_none_or(|m| m[t] != 0)
    }

    /// The oldest version among the trained tokens (a masked token's version is not
    /// read), or among all tokens when none is trained; `None` without `versions`.
    pub fn oldest_version(&self) -> Option<u64> {
        let v = self.versions.as_ref()?;
        let trained = v
            .iter()
            .enumerate()
            .filter(|(t, _)| self.is_trained(*t))
            .map(|(_, &x)| x)
            .min();
        trained.or_else(|| v.iter().copied().min())
    }

    /// The number of trained completion tokens, Σ m.
    pub fn trained_tokens(&self) -> usize {
        match &self.loss_mask {
            Some(m) => m.iter().filter(|&&x| x != 0).count(),
            None => self.completion_ids.len(),
        }
    }

    /// Checks internal consistency and token ids against `vocab_size`; the message names the field.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        if self.prompt_ids.is_empty() {
            return Err(invalid("`prompt_ids` is empty"));
        }
        if self.completion_ids.is_empty() {
            return Err(invalid("`completion_ids` is empty"));
        }
        if self.behavior_logprobs.len() != self.completion_ids.len() {
            return Err(invalid(format!(
                "`behavior_logprobs` has {} values for {} `completion_ids`",
                self.behavior_logprobs.len(),
                self.completion_ids.len()
            )));
        }
        if let Some(m) = &self.loss_mask {
            if m.len() != self.completion_ids.len() {
                return Err(invalid(format!(
                    "`loss_mask` has {} values for {} `completion_ids`",
                    m.len(),
                    self.completion_ids.len()
                )));
            }
            if let Some((i, x)) = m.iter().enumerate().find(|(_, &x)| x > 1) {
                return Err(invalid(format!("`loss_mask[{i}]` = {x} must be 0 or 1")));
            }
        }
        if let Some(e) = &self.episode {
            e.validate()
                .map_err(|why| invalid(format!("`episode`: {why}")))?;
        }
        // Masked tokens' logprobs are not used: any value ≤ 0 passes there.
        if let Some((i, lp)) =
            self.behavior_logprobs.iter().enumerate().find(|(i, lp)| {
                lp.is_nan() || **lp > 0.0 || (self.is_trained(*i) && !lp.is_finite())
            })
        {
            return Err(invalid(format!(
                "`behavior_logprobs[{i}]` = {lp} must be finite and ≤ 0"
            )));
        }
        if !self.reward.is_finite() {
            return Err(invalid(format!(
                "`reward` = {} must be finite",
                self.reward
            )));
        }
        for (field, ids) in [
            ("prompt_ids", &self.prompt_ids),
            ("completion_ids", &self.completion_ids),
        ] {
            if let Some((i, id)) = ids
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= vocab_size)
            {
                return Err(invalid(format!(
                    "`{field}[{i}]` = {id} is not below the vocabulary size {vocab_size}"
                )));
            }
        }
        if let Some(v) = &self.versions {
            if v.len() != self.completion_ids.len() {
                return Err(invalid(format!(
                    "`versions` has {} values for {} `completion_ids`",
                    v.len(),
                    self.completion_ids.len()
                )));
            }
        }
        Ok(())
    }
}

/// Parses rollout JSONL text; `source` names the file in errors (`FILE:LINE: ...`).
pub fn parse_jsonl(text: &str, source: &str, vocab_size: usize) -> Result<Vec<Rollout>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{source}:{}", n + 1);
        let mut v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| invalid(format!("{at}: {e}")))?;
        if let Some(o) = v.as_object_mut() {
            // A batch dump's decoded text and record info: the ids are what is trained.
            o.remove("prompt_text");
            o.remove("completion_text");
            o.remove("info");
        }
        let r: Rollout = serde_json::from_value(v).map_err(|e| invalid(format!("{at}: {e}")))?;
        r.validate(vocab_size)
            .map_err(|e| invalid(format!("{at}: {e}")))?;
        out.push(r);
    }
    if out.is_empty() {
        return Err(invalid(format!("{source}: no rollouts")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"group":"g0","prompt_ids":[1,2],"completion_ids":[3,4],"behavior_logprobs":[-0.5,-1.0],"reward":1.0}"#;

    /// A batch dump's line (decoded text, the record's info) replays as its rollout.
    #[test]
    fn a_dumped_line_replays() {
        let dumped = OK.replace(
            "1.0}",
            "1.0,\"prompt_text\":\"a\",\"completion_text\":\"b\",\"info\":{\"level\":3}}",
        );
        assert_eq!(
            parse_jsonl(&dumped, "d.jsonl", 10).unwrap(),
            parse_jsonl(OK, "r.jsonl", 10).unwrap()
        );
    }

    #[test]
    fn parses_and_locates_errors() {
        assert_eq!(parse_jsonl(OK, "r.jsonl", 10).unwrap().len(), 1);
        let cases = [
            (
                OK.replace("[-0.5,-1.0]", "[-0.5]"),
                "behavior_logprobs` has 1",
            ),
            (OK.replace("-1.0]", "0.5]"), "behavior_logprobs[1]"),
            (OK.replace("[3,4]", "[3,40]"), "completion_ids[1]"),
            (OK.replace("\"reward\"", "\"rewards\""), "rewards"),
            (OK.replace("[1,2]", "[]"), "prompt_ids"),
            (
                OK.replace("1.0}", "1.0,\"loss_mask\":[1]}"),
                "loss_mask` has 1",
            ),
            (
                OK.replace("1.0}", "1.0,\"loss_mask\":[1,2]}"),
                "loss_mask[1]",
            ),
            (
                OK.replace("1.0}", "1.0,\"finish_reason\":\"eos\"}"),
                "expected `stop` or `length`",
            ),
            (
                OK.replace("-1.0]", "0.5]")
                    .replace("1.0}", "1.0,\"loss_mask\":[1,0]}"),
                "behavior_logprobs[1]",
            ),
        ];
        for (line, needle) in cases {
            let text = format!("{OK}\n{line}\n");
            let e = parse_jsonl(&text, "r.jsonl", 10).unwrap_err().to_string();
            assert!(e.contains("r.jsonl:2") && e.contains(needle), "{e}");
        }
        // A masked token's logprob is not used; its mask, reason and versions parse.
        let masked = OK.replace(
            "1.0}",
            "1.0,\"loss_mask\":[1,0],\"finish_reason\":\"length\",\"versions\":[3,9]}",
        );
        let r = &parse_jsonl(&masked, "r.jsonl", 10).unwrap()[0];
        assert_eq!(r.finish_reason, Some(FinishReason::Length));
        assert!(r.is_trained(0) && !r.is_trained(1));
        assert_eq!(r.trained_tokens(), 1);
        // NaN is not JSON; a non-number reward is a type error on the line.
        assert!(parse_jsonl(&OK.replace("1.0}", "NaN}"), "r.jsonl", 10)
            .unwrap_err()
            .to_string()
            .contains("r.jsonl:1"));
    }
}
