//! The trainer's side of `[trainer] broadcast`: the listener generators join, and a
//! thread that pushes each published version to the broadcast group the coordinator
//! named in its publish reply, then asks the coordinator to exclude every member that
//! had not joined, stalled or failed (`tandem_weights::broadcast`). With `[trainer]
//! broadcast = "nccl"` the bytes go by one NCCL broadcast per version.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tandem_proto::client;
use tandem_proto::client::Authed;
use tandem_proto::limits;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{BroadcastGroup, ExcludeRequest};
use tandem_weights::broadcast::{Access, Broadcaster};
use tandem_weights::collective::SharedBackend;
use tandem_weights::Snapshot;

use crate::error::{invalid, Result};

/// The newest version waiting to be pushed (an older one not yet sent is skipped).
type Slot = Arc<(Mutex<Option<(BroadcastGroup, Arc<Snapshot>)>>, Condvar)>;

pub struct Pusher {
    slot: Slot,
    /// The listener's address as generators should dial it.
    pub advertise: String,
}

pub struct Settings {
    pub bucket_bytes: usize,
    /// How long members of a new epoch may take to join.
    pub join_wait: Duration,
    pub timeout: Duration,
    /// The collective data plane (NCCL), or `None` for TCP.
    pub collective: Option<SharedBackend>,
}

/// `host:port` → (`host:0` to bind, the host generators dial), from `--listen` and
/// `--advertise`; `explicit` (`--broadcast-listen`) overrides the bind address.
pub fn addresses(
    listen: &str,
    advertise: &str,
    explicit: Option<&str>,
) -> Result<(String, String)> {
    let host = |a: &str| -> Result<String> {
        a.rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .ok_or_else(|| invalid(format!("{a:?} is not host:port")))
    };
    let bind = match explicit {
        Some(b) => b.to_string(),
        None => format!("{}:0", host(listen)?),
    };
    Ok((bind, host(advertise)?))
}

impl Pusher {
    /// Binds the listener and starts the pushing thread.
    pub fn start(
        bind: &str,
        advertise_host: &str,
        access: Access,
        settings: Settings,
        rt: tokio::runtime::Handle,
        mut coordinator: CoordinatorClient<Authed>,
    ) -> Result<Self> {
        let broadcaster = Broadcaster::bind(bind, access, settings.collective.clone())?;
        let advertise = format!("{advertise_host}:{}", broadcaster.local_addr().port());
        let slot: Slot = Arc::default();
        let work = slot.clone();
        std::thread::Builder::new()
            .name("broadcast".into())
            .spawn(move || loop {
                let (group, snap) = {
                    let (lock, ready) = &*work;
                    let Ok(mut next) = lock.lock() else { return };
                    while next.is_none() {
                        next = match ready.wait(next) {
                            Ok(n) => n,
                            Err(_) => return,
                        };
                    }
                    match next.take() {
                        Some(job) => job,
                        None => continue,
                    }
                };
                let out = broadcaster.send(
                    &group,
                    &snap,
                    settings.bucket_bytes,
                    settings.join_wait,
                    settings.timeout,
                );
                tracing::info!(
                    version = snap.version,
                    epoch = group.epoch,
                    plane = out.plane,
                    delivered = out.delivered.len(),
                    missed = out.missed.len(),
                    failed = out.failed.len(),
                    seconds = format!("{:.3}", out.seconds),
                    "weights broadcast"
                );
                if !out.missed.is_empty() {
                    tracing::warn!(
                        version = snap.version,
                        epoch = group.epoch,
                        "weight broadcast missed {} (they fetch this version over gRPC; the rest of the epoch goes over TCP)",
                        out.describe_missed()
                    );
                }
                if out.failed.is_empty() {
                    continue;
                }
                let reason = out.describe_failures();
                tracing::warn!(
                    version = snap.version,
                    epoch = group.epoch,
                    "weight broadcast failed for {reason}; excluding them from the group (they fetch over gRPC)"
                );
                let req = ExcludeRequest {
                    epoch: group.epoch,
                    worker_ids: out.failed.iter().map(|(m, _)| m.worker_id).collect(),
                    // The coordinator takes a reason of REASON_BYTES at most.
                    reason: limits::cut(&reason, limits::REASON_BYTES).to_string(),
                };
                if let Err(e) = rt.block_on(coordinator.exclude_from_group(tandem_proto::client::unary(req))) {
                    tracing::warn!("excluding from the broadcast group: {}", client::describe(&e));
                }
            })
            .map_err(|e| invalid(format!("broadcast thread: {e}")))?;
        Ok(Pusher { slot, advertise })
    }

    /// Queues `snap` for `group` (replacing a version not yet started).
    pub fn offer(&self, group: BroadcastGroup, snap: Arc<Snapshot>) {
        if group.members.is_empty() {
            return;
        }
        let (lock, ready) = &*self.slot;
        if let Ok(mut next) = lock.lock() {
            *next = Some((group, snap));
            ready.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_binds_beside_listen_and_is_dialled_at_advertise() {
        assert_eq!(
            addresses("0.0.0.0:50052", "trainer-0.svc:50052", None).unwrap(),
            ("0.0.0.0:0".into(), "trainer-0.svc".into())
        );
        assert_eq!(
            addresses("127.0.0.1:0", "127.0.0.1:4000", Some("127.0.0.1:50053")).unwrap(),
            ("127.0.0.1:50053".into(), "127.0.0.1".into())
        );
        assert!(addresses("nohost", "x:1", None).is_err());
    }
}
