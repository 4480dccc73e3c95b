//! The scorer stage: finished groups come in on a channel and are scored on a thread
//! of their own — the verifiers, the judge, the reward service (retried), the
//! environment's and agent's rewards and the reward model, summed with their `[reward]`
//! weights — built into rollouts and pushed through the [`Outbox`]. A group whose
//! scoring failed (the reward service kept failing, a reward beyond `[reward] bound`)
//! goes back to the engine's loop to run again, or its lease is given back
//! ([`crate::failure`]); the stage gives back the leases of every group that failed
//! for good, and ends with [`Error::Failing`] when most of the recent ones did. The
//! engine's loop only sends: it never waits on a reward, a judge or a push.
//!
//! The judge and the reward model are models of their own (loaded beside the policy,
//! never updated by weight syncs), so the scorer owns them outright and runs their
//! forwards on its thread: nothing it does needs the policy's weights or the engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_env::GroupSamples;
use tandem_model::{RewardModel, Tokenizer};
use tandem_proto::auth::Credentials;
use tandem_proto::v1::{Completion, GroupFailure, PromptLease, RolloutGroup, ScoreRequest};

use crate::error::{Error, Result};
use crate::failure::{self, Attempts, Failure, Window};
use crate::heartbeat::Beat;
use crate::judge::Judge;
use crate::leases::{task, LeaseClient};
use crate::outbox::Outbox;
use crate::reward::RewardConfig;
use crate::reward_service::RewardService;
use crate::sampler::StepCount;

/// What the engine's loop hands the scorer.
pub(crate) enum Job {
    /// A group whose episodes all ended, sampled on `prompt` after `attempts` failed
    /// runs: score it, build its rollout, push it.
    Score {
        lease: PromptLease,
        attempts: Attempts,
        prompt: Vec<u32>,
        samples: GroupSamples,
    },
    /// A group that failed `[env] max_retries` + 1 times, the last with `failure`: give
    /// its lease back.
    GiveBack {
        lease: PromptLease,
        failure: Failure,
    },
}

/// A group to run again (its scoring failed), after its failed runs so far.
pub(crate) type Again = (PromptLease, Attempts);

/// How often the scorer looks at the stream when no group comes (a broken stream is
/// reopened and resent even while nothing new finishes).
const IDLE_TICK: Duration = Duration::from_millis(50);

/// A reward-service call at least this long is logged at `info`, with the engine's
/// steps meanwhile.
const SLOW_CALL: Duration = Duration::from_secs(1);

/// The scorer stage and everything it owns.
pub(crate) struct Scorer {
    pub reward: RewardConfig,
    /// `[env] reward_weight`.
    pub env_weight: f64,
    /// Decodes each episode's final model turn for the verifiers and judges.
    pub tokenizer: Tokenizer,
    pub judge: Option<Judge>,
    pub reward_model: Option<RewardModel>,
    pub service: Option<RewardService>,
    /// Gives back the leases of groups that cannot be scored.
    pub leases: LeaseClient,
    pub outbox: Outbox,
    /// The session token every pushed group carries.
    pub creds: Credentials,
    /// This worker's id.
    pub beat: Arc<Beat>,
    /// The engine's steps, read to log what it did during a slow reward call.
    pub engine_steps: StepCount,
    /// `[env] max_retries`.
    pub max_retries: u32,
    /// `[run] group_size`: episodes of a group whose scoring failed.
    pub group_size: u32,
    /// The outcomes of the last groups: most given back stops the generator.
    pub window: Window,
}

impl Scorer {
    /// Starts the stage on a thread of its own.
    pub fn spawn(self) -> Result<ScorerHandle> {
        let (tx, rx) = channel();
        let (again_tx, again) = channel();
        let abandon = Arc::new(AtomicBool::new(false));
        let a = abandon.clone();
        let thread = std::thread::Builder::new()
            .name("scorer".into())
            .spawn(move || self.run(rx, &a, &again_tx))?;
        Ok(ScorerHandle {
            jobs: Some(tx),
            again,
            abandon,
            thread: Some(thread),
        })
    }

    /// Takes jobs until the channel closes (the jobs left then are dropped when
    /// `abandon` is set: the run is over), keeping the stream delivered meanwhile; then
    /// waits for the acknowledgements. A group whose scoring failed goes to `again`
    /// to run again, or is given back.
    fn run(
        mut self,
        jobs: Receiver<Job>,
        abandon: &AtomicBool,
        again: &Sender<Again>,
    ) -> Result<()> {
        loop {
            match jobs.recv_timeout(IDLE_TICK) {
                Ok(_) if abandon.load(Ordering::SeqCst) => {}
                Ok(Job::Score {
                    lease,
                    attempts,
                    prompt,
                    samples,
                }) => match self.score(&lease, attempts, prompt, samples)? {
                    Ok(g) => {
                        self.outbox.push(g)?;
                        self.window.pushed();
                    }
                    Err(f) => {
                        let (id, max) = (lease.lease_id, self.max_retries);
                        match failure::retry(id, attempts, &f, max, &self.beat) {
                            // The engine's loop has gone when the run is over.
                            Some(next) => drop(again.send((lease, next))),
                            None => self.give_back(&lease, &f)?,
                        }
                    }
                },
                Ok(Job::GiveBack { lease, failure }) => self.give_back(&lease, &failure)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.outbox.redeliver()?;
        }
        self.outbox.drain();
        Ok(())
    }

    /// Gives lease `l` back: its group failed `[env] max_retries` + 1 times, the last
    /// with `f`. An error ([`Error::Failing`]) once most of the recent groups were.
    fn give_back(&mut self, l: &PromptLease, f: &Failure) -> Result<()> {
        let why = format!(
            "{} (the group failed {} times: [env] max_retries = {})",
            f.why,
            self.max_retries + 1,
            self.max_retries
        );
        self.leases.release(l, &why, f.kind);
        self.window.given_back(f, self.max_retries)
    }

    /// Scores a finished group (after `attempts` failed runs) and builds its rollout;
    /// each token carries the version it was sampled with. `Err` when its scoring
    /// failed (the reward service kept failing, or a reward is beyond `[reward] bound`).
    fn score(
        &mut self,
        l: &PromptLease,
        attempts: Attempts,
        prompt_ids: Vec<u32>,
        s: GroupSamples,
    ) -> Result<std::result::Result<RolloutGroup, Failure>> {
        let rewards = match self.rewards(l, &prompt_ids, &s)? {
            Ok(r) => r,
            Err(f) => return Ok(Err(f)),
        };
        Ok(Ok(RolloutGroup {
            seq: 0,
            session_token: self.creds.session(),
            lease_id: l.lease_id,
            prompt_index: l.prompt_index,
            worker_id: self.beat.worker_id(),
            prompt_ids,
            completions: completions(s, rewards),
            // For the trainer's batch dumps.
            info_json: l.info_json.clone(),
            retries: attempts.retries,
            episodes_failed: attempts.episodes_failed,
        }))
    }

    /// Each completion's reward: the verifiers on its final model turn, then the judge,
    /// the reward service, the environment's reward and the reward model, each with its
    /// weight. `Err` when the group's scoring failed: it is not trained.
    fn rewards(
        &mut self,
        l: &PromptLease,
        prompt_ids: &[u32],
        s: &GroupSamples,
    ) -> Result<std::result::Result<Vec<f64>, Failure>> {
        let texts: Vec<String> = s
            .finals
            .iter()
            .map(|ids| self.tokenizer.decode(ids, true))
            .collect::<std::result::Result<_, _>>()?;
        let answer = (!l.answer.is_empty()).then_some(l.answer.as_str());
        let mut rewards: Vec<f64> = texts.iter().map(|t| self.reward.score(t, answer)).collect();
        let prompt = task(l).prompt_text();
        if let Some(judge) = &self.judge {
            for (r, j) in rewards
                .iter_mut()
                .zip(judge.score(&prompt, &texts, answer)?)
            {
                *r += self.reward.judge_weight * j;
            }
        }
        if self.service.is_some() {
            let req = ScoreRequest {
                prompt,
                answer: l.answer.clone(),
                completions: texts,
                info_json: l.info_json.clone(),
            };
            let scored = match self.service_scores(l, req) {
                Ok(scored) => scored,
                Err(why) => {
                    return Ok(Err(Failure {
                        kind: GroupFailure::RewardService,
                        episodes: self.group_size,
                        why,
                    }))
                }
            };
            for (r, x) in rewards.iter_mut().zip(scored) {
                *r += self.reward.service_weight * x;
            }
        }
        for (r, e) in rewards.iter_mut().zip(&s.env_rewards) {
            *r += self.env_weight * e;
        }
        if let Some(rm) = &self.reward_model {
            let ids: Vec<Vec<u32>> = s.completions.iter().map(|c| c.tokens.clone()).collect();
            for (r, x) in rewards.iter_mut().zip(rm.score(prompt_ids, &ids)?) {
                *r += self.reward.model_weight * x;
            }
        }
        // The trainer refuses a group with a reward beyond `[reward] bound`: the group
        // fails instead (one bad score never stops the run).
        let bound = self.reward.bound;
        let beyond = |r: &f64| !(r.is_finite() && r.abs() <= bound);
        if let Some((i, r)) = rewards.iter().enumerate().find(|(_, r)| beyond(r)) {
            let n = rewards.iter().filter(|r| beyond(r)).count() as u32;
            return Ok(Err(Failure {
                kind: GroupFailure::RewardBound,
                episodes: n.clamp(1, self.group_size.max(1)),
                why: format!("completion {i}'s reward {r} is beyond [reward] bound ±{bound}"),
            }));
        }
        Ok(Ok(rewards))
    }

    /// The reward service's scores of lease `l`'s group (retried); logs how long the
    /// call took and how many steps the engine made meanwhile.
    fn service_scores(
        &mut self,
        l: &PromptLease,
        req: ScoreRequest,
    ) -> std::result::Result<Vec<f64>, String> {
        let Some(service) = self.service.as_mut() else {
            return Err("no [reward] service".into());
        };
        let (t0, steps0) = (Instant::now(), self.engine_steps.get());
        let scored = service.score(req);
        let took = t0.elapsed();
        let engine_steps = self.engine_steps.get().saturating_sub(steps0);
        if took >= SLOW_CALL {
            tracing::info!(
                lease = l.lease_id,
                seconds = took.as_secs_f64(),
                engine_steps,
                "the reward service took {:.1} s; the engine stepped {engine_steps} times meanwhile",
                took.as_secs_f64()
            );
        } else {
            tracing::debug!(
                lease = l.lease_id,
                seconds = took.as_secs_f64(),
                engine_steps,
                "reward service call"
            );
        }
        scored
    }
}

/// A group's completions as the trainer reads them: tokens, behaviour logprobs, each
/// token's version, the reward, and the loss mask when some token is the environment's.
fn completions(s: GroupSamples, rewards: Vec<f64>) -> Vec<Completion> {
    s.completions
        .into_iter()
        .zip(s.versions)
        .zip(rewards)
        .zip(s.masks)
        .zip(s.stats)
        .map(|((((c, versions), reward), mask), stats)| Completion {
            turns: stats.turns,
            tool_calls: stats.tool_calls,
            tool_errors: stats.tool_errors,
            tool_seconds: stats.tool_seconds,
            completion_ids: c.tokens,
            behavior_logprobs: c.logprobs,
            versions,
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
        .collect()
}

/// The engine loop's end of the scorer stage.
pub(crate) struct ScorerHandle {
    jobs: Option<Sender<Job>>,
    /// The groups to run again (their scoring failed).
    again: Receiver<Again>,
    /// Set when the worker stops: jobs still queued are dropped.
    abandon: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ScorerHandle {
    /// Queues `job`; never waits. An error when the stage has ended (its error).
    pub fn send(&mut self, job: Job) -> Result<()> {
        let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if sent {
            Ok(())
        } else {
            self.join()
        }
    }

    /// The groups the stage sent back to run again since the last call.
    pub fn again(&self) -> Vec<Again> {
        self.again.try_iter().collect()
    }

    /// The stage's error, once it has ended by itself (it ends only with an error, or
    /// when the channel closes).
    pub fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            return self.join();
        }
        Ok(())
    }

    /// Drops the jobs still queued (the run is over), waits for the acknowledgements of
    /// what was pushed, and ends the stage.
    pub fn finish(&mut self) -> Result<()> {
        self.abandon.store(true, Ordering::SeqCst);
        self.jobs = None;
        if self.thread.is_none() {
            // Already ended, and its error reported.
            return Ok(());
        }
        self.join()
    }

    fn join(&mut self) -> Result<()> {
        self.jobs = None;
        let Some(thread) = self.thread.take() else {
            return Err(Error::Invalid("the scorer stage has ended".into()));
        };
        match thread.join() {
            Ok(Ok(())) if self.abandon.load(Ordering::SeqCst) => Ok(()),
            Ok(Ok(())) => Err(Error::Invalid("the scorer stage ended early".into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Invalid("the scorer stage panicked".into())),
        }
    }
}
