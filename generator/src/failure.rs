//! Failures are retried, never zeroed. A group fails when an episode fails through no
//! doing of the model (an agent program that exits non-zero or is killed, the
//! Environment service's `Reset` or `Step` error, a tool whose infrastructure failed:
//! [`tandem_env::failure`]), when the reward service fails (after its own retries) or
//! when a reward is beyond `[reward] bound`. Such a group is never trained: it is run
//! again with new episodes (new agent keys, new Environment episode ids) up to
//! `[env] max_retries` times ([`retry`]), then its lease is given back with the reason.
//! A generator more than half of whose last [`WINDOW`] groups were given back that way
//! stops ([`Window`]): the environment is broken, not unlucky, and restarting cannot
//! help ([`Error::Failing`]).

use std::collections::VecDeque;

use tandem_env::{Failed, FailureKind};
use tandem_proto::v1::GroupFailure;

use crate::error::{Error, Result};
use crate::heartbeat::Beat;

/// Groups a generator looks back over: more than half of them given back as failed
/// stops it.
pub(crate) const WINDOW: usize = 20;

/// One failed run of a group: what failed, how many of its episodes, and why.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Failure {
    pub kind: GroupFailure,
    /// Episodes that failed (≥ 1; every episode of the group when its scoring failed).
    pub episodes: u32,
    pub why: String,
}

impl Failure {
    /// The failure of a group whose episodes `failed`.
    pub fn of_episodes(failed: Failed) -> Self {
        Failure {
            kind: match failed.first.kind {
                FailureKind::Agent => GroupFailure::Agent,
                FailureKind::Environment => GroupFailure::Environment,
                FailureKind::Tool => GroupFailure::Tool,
            },
            episodes: failed.episodes.max(1),
            why: failed.first.why,
        }
    }

    /// What to check, for the message a generator stops with.
    fn fix(&self) -> &'static str {
        match self.kind {
            GroupFailure::Agent => "check the [env] agent program: run it by hand on a task (stdin) and read its exit status and stderr in this generator's log",
            GroupFailure::Environment => "check the Environment service at [env] service (its log; that it answers Reset and Step)",
            GroupFailure::Tool => "check the tool's sandbox and interpreter ([env.python]; `tandem tool python FILE --config RUN.toml` runs one call as an episode does)",
            GroupFailure::RewardService => "check the reward service at [reward] service (its log; that it answers Score)",
            GroupFailure::RewardBound => "check the scale of the rewards (the environment's, the agent's, the reward model's) against [reward] bound",
            GroupFailure::Unspecified => "read this generator's log",
        }
    }
}

/// A group's failed runs so far (carried with the group, reported with its rollout).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Attempts {
    /// Times the group was run again.
    pub retries: u32,
    /// Episodes of its failed runs that failed.
    pub episodes_failed: u32,
}

/// After a run of lease `lease`'s group failed with `f`: the group's attempts for its
/// next run (`Some`), or `None` when `max_retries` re-runs are used up (its lease is to
/// be given back). Counts the failed episodes and the re-run on `beat`.
pub(crate) fn retry(
    lease: u64,
    attempts: Attempts,
    f: &Failure,
    max_retries: u32,
    beat: &Beat,
) -> Option<Attempts> {
    beat.episodes_failed(f.episodes);
    if attempts.retries >= max_retries {
        return None;
    }
    let next = Attempts {
        retries: attempts.retries + 1,
        episodes_failed: attempts.episodes_failed.saturating_add(f.episodes),
    };
    tracing::warn!(
        lease,
        "{}: the group runs again ({} of [env] max_retries = {max_retries})",
        tandem_proto::limits::printable(&f.why),
        next.retries
    );
    beat.group_retried();
    Some(next)
}

/// The outcomes of a generator's last [`WINDOW`] groups: trained (pushed) or given back
/// as failed.
#[derive(Debug, Default)]
pub(crate) struct Window {
    /// Oldest first: `true` for a group given back as failed.
    recent: VecDeque<bool>,
}

impl Window {
    /// A group was pushed.
    pub fn pushed(&mut self) {
        self.record(false);
    }

    /// A group was given back after its re-runs failed (the last with `f`): an error
    /// ([`Error::Failing`], naming `f` and what to check) once more than half of the
    /// last [`WINDOW`] groups were.
    pub fn given_back(&mut self, f: &Failure, max_retries: u32) -> Result<()> {
        self.record(true);
        let failed = self.recent.iter().filter(|&&x| x).count();
        if failed * 2 > WINDOW {
            return Err(Error::Failing(format!(
                "{failed} of this generator's last {} groups failed {} times each ([env] max_retries = {max_retries}), through no doing of the model; the last: {}; {}",
                self.recent.len(),
                max_retries + 1,
                tandem_proto::limits::printable(&f.why),
                f.fix()
            )));
        }
        Ok(())
    }

    fn record(&mut self, failed: bool) {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure() -> Failure {
        Failure {
            kind: GroupFailure::Environment,
            episodes: 2,
            why: "[env] service 127.0.0.1:1: Reset: unavailable".into(),
        }
    }

    /// A group runs again up to `max_retries` times, each run's failed episodes counted;
    /// then it is given up.
    #[test]
    fn a_group_runs_again_up_to_max_retries() {
        let beat = Beat::default();
        let f = failure();
        let a = retry(7, Attempts::default(), &f, 2, &beat).unwrap();
        assert_eq!(
            a,
            Attempts {
                retries: 1,
                episodes_failed: 2
            }
        );
        let a = retry(7, a, &f, 2, &beat).unwrap();
        assert_eq!((a.retries, a.episodes_failed), (2, 4));
        assert_eq!(retry(7, a, &f, 2, &beat), None);
        assert_eq!(retry(8, Attempts::default(), &f, 0, &beat), None);
        assert_eq!(beat.failures(), (8, 2));
    }

    /// More than half of the last 20 groups given back stops the generator, naming the
    /// last failure and what to check; fewer never do, however many over a long run.
    #[test]
    fn most_of_the_last_groups_failing_stops_the_generator() {
        let f = failure();
        let mut w = Window::default();
        // 10 of every 20 fail, forever: goes on.
        for _ in 0..100 {
            w.pushed();
            w.given_back(&f, 2).unwrap();
        }
        let mut w = Window::default();
        for _ in 0..9 {
            w.pushed();
        }
        for _ in 0..10 {
            w.given_back(&f, 2).unwrap();
        }
        let e = w.given_back(&f, 2).unwrap_err();
        assert!(matches!(e, Error::Failing(_)));
        let e = e.to_string();
        assert!(
            e.starts_with("11 of this generator's last 20 groups failed 3 times each")
                && e.contains("Reset: unavailable")
                && e.contains("check the Environment service at [env] service"),
            "{e}"
        );
        // Before 20 groups: 11 failed of the first 11 stop it too.
        let mut w = Window::default();
        for _ in 0..10 {
            w.given_back(&f, 2).unwrap();
        }
        assert!(w.given_back(&f, 2).is_err());
    }
}
