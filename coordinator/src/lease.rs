//! Prompt leases: exactly-once work. A prompt group is leased to one generator; the
//! trainer commits a lease when its group arrives; a lease whose generator is dropped
//! (or that outlives `lease_timeout_s`) expires and its prompt is leased again under a
//! new id, so a late group for the old lease is refused.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The AReaL admission rule: leases may be granted while
///
///   capacity = (η + v + 1)·B − (accepted + running) > 0
///
/// with η = max_staleness, v = the published policy version, B = groups per step,
/// `accepted` = groups committed so far and `running` = leases outstanding. Every
/// group is then generated at most η versions before the step that trains it.
pub fn admission_capacity(max_staleness: u64, version: u64, batch_groups: u64, accepted: u64, running: u64) -> u64 {
    ((max_staleness + version + 1) * batch_groups).saturating_sub(accepted + running)
}

#[derive(Clone, Debug)]
pub struct Lease {
    pub prompt_index: u64,
    pub worker: u64,
    pub granted: Instant,
}

/// Why a commit was refused (also the `reason` label of `groups_dropped_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    UnknownLease,
    Expired,
    Duplicate,
    Mismatch,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownLease => "unknown_lease",
            Refusal::Expired => "expired",
            Refusal::Duplicate => "duplicate",
            Refusal::Mismatch => "mismatch",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    Committed,
    Expired,
}

/// The lease table and the prompt cursor.
#[derive(Default)]
pub struct Leases {
    /// The next fresh prompt index.
    pub cursor: u64,
    /// Prompts whose lease expired, leased again before fresh ones.
    reissue: VecDeque<u64>,
    open: HashMap<u64, Lease>,
    closed: HashMap<u64, Closed>,
    next_id: u64,
    /// Groups committed so far.
    pub accepted: u64,
    /// Every prompt index whose lease expired, in order (a prompt may appear twice).
    pub reissued: Vec<u64>,
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

    pub fn running(&self) -> u64 {
        self.open.len() as u64
    }

    pub fn held_by(&self, worker: u64) -> usize {
        self.open.values().filter(|l| l.worker == worker).count()
    }

    /// Grants up to `n` leases to `worker`: expired prompts first, then fresh ones.
    pub fn grant(&mut self, worker: u64, n: u64, now: Instant) -> Vec<(u64, u64)> {
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
                    },
                );
                (id, prompt_index)
            })
            .collect()
    }

    /// Accepts the group of lease `id` once; refuses expired, repeated or unknown ones.
    pub fn commit(&mut self, id: u64, prompt_index: u64) -> Result<Lease, Refusal> {
        match self.open.get(&id) {
            Some(l) if l.prompt_index != prompt_index => Err(Refusal::Mismatch),
            Some(_) => {
                let l = self.open.remove(&id).expect("present");
                self.closed.insert(id, Closed::Committed);
                self.accepted += 1;
                Ok(l)
            }
            None => Err(match self.closed.get(&id) {
                Some(Closed::Committed) => Refusal::Duplicate,
                Some(Closed::Expired) => Refusal::Expired,
                None => Refusal::UnknownLease,
            }),
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
        let mut ids: Vec<u64> = self.open.iter().filter(|(_, l)| pred(l)).map(|(&id, _)| id).collect();
        ids.sort_unstable();
        for id in &ids {
            let l = self.open.remove(id).expect("present");
            self.closed.insert(*id, Closed::Expired);
            self.reissue.push_back(l.prompt_index);
            self.reissued.push(l.prompt_index);
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
        l.commit(a[0].0, 0).unwrap();
        assert_eq!(l.commit(a[0].0, 0).unwrap_err(), Refusal::Duplicate);
        assert_eq!(l.commit(b[0].0, 7).unwrap_err(), Refusal::Mismatch);
        assert_eq!(l.commit(999, 0).unwrap_err(), Refusal::UnknownLease);
        // Worker 1 dies: prompt 1 goes back first, under a new lease id.
        assert_eq!(l.expire_worker(1), 1);
        assert_eq!(l.commit(a[1].0, 1).unwrap_err(), Refusal::Expired);
        let c = l.grant(2, 2, now);
        assert_eq!(c[0].1, 1);
        assert_eq!(c[1].1, 3);
        assert_ne!(c[0].0, a[1].0);
        l.commit(c[0].0, 1).unwrap();
        assert_eq!(l.accepted, 2);
        let later = now + Duration::from_secs(10);
        assert_eq!(l.expire_older_than(Duration::from_secs(5), later), 2);
        assert_eq!(l.running(), 0);
    }
}
