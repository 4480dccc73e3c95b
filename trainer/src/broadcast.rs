//! Weight broadcast from the trainer (rank 0) to the generators of the broadcast group.
//! The coordinator decides who is in the group, with which rank, per epoch
//! (`tandem_coordinator::group`); this module moves one version to every member.
//!
//! Control plane: a TCP star. Each member connects to the trainer's broadcast listener
//! and says hello (epoch, rank, worker id, the run's token). For each version the
//! trainer sends every member of the current epoch a header and the weights, and waits
//! for each member's acknowledgement, all within one deadline. A member that has not
//! joined by then, stalls or fails is named in the [`Outcome`] with the reason; the
//! trainer asks the coordinator to exclude it (a new epoch without it) and it fetches
//! weights over gRPC from then on. A generator whose broadcast does not arrive in time
//! fetches that version over gRPC too, so a stalled broadcast never stalls generation.
//!
//! Data plane: the same connection carries the bytes (checked per bucket with the
//! snapshot's CRC-32s). This is the CPU reference of the protocol, and with one copy
//! per receiver it needs no codec. With NCCL (the `nccl` feature, between GPUs) the
//! header and the acknowledgements stay here and the bytes go through `ncclBroadcast`
//! on the epoch's communicator.
//!
//! Frames (little-endian):
//! - hello `TNDH` epoch:u64 rank:u32 worker_id:u64 token_len:u16 token
//! - welcome `TNDW` ok:u8 len:u16 message
//! - version `TNDV` epoch:u64 version:u64 dtype_len:u8 dtype bucket_bytes:u64
//!   n:u32 crc:u32×n len:u64 bytes
//! - ack `TNDA` version:u64 status:u8 (0 = intact, 1 = a checksum differed)

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::v1::{BroadcastGroup, GroupMember};

use crate::error::{invalid, Result};
use crate::service::Snapshot;

const HELLO: &[u8; 4] = b"TNDH";
const WELCOME: &[u8; 4] = b"TNDW";
const VERSION: &[u8; 4] = b"TNDV";
const ACK: &[u8; 4] = b"TNDA";
/// Bytes written between deadline checks.
const CHUNK: usize = 1 << 20;
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

struct Peer {
    epoch: u64,
    rank: u32,
    stream: TcpStream,
}

/// The trainer's side: a listener that members join, and [`Broadcaster::send`].
pub struct Broadcaster {
    addr: SocketAddr,
    /// Joined members by worker id (a member that joins again replaces itself).
    peers: Arc<Mutex<BTreeMap<u64, Peer>>>,
}

/// What one broadcast did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub delivered: Vec<GroupMember>,
    /// Members that had not joined, stalled past the deadline or failed, and why.
    pub failed: Vec<(GroupMember, String)>,
    pub seconds: f64,
}

impl Outcome {
    /// "gen-3 (rank 2): no acknowledgement …; gen-5 (rank 4): …".
    pub fn describe_failures(&self) -> String {
        self.failed
            .iter()
            .map(|(m, why)| format!("{} (rank {}): {why}", m.name, m.rank))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Broadcaster {
    /// Listens on `listen` (port 0 = any) and accepts members that present `token`.
    pub fn bind(listen: &str, token: &str) -> Result<Self> {
        let listener = TcpListener::bind(listen).map_err(|e| {
            invalid(format!(
                "broadcast listener: cannot listen on {listen}: {e}"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| invalid(format!("broadcast listener: {e}")))?;
        let peers: Arc<Mutex<BTreeMap<u64, Peer>>> = Arc::default();
        let (joined, token) = (peers.clone(), token.as_bytes().to_vec());
        std::thread::Builder::new()
            .name("broadcast-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(stream) = conn else { continue };
                    let (joined, token) = (joined.clone(), token.clone());
                    // A slow hello must not hold up the next member.
                    std::thread::spawn(move || {
                        if let Err(e) = welcome(stream, &token, &joined) {
                            tracing::warn!("broadcast: a member was refused: {e}");
                        }
                    });
                }
            })
            .map_err(|e| invalid(format!("broadcast listener thread: {e}")))?;
        Ok(Broadcaster { addr, peers })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `snap` to every member of `group` and waits for their acknowledgements
    /// within `timeout`, after waiting up to `join_wait` for members that have not
    /// joined the group's epoch yet.
    pub fn send(
        &self,
        group: &BroadcastGroup,
        snap: &Snapshot,
        bucket_bytes: usize,
        join_wait: Duration,
        timeout: Duration,
    ) -> Outcome {
        let t0 = Instant::now();
        let join_deadline = t0 + join_wait;
        let joined = |m: &GroupMember, peers: &BTreeMap<u64, Peer>| {
            peers
                .get(&m.worker_id)
                .is_some_and(|p| p.epoch == group.epoch && p.rank == m.rank)
        };
        // Members of a new epoch connect after they learn it from a heartbeat.
        while Instant::now() < join_deadline {
            let all = self
                .peers
                .lock()
                .map(|p| group.members.iter().all(|m| joined(m, &p)))
                .unwrap_or(false);
            if all {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut out = Outcome::default();
        let mut sending = Vec::new();
        if let Ok(mut peers) = self.peers.lock() {
            for m in &group.members {
                if joined(m, &peers) {
                    if let Some(p) = peers.remove(&m.worker_id) {
                        sending.push((m.clone(), p));
                    }
                } else {
                    out.failed.push((
                        m.clone(),
                        format!(
                            "did not join epoch {} within {:.1} s",
                            group.epoch,
                            join_wait.as_secs_f64()
                        ),
                    ));
                }
            }
        }
        let header = header(group.epoch, snap, bucket_bytes);
        let deadline = Instant::now() + timeout;
        let results: Vec<(GroupMember, Peer, std::result::Result<(), String>)> =
            std::thread::scope(|s| {
                let handles: Vec<_> = sending
                    .into_iter()
                    .map(|(m, mut p)| {
                        let (header, bytes) = (&header, &snap.bytes[..]);
                        s.spawn(move || {
                            let r = send_one(&mut p.stream, header, bytes, snap.version, deadline);
                            (m, p, r)
                        })
                    })
                    .collect();
                handles.into_iter().filter_map(|h| h.join().ok()).collect()
            });
        for (m, p, r) in results {
            match r {
                Ok(()) => {
                    if let Ok(mut peers) = self.peers.lock() {
                        // Unless the member joined again meanwhile.
                        peers.entry(m.worker_id).or_insert(p);
                    }
                    out.delivered.push(m);
                }
                Err(why) => out.failed.push((m, why)),
            }
        }
        out.seconds = t0.elapsed().as_secs_f64();
        out
    }
}

/// Reads a member's hello, checks its token and keeps its connection.
fn welcome(
    mut stream: TcpStream,
    token: &[u8],
    joined: &Mutex<BTreeMap<u64, Peer>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let magic: [u8; 4] = read_array(&mut stream)?;
    if &magic != HELLO {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a hello"));
    }
    let epoch = u64::from_le_bytes(read_array(&mut stream)?);
    let rank = u32::from_le_bytes(read_array(&mut stream)?);
    let worker_id = u64::from_le_bytes(read_array(&mut stream)?);
    let len = u16::from_le_bytes(read_array(&mut stream)?) as usize;
    let mut presented = vec![0u8; len];
    stream.read_exact(&mut presented)?;
    let ok = tandem_proto::auth::constant_time_eq(&presented, token);
    let message: &[u8] = if ok { b"" } else { b"token refused" };
    stream.write_all(WELCOME)?;
    stream.write_all(&[ok as u8])?;
    stream.write_all(&(message.len() as u16).to_le_bytes())?;
    stream.write_all(message)?;
    if !ok {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!("worker {worker_id} (rank {rank}) presented a wrong token"),
        ));
    }
    stream.set_read_timeout(None)?;
    stream.set_nodelay(true)?;
    if let Ok(mut peers) = joined.lock() {
        peers.insert(
            worker_id,
            Peer {
                epoch,
                rank,
                stream,
            },
        );
    }
    tracing::debug!(worker_id, epoch, rank, "broadcast member joined");
    Ok(())
}

fn header(epoch: u64, snap: &Snapshot, bucket_bytes: usize) -> Vec<u8> {
    let sums = snap.checksums(bucket_bytes);
    let mut h = Vec::with_capacity(48 + 4 * sums.len());
    h.extend_from_slice(VERSION);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&snap.version.to_le_bytes());
    h.push(snap.dtype.len() as u8);
    h.extend_from_slice(snap.dtype.as_bytes());
    h.extend_from_slice(&(bucket_bytes as u64).to_le_bytes());
    h.extend_from_slice(&(sums.len() as u32).to_le_bytes());
    for c in sums {
        h.extend_from_slice(&c.to_le_bytes());
    }
    h.extend_from_slice(&(snap.bytes.len() as u64).to_le_bytes());
    h
}

/// Writes one version to one member and reads its acknowledgement by `deadline`.
fn send_one(
    stream: &mut TcpStream,
    header: &[u8],
    bytes: &[u8],
    version: u64,
    deadline: Instant,
) -> std::result::Result<(), String> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let stalled = |what: String| format!("stalled: {what} by the deadline");
    let mut sent = 0usize;
    for chunk in std::iter::once(header).chain(bytes.chunks(CHUNK)) {
        if left().is_zero() {
            return Err(stalled(format!(
                "took {sent} of {} bytes of v{version}",
                header.len() + bytes.len()
            )));
        }
        stream
            .set_write_timeout(Some(left()))
            .and_then(|_| stream.write_all(chunk))
            .map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => stalled(format!(
                    "took {sent} of {} bytes of v{version}",
                    header.len() + bytes.len()
                )),
                _ => format!("connection failed while sending v{version}: {e}"),
            })?;
        sent += chunk.len();
    }
    let ack = stream
        .set_read_timeout(Some(left().max(Duration::from_millis(1))))
        .and_then(|_| read_array::<13>(stream))
        .map_err(|e| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                stalled(format!("sent no acknowledgement of v{version}"))
            }
            _ => format!("connection failed awaiting the acknowledgement of v{version}: {e}"),
        })?;
    let acked = u64::from_le_bytes(ack[4..12].try_into().unwrap_or_default());
    match (&ack[..4] == ACK, acked == version, ack[12]) {
        (true, true, 0) => Ok(()),
        (true, true, _) => Err(format!("received v{version} with a checksum mismatch")),
        _ => Err(format!(
            "answered v{version} with a malformed acknowledgement"
        )),
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// A version as a member received it.
#[derive(Debug)]
pub struct Received {
    pub version: u64,
    pub dtype: String,
    pub bytes: Vec<u8>,
}

/// A generator's side: its connection to the trainer for one epoch.
pub struct Receiver {
    stream: TcpStream,
    pub epoch: u64,
    pub rank: u32,
    /// A buffer handed back after use: the next version is read into it, so a
    /// same-sized version costs no allocation and no page faults.
    spare: Vec<u8>,
}

impl Receiver {
    /// Joins epoch `epoch` as `rank` at the trainer's `addr`.
    pub fn connect(
        addr: &str,
        epoch: u64,
        rank: u32,
        worker_id: u64,
        token: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let fail = |e: std::io::Error| {
            invalid(format!(
                "joining the weight broadcast at {addr} (epoch {epoch}, rank {rank}): {e}"
            ))
        };
        let target = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(fail)?
            .next()
            .ok_or_else(|| invalid(format!("broadcast address {addr} resolves to nothing")))?;
        let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(fail)?;
        let token = token.as_bytes();
        let mut hello = Vec::with_capacity(26 + token.len());
        hello.extend_from_slice(HELLO);
        hello.extend_from_slice(&epoch.to_le_bytes());
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&worker_id.to_le_bytes());
        hello.extend_from_slice(&(token.len().min(u16::MAX as usize) as u16).to_le_bytes());
        hello.extend_from_slice(&token[..token.len().min(u16::MAX as usize)]);
        stream.set_read_timeout(Some(timeout)).map_err(fail)?;
        stream.write_all(&hello).map_err(fail)?;
        let reply: [u8; 7] = read_array(&mut stream).map_err(fail)?;
        let mut message = vec![0u8; u16::from_le_bytes([reply[5], reply[6]]) as usize];
        stream.read_exact(&mut message).map_err(fail)?;
        if &reply[..4] != WELCOME || reply[4] != 1 {
            return Err(invalid(format!(
                "the trainer at {addr} refused the broadcast join: {}",
                String::from_utf8_lossy(&message)
            )));
        }
        stream.set_nodelay(true).map_err(fail)?;
        Ok(Receiver {
            stream,
            epoch,
            rank,
            spare: Vec::new(),
        })
    }

    /// Gives back the bytes of a version already used, to receive the next one into.
    pub fn recycle(&mut self, bytes: Vec<u8>) {
        if bytes.capacity() > self.spare.capacity() {
            self.spare = bytes;
        }
    }

    /// Waits up to `poll` for the start of the next version (`None` if none began),
    /// then reads it whole within `frame_timeout`, checks it and acknowledges it.
    pub fn recv(&mut self, poll: Duration, frame_timeout: Duration) -> Result<Option<Received>> {
        let io = |e: std::io::Error| invalid(format!("weight broadcast from the trainer: {e}"));
        self.stream
            .set_read_timeout(Some(poll.max(Duration::from_millis(1))))
            .map_err(io)?;
        let mut first = [0u8; 1];
        match self.stream.read(&mut first) {
            Ok(0) => return Err(invalid("the trainer closed the weight broadcast")),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(io(e)),
        }
        self.stream
            .set_read_timeout(Some(frame_timeout))
            .map_err(io)?;
        let s = &mut self.stream;
        let rest: [u8; 3] = read_array(s).map_err(io)?;
        if first[0] != VERSION[0] || rest != VERSION[1..] {
            return Err(invalid("weight broadcast: not a version frame"));
        }
        let epoch = u64::from_le_bytes(read_array(s).map_err(io)?);
        let version = u64::from_le_bytes(read_array(s).map_err(io)?);
        let [dlen] = read_array::<1>(s).map_err(io)?;
        let mut dtype = vec![0u8; dlen as usize];
        s.read_exact(&mut dtype).map_err(io)?;
        let bucket_bytes = u64::from_le_bytes(read_array(s).map_err(io)?) as usize;
        let n = u32::from_le_bytes(read_array(s).map_err(io)?) as usize;
        let mut sums = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            sums.push(u32::from_le_bytes(read_array(s).map_err(io)?));
        }
        let len = u64::from_le_bytes(read_array(s).map_err(io)?) as usize;
        let mut bytes = std::mem::take(&mut self.spare);
        // Same size as last time: no allocation, nothing zeroed.
        bytes.resize(len, 0);
        s.read_exact(&mut bytes).map_err(io)?;
        let intact = tandem_proto::bucket::checksums(&bytes, bucket_bytes) == sums;
        let mut ack = Vec::with_capacity(13);
        ack.extend_from_slice(ACK);
        ack.extend_from_slice(&version.to_le_bytes());
        ack.push(if intact { 0 } else { 1 });
        s.write_all(&ack).map_err(io)?;
        if epoch != self.epoch {
            return Err(invalid(format!(
                "weight broadcast: v{version} came for epoch {epoch}, this member is in {}",
                self.epoch
            )));
        }
        if !intact {
            return Err(invalid(format!(
                "weight broadcast: v{version} arrived with a checksum mismatch"
            )));
        }
        Ok(Some(Received {
            version,
            dtype: String::from_utf8_lossy(&dtype).into_owned(),
            bytes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(worker_id: u64, rank: u32) -> GroupMember {
        GroupMember {
            worker_id,
            name: format!("gen-{worker_id}"),
            rank,
        }
    }

    fn group(epoch: u64, members: Vec<GroupMember>, addr: SocketAddr) -> BroadcastGroup {
        BroadcastGroup {
            epoch,
            world_size: members.len() as u32 + 1,
            rank: 0,
            address: addr.to_string(),
            members,
        }
    }

    fn snapshot(version: u64, len: usize) -> Snapshot {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + version as usize) as u8).collect();
        Snapshot::new(version, "f32", bytes.into())
    }

    /// A member that receives versions on its own thread until the connection ends.
    fn member_thread(
        addr: SocketAddr,
        epoch: u64,
        rank: u32,
        id: u64,
    ) -> std::thread::JoinHandle<Vec<Received>> {
        std::thread::spawn(move || {
            let mut r = Receiver::connect(
                &addr.to_string(),
                epoch,
                rank,
                id,
                "secret",
                Duration::from_secs(5),
            )
            .unwrap();
            let mut got = Vec::new();
            while let Ok(v) = r.recv(Duration::from_millis(50), Duration::from_secs(5)) {
                if let Some(v) = v {
                    let last = v.version == 2;
                    got.push(v);
                    if last {
                        break;
                    }
                }
            }
            got
        })
    }

    #[test]
    fn every_member_receives_each_version_intact() {
        let b = Broadcaster::bind("127.0.0.1:0", "secret").unwrap();
        let members = vec![member(11, 1), member(12, 2), member(13, 3)];
        let g = group(1, members.clone(), b.local_addr());
        let threads: Vec<_> = members
            .iter()
            .map(|m| member_thread(b.local_addr(), 1, m.rank, m.worker_id))
            .collect();
        // Several buckets, the last one short.
        for v in 1..=2 {
            let snap = snapshot(v, 3 * 1000 + 17);
            let out = b.send(
                &g,
                &snap,
                1000,
                Duration::from_secs(5),
                Duration::from_secs(10),
            );
            assert!(out.failed.is_empty(), "{}", out.describe_failures());
            assert_eq!(out.delivered.len(), 3);
        }
        for t in threads {
            let got = t.join().unwrap();
            assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
            assert_eq!(got[1].bytes, &snapshot(2, 3017).bytes[..]);
            assert_eq!(got[1].dtype, "f32");
        }
    }

    #[test]
    fn absent_stalled_and_stale_members_are_named_and_the_rest_served() {
        let b = Broadcaster::bind("127.0.0.1:0", "secret").unwrap();
        let addr = b.local_addr();
        let g = group(
            3,
            vec![member(1, 1), member(2, 2), member(3, 3), member(4, 4)],
            addr,
        );
        // Rank 1 receives. Rank 2 joins but never reads (a hung generator). Rank 3
        // never joins. Rank 4 joined the previous epoch only.
        let good = member_thread(addr, 3, 1, 1);
        let stalled =
            Receiver::connect(&addr.to_string(), 3, 2, 2, "secret", Duration::from_secs(5))
                .unwrap();
        let _old = Receiver::connect(&addr.to_string(), 2, 4, 4, "secret", Duration::from_secs(5))
            .unwrap();
        // Larger than the socket buffers, so the stalled member blocks the writer.
        let snap = snapshot(2, 16 << 20);
        let out = b.send(
            &g,
            &snap,
            1 << 20,
            Duration::from_millis(300),
            Duration::from_millis(1500),
        );
        assert_eq!(
            out.delivered.iter().map(|m| m.rank).collect::<Vec<_>>(),
            [1]
        );
        let mut failed: Vec<(u32, String)> = out
            .failed
            .iter()
            .map(|(m, w)| (m.rank, w.clone()))
            .collect();
        failed.sort();
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(failed[0].1.starts_with("stalled: took "), "{failed:?}");
        assert!(failed[1].1.contains("did not join epoch 3"), "{failed:?}");
        assert!(failed[2].1.contains("did not join epoch 3"), "{failed:?}");
        assert!(out.describe_failures().contains("gen-2 (rank 2): stalled"));
        assert!(out.seconds < 5.0, "{}", out.seconds);
        drop(stalled);
        assert_eq!(good.join().unwrap()[0].bytes, &snap.bytes[..]);
    }

    #[test]
    fn a_wrong_token_is_refused() {
        let b = Broadcaster::bind("127.0.0.1:0", "secret").unwrap();
        let e = Receiver::connect(
            &b.local_addr().to_string(),
            1,
            1,
            1,
            "guess",
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("token refused"), "{e}");
    }

    #[test]
    fn a_corrupted_version_is_acknowledged_as_such() {
        // A hand-made trainer sends a version whose bytes do not match its checksums.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let trainer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 4 + 8 + 4 + 8 + 2 + 6];
            s.read_exact(&mut hello).unwrap();
            s.write_all(b"TNDW\x01\x00\x00").unwrap();
            let mut snap = snapshot(5, 100);
            let h = header(1, &snap, 64);
            snap.bytes = vec![0u8; 100].into();
            s.write_all(&h).unwrap();
            s.write_all(&snap.bytes).unwrap();
            read_array::<13>(&mut s).unwrap()
        });
        let mut r = Receiver::connect(&addr.to_string(), 1, 1, 9, "secret", Duration::from_secs(5))
            .unwrap();
        let e = r
            .recv(Duration::from_secs(5), Duration::from_secs(5))
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let ack = trainer.join().unwrap();
        assert_eq!(&ack[..4], ACK);
        assert_eq!(u64::from_le_bytes(ack[4..12].try_into().unwrap()), 5);
        assert_eq!(ack[12], 1);
    }
}
