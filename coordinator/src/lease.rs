//! Prompt leases: exactly-once work. A prompt group is leased to one generator; the
//! trainer commits a lease when its group arrives; a lease whose generator is dropped
//! (or that outlives `lease_timeout_s`) expires and its prompt is leased again under a
//! new id, so a late group for the old lease is refused. Under dynamic sampling the
//! trainer closes the lease of an uninformative group as filtered instead: closed for
//! good, never re-issued, and not an accepted group, so admission grants another.
//!
//! # No generator starves the run
//!
//! Admission ([`admission_capacity`]) bounds the groups in flight; without more, one
//! generator asking for everything would hold every slot until `lease_timeout_s`, and a
//! run waiting for those groups would stall. Three rules share the slots out:
//!
//! 1. **Fair share.** A generator holds at most
//!    `share = ⌈(η + 1)·B / G⌉ + SHARE_SLACK` leases ([`fair_share`]), where (η + 1)·B
//!    is the admission window (the most groups the rule lets be in flight) and G the
//!    live generators. A generator alone gets the whole window; the slack of
//!    [`SHARE_SLACK`] keeps a generator busy while its neighbours' groups land.
//! 2. **Leases it cannot use soon go back.** When a generator below its share asks and
//!    admission has no room for it (it is starved), the coordinator takes back, for it:
//!    first every *overdue* lease — held longer than `[coordinator]
//!    lease_overdue_factor` × the slowest of the run's last [`RECENT`] groups (grant to
//!    commit), and at least [`OVERDUE_FLOOR`] — then, from generators holding more than
//!    their share (the share shrank as generators joined), their newest leases above
//!    it, as many as the starved one needs. Taken-back leases expire (a late group for
//!    one is refused as expired) and their prompts go first to the starved generator.
//!    Before any group was committed nothing is overdue (`lease_timeout_s` still
//!    applies), and a factor of 0 turns the overdue rule off.
//! 3. **Probation.** A generator that lost a lease as overdue holds at most one lease
//!    until a group of its own is committed (or filtered): a generator that never
//!    delivers cannot take its share again and again. One lease held back is within
//!    the slack of any run with η ≥ 1; with η = 0 it costs a step at most the overdue
//!    time.
//!
//! A generator whose groups take far longer than the run's other groups (very unequal
//! hardware) loses them while faster generators wait: raise `lease_overdue_factor`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The AReaL admission rule: leases may be granted while
///
///   capacity = (η + v + 1)·B − (accepted + running) > 0
///
/// with η = max_staleness, v = the published policy version, B = groups per step,
/// `accepted` = groups committed so far and `running` = leases outstanding. Every
/// group is then generated at most η versions before the step that trains it.
pub fn admission_capacity(
    max_staleness: u64,
    version: u64,
    batch_groups: u64,
    accepted: u64,
    running: u64,
) -> u64 {
    max_staleness
        .saturating_add(version)
        .saturating_add(1)
        .saturating_mul(batch_groups)
        .saturating_sub(accepted.saturating_add(running))
}

/// Leases a generator may hold beyond its even split of the admission window.
pub const SHARE_SLACK: u64 = 1;

/// Groups whose grant-to-commit time sets what counts as overdue.
pub const RECENT: usize = 64;

/// A lease is never overdue sooner than this after its grant.
pub const OVERDUE_FLOOR: Duration = Duration::from_secs(10);

/// The most leases one of `generators` live generators may hold (rule 1 of the module
/// doc): `⌈(η + 1)·B / G⌉ + SHARE_SLACK`.
pub fn fair_share(max_staleness: u64, batch_groups: u64, generators: u64) -> u64 {
    max_staleness
        .saturating_add(1)
        .saturating_mul(batch_groups)
        .div_ceil(generators.max(1))
        .saturating_add(SHARE_SLACK)
}

/// The re-issued and filtered prompt lists keep this many of their newest entries.
pub const HISTORY: usize = 10_000;

/// Appends `x` to `v`, dropping the oldest entries past [`HISTORY`].
fn remember(v: &mut Vec<u64>, x: u64) {
    v.push(x);
    if v.len() > 2 * HISTORY {
        v.drain(..v.len() - HISTORY);
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub prompt_index: u64,
    pub worker: u64,
    /// When it was granted (a restarted coordinator counts a lease's age from its
    /// restart).
    #[serde(skip, default = "Instant::now")]
    pub granted: Instant,
    /// The published policy version when it was granted (the lag of its holder).
    #[serde(default)]
    pub version: u64,
}

/// Why a commit was refused (also the `reason` label of `groups_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownLease,
    Expired,
    Duplicate,
    Mismatch,
    /// The group names a worker that does not hold the lease.
    NotHolder,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownLease => "unknown_lease",
            Refusal::Expired => "expired",
            Refusal::Duplicate => "duplicate",
            Refusal::Mismatch => "mismatch",
            Refusal::NotHolder => "not_holder",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Closed {
    Committed,
    Expired,
    Filtered,
    /// Committed, then dropped by the trainer as too stale: not accepted any more.
    Discarded,
}

/// The lease table and the prompt cursor (saved whole by the coordinator's store).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Leases {
    /// The next fresh prompt index.
    pub cursor: u64,
    /// Prompts whose lease expired, leased again before fresh ones.
    reissue: VecDeque<u64>,
    open: HashMap<u64, Lease>,
    closed: HashMap<u64, Closed>,
    next_id: u64,
    /// Groups committed so far (less those discarded).
    pub accepted: u64,
    /// Committed groups the trainer dropped as stale and discarded.
    #[serde(default)]
    pub discarded: u64,
    /// Every prompt index whose lease expired, in order (a prompt may appear twice; the
    /// newest [`HISTORY`]).
    pub reissued: Vec<u64>,
    /// Prompts whose groups dynamic sampling filtered out, in order (the newest
    /// [`HISTORY`]).
    pub filtered: Vec<u64>,
    /// Committed leases and their prompts.
    committed: BTreeMap<u64, u64>,
    /// The version whose step trained each committed lease.
    trained_at: HashMap<u64, u64>,
    /// The `request_id` of the commit (or filter) that closed each lease, while the
    /// lease is remembered: a retry of that commit is answered as the first was.
    #[serde(default)]
    keys: HashMap<u64, u64>,
    /// Grant-to-close times of the last [`RECENT`] committed or filtered groups.
    #[serde(skip)]
    recent: VecDeque<Duration>,
    /// Generators that lost a lease as overdue and have not delivered a group since:
    /// they hold one lease at most.
    #[serde(default)]
    probation: BTreeSet<u64>,
}

/// How a commit went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// The lease closed now.
    Now,
    /// A retry of the commit that closed it (same `request_id`): nothing changed.
    Repeat,
}

impl Leases {
    /// Resumes from a cursor and an accepted count (a restarted coordinator).
    pub fn starting_at(cursor: u64, accepted: u64) -> Self {
        Leases {
            cursor,
            accepted,
            next_id: 1,
            ..Default::default()
        }
    }

    /// Prompts waiting to be leased again (at the end of a run: work never done).
    pub fn pending_reissue(&self) -> Vec<u64> {
        self.reissue.iter().copied().collect()
    }

    pub fn running(&self) -> u64 {
        self.open.len() as u64
    }

    /// The version at which the oldest lease `worker` holds was granted (`None` when
    /// it holds none).
    pub fn oldest_version(&self, worker: u64) -> Option<u64> {
        self.open
            .values()
            .filter(|l| l.worker == worker)
            .map(|l| l.version)
            .min()
    }

    pub fn held_by(&self, worker: u64) -> usize {
        self.open.values().filter(|l| l.worker == worker).count()
    }

    /// The most leases `worker` may hold with a fair `share`: one while it is on
    /// probation (rule 3 of the module doc).
    pub fn limit_for(&self, worker: u64, share: u64) -> u64 {
        if self.probation.contains(&worker) {
            share.min(1)
        } else {
            share
        }
    }

    /// Whether `worker` is on probation.
    pub fn on_probation(&self, worker: u64) -> bool {
        self.probation.contains(&worker)
    }

    /// How old a lease may grow before it is overdue: `factor` × the slowest recent
    /// group, at least [`OVERDUE_FLOOR`]; `None` before any group was delivered or with
    /// a factor of 0.
    pub fn overdue_after(&self, factor: f64) -> Option<Duration> {
        let slowest = self.recent.iter().max()?;
        if !(factor > 0.0 && factor.is_finite()) {
            return None;
        }
        Some(slowest.mul_f64(factor).max(OVERDUE_FLOOR))
    }

    /// Takes back leases for `worker`, which is starved (rule 2 of the module doc):
    /// every lease of another generator older than `overdue` (its holder goes on
    /// probation), then the newest leases above `share` of generators holding more, up
    /// to `need` in all. Their prompts go to the front of the re-issue queue, so
    /// `worker`'s next grant gets them. Returns the leases taken back, by holder.
    pub fn reclaim(
        &mut self,
        worker: u64,
        need: u64,
        share: u64,
        overdue: Option<Duration>,
        now: Instant,
    ) -> BTreeMap<u64, (usize, bool)> {
        let mut taken: BTreeMap<u64, (usize, bool)> = BTreeMap::new();
        if let Some(max_age) = overdue {
            let mut late: Vec<(u64, u64)> = self
                .open
                .iter()
                .filter(|(_, l)| l.worker != worker && now.duration_since(l.granted) > max_age)
                .map(|(&id, l)| (id, l.worker))
                .collect();
            late.sort_unstable();
            for (id, holder) in late {
                self.take_back(id);
                self.probation.insert(holder);
                let t = taken.entry(holder).or_default();
                t.0 += 1;
                t.1 = true;
            }
        }
        let mut got: u64 = taken.values().map(|t| t.0 as u64).sum();
        let mut held: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&id, l) in &self.open {
            if l.worker != worker {
                held.entry(l.worker).or_default().push(id);
            }
        }
        for (holder, mut ids) in held {
            if got >= need {
                break;
            }
            ids.sort_unstable();
            let over = (ids.len() as u64).saturating_sub(share).min(need - got);
            for &id in ids.iter().rev().take(over as usize) {
                self.take_back(id);
                taken.entry(holder).or_default().0 += 1;
            }
            got += over;
        }
        taken
    }

    /// Expires open lease `id` and puts its prompt first in the re-issue queue.
    fn take_back(&mut self, id: u64) {
        if let Some(l) = self.open.remove(&id) {
            self.closed.insert(id, Closed::Expired);
            self.reissue.push_front(l.prompt_index);
            remember(&mut self.reissued, l.prompt_index);
        }
    }

    /// Forgets `worker`'s probation (it left or was dropped).
    pub fn forget_worker(&mut self, worker: u64) {
        self.probation.remove(&worker);
    }

    /// Grants up to `n` leases to `worker`: expired prompts first, then fresh ones.
    pub fn grant(&mut self, worker: u64, n: u64, now: Instant) -> Vec<(u64, u64)> {
        self.grant_at(worker, n, now, 0)
    }

    /// [`Leases::grant`] at published policy `version`, which the leases keep.
    pub fn grant_at(&mut self, worker: u64, n: u64, now: Instant, version: u64) -> Vec<(u64, u64)> {
        (0..n)
            .map(|_| {
                let prompt_index = self.reissue.pop_front().unwrap_or_else(|| {
                    self.cursor += 1;
                    self.cursor - 1
                });
                self.next_id = self.next_id.max(1);
                let id = self.next_id;
                self.next_id += 1;
                self.open.insert(
                    id,
                    Lease {
                        prompt_index,
                        worker,
                        granted: now,
                        version,
                    },
                );
                (id, prompt_index)
            })
            .collect()
    }

    /// Accepts the group of lease `id` once; refuses expired, repeated or unknown ones,
    /// and one whose `worker` (non-zero) does not hold the lease. A retry with the `key`
    /// (`request_id`, non-zero) of the commit that closed the lease is a
    /// [`Closing::Repeat`].
    pub fn commit(
        &mut self,
        id: u64,
        prompt_index: u64,
        worker: u64,
        key: u64,
    ) -> Result<Closing, Refusal> {
        let Some(l) = self.close(id, prompt_index, worker, Closed::Committed, key)? else {
            return Ok(Closing::Repeat);
        };
        self.committed.insert(id, l.prompt_index);
        self.accepted += 1;
        Ok(Closing::Now)
    }

    /// Closes lease `id` for good as filtered (its group was uninformative): never
    /// re-issued, not accepted, so admission grants another lease in its place. The
    /// same refusals as [`Leases::commit`].
    pub fn filter(
        &mut self,
        id: u64,
        prompt_index: u64,
        worker: u64,
        key: u64,
    ) -> Result<Closing, Refusal> {
        let Some(l) = self.close(id, prompt_index, worker, Closed::Filtered, key)? else {
            return Ok(Closing::Repeat);
        };
        remember(&mut self.filtered, l.prompt_index);
        Ok(Closing::Now)
    }

    /// Discards committed, untrained lease `id` (its group was dropped as too stale): it
    /// is no longer accepted, so admission grants another lease in its place, and its
    /// prompt is not leased again. Whether it was.
    pub fn discard(&mut self, id: u64) -> bool {
        if self.trained_at.contains_key(&id) || self.committed.remove(&id).is_none() {
            return false;
        }
        self.closed.insert(id, Closed::Discarded);
        self.accepted -= 1;
        self.discarded += 1;
        true
    }

    /// Lease `id` when it is open and held by `worker`.
    pub fn held(&self, id: u64, worker: u64) -> Option<&Lease> {
        self.open.get(&id).filter(|l| l.worker == worker)
    }

    /// The share of finished groups that were informative: accepted / (accepted +
    /// filtered); 1 before any.
    pub fn informative_share(&self) -> f64 {
        let total = self.accepted + self.filtered.len() as u64;
        if total == 0 {
            1.0
        } else {
            self.accepted as f64 / total as f64
        }
    }

    /// Closes open lease `id` as `how`; `None` for a repeat of the closing call.
    fn close(
        &mut self,
        id: u64,
        prompt_index: u64,
        worker: u64,
        how: Closed,
        key: u64,
    ) -> Result<Option<Lease>, Refusal> {
        match self.open.get(&id) {
            Some(l) if l.prompt_index != prompt_index => Err(Refusal::Mismatch),
            Some(l) if worker != 0 && l.worker != worker => Err(Refusal::NotHolder),
            Some(_) => {
                let l = self.open.remove(&id).expect("present");
                self.closed.insert(id, how);
                if key != 0 {
                    self.keys.insert(id, key);
                }
                // A delivered group: its time sets what counts as overdue, and its
                // generator is off probation.
                self.recent.push_back(l.granted.elapsed());
                if self.recent.len() > RECENT {
                    self.recent.pop_front();
                }
                self.probation.remove(&l.worker);
                Ok(Some(l))
            }
            None if key != 0
                && self.keys.get(&id) == Some(&key)
                && self.closed.get(&id) == Some(&how) =>
            {
                Ok(None)
            }
            None => Err(match self.closed.get(&id) {
                Some(Closed::Committed | Closed::Filtered | Closed::Discarded) => {
                    Refusal::Duplicate
                }
                Some(Closed::Expired) => Refusal::Expired,
                None => Refusal::UnknownLease,
            }),
        }
    }

    /// Forgets the leases trained at or before `version` (no resume can go back past
    /// it), and every closed lease older than the oldest one still open or committed;
    /// a late group for a forgotten lease is refused as an unknown lease. Returns how
    /// many entries went.
    pub fn settle(&mut self, version: u64) -> usize {
        let settled: Vec<u64> = self
            .trained_at
            .iter()
            .filter(|(_, &v)| v <= version)
            .map(|(&id, _)| id)
            .collect();
        for id in &settled {
            self.trained_at.remove(id);
            self.committed.remove(id);
        }
        let floor = self
            .open
            .keys()
            .chain(self.committed.keys())
            .min()
            .copied()
            .unwrap_or(self.next_id);
        let before = self.closed.len();
        self.closed.retain(|&id, _| id >= floor);
        let closed = &self.closed;
        self.keys.retain(|id, _| closed.contains_key(id));
        settled.len() + before - self.closed.len()
    }

    /// Records that the step publishing `version` trained these leases.
    pub fn mark_trained(&mut self, leases: &[u64], version: u64) {
        for l in leases {
            self.trained_at.insert(*l, version);
        }
    }

    /// Rewinds to a trainer checkpoint at `version` whose buffer holds `keep`: every
    /// committed lease neither trained by `version` nor kept is expired and its prompt
    /// re-issued (its group was lost with the trainer), and so is every open lease (its
    /// group would come from weights that no longer exist). Returns how many.
    pub fn rewind(&mut self, version: u64, keep: &HashSet<u64>) -> usize {
        let lost: Vec<(u64, u64)> = self
            .committed
            .iter()
            .filter(|(id, _)| {
                !keep.contains(id) && self.trained_at.get(id).is_none_or(|&v| v > version)
            })
            .map(|(&id, &p)| (id, p))
            .collect();
        for (id, prompt) in &lost {
            self.committed.remove(id);
            self.trained_at.remove(id);
            self.closed.insert(*id, Closed::Expired);
            self.keys.remove(id);
            self.reissue.push_back(*prompt);
            remember(&mut self.reissued, *prompt);
            self.accepted -= 1;
        }
        lost.len() + self.expire_where(|_| true)
    }

    /// Expires lease `id` when it is open and held by `worker` (given back: its prompt
    /// goes to the front of the re-issue queue); whether it did.
    pub fn release(&mut self, id: u64, worker: u64) -> bool {
        match self.open.get(&id) {
            Some(l) if l.worker == worker => {
                let l = self.open.remove(&id).expect("present");
                self.closed.insert(id, Closed::Expired);
                self.reissue.push_front(l.prompt_index);
                remember(&mut self.reissued, l.prompt_index);
                true
            }
            _ => false,
        }
    }

    /// Expires every lease of `worker` (dropped); returns how many.
    pub fn expire_worker(&mut self, worker: u64) -> usize {
        self.expire_where(|l| l.worker == worker)
    }

    /// Expires leases older than `max_age`; returns how many.
    pub fn expire_older_than(&mut self, max_age: Duration, now: Instant) -> usize {
        self.expire_where(|l| now.duration_since(l.granted) > max_age)
    }

    fn expire_where(&mut self, pred: impl Fn(&Lease) -> bool) -> usize {
        let mut ids: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, l)| pred(l))
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in &ids {
            let l = self.open.remove(id).expect("present");
            self.closed.insert(*id, Closed::Expired);
            self.reissue.push_back(l.prompt_index);
            remember(&mut self.reissued, l.prompt_index);
        }
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_follows_the_rule() {
        // Synchronous (η = 0): one batch per version.
        assert_eq!(admission_capacity(0, 0, 4, 0, 0), 4);
        assert_eq!(admission_capacity(0, 0, 4, 1, 3), 0);
        assert_eq!(admission_capacity(0, 1, 4, 4, 0), 4);
        // η = 1: one batch ahead.
        assert_eq!(admission_capacity(1, 0, 4, 0, 0), 8);
        assert_eq!(admission_capacity(1, 2, 4, 10, 1), 5);
        assert_eq!(admission_capacity(1, 2, 4, 14, 1), 1);
        assert_eq!(admission_capacity(1, 0, 4, 9, 0), 0);
    }

    #[test]
    fn exactly_once_with_reissue() {
        let now = Instant::now();
        let mut l = Leases::starting_at(0, 0);
        let a = l.grant(1, 2, now);
        let b = l.grant(2, 1, now);
        assert_eq!(a.iter().map(|x| x.1).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(b[0].1, 2);
        assert_eq!(l.running(), 3);
        l.commit(a[0].0, 0, 0, 0).unwrap();
        assert_eq!(l.commit(a[0].0, 0, 0, 0).unwrap_err(), Refusal::Duplicate);
        assert_eq!(l.commit(b[0].0, 7, 0, 0).unwrap_err(), Refusal::Mismatch);
        // A group pushed in another generator's name.
        assert_eq!(l.commit(b[0].0, 2, 1, 0).unwrap_err(), Refusal::NotHolder);
        assert_eq!(l.commit(999, 0, 0, 0).unwrap_err(), Refusal::UnknownLease);
        // Worker 1 dies: prompt 1 goes back first, under a new lease id.
        assert_eq!(l.expire_worker(1), 1);
        assert_eq!(l.commit(a[1].0, 1, 0, 0).unwrap_err(), Refusal::Expired);
        let c = l.grant(2, 2, now);
        assert_eq!(c[0].1, 1);
        assert_eq!(c[1].1, 3);
        assert_ne!(c[0].0, a[1].0);
        l.commit(c[0].0, 1, 0, 0).unwrap();
        assert_eq!(l.accepted, 2);
        // A trainer resumes at version 3 with lease a[0] trained at v2 and nothing
        // buffered: c[0] (committed, untrained) and the open b[0] and c[1] come back.
        l.mark_trained(&[a[0].0], 2);
        let n = l.rewind(3, &HashSet::new());
        assert_eq!(n, 3);
        assert_eq!(l.accepted, 1);
        assert_eq!(l.commit(c[0].0, 1, 0, 0).unwrap_err(), Refusal::Expired);
        let d = l.grant(2, 2, now);
        assert_eq!(d.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2]);
        let keep: HashSet<u64> = [d[0].0].into();
        l.commit(d[0].0, 1, 0, 0).unwrap();
        assert_eq!(
            l.rewind(3, &keep),
            1,
            "the kept lease stays, the open one returns"
        );
        l.grant(2, 2, now);
        let later = now + Duration::from_secs(10);
        assert_eq!(l.expire_older_than(Duration::from_secs(5), later), 2);
        assert_eq!(l.running(), 0);
    }

    /// Settling forgets what no resume can need: tables stay bounded, and a late group
    /// for a forgotten lease is still refused.
    #[test]
    fn settled_leases_are_forgotten_and_still_refused() {
        let now = Instant::now();
        let mut l = Leases::starting_at(0, 0);
        let ids: Vec<u64> = l.grant(1, 100, now).iter().map(|x| x.0).collect();
        for (i, &id) in ids.iter().enumerate() {
            if i % 10 == 9 {
                l.expire_where(|x| x.prompt_index == i as u64);
            } else {
                l.commit(id, i as u64, 0, 0).unwrap();
                l.mark_trained(&[id], 1 + i as u64 / 10);
            }
        }
        let open = l.grant(1, 1, now)[0].0;
        // Versions 1–5 are settled (the trainer keeps no checkpoint before 5).
        let gone = l.settle(5);
        assert!(gone >= 2 * 45, "{gone}");
        assert_eq!(l.committed.len(), 45);
        assert_eq!(
            l.commit(ids[0], 0, 0, 0).unwrap_err(),
            Refusal::UnknownLease
        );
        assert_eq!(
            l.commit(ids[99 - 1], 98, 0, 0).unwrap_err(),
            Refusal::Duplicate
        );
        // A rewind to version 7 re-issues only what was trained after it.
        assert_eq!(l.rewind(7, &HashSet::new()), 27 + 1);
        assert!(l.commit(open, 100, 0, 0).is_err());
        // Everything trained: settling to the end leaves nothing but what is open.
        l.grant(2, 3, now);
        l.settle(u64::MAX);
        assert!(l.committed.is_empty() && l.trained_at.is_empty());
        assert!(l.closed.len() <= l.open.len() + 1);
    }

    /// A commit retried after its reply was lost (a restart, a timeout) is answered as
    /// the first was; any other repeat is still a duplicate; the table survives a save.
    #[test]
    fn a_retried_commit_is_answered_as_the_first() {
        let now = Instant::now();
        let mut l = Leases::starting_at(0, 0);
        let a = l.grant(1, 2, now);
        assert_eq!(l.commit(a[0].0, 0, 0, 42), Ok(Closing::Now));
        assert_eq!(l.commit(a[0].0, 0, 0, 42), Ok(Closing::Repeat));
        assert_eq!(l.accepted, 1);
        assert_eq!(l.commit(a[0].0, 0, 0, 43), Err(Refusal::Duplicate));
        assert_eq!(l.commit(a[0].0, 0, 0, 0), Err(Refusal::Duplicate));
        assert_eq!(l.filter(a[0].0, 0, 0, 42), Err(Refusal::Duplicate));
        assert_eq!(l.filter(a[1].0, 1, 0, 7), Ok(Closing::Now));
        let mut back: Leases = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back.filter(a[1].0, 1, 0, 7), Ok(Closing::Repeat));
        assert_eq!(back.commit(a[0].0, 0, 0, 42), Ok(Closing::Repeat));
        assert_eq!((back.accepted, back.filtered.clone()), (1, vec![1]));
        assert_eq!(back.grant(2, 1, now), vec![(3, 2)]);
        // Once a resume can no longer need them, the keys go with the leases.
        back.mark_trained(&[a[0].0], 1);
        back.settle(1);
        assert_eq!(back.commit(a[0].0, 0, 0, 42), Err(Refusal::UnknownLease));
        assert!(back.keys.is_empty());
    }

    /// A group dropped as stale gives its admission slot back, once; its prompt is not
    /// leased again, and a rewind does not bring it back.
    #[test]
    fn a_discarded_lease_frees_its_slot() {
        let now = Instant::now();
        let mut l = Leases::starting_at(0, 0);
        let a = l.grant(1, 2, now);
        l.commit(a[0].0, 0, 0, 0).unwrap();
        l.commit(a[1].0, 1, 0, 0).unwrap();
        // η = 0, B = 2, version 0: both slots used.
        assert_eq!(admission_capacity(0, 0, 2, l.accepted, l.running()), 0);
        assert!(l.discard(a[0].0));
        assert!(!l.discard(a[0].0));
        assert_eq!(admission_capacity(0, 0, 2, l.accepted, l.running()), 1);
        assert_eq!(l.commit(a[0].0, 0, 0, 0), Err(Refusal::Duplicate));
        // A trained lease is not discarded.
        l.mark_trained(&[a[1].0], 1);
        assert!(!l.discard(a[1].0));
        assert_eq!(l.rewind(0, &HashSet::new()), 1);
        assert_eq!(l.pending_reissue(), vec![1]);
    }

    #[test]
    fn a_filtered_lease_closes_for_good_and_frees_its_admission_slot() {
        let now = Instant::now();
        let mut l = Leases::starting_at(0, 0);
        let a = l.grant(1, 2, now);
        // Synchronous, B = 2: both slots taken.
        assert_eq!(admission_capacity(0, 0, 2, l.accepted, l.running()), 0);
        l.filter(a[0].0, 0, 0, 0).unwrap();
        // Not accepted, no longer running: one more lease may go out.
        assert_eq!((l.accepted, l.running()), (0, 1));
        assert_eq!(admission_capacity(0, 0, 2, l.accepted, l.running()), 1);
        assert_eq!(l.filter(a[0].0, 0, 0, 0).unwrap_err(), Refusal::Duplicate);
        assert_eq!(l.commit(a[0].0, 0, 0, 0).unwrap_err(), Refusal::Duplicate);
        l.commit(a[1].0, 1, 0, 0).unwrap();
        assert_eq!(l.informative_share(), 0.5);
        // A rewind or a dead worker never brings a filtered prompt back.
        assert_eq!(l.expire_worker(1), 0);
        assert_eq!(l.rewind(0, &HashSet::new()), 1);
        assert_eq!(l.pending_reissue(), vec![1]);
        assert_eq!(l.filtered, vec![0]);
        let b = l.grant(2, 2, now);
        assert_eq!(b.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2]);
        // A lease given back: only by its holder, once; its prompt is leased next.
        assert!(!l.release(b[0].0, 1));
        assert!(l.release(b[0].0, 2));
        assert!(!l.release(b[0].0, 2));
        assert_eq!(l.commit(b[0].0, 1, 0, 0).unwrap_err(), Refusal::Expired);
        assert_eq!(l.grant(3, 1, now)[0].1, 1);
        l.grant(2, 0, now);
        let later = now + Duration::from_secs(10);
        assert_eq!(l.expire_older_than(Duration::from_secs(5), later), 2);
        assert_eq!(l.running(), 0);
    }
}
