//! A generator's weight sync: it takes the published version (or the one its lease
//! was admitted under) from the trainer's broadcast when that arrives in time, else
//! fetches it over gRPC as checksummed buckets, and assigns it in place — between
//! batches, or between decode steps with in-flight updates.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tandem_proto::client;
use tandem_proto::v1::FetchWeightsRequest;
use tandem_weights::bucket::Assembler;

use crate::error::Result;
use crate::worker::{rpc, Worker};

impl Worker {
    pub(crate) fn trainer_address(&self) -> Result<String> {
        let t = self
            .beat
            .trainer
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        if t.is_empty() {
            return Err(rpc(
                "trainer",
                "no trainer has registered with the coordinator yet",
            ));
        }
        Ok(t)
    }

    /// Takes version `want` (or newer) from the broadcast when it arrives in time.
    fn take_broadcast(&mut self, want: u64) -> Result<bool> {
        let held = self.beat.held.load(Ordering::SeqCst);
        let Some(inbox) = self.inbox.clone().filter(|_| want > held) else {
            return Ok(false);
        };
        let Some((got, transfer_s)) = inbox.take(want) else {
            return Ok(false);
        };
        // Bytes that do not fit this model are refused before they change anything;
        // the version is then fetched over gRPC.
        if let Err(e) = self.install(
            got.version,
            &[&got.bytes],
            &got.dtype,
            transfer_s,
            "broadcast",
        ) {
            tracing::warn!(
                "the broadcast of v{} does not fit this model ({e}): fetching it over gRPC",
                got.version
            );
            return Ok(false);
        }
        // Broadcast after its publish: the coordinator has published this version even
        // if no reply has said so yet (not a version ahead of the run to undo).
        self.beat.latest.fetch_max(got.version, Ordering::SeqCst);
        self.high_water = self.high_water.max(got.version);
        inbox.recycle(got.bytes);
        Ok(true)
    }

    /// Assigns a version's bytes in place and records the sync for the heartbeat (the
    /// version held, bytes, and seconds: `before` spent getting them plus the assign).
    fn install(
        &mut self,
        version: u64,
        chunks: &[&[u8]],
        dtype: &str,
        before: f64,
        how: &str,
    ) -> Result<()> {
        let t0 = Instant::now();
        self.model.model.params().assign_chunks(chunks, dtype)?;
        let n: usize = chunks.iter().map(|c| c.len()).sum();
        self.beat.held.store(version, Ordering::SeqCst);
        self.beat.sync_bytes.fetch_add(n as u64, Ordering::SeqCst);
        let secs = before + t0.elapsed().as_secs_f64();
        if let Ok(mut s) = self.beat.syncs.lock() {
            s.push(secs);
        }
        tracing::info!(
            version,
            mib = n as f64 / (1 << 20) as f64,
            seconds = secs,
            "weights updated by {how}"
        );
        Ok(())
    }

    /// Fetches version `want` (or the newest) and assigns it in place.
    fn sync_weights(&mut self, want: u64) -> Result<()> {
        if self.take_broadcast(want)? {
            return Ok(());
        }
        let addr = self.trainer_address()?;
        let t0 = Instant::now();
        let creds = self.creds.clone();
        let timeout = self.settings.weight_sync_timeout;
        let elements = self.model.model.params().numel() as u64;
        let fetched = self.rt.block_on(async {
            let fetch = async {
                let ch = client::connect(&addr, &creds)
                    .await
                    .map_err(|e| rpc("weights", e))?;
                let mut t = client::trainer(ch, &creds);
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
        })?;
        let (version, dtype, chunks) = fetched;
        let slices: Vec<&[u8]> = chunks.iter().map(|c| c.as_ref()).collect();
        self.install(
            version,
            &slices,
            &dtype,
            t0.elapsed().as_secs_f64(),
            "fetch",
        )
    }

    /// Takes the published version (or `target`) when the weights held differ from it
    /// — newer in a running run, older after the trainer resumed from a checkpoint.
    pub(crate) fn maybe_sync(&mut self, target: Option<u64>) -> Result<()> {
        let want = target.unwrap_or_else(|| self.beat.latest.load(Ordering::SeqCst));
        let held = self.beat.held.load(Ordering::SeqCst);
        // Below the highest version ever published only after a rewind; a fetch may
        // also return a version the coordinator has not announced yet (held > want).
        let rewound = want < held && want < self.high_water;
        self.high_water = self.high_water.max(want);
        if want > held || rewound {
            match self.sync_weights(want) {
                Ok(()) => {
                    self.sync_failures = 0;
                    if rewound {
                        self.high_water = want;
                    }
                }
                // The trainer may be restarting: keep the weights held (their tokens
                // carry their true version) and try again shortly.
                Err(e) if self.sync_failures < 60 => {
                    self.sync_failures += 1;
                    self.beat.sync_failures.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!("weight sync failed ({}): {e}; retrying", self.sync_failures);
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
