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
            this.tx
                .blocking_send(g)
                .map_err(|_| rpc("trainer", "rollout stream closed"))?;
        }
        Ok(this)
    }
}

impl Worker {
    /// Sends `g` to the trainer (numbered, kept until acknowledged), reopening the stream
    /// when it broke; gives up after 30 attempts.
    pub(crate) fn push(&mut self, mut g: RolloutGroup) -> Result<()> {
        g.seq = self.next_seq;
        self.next_seq += 1;
        if let Ok(mut p) = self.pending.lock() {
            p.insert(g.seq, g.clone());
        }
        for _attempt in 0..30 {
            if self.beat.stop.load(Ordering::SeqCst) {
                // The run is over: nothing will train this group.
                return Ok(());
            }
            let broken = self
                .pusher
                .as_ref()
                .is_none_or(|p| p.broken.load(Ordering::SeqCst));
            if broken {
                self.pusher = None;
                match self
                    .trainer_address()
                    .and_then(|a| Pusher::open(&self.rt, &a, &self.creds, self.pending.clone()))
                {
                    Ok(p) => {
                        // Opening resent every pending group, this one included.
                        self.pusher = Some(p);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!("cannot reach the trainer: {e}; retrying");
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            if let Some(p) = &self.pusher {
                if p.tx.blocking_send(g.clone()).is_ok() {
                    return Ok(());
                }
                p.broken.store(true, Ordering::SeqCst);
            }
        }
        Err(rpc("trainer", "could not deliver rollouts for 30 attempts"))
    }

    /// Waits (up to 30 s) until every pushed group is acknowledged.
    pub(crate) fn drain(&mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            let left = self.pending.lock().map(|p| p.len()).unwrap_or(0);
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.pusher = None;
    }
}
