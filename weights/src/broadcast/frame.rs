//! The broadcast's frames on its TCP connections, and their encoders.
//!
//! Frames (little-endian):
//! - hello `TNDH` epoch:u64 rank:u32 world_size:u32 worker_id:u64 collective:u8
//!   token_len:u16 token session_len:u8 session (the worker's session token, which
//!   binds the connection to `worker_id`)
//! - welcome `TNDW` ok:u8 len:u16 message id_len:u16 id (the epoch's collective id,
//!   empty for none)
//! - version `TNDV` epoch:u64 version:u64 plane:u8 (0 = bytes follow, 1 = collective)
//!   dtype_len:u8 dtype adapter:u8 (0 = a full model's parameters, 1 = a LoRA
//!   adapter's A and B only) base:u64 (with adapter = 1 the fingerprint of the frozen
//!   base they apply to, else 0) bucket_bytes:u64 n:u32 crc:u32×n len:u64 [bytes]
//! - ready `TNDR` version:u64 0:u8 (collective plane: the header arrived)
//! - ack `TNDA` version:u64 status:u8 (0 = intact, 1 = a checksum differed, 2 = the
//!   collective receive failed)
//!
//! Every length read is bounded before anything is allocated for it: the hello's token
//! and session by `tandem_proto::limits::{TOKEN_BYTES, SESSION_TOKEN_BYTES}`, a
//! version's dtype by `DTYPE_BYTES`, its kind and base by what the member's model is,
//! its bytes by what the member's model holds (see [`super::receiver`]).

use std::io::Read;

use crate::snapshot::Snapshot;

pub(super) const HELLO: &[u8; 4] = b"TNDH";
pub(super) const WELCOME: &[u8; 4] = b"TNDW";
pub(super) const VERSION: &[u8; 4] = b"TNDV";
pub(super) const READY: &[u8; 4] = b"TNDR";
pub(super) const ACK: &[u8; 4] = b"TNDA";
/// `plane` in a version frame.
pub(super) const INLINE: u8 = 0;
pub(super) const COLLECTIVE: u8 = 1;
/// `adapter` in a version frame.
pub(super) const FULL: u8 = 0;
pub(super) const ADAPTER: u8 = 1;
/// `status` in an acknowledgement.
pub(super) const INTACT: u8 = 0;
pub(super) const CHECKSUM_DIFFERED: u8 = 1;
pub(super) const COLLECTIVE_FAILED: u8 = 2;

/// A member's hello: who it is in which epoch, whether it has a collective backend,
/// the token it holds and its session token (each cut to its limit).
pub(super) fn hello(
    epoch: u64,
    rank: u32,
    world_size: u32,
    worker_id: u64,
    collective: bool,
    token: &str,
    session: &str,
) -> Vec<u8> {
    use tandem_proto::limits::{SESSION_TOKEN_BYTES, TOKEN_BYTES};
    let token = &token.as_bytes()[..token.len().min(TOKEN_BYTES)];
    let session = &session.as_bytes()[..session.len().min(SESSION_TOKEN_BYTES)];
    let mut f = Vec::with_capacity(32 + token.len() + session.len());
    f.extend_from_slice(HELLO);
    f.extend_from_slice(&epoch.to_le_bytes());
    f.extend_from_slice(&rank.to_le_bytes());
    f.extend_from_slice(&world_size.to_le_bytes());
    f.extend_from_slice(&worker_id.to_le_bytes());
    f.push(collective as u8);
    f.extend_from_slice(&(token.len() as u16).to_le_bytes());
    f.extend_from_slice(token);
    f.push(session.len() as u8);
    f.extend_from_slice(session);
    f
}

/// The trainer's answer to a hello: accepted or not (with why), and the epoch's
/// collective id (empty for none).
pub(super) fn welcome(ok: bool, message: &[u8], id: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(9 + message.len() + id.len());
    f.extend_from_slice(WELCOME);
    f.push(ok as u8);
    f.extend_from_slice(&(message.len() as u16).to_le_bytes());
    f.extend_from_slice(message);
    f.extend_from_slice(&(id.len() as u16).to_le_bytes());
    f.extend_from_slice(id);
    f
}

/// A version's header: its epoch, version, plane, dtype, kind and base, bucket size,
/// the buckets' CRC-32s and its length (the bytes follow on the inline plane).
pub(super) fn header(
    epoch: u64,
    snap: &Snapshot,
    bucket_bytes: usize,
    collective: bool,
) -> Vec<u8> {
    let sums = snap.checksums(bucket_bytes);
    let mut h = Vec::with_capacity(58 + 4 * sums.len());
    h.extend_from_slice(VERSION);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&snap.version.to_le_bytes());
    h.push(if collective { COLLECTIVE } else { INLINE });
    h.push(snap.dtype.len() as u8);
    h.extend_from_slice(snap.dtype.as_bytes());
    h.push(if snap.base.is_some() { ADAPTER } else { FULL });
    h.extend_from_slice(&snap.base.unwrap_or(0).to_le_bytes());
    h.extend_from_slice(&(bucket_bytes as u64).to_le_bytes());
    h.extend_from_slice(&(sums.len() as u32).to_le_bytes());
    for c in sums {
        h.extend_from_slice(&c.to_le_bytes());
    }
    h.extend_from_slice(&(snap.bytes.len() as u64).to_le_bytes());
    h
}

/// A ready or acknowledgement frame.
pub(super) fn reply(kind: &[u8; 4], version: u64, status: u8) -> [u8; 13] {
    let mut f = [0u8; 13];
    f[..4].copy_from_slice(kind);
    f[4..12].copy_from_slice(&version.to_le_bytes());
    f[12] = status;
    f
}

/// Reads exactly `N` bytes.
pub(super) fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}
