//! A generator's weight sync: it takes the published version (or the one its lease
//! was admitted under) from the trainer's broadcast when that arrives in time, else
//! fetches it over gRPC as checksummed buckets, and assigns it in place — between
//! batches, or between decode steps with in-flight updates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::Model;
use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::v1::FetchWeightsRequest;
use tandem_weights::bucket::Assembler;
use tokio::runtime::Handle;

use crate::broadcast::Inbox;
use crate::error::{rpc, Result};
use crate::heartbeat::Beat;
use crate::worker::BroadcastSettings;

/// Weight syncs failed in a row after which the generator stops (each retried after
/// 500 ms: half a minute of a trainer that cannot be reached).
const FAILURES_IN_A_ROW: u32 = 60;

/// The weight sync: where versions come from (the broadcast inbox, the trainer's
/// `FetchWeights`) and what it has seen of them.
pub(crate) struct WeightSync {
    rt: Handle,
    creds: Credentials,
    /// The version held and published, the trainer's address; syncs are reported here.
    beat: Arc<Beat>,
    inbox: Option<Arc<Inbox>>,
    /// How long a fetch may take before it is abandoned with an error.
    timeout: Duration,
    /// The highest version the coordinator has published, as far as this worker saw.
    high_water: u64,
    /// Syncs failed in a row.
    failures: u32,
}

impl WeightSync {
    /// The weight sync of a worker; with `broadcast`, its receiver is started (it joins
    /// the groups the heartbeats announce) for a model of `elements` parameters.
    pub fn new(
        rt: Handle,
        creds: Credentials,
        beat: Arc<Beat>,
        broadcast: Option<&BroadcastSettings>,
        elements: u64,
        timeout: Duration,
    ) -> Result<Self> {
        let inbox = match broadcast {
            Some(bs) => {
                let inbox = Inbox::new(bs.timeout, bs.collective.clone());
                let (b, c) = (beat.clone(), creds.clone());
                inbox
                    .spawn(bs.token.clone(), elements, move || {
                        (b.worker_id(), c.session())
                    })
                    .map_err(|e| rpc("weight broadcast receiver", e))?;
                Some(inbox)
            }
            None => None,
        };
        Ok(WeightSync {
            rt,
            creds,
            high_water: beat.latest(),
            beat,
            inbox,
            timeout,
            failures: 0,
        })
    }

    /// The broadcast receiver, when versions come by broadcast.
    pub fn inbox(&self) -> Option<Arc<Inbox>> {
        self.inbox.clone()
    }

    /// Stops the broadcast receiver.
    pub fn stop(&self) {
        if let Some(inbox) = &self.inbox {
            inbox.stop();
        }
    }

    /// Takes the published version (or `target`) into `model` when the weights held
    /// differ from it — newer in a running run, older after the trainer resumed from a
    /// checkpoint. A failed sync keeps the weights held (their tokens carry their true
    /// version) and is retried on a later call, 500 ms on; an error after
    /// [`FAILURES_IN_A_ROW`].
    pub fn maybe_sync(&mut self, target: Option<u64>, model: &Model) -> Result<()> {
        let want = target.unwrap_or_else(|| self.beat.latest());
        let held = self.beat.held();
        // Below the highest version ever published only after a rewind; a fetch may
        // also return a version the coordinator has not announced yet (held > want).
        let rewound = want < held && want < self.high_water;
        self.high_water = self.high_water.max(want);
        if want > held || rewound {
            match self.sync(want, model) {
                Ok(()) => {
                    self.failures = 0;
                    if rewound {
                        self.high_water = want;
                    }
                }
                Err(e) if self.failures < FAILURES_IN_A_ROW => {
                    self.failures += 1;
                    self.beat.sync_failed();
                    tracing::warn!("weight sync failed ({}): {e}; retrying", self.failures);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes version `want` (or the newest) by broadcast or fetch and assigns it.
    fn sync(&mut self, want: u64, model: &Model) -> Result<()> {
        if self.take_broadcast(want, model) {
            return Ok(());
        }
        let t0 = Instant::now();
        let (version, dtype, chunks) = self.fetch(want, model.params().numel() as u64)?;
        let slices: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
        self.install(
            model,
            version,
            &slices,
            &dtype,
            t0.elapsed().as_secs_f64(),
            "fetch",
        )
    }

    /// Takes version `want` (or newer) from the broadcast when it arrives in time.
    fn take_broadcast(&mut self, want: u64, model: &Model) -> bool {
        let Some(inbox) = self.inbox.clone().filter(|_| want > self.beat.held()) else {
            return false;
        };
        let Some((got, transfer_s)) = inbox.take(want) else {
            return false;
        };
        // Bytes that do not fit this model are refused before they change anything;
        // the version is then fetched over gRPC.
        let installed = self.install(
            model,
            got.version,
            &[&got.bytes],
            &got.dtype,
            transfer_s,
            "broadcast",
        );
        if let Err(e) = installed {
            tracing::warn!(
                "the broadcast of v{} does not fit this model ({e}): fetching it over gRPC",
                got.version
            );
            return false;
        }
        // Broadcast after its publish: the coordinator has published this version even
        // if no reply has said so yet (not a version ahead of the run to undo).
        self.beat.published_at_least(got.version);
        self.high_water = self.high_water.max(got.version);
        inbox.recycle(got.bytes);
        true
    }

    /// Assigns a version's bytes in place and records the sync for the heartbeat (the
    /// version held, bytes, and seconds: `before` spent getting them plus the assign).
    fn install(
        &self,
        model: &Model,
        version: u64,
        chunks: &[&[u8]],
        dtype: &str,
        before: f64,
        how: &str,
    ) -> Result<()> {
        let t0 = Instant::now();
        model.params().assign_chunks(chunks, dtype)?;
        let n: usize = chunks.iter().map(|c| c.len()).sum();
        let secs = before + t0.elapsed().as_secs_f64();
        self.beat.synced(version, n as u64, secs);
        tracing::info!(
            version,
            mib = n as f64 / (1 << 20) as f64,
            seconds = secs,
            "weights updated by {how}"
        );
        Ok(())
    }

    /// Version `want` (or the newest) from the trainer's `FetchWeights`, every bucket
    /// checked, for a model of `elements` parameters: (version, dtype, bytes).
    fn fetch(&self, want: u64, elements: u64) -> Result<(u64, String, Vec<bytes::Bytes>)> {
        let addr = self.beat.trainer()?;
        let creds = &self.creds;
        let timeout = self.timeout;
        self.rt.block_on(async {
            let fetch = async {
                let ch = client::connect(&addr, creds)
                    .await
                    .map_err(|e| rpc("weights", e))?;
                let mut t = client::trainer(ch, creds);
                let mut stream = t
                    .fetch_weights(FetchWeightsRequest { version: want })
                    .await
                    .map_err(|e| {
                        rpc(
                            &format!("fetching weights v{want} from the trainer at {addr}"),
                            client::describe(&e),
                        )
                    })?
                    .into_inner();
                let mut asm = Assembler::expecting(elements);
                while let Some(b) = stream.message().await.map_err(|e| {
                    rpc(
                        &format!("weights stream from the trainer at {addr}"),
                        client::describe(&e),
                    )
                })? {
                    asm.push(b)
                        .map_err(|e| rpc(&format!("trainer at {addr}"), e))?;
                }
                asm.finish()
                    .map_err(|e| rpc(&format!("trainer at {addr}"), e))
            };
            tokio::time::timeout(timeout, fetch).await.map_err(|_| {
                rpc(
                    "weights",
                    format!(
                        "the fetch of v{want} from the trainer at {addr} stalled for {timeout:?}"
                    ),
                )
            })?
        })
    }
}
