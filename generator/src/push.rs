//! The rollout stream to the trainer: groups go out on one `PushRollouts` stream and
//! stay pending until acknowledged, so a broken stream (a restarted trainer) resends
//! what was not acknowledged on the next one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::v1::RolloutGroup;
use tokio::runtime::Handle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::error::Result;
use crate::worker::{rpc, Worker};

/// Streams groups to the trainer and keeps each until it is acknowledged, so a broken
/// stream (a restarted trainer) resends what was not acknowledged.
pub(crate) struct Pusher {
    tx: tokio::sync::mpsc::Sender<RolloutGroup>,
    pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    broken: Arc<AtomicBool>,
}

impl Pusher {
    fn open(
        rt: &Handle,
        addr: &str,
        creds: &Credentials,
        pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    ) -> Result<Self> {
        let ch = rt
            .block_on(client::connect(addr, creds))
            .map_err(|e| rpc("trainer", e))?;
        let mut trainer = client::trainer(ch, creds);
        let (tx, rx) = tokio::sync::mpsc::channel::<RolloutGroup>(4);
        let broken = Arc::new(AtomicBool::new(false));
        let (p, b) = (pending.clone(), broken.clone());
        let addr_owned = addr.to_string();
        rt.spawn(async move {
            match trainer.push_rollouts(ReceiverStream::new(rx)).await {
                Ok(resp) => {
                    let mut acks = resp.into_inner();
                    while let Some(ack) = acks.next().await {
                        match ack {
                            Ok(a) => {
                                if let Ok(mut p) = p.lock() {
                                    p.remove(&a.seq);
                                }
                                if !a.accepted {
                                    tracing::warn!(seq = a.seq, reason = %a.reason, "the trainer refused a group");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(trainer = %addr_owned, "rollout stream broke: {}", client::describe(&e));
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(trainer = %addr_owned, "cannot open the rollout stream: {}", client::describe(&e)),
            }
            b.store(true, Ordering::SeqCst);
        });
        let this = Pusher {
            tx,
            pending,
            broken,
        };
        let resend: Vec<RolloutGroup> = this
            .pending
            .lock()
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default();
        for g in resend {
            if !send(rt, &this.tx, g) {
                return Err(rpc("trainer", "the new rollout stream closed at once"));
            }
        }
        Ok(this)
    }
}

/// What the worker has pushed and not yet seen acknowledged, and the stream it goes on.
#[derive(Default)]
pub(crate) struct Outbox {
    pusher: Option<Pusher>,
    pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    /// No attempt to reopen the stream before this.
    next_reopen: Option<Instant>,
    /// Since when the trainer could not be reached.
    unreachable_since: Option<Instant>,
}

impl Outbox {
    fn live(&self) -> bool {
        self.pusher
            .as_ref()
            .is_some_and(|p| !p.broken.load(Ordering::SeqCst))
    }

    fn waiting(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }
}

/// Hands `g` to the stream behind `tx`, waiting at most the deadline of a call (a stream
/// nobody reads is as good as broken); whether it went.
fn send(rt: &Handle, tx: &tokio::sync::mpsc::Sender<RolloutGroup>, g: RolloutGroup) -> bool {
    rt.block_on(async { tokio::time::timeout(client::rpc_timeout(), tx.send(g)).await })
        .is_ok_and(|r| r.is_ok())
}

impl Worker {
    /// Numbers `g`, keeps it until it is acknowledged, and sends it (reopening the
    /// stream if it broke).
    pub(crate) fn push(&mut self, mut g: RolloutGroup) -> Result<()> {
        g.seq = self.next_seq;
        self.next_seq += 1;
        if let Ok(mut p) = self.outbox.pending.lock() {
            p.insert(g.seq, g.clone());
        }
        if let Some(p) = self
            .outbox
            .pusher
            .as_ref()
            .filter(|p| !p.broken.load(Ordering::SeqCst))
        {
            if send(&self.rt, &p.tx, g) {
                return Ok(());
            }
            p.broken.store(true, Ordering::SeqCst);
        }
        self.outbox.next_reopen = None;
        self.redeliver()
    }

    /// With groups waiting for an ack and no live stream (the trainer restarted, the
    /// network cut it): opens a new one, which resends them all. At most one attempt a
    /// second, so the sampling loop may call it on every turn; fails once the trainer
    /// has been unreachable for `[coordinator] reconnect_timeout_s`.
    pub(crate) fn redeliver(&mut self) -> Result<()> {
        let o = &mut self.outbox;
        if o.live() {
            o.unreachable_since = None;
            return Ok(());
        }
        let due = o.next_reopen.is_none_or(|t| Instant::now() >= t);
        if o.waiting() == 0 || !due || self.beat.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        o.pusher = None;
        let pending = o.pending.clone();
        let opened = self
            .trainer_address()
            .and_then(|a| Pusher::open(&self.rt, &a, &self.creds, pending));
        let o = &mut self.outbox;
        match opened {
            Ok(p) => {
                o.pusher = Some(p);
                o.unreachable_since = None;
                Ok(())
            }
            Err(e) => {
                let since = *o.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= tandem_proto::retry::patience() {
                    return Err(rpc(
                        "trainer",
                        format!(
                            "unreachable for {:.0} s with {} groups to deliver ([coordinator] reconnect_timeout_s): {e}",
                            since.elapsed().as_secs_f64(),
                            o.waiting()
                        ),
                    ));
                }
                tracing::warn!("cannot reach the trainer: {e}; retrying");
                o.next_reopen = Some(Instant::now() + Duration::from_secs(1));
                Ok(())
            }
        }
    }

    /// Waits (up to 30 s) until every pushed group is acknowledged.
    pub(crate) fn drain(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) && self.outbox.waiting() > 0 {
            if self.redeliver().is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.outbox.pusher = None;
    }
}
