//! The Trainer gRPC service: generators stream rollout groups in (checked, committed
//! at the coordinator exactly once, buffered; back-pressure when the buffer is full)
//! and fetch policy weights out (checksummed buckets of the newest version).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tandem_proto::auth::{check_session, Caller};

use tandem_proto::client::Authed;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::trainer_server::Trainer;
use tandem_proto::v1::{CommitRequest, FetchWeightsRequest, PushAck, RolloutGroup, WeightBucket};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::node::buffer::Buffer;
use crate::node::ingest::{check_group, into_group, uninformative, Limits};
use tandem_weights::Snapshot;

/// What the service and the learner loop share.
pub struct Shared {
    pub buffer: Mutex<Buffer>,
    /// Signalled when the buffer shrinks.
    pub space: tokio::sync::Notify,
    pub capacity: usize,
    /// The newest published version.
    pub version: AtomicU64,
    pub weights: RwLock<Arc<Snapshot>>,
    /// Groups refused since the last publish, by reason.
    pub dropped: Mutex<BTreeMap<String, u64>>,
    pub limits: Limits,
    pub bucket_bytes: usize,
    /// Set after the last step: new groups are refused without being committed.
    pub closed: std::sync::atomic::AtomicBool,
    /// Groups between arrival and buffer (so closing can wait for them).
    pub inflight: std::sync::atomic::AtomicUsize,
    /// Groups filtered out by dynamic sampling (`Limits::filter_zero_std`) so far.
    pub filtered: AtomicU64,
    /// Where the leases of groups dropped as stale go, to be discarded at the
    /// coordinator at once (their admission slots free again); unset in benchmarks.
    pub discard: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Vec<u64>>>,
    /// A stop was asked for (SIGINT / SIGTERM): the learner ends after the step it is
    /// in, or at once while it waits for a batch.
    pub stop: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// State for a trainer that publishes `snapshot` (its version is the current one)
    /// and starts with `buffer`.
    pub fn new(
        buffer: Buffer,
        capacity: usize,
        snapshot: Snapshot,
        limits: Limits,
        bucket_bytes: usize,
    ) -> Self {
        Shared {
            buffer: Mutex::new(buffer),
            space: tokio::sync::Notify::new(),
            capacity,
            version: AtomicU64::new(snapshot.version),
            weights: RwLock::new(Arc::new(snapshot)),
            dropped: Mutex::new(BTreeMap::new()),
            limits,
            bucket_bytes,
            closed: Default::default(),
            inflight: Default::default(),
            filtered: AtomicU64::new(0),
            discard: std::sync::OnceLock::new(),
            stop: Default::default(),
        }
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub fn count_dropped(&self, reason: &str) {
        if let Ok(mut d) = self.dropped.lock() {
            *d.entry(reason.to_string()).or_default() += 1;
        }
    }

    pub fn buffer_len(&self) -> usize {
        self.buffer.lock().map(|b| b.len()).unwrap_or(0)
    }

    /// Refuses new groups and waits (up to `timeout`) for those already arriving.
    pub fn close(&self, timeout: Duration) {
        self.closed.store(true, Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        while self.inflight.load(Ordering::SeqCst) > 0 && t0.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Counts a group as in flight while it lives.
struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
pub struct TrainerService {
    pub shared: Arc<Shared>,
    pub coordinator: CoordinatorClient<Authed>,
    /// The run's token: checks the session token of each group a generator pushes.
    pub run_token: String,
}

type AckStream = Pin<Box<dyn Stream<Item = Result<PushAck, Status>> + Send>>;
type BucketStream = Pin<Box<dyn Stream<Item = Result<WeightBucket, Status>> + Send>>;

impl TrainerService {
    /// Asks the coordinator to commit `g`'s lease (or close it as `filtered`), through
    /// a coordinator restart: every retry carries the same request id, so a commit whose
    /// reply was lost is answered as accepted again rather than as a duplicate.
    async fn commit(
        &self,
        g: &RolloutGroup,
        filtered: bool,
    ) -> Result<tonic::Response<tandem_proto::v1::CommitReply>, Status> {
        let req = CommitRequest {
            lease_id: g.lease_id,
            prompt_index: g.prompt_index,
            worker_id: g.worker_id,
            filtered,
            request_id: tandem_proto::retry::request_id(),
        };
        tandem_proto::retry::retry("committing a lease", || {
            let (mut c, req) = (self.coordinator.clone(), req);
            async move { c.commit(tandem_proto::client::unary(req)).await }
        })
        .await
    }

    /// Closes the lease of uninformative group `g` as filtered; the ack says so.
    async fn filter(&self, g: RolloutGroup) -> PushAck {
        let commit = self.commit(&g, true).await;
        let (accepted, reason) = match commit {
            Ok(r) if r.get_ref().accepted => {
                self.shared.filtered.fetch_add(1, Ordering::SeqCst);
                self.shared.count_dropped("zero_std");
                tracing::debug!(
                    lease = g.lease_id,
                    "filtered out: every reward equal (dynamic sampling)"
                );
                (
                    true,
                    "filtered: every reward is equal (dynamic sampling)".to_string(),
                )
            }
            Ok(r) => (
                false,
                format!("lease {}: {}", g.lease_id, r.get_ref().reason),
            ),
            Err(e) => (
                false,
                format!(
                    "the coordinator could not close lease {}: {}",
                    g.lease_id,
                    e.message()
                ),
            ),
        };
        PushAck {
            seq: g.seq,
            accepted,
            reason,
            buffer_groups: self.shared.buffer_len() as u64,
        }
    }

    /// Check → wait for room → commit → buffer. Returns the ack. A `caller` holding the
    /// generator token may push only groups of the worker its session token names.
    async fn ingest(&self, g: RolloutGroup, caller: Option<Caller>) -> PushAck {
        let seq = g.seq;
        self.shared.inflight.fetch_add(1, Ordering::SeqCst);
        let _guard = InFlight(&self.shared);
        let refuse = |reason: String, shared: &Shared| PushAck {
            seq,
            accepted: false,
            reason,
            buffer_groups: shared.buffer_len() as u64,
        };
        if self.shared.closed.load(Ordering::SeqCst) {
            return refuse("the run is finished".into(), &self.shared);
        }
        let session = check_session(
            caller,
            g.session_token.as_bytes(),
            &self.run_token,
            g.worker_id,
            "PushRollouts",
        );
        if let Err(e) = session {
            self.shared.count_dropped("invalid");
            tracing::warn!(
                lease = g.lease_id,
                worker = g.worker_id,
                "rollout group refused: {}",
                e.message()
            );
            return refuse(e.message().to_string(), &self.shared);
        }
        let version = self.shared.version.load(Ordering::SeqCst);
        if let Err(e) = check_group(&g, &self.shared.limits, version) {
            self.shared.count_dropped("invalid");
            tracing::warn!(
                lease = g.lease_id,
                worker = g.worker_id,
                "rollout group refused: {e}"
            );
            return refuse(e, &self.shared);
        }
        // Dynamic sampling: an uninformative group closes its lease as filtered (the
        // coordinator admits another prompt in its place) and never reaches the buffer.
        let filtered = self.shared.limits.filter_zero_std && uninformative(&g);
        if filtered {
            return self.filter(g).await;
        }
        // Back-pressure: stop reading this stream while the buffer is full.
        loop {
            let notified = self.shared.space.notified();
            if self.shared.buffer_len() < self.shared.capacity {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
        let commit = self.commit(&g, false).await;
        match commit {
            Ok(r) if r.get_ref().accepted => {}
            Ok(r) => {
                return refuse(
                    format!("lease {}: {}", g.lease_id, r.get_ref().reason),
                    &self.shared,
                )
            }
            Err(e) => {
                return refuse(
                    format!(
                        "the coordinator could not commit lease {}: {}",
                        g.lease_id,
                        e.message()
                    ),
                    &self.shared,
                )
            }
        }
        let group = into_group(g);
        let len = match self.shared.buffer.lock() {
            Ok(mut b) => {
                b.push(group);
                b.len()
            }
            Err(_) => return refuse("trainer buffer poisoned".into(), &self.shared),
        };
        PushAck {
            seq,
            accepted: true,
            reason: String::new(),
            buffer_groups: len as u64,
        }
    }
}

/// The drop reason of a rollout stream that ended in `status`: "malformed" when the
/// bytes that arrived could not be a message (undecodable, an invalid frame, past the
/// size limit), "disconnected" when the stream was cut (the generator died, its
/// connection was reset or timed out: a transport error, or the stream ending inside a
/// message).
pub fn stream_drop_reason(status: &Status) -> &'static str {
    use tonic::Code;
    let transport = status.message().starts_with("h2 protocol error")
        || status.message().starts_with("Unexpected EOF");
    match status.code() {
        Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument => "malformed",
        Code::Internal if !transport => "malformed",
        _ => "disconnected",
    }
}

/// Serves the Trainer and Health services on `listener`, every call token-checked,
/// with Tandem's message limits and transport settings, over TLS when `creds` hold a
/// certificate.
pub async fn serve(
    svc: TrainerService,
    listener: tokio::net::TcpListener,
    creds: &tandem_proto::auth::Credentials,
) -> Result<(), String> {
    use tandem_proto::v1::health_server::HealthServer;
    use tandem_proto::v1::trainer_server::TrainerServer;
    use tandem_proto::MAX_MESSAGE_BYTES;
    tandem_proto::server(creds)?
        .add_service(HealthServer::with_interceptor(
            tandem_proto::health::HealthService { service: "trainer" },
            creds.require_token(),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            TrainerServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            creds.require_token(),
        ))
        .serve_with_incoming(tandem_proto::incoming(listener))
        .await
        .map_err(|e| tandem_proto::error_chain(&e))
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    type PushRolloutsStream = AckStream;
    type FetchWeightsStream = BucketStream;

    async fn push_rollouts(
        &self,
        req: Request<Streaming<RolloutGroup>>,
    ) -> Result<Response<AckStream>, Status> {
        let caller = req.extensions().get::<Caller>().copied();
        let mut incoming = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(msg) = incoming.next().await {
                let ack = match msg {
                    Ok(g) => Ok(this.ingest(g, caller).await),
                    Err(status) => {
                        let reason = stream_drop_reason(&status);
                        tracing::warn!(
                            reason,
                            error = %tandem_proto::limits::printable(status.message()),
                            "a rollout stream ended in an error"
                        );
                        this.shared.count_dropped(reason);
                        Err(status)
                    }
                };
                let stop = ack.is_err();
                if tx.send(ack).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_weights(
        &self,
        req: Request<FetchWeightsRequest>,
    ) -> Result<Response<BucketStream>, Status> {
        let want = req.into_inner().version;
        let snap = self
            .shared
            .weights
            .read()
            .map_err(|_| Status::internal("weights lock poisoned"))?
            .clone();
        if want > snap.version {
            return Err(Status::invalid_argument(format!(
                "version: {want} is not published yet (newest {})",
                snap.version
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let bucket_bytes = self.shared.bucket_bytes;
        tokio::spawn(async move {
            let crcs = snap.checksums(bucket_bytes);
            for (i, &crc) in crcs.iter().enumerate() {
                let b = tandem_weights::bucket::bucket(
                    snap.version,
                    snap.dtype,
                    snap.base,
                    &snap.bytes,
                    bucket_bytes,
                    i,
                    crc,
                );
                if tx.send(Ok(b)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::stream_drop_reason;

    #[test]
    fn a_cut_stream_is_disconnected_and_undecodable_bytes_malformed() {
        let reason = |code, msg: &str| stream_drop_reason(&Status::new(code, msg));
        // What tonic reports for a peer that died or a connection that was reset.
        assert_eq!(
            reason(
                Code::Unknown,
                "h2 protocol error: error reading a body from connection"
            ),
            "disconnected"
        );
        assert_eq!(
            reason(Code::Internal, "h2 protocol error: stream error received"),
            "disconnected"
        );
        assert_eq!(
            reason(Code::Internal, "Unexpected EOF decoding stream."),
            "disconnected"
        );
        assert_eq!(
            reason(Code::Unavailable, "keep-alive timed out"),
            "disconnected"
        );
        assert_eq!(
            reason(Code::Cancelled, "operation was canceled"),
            "disconnected"
        );
        // What it reports for bytes that are not a message.
        assert_eq!(
            reason(
                Code::Internal,
                "failed to decode Protobuf message: invalid wire type"
            ),
            "malformed"
        );
        assert_eq!(
            reason(
                Code::Internal,
                "protocol error: received message with invalid compression flag: 7"
            ),
            "malformed"
        );
        assert_eq!(
            reason(Code::OutOfRange, "Error, decoded message length too large"),
            "malformed"
        );
    }
}
