//! A generator's weight sync: it takes the published version (or the one its lease
//! was admitted under) from the trainer's broadcast when that arrives in time, else
//! fetches it over gRPC as checksummed buckets, and assigns it in place — between
//! batches, or between decode steps with in-flight updates.
//!
//! A version is assigned to the model's trainable parameters (`Model::trainable`: the
//! LoRA adapter's A and B under `[lora]`, which the engine reads at every step, else
//! every parameter), and only if it is of the model's kind: an adapter version for the
//! base this generator's adapter is on, or a full version to a model without an
//! adapter. A version of another kind is refused before a byte of it is assigned, and
//! the generator stops with an error that names both sides and the fix
//! ([`Error::Incompatible`]): it never goes on sampling from the weights it held as if
//! they were the new version.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_model::{Model, Pretrained};
use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::v1::FetchWeightsRequest;
use tandem_weights::bucket::{base_of, Assembled, Assembler};
use tokio::runtime::Handle;

use crate::broadcast::Inbox;
use crate::error::{rpc, Error, Result};
use crate::heartbeat::Beat;
use crate::worker::BroadcastSettings;

/// What versions a generator's model takes: how many trainable parameters, the base
/// its adapter is on, and what it loaded (named in a refusal).
#[derive(Clone, Debug)]
pub(crate) struct Takes {
    /// Trainable parameters (elements): a version carries exactly these.
    pub elements: u64,
    /// The fingerprint of the base the model's adapter is on (`None`: no adapter).
    pub base: Option<u64>,
    /// "model PATH, DTYPE".
    pub model: String,
}

impl Takes {
    pub fn of(p: &Pretrained) -> Self {
        Takes {
            elements: p.model.trainable().numel() as u64,
            base: held_base(&p.model),
            model: format!(
                "model {}, {}",
                p.source.display(),
                format!("{:?}", p.model.dtype()).to_lowercase()
            ),
        }
    }
}

/// The base `model`'s adapter is on (`None`: no adapter).
fn held_base(model: &Model) -> Option<u64> {
    model.adapter().and_then(|a| a.base_fingerprint())
}

/// Refuses version `version` of base `sent` (`None`: full) unless `model` (described by
/// `what`) is of its kind.
fn check_kind(version: u64, sent: Option<u64>, model: Option<u64>, what: &str) -> Result<()> {
    tandem_weights::check_base(version, sent, model)
        .map_err(|m| Error::Incompatible(m.message(what)))
}

/// Assigns version `version` (its bytes `chunks` in `dtype`, an adapter of `base` or a
/// full model's when `None`) to `model`'s trainable parameters in place, if it is of
/// the model's kind and exactly their size; nothing is written otherwise. `what`
/// describes the model in a refusal.
pub(crate) fn apply(
    model: &Model,
    version: u64,
    base: Option<u64>,
    chunks: &[&[u8]],
    dtype: &str,
    what: &str,
) -> Result<()> {
    check_kind(version, base, held_base(model), what)?;
    model
        .trainable()
        .assign_chunks(chunks, dtype)
        .and_then(|()| model.refold())
        .map_err(|e| crate::error::invalid(format!("weights v{version}: {e}")))
}

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
    /// What versions the model takes.
    takes: Takes,
}

impl WeightSync {
    /// The weight sync of a worker; with `broadcast`, its receiver is started (it joins
    /// the groups the heartbeats announce) for a model that `takes` such versions.
    pub fn new(
        rt: Handle,
        creds: Credentials,
        beat: Arc<Beat>,
        broadcast: Option<&BroadcastSettings>,
        takes: Takes,
        timeout: Duration,
    ) -> Result<Self> {
        let inbox = match broadcast {
            Some(bs) => {
                let inbox = Inbox::new(bs.timeout, bs.collective.clone());
                let (b, c) = (beat.clone(), creds.clone());
                inbox
                    .spawn(bs.token.clone(), takes.elements, takes.base, move || {
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
            takes,
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
    /// [`FAILURES_IN_A_ROW`]. A version of another kind than the model
    /// ([`Error::Incompatible`]) is an error at once: every later version would be
    /// refused too.
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
                Err(e @ Error::Incompatible(_)) => {
                    self.beat.sync_failed();
                    tracing::error!(
                        held,
                        "{e}; stopping: this generator cannot sample the run's policy"
                    );
                    return Err(e);
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
        if self.take_broadcast(want, model)? {
            return Ok(());
        }
        let t0 = Instant::now();
        let got = self.fetch(want)?;
        let slices: Vec<&[u8]> = got.chunks.iter().map(|c| c.as_ref()).collect();
        self.install(
            model,
            (got.version, got.base),
            &slices,
            &got.dtype,
            t0.elapsed().as_secs_f64(),
            "fetch",
        )
    }

    /// Takes version `want` (or newer) from the broadcast when it arrives in time
    /// (`false`: fetch it); a version of another kind than the model is an error.
    fn take_broadcast(&mut self, want: u64, model: &Model) -> Result<bool> {
        let Some(inbox) = self.inbox.clone().filter(|_| want > self.beat.held()) else {
            return Ok(false);
        };
        let Some((got, transfer_s)) = inbox.take(want) else {
            return Ok(false);
        };
        // Bytes that do not fit this model are refused before they change anything;
        // the version is then fetched over gRPC (the receiver refuses a header of
        // another kind, so that comes here as a fetch, refused there for good).
        let installed = self.install(
            model,
            (got.version, got.base),
            &[&got.bytes],
            &got.dtype,
            transfer_s,
            "broadcast",
        );
        match installed {
            Ok(()) => {}
            Err(e @ Error::Incompatible(_)) => return Err(e),
            Err(e) => {
                tracing::warn!(
                    "the broadcast of v{} does not fit this model ({e}): fetching it over gRPC",
                    got.version
                );
                return Ok(false);
            }
        }
        // Broadcast after its publish: the coordinator has published this version even
        // if no reply has said so yet (not a version ahead of the run to undo).
        self.beat.published_at_least(got.version);
        self.high_water = self.high_water.max(got.version);
        inbox.recycle(got.bytes);
        Ok(true)
    }

    /// Assigns a version's bytes in place ([`apply`]: refused unless the model is of the
    /// version's kind and size) and records the sync for the heartbeat (the version
    /// held, bytes, and seconds: `before` spent getting them plus the assign).
    fn install(
        &self,
        model: &Model,
        (version, base): (u64, Option<u64>),
        chunks: &[&[u8]],
        dtype: &str,
        before: f64,
        how: &str,
    ) -> Result<()> {
        let t0 = Instant::now();
        apply(model, version, base, chunks, dtype, &self.takes.model)?;
        let n: usize = chunks.iter().map(|c| c.len()).sum();
        let secs = before + t0.elapsed().as_secs_f64();
        self.beat.synced(version, n as u64, secs);
        tracing::info!(
            version,
            adapter = base.is_some(),
            mib = n as f64 / (1 << 20) as f64,
            seconds = secs,
            "weights updated by {how}"
        );
        Ok(())
    }

    /// Version `want` (or the newest) from the trainer's `FetchWeights`, every bucket
    /// checked: of this model's kind (else [`Error::Incompatible`] at the first bucket,
    /// before its size is looked at) and exactly its trainable parameters' size.
    fn fetch(&self, want: u64) -> Result<Assembled> {
        let addr = self.beat.trainer()?;
        let creds = &self.creds;
        let timeout = self.timeout;
        let takes = &self.takes;
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
                let mut asm = Assembler::expecting(takes.elements);
                while let Some(b) = stream.message().await.map_err(|e| {
                    rpc(
                        &format!("weights stream from the trainer at {addr}"),
                        client::describe(&e),
                    )
                })? {
                    check_kind(b.version, base_of(&b), takes.base, &takes.model)?;
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::pin::Pin;

    use candle_core::{Device, Tensor};
    use tandem_model::{preset, Engine, EngineConfig, LoraSection, Request, SamplingParams};
    use tandem_proto::v1::{PushAck, RolloutGroup, WeightBucket};
    use tandem_weights::Snapshot;

    use super::*;

    /// `model` with a fresh `[lora]` adapter of rank `rank` (B = 0: the base's samples).
    fn with_lora(model: &Model, rank: usize) -> Model {
        LoraSection {
            rank,
            ..Default::default()
        }
        .attach(model.clone())
        .unwrap()
    }

    /// A trained-looking adapter: every A and B drawn at random (seeded by the tensor's
    /// place), so the adapted model samples otherwise than its base.
    fn train(model: &Model) {
        let mut t = HashMap::new();
        for (i, (name, v)) in model.trainable().iter().enumerate() {
            let r = Tensor::randn(0f32, 0.3, v.dims(), &Device::Cpu).unwrap();
            t.insert(name.to_string(), (r * (1.0 + i as f64 * 1e-3)).unwrap());
        }
        model.trainable().assign(&t).unwrap();
    }

    /// Six requests of four samples, at T = 1, on `engine`: each request's tokens.
    fn sample(engine: &mut Engine, model: &Model) -> Vec<(u64, Vec<Vec<u32>>)> {
        for i in 0..6u64 {
            let prompt: Vec<u32> = (0..(3 + 5 * i as usize))
                .map(|j| (j * 11 + i as usize * 5) as u32 % 400 + 3)
                .collect();
            let params = SamplingParams {
                temperature: 1.0,
                max_new_tokens: 10,
                seed: 70 + i,
                ..Default::default()
            };
            let r = Request {
                id: i,
                prompt,
                samples: 4,
                params,
                first_stream: 0,
            };
            engine.add(model, r).unwrap();
        }
        let mut out: Vec<_> = engine
            .run_to_completion(model, 0)
            .unwrap()
            .into_iter()
            .map(|f| (f.id, f.completions.into_iter().map(|c| c.tokens).collect()))
            .collect();
        out.sort();
        out
    }

    /// A generator's engine, kept across the swap as the sampler keeps it, samples
    /// after an adapter version is assigned exactly what the trainer's merged model
    /// samples: the adapter's tensors are read at every step, and the base's packed
    /// copies (keyed on the base's generation, untouched) stay valid.
    #[test]
    fn an_adapter_version_makes_the_running_engine_sample_the_merged_model() {
        for name in preset::TINY_PRESETS {
            let p = preset::init(name, 1, &Device::Cpu).unwrap();
            let generator = with_lora(&p.model, 4);
            let trainer = with_lora(&p.model, 4);
            train(&trainer);
            let snap = Snapshot::of(&trainer, 1).unwrap();
            assert_eq!(snap.base, held_base(&generator));

            // More slots than the decode kernel's rows: the base's projections packed.
            let mut engine = Engine::new(&generator, EngineConfig::default()).unwrap();
            let before = sample(&mut engine, &generator);
            let packed_at = generator.params().generation();
            apply(&generator, 1, snap.base, &[&snap.bytes], snap.dtype, "test").unwrap();
            assert_eq!(
                generator.params().generation(),
                packed_at,
                "{name}: base touched"
            );
            let after = sample(&mut engine, &generator);

            let merged = trainer.merged().unwrap();
            let mut fresh = Engine::new(&merged, EngineConfig::default()).unwrap();
            assert_eq!(after, sample(&mut fresh, &merged), "{name}");
            assert_ne!(before, after, "{name}: the version changed nothing");
            let mut base = Engine::new(&p.model, EngineConfig::default()).unwrap();
            assert_eq!(before, sample(&mut base, &p.model), "{name}");
        }
    }

    /// Versions of another kind or size than the model are refused before a byte is
    /// written, each naming both sides: an adapter version to a model without an
    /// adapter, a full version to one with one, an adapter of another base, and an
    /// adapter of the right base but another rank (the byte count).
    #[test]
    fn a_version_of_another_kind_base_or_size_is_refused_and_changes_nothing() {
        let p = preset::init("tiny", 1, &Device::Cpu).unwrap();
        let other = preset::init("tiny", 2, &Device::Cpu).unwrap();
        let adapted = with_lora(&p.model, 4);
        let trained = with_lora(&p.model, 4);
        train(&trained);
        let adapter_v = Snapshot::of(&trained, 3).unwrap();
        let full_v = Snapshot::of(&other.model, 3).unwrap();
        let foreign = with_lora(&other.model, 4);
        train(&foreign);
        let foreign_v = Snapshot::of(&foreign, 3).unwrap();
        let wide = with_lora(&p.model, 8);
        let wide_v = Snapshot::of(&wide, 3).unwrap();
        let what = "model preset:tiny, f32";
        let cases: [(&Model, &Snapshot, &[&str], bool); 4] = [
            (
                &p.model,
                &adapter_v,
                &[
                    "weights v3 are a LoRA adapter for base 0x",
                    "has no adapter",
                    what,
                    "[lora]",
                ],
                true,
            ),
            (
                &adapted,
                &full_v,
                &[
                    "weights v3 are a full model's parameters",
                    "carries a LoRA adapter",
                    "[lora]",
                ],
                true,
            ),
            (
                &adapted,
                &foreign_v,
                &[
                    "this generator's base is 0x",
                    what,
                    "same [model] path and dtype",
                ],
                true,
            ),
            (
                &adapted,
                &wide_v,
                &["weights v3", "bytes of f32", "need"],
                false,
            ),
        ];
        for (i, (model, v, needles, incompatible)) in cases.into_iter().enumerate() {
            let held = model.trainable().to_bytes().unwrap().0;
            let e = apply(model, v.version, v.base, &[&v.bytes], v.dtype, what).unwrap_err();
            assert_eq!(
                matches!(e, Error::Incompatible(_)),
                incompatible,
                "{i}: {e}"
            );
            let e = e.to_string();
            for n in needles {
                assert!(e.contains(n), "{i}: no {n:?} in {e}");
            }
            assert_eq!(
                model.trainable().to_bytes().unwrap().0,
                held,
                "{i}: written"
            );
        }
        // Both fingerprints are named.
        let e = apply(
            &adapted,
            3,
            foreign_v.base,
            &[&foreign_v.bytes],
            "f32",
            what,
        )
        .unwrap_err()
        .to_string();
        for b in [foreign_v.base, held_base(&adapted)] {
            assert!(e.contains(&format!("{:#018x}", b.unwrap())), "{e}");
        }
        // The right version is taken.
        apply(
            &adapted,
            3,
            adapter_v.base,
            &[&adapter_v.bytes],
            "f32",
            what,
        )
        .unwrap();
        assert_eq!(adapted.trainable().to_bytes().unwrap().0, adapter_v.bytes);
    }

    /// A stand-in trainer that serves `snap` to every fetch.
    struct FakeTrainer {
        snap: Arc<Snapshot>,
    }

    type Boxed<T> =
        Pin<Box<dyn tokio_stream::Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl tandem_proto::v1::trainer_server::Trainer for FakeTrainer {
        type PushRolloutsStream = Boxed<PushAck>;
        type FetchWeightsStream = Boxed<WeightBucket>;

        async fn push_rollouts(
            &self,
            _req: tonic::Request<tonic::Streaming<RolloutGroup>>,
        ) -> std::result::Result<tonic::Response<Self::PushRolloutsStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("not in this test"))
        }

        async fn fetch_weights(
            &self,
            _req: tonic::Request<FetchWeightsRequest>,
        ) -> std::result::Result<tonic::Response<Self::FetchWeightsStream>, tonic::Status> {
            let s = &self.snap;
            let size = 4096;
            let buckets: Vec<_> = s
                .checksums(size)
                .iter()
                .enumerate()
                .map(|(i, &crc)| {
                    let b = tandem_weights::bucket::bucket(
                        s.version, s.dtype, s.base, &s.bytes, size, i, crc,
                    );
                    Ok(b)
                })
                .collect();
            Ok(tonic::Response::new(Box::pin(tokio_stream::iter(buckets))))
        }
    }

    /// A weight sync of `model` against a stand-in trainer serving `snap` (published as
    /// version 1), on `rt`.
    fn sync_against(
        rt: &tokio::runtime::Runtime,
        model: &Pretrained,
        snap: Snapshot,
    ) -> WeightSync {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let trainer = FakeTrainer {
            snap: Arc::new(snap),
        };
        rt.spawn(
            tonic::transport::Server::builder()
                .add_service(tandem_proto::v1::trainer_server::TrainerServer::new(
                    trainer,
                ))
                .serve_with_incoming(tandem_proto::incoming(listener)),
        );
        let creds = Credentials::new("test-token", tandem_proto::tls::Tls::none()).unwrap();
        let beat = Arc::new(Beat::new(1, 1, addr));
        let takes = Takes::of(model);
        WeightSync::new(
            rt.handle().clone(),
            creds,
            beat,
            None,
            takes,
            Duration::from_secs(20),
        )
        .unwrap()
    }

    /// Over a real fetch: a version of another kind stops the generator at once with
    /// the refusal (no retries: every later version would be refused too), holding the
    /// version it had; a version of the wrong size is retried as before, holding it too;
    /// the right adapter version is assigned and held.
    #[test]
    fn a_fetched_version_of_another_kind_stops_the_generator_at_once() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut p = preset::init("tiny", 1, &Device::Cpu).unwrap();
        p.model = with_lora(&p.model, 4);
        let other = preset::init("tiny", 2, &Device::Cpu).unwrap();

        let full = Snapshot::of(&other.model, 1).unwrap();
        let mut sync = sync_against(&rt, &p, full);
        let t0 = Instant::now();
        let e = sync.maybe_sync(Some(1), &p.model).unwrap_err();
        assert!(matches!(e, Error::Incompatible(_)), "{e}");
        assert!(e.to_string().contains("full model's parameters"), "{e}");
        assert!(e.to_string().contains("model preset:tiny, f32"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!(sync.beat.held(), 0);

        let foreign = with_lora(&other.model, 4);
        let mut sync = sync_against(&rt, &p, Snapshot::of(&foreign, 1).unwrap());
        let e = sync.maybe_sync(Some(1), &p.model).unwrap_err();
        assert!(e.to_string().contains("this generator's base is"), "{e}");
        assert_eq!(sync.beat.held(), 0);

        let wide = with_lora(&p.model.without_adapter(), 8);
        let mut sync = sync_against(&rt, &p, Snapshot::of(&wide, 1).unwrap());
        sync.maybe_sync(Some(1), &p.model).unwrap();
        assert_eq!((sync.beat.held(), sync.failures), (0, 1));

        let trained = with_lora(&p.model.without_adapter(), 4);
        train(&trained);
        let v1 = Snapshot::of(&trained, 1).unwrap();
        let bytes = v1.bytes.clone();
        let mut sync = sync_against(&rt, &p, v1);
        sync.maybe_sync(Some(1), &p.model).unwrap();
        assert_eq!((sync.beat.held(), sync.failures), (1, 0));
        assert_eq!(p.model.trainable().to_bytes().unwrap().0, bytes);
    }
}
