//! The collective data plane of the weight broadcast: how a version's bytes travel from
//! the trainer (rank 0) to every member of one broadcast epoch in a single collective
//! call, while the header, the readiness and the acknowledgements stay on the TCP
//! control plane (`crate::broadcast`).
//!
//! [`Backend`] makes communicators; [`Collective`] is one rank's communicator for one
//! epoch. The semantics are NCCL's:
//! - rank 0 makes a unique id per epoch and hands it to the members (in the welcome
//!   frame); every rank joins with that id, its rank and the world size;
//! - joining and each broadcast are collective: they finish only once every rank has
//!   made the same call;
//! - an operation that has not finished by its deadline aborts the communicator, which
//!   makes the operation fail on every rank, and the communicator is never used again.
//!
//! Two backends: NCCL between GPUs (`nccl.rs`, feature `nccl`), and the in-process
//! [`stand_in`] that the orchestration's tests run on CPU.

use std::sync::Arc;
use std::time::Instant;

/// One rank's communicator for one epoch.
pub trait Collective: Send {
    /// Rank 0: sends `bytes` to every other rank. Fails, aborting the communicator, if
    /// the broadcast has not finished by `deadline`.
    fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), String>;
    /// Any other rank: receives rank 0's bytes into `buf`, whose length the header gave.
    fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), String>;
}

/// Makes communicators.
pub trait Backend: Send + Sync {
    /// For logs and metrics: "nccl", "stand-in".
    fn name(&self) -> &'static str;
    /// A fresh unique id for a new epoch (rank 0 calls this).
    fn new_id(&self) -> Result<Vec<u8>, String>;
    /// Starts joining the communicator `id` as `rank` of `world_size`. It returns at
    /// once; the first operation waits, within its own deadline, for every rank to join.
    fn join(&self, id: &[u8], rank: u32, world_size: u32) -> Result<Box<dyn Collective>, String>;
}

/// A shared backend, as the broadcaster and the receivers hold it.
pub type SharedBackend = Arc<dyn Backend>;

/// An in-process communicator with NCCL's semantics (collective join, collective
/// broadcast, abort on a deadline visible to every rank), for testing the broadcast's
/// orchestration on CPU: the ranks are threads of one process.
pub mod stand_in {
    use std::collections::HashMap;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use super::{Backend, Collective};

    #[derive(Default)]
    struct State {
        joined: u32,
        /// Broadcasts rank 0 has started; a receiver takes round r once `sent ≥ r`.
        sent: u64,
        data: Arc<Vec<u8>>,
        /// Receivers that took the current round.
        taken: u32,
        aborted: Option<String>,
    }

    struct Shared {
        world_size: u32,
        state: Mutex<State>,
        changed: Condvar,
    }

    impl Shared {
        /// Waits until `done` holds, the communicator is aborted, or `deadline` passes
        /// (which aborts it with `why`).
        fn wait(
            &self,
            deadline: Instant,
            why: &str,
            mut done: impl FnMut(&State) -> bool,
        ) -> Result<std::sync::MutexGuard<'_, State>, String> {
            let mut s = self.state.lock().map_err(|_| "stand-in: poisoned")?;
            loop {
                if let Some(e) = &s.aborted {
                    return Err(format!("communicator aborted: {e}"));
                }
                if done(&s) {
                    return Ok(s);
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    s.aborted = Some(why.to_string());
                    self.changed.notify_all();
                    return Err(format!("timed out: {why}"));
                }
                s = self
                    .changed
                    .wait_timeout(s, left.min(Duration::from_millis(50)))
                    .map_err(|_| "stand-in: poisoned")?
                    .0;
            }
        }
    }

    /// Communicators meet by id in one process.
    #[derive(Default)]
    pub struct LocalBackend {
        comms: Mutex<HashMap<Vec<u8>, Arc<Shared>>>,
        next: std::sync::atomic::AtomicU64,
    }

    struct LocalComm {
        shared: Arc<Shared>,
        rank: u32,
        /// Rounds this rank has completed.
        round: u64,
    }

    impl Backend for LocalBackend {
        fn name(&self) -> &'static str {
            "stand-in"
        }

        fn new_id(&self) -> Result<Vec<u8>, String> {
            let n = self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(format!("local-{n}").into_bytes())
        }

        fn join(
            &self,
            id: &[u8],
            rank: u32,
            world_size: u32,
        ) -> Result<Box<dyn Collective>, String> {
            if rank >= world_size {
                return Err(format!("rank {rank} is outside world size {world_size}"));
            }
            let mut comms = self.comms.lock().map_err(|_| "stand-in: poisoned")?;
            let shared = comms
                .entry(id.to_vec())
                .or_insert_with(|| {
                    Arc::new(Shared {
                        world_size,
                        state: Mutex::default(),
                        changed: Condvar::new(),
                    })
                })
                .clone();
            if shared.world_size != world_size {
                return Err(format!(
                    "world size {world_size} differs from the communicator's {}",
                    shared.world_size
                ));
            }
            if let Ok(mut s) = shared.state.lock() {
                s.joined += 1;
            }
            shared.changed.notify_all();
            Ok(Box::new(LocalComm {
                shared,
                rank,
                round: 0,
            }))
        }
    }

    impl LocalComm {
        fn all_joined(&self, deadline: Instant) -> Result<(), String> {
            let world = self.shared.world_size;
            self.shared
                .wait(deadline, "not every rank joined", |s| s.joined >= world)
                .map(drop)
        }
    }

    impl Collective for LocalComm {
        fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), String> {
            if self.rank != 0 {
                return Err(format!("rank {} cannot send", self.rank));
            }
            self.all_joined(deadline)?;
            let receivers = self.shared.world_size - 1;
            {
                let mut s = self.shared.state.lock().map_err(|_| "stand-in: poisoned")?;
                s.data = Arc::new(bytes.to_vec());
                s.taken = 0;
                s.sent += 1;
            }
            self.shared.changed.notify_all();
            self.round += 1;
            self.shared
                .wait(deadline, "a rank did not take the broadcast", |s| {
                    s.taken >= receivers
                })
                .map(drop)
        }

        fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> Result<(), String> {
            if self.rank == 0 {
                return Err("rank 0 cannot receive".into());
            }
            self.all_joined(deadline)?;
            let round = self.round + 1;
            let mut s = self
                .shared
                .wait(deadline, "rank 0 did not broadcast", |s| s.sent >= round)?;
            if s.data.len() != buf.len() {
                let why = format!(
                    "rank 0 sent {} bytes, this rank expected {}",
                    s.data.len(),
                    buf.len()
                );
                s.aborted = Some(why.clone());
                self.shared.changed.notify_all();
                return Err(why);
            }
            buf.copy_from_slice(&s.data);
            s.taken += 1;
            drop(s);
            self.shared.changed.notify_all();
            self.round = round;
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_rank_receives_and_a_missing_rank_aborts_all() {
            let b = Arc::new(LocalBackend::default());
            let id = b.new_id().unwrap();
            let soon = || Instant::now() + Duration::from_secs(5);
            let recv = |rank| {
                let (b, id) = (b.clone(), id.clone());
                std::thread::spawn(move || {
                    let mut c = b.join(&id, rank, 3).unwrap();
                    let mut buf = vec![0u8; 4];
                    c.recv(&mut buf, soon()).map(|_| buf)
                })
            };
            let (r1, r2) = (recv(1), recv(2));
            let mut root = b.join(&id, 0, 3).unwrap();
            root.send(&[1, 2, 3, 4], soon()).unwrap();
            assert_eq!(r1.join().unwrap().unwrap(), [1, 2, 3, 4]);
            assert_eq!(r2.join().unwrap().unwrap(), [1, 2, 3, 4]);

            // Rank 2 never joins this one: rank 0 times out and rank 1 sees the abort.
            let id = b.new_id().unwrap();
            let r1 = {
                let (b, id) = (b.clone(), id.clone());
                std::thread::spawn(move || {
                    let mut c = b.join(&id, 1, 3).unwrap();
                    c.recv(&mut [0u8; 4], soon())
                })
            };
            let mut root = b.join(&id, 0, 3).unwrap();
            let e = root
                .send(&[0; 4], Instant::now() + Duration::from_millis(200))
                .unwrap_err();
            assert!(e.contains("not every rank joined"), "{e}");
            let e = r1.join().unwrap().unwrap_err();
            assert!(e.contains("aborted"), "{e}");
        }
    }
}
