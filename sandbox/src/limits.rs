//! The limits of one call.

use std::time::Duration;

/// What one call may use. `None` leaves a resource as the caller has it.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Wall-clock time, after which everything the call started is killed.
    pub wall: Duration,
    /// CPU seconds of each process (`RLIMIT_CPU`: killed past it).
    pub cpu_s: Option<u64>,
    /// Address space of each process in bytes (`RLIMIT_AS`).
    pub address_space: Option<u64>,
    /// Processes and threads the call's user may have at once (`RLIMIT_NPROC`; the
    /// user is the call's own, so the count is the call's).
    pub processes: Option<u64>,
    /// Largest file a process may write, in bytes (`RLIMIT_FSIZE`).
    pub file_size: Option<u64>,
    /// Size in bytes of the call's writable tmpfs (its working directory, `/tmp` and
    /// `/dev/shm` share it; a tmpfs is memory, so callers count it in their memory
    /// budget).
    pub tmpfs: u64,
    /// Open files of each process (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            wall: Duration::from_secs(10),
            cpu_s: None,
            address_space: None,
            processes: None,
            file_size: None,
            tmpfs: 16 << 20,
            open_files: None,
        }
    }
}

/// How much of an output stream a call keeps, and which end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Keep {
    /// The first `n` bytes (a program's results come first).
    Head(usize),
    /// The last `n` bytes (a traceback ends with the error).
    Tail(usize),
}
