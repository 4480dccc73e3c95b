//! Checking a rollout group before it may enter the buffer (ARCHITECTURE.md, "Nothing bad gets in"):
//! text fields within `tandem_proto::limits`, token ids below the vocabulary, logprobs
//! finite and ≤ 0, lengths consistent, versions not from the future, rewards finite
//! and within `[reward] bound`, sizes bounded. The message names the field, and shows
//! a peer's text only escaped and cut. A group that passes becomes the buffer's
//! [`Group`] ([`into_group`]).

use tandem_proto::limits::{printable, Check};
use tandem_proto::v1::{Completion, RolloutGroup};

use crate::node::buffer::{group_key, Group};
use crate::rl::rollout::{FinishReason, Rollout};

/// What a group must satisfy.
pub struct Limits {
    pub vocab_size: usize,
    pub group_size: usize,
    /// Samples one episode may yield. Above 1 (agent programs, whose turns may start
    /// new samples, and which may fail before their first turn) a group carries 1 to
    /// `group_size × samples_per_episode` completions; otherwise exactly `group_size`.
    pub samples_per_episode: usize,
    /// Longest completion accepted.
    pub max_completion_tokens: usize,
    /// Longest prompt + completion accepted (the model's context).
    pub max_context_tokens: usize,
    /// Dynamic sampling (`[run] filter_zero_std`): a group whose rewards are all equal
    /// is filtered out (its lease closed, another admitted in its place).
    pub filter_zero_std: bool,
    /// `[reward] bound`: every reward r must satisfy |r| ≤ this.
    pub reward_bound: f64,
}

/// Whether every completion of `g` has the same reward: its group-relative advantages
/// are all zero, it teaches nothing (DAPO's dynamic sampling drops it).
pub fn uninformative(g: &RolloutGroup) -> bool {
    g.completions.windows(2).all(|w| w[0].reward == w[1].reward)
}

/// Returns the first problem found, naming the field. `policy_version` is the newest
/// published version: no token may claim a newer one.
pub fn check_group(g: &RolloutGroup, l: &Limits, policy_version: u64) -> Result<(), String> {
    g.check().map_err(|e| e.to_string())?;
    if g.lease_id == 0 {
        return Err("lease_id: must be a lease the coordinator granted (≥ 1)".into());
    }
    if g.prompt_ids.is_empty() || g.prompt_ids.len() > l.max_context_tokens {
        return Err(format!(
            "prompt_ids: {} tokens, must be 1..={}",
            g.prompt_ids.len(),
            l.max_context_tokens
        ));
    }
    if let Some((i, id)) = g
        .prompt_ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= l.vocab_size)
    {
        return Err(format!(
            "prompt_ids[{i}] = {id}: not below the vocabulary size {}",
            l.vocab_size
        ));
    }
    let most_failed = u64::from(g.retries) * l.group_size as u64;
    if u64::from(g.episodes_failed) > most_failed {
        return Err(format!(
            "episodes_failed: {}, more than retries × group_size = {} × {}",
            g.episodes_failed, g.retries, l.group_size
        ));
    }
    let n = g.completions.len();
    if l.samples_per_episode > 1 {
        let most = l.group_size * l.samples_per_episode;
        if !(1..=most).contains(&n) {
            return Err(format!(
                "completions: {n} in the group, must be 1..={most} (group_size × [env] max_turns)"
            ));
        }
    } else if n != l.group_size {
        return Err(format!(
            "completions: {n} in the group, the run's group_size is {}",
            l.group_size
        ));
    }
    for (c, comp) in g.completions.iter().enumerate() {
        check_completion(c, comp, g.prompt_ids.len(), l, policy_version)?;
    }
    Ok(())
}

/// The checks of completion `c` (of a group whose prompt has `prompt_len` tokens).
fn check_completion(
    c: usize,
    comp: &Completion,
    prompt_len: usize,
    l: &Limits,
    policy_version: u64,
) -> Result<(), String> {
    let n = comp.completion_ids.len();
    if n == 0 || n > l.max_completion_tokens {
        return Err(format!(
            "completions[{c}].completion_ids: {n} tokens, must be 1..={}",
            l.max_completion_tokens
        ));
    }
    if prompt_len + n > l.max_context_tokens {
        return Err(format!(
            "completions[{c}]: prompt + completion exceed the context of {}",
            l.max_context_tokens
        ));
    }
    if let Some((i, id)) = comp
        .completion_ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= l.vocab_size)
    {
        return Err(format!(
            "completions[{c}].completion_ids[{i}] = {id}: not below the vocabulary size {}",
            l.vocab_size
        ));
    }
    if comp.behavior_logprobs.len() != n {
        return Err(format!(
            "completions[{c}].behavior_logprobs: {} values for {n} tokens",
            comp.behavior_logprobs.len()
        ));
    }
    if !comp.loss_mask.is_empty() && comp.loss_mask.len() != n {
        return Err(format!(
            "completions[{c}].loss_mask: {} values for {n} tokens (send none to train every token)",
            comp.loss_mask.len()
        ));
    }
    if let Some((i, m)) = comp.loss_mask.iter().enumerate().find(|(_, &m)| m > 1) {
        return Err(format!(
            "completions[{c}].loss_mask[{i}] = {m}: must be 0 or 1"
        ));
    }
    let trained = |t: usize| comp.loss_mask.get(t).is_none_or(|&m| m == 1);
    if let Some((i, lp)) = comp
        .behavior_logprobs
        .iter()
        .enumerate()
        .find(|(i, lp)| lp.is_nan() || **lp > 0.0 || (trained(*i) && !lp.is_finite()))
    {
        return Err(format!(
            "completions[{c}].behavior_logprobs[{i}] = {lp}: must be finite and ≤ 0"
        ));
    }
    if let Some(e) = episode_of(comp) {
        e.validate()
            .map_err(|why| format!("completions[{c}] episode: {why}"))?;
    }
    if !matches!(comp.finish_reason.as_str(), "" | "stop" | "length") {
        return Err(format!(
            "completions[{c}].finish_reason = {:?}: must be \"stop\", \"length\" or empty",
            printable(&comp.finish_reason)
        ));
    }
    if comp.versions.len() != n {
        return Err(format!(
            "completions[{c}].versions: {} values for {n} tokens",
            comp.versions.len()
        ));
    }
    if let Some((i, v)) = comp
        .versions
        .iter()
        .enumerate()
        .find(|(i, &v)| trained(*i) && v > policy_version)
    {
        return Err(format!(
            "completions[{c}].versions[{i}] = {v}: newer than the published version {}",
            policy_version
        ));
    }
    if !(comp.reward.is_finite() && comp.reward.abs() <= l.reward_bound) {
        return Err(format!(
            "completions[{c}].reward = {}: must be finite and within ±{} ([reward] bound)",
            comp.reward, l.reward_bound
        ));
    }
    Ok(())
}

/// A checked group as the buffer holds it: one rollout per completion, the prompt
/// repeated, the group keyed by prompt, lease and worker.
pub fn into_group(g: RolloutGroup) -> Group {
    Group {
        lease_id: g.lease_id,
        prompt_index: g.prompt_index,
        worker_id: g.worker_id,
        info: (!g.info_json.is_empty()).then(|| g.info_json.clone()),
        retries: g.retries,
        episodes_failed: g.episodes_failed,
        rollouts: g
            .completions
            .into_iter()
            .map(|c| Rollout {
                episode: episode_of(&c),
                group: group_key(g.prompt_index, g.lease_id, g.worker_id),
                prompt_ids: g.prompt_ids.clone(),
                completion_ids: c.completion_ids,
                behavior_logprobs: c.behavior_logprobs.iter().map(|&x| x as f64).collect(),
                reward: c.reward,
                versions: Some(c.versions),
                loss_mask: (!c.loss_mask.is_empty())
                    .then(|| c.loss_mask.iter().map(|&m| m as u8).collect()),
                finish_reason: match c.finish_reason.as_str() {
                    "stop" => Some(FinishReason::Stop),
                    "length" => Some(FinishReason::Length),
                    _ => None,
                },
            })
            .collect(),
    }
}

/// A completion's episode statistics (`None` when it reports none: one turn).
pub fn episode_of(c: &Completion) -> Option<crate::rl::rollout::EpisodeStats> {
    (c.turns > 0 || c.tool_calls > 0 || c.tool_errors > 0 || c.tool_seconds != 0.0).then_some(
        crate::rl::rollout::EpisodeStats {
            turns: c.turns,
            tool_calls: c.tool_calls,
            tool_errors: c.tool_errors,
            tool_seconds: c.tool_seconds,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::v1::Completion;

    fn good() -> RolloutGroup {
        RolloutGroup {
            seq: 1,
            session_token: String::new(),
            lease_id: 3,
            prompt_index: 0,
            worker_id: 1,
            prompt_ids: vec![1, 2],
            completions: vec![
                Completion {
                    completion_ids: vec![5, 6],
                    behavior_logprobs: vec![-0.5, -1.0],
                    versions: vec![2, 3],
                    reward: 1.0,
                    finish_reason: "stop".into(),
                    loss_mask: vec![],
                    turns: 2,
                    tool_calls: 1,
                    tool_errors: 0,
                    tool_seconds: 0.01,
                };
                2
            ],
            info_json: r#"{"level": 3}"#.into(),
            retries: 1,
            episodes_failed: 2,
        }
    }

    #[test]
    fn every_rule_names_its_field() {
        let l = Limits {
            vocab_size: 10,
            group_size: 2,
            samples_per_episode: 1,
            max_completion_tokens: 4,
            max_context_tokens: 8,
            filter_zero_std: false,
            reward_bound: 100.0,
        };
        assert!(uninformative(&good()));
        let mut varied = good();
        varied.completions[1].reward = 0.5;
        assert!(!uninformative(&varied));
        assert!(check_group(&good(), &l, 3).is_ok());
        // Agent episodes: 1..=group_size × samples_per_episode completions.
        let agents = Limits {
            samples_per_episode: 3,
            ..l
        };
        let mut more = good();
        more.completions.extend(good().completions);
        assert!(check_group(&more, &agents, 3).is_ok());
        assert!(check_group(&more, &l, 3)
            .unwrap_err()
            .contains("group_size"));
        more.completions.truncate(1);
        assert!(check_group(&more, &agents, 3).is_ok());
        more.completions.clear();
        assert!(check_group(&more, &agents, 3)
            .unwrap_err()
            .contains("max_turns"));
        /// A change that breaks one rule, and the field the refusal must name.
        type Case<'a> = (Box<dyn Fn(&mut RolloutGroup)>, &'a str);
        let cases: Vec<Case> = vec![
            (Box::new(|g| g.lease_id = 0), "lease_id"),
            (Box::new(|g| g.episodes_failed = 3), "episodes_failed"),
            (Box::new(|g| g.retries = 0), "episodes_failed"),
            (Box::new(|g| g.retries = 101), "retries"),
            (
                Box::new(|g| g.completions[0].tool_errors = 2),
                "completions[0] episode: tool_errors",
            ),
            (
                Box::new(|g| g.completions[1].tool_seconds = f64::NAN),
                "completions[1] episode: tool_seconds",
            ),
            (
                Box::new(|g| g.completions[1].turns = 0),
                "completions[1] episode: turns",
            ),
            (Box::new(|g| g.prompt_ids[1] = 10), "prompt_ids[1]"),
            (
                Box::new(|g| {
                    g.completions.pop();
                }),
                "group_size",
            ),
            (
                Box::new(|g| g.completions[1].completion_ids = vec![1; 5]),
                "completions[1].completion_ids",
            ),
            (
                Box::new(|g| g.completions[0].completion_ids[1] = 99),
                "completions[0].completion_ids[1]",
            ),
            (
                Box::new(|g| g.completions[0].behavior_logprobs[0] = f32::NAN),
                "behavior_logprobs[0]",
            ),
            (
                Box::new(|g| g.completions[0].behavior_logprobs[1] = 0.5),
                "behavior_logprobs[1]",
            ),
            (
                Box::new(|g| {
                    g.completions[1]
                        .behavior_logprobs
                        .pop()
                        .map(|_| ())
                        .unwrap_or(())
                }),
                "behavior_logprobs: 1 values",
            ),
            (
                Box::new(|g| g.completions[0].versions[1] = 4),
                "newer than the published version 3",
            ),
            (
                Box::new(|g| g.completions[0].reward = f64::INFINITY),
                "completions[0].reward",
            ),
            (
                Box::new(|g| g.completions[1].reward = 1e308),
                "completions[1].reward = 100000000",
            ),
            (
                Box::new(|g| g.completions[1].reward = -100.5),
                "within ±100 ([reward] bound)",
            ),
            (
                Box::new(|g| g.completions[1].finish_reason = "x\n".repeat(1 << 20)),
                "completions[1].finish_reason: 2097152 bytes",
            ),
            (
                Box::new(|g| g.completions[1].finish_reason = "eos\nINFO forged".into()),
                "finish_reason = \"eos\\nINFO forged\"",
            ),
            (
                Box::new(|g| g.session_token = "s".repeat(1 << 20)),
                "session_token: 1048576 bytes",
            ),
            (
                Box::new(|g| g.info_json = "[1]".into()),
                "info_json: not a JSON object",
            ),
            (
                Box::new(|g| g.info_json = format!("{{\"x\": \"{}\"}}", "x".repeat(1 << 16))),
                "info_json: 65545 bytes",
            ),
            (
                Box::new(|g| g.completions[0].tool_seconds = 1e300),
                "completions[0] episode: tool_seconds",
            ),
            (
                Box::new(|g| g.completions[1].loss_mask = vec![1]),
                "completions[1].loss_mask: 1 values",
            ),
            (
                Box::new(|g| g.completions[1].loss_mask = vec![1, 2]),
                "completions[1].loss_mask[1]",
            ),
            (
                Box::new(|g| g.completions[0].finish_reason = "eos".into()),
                "completions[0].finish_reason",
            ),
            (
                // A masked token may carry any logprob ≤ 0, never a positive one.
                Box::new(|g| {
                    g.completions[0].loss_mask = vec![1, 0];
                    g.completions[0].behavior_logprobs[1] = 0.5;
                }),
                "behavior_logprobs[1]",
            ),
        ];
        // A masked token's logprob and version are not read.
        let mut g = good();
        g.completions[0].loss_mask = vec![1, 0];
        g.completions[0].behavior_logprobs[1] = f32::NEG_INFINITY;
        g.completions[0].versions[1] = 99;
        assert!(check_group(&g, &l, 3).is_ok());
        for (edit, needle) in cases {
            let mut g = good();
            edit(&mut g);
            let e = check_group(&g, &l, 3).unwrap_err();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }

    /// The lease's info goes with the group into the buffer (and its checkpoints), for
    /// the batch dumps; none stays none.
    #[test]
    fn a_group_keeps_its_record_s_info() {
        assert_eq!(into_group(good()).info.as_deref(), Some(r#"{"level": 3}"#));
        let none = RolloutGroup {
            info_json: String::new(),
            ..good()
        };
        assert_eq!(into_group(none).info, None);
    }
}
