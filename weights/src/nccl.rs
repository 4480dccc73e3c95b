//! NCCL as the weight broadcast's collective data plane (feature `nccl`): one
//! `ncclBroadcast` per version from the trainer's GPU (rank 0) to every member's GPU,
//! over NVLink or the network as NCCL chooses.
//!
//! Communicators are non-blocking (`ncclConfig_t.blocking = 0`), so no call can hang the
//! process: joining and each broadcast are polled (`ncclCommGetAsyncError`, then an event
//! on the stream) until they finish or the deadline passes, when `ncclCommAbort` ends
//! them on this rank and, by the broken connections, on the others. This is the
//! watchdog that makes a stalled member a timeout instead of a hung trainer.
//!
//! The bytes are staged through one device buffer per communicator (host → device on
//! rank 0, device → host on members), because the snapshot and the generators' weight
//! loading work on host bytes; the buffer is kept across versions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};

use crate::collective::{Backend, Collective};

/// Makes NCCL communicators on one GPU, each on its own stream.
pub struct NcclBackend {
    stream: Arc<CudaStream>,
}

impl NcclBackend {
    /// Uses the GPU of `device` (the process's model device).
    pub fn new(device: &candle_core::Device) -> Result<Self, String> {
        let candle_core::Device::Cuda(cuda) = device else {
            return Err("NCCL needs a CUDA device (TANDEM_DEVICE=cuda)".into());
        };
        let stream = cuda
            .cuda_stream()
            .context()
            .new_stream()
            .map_err(|e| format!("a CUDA stream for NCCL: {e}"))?;
        let version = result::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e))?;
        tracing::info!(
            nccl_version = version,
            "NCCL loaded for the weight broadcast"
        );
        Ok(NcclBackend { stream })
    }
}

fn nccl_error(what: &str, e: result::NcclError) -> String {
    format!("{what}: {:?}", e.0)
}

/// `NCCL_VERSION(2, 28, 0)`: the layout of cudarc's `ncclConfig_v22800`, which
/// `ncclConfig_t` is in the bindings this build uses. A newer library reads a config by
/// its `size` and `version`, so it takes this one as a 2.28 config.
const CONFIG_VERSION: u32 = 22800;

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every other field undefined (NCCL's
/// defaults).
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    // SAFETY: `ncclConfig_t` is a plain C struct of integers and raw pointers, for
    // which all-zero bytes are a valid value (zero integers, null pointers); the fields
    // NCCL reads are set below.
    let mut c: sys::ncclConfig_t = unsafe { std::mem::zeroed() };
    c.size = std::mem::size_of::<sys::ncclConfig_t>();
    c.magic = 0xcafe_beef;
    c.version = CONFIG_VERSION;
    c.blocking = 0;
    c.cgaClusterSize = UNDEF;
    c.minCTAs = UNDEF;
    c.maxCTAs = UNDEF;
    c.splitShare = UNDEF;
    c.trafficClass = UNDEF;
    c.collnetEnable = UNDEF;
    c.CTAPolicy = UNDEF;
    c.shrinkShare = UNDEF;
    c.nvlsCTAs = UNDEF;
    c.nChannelsPerNetPeer = UNDEF;
    c.nvlinkCentricSched = UNDEF;
    c.graphUsageMode = UNDEF;
    c.numRmaCtx = UNDEF;
    c.maxP2pPeers = UNDEF;
    c
}

impl Backend for NcclBackend {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn new_id(&self) -> Result<Vec<u8>, String> {
        let id = result::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        Ok(id.internal.iter().map(|&c| c as u8).collect())
    }

    fn join(&self, id: &[u8], rank: u32, world_size: u32) -> Result<Box<dyn Collective>, String> {
        let mut unique = sys::ncclUniqueId { internal: [0; 128] };
        if id.len() != unique.internal.len() {
            return Err(format!(
                "an NCCL unique id has {} bytes, this one {}",
                unique.internal.len(),
                id.len()
            ));
        }
        for (d, &s) in unique.internal.iter_mut().zip(id) {
            *d = s as _;
        }
        let (Ok(nranks), Ok(rank_i32)) = (i32::try_from(world_size), i32::try_from(rank)) else {
            return Err(format!(
                "an NCCL communicator of {world_size} ranks (this one {rank}): NCCL counts ranks in an i32"
            ));
        };
        let mut config = nonblocking_config();
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e}"))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are live locals for the whole call (NCCL writes the
        // handle into `comm` and copies the config before returning); non-blocking init
        // returns at once (ncclInProgress) and the communicator is polled (`formed`)
        // before any other use.
        unsafe { result::comm_init_rank_config(&mut comm, nranks, unique, rank_i32, &mut config) }
            .map_err(|e| nccl_error("ncclCommInitRankConfig", e))?;
        Ok(Box::new(NcclComm {
            comm,
            stream: self.stream.clone(),
            rank,
            ready: false,
            aborted: false,
            buf: None,
        }))
    }
}

/// One rank's non-blocking communicator.
struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: u32,
    /// Initialisation finished.
    ready: bool,
    aborted: bool,
    buf: Option<CudaSlice<u8>>,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time (NCCL's
// thread-safety rule), and every call on `comm` goes through `&mut self` (or `&self`
// borrowed from it), so moving an `NcclComm` to another thread never shares it.
unsafe impl Send for NcclComm {}

impl NcclComm {
    fn abort(&mut self) {
        if !self.aborted {
            self.aborted = true;
            // SAFETY: `comm` came from a successful ncclCommInitRankConfig (`join` returns
            // no `NcclComm` otherwise) and the `aborted` flag makes this the only abort;
            // nothing uses `comm` after it (`formed` refuses an aborted communicator).
            if let Err(e) = unsafe { result::comm_abort(self.comm) } {
                tracing::warn!("ncclCommAbort: {:?}", e.0);
            }
        }
    }

    /// The communicator's state: Ok(true) finished, Ok(false) still in progress.
    fn state(&self) -> Result<bool, String> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is live: `state` runs only from `formed` and `broadcast`, after
        // `formed` refused an aborted communicator, and `poll` returns as soon as it
        // aborts; `state` is a live local, a valid out pointer.
        unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) }
            .result()
            .map_err(|e| nccl_error("ncclCommGetAsyncError", e))?;
        match state {
            sys::ncclResult_t::ncclSuccess => Ok(true),
            sys::ncclResult_t::ncclInProgress => Ok(false),
            other => Err(format!("asynchronous error {other:?}")),
        }
    }

    /// Polls until `done` or `deadline`; aborts the communicator on either failure.
    fn poll(
        &mut self,
        what: &str,
        deadline: Instant,
        mut done: impl FnMut(&Self) -> Result<bool, String>,
    ) -> Result<(), String> {
        loop {
            match done(self) {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Ok(false) => {
                    self.abort();
                    return Err(format!("timed out: {what} did not finish by the deadline"));
                }
                Err(e) => {
                    self.abort();
                    return Err(format!("{what}: {e}"));
                }
            }
        }
    }

    /// Waits for the communicator to form (every rank joined).
    fn formed(&mut self, deadline: Instant) -> Result<(), String> {
        if self.aborted {
            return Err("the communicator was aborted".into());
        }
        // NCCL and the copies act on the thread's current CUDA context.
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e}"))?;
        if !self.ready {
            self.poll("joining the communicator", deadline, Self::state)?;
            self.ready = true;
        }
        Ok(())
    }

    fn buffer(&mut self, len: usize) -> Result<&mut CudaSlice<u8>, String> {
        if self.buf.as_ref().is_none_or(|b| b.len() != len) {
            self.buf = None;
            // SAFETY: the allocation is uninitialised device memory; every byte is written
            // (the host copy on rank 0, the broadcast on members) before it is read.
            let b = unsafe { self.stream.alloc::<u8>(len) }
                .map_err(|e| format!("allocating {len} bytes on the GPU: {e}"))?;
            self.buf = Some(b);
        }
        self.buf.as_mut().ok_or_else(|| "no buffer".to_string())
    }

    /// `ncclBroadcast` in place on the staging buffer, polled to completion.
    fn broadcast(&mut self, len: usize, deadline: Instant) -> Result<(), String> {
        let (comm, stream) = (self.comm, self.stream.clone());
        let buf = self.buffer(len)?;
        let (ptr, sync) = buf.device_ptr_mut(&stream);
        // SAFETY: `ptr` points at the staging buffer's `len` device bytes (`buffer(len)`
        // sized it), used on `stream`; the buffer stays in `self.buf` until a later call
        // of another length frees it, stream-ordered after this broadcast (polled to
        // completion below, or aborted); `comm` is live (`formed` ran first).
        let enqueued = unsafe {
            result::broadcast(
                ptr as *const _,
                ptr as *mut _,
                len,
                sys::ncclDataType_t::ncclUint8,
                0,
                comm,
                stream.cu_stream() as _,
            )
        };
        drop(sync);
        if let Err(e) = enqueued {
            self.abort();
            return Err(nccl_error("ncclBroadcast", e));
        }
        // Non-blocking: the enqueue itself may still be in progress.
        self.poll("enqueueing the broadcast", deadline, Self::state)?;
        let event = stream
            .record_event(None)
            .map_err(|e| format!("recording a CUDA event: {e}"))?;
        self.poll("the broadcast", deadline, |c| {
            c.state()?;
            Ok(event.is_complete())
        })
    }
}

impl Collective for NcclComm {
    fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), String> {
        if self.rank != 0 {
            return Err(format!("rank {} cannot send", self.rank));
        }
        self.formed(deadline)?;
        let stream = self.stream.clone();
        let buf = self.buffer(bytes.len())?;
        stream
            .memcpy_htod(bytes, buf)
            .map_err(|e| format!("copying v to the GPU: {e}"))?;
        self.broadcast(bytes.len(), deadline)
    }

    fn recv(&mut self, out: &mut [u8], deadline: Instant) -> Result<(), String> {
        if self.rank == 0 {
            return Err("rank 0 cannot receive".into());
        }
        self.formed(deadline)?;
        self.broadcast(out.len(), deadline)?;
        let stream = self.stream.clone();
        let buf = self.buffer(out.len())?;
        stream
            .memcpy_dtoh(&*buf, out)
            .and_then(|_| stream.synchronize())
            .map_err(|e| format!("copying the broadcast from the GPU: {e}"))
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // A finished communicator is released the same way as a failed one: abort
        // frees it without waiting on peers that may be gone.
        self.abort();
    }
}
