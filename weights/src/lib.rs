//! `tandem-weights`: how a policy version travels from the trainer to the generators.
//! The trainer and the generators both use it; it depends only on `tandem-model` (the
//! parameters' bytes) and `tandem-proto` (the wire messages).
//!
//! - [`snapshot`] — a published version as bytes in the model's parameter order (a
//!   full model's, or a LoRA adapter's with the base it applies to), and the check
//!   that a receiver's model is of the version's kind
//! - [`bucket`] — CRC-32-checked slices of those bytes for the gRPC fetch, and the
//!   [`bucket::Assembler`] that verifies order, size and checksums
//! - [`broadcast`] — the push to every member of the broadcast group (frames, the
//!   trainer's [`broadcast::Broadcaster`], a member's [`broadcast::Receiver`])
//! - [`collective`] — the collective data plane's interface with NCCL's semantics and
//!   the in-process stand-in the orchestration's tests run on; `nccl` (feature `nccl`)
//!   is NCCL itself
//! - [`plane`] — `[trainer] broadcast` and the backend a process runs for it
//!
//! Unsafe code lives only in `nccl` (the FFI calls into NCCL and CUDA), allowed by name
//! below; each block's `SAFETY:` comment says why it holds.
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod broadcast;
pub mod bucket;
pub mod collective;
pub mod error;
#[cfg(feature = "nccl")]
#[allow(unsafe_code)]
pub mod nccl;
pub mod plane;
pub mod snapshot;

pub use error::{Error, Result};
pub use plane::BroadcastPlane;
pub use snapshot::{check_base, BaseMismatch, Snapshot};
