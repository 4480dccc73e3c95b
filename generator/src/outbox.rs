//! The rollout stream to the trainer: groups go out on one `PushRollouts` stream and
//! stay pending until acknowledged, so a broken stream (a restarted trainer) resends
//! what was not acknowledged on the next one. The [`Outbox`] belongs to the scorer
//! stage: a push that waits (the trainer's buffer is full, the stream broke) holds up
//! scoring, never the engine.

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

use crate::error::{rpc, Result};
use crate::heartbeat::Beat;

/// Streams groups to the trainer and keeps each until it is acknowledged, so a broken
/// stream (a restarted trainer) resends what was not acknowledged.
struct Pusher {
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

/// The groups pushed and not yet acknowledged, the stream they go on and how to reopen
/// it.
pub(crate) struct Outbox {
    rt: Handle,
    creds: Credentials,
    /// The trainer's address (learned from heartbeats) and the end of the run.
    beat: Arc<Beat>,
    pusher: Option<Pusher>,
    pending: Arc<Mutex<BTreeMap<u64, RolloutGroup>>>,
    /// The next group's number on the stream.
    next_seq: u64,
    /// No attempt to reopen the stream before this.
    next_reopen: Option<Instant>,
    /// Since when the trainer could not be reached.
    unreachable_since: Option<Instant>,
}

impl Outbox {
    pub fn new(rt: Handle, creds: Credentials, beat: Arc<Beat>) -> Self {
        Outbox {
            rt,
            creds,
            beat,
            pusher: None,
            pending: Arc::default(),
            next_seq: 1,
            next_reopen: None,
            unreachable_since: None,
        }
    }

    fn live(&self) -> bool {
        self.pusher
            .as_ref()
            .is_some_and(|p| !p.broken.load(Ordering::SeqCst))
    }

    /// Groups waiting for their ack.
    pub fn waiting(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Numbers `g`, keeps it until it is acknowledged, and sends it (reopening the
    /// stream if it broke).
    pub fn push(&mut self, mut g: RolloutGroup) -> Result<()> {
        g.seq = self.next_seq;
        self.next_seq += 1;
        if let Ok(mut p) = self.pending.lock() {
            p.insert(g.seq, g.clone());
        }
        if let Some(p) = self
            .pusher
            .as_ref()
            .filter(|p| !p.broken.load(Ordering::SeqCst))
        {
            if send(&self.rt, &p.tx, g) {
                return Ok(());
            }
            p.broken.store(true, Ordering::SeqCst);
        }
        self.next_reopen = None;
        self.redeliver()
    }

    /// With groups waiting for an ack and no live stream (the trainer restarted, the
    /// network cut it): opens a new one, which resends them all. At most one attempt a
    /// second, so it may be called often; fails once the trainer has been unreachable
    /// for `[coordinator] reconnect_timeout_s`.
    pub fn redeliver(&mut self) -> Result<()> {
        if self.live() {
            self.unreachable_since = None;
            return Ok(());
        }
        let due = self.next_reopen.is_none_or(|t| Instant::now() >= t);
        if self.waiting() == 0 || !due || self.beat.stopped() {
            return Ok(());
        }
        self.pusher = None;
        let opened = self
            .beat
            .trainer()
            .and_then(|a| Pusher::open(&self.rt, &a, &self.creds, self.pending.clone()));
        match opened {
            Ok(p) => {
                self.pusher = Some(p);
                self.unreachable_since = None;
                Ok(())
            }
            Err(e) => {
                let since = *self.unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= tandem_proto::retry::patience() {
                    return Err(rpc(
                        "trainer",
                        format!(
                            "unreachable for {:.0} s with {} groups to deliver ([coordinator] reconnect_timeout_s): {e}",
                            since.elapsed().as_secs_f64(),
                            self.waiting()
                        ),
                    ));
                }
                tracing::warn!("cannot reach the trainer: {e}; retrying");
                self.next_reopen = Some(Instant::now() + Duration::from_secs(1));
                Ok(())
            }
        }
    }

    /// Waits (up to 30 s) until every pushed group is acknowledged, then closes the
    /// stream.
    pub fn drain(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) && self.waiting() > 0 {
            if self.redeliver().is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pusher = None;
    }
}

/// Hands `g` to the stream behind `tx`, waiting at most the deadline of a call (a stream
/// nobody reads is as good as broken); whether it went.
fn send(rt: &Handle, tx: &tokio::sync::mpsc::Sender<RolloutGroup>, g: RolloutGroup) -> bool {
    rt.block_on(async { tokio::time::timeout(client::rpc_timeout(), tx.send(g)).await })
        .is_ok_and(|r| r.is_ok())
}
