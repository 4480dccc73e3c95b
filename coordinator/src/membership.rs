//! Membership: who is in the run, what version each holds, when each was last heard.
//! A worker silent past the timeout is dropped (its leases expire); it may register
//! again and gets a new id.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tandem_proto::v1::Role;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Worker {
    pub name: String,
    #[serde(with = "role_name")]
    pub role: Role,
    pub address: String,
    pub policy_version: u64,
    pub generated_tokens: u64,
    /// When it was last heard (a restarted coordinator hears everyone at its start:
    /// each worker has the heartbeat timeout to show up again).
    #[serde(skip, default = "Instant::now")]
    pub last_seen: Instant,
    /// A generator that can receive weights by broadcast.
    pub broadcast: bool,
    /// The trainer's broadcast listener (empty = it does not broadcast).
    pub broadcast_address: String,
    /// The `request_id` of its last lease request and the leases it was granted: a
    /// retry of that request is answered with those still open.
    #[serde(default)]
    pub last_lease: (u64, Vec<u64>),
}

/// A role as its proto name in the saved state.
mod role_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use tandem_proto::v1::Role;

    pub fn serialize<S: Serializer>(r: &Role, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Role, D::Error> {
        let name = String::deserialize(d)?;
        Role::from_str_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown role {name:?}")))
    }
}

#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Members {
    workers: BTreeMap<u64, Worker>,
    next_id: u64,
}

impl Members {
    pub fn register(&mut self, name: String, role: Role, address: String, now: Instant) -> u64 {
        self.next_id += 1;
        self.workers.insert(
            self.next_id,
            Worker {
                name,
                role,
                address,
                policy_version: 0,
                generated_tokens: 0,
                last_seen: now,
                broadcast: false,
                broadcast_address: String::new(),
                last_lease: (0, Vec::new()),
            },
        );
        self.next_id
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Worker> {
        self.workers.get_mut(&id)
    }

    pub fn get(&self, id: u64) -> Option<&Worker> {
        self.workers.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&u64, &Worker)> {
        self.workers.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut Worker)> {
        self.workers.iter_mut()
    }

    /// The live trainer, if one has registered.
    pub fn trainer(&self) -> Option<&Worker> {
        self.workers
            .values()
            .rev()
            .find(|w| w.role == Role::Trainer)
    }

    /// The live trainer's address, if one has registered.
    pub fn trainer_address(&self) -> Option<&str> {
        self.trainer().map(|w| w.address.as_str())
    }

    pub fn remove(&mut self, id: u64) -> Option<Worker> {
        self.workers.remove(&id)
    }

    /// Drops workers silent for longer than `timeout`; returns them.
    pub fn reap(&mut self, timeout: Duration, now: Instant) -> Vec<(u64, Worker)> {
        let gone: Vec<u64> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > timeout)
            .map(|(&id, _)| id)
            .collect();
        gone.into_iter()
            .filter_map(|id| self.workers.remove(&id).map(|w| (id, w)))
            .collect()
    }

    pub fn generators(&self) -> usize {
        self.workers
            .values()
            .filter(|w| w.role == Role::Generator)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_workers_are_dropped() {
        let t0 = Instant::now();
        let mut m = Members::default();
        let a = m.register("gen-0".into(), Role::Generator, String::new(), t0);
        let b = m.register("trainer".into(), Role::Trainer, "127.0.0.1:9".into(), t0);
        assert_ne!(a, b);
        assert_eq!(m.trainer_address(), Some("127.0.0.1:9"));
        m.get_mut(b).unwrap().last_seen = t0 + Duration::from_secs(4);
        let gone = m.reap(Duration::from_secs(3), t0 + Duration::from_secs(5));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].0, a);
        assert!(m.get(a).is_none() && m.get(b).is_some());
        assert_eq!(m.generators(), 0);
    }
}
