//! Scoring a finished group and pushing it: the verifiers, the judge, the reward
//! service (retried, the lease given back when it keeps failing), the environment's
//! and agent's rewards and the reward model, summed with their `[reward]` weights into
//! the group's rollout.

use std::time::Duration;

use tandem_proto::client;
use tandem_proto::v1::{Completion, PromptLease, RolloutGroup, ScoreRequest};

use crate::error::Result;
use crate::groups::{Done, Sampled};
use crate::worker::Worker;

impl Worker {
    /// Scores a group whose episodes all ended and pushes it (unless its lease went
    /// back).
    pub(crate) fn score_and_push(&mut self, d: Done, worker_id: u64) -> Result<()> {
        if let Some(g) = self.score(&d.lease, d.prompt, d.sampled, worker_id)? {
            self.push(g)?;
        }
        Ok(())
    }

    /// Scores a finished group (verifiers, judge, reward service, reward model) and
    /// builds its rollout; each token carries the version it was sampled with. `None`
    /// when the reward service kept failing and the lease was given back.
    fn score(
        &mut self,
        l: &PromptLease,
        prompt_ids: Vec<u32>,
        s: Sampled,
        worker_id: u64,
    ) -> Result<Option<RolloutGroup>> {
        let f = &s.finished;
        let rows = &f.completions;
        // Verifiers and judges read each episode's final model turn.
        let texts: Vec<String> = s
            .finals
            .iter()
            .map(|ids| self.model.tokenizer.decode(ids, true))
            .collect::<std::result::Result<_, _>>()?;
        let answer = (!l.answer.is_empty()).then_some(l.answer.as_str());
        let mut rewards: Vec<f64> = texts
            .iter()
            .map(|t| self.settings.reward.score(t, answer))
            .collect();
        let prompt = prompt_text(l);
        if let Some(judge) = &self.judge {
            for (r, s) in rewards
                .iter_mut()
                .zip(judge.score(&prompt, &texts, answer)?)
            {
                *r += self.settings.reward.judge_weight * s;
            }
        }
        if self.reward_service.is_some() {
            let req = ScoreRequest {
                prompt: prompt.clone(),
                answer: l.answer.clone(),
                completions: texts.clone(),
            };
            let scored = match self.service_scores(req) {
                Ok(s) => s,
                Err(why) => {
                    // Skip instead of stop: the lease goes back, another generator
                    // (or this one, later) takes the prompt.
                    self.release(l, &why);
                    return Ok(None);
                }
            };
            for (r, s) in rewards.iter_mut().zip(scored) {
                *r += self.settings.reward.service_weight * s;
            }
        }
        for (r, e) in rewards.iter_mut().zip(&s.env_rewards) {
            *r += self.env.config.reward_weight * e;
        }
        if let Some(rm) = &self.reward_model {
            let ids: Vec<Vec<u32>> = rows.iter().map(|c| c.tokens.clone()).collect();
            for (r, s) in rewards.iter_mut().zip(rm.score(&prompt_ids, &ids)?) {
                *r += self.settings.reward.model_weight * s;
            }
        }
        // The trainer refuses a group with a reward beyond `[reward] bound`: skip it
        // instead, the lease goes back (one bad score never stops the run).
        let bound = self.settings.reward.bound;
        if let Some((i, r)) = rewards
            .iter()
            .enumerate()
            .find(|(_, r)| !(r.is_finite() && r.abs() <= bound))
        {
            self.release(
                l,
                &format!("completion {i}'s reward {r} is beyond [reward] bound ±{bound}"),
            );
            return Ok(None);
        }
        Ok(Some(RolloutGroup {
            seq: 0,
            session_token: self.creds.session(),
            lease_id: l.lease_id,
            prompt_index: l.prompt_index,
            worker_id,
            prompt_ids,
            completions: rows
                .iter()
                .zip(&f.tags)
                .zip(rewards)
                .zip(&s.masks)
                .zip(&s.episodes)
                .map(|((((c, v), reward), mask), episode)| Completion {
                    turns: episode.0,
                    tool_calls: episode.1,
                    tool_errors: episode.2,
                    tool_seconds: episode.3,
                    completion_ids: c.tokens.clone(),
                    behavior_logprobs: c.logprobs.clone(),
                    versions: v.clone(),
                    reward,
                    finish_reason: match c.finish_reason {
                        Some(tandem_model::FinishReason::Stop) => "stop".into(),
                        _ => "length".into(),
                    },
                    // Sent only when some token is the environment's.
                    loss_mask: if mask.contains(&0) {
                        mask.iter().map(|&m| u32::from(m)).collect()
                    } else {
                        vec![]
                    },
                })
                .collect(),
        }))
    }

    /// The reward service's scores of one group, retried with exponential backoff and
    /// jitter (0.5 s, 1 s, 2 s, each ±25 %) when the call fails or the reply is
    /// malformed; after the last attempt, why it failed.
    fn service_scores(&mut self, req: ScoreRequest) -> std::result::Result<Vec<f64>, String> {
        const ATTEMPTS: u32 = 4;
        let n = req.completions.len();
        let mut why = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let base = 0.5 * f64::from(1u32 << (attempt - 1));
                let jitter = 0.75 + 0.5 * tandem_proto::retry::unit_noise();
                std::thread::sleep(Duration::from_secs_f64(base * jitter));
            }
            let Some(svc) = self.reward_service.as_mut() else {
                return Err("no reward service".into());
            };
            match self.rt.block_on(svc.score(client::unary(req.clone()))) {
                Ok(r) => {
                    let scored = r.into_inner().rewards;
                    let bound = self.settings.reward.bound;
                    if scored.len() == n && scored.iter().all(|r| r.is_finite() && r.abs() <= bound)
                    {
                        return Ok(scored);
                    }
                    why = format!(
                        "returned {} rewards for {n} completions (all must be finite and within [reward] bound ±{bound})",
                        scored.len()
                    );
                }
                Err(e) => why = client::describe(&e),
            }
            tracing::warn!(
                attempt = attempt + 1,
                of = ATTEMPTS,
                "[reward] service: {why}"
            );
        }
        Err(format!("[reward] service failed {ATTEMPTS} times: {why}"))
    }
}

/// A lease's prompt as plain text (a conversation's messages joined by newlines): what
/// judges, reward services and environments read.
pub(crate) fn prompt_text(l: &PromptLease) -> String {
    if l.messages.is_empty() {
        l.text.clone()
    } else {
        l.messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}
