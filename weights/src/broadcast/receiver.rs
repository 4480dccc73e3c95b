//! A member's side of the broadcast: its connection to the trainer for one epoch, and
//! the receipt, check and acknowledgement of each version.
//!
//! A version's header is checked whole before a byte is allocated for it: its dtype is
//! one the model can take, its length is exactly the member's parameter count times
//! that dtype's size, and its bucket size and checksum count agree with that length.
//! A header that fails is refused: the connection is closed (the trainer names the
//! member and excludes it), and [`Receiver::refused`] says which version, so the
//! member fetches it over gRPC at once.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::frame::{
    self, read_array, reply, ACK, CHECKSUM_DIFFERED, COLLECTIVE, COLLECTIVE_FAILED, INTACT, READY,
    VERSION, WELCOME,
};
use crate::collective::{Collective, SharedBackend};
use crate::error::{invalid, Result};
use tandem_proto::limits::{printable, DTYPE_BYTES};

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
    /// The token this generator holds (the generator token, or the run's).
    pub token: &'a str,
    /// The session token the coordinator gave `worker_id`.
    pub session: &'a str,
    /// Parameters (elements) of the member's model: a version must carry exactly these.
    pub param_elements: u64,
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
        let refuse = |this: &mut Self, why: String| {
            // The rest of the frame is not read: the connection cannot go on.
            this.refused = Some(version);
            let _ = this.stream.shutdown(std::net::Shutdown::Both);
            invalid(format!(
                "weight broadcast: refused the header of v{version}: {why}; fetching it over gRPC"
            ))
        };
        let [plane, dlen] = read_array::<2>(s).map_err(io)?;
        if dlen as usize > DTYPE_BYTES {
            return Err(refuse(self, format!("a dtype of {dlen} bytes")));
        }
        let mut dtype = vec![0u8; dlen as usize];
        s.read_exact(&mut dtype).map_err(io)?;
        let dtype = String::from_utf8_lossy(&dtype).into_owned();
        let Some(elem) = dtype_bytes(&dtype) else {
            return Err(refuse(
                self,
                format!("dtype {:?} is not f32, bf16 or f16", printable(&dtype)),
            ));
        };
        let bucket_bytes = u64::from_le_bytes(read_array(s).map_err(io)?);
        let n = u32::from_le_bytes(read_array(s).map_err(io)?) as u64;
        // What this model's parameters take in that dtype: the only length accepted.
        let want = self.param_elements.saturating_mul(elem);
        let buckets = crate::bucket::count(want as usize, bucket_bytes.max(1) as usize) as u64;
        if bucket_bytes == 0 || n != buckets || n > MAX_BUCKETS {
            return Err(refuse(
                self,
                format!(
                    "{n} checksums of {bucket_bytes}-byte buckets, where this model's {want} bytes make {buckets}"
                ),
            ));
        }
        let mut sums = Vec::with_capacity(n as usize);
        for _ in 0..n {
            sums.push(u32::from_le_bytes(
                read_array(&mut self.stream).map_err(io)?,
            ));
        }
        let s = &mut self.stream;
        let announced = u64::from_le_bytes(read_array(s).map_err(io)?);
        if announced != want {
            return Err(refuse(
                self,
                format!(
                    "it announces {announced} bytes, this model's {} parameters in {dtype} are {want}",
                    self.param_elements
                ),
            ));
        }
        let len = want as usize;
        let s = &mut self.stream;
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
        let intact = crate::bucket::checksums(&bytes, bucket_bytes as usize) == sums;
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
            dtype,
            bytes,
        }))
    }
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
