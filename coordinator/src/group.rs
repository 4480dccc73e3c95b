//! The weight-broadcast group: which generators receive each new version from the
//! trainer by collective broadcast, and with which rank.
//!
//! The trainer is rank 0; member generators hold ranks 1..=n in worker-id order. The
//! group is recomputed whenever membership changes (a generator joins, leaves, is
//! dropped, or is excluded after a stalled broadcast) and each change starts a new
//! epoch: a communicator built for an older epoch is never used again, so a rebuilt
//! group cannot mix ranks of two memberships. Excluded generators fetch weights over
//! gRPC until they register again (with a new id).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tandem_proto::v1::{BroadcastGroup, GroupMember, Role};

use crate::membership::Members;

#[derive(Clone, Default, Debug, Serialize, Deserialize)]
pub struct Group {
    pub epoch: u64,
    /// Worker ids of the members, in rank order (rank = index + 1).
    members: Vec<u64>,
    excluded: BTreeSet<u64>,
    address: String,
}

impl Group {
    /// Recomputes the group from `members`: live generators that can receive by
    /// broadcast and are not excluded, while a trainer with a broadcast listener is
    /// registered. Returns true (and starts a new epoch) when it changed.
    pub fn update(&mut self, members: &Members) -> bool {
        let address = members
            .trainer()
            .map(|t| t.broadcast_address.clone())
            .unwrap_or_default();
        let ids: Vec<u64> = if address.is_empty() {
            Vec::new()
        } else {
            members
                .iter()
                .filter(|(id, w)| {
                    w.role == Role::Generator && w.broadcast && !self.excluded.contains(id)
                })
                .map(|(&id, _)| id)
                .collect()
        };
        self.excluded.retain(|id| members.get(*id).is_some());
        if ids == self.members && address == self.address {
            return false;
        }
        self.members = ids;
        self.address = address;
        self.epoch += 1;
        true
    }

    /// Takes `ids` out of the group for good (until they register again).
    pub fn exclude(&mut self, ids: &[u64], members: &Members) -> bool {
        self.excluded
            .extend(ids.iter().copied().filter(|id| members.get(*id).is_some()));
        self.update(members)
    }

    /// 1..=n for a member, 0 otherwise.
    pub fn rank_of(&self, id: u64) -> u32 {
        self.members
            .iter()
            .position(|&m| m == id)
            .map_or(0, |i| i as u32 + 1)
    }

    pub fn world_size(&self) -> u32 {
        self.members.len() as u32 + 1
    }

    /// The group as generator `worker` sees it (its rank), or, for `None`, as the
    /// trainer needs it to send (every member).
    pub fn view(&self, worker: Option<u64>, members: &Members) -> Option<BroadcastGroup> {
        if self.address.is_empty() {
            return None;
        }
        let listed = match worker {
            Some(_) => Vec::new(),
            None => self
                .members
                .iter()
                .enumerate()
                .map(|(i, &id)| GroupMember {
                    worker_id: id,
                    name: members.get(id).map(|w| w.name.clone()).unwrap_or_default(),
                    rank: i as u32 + 1,
                })
                .collect(),
        };
        Some(BroadcastGroup {
            epoch: self.epoch,
            world_size: self.world_size(),
            rank: worker.map_or(0, |id| self.rank_of(id)),
            address: self.address.clone(),
            members: listed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn generator(m: &mut Members, name: &str, broadcast: bool, t: Instant) -> u64 {
        let id = m.register(name.into(), Role::Generator, String::new(), t);
        m.get_mut(id).unwrap().broadcast = broadcast;
        id
    }

    #[test]
    fn epochs_follow_membership_and_exclusions_stick() {
        let t0 = Instant::now();
        let mut m = Members::default();
        let mut g = Group::default();
        let a = generator(&mut m, "gen-0", true, t0);
        // No trainer with a listener yet: no group.
        assert!(!g.update(&m));
        assert!(g.view(Some(a), &m).is_none());
        let t = m.register("trainer".into(), Role::Trainer, "127.0.0.1:1".into(), t0);
        m.get_mut(t).unwrap().broadcast_address = "127.0.0.1:2".into();
        assert!(g.update(&m));
        assert_eq!((g.epoch, g.world_size(), g.rank_of(a)), (1, 2, 1));
        // A generator that cannot receive by broadcast is not a member.
        let grpc_only = generator(&mut m, "gen-x", false, t0);
        assert!(!g.update(&m));
        assert_eq!(g.rank_of(grpc_only), 0);
        // A join starts a new epoch; ranks follow worker ids.
        let b = generator(&mut m, "gen-1", true, t0);
        assert!(g.update(&m));
        assert_eq!((g.epoch, g.rank_of(a), g.rank_of(b)), (2, 1, 2));
        let view = g.view(None, &m).unwrap();
        assert_eq!(view.members.len(), 2);
        assert_eq!(view.members[1].name, "gen-1");
        assert_eq!(view.address, "127.0.0.1:2");
        let gv = g.view(Some(b), &m).unwrap();
        assert_eq!((gv.rank, gv.world_size, gv.members.len()), (2, 3, 0));
        // Excluding a stalled member: new epoch, ranks close up, and it stays out.
        assert!(g.exclude(&[a], &m));
        assert_eq!(
            (g.epoch, g.rank_of(a), g.rank_of(b), g.world_size()),
            (3, 0, 1, 2)
        );
        assert!(!g.update(&m));
        assert_eq!(g.rank_of(a), 0);
        // A member dropped for silence leaves the group.
        m.get_mut(b).unwrap().last_seen = t0;
        for id in [a, t, grpc_only] {
            m.get_mut(id).unwrap().last_seen = t0 + Duration::from_secs(10);
        }
        m.reap(Duration::from_secs(5), t0 + Duration::from_secs(11));
        assert!(g.update(&m));
        assert_eq!((g.epoch, g.world_size()), (4, 1));
        // Excluding an unknown id changes nothing.
        assert!(!g.exclude(&[999], &m));
    }
}
