//! A generator's leases: asking the coordinator for prompt groups (ahead of the engine,
//! within its admission), giving back a lease whose group cannot be trained, and
//! leaving at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_env::Task;
use tandem_model::ChatMessage;
use tandem_proto::client::{self, Authed};
use tandem_proto::limits::Check;
use tandem_proto::retry;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{GroupFailure, LeaseRequest, LeaveRequest, PromptLease, ReleaseRequest};
use tokio::runtime::Handle;

use crate::error::{rpc, Result};
use crate::heartbeat::Beat;

/// The calls a generator makes about its leases. Cheap to clone: the sampler leases,
/// the scorer gives leases back.
#[derive(Clone)]
pub(crate) struct LeaseClient {
    coordinator: CoordinatorClient<Authed>,
    rt: Handle,
    /// This worker's id.
    beat: Arc<Beat>,
}

/// What a lease call gave.
pub(crate) enum Leased {
    /// The run is over.
    Stop,
    /// Leases admitted under `version`: their groups are sampled with it or newer.
    Granted {
        version: u64,
        leases: Vec<PromptLease>,
    },
    /// None now; ask again after this.
    Wait(Duration),
}

impl LeaseClient {
    pub fn new(coordinator: CoordinatorClient<Authed>, rt: Handle, beat: Arc<Beat>) -> Self {
        LeaseClient {
            coordinator,
            rt,
            beat,
        }
    }

    /// Up to `max_groups` leases. Retried through a coordinator restart; a retry carries
    /// the same request id, so a lost reply loses no lease. `retry_unknown`: how long
    /// to wait when the coordinator does not know this worker (it registers again with
    /// its next heartbeat).
    pub fn lease(&self, max_groups: u32, retry_unknown: Duration) -> Result<Leased> {
        let req = LeaseRequest {
            worker_id: self.beat.worker_id(),
            max_groups,
            request_id: retry::request_id(),
        };
        let coordinator = &self.coordinator;
        let reply = self.rt.block_on(retry::retry("leasing prompts", || {
            let (mut c, req) = (coordinator.clone(), req);
            async move { c.lease(client::unary(req)).await }
        }));
        match reply {
            Ok(r) => {
                let r = r.into_inner();
                Ok(if r.stop {
                    Leased::Stop
                } else if r.leases.is_empty() {
                    Leased::Wait(Duration::from_millis(r.retry_after_ms.clamp(5, 1000)))
                } else {
                    // A lease's info goes on to the reward service, the environment and
                    // agents: bounded and an object (the coordinator's dataset refused
                    // any other when it was loaded).
                    for l in &r.leases {
                        l.check().map_err(|e| {
                            crate::error::invalid(format!(
                                "the coordinator's lease {} (prompt {}): {e}",
                                l.lease_id, l.prompt_index
                            ))
                        })?;
                    }
                    Leased::Granted {
                        version: r.policy_version,
                        leases: r.leases,
                    }
                })
            }
            Err(e) if e.code() == tonic::Code::NotFound => Ok(Leased::Wait(retry_unknown)),
            Err(e) => Err(rpc("leasing prompts", client::describe(&e))),
        }
    }

    /// Gives lease `l` back to the coordinator (its prompt is re-issued at once), its
    /// group failed by `failure`; when that fails, the lease expires with the lease
    /// timeout instead.
    pub fn release(&self, l: &PromptLease, why: &str, failure: GroupFailure) {
        tracing::warn!(
            lease = l.lease_id,
            "{}: giving the lease back",
            tandem_proto::limits::printable(why)
        );
        let req = ReleaseRequest {
            worker_id: self.beat.worker_id(),
            lease_id: l.lease_id,
            // The coordinator takes a reason of REASON_BYTES at most.
            reason: tandem_proto::limits::cut(why, tandem_proto::limits::REASON_BYTES).to_string(),
            failure: failure.into(),
        };
        let coordinator = &self.coordinator;
        if let Err(e) = self.rt.block_on(retry::retry("giving a lease back", || {
            let (mut c, req) = (coordinator.clone(), req.clone());
            async move { c.release(client::unary(req)).await }
        })) {
            tracing::warn!(
                lease = l.lease_id,
                "could not give the lease back: {}",
                client::describe(&e)
            );
        }
    }

    /// Tells the coordinator this worker leaves (its open leases are re-issued).
    pub fn leave(&self) {
        let req = LeaveRequest {
            worker_id: self.beat.worker_id(),
        };
        let mut c = self.coordinator.clone();
        let _ = self.rt.block_on(c.leave(client::unary(req)));
    }
}

/// When the sampler asks for leases, and the leases that wait for the engine to drain.
pub(crate) struct Leasing {
    client: LeaseClient,
    /// No lease call before this.
    next: Instant,
    /// Leased under a version newer than the weights held while rows still run
    /// (`between_batches`): started once the engine drains and the weights change.
    deferred: Option<(u64, Vec<PromptLease>)>,
    /// How long to wait when the coordinator does not know this worker.
    retry_unknown: Duration,
}

impl Leasing {
    pub fn new(client: LeaseClient, retry_unknown: Duration) -> Self {
        Leasing {
            client,
            next: Instant::now(),
            deferred: None,
            retry_unknown,
        }
    }

    /// Leases for `ahead − waiting` more groups, when fewer than `ahead` wait, none are
    /// deferred and the coordinator's last `retry_after` has passed; `None` when not
    /// asked or none were granted.
    pub fn poll(&mut self, waiting: usize, ahead: usize) -> Result<Option<Leased>> {
        if self.deferred.is_some() || waiting >= ahead || Instant::now() < self.next {
            return Ok(None);
        }
        match self
            .client
            .lease((ahead - waiting) as u32, self.retry_unknown)?
        {
            Leased::Wait(d) => {
                self.next = Instant::now() + d;
                Ok(None)
            }
            other => Ok(Some(other)),
        }
    }

    /// Keeps leases admitted under `version` until the engine drains.
    pub fn defer(&mut self, version: u64, leases: Vec<PromptLease>) {
        self.deferred = Some((version, leases));
    }

    /// The deferred leases, when `drained`.
    pub fn take_deferred(&mut self, drained: bool) -> Option<(u64, Vec<PromptLease>)> {
        self.deferred.take_if(|_| drained)
    }

    /// Tells the coordinator this worker leaves.
    pub fn leave(&self) {
        self.client.leave();
    }

    /// How long until the next lease call may be made.
    pub fn until_next(&self) -> Duration {
        self.next.saturating_duration_since(Instant::now())
    }
}

/// Lease `l`'s prompt as the environment sees it; its group is named by the lease id.
pub(crate) fn task(l: &PromptLease) -> Task {
    Task {
        id: l.lease_id,
        prompt_index: l.prompt_index,
        text: l.text.clone(),
        messages: l
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect(),
        answer: l.answer.clone(),
        info_json: l.info_json.clone(),
    }
}
