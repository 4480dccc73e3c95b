//! A generator's heartbeats: every interval it reports the version it holds, the tokens
//! it generated, the time it waited and its weight syncs, and learns the published
//! version, the trainer's address, the broadcast group and whether the run is over. A
//! generator the coordinator dropped registers again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{HeartbeatRequest, RegisterRequest, Role};
use tokio::runtime::Handle;

use crate::broadcast::Inbox;
use crate::error::Result;
use crate::worker::rpc;

/// What the heartbeat task and the sampling loop share.
#[derive(Default)]
pub(crate) struct Beat {
    pub worker_id: AtomicU64,
    pub held: AtomicU64,
    pub latest: AtomicU64,
    pub tokens: AtomicU64,
    pub wait_us: AtomicU64,
    pub sync_bytes: AtomicU64,
    pub sync_failures: AtomicU64,
    pub syncs: Mutex<Vec<f64>>,
    pub trainer: Mutex<String>,
    pub stop: AtomicBool,
}

/// Registers again after the coordinator dropped this worker; returns the new id (its
/// session token goes with every later call of `creds`).
async fn register_again(
    coordinator: &mut CoordinatorClient<Authed>,
    creds: &Credentials,
    name: &str,
) -> Result<u64> {
    let r = coordinator
        .register(client::unary(RegisterRequest {
            role: Role::Generator as i32,
            name: name.to_string(),
            ..Default::default()
        }))
        .await
        .map_err(|e| rpc("registering with the coordinator", client::describe(&e)))?
        .into_inner();
    creds.set_session(&r.session_token);
    Ok(r.worker_id)
}

/// Starts the heartbeat task on `rt`; it ends when `beat.stop` is set (by the run's end,
/// or when heartbeats have failed for the reconnect timeout: the coordinator is gone).
pub(crate) fn spawn(
    rt: &Handle,
    beat: Arc<Beat>,
    mut coord: CoordinatorClient<Authed>,
    creds: Credentials,
    interval: Duration,
    name: String,
    inbox: Option<Arc<Inbox>>,
) {
    rt.spawn(async move {
        let mut failures = 0u32;
        let mut failing_since: Option<std::time::Instant> = None;
        while !beat.stop.load(Ordering::SeqCst) {
            tokio::time::sleep(interval).await;
            let req = HeartbeatRequest {
                worker_id: beat.worker_id.load(Ordering::SeqCst),
                policy_version: beat.held.load(Ordering::SeqCst),
                generated_tokens: beat.tokens.swap(0, Ordering::SeqCst),
                wait_seconds: beat.wait_us.swap(0, Ordering::SeqCst) as f64 / 1e6,
                weight_sync_seconds: beat
                    .syncs
                    .lock()
                    .map(|mut s| std::mem::take(&mut *s))
                    .unwrap_or_default(),
                weight_sync_bytes: beat.sync_bytes.swap(0, Ordering::SeqCst),
                weight_sync_failures: beat.sync_failures.swap(0, Ordering::SeqCst),
                broadcast: inbox.is_some(),
                broadcast_address: String::new(),
            };
            match coord.heartbeat(client::unary(req)).await {
                Ok(r) => {
                    failures = 0;
                    failing_since = None;
                    let r = r.into_inner();
                    if let Some(inbox) = &inbox {
                        inbox.set_group(r.group.clone());
                    }
                    // The published version; it only goes back when a trainer resumed.
                    beat.latest.store(r.policy_version, Ordering::SeqCst);
                    if let Ok(mut t) = beat.trainer.lock() {
                        *t = r.trainer_address;
                    }
                    if r.stop {
                        beat.stop.store(true, Ordering::SeqCst);
                    }
                    if !r.known {
                        tracing::warn!("the coordinator dropped this generator; registering again");
                        if let Ok(id) = register_again(&mut coord, &creds, &name).await {
                            beat.worker_id.store(id, Ordering::SeqCst);
                        }
                    }
                }
                Err(e) => {
                    failures += 1;
                    let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                    tracing::warn!("heartbeat failed ({failures}): {}", client::describe(&e));
                    if since.elapsed() >= tandem_proto::retry::patience() {
                        tracing::error!(
                            "the coordinator stayed unreachable for {:.0} s ([coordinator] reconnect_timeout_s); stopping",
                            since.elapsed().as_secs_f64()
                        );
                        beat.stop.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    });
}
