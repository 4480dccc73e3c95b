//! The trainer's side of the broadcast: a listener that members join, and
//! [`Broadcaster::send`], which moves one version to every member of an epoch and
//! names those that did not take it.
//!
//! A connection is tied to the registered worker it claims: its hello must carry the
//! token generators hold and that worker's session token (`tandem_proto::auth::
//! session_token`, which only the coordinator and the trainer can make), and name an
//! epoch that is not over and, for the epoch being sent, the rank the coordinator gave
//! that worker. A client holding the generator token cannot join as another worker.
//! Connections that have not said hello are bounded ([`MAX_PENDING`]; more are closed
//! at once) and each is closed at its hello deadline ([`HELLO_TIMEOUT`], enforced on
//! the whole hello, not per read): a slow client holds no thread past it.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::v1::{BroadcastGroup, GroupMember};

use super::frame::{
    self, read_array, ACK, CHECKSUM_DIFFERED, COLLECTIVE_FAILED, HELLO, INTACT, READY,
};
use crate::collective::{Collective, SharedBackend};
use crate::error::{invalid, Result};
use crate::snapshot::Snapshot;

/// Bytes written between deadline checks.
const CHUNK: usize = 1 << 20;
/// How long a new connection may take to say its whole hello (a member sends it at
/// once after connecting).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections waiting to say hello at once, each on its own thread: a broadcast group
/// has tens of members that join once per epoch; past this, new connections are
/// closed unread (their member retries, or fetches over gRPC).
pub const MAX_PENDING: usize = 64;
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
    /// Connections that have not said hello yet.
    pending: Arc<AtomicUsize>,
    /// The group of the newest version sent: hellos for an older epoch, or for its
    /// epoch under another rank, are refused.
    current: Arc<Mutex<Option<BroadcastGroup>>>,
}

/// Who may join: members present `token` (the generator token, or the run's when the
/// roles share it) and the session token of the worker they claim, made with
/// `run_token`.
#[derive(Clone)]
pub struct Access {
    pub token: String,
    pub run_token: String,
}

/// Counts a connection as pending while it lives.
struct Pending(Arc<AtomicUsize>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
    /// Listens on `listen` (port 0 = any) and accepts members that `access` lets in.
    /// With a `collective` backend, versions go by one collective call to epochs whose
    /// members all joined with one (TCP otherwise).
    pub fn bind(listen: &str, access: Access, collective: Option<SharedBackend>) -> Result<Self> {
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
        let pending = Arc::new(AtomicUsize::new(0));
        let current: Arc<Mutex<Option<BroadcastGroup>>> = Arc::default();
        let (joined, ids, waiting, group) = (
            peers.clone(),
            plane.clone(),
            pending.clone(),
            current.clone(),
        );
        let access = Arc::new(access);
        std::thread::Builder::new()
            .name("broadcast-accept".into())
            .spawn(move || {
                let mut turned_away = 0u64;
                for conn in listener.incoming() {
                    let Ok(stream) = conn else { continue };
                    if waiting.load(Ordering::SeqCst) >= MAX_PENDING {
                        // Closed unread: a flood of silent connections holds no thread.
                        drop(stream);
                        turned_away += 1;
                        if turned_away.is_power_of_two() {
                            tracing::warn!(
                                turned_away,
                                "broadcast: {MAX_PENDING} connections are waiting to say hello; new ones are closed"
                            );
                        }
                        continue;
                    }
                    waiting.fetch_add(1, Ordering::SeqCst);
                    let guard = Pending(waiting.clone());
                    let (joined, ids, group, access) =
                        (joined.clone(), ids.clone(), group.clone(), access.clone());
                    // A slow hello must not hold up the next member.
                    let spawned = std::thread::Builder::new()
                        .name("broadcast-hello".into())
                        .spawn(move || {
                            let _guard = guard;
                            if let Err(e) = welcome(stream, &access, ids.as_deref(), &joined, &group)
                            {
                                tracing::warn!("broadcast: a connection was refused: {e}");
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::warn!("broadcast: no thread for a new connection: {e}");
                    }
                }
            })
            .map_err(|e| invalid(format!("broadcast listener thread: {e}")))?;
        Ok(Broadcaster {
            addr,
            peers,
            plane,
            pending,
            current,
        })
    }

    /// Connections that have not said hello yet (at most [`MAX_PENDING`]).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Members joined, by worker id.
    pub fn joined(&self) -> Vec<u64> {
        self.peers
            .lock()
            .map(|p| p.keys().copied().collect())
            .unwrap_or_default()
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
        self.enter_epoch(group);
        self.wait_for_members(group, t0 + join_wait);
        let mut out = Outcome {
            plane: "tcp",
            ..Outcome::default()
        };
        let sending = self.take_joined(group, join_wait, &mut out);
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
        let header = frame::header(group.epoch, snap, bucket_bytes, collective);
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
        self.settle(results, root_failed, &mut out);
        out.seconds = t0.elapsed().as_secs_f64();
        out
    }

    /// From now on hellos are checked against `group`; members of older epochs that
    /// are still connected can receive nothing more and are let go.
    fn enter_epoch(&self, group: &BroadcastGroup) {
        if let Ok(mut current) = self.current.lock() {
            if current.as_ref().is_none_or(|g| g.epoch <= group.epoch) {
                *current = Some(group.clone());
            }
        }
        if let Ok(mut peers) = self.peers.lock() {
            peers.retain(|_, p| p.epoch >= group.epoch);
        }
    }

    /// Waits until every member of `group` has joined its epoch, or `deadline`
    /// (members of a new epoch connect after they learn it from a heartbeat).
    fn wait_for_members(&self, group: &BroadcastGroup, deadline: Instant) {
        while Instant::now() < deadline {
            let all = self
                .peers
                .lock()
                .map(|p| group.members.iter().all(|m| has_joined(group, m, &p)))
                .unwrap_or(false);
            if all {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Takes the connections of the members that joined; the others go to
    /// `out.failed`.
    fn take_joined(
        &self,
        group: &BroadcastGroup,
        join_wait: Duration,
        out: &mut Outcome,
    ) -> Vec<(GroupMember, Peer)> {
        let mut sending = Vec::new();
        if let Ok(mut peers) = self.peers.lock() {
            for m in &group.members {
                if has_joined(group, m, &peers) {
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
        sending
    }

    /// Sorts each member's result into `out` and keeps the connections that still
    /// work (unless the member joined again meanwhile): delivered; missed when the
    /// member was ready but the collective's root failed; failed otherwise.
    fn settle(&self, results: Vec<Served>, root_failed: Option<String>, out: &mut Outcome) {
        for (m, p, (ready, r)) in results {
            match (r, &root_failed) {
                (Ok(()), _) => {
                    if let Ok(mut peers) = self.peers.lock() {
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
    }
}

/// A member, its connection, and what serving it gave: whether it was ready for the
/// collective, and the delivery's result.
type Served = (GroupMember, Peer, (bool, std::result::Result<(), String>));

/// Whether `m` joined `group`'s epoch at its rank.
fn has_joined(group: &BroadcastGroup, m: &GroupMember, peers: &BTreeMap<u64, Peer>) -> bool {
    peers
        .get(&m.worker_id)
        .is_some_and(|p| p.epoch == group.epoch && p.rank == m.rank)
}

/// Reads a member's hello by [`HELLO_TIMEOUT`], checks its token, its session and its
/// place in the group, hands it the epoch's collective id and keeps its connection.
fn welcome(
    mut stream: TcpStream,
    access: &Access,
    plane: Option<&Plane>,
    joined: &Mutex<BTreeMap<u64, Peer>>,
    current: &Mutex<Option<BroadcastGroup>>,
) -> std::io::Result<()> {
    use tandem_proto::limits::{SESSION_TOKEN_BYTES, TOKEN_BYTES};
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let s = &mut stream;
    // magic 4, epoch 8, rank 4, world size 4, worker id 8, collective 1, token length 2.
    let head: [u8; 31] = read_by(s, deadline)?;
    if &head[..4] != HELLO {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a hello"));
    }
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().unwrap_or_default());
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap_or_default());
    let (epoch, rank, worker_id) = (u64_at(4), u32_at(12), u64_at(20));
    let wants_collective = head[28];
    let len = u16::from_le_bytes([head[29], head[30]]) as usize;
    if len > TOKEN_BYTES {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a hello's token of {len} bytes, over the limit of {TOKEN_BYTES}"),
        ));
    }
    let mut presented = vec![0u8; len];
    read_exact_by(s, &mut presented, deadline)?;
    let [session_len] = read_by::<1>(s, deadline)?;
    let session_len = session_len as usize;
    if session_len > SESSION_TOKEN_BYTES {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "a hello's session of {session_len} bytes, over the limit of {SESSION_TOKEN_BYTES}"
            ),
        ));
    }
    let mut session = vec![0u8; session_len];
    read_exact_by(s, &mut session, deadline)?;
    let refusal = admit(
        access, &presented, &session, epoch, rank, worker_id, current,
    );
    let ok = refusal.is_none();
    let message = refusal.clone().unwrap_or_default();
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
    stream.set_write_timeout(Some(HELLO_TIMEOUT))?;
    stream.write_all(&frame::welcome(ok, message.as_bytes(), &id))?;
    if let Some(why) = refusal {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!("worker {worker_id} (epoch {epoch}, rank {rank}): {why}"),
        ));
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
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

/// Why a hello is refused, or `None` to let it join: the token, the session of the
/// worker it claims, and its epoch and rank against the newest group sent.
fn admit(
    access: &Access,
    token: &[u8],
    session: &[u8],
    epoch: u64,
    rank: u32,
    worker_id: u64,
    current: &Mutex<Option<BroadcastGroup>>,
) -> Option<String> {
    use tandem_proto::auth::{constant_time_eq, session_token};
    if !constant_time_eq(token, access.token.as_bytes()) {
        return Some("token refused".into());
    }
    let want = session_token(&access.run_token, worker_id, "generator");
    if !constant_time_eq(session, want.as_bytes()) {
        return Some(format!(
            "session refused: not worker {worker_id}'s (send the session token its Register returned)"
        ));
    }
    let group = current.lock().ok()?.clone()?;
    if epoch < group.epoch {
        return Some(format!(
            "epoch {epoch} is over (the group is in epoch {})",
            group.epoch
        ));
    }
    if epoch == group.epoch
        && !group
            .members
            .iter()
            .any(|m| m.worker_id == worker_id && m.rank == rank)
    {
        return Some(format!(
            "worker {worker_id} is not rank {rank} of epoch {epoch}"
        ));
    }
    None
}

/// Reads exactly `N` bytes by `deadline`.
fn read_by<const N: usize>(s: &mut TcpStream, deadline: Instant) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    read_exact_by(s, &mut b, deadline)?;
    Ok(b)
}

/// Fills `buf` by `deadline`, however the peer trickles its bytes: each read waits at
/// most for what is left of the deadline.
fn read_exact_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no whole hello within {:.0} s", HELLO_TIMEOUT.as_secs_f64()),
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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
