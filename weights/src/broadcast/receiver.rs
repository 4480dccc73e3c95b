//! A member's side of the broadcast: its connection to the trainer for one epoch, and
//! the receipt, check and acknowledgement of each version.
//!
//! A version's header is checked whole before a byte is allocated for it: its dtype is
//! one the model can take, its kind is the member's (a LoRA adapter's A and B for the
//! base the member's adapter is on, or a full model's parameters to a member without an
//! adapter), its length is exactly the member's trainable parameter count times that
//! dtype's size, and its bucket size and checksum count agree with that length. A
//! header that fails is refused: the connection is closed (the trainer names the
//! member and excludes it), and [`Receiver::refused`] says which version, so the
//! member fetches it over gRPC at once (where a version of the wrong kind is refused
//! again, for good: see the generator's weight sync).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::frame::{
    self, read_array, reply, ACK, ADAPTER, CHECKSUM_DIFFERED, COLLECTIVE, COLLECTIVE_FAILED, FULL,
    INTACT, READY, VERSION, WELCOME,
};
use crate::collective::{Collective, SharedBackend};
use crate::error::{invalid, Error, Result};
use tandem_proto::limits::{printable, DTYPE_BYTES};

/// A version as a member received it.
#[derive(Debug)]
pub struct Received {
    pub version: u64,
    pub dtype: String,
    /// The base it is an adapter of (`None`: a full model's parameters); the member's
    /// own, as the header was checked.
    pub base: Option<u64>,
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
    /// The token this generator holds (the generator token, or the run's).
    pub token: &'a str,
    /// The session token the coordinator gave `worker_id`.
    pub session: &'a str,
    /// Trainable parameters (elements) of the member's model (its adapter's A and B
    /// under LoRA, else every parameter): a version must carry exactly these.
    pub param_elements: u64,
    /// The base the member's adapter is on (`None`: no adapter): a version must be an
    /// adapter of this base, or a full model's parameters when `None`.
    pub base: Option<u64>,
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
    param_elements: u64,
    base: Option<u64>,
    /// The version of the last header refused.
    refused: Option<u64>,
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
        let hello = frame::hello(
            epoch,
            rank,
            j.world_size,
            j.worker_id,
            collective.is_some(),
            j.token,
            j.session,
        );
        stream.set_read_timeout(Some(timeout)).map_err(fail)?;
        stream.write_all(&hello).map_err(fail)?;
        let reply: [u8; 7] = read_array(&mut stream).map_err(fail)?;
        let mut message = vec![0u8; u16::from_le_bytes([reply[5], reply[6]]) as usize];
        stream.read_exact(&mut message).map_err(fail)?;
        if &reply[..4] != WELCOME || reply[4] != 1 {
            return Err(invalid(format!(
                "the trainer at {addr} refused the broadcast join: {}",
                printable(&String::from_utf8_lossy(&message))
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
            param_elements: j.param_elements,
            base: j.base,
            refused: None,
        })
    }

    /// The version whose header this member refused last (it fetches that one over
    /// gRPC; the connection is closed).
    pub fn refused(&self) -> Option<u64> {
        self.refused
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
        let Some(first) = self.first_byte(poll)? else {
            return Ok(None);
        };
        let deadline = Instant::now() + frame_timeout;
        self.stream
            .set_read_timeout(Some(frame_timeout))
            .map_err(io)?;
        let header = self.read_header(first)?;
        let version = header.version;
        let bytes = self.read_body(&header, deadline)?;
        let intact = crate::bucket::checksums(&bytes, header.bucket_bytes) == header.sums;
        let status = if intact { INTACT } else { CHECKSUM_DIFFERED };
        self.stream
            .write_all(&reply(ACK, version, status))
            .map_err(io)?;
        if header.epoch != self.epoch {
            return Err(invalid(format!(
                "weight broadcast: v{version} came for epoch {}, this member is in {}",
                header.epoch, self.epoch
            )));
        }
        if !intact {
            return Err(invalid(format!(
                "weight broadcast: v{version} arrived with a checksum mismatch"
            )));
        }
        Ok(Some(Received {
            version,
            dtype: header.dtype,
            base: header.base,
            bytes,
        }))
    }

    /// The first byte of the next frame, if one begins within `poll`.
    fn first_byte(&mut self, poll: Duration) -> Result<Option<u8>> {
        self.stream
            .set_read_timeout(Some(poll.max(Duration::from_millis(1))))
            .map_err(io)?;
        let mut first = [0u8; 1];
        match self.stream.read(&mut first) {
            Ok(0) => Err(invalid("the trainer closed the weight broadcast")),
            Ok(_) => Ok(Some(first[0])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(io(e)),
        }
    }

    /// Refuses the header of `version`: the rest of the frame is not read, so the
    /// connection cannot go on.
    fn refuse(&mut self, version: u64, why: String) -> Error {
        self.refused = Some(version);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        invalid(format!(
            "weight broadcast: refused the header of v{version}: {why}; fetching it over gRPC"
        ))
    }

    /// A version frame's header after its first byte, checked against this model: the
    /// only kind accepted is the model's (an adapter of its base, or full without one),
    /// the only length what its trainable parameters take in the announced dtype.
    fn read_header(&mut self, first: u8) -> Result<Header> {
        let s = &mut self.stream;
        let rest: [u8; 3] = read_array(s).map_err(io)?;
        if first != VERSION[0] || rest != VERSION[1..] {
            return Err(invalid("weight broadcast: not a version frame"));
        }
        let epoch = u64::from_le_bytes(read_array(s).map_err(io)?);
        let version = u64::from_le_bytes(read_array(s).map_err(io)?);
        let [plane, dlen] = read_array::<2>(s).map_err(io)?;
        if dlen as usize > DTYPE_BYTES {
            return Err(self.refuse(version, format!("a dtype of {dlen} bytes")));
        }
        let mut dtype = vec![0u8; dlen as usize];
        s.read_exact(&mut dtype).map_err(io)?;
        let dtype = String::from_utf8_lossy(&dtype).into_owned();
        let Some(elem) = dtype_bytes(&dtype) else {
            let why = format!("dtype {:?} is not f32, bf16 or f16", printable(&dtype));
            return Err(self.refuse(version, why));
        };
        let [adapter] = read_array::<1>(s).map_err(io)?;
        let fingerprint = u64::from_le_bytes(read_array(s).map_err(io)?);
        let base = match (adapter, fingerprint) {
            (ADAPTER, b) => Some(b),
            (FULL, 0) => None,
            (FULL, b) => {
                let why = format!("a base {b:#018x} on a full model's parameters");
                return Err(self.refuse(version, why));
            }
            (a, _) => {
                let why = format!("adapter = {a} (0 = a full model, 1 = a LoRA adapter)");
                return Err(self.refuse(version, why));
            }
        };
        if let Err(m) = crate::snapshot::check_base(version, base, self.base) {
            return Err(self.refuse(version, m.to_string()));
        }
        let s = &mut self.stream;
        let bucket_bytes = u64::from_le_bytes(read_array(s).map_err(io)?);
        let n = u32::from_le_bytes(read_array(s).map_err(io)?) as u64;
        let want = self.param_elements.saturating_mul(elem);
        let buckets = crate::bucket::count(want as usize, bucket_bytes.max(1) as usize) as u64;
        if bucket_bytes == 0 || n != buckets || n > MAX_BUCKETS {
            let why = format!(
                "{n} checksums of {bucket_bytes}-byte buckets, where this model's {want} bytes make {buckets}"
            );
            return Err(self.refuse(version, why));
        }
        let mut sums = Vec::with_capacity(n as usize);
        for _ in 0..n {
            sums.push(u32::from_le_bytes(
                read_array(&mut self.stream).map_err(io)?,
            ));
        }
        let announced = u64::from_le_bytes(read_array(&mut self.stream).map_err(io)?);
        if announced != want {
            let why = format!(
                "it announces {announced} bytes, this model's {} parameters in {dtype} are {want}",
                self.param_elements
            );
            return Err(self.refuse(version, why));
        }
        Ok(Header {
            epoch,
            version,
            plane,
            dtype,
            base,
            bucket_bytes: bucket_bytes as usize,
            sums,
            len: want as usize,
        })
    }

    /// The version's bytes, inline on this connection or through the epoch's
    /// collective (after telling the trainer this member is ready), into the spare
    /// buffer (same size as last time: no allocation, nothing zeroed).
    fn read_body(&mut self, header: &Header, deadline: Instant) -> Result<Vec<u8>> {
        let version = header.version;
        let mut bytes = std::mem::take(&mut self.spare);
        bytes.resize(header.len, 0);
        if header.plane != COLLECTIVE {
            self.stream.read_exact(&mut bytes).map_err(io)?;
            return Ok(bytes);
        }
        let got = match self.collective.as_mut() {
            Some(c) => {
                self.stream
                    .write_all(&reply(READY, version, 0))
                    .map_err(io)?;
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
        Ok(bytes)
    }
}

/// A version frame's header.
struct Header {
    epoch: u64,
    version: u64,
    /// Inline or [`COLLECTIVE`].
    plane: u8,
    dtype: String,
    /// The base it is an adapter of (`None`: a full model's parameters).
    base: Option<u64>,
    bucket_bytes: usize,
    /// One checksum per bucket.
    sums: Vec<u32>,
    /// The version's bytes.
    len: usize,
}

/// An I/O error of the broadcast connection.
fn io(e: std::io::Error) -> Error {
    invalid(format!("weight broadcast from the trainer: {e}"))
}

/// The most buckets a version may be cut into (4 MiB of checksums; the trainer's
/// buckets are MiBs, so this is 1 TiB of weights).
const MAX_BUCKETS: u64 = 1 << 20;

/// Bytes per element of a dtype a model takes.
fn dtype_bytes(dtype: &str) -> Option<u64> {
    match dtype {
        "f32" => Some(4),
        "bf16" | "f16" => Some(2),
        _ => None,
    }
}
