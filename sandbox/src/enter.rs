//! The steps of a [`Plan`] run between fork and exec.
//!
//! [`enter`] runs in the child of `Command::spawn` (through `pre_exec`): it makes the
//! namespaces, forks once more so that the program is process 1 of its new PID
//! namespace, and returns in that grandchild, which then execs the program. The first
//! child stays behind as the program's parent: it closes everything it holds, waits for
//! process 1, and exits as it did (the caller's `Child` is that first child, so killing
//! it kills process 1 through `PR_SET_PDEATHSIG`, and with process 1 the kernel kills
//! the whole namespace).
//!
//! Between fork and exec only async-signal-safe system calls are made: every path and
//! byte string was prepared by [`crate::plan`] before the fork, nothing allocates, and
//! a failure is reported as the step's index and `errno` on a pipe ([`Report`]).

use std::ffi::CStr;
use std::io;

use crate::plan::{Plan, Step};

/// Where the child reports a failed step: 4 bytes of step index, 4 of `errno`.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub fd: libc::c_int,
}

impl Report {
    /// Writes `(step, errno)` and gives the error back for `pre_exec` to return.
    ///
    /// # Safety
    /// `self.fd` is a pipe's write end that stays open for the call.
    unsafe fn fail(self, step: usize, err: io::Error) -> io::Error {
        let mut msg = [0u8; 8];
        let code = err.raw_os_error().unwrap_or(libc::EIO);
        msg[..4].copy_from_slice(&(step as u32).to_le_bytes());
        msg[4..].copy_from_slice(&code.to_le_bytes());
        // SAFETY: `msg` is 8 valid bytes; the fd is open (the caller's contract). A
        // failed write loses only the detail: spawn still fails with `err`.
        unsafe { libc::write(self.fd, msg.as_ptr().cast(), msg.len()) };
        err
    }
}

/// Runs `plan` and, in process 1 of the new PID namespace, returns for the program's
/// exec; the first child never returns (it waits for process 1 and exits as it did).
///
/// # Safety
/// Call only from a `pre_exec` closure: in the single-threaded child of a fork, before
/// exec, with `report` open for writing. `plan` was built by [`crate::plan::prepare`]
/// (its paths are NUL-terminated and its steps in order).
pub unsafe fn enter(plan: &Plan, report: Report) -> io::Result<()> {
    for (i, step) in plan.before.iter().enumerate() {
        // SAFETY: between fork and exec (this function's contract).
        if let Err(e) = unsafe { apply(step) } {
            // SAFETY: `report` is open (this function's contract).
            return Err(unsafe { report.fail(i, e) });
        }
    }
    let n = plan.before.len();
    let mut alive = [0 as libc::c_int; 2];
    // SAFETY: `alive` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        // SAFETY: as above.
        return Err(unsafe { report.fail(n, io::Error::last_os_error()) });
    }
    // SAFETY: this process is single-threaded (the child of a fork); the child of this
    // fork returns to run the rest of `pre_exec`'s contract.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        // SAFETY: as above.
        return Err(unsafe { report.fail(n, io::Error::last_os_error()) });
    }
    if pid > 0 {
        // SAFETY: the first child, single-threaded, between fork and exec.
        unsafe { wait_for_process_one(pid, alive[1]) }
    }
    // Process 1 of the new PID namespace.
    // SAFETY: closing our copy of the write end: only the first child holds it now.
    unsafe { libc::close(alive[1]) };
    // SAFETY: `alive[0]` is this process's read end of the pipe made above.
    unsafe { die_with_first_child(alive[0]) };
    for (i, step) in plan.after.iter().enumerate() {
        // SAFETY: between fork and exec.
        if let Err(e) = unsafe { apply(step) } {
            // SAFETY: `report` is open in this process too (inherited).
            return Err(unsafe { report.fail(n + i, e) });
        }
    }
    // A change of user clears the death signal: set it again, last.
    // SAFETY: as above.
    unsafe { die_with_first_child(alive[0]) };
    Ok(())
}

/// Process 1 dies when the first child does (`PR_SET_PDEATHSIG`); if the first child
/// died before this call, no signal would come, but its end of `alive` is closed: then
/// this process exits now.
///
/// # Safety
/// Between fork and exec; `alive` is the read end of a pipe whose only write end the
/// first child holds.
unsafe fn die_with_first_child(alive: libc::c_int) {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut poll = libc::pollfd {
        fd: alive,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let polled = unsafe { libc::poll(&mut poll, 1, 0) };
    if polled != 0 && poll.revents & libc::POLLHUP != 0 {
        // SAFETY: _exit ends this process without running anything of the parent's.
        unsafe { libc::_exit(1) };
    }
}

/// The first child's life after the second fork: hold nothing of the call's (so the
/// caller's pipes close when the program's processes end), wait for process 1, and
/// exit as it did.
///
/// # Safety
/// Single-threaded child of a fork, between fork and exec; `pid` its own child.
unsafe fn wait_for_process_one(pid: libc::pid_t, keep: libc::c_int) -> ! {
    // SAFETY: closing descriptors this process owns; `keep` stays open until exit so
    // that process 1 can tell this process is alive.
    unsafe {
        for fd in 0..3 {
            if fd != keep {
                libc::close(fd);
            }
        }
        if keep > 3 {
            close_range(3, keep as libc::c_uint - 1);
        }
        close_range(keep as libc::c_uint + 1, libc::c_uint::MAX);
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int; `pid` is this process's child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: ends this process.
            unsafe { libc::_exit(126) };
        }
    }
    if libc::WIFEXITED(status) {
        // SAFETY: ends this process.
        unsafe { libc::_exit(libc::WEXITSTATUS(status)) };
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // Die of the same signal, so the caller sees how the program ended.
        // SAFETY: resets one signal's disposition, unblocks it and sends it to this
        // process; plain integer arguments and a zeroed mask.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
        // SAFETY: ends this process (a signal that does not kill by default).
        unsafe { libc::_exit(128 + sig) };
    }
    // SAFETY: ends this process.
    unsafe { libc::_exit(126) }
}

/// Closes `first..=last`, by `close_range` or one by one where the kernel lacks it.
///
/// # Safety
/// Closes descriptors of this process: only where nothing uses them afterwards.
unsafe fn close_range(first: libc::c_uint, last: libc::c_uint) {
    if first > last {
        return;
    }
    // SAFETY: integer arguments.
    if unsafe { libc::close_range(first, last, 0) } == 0 {
        return;
    }
    let top = last.min(65_535);
    for fd in first..=top {
        // SAFETY: closing a descriptor number (EBADF when none).
        unsafe { libc::close(fd as libc::c_int) };
    }
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ptr_or_null(c: &Option<std::ffi::CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// `struct mount_attr` of `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// `struct __user_cap_header_struct` and `__user_cap_data_struct` (version 3).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Writes all of `bytes` to `fd`.
///
/// # Safety
/// `fd` is an open descriptor.
unsafe fn write_all(fd: libc::c_int, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for its length; `fd` is open (contract).
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Opens `path` with `flags`, writes `bytes`, closes.
///
/// # Safety
/// Between fork and exec, or anywhere: only system calls on a fresh descriptor.
unsafe fn write_file(
    path: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
    bytes: &[u8],
) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    check(fd)?;
    // SAFETY: `fd` was just opened.
    let written = unsafe { write_all(fd, bytes) };
    // SAFETY: closing the descriptor opened above.
    let closed = check(unsafe { libc::close(fd) });
    written.and(closed)
}

/// One step.
///
/// # Safety
/// Between fork and exec in a single-threaded child (or a process that may change its
/// namespaces, mounts and credentials as the step says).
unsafe fn apply(step: &Step) -> io::Result<()> {
    // SAFETY: for every call below, each pointer comes from a `CString` or slice of
    // `step`, alive for the call; every other argument is an integer or a struct built
    // here. This process may change its own namespaces and credentials (contract).
    unsafe {
        match step {
            Step::Setsid => check(libc::setsid()),
            Step::DieWithParent => check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL)),
            Step::Unshare(flags) => check(libc::unshare(*flags)),
            Step::WriteExisting { path, bytes } => write_file(path, libc::O_WRONLY, 0, bytes),
            Step::Umask(mode) => {
                libc::umask(*mode);
                Ok(())
            }
            Step::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => check(libc::mount(
                ptr_or_null(source),
                target.as_ptr(),
                ptr_or_null(fstype),
                *flags,
                ptr_or_null(data).cast(),
            )),
            Step::SetAttr {
                target,
                set,
                recursive,
            } => mount_setattr(target, *set, *recursive),
            Step::Unmount(target) => check(libc::umount2(target.as_ptr(), libc::MNT_DETACH)),
            Step::Mkdir { path, mode } => {
                check(libc::mkdir(path.as_ptr(), *mode))?;
                // The mode exactly (umask does not apply to chmod): sticky /tmp.
                check(libc::chmod(path.as_ptr(), *mode))
            }
            Step::Rmdir(path) => check(libc::rmdir(path.as_ptr())),
            Step::Touch(path) => write_file(
                path,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                0o644,
                &[],
            ),
            Step::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr())),
            Step::Chown { path, uid, gid } => check(libc::lchown(path.as_ptr(), *uid, *gid)),
            Step::WriteNew { path, bytes, mode } => write_file(
                path,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
                *mode,
                bytes,
            ),
            Step::Hostname(name) => check(libc::sethostname(name.as_ptr(), name.as_bytes().len())),
            Step::PivotRoot(root) => pivot_root(root),
            Step::Chdir(path) => check(libc::chdir(path.as_ptr())),
            Step::SetIds { uid, gid } => {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(*gid, *gid, *gid))?;
                check(libc::setresuid(*uid, *uid, *uid))
            }
            Step::DropCapabilities => drop_capabilities(),
            Step::Limit { resource, value } => {
                let r = libc::rlimit {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                check(libc::setrlimit(*resource, &r))
            }
            Step::NoNewPrivileges => check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)),
            Step::CloseOnExec => check(libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            )),
        }
    }
}

/// `mount_setattr(2)` on `target` (not following a link), setting `set`, on the whole
/// tree below it when `recursive`.
///
/// # Safety
/// As [`apply`]'s.
unsafe fn mount_setattr(target: &std::ffi::CStr, set: u64, recursive: bool) -> io::Result<()> {
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: `target` is NUL-terminated and `attr` lives for the call, with its size
    // passed beside it; changing this process's mounts is allowed (contract).
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    } as libc::c_int)
}

/// Makes `root` the root: `pivot_root(".", ".")` inside it stacks the old root under
/// the new one, which is then detached.
///
/// # Safety
/// As [`apply`]'s.
unsafe fn pivot_root(root: &std::ffi::CStr) -> io::Result<()> {
    let dot = c".".as_ptr();
    // SAFETY: every path is NUL-terminated and alive for its call; changing this
    // process's root and mounts is allowed (contract).
    unsafe {
        check(libc::chdir(root.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)?;
        check(libc::umount2(dot, libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))
    }
}

/// Drops every capability: the bounding set, the ambient set, then the effective,
/// permitted and inheritable sets.
///
/// # Safety
/// As [`apply`]'s.
unsafe fn drop_capabilities() -> io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: `header` and `data` live for the calls, `data` holds the two entries
    // version 3 reads; changing this process's credentials is allowed (contract).
    unsafe {
        for cap in 0..64 {
            // EINVAL past the last capability this kernel knows.
            libc::prctl(libc::PR_CAPBSET_DROP, cap);
        }
        check(libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        ))?;
        check(
            libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr())
                as libc::c_int,
        )
    }
}
