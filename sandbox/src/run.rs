//! [`Sandbox`]: one call from spawn to its end.

use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capture;
use crate::enter::{self, Report};
use crate::error::Error;
use crate::limits::{Keep, Limits};
use crate::plan::{self, Identity, Network, Request, View};

/// Whose user a call runs as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum User {
    /// A user of its own per call (code a model wrote): under root a fresh uid
    /// ([`plan::call_uid`]), otherwise uid 1000 of a new user namespace.
    PerCall,
    /// The caller's user, seen as uid 1000 of a new user namespace without capabilities
    /// (agent programs: they read the user's own files).
    Caller,
}

/// How calls are isolated: built once, used for every call.
#[derive(Clone, Debug)]
pub struct Sandbox {
    view: View,
    network: Network,
    user: User,
}

/// One program to run.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    /// The program: an absolute path as the sandbox sees it (with [`View::Host`] a
    /// name is looked up on the call's `PATH`).
    pub program: &'a Path,
    pub args: &'a [String],
    /// The whole environment (nothing of the caller's is passed on).
    pub env: &'a [(String, String)],
    /// Files written into the working directory first ([`View::Minimal`]).
    pub files: &'a [(String, Vec<u8>)],
    /// Written to the program's standard input, which is then closed.
    pub stdin: &'a [u8],
    /// The working directory with [`View::Host`] (the caller's by default).
    pub cwd: Option<&'a Path>,
    pub limits: &'a Limits,
    pub stdout: Keep,
    pub stderr: Keep,
}

/// How a call ended.
#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// The program exited with this status.
    Exited(i32),
    /// A signal ended it (`SIGKILL` past `RLIMIT_CPU` or from the caller, `SIGSEGV`…).
    Signaled(i32),
    /// Killed at its wall time, with everything it started.
    WallTime,
}

/// What a call printed and how it ended. Every process it started has ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    pub end: End,
    pub seconds: f64,
}

impl Sandbox {
    /// A sandbox showing `view`, with or without the network. Paths of the view are
    /// checked here (each must exist and be absolute), so a bad one fails at start-up.
    pub fn new(view: View, network: Network, user: User) -> Result<Self, Error> {
        let view = match view {
            View::Minimal { read_only } => View::Minimal {
                read_only: read_only
                    .iter()
                    .map(|p| plan::checked_host_path(p))
                    .collect::<Result<_, _>>()?,
            },
            host @ View::Host { .. } => host,
        };
        Ok(Sandbox {
            view,
            network,
            user,
        })
    }

    /// Runs `call` to its end (or its wall time); an error only when the sandbox could
    /// not be set up or the program could not start.
    pub fn run(&self, call: &Call) -> Result<Ran, Error> {
        let minimal = matches!(self.view, View::Minimal { .. });
        if minimal && !call.program.is_absolute() {
            return Err(Error::Invalid(format!(
                "{}: the program of a sandbox is an absolute path",
                call.program.display()
            )));
        }
        // An empty folder of ours, the mount point of the call's new root (only in the
        // call's own mount namespace); removed after the call.
        let stage = if minimal {
            Some(
                tempfile::Builder::new()
                    .prefix(".tandem-sandbox-")
                    .tempdir()
                    .map_err(|e| Error::io("a staging folder for the sandbox", e))?,
            )
        } else {
            None
        };
        let identity = match self.user {
            User::PerCall => Identity::for_call(),
            User::Caller => Identity::mapped(),
        };
        let plan = Arc::new(plan::prepare(&Request {
            view: &self.view,
            network: self.network,
            identity,
            limits: call.limits,
            files: call.files,
            stage: stage.as_ref().map(|s| s.path()),
            cwd: call.cwd,
        })?);
        let (report_read, report_write) = report_pipe()?;
        let mut cmd = Command::new(call.program);
        cmd.args(call.args)
            .env_clear()
            .envs(call.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let report = Report {
            fd: std::os::unix::io::AsRawFd::as_raw_fd(&report_write),
        };
        let in_child = plan.clone();
        // SAFETY: `enter` is made for `pre_exec`: it runs in the forked child, makes only
        // async-signal-safe calls on data prepared above, and `report` stays open in the
        // child (this process closes its copy only after spawn returns).
        unsafe {
            cmd.pre_exec(move || enter::enter(&in_child, report));
        }
        let t0 = Instant::now();
        let spawned = cmd.spawn();
        drop(report_write);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => return Err(setup_error(&plan, report_read, call.program, e)),
        };
        let input = call.stdin.to_vec();
        let stdin = child.stdin.take();
        // A program that does not read its input gets a broken pipe, not a stall.
        let feeder = std::thread::spawn(move || {
            if let Some(mut s) = stdin {
                let _ = s.write_all(&input);
            }
        });
        let out = child.stdout.take().map(|s| capture::spawn(s, call.stdout));
        let err = child.stderr.take().map(|s| capture::spawn(s, call.stderr));
        let mut wall = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if t0.elapsed() >= call.limits.wall => {
                    wall = true;
                    // The first child: process 1 dies with it (its death signal), and
                    // the namespace with process 1.
                    let _ = child.kill();
                    break child
                        .wait()
                        .map_err(|e| Error::io("waiting for the sandbox", e))?;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(Error::io("waiting for the sandbox", e)),
            }
        };
        let _ = feeder.join();
        let stdout = out
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let stderr = err
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let end = if wall {
            End::WallTime
        } else if let Some(sig) = status.signal() {
            End::Signaled(sig)
        } else {
            End::Exited(status.code().unwrap_or(-1))
        };
        Ok(Ran {
            stdout,
            stderr,
            end,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }
}

/// A close-on-exec pipe (read end, write end) for the child's report.
fn report_pipe() -> Result<(std::fs::File, OwnedFd), Error> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(Error::io("a pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (r, w) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            OwnedFd::from_raw_fd(fds[1]),
        )
    };
    Ok((r, w))
}

/// The error of a spawn that failed: the step the child reported, or the exec's.
fn setup_error(
    plan: &plan::Plan,
    mut report: std::fs::File,
    program: &Path,
    spawn: std::io::Error,
) -> Error {
    let mut msg = [0u8; 8];
    if report.read_exact(&mut msg).is_ok() {
        let step = u32::from_le_bytes(msg[..4].try_into().expect("4 bytes")) as usize;
        let errno = i32::from_le_bytes(msg[4..].try_into().expect("4 bytes"));
        let what = plan.describe(step);
        return Error::Setup {
            hint: hint(&what, errno),
            step: what,
            source: std::io::Error::from_raw_os_error(errno),
        };
    }
    Error::io(format!("starting {}", program.display()), spawn)
}

/// What to do about a step that failed, where the cause is known.
fn hint(step: &str, errno: i32) -> String {
    let namespaces = step.starts_with("unshare") || step.contains("uid_map");
    let mounts = step.starts_with("mounting") || step.starts_with("making");
    if namespaces && (errno == libc::EPERM || errno == libc::ENOSPC || errno == libc::EINVAL) {
        " (this kernel or container does not let this user create namespaces: allow \
         unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, \
         user.max_user_namespaces > 0; on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0), \
         or in a container use the seccomp and AppArmor settings of deploy/ (docs/operations.md, \
         \"The python tool's sandbox\"))"
            .into()
    } else if mounts && errno == libc::EPERM {
        " (mounting is forbidden here: in a container, run it with the settings of \
         deploy/ (docs/operations.md, \"The python tool's sandbox\"): an unmasked /proc \
         and no AppArmor profile that denies mount)"
            .into()
    } else if step.contains("mount_setattr") || errno == libc::ENOSYS {
        " (Linux 5.12 or newer is needed)".into()
    } else {
        String::new()
    }
}

/// The interpreter's own folders, for [`View::Minimal`]: for the path and every link
/// it goes through, the prefix that holds it (`/opt/py` for `/opt/py/bin/python3`),
/// unless the system's folders hold it already. Its standard library lives there.
pub fn program_prefixes(program: &Path) -> Result<Vec<PathBuf>, Error> {
    if !program.is_absolute() {
        return Err(Error::Invalid(format!(
            "{}: give the interpreter as an absolute path",
            program.display()
        )));
    }
    let system = [
        "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
    ];
    let mut out: Vec<PathBuf> = Vec::new();
    let mut p = program.to_path_buf();
    for _ in 0..40 {
        let meta = std::fs::symlink_metadata(&p)
            .map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        let canonical_dir = dir.canonicalize().unwrap_or(dir.clone());
        if !system.iter().any(|s| canonical_dir.starts_with(s)) {
            let prefix = match canonical_dir.file_name().and_then(|n| n.to_str()) {
                Some("bin") | Some("sbin") => canonical_dir.parent().unwrap_or(&canonical_dir),
                _ => &canonical_dir,
            };
            if prefix != Path::new("/") && !out.iter().any(|o| prefix.starts_with(o)) {
                out.push(prefix.to_path_buf());
            }
        }
        if !meta.file_type().is_symlink() {
            return Ok(out);
        }
        let target =
            std::fs::read_link(&p).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        p = canonical_dir.join(target);
    }
    Err(Error::Invalid(format!(
        "{}: too many symbolic links",
        program.display()
    )))
}
