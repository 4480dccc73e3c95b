//! The rollout buffer: committed groups wait here, oldest first, until a step takes
//! `batch_groups` of them. A group whose oldest token is more than η versions behind
//! the policy is dropped when taken (counted as "stale"), never trained.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::rl::rollout::Rollout;

/// One committed prompt group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub lease_id: u64,
    pub prompt_index: u64,
    pub worker_id: u64,
    /// The dataset record's info (`RolloutGroup.info_json`: the text of one JSON
    /// object, checked at ingest), for the batch dumps; absent in a checkpoint written
    /// before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    pub rollouts: Vec<Rollout>,
    /// Times the generator ran the group again before these rollouts (its earlier runs
    /// failed through no doing of the model), and the episodes of those runs that
    /// failed: reported per step, never trained.
    #[serde(default)]
    pub retries: u32,
    #[serde(default)]
    pub episodes_failed: u32,
}

/// The key a group is known by in rollouts, dumps and summaries.
pub fn group_key(prompt_index: u64, lease_id: u64, worker_id: u64) -> String {
    format!("p{prompt_index}-l{lease_id}-w{worker_id}")
}

impl Group {
    pub fn key(&self) -> String {
        group_key(self.prompt_index, self.lease_id, self.worker_id)
    }

    /// The oldest version among the group's tokens ([`Rollout::oldest_version`]: a
    /// token its rollout's `loss_mask` leaves out is context, its version not read).
    pub fn oldest_version(&self) -> u64 {
        self.rollouts
            .iter()
            .filter_map(Rollout::oldest_version)
            .min()
            .unwrap_or(0)
    }

    /// staleness = policy version − oldest token version (ARCHITECTURE.md, "Bounded staleness").
    pub fn staleness(&self, policy_version: u64) -> u64 {
        policy_version.saturating_sub(self.oldest_version())
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Buffer {
    groups: VecDeque<Group>,
}

impl Buffer {
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn push(&mut self, g: Group) {
        self.groups.push_back(g);
    }

    /// Drops the groups too stale for `policy_version` (returns them), then takes the
    /// `n` oldest when there are that many.
    pub fn take_batch(
        &mut self,
        n: usize,
        policy_version: u64,
        max_staleness: u64,
    ) -> (Option<Vec<Group>>, Vec<Group>) {
        let (fresh, dropped): (VecDeque<Group>, VecDeque<Group>) = std::mem::take(&mut self.groups)
            .into_iter()
            .partition(|g| g.staleness(policy_version) <= max_staleness);
        self.groups = fresh;
        let dropped: Vec<Group> = dropped.into();
        if self.groups.len() < n {
            return (None, dropped);
        }
        (Some(self.groups.drain(..n).collect()), dropped)
    }

    pub fn groups(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(lease: u64, versions: &[u64]) -> Group {
        Group {
            lease_id: lease,
            prompt_index: lease,
            worker_id: 1,
            info: None,
            retries: 0,
            episodes_failed: 0,
            rollouts: vec![Rollout {
                group: lease.to_string(),
                prompt_ids: vec![1],
                completion_ids: vec![2; versions.len()],
                behavior_logprobs: vec![-1.0; versions.len()],
                reward: 0.0,
                versions: Some(versions.to_vec()),
                loss_mask: None,
                finish_reason: None,
                episode: None,
            }],
        }
    }

    #[test]
    fn stale_groups_are_dropped_and_order_kept() {
        let mut b = Buffer::default();
        b.push(group(1, &[0, 1]));
        b.push(group(2, &[2, 2]));
        b.push(group(3, &[1, 3]));
        assert_eq!(b.take_batch(4, 1, 1), (None, vec![]));
        let (batch, dropped) = b.take_batch(2, 2, 1);
        assert_eq!(dropped.len(), 1, "lease 1 has a token 2 versions old");
        assert_eq!(dropped[0].lease_id, 1);
        let batch = batch.unwrap();
        assert_eq!(
            batch.iter().map(|g| g.lease_id).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(b.is_empty());
        assert_eq!(group(9, &[4, 2, 5]).staleness(6), 4);
    }
}
