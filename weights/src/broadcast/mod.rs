//! Weight broadcast from the trainer (rank 0) to the generators of the broadcast group.
//! The coordinator decides who is in the group, with which rank, per epoch
//! (`tandem_coordinator::group`); this module moves one version to every member.
//!
//! Control plane: a TCP star. Each member connects to the trainer's broadcast listener
//! and says hello (epoch, rank, worker id, the token it holds and its worker's session
//! token, which ties the connection to that registered worker). For each version the
//! trainer sends every member of the current epoch a header and the weights, and waits
//! for each member's acknowledgement, all within one deadline. A member that has not
//! joined by then, stalls or fails is named in the [`Outcome`] with the reason; the
//! trainer asks the coordinator to exclude it (a new epoch without it) and it fetches
//! weights over gRPC from then on. A generator whose broadcast does not arrive in time
//! fetches that version over gRPC too, so a stalled broadcast never stalls generation.
//!
//! Data plane, per version: either the same connection carries the bytes ("tcp": one
//! copy per member, checked per bucket with the snapshot's CRC-32s, no codec), or one
//! collective call does ([`crate::collective`]: NCCL between GPUs). The collective is
//! used when the broadcaster has a backend and every member of the epoch joined with
//! one; rank 0 makes the epoch's unique id and hands it out in the welcome. Each member
//! says it is ready once it has the header, then joins the collective receive. When the
//! collective fails (its deadline aborts it on every rank), members that never said
//! ready are named as stalled and excluded; members that were ready only miss that
//! version (they fetch it over gRPC) and the rest of the epoch goes over TCP, where a
//! member that hangs is named by its own connection.
//!
//! [`frame`] holds the frames, [`sender`] the trainer's side, [`receiver`] a member's.

mod frame;
mod receiver;
mod sender;
#[cfg(test)]
mod tests;

pub use receiver::{Join, Received, Receiver};
pub use sender::{Access, Broadcaster, Outcome, HELLO_TIMEOUT, MAX_PENDING};
