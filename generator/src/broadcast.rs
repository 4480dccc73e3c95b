//! A generator's side of `[trainer] broadcast`: a thread that keeps one connection to
//! the trainer for the broadcast-group epoch the heartbeats report, and keeps the
//! newest version it received for the sampling loop to take
//! (`tandem_weights::broadcast` has the protocol).
//!
//! A member waits up to the broadcast timeout for a version it needs; if it does not
//! come (the trainer excluded this generator, or the broadcast stalled), the caller
//! fetches the version over gRPC, so generation never waits on a stalled broadcast for
//! longer than that. A version whose header this member refused (it announced other
//! than the model's size, or another kind: a full version to a model with a LoRA
//! adapter, an adapter version to one without, an adapter of another base; see
//! `tandem_weights::broadcast`) is fetched over gRPC at once, where the weight sync
//! refuses a version of another kind for good.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// The newest version whose broadcast header was refused (0 = none).
    refused: AtomicU64,
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
            refused: AtomicU64::new(0),
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

    /// Starts the receiving thread; `who` gives this generator's current id and session
    /// token, `param_elements` its model's trainable parameter count (the only size of
    /// version it takes) and `base` the base its adapter is on (`None`: no adapter; the
    /// only kind of version it takes).
    pub fn spawn(
        self: &Arc<Self>,
        token: String,
        param_elements: u64,
        base: Option<u64>,
        who: impl Fn() -> (u64, String) + Send + 'static,
    ) -> std::io::Result<()> {
        let inbox = self.clone();
        std::thread::Builder::new()
            .name("broadcast-recv".into())
            .spawn(move || inbox.receive(&token, (param_elements, base), who))
            .map(|_| ())
    }

    fn receive(
        &self,
        token: &str,
        (param_elements, base): (u64, Option<u64>),
        who: impl Fn() -> (u64, String),
    ) {
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
                let (worker_id, session) = who();
                let join = Join {
                    addr: &group.address,
                    epoch: group.epoch,
                    rank: group.rank,
                    world_size: group.world_size,
                    worker_id,
                    token,
                    session: &session,
                    param_elements,
                    base,
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
                    if let Some(v) = r.refused() {
                        self.refused.fetch_max(v, Ordering::SeqCst);
                    }
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
            if self.refused.load(Ordering::SeqCst) >= want {
                tracing::warn!(
                    want,
                    "the broadcast of v{want} was refused (its header did not fit this model's size or kind): fetching it over gRPC"
                );
                return None;
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;

    use super::*;

    /// A trainer that answers one hello, then sends a version header announcing a
    /// tebibyte; returns the hello's worker id and session.
    fn forging_trainer() -> (String, std::thread::JoinHandle<(u64, Vec<u8>)>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut head = [0u8; 31];
            s.read_exact(&mut head).unwrap();
            let worker_id = u64::from_le_bytes(head[20..28].try_into().unwrap());
            let mut token = vec![0u8; u16::from_le_bytes([head[29], head[30]]) as usize];
            s.read_exact(&mut token).unwrap();
            let mut n = [0u8; 1];
            s.read_exact(&mut n).unwrap();
            let mut session = vec![0u8; n[0] as usize];
            s.read_exact(&mut session).unwrap();
            s.write_all(b"TNDW\x01\x00\x00\x00\x00").unwrap();
            let mut h = b"TNDV".to_vec();
            h.extend_from_slice(&1u64.to_le_bytes());
            h.extend_from_slice(&5u64.to_le_bytes());
            h.extend_from_slice(&[0, 3]);
            h.extend_from_slice(b"f32");
            h.push(0); // a full model's
            h.extend_from_slice(&0u64.to_le_bytes()); // no base
            h.extend_from_slice(&(8u64 << 20).to_le_bytes());
            h.extend_from_slice(&1u32.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&(1u64 << 40).to_le_bytes());
            let _ = s.write_all(&h);
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            (worker_id, session)
        });
        (addr, t)
    }

    /// A header announcing a tebibyte neither aborts the generator nor makes it wait
    /// out the broadcast timeout: the version is to be fetched over gRPC at once.
    #[test]
    fn a_forged_header_makes_the_generator_fetch_at_once() {
        let (addr, trainer) = forging_trainer();
        let inbox = Inbox::new(Duration::from_secs(30), None);
        inbox.set_group(Some(BroadcastGroup {
            epoch: 1,
            world_size: 2,
            rank: 1,
            address: addr,
            members: vec![],
        }));
        inbox
            .spawn("gen-token".into(), 1000, None, || (9, "s".repeat(64)))
            .unwrap();
        let t0 = Instant::now();
        assert!(inbox.take(5).is_none(), "a forged version was taken");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "waited {:?} for a refused version",
            t0.elapsed()
        );
        assert_eq!(inbox.refused.load(Ordering::SeqCst), 5);
        inbox.stop();
        let (worker_id, session) = trainer.join().unwrap();
        // The hello named this worker with its session.
        assert_eq!((worker_id, session), (9, vec![b's'; 64]));
    }
}
