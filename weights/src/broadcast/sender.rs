//! The trainer's side of the broadcast: a listener that members join (token-checked),
//! and [`Broadcaster::send`], which moves one version to every member of an epoch and
//! names those that did not take it.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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
    stream.write_all(&frame::welcome(ok, message, &id))?;
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
