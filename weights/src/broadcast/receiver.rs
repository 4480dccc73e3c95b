//! A member's side of the broadcast: its connection to the trainer for one epoch, and
//! the receipt, check and acknowledgement of each version.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::frame::{
    self, read_array, reply, ACK, CHECKSUM_DIFFERED, COLLECTIVE, COLLECTIVE_FAILED, INTACT, READY,
    VERSION, WELCOME,
};
use crate::collective::{Collective, SharedBackend};
use crate::error::{invalid, Result};

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
        let hello = frame::hello(
            epoch,
            rank,
            j.world_size,
            j.worker_id,
            collective.is_some(),
            j.token,
        );
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
        let intact = crate::bucket::checksums(&bytes, bucket_bytes) == sums;
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
