//! A generator's heartbeats: every interval it reports the version it holds, the tokens
//! it generated, the time it waited, its weight syncs and its failed episodes and
//! re-run groups, and learns the published
//! version, the trainer's address, the broadcast group and whether the run is over. A
//! generator the coordinator dropped registers again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{HeartbeatReply, HeartbeatRequest, RegisterRequest, Role};
use tokio::runtime::Handle;

use crate::broadcast::Inbox;
use crate::error::{rpc, Result};

/// What a generator's heartbeats report and learn. The components feed it (the
/// sampler its tokens and waits, the weight sync the version held and its syncs) and
/// read what the coordinator said (the published version, the trainer's address, the
/// end of the run); only the heartbeat task sends it.
#[derive(Default)]
pub(crate) struct Beat {
    worker_id: AtomicU64,
    held: AtomicU64,
    latest: AtomicU64,
    tokens: AtomicU64,
    prefill_tokens: AtomicU64,
    prefix_cache_hit_tokens: AtomicU64,
    wait_us: AtomicU64,
    sync_bytes: AtomicU64,
    sync_failures: AtomicU64,
    episodes_failed: AtomicU64,
    groups_retried: AtomicU64,
    syncs: Mutex<Vec<f64>>,
    trainer: Mutex<String>,
    stop: AtomicBool,
}

impl Beat {
    /// A registered worker's: its id, the version published when it registered and the
    /// trainer's address then.
    pub fn new(worker_id: u64, latest: u64, trainer: String) -> Self {
        let b = Beat::default();
        b.worker_id.store(worker_id, Ordering::SeqCst);
        b.latest.store(latest, Ordering::SeqCst);
        b.set_trainer(trainer);
        b
    }

    /// This worker's id (a new one after registering again).
    pub fn worker_id(&self) -> u64 {
        self.worker_id.load(Ordering::SeqCst)
    }

    /// The version of the weights held: every token sampled now carries it.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// The version the coordinator last said is published.
    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::SeqCst)
    }

    /// Version `v` is published (it came by broadcast, after its publish), even if no
    /// reply has said so yet.
    pub fn published_at_least(&self, v: u64) {
        self.latest.fetch_max(v, Ordering::SeqCst);
    }

    /// The trainer's address, once one has registered.
    pub fn trainer(&self) -> Result<String> {
        let t = self.trainer.lock().map(|t| t.clone()).unwrap_or_default();
        if t.is_empty() {
            return Err(rpc(
                "trainer",
                "no trainer has registered with the coordinator yet",
            ));
        }
        Ok(t)
    }

    fn set_trainer(&self, address: String) {
        if let Ok(mut t) = self.trainer.lock() {
            *t = address;
        }
    }

    /// Whether the run is over for this worker (the coordinator said so, or stayed
    /// unreachable, or the worker is leaving).
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// `n` completion tokens sampled.
    pub fn generated(&self, n: u64) {
        self.tokens.fetch_add(n, Ordering::SeqCst);
    }

    /// The engine computed `prefilled` prompt tokens and took `cached` from its prefix
    /// cache.
    pub fn prefilled(&self, prefilled: u64, cached: u64) {
        self.prefill_tokens.fetch_add(prefilled, Ordering::SeqCst);
        self.prefix_cache_hit_tokens
            .fetch_add(cached, Ordering::SeqCst);
    }

    /// The sampler waited `d` with nothing to step.
    pub fn waited(&self, d: Duration) {
        self.wait_us
            .fetch_add(d.as_micros() as u64, Ordering::SeqCst);
    }

    /// Version `version` is held from now on, after a sync of `bytes` that took
    /// `seconds`.
    pub fn synced(&self, version: u64, bytes: u64, seconds: f64) {
        self.held.store(version, Ordering::SeqCst);
        self.sync_bytes.fetch_add(bytes, Ordering::SeqCst);
        if let Ok(mut s) = self.syncs.lock() {
            s.push(seconds);
        }
    }

    /// A weight sync failed (it is retried).
    pub fn sync_failed(&self) {
        self.sync_failures.fetch_add(1, Ordering::SeqCst);
    }

    /// `n` episodes failed through no doing of the model (`failure.rs`).
    pub fn episodes_failed(&self, n: u32) {
        self.episodes_failed
            .fetch_add(u64::from(n), Ordering::SeqCst);
    }

    /// A group runs again after a failed run.
    pub fn group_retried(&self) {
        self.groups_retried.fetch_add(1, Ordering::SeqCst);
    }

    /// The failed episodes and the re-runs not yet reported.
    #[cfg(test)]
    pub fn failures(&self) -> (u64, u64) {
        (
            self.episodes_failed.load(Ordering::SeqCst),
            self.groups_retried.load(Ordering::SeqCst),
        )
    }

    /// The next heartbeat: what changed since the last one (the counters are taken).
    fn report(&self, broadcast: bool) -> HeartbeatRequest {
        HeartbeatRequest {
            worker_id: self.worker_id(),
            policy_version: self.held(),
            generated_tokens: self.tokens.swap(0, Ordering::SeqCst),
            wait_seconds: self.wait_us.swap(0, Ordering::SeqCst) as f64 / 1e6,
            weight_sync_seconds: self
                .syncs
                .lock()
                .map(|mut s| std::mem::take(&mut *s))
                .unwrap_or_default(),
            weight_sync_bytes: self.sync_bytes.swap(0, Ordering::SeqCst),
            weight_sync_failures: self.sync_failures.swap(0, Ordering::SeqCst),
            prefill_tokens: self.prefill_tokens.swap(0, Ordering::SeqCst),
            prefix_cache_hit_tokens: self.prefix_cache_hit_tokens.swap(0, Ordering::SeqCst),
            broadcast,
            broadcast_address: String::new(),
            episodes_failed: self.episodes_failed.swap(0, Ordering::SeqCst),
            groups_retried: self.groups_retried.swap(0, Ordering::SeqCst),
        }
    }
}

/// The heartbeat task: it owns its coordinator client and what it needs to register
/// again.
pub(crate) struct Heartbeat {
    pub beat: Arc<Beat>,
    pub coordinator: CoordinatorClient<Authed>,
    pub creds: Credentials,
    pub interval: Duration,
    /// This generator's name (registering again).
    pub name: String,
    /// The broadcast receiver, told each new group.
    pub inbox: Option<Arc<Inbox>>,
}

impl Heartbeat {
    /// Starts the task on `rt`; it ends when the beat stops (by the run's end, or when
    /// heartbeats have failed for the reconnect timeout: the coordinator is gone).
    pub fn spawn(self, rt: &Handle) {
        rt.spawn(self.run());
    }

    async fn run(mut self) {
        let mut failures = 0u32;
        let mut failing_since: Option<Instant> = None;
        while !self.beat.stopped() {
            tokio::time::sleep(self.interval).await;
            let req = self.beat.report(self.inbox.is_some());
            match self.coordinator.heartbeat(client::unary(req)).await {
                Ok(r) => {
                    failures = 0;
                    failing_since = None;
                    self.learn(r.into_inner()).await;
                }
                Err(e) => {
                    failures += 1;
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    tracing::warn!("heartbeat failed ({failures}): {}", client::describe(&e));
                    if since.elapsed() >= tandem_proto::retry::patience() {
                        tracing::error!(
                            "the coordinator stayed unreachable for {:.0} s ([coordinator] reconnect_timeout_s); stopping",
                            since.elapsed().as_secs_f64()
                        );
                        self.beat.stop();
                    }
                }
            }
        }
    }

    /// Takes in what a heartbeat's reply said.
    async fn learn(&mut self, r: HeartbeatReply) {
        if let Some(inbox) = &self.inbox {
            inbox.set_group(r.group.clone());
        }
        // The published version; it only goes back when a trainer resumed.
        self.beat.latest.store(r.policy_version, Ordering::SeqCst);
        self.beat.set_trainer(r.trainer_address);
        if r.stop {
            self.beat.stop();
        }
        if !r.known {
            tracing::warn!("the coordinator dropped this generator; registering again");
            if let Ok(id) = self.register_again().await {
                self.beat.worker_id.store(id, Ordering::SeqCst);
            }
        }
    }

    /// Registers again after the coordinator dropped this worker; returns the new id (its
    /// session token goes with every later call of `creds`).
    async fn register_again(&mut self) -> Result<u64> {
        let r = self
            .coordinator
            .register(client::unary(RegisterRequest {
                role: Role::Generator as i32,
                name: self.name.clone(),
                ..Default::default()
            }))
            .await
            .map_err(|e| rpc("registering with the coordinator", client::describe(&e)))?
            .into_inner();
        self.creds.set_session(&r.session_token);
        Ok(r.worker_id)
    }
}
