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
//! Frames (little-endian):
//! - hello `TNDH` epoch:u64 rank:u32 world_size:u32 worker_id:u64 collective:u8
//!   token_len:u16 token
//! - welcome `TNDW` ok:u8 len:u16 message id_len:u16 id (the epoch's collective id,
//!   empty for none)
//! - version `TNDV` epoch:u64 version:u64 plane:u8 (0 = bytes follow, 1 = collective)
//!   dtype_len:u8 dtype bucket_bytes:u64 n:u32 crc:u32×n len:u64 [bytes]
//! - ready `TNDR` version:u64 0:u8 (collective plane: the header arrived)
//! - ack `TNDA` version:u64 status:u8 (0 = intact, 1 = a checksum differed, 2 = the
//!   collective receive failed)

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::v1::{BroadcastGroup, GroupMember};

use crate::collective::{Collective, SharedBackend};
use crate::error::{invalid, Result};
use crate::service::Snapshot;

const HELLO: &[u8; 4] = b"TNDH";
const WELCOME: &[u8; 4] = b"TNDW";
const VERSION: &[u8; 4] = b"TNDV";
const READY: &[u8; 4] = b"TNDR";
const ACK: &[u8; 4] = b"TNDA";
/// `plane` in a version frame.
const INLINE: u8 = 0;
const COLLECTIVE: u8 = 1;
/// `status` in an acknowledgement.
const INTACT: u8 = 0;
const CHECKSUM_DIFFERED: u8 = 1;
const COLLECTIVE_FAILED: u8 = 2;
/// Bytes written between deadline checks.
const CHUNK: usize = 1 << 20;
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Collective ids kept for epochs before the newest (members of an older epoch may
/// still be joining when the next one starts).
const IDS_KEPT: u64 = 2;

struct Peer {
    epoch: u64,
    rank: u32,
    /// It joined with a communicator of the epoch's collective.
    collective: bool,
    stream: TcpStream,
}

/// Rank 0's communicator for one epoch: `(epoch, None)` once it failed.
type EpochComm = Option<(u64, Option<Box<dyn Collective>>)>;

/// Rank 0's collective state.
struct Plane {
    backend: SharedBackend,
    /// The unique id of each recent epoch.
    ids: Mutex<BTreeMap<u64, Vec<u8>>>,
    /// Rank 0's communicator for one epoch; `(epoch, None)` once it failed, so the rest
    /// of that epoch goes over TCP.
    comm: Mutex<EpochComm>,
}

impl Plane {
    fn id_for(&self, epoch: u64) -> std::result::Result<Vec<u8>, String> {
        let mut ids = self.ids.lock().map_err(|_| "collective ids: poisoned")?;
        if let Some(id) = ids.get(&epoch) {
            return Ok(id.clone());
        }
        let id = self.backend.new_id()?;
        ids.insert(epoch, id.clone());
        let newest = ids.keys().next_back().copied().unwrap_or(epoch);
        ids.retain(|&e, _| e + IDS_KEPT >= newest);
        Ok(id)
    }

    /// Rank 0's communicator for `group`'s epoch, joining it on first use; `None` if
    /// the epoch's collective already failed or cannot be joined.
    fn take_comm(&self, group: &BroadcastGroup) -> Option<Box<dyn Collective>> {
        let mut slot = self.comm.lock().ok()?;
        match slot.take() {
            Some((epoch, comm)) if epoch == group.epoch => {
                if comm.is_none() {
                    *slot = Some((epoch, None));
                }
                return comm;
            }
            _ => {}
        }
        let joined = self
            .id_for(group.epoch)
            .and_then(|id| self.backend.join(&id, 0, group.world_size));
        match joined {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(
                    epoch = group.epoch,
                    "weight broadcast: cannot join the {} communicator ({e}); this epoch goes over TCP",
                    self.backend.name()
                );
                *slot = Some((group.epoch, None));
                None
            }
        }
    }

    fn put_comm(&self, epoch: u64, comm: Option<Box<dyn Collective>>) {
        if let Ok(mut slot) = self.comm.lock() {
            *slot = Some((epoch, comm));
        }
    }
}

/// The trainer's side: a listener that members join, and [`Broadcaster::send`].
pub struct Broadcaster {
    addr: SocketAddr,
    /// Joined members by worker id (a member that joins again replaces itself).
    peers: Arc<Mutex<BTreeMap<u64, Peer>>>,
    plane: Option<Arc<Plane>>,
}

/// What one broadcast did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// "tcp", or the collective backend's name.
    pub plane: &'static str,
    pub delivered: Vec<GroupMember>,
    /// Members that had not joined, stalled past the deadline or failed, and why: the
    /// trainer excludes them from the group.
    pub failed: Vec<(GroupMember, String)>,
    /// Members that took the header but not the bytes because the collective failed
    /// with no member to blame: they fetch this version over gRPC and stay members.
    pub missed: Vec<(GroupMember, String)>,
    pub seconds: f64,
}

impl Outcome {
    /// "gen-3 (rank 2): no acknowledgement …; gen-5 (rank 4): …".
    pub fn describe_failures(&self) -> String {
        describe(&self.failed)
    }

    /// The same for [`Outcome::missed`].
    pub fn describe_missed(&self) -> String {
        describe(&self.missed)
    }
}

fn describe(members: &[(GroupMember, String)]) -> String {
    members
        .iter()
        .map(|(m, why)| format!("{} (rank {}): {why}", m.name, m.rank))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Broadcaster {
    /// Listens on `listen` (port 0 = any) and accepts members that present `token`.
    /// With a `collective` backend, versions go by one collective call to epochs whose
    /// members all joined with one (TCP otherwise).
    pub fn bind(listen: &str, token: &str, collective: Option<SharedBackend>) -> Result<Self> {
        let listener = TcpListener::bind(listen).map_err(|e| {
            invalid(format!(
                "broadcast listener: cannot listen on {listen}: {e}"
            ))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| invalid(format!("broadcast listener: {e}")))?;
        let peers: Arc<Mutex<BTreeMap<u64, Peer>>> = Arc::default();
        let plane = collective.map(|backend| {
            Arc::new(Plane {
                backend,
                ids: Mutex::default(),
                comm: Mutex::default(),
            })
        });
        let (joined, token, ids) = (peers.clone(), token.as_bytes().to_vec(), plane.clone());
        std::thread::Builder::new()
            .name("broadcast-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(stream) = conn else { continue };
                    let (joined, token, ids) = (joined.clone(), token.clone(), ids.clone());
                    // A slow hello must not hold up the next member.
                    std::thread::spawn(move || {
                        if let Err(e) = welcome(stream, &token, ids.as_deref(), &joined) {
                            tracing::warn!("broadcast: a member was refused: {e}");
                        }
                    });
                }
            })
            .map_err(|e| invalid(format!("broadcast listener thread: {e}")))?;
        Ok(Broadcaster { addr, peers, plane })
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
        let mut out = Outcome {
            plane: "tcp",
            ..Outcome::default()
        };
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
        // One collective call needs every rank of the epoch, each with a communicator.
        let mut comm = match &self.plane {
            Some(plane)
                if out.failed.is_empty()
                    && !sending.is_empty()
                    && sending.iter().all(|(_, p)| p.collective) =>
            {
                plane.take_comm(group)
            }
            _ => None,
        };
        if let (Some(plane), Some(_)) = (&self.plane, &comm) {
            out.plane = plane.backend.name();
        }
        let collective = comm.is_some();
        let header = header(group.epoch, snap, bucket_bytes, collective);
        let inline = (!collective).then_some(&snap.bytes[..]);
        let deadline = Instant::now() + timeout;
        let (root, results) = std::thread::scope(|s| {
            let handles: Vec<_> = sending
                .into_iter()
                .map(|(m, mut p)| {
                    let header = &header;
                    s.spawn(move || {
                        let r = serve_one(&mut p.stream, header, inline, snap.version, deadline);
                        (m, p, r)
                    })
                })
                .collect();
            let root = comm.as_mut().map(|c| c.send(&snap.bytes, deadline));
            let results: Vec<_> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
            (root, results)
        });
        let root_failed = match (root, &self.plane) {
            (Some(Err(e)), Some(plane)) => {
                plane.put_comm(group.epoch, None);
                Some(format!(
                    "the {} broadcast failed: {e}",
                    plane.backend.name()
                ))
            }
            (_, Some(plane)) if collective => {
                plane.put_comm(group.epoch, comm);
                None
            }
            _ => None,
        };
        for (m, p, (ready, r)) in results {
            match (r, &root_failed) {
                (Ok(()), _) => {
                    if let Ok(mut peers) = self.peers.lock() {
                        // Unless the member joined again meanwhile.
                        peers.entry(m.worker_id).or_insert(p);
                    }
                    out.delivered.push(m);
                }
                (Err(_), Some(why)) if ready => {
                    if let Ok(mut peers) = self.peers.lock() {
                        peers.entry(m.worker_id).or_insert(p);
                    }
                    out.missed.push((m, why.clone()));
                }
                (Err(why), _) => out.failed.push((m, why)),
            }
        }
        out.seconds = t0.elapsed().as_secs_f64();
        out
    }
}

/// Reads a member's hello, checks its token, hands it the epoch's collective id and
/// keeps its connection.
fn welcome(
    mut stream: TcpStream,
    token: &[u8],
    plane: Option<&Plane>,
    joined: &Mutex<BTreeMap<u64, Peer>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    let magic: [u8; 4] = read_array(&mut stream)?;
    if &magic != HELLO {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a hello"));
    }
    let epoch = u64::from_le_bytes(read_array(&mut stream)?);
    let rank = u32::from_le_bytes(read_array(&mut stream)?);
    let _world_size = u32::from_le_bytes(read_array(&mut stream)?);
    let worker_id = u64::from_le_bytes(read_array(&mut stream)?);
    let [wants_collective] = read_array::<1>(&mut stream)?;
    let len = u16::from_le_bytes(read_array(&mut stream)?) as usize;
    let mut presented = vec![0u8; len];
    stream.read_exact(&mut presented)?;
    let ok = tandem_proto::auth::constant_time_eq(&presented, token);
    let message: &[u8] = if ok { b"" } else { b"token refused" };
    let id = match plane {
        Some(plane) if ok && wants_collective == 1 => plane.id_for(epoch).unwrap_or_else(|e| {
            tracing::warn!(
                epoch,
                "weight broadcast: no collective id for this epoch: {e}"
            );
            Vec::new()
        }),
        _ => Vec::new(),
    };
    let mut reply = Vec::with_capacity(9 + message.len() + id.len());
    reply.extend_from_slice(WELCOME);
    reply.push(ok as u8);
    reply.extend_from_slice(&(message.len() as u16).to_le_bytes());
    reply.extend_from_slice(message);
    reply.extend_from_slice(&(id.len() as u16).to_le_bytes());
    reply.extend_from_slice(&id);
    stream.write_all(&reply)?;
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
                collective: !id.is_empty(),
                stream,
            },
        );
    }
    tracing::debug!(worker_id, epoch, rank, "broadcast member joined");
    Ok(())
}

fn header(epoch: u64, snap: &Snapshot, bucket_bytes: usize, collective: bool) -> Vec<u8> {
    let sums = snap.checksums(bucket_bytes);
    let mut h = Vec::with_capacity(49 + 4 * sums.len());
    h.extend_from_slice(VERSION);
    h.extend_from_slice(&epoch.to_le_bytes());
    h.extend_from_slice(&snap.version.to_le_bytes());
    h.push(if collective { COLLECTIVE } else { INLINE });
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

/// Writes one version's header (and, `inline`, its bytes) to one member and reads its
/// replies by `deadline`. Returns whether it said it was ready (collective plane; always
/// true inline) and how it ended.
fn serve_one(
    stream: &mut TcpStream,
    header: &[u8],
    inline: Option<&[u8]>,
    version: u64,
    deadline: Instant,
) -> (bool, std::result::Result<(), String>) {
    let left = || deadline.saturating_duration_since(Instant::now());
    let stalled = |what: String| format!("stalled: {what} by the deadline");
    let bytes = inline.unwrap_or_default();
    let total = header.len() + bytes.len();
    let mut sent = 0usize;
    for chunk in std::iter::once(header).chain(bytes.chunks(CHUNK)) {
        if left().is_zero() {
            return (
                false,
                Err(stalled(format!(
                    "took {sent} of {total} bytes of v{version}"
                ))),
            );
        }
        let wrote = stream
            .set_write_timeout(Some(left()))
            .and_then(|_| stream.write_all(chunk));
        if let Err(e) = wrote {
            let why = match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                    stalled(format!("took {sent} of {total} bytes of v{version}"))
                }
                _ => format!("connection failed while sending v{version}: {e}"),
            };
            return (false, Err(why));
        }
        sent += chunk.len();
    }
    let mut ready = inline.is_some();
    loop {
        let reply = stream
            .set_read_timeout(Some(left().max(Duration::from_millis(1))))
            .and_then(|_| read_array::<13>(stream));
        let frame = match reply {
            Ok(f) => f,
            Err(e) => {
                let why = match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::TimedOut if ready => {
                        stalled(format!("sent no acknowledgement of v{version}"))
                    }
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                        stalled(format!("did not take the header of v{version}"))
                    }
                    _ => {
                        format!("connection failed awaiting the acknowledgement of v{version}: {e}")
                    }
                };
                return (ready, Err(why));
            }
        };
        let of = u64::from_le_bytes(frame[4..12].try_into().unwrap_or_default());
        // A late reply about an earlier version (its collective failed meanwhile).
        if of < version && (&frame[..4] == ACK || &frame[..4] == READY) {
            continue;
        }
        return match (&frame[..4], of == version, frame[12]) {
            (m, true, _) if m == READY => {
                ready = true;
                continue;
            }
            (m, true, INTACT) if m == ACK => (true, Ok(())),
            (m, true, CHECKSUM_DIFFERED) if m == ACK => (
                true,
                Err(format!("received v{version} with a checksum mismatch")),
            ),
            (m, true, COLLECTIVE_FAILED) if m == ACK => (
                ready,
                Err(format!("its collective receive of v{version} failed")),
            ),
            _ => (
                ready,
                Err(format!(
                    "answered v{version} with a malformed acknowledgement"
                )),
            ),
        };
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn reply(kind: &[u8; 4], version: u64, status: u8) -> [u8; 13] {
    let mut f = [0u8; 13];
    f[..4].copy_from_slice(kind);
    f[4..12].copy_from_slice(&version.to_le_bytes());
    f[12] = status;
    f
}

/// A version as a member received it.
#[derive(Debug)]
pub struct Received {
    pub version: u64,
    pub dtype: String,
    pub bytes: Vec<u8>,
}

/// Who a member is in which epoch, and where it joins.
#[derive(Clone, Copy, Debug)]
pub struct Join<'a> {
    /// The trainer's broadcast listener.
    pub addr: &'a str,
    pub epoch: u64,
    pub rank: u32,
    pub world_size: u32,
    pub worker_id: u64,
    /// The run's token.
    pub token: &'a str,
}

/// A generator's side: its connection to the trainer for one epoch.
pub struct Receiver {
    stream: TcpStream,
    pub epoch: u64,
    pub rank: u32,
    /// Its communicator of the epoch's collective, when it has a backend and the
    /// trainer handed out an id (dropped after a failed receive).
    collective: Option<Box<dyn Collective>>,
    /// A buffer handed back after use: the next version is read into it, so a
    /// same-sized version costs no allocation and no page faults.
    spare: Vec<u8>,
}

impl Receiver {
    /// Joins `j.epoch` as `j.rank` at the trainer's `j.addr`, and the epoch's
    /// collective too when `collective` is given.
    pub fn connect(
        j: &Join<'_>,
        timeout: Duration,
        collective: Option<&SharedBackend>,
    ) -> Result<Self> {
        let (addr, epoch, rank) = (j.addr, j.epoch, j.rank);
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
        let token = &j.token.as_bytes()[..j.token.len().min(u16::MAX as usize)];
        let mut hello = Vec::with_capacity(31 + token.len());
        hello.extend_from_slice(HELLO);
        hello.extend_from_slice(&epoch.to_le_bytes());
        hello.extend_from_slice(&rank.to_le_bytes());
        hello.extend_from_slice(&j.world_size.to_le_bytes());
        hello.extend_from_slice(&j.worker_id.to_le_bytes());
        hello.push(collective.is_some() as u8);
        hello.extend_from_slice(&(token.len() as u16).to_le_bytes());
        hello.extend_from_slice(token);
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
        let mut id = vec![0u8; u16::from_le_bytes(read_array(&mut stream).map_err(fail)?) as usize];
        stream.read_exact(&mut id).map_err(fail)?;
        let collective = match collective {
            Some(backend) if !id.is_empty() => {
                match backend.join(&id, rank, j.world_size) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        // The trainer then finds the collective failing and uses TCP.
                        tracing::warn!(
                            epoch,
                            rank,
                            "weight broadcast: cannot join the {} communicator: {e}",
                            backend.name()
                        );
                        None
                    }
                }
            }
            _ => None,
        };
        stream.set_nodelay(true).map_err(fail)?;
        Ok(Receiver {
            stream,
            epoch,
            rank,
            collective,
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
    /// then receives it whole within `frame_timeout`, checks it and acknowledges it.
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
        let deadline = Instant::now() + frame_timeout;
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
        let [plane, dlen] = read_array::<2>(s).map_err(io)?;
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
        if plane == COLLECTIVE {
            let got = match self.collective.as_mut() {
                Some(c) => {
                    s.write_all(&reply(READY, version, 0)).map_err(io)?;
                    c.recv(&mut bytes, deadline)
                }
                None => Err("this member has no communicator for the epoch".into()),
            };
            if let Err(e) = got {
                self.collective = None;
                self.spare = bytes;
                self.stream
                    .write_all(&reply(ACK, version, COLLECTIVE_FAILED))
                    .map_err(io)?;
                return Err(invalid(format!(
                    "weight broadcast: the collective receive of v{version} failed: {e}"
                )));
            }
        } else {
            s.read_exact(&mut bytes).map_err(io)?;
        }
        let intact = tandem_proto::bucket::checksums(&bytes, bucket_bytes) == sums;
        let status = if intact { INTACT } else { CHECKSUM_DIFFERED };
        self.stream
            .write_all(&reply(ACK, version, status))
            .map_err(io)?;
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

    const SECOND: Duration = Duration::from_secs(1);

    /// Member `worker_id` of epoch `epoch` as rank `rank` of a 4-rank world.
    fn join(addr: &str, epoch: u64, rank: u32, worker_id: u64) -> Join<'_> {
        Join {
            addr,
            epoch,
            rank,
            world_size: 4,
            worker_id,
            token: "secret",
        }
    }

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

    /// A member that receives versions on its own thread until version 2.
    fn member_thread(
        addr: SocketAddr,
        epoch: u64,
        rank: u32,
        id: u64,
    ) -> std::thread::JoinHandle<Vec<Received>> {
        let t = member_of(addr, (epoch, rank, 4, id), None, 2);
        std::thread::spawn(move || t.join().unwrap().0)
    }

    /// A member `(epoch, rank, world_size, worker_id)`, with a collective `backend` or
    /// not, that receives on its own thread until version `last` arrives or the trainer
    /// hangs up; it returns the versions and the errors of failed receives.
    fn member_of(
        addr: SocketAddr,
        (epoch, rank, world_size, id): (u64, u32, u32, u64),
        backend: Option<SharedBackend>,
        last: u64,
    ) -> std::thread::JoinHandle<(Vec<Received>, Vec<String>)> {
        std::thread::spawn(move || {
            let addr = addr.to_string();
            let j = Join {
                world_size,
                ..join(&addr, epoch, rank, id)
            };
            let mut r = Receiver::connect(&j, SECOND * 5, backend.as_ref()).unwrap();
            let (mut got, mut errors) = (Vec::new(), Vec::new());
            let give_up = Instant::now() + SECOND * 20;
            while Instant::now() < give_up {
                match r.recv(Duration::from_millis(50), SECOND * 5) {
                    Ok(Some(v)) => {
                        let done = v.version == last;
                        got.push(v);
                        if done {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) if e.to_string().contains("closed") => break,
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (got, errors)
        })
    }

    fn stand_in() -> SharedBackend {
        Arc::new(crate::collective::stand_in::LocalBackend::default())
    }

    fn ranks(members: &[GroupMember]) -> Vec<u32> {
        let mut r: Vec<u32> = members.iter().map(|m| m.rank).collect();
        r.sort();
        r
    }

    #[test]
    fn the_collective_carries_each_version_when_every_member_has_a_communicator() {
        let backend = stand_in();
        let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
        let members = vec![member(11, 1), member(12, 2), member(13, 3)];
        let g = group(1, members.clone(), b.local_addr());
        let threads: Vec<_> = members
            .iter()
            .map(|m| {
                let who = (1, m.rank, 4, m.worker_id);
                member_of(b.local_addr(), who, Some(backend.clone()), 2)
            })
            .collect();
        for v in 1..=2 {
            let out = b.send(&g, &snapshot(v, 3017), 1000, SECOND * 5, SECOND * 10);
            assert!(out.failed.is_empty(), "{}", out.describe_failures());
            assert_eq!(out.plane, "stand-in");
            assert_eq!(ranks(&out.delivered), [1, 2, 3]);
        }
        for t in threads {
            let (got, errors) = t.join().unwrap();
            assert!(errors.is_empty(), "{errors:?}");
            assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [1, 2]);
            assert_eq!(got[1].bytes, &snapshot(2, 3017).bytes[..]);
        }
    }

    #[test]
    fn a_member_without_a_communicator_makes_the_epoch_go_over_tcp() {
        let backend = stand_in();
        let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
        let g = group(1, vec![member(1, 1), member(2, 2)], b.local_addr());
        let with = member_of(b.local_addr(), (1, 1, 3, 1), Some(backend), 1);
        let without = member_of(b.local_addr(), (1, 2, 3, 2), None, 1);
        let out = b.send(&g, &snapshot(1, 500), 100, SECOND * 5, SECOND * 10);
        assert_eq!(out.plane, "tcp");
        assert_eq!(ranks(&out.delivered), [1, 2], "{}", out.describe_failures());
        for t in [with, without] {
            assert_eq!(t.join().unwrap().0[0].bytes, &snapshot(1, 500).bytes[..]);
        }
    }

    #[test]
    fn a_stalled_member_is_named_and_the_epoch_goes_on_over_tcp() {
        let backend = stand_in();
        let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
        let addr = b.local_addr();
        let g = group(1, vec![member(1, 1), member(2, 2), member(3, 3)], addr);
        let good: Vec<_> = [1, 2]
            .map(|r| member_of(addr, (1, r, 4, r as u64), Some(backend.clone()), 2))
            .into();
        // Rank 3 joins, communicator and all, and never reads: the collective hangs on it.
        let a = addr.to_string();
        let _stalled = Receiver::connect(&join(&a, 1, 3, 3), SECOND * 5, Some(&backend)).unwrap();
        let short = Duration::from_millis(800);
        let out = b.send(&g, &snapshot(1, 4000), 1000, SECOND * 5, short);
        assert_eq!(out.plane, "stand-in");
        assert_eq!(
            ranks(&out.failed.iter().map(|f| f.0.clone()).collect::<Vec<_>>()),
            [3]
        );
        assert!(
            out.describe_failures()
                .contains("gen-3 (rank 3): stalled: did not take the header of v1"),
            "{}",
            out.describe_failures()
        );
        // The ready members got it, or missed only this version: none is excluded.
        let mut served = out.delivered.clone();
        served.extend(out.missed.iter().map(|m| m.0.clone()));
        assert_eq!(ranks(&served), [1, 2]);

        // The trainer hung up on the stalled member (the coordinator excludes it), and
        // the rest of the epoch goes over TCP.
        let out = b.send(
            &g,
            &snapshot(2, 4000),
            1000,
            Duration::from_millis(300),
            short,
        );
        assert_eq!(out.plane, "tcp");
        assert_eq!(ranks(&out.delivered), [1, 2]);
        assert!(
            out.describe_failures()
                .contains("gen-3 (rank 3): did not join epoch 1"),
            "{}",
            out.describe_failures()
        );
        for t in good {
            let (got, _) = t.join().unwrap();
            assert_eq!(got.last().unwrap().bytes, &snapshot(2, 4000).bytes[..]);
        }
    }

    #[test]
    fn a_collective_failing_with_no_one_to_blame_costs_the_members_only_that_version() {
        let backend = stand_in();
        let b = Broadcaster::bind("127.0.0.1:0", "secret", Some(backend.clone())).unwrap();
        let addr = b.local_addr();
        // The communicator waits for a fourth rank that never comes.
        let g = BroadcastGroup {
            world_size: 4,
            ..group(1, vec![member(1, 1), member(2, 2)], addr)
        };
        let members: Vec<_> = [1, 2]
            .map(|r| member_of(addr, (1, r, 4, r as u64), Some(backend.clone()), 2))
            .into();
        let out = b.send(
            &g,
            &snapshot(1, 300),
            100,
            SECOND * 5,
            Duration::from_millis(500),
        );
        assert!(out.failed.is_empty(), "{}", out.describe_failures());
        assert_eq!(
            ranks(&out.missed.iter().map(|m| m.0.clone()).collect::<Vec<_>>()),
            [1, 2]
        );
        assert!(
            out.describe_missed()
                .contains("the stand-in broadcast failed: timed out"),
            "{}",
            out.describe_missed()
        );
        let out = b.send(&g, &snapshot(2, 300), 100, SECOND * 5, SECOND * 5);
        assert_eq!((out.plane, ranks(&out.delivered)), ("tcp", vec![1, 2]));
        for t in members {
            let (got, errors) = t.join().unwrap();
            assert_eq!(got.iter().map(|r| r.version).collect::<Vec<_>>(), [2]);
            assert!(
                errors[0].contains("collective receive of v1 failed"),
                "{errors:?}"
            );
        }
    }

    #[test]
    fn every_member_receives_each_version_intact() {
        let b = Broadcaster::bind("127.0.0.1:0", "secret", None).unwrap();
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
        let b = Broadcaster::bind("127.0.0.1:0", "secret", None).unwrap();
        let addr = b.local_addr();
        let g = group(
            3,
            vec![member(1, 1), member(2, 2), member(3, 3), member(4, 4)],
            addr,
        );
        // Rank 1 receives. Rank 2 joins but never reads (a hung generator). Rank 3
        // never joins. Rank 4 joined the previous epoch only.
        let good = member_thread(addr, 3, 1, 1);
        let a = addr.to_string();
        let stalled = Receiver::connect(&join(&a, 3, 2, 2), SECOND * 5, None).unwrap();
        let _old = Receiver::connect(&join(&a, 2, 4, 4), SECOND * 5, None).unwrap();
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
        let b = Broadcaster::bind("127.0.0.1:0", "secret", None).unwrap();
        let addr = b.local_addr().to_string();
        let j = Join {
            token: "guess",
            ..join(&addr, 1, 1, 1)
        };
        let e = Receiver::connect(&j, SECOND * 5, None).err().unwrap();
        assert!(e.to_string().contains("token refused"), "{e}");
    }

    #[test]
    fn a_corrupted_version_is_acknowledged_as_such() {
        // A hand-made trainer sends a version whose bytes do not match its checksums.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let trainer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut hello = [0u8; 4 + 8 + 4 + 4 + 8 + 1 + 2 + 6];
            s.read_exact(&mut hello).unwrap();
            s.write_all(b"TNDW\x01\x00\x00\x00\x00").unwrap();
            let mut snap = snapshot(5, 100);
            let h = header(1, &snap, 64, false);
            snap.bytes = vec![0u8; 100].into();
            s.write_all(&h).unwrap();
            s.write_all(&snap.bytes).unwrap();
            read_array::<13>(&mut s).unwrap()
        });
        let addr = addr.to_string();
        let mut r = Receiver::connect(&join(&addr, 1, 1, 9), SECOND * 5, None).unwrap();
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
