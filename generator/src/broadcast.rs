//! A generator's side of `[trainer] broadcast`: a thread that keeps one connection to
//! the trainer for the broadcast-group epoch the heartbeats report, and keeps the
//! newest version it received for the sampling loop to take
//! (`tandem_weights::broadcast` has the protocol).
//!
//! A member waits up to the broadcast timeout for a version it needs; if it does not
//! come (the trainer excluded this generator, or the broadcast stalled), the caller
//! fetches the version over gRPC, so generation never waits on a stalled broadcast for
//! longer than that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::v1::BroadcastGroup;
use tandem_weights::broadcast::{Join, Received, Receiver};
use tandem_weights::collective::SharedBackend;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Inbox {
    group: Mutex<Option<BroadcastGroup>>,
    /// The newest version received, with the seconds its transfer took.
    staged: Mutex<Option<(Received, f64)>>,
    /// Bytes of a version already assigned, to receive the next one into.
    spare: Mutex<Option<Vec<u8>>>,
    stop: AtomicBool,
    timeout: Duration,
    /// Joins each epoch's collective (NCCL) with this, when given.
    collective: Option<SharedBackend>,
}

impl Inbox {
    pub fn new(timeout: Duration, collective: Option<SharedBackend>) -> Arc<Self> {
        Arc::new(Inbox {
            group: Mutex::new(None),
            staged: Mutex::new(None),
            spare: Mutex::new(None),
            stop: AtomicBool::new(false),
            timeout,
            collective,
        })
    }

    /// The group as the latest heartbeat reply described it.
    pub fn set_group(&self, group: Option<BroadcastGroup>) {
        if let Ok(mut g) = self.group.lock() {
            *g = group;
        }
    }

    fn membership(&self) -> Option<BroadcastGroup> {
        self.group
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .filter(|g| g.rank > 0)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Starts the receiving thread; `worker_id` gives this generator's current id.
    pub fn spawn(
        self: &Arc<Self>,
        token: String,
        worker_id: impl Fn() -> u64 + Send + 'static,
    ) -> std::io::Result<()> {
        let inbox = self.clone();
        std::thread::Builder::new()
            .name("broadcast-recv".into())
            .spawn(move || inbox.receive(&token, worker_id))
            .map(|_| ())
    }

    fn receive(&self, token: &str, worker_id: impl Fn() -> u64) {
        let mut rx: Option<Receiver> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let Some(group) = self.membership() else {
                rx = None;
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let current = rx
                .as_ref()
                .is_some_and(|r| r.epoch == group.epoch && r.rank == group.rank);
            if !current {
                let join = Join {
                    addr: &group.address,
                    epoch: group.epoch,
                    rank: group.rank,
                    world_size: group.world_size,
                    worker_id: worker_id(),
                    token,
                };
                rx = match Receiver::connect(&join, CONNECT_TIMEOUT, self.collective.as_ref()) {
                    Ok(r) => {
                        tracing::info!(
                            epoch = group.epoch,
                            rank = group.rank,
                            world_size = group.world_size,
                            "joined the weight broadcast"
                        );
                        Some(r)
                    }
                    Err(e) => {
                        tracing::warn!("{e}");
                        std::thread::sleep(Duration::from_millis(500));
                        None
                    }
                };
                continue;
            }
            let Some(r) = rx.as_mut() else { continue };
            if let Some(b) = self.spare.lock().ok().and_then(|mut s| s.take()) {
                r.recycle(b);
            }
            let t0 = Instant::now();
            match r.recv(Duration::from_millis(100), self.timeout) {
                Ok(Some(v)) => {
                    let secs = t0.elapsed().as_secs_f64();
                    if let Ok(mut s) = self.staged.lock() {
                        if s.as_ref().is_none_or(|(old, _)| old.version < v.version) {
                            *s = Some((v, secs));
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("{e}; joining again");
                    rx = None;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Hands back the bytes of a version that has been assigned.
    pub fn recycle(&self, bytes: Vec<u8>) {
        if let Ok(mut s) = self.spare.lock() {
            *s = Some(bytes);
        }
    }

    /// A received version ≥ `want`: at once if one is staged; while this generator is a
    /// member of the group, waiting up to the broadcast timeout for it. `None` means
    /// fetch it over gRPC.
    pub fn take(&self, want: u64) -> Option<(Received, f64)> {
        let deadline = Instant::now() + self.timeout;
        let mut waited = false;
        loop {
            if let Ok(mut s) = self.staged.lock() {
                if let Some(hit) = s.take_if(|(v, _)| v.version >= want) {
                    return Some(hit);
                }
            }
            if self.membership().is_none() {
                if waited {
                    tracing::warn!(
                        want,
                        "left the broadcast group while waiting for v{want}: fetching it over gRPC"
                    );
                }
                return None;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    want,
                    "the broadcast of v{want} did not arrive within {:.1} s: fetching it over gRPC",
                    self.timeout.as_secs_f64()
                );
                return None;
            }
            waited = true;
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
