//! A call's sandbox as data: the namespaces, mounts and identity of one call, as a list
//! of [`Step`]s with every path and string prepared before the fork, so that the child
//! only makes system calls (nothing between fork and exec may allocate).

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Error;
use crate::limits::Limits;

/// Which host files a call sees.
#[derive(Clone, Debug, PartialEq)]
pub enum View {
    /// A fresh root: the system's program folders (`/usr`, `/bin`, `/sbin`, `/lib*` as
    /// the host has them, read-only), `/etc/ld.so.cache`, these host paths read-only at
    /// the same place, `/dev/{null,zero,full,random,urandom}`, its own `/proc`, and one
    /// writable tmpfs of [`Limits::tmpfs`] bytes as `/work` (the working directory),
    /// `/tmp` and `/dev/shm`. Nothing else of the host exists.
    Minimal { read_only: Vec<PathBuf> },
    /// The host's files as the caller sees them, with these paths hidden (an empty
    /// read-only tmpfs over a folder, an empty file over a file), its own `/proc` and
    /// `/dev/shm`. For programs the user wrote (agent programs), which need their own
    /// files, not for code a model wrote.
    Host { hidden: Vec<PathBuf> },
}

/// Whether a call reaches any network.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Network {
    /// A network namespace of its own: a loopback that is down, nothing else (no TCP,
    /// no UDP, no abstract Unix socket of the host).
    None,
    /// The host's network (an agent program calls the generator's endpoint).
    Host,
}

/// The uid of the user a sandboxed call inside the sandbox, in a user namespace of its
/// own (the caller is not root).
pub const INSIDE_UID: u32 = 1000;

/// First uid handed to calls when the caller is root ([`call_uid`]).
pub const CALL_UID_BASE: u32 = 2_000_000_000;
/// How many uids [`call_uid`] cycles through.
pub const CALL_UID_SPAN: u32 = 1 << 24;

/// A uid for one call made by root: in `[CALL_UID_BASE, CALL_UID_BASE + CALL_UID_SPAN)`,
/// never the same twice in a row within a process and spread by process id across
/// processes, so that no two calls share a user (their process limit, their files);
/// no account on the host may own this range.
pub fn call_uid() -> u32 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let spread = u64::from(std::process::id()).wrapping_mul(40_503);
    CALL_UID_BASE + (spread.wrapping_add(n) % u64::from(CALL_UID_SPAN)) as u32
}

/// Who the program runs as.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Identity {
    /// The caller is root: the call's own uid and gid on the host (no user namespace:
    /// root builds the mounts, then drops to this user, which loses every capability).
    Host { uid: u32 },
    /// The caller is not root: a new user namespace mapping [`INSIDE_UID`] to the
    /// caller's uid and gid; the program runs without capabilities.
    Namespace { uid: u32, gid: u32 },
}

impl Identity {
    /// The identity of a call made by this process.
    pub fn for_call() -> Self {
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if uid == 0 {
            Identity::Host { uid: call_uid() }
        } else {
            Identity::Namespace { uid, gid }
        }
    }

    /// The identity of a program that needs the caller's own file permissions (an
    /// agent program): always a user namespace, [`INSIDE_UID`] mapped to the caller.
    pub fn mapped() -> Self {
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Identity::Namespace { uid, gid }
    }
}

/// One step of building a sandbox, run by [`crate::enter`] between fork and exec.
#[derive(Debug)]
pub enum Step {
    /// `setsid()`: a session of its own, no controlling terminal.
    Setsid,
    /// `prctl(PR_SET_PDEATHSIG, SIGKILL)`: die with the thread that started the call.
    DieWithParent,
    /// `unshare(flags)`.
    Unshare(libc::c_int),
    /// Writes `bytes` to an existing file (`/proc/self/uid_map` and the like).
    WriteExisting {
        path: CString,
        bytes: Vec<u8>,
    },
    /// `umask(mode)`.
    Umask(libc::mode_t),
    /// `mount(2)`.
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
    },
    /// `mount_setattr(2)`: sets these `MOUNT_ATTR_*` flags on the mount at `target`
    /// (and the mounts below it when `recursive`).
    SetAttr {
        target: CString,
        set: u64,
        recursive: bool,
    },
    /// `umount2(target, MNT_DETACH)`.
    Unmount(CString),
    Mkdir {
        path: CString,
        mode: libc::mode_t,
    },
    Rmdir(CString),
    /// An empty file (a mount point for a file).
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    Chown {
        path: CString,
        uid: u32,
        gid: u32,
    },
    /// A new file with these bytes (`O_EXCL | O_NOFOLLOW`).
    WriteNew {
        path: CString,
        bytes: Vec<u8>,
        mode: libc::mode_t,
    },
    /// `sethostname`.
    Hostname(CString),
    /// Makes `path` the root (`pivot_root` and detaching the old root).
    PivotRoot(CString),
    Chdir(CString),
    /// `setgroups(0)`, `setresgid`, `setresuid` (the caller is root: every capability
    /// goes with the change of user).
    SetIds {
        uid: u32,
        gid: u32,
    },
    /// Empties the bounding, ambient, effective, permitted and inheritable capability
    /// sets (inside a user namespace the caller holds them all).
    DropCapabilities,
    /// `setrlimit(resource, value)` (soft and hard).
    Limit {
        resource: libc::__rlimit_resource_t,
        value: u64,
    },
    /// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: no set-uid program or file capability gives
    /// back what was dropped.
    NoNewPrivileges,
    /// Every descriptor from 3 up is closed at exec (`close_range` with
    /// `CLOSE_RANGE_CLOEXEC`): nothing the caller had open reaches the program.
    CloseOnExec,
}

/// A call's steps: `before` runs in the first child (it makes the namespaces), `after`
/// in the program's own process, process 1 of the new PID namespace.
#[derive(Debug)]
pub struct Plan {
    pub before: Vec<Step>,
    pub after: Vec<Step>,
}

impl Plan {
    /// The step numbered `i` (numbered `before` first, then `after`), for an error.
    pub fn describe(&self, i: usize) -> String {
        let step = if i < self.before.len() {
            self.before.get(i)
        } else {
            self.after.get(i - self.before.len())
        };
        match step {
            Some(s) => describe(s),
            None => format!("step {i}"),
        }
    }
}

fn show(c: &CString) -> String {
    String::from_utf8_lossy(c.as_bytes()).into_owned()
}

fn describe(s: &Step) -> String {
    match s {
        Step::Setsid => "setsid".into(),
        Step::DieWithParent => "prctl(PR_SET_PDEATHSIG)".into(),
        Step::Unshare(f) => format!("unshare({})", namespaces(*f)),
        Step::WriteExisting { path, .. } => format!("writing {}", show(path)),
        Step::Umask(_) => "umask".into(),
        Step::Mount {
            source,
            target,
            fstype,
            ..
        } => format!(
            "mounting {} on {}",
            fstype
                .as_ref()
                .or(source.as_ref())
                .map(show)
                .unwrap_or_else(|| "(propagation)".into()),
            show(target)
        ),
        Step::SetAttr { target, .. } => format!("making {} read-only", show(target)),
        Step::Unmount(t) => format!("unmounting {}", show(t)),
        Step::Mkdir { path, .. } => format!("mkdir {}", show(path)),
        Step::Rmdir(p) => format!("rmdir {}", show(p)),
        Step::Touch(p) => format!("creating {}", show(p)),
        Step::Symlink { link, .. } => format!("symlink {}", show(link)),
        Step::Chown { path, .. } => format!("chown {}", show(path)),
        Step::WriteNew { path, .. } => format!("writing {}", show(path)),
        Step::Hostname(_) => "sethostname".into(),
        Step::PivotRoot(p) => format!("pivot_root to {}", show(p)),
        Step::Chdir(p) => format!("chdir {}", show(p)),
        Step::SetIds { uid, .. } => format!("switching to uid {uid}"),
        Step::DropCapabilities => "dropping capabilities".into(),
        Step::Limit { resource, value } => format!("setrlimit({resource}, {value})"),
        Step::NoNewPrivileges => "prctl(PR_SET_NO_NEW_PRIVS)".into(),
        Step::CloseOnExec => "close_range(CLOSE_RANGE_CLOEXEC)".into(),
    }
}

fn namespaces(flags: libc::c_int) -> String {
    [
        (libc::CLONE_NEWUSER, "user"),
        (libc::CLONE_NEWNS, "mount"),
        (libc::CLONE_NEWPID, "pid"),
        (libc::CLONE_NEWIPC, "ipc"),
        (libc::CLONE_NEWUTS, "uts"),
        (libc::CLONE_NEWNET, "network"),
        (libc::CLONE_NEWCGROUP, "cgroup"),
    ]
    .iter()
    .filter(|(f, _)| flags & f != 0)
    .map(|(_, n)| *n)
    .collect::<Vec<_>>()
    .join(" + ")
}

/// `MOUNT_ATTR_*` of `<linux/mount.h>`.
pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// What a prepared call needs beside its view.
pub struct Request<'a> {
    pub view: &'a View,
    pub network: Network,
    pub identity: Identity,
    pub limits: &'a Limits,
    /// Files written into the working directory (name, bytes) with [`View::Minimal`].
    pub files: &'a [(String, Vec<u8>)],
    /// The folder on the host the new root is built on ([`View::Minimal`]): an empty
    /// directory of the caller's, used only as a mount point inside the call's own
    /// mount namespace.
    pub stage: Option<&'a Path>,
    /// The working directory with [`View::Host`].
    pub cwd: Option<&'a Path>,
}

pub(crate) fn cstring(p: impl AsRef<OsStr>) -> Result<CString, Error> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| {
        Error::Invalid(format!(
            "{:?}: a path with a NUL byte",
            p.as_ref().to_string_lossy()
        ))
    })
}

/// `path` under `root` (`path` absolute).
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Whether `path` is `dir` or inside it.
fn within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// The program folders of a system, as the host has them: bound read-only when they
/// are folders, recreated when they are links (merged-`/usr` systems).
const SYSTEM: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// Device nodes a program may open.
const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// A host path to show read-only: canonical, absolute, existing, not `/`.
pub fn checked_host_path(p: &Path) -> Result<PathBuf, Error> {
    if !p.is_absolute() {
        return Err(Error::Invalid(format!(
            "{}: give an absolute path",
            p.display()
        )));
    }
    let canonical = p.canonicalize().map_err(|e| {
        Error::Invalid(format!("{}: {e} (it must exist on this host)", p.display()))
    })?;
    if canonical == Path::new("/") {
        return Err(Error::Invalid(format!(
            "{}: the whole file system cannot be shown to a sandbox",
            p.display()
        )));
    }
    Ok(canonical)
}

/// The steps of one call.
pub fn prepare(r: &Request) -> Result<Plan, Error> {
    let mut flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    if r.network == Network::None {
        flags |= libc::CLONE_NEWNET;
    }
    let mut before = vec![Step::Setsid, Step::DieWithParent];
    match r.identity {
        Identity::Host { .. } => before.push(Step::Unshare(flags)),
        Identity::Namespace { uid, gid } => {
            before.push(Step::Unshare(flags | libc::CLONE_NEWUSER));
            before.push(Step::WriteExisting {
                path: cstring("/proc/self/setgroups")?,
                bytes: b"deny".to_vec(),
            });
            before.push(Step::WriteExisting {
                path: cstring("/proc/self/uid_map")?,
                bytes: format!("{INSIDE_UID} {uid} 1\n").into_bytes(),
            });
            before.push(Step::WriteExisting {
                path: cstring("/proc/self/gid_map")?,
                bytes: format!("{INSIDE_UID} {gid} 1\n").into_bytes(),
            });
        }
    }
    let mut after = vec![
        Step::Umask(0o022),
        // Nothing mounted here reaches the host, nor the host's mounts here.
        Step::Mount {
            source: None,
            target: cstring("/")?,
            fstype: None,
            flags: libc::MS_REC | libc::MS_PRIVATE,
            data: None,
        },
    ];
    match r.view {
        View::Minimal { read_only } => minimal(r, read_only, &mut after)?,
        View::Host { hidden } => host(r, hidden, &mut after)?,
    }
    after.push(Step::Hostname(cstring("sandbox")?));
    match r.identity {
        Identity::Host { uid } => after.push(Step::SetIds { uid, gid: uid }),
        Identity::Namespace { .. } => after.push(Step::DropCapabilities),
    }
    let l = r.limits;
    for (resource, value) in [
        (libc::RLIMIT_CPU, l.cpu_s),
        (libc::RLIMIT_AS, l.address_space),
        (libc::RLIMIT_NPROC, l.processes),
        (libc::RLIMIT_FSIZE, l.file_size),
        (libc::RLIMIT_NOFILE, l.open_files),
        (libc::RLIMIT_CORE, Some(0)),
    ] {
        if let Some(value) = value {
            after.push(Step::Limit { resource, value });
        }
    }
    after.push(Step::NoNewPrivileges);
    after.push(Step::CloseOnExec);
    Ok(Plan { before, after })
}

/// A fresh root on `stage` holding only what a program needs to run: the program
/// folders read-only, a few devices, its own `/proc`, one writable tmpfs, the call's
/// files, then `pivot_root` into it.
fn minimal(r: &Request, read_only: &[PathBuf], steps: &mut Vec<Step>) -> Result<(), Error> {
    let stage = r
        .stage
        .ok_or_else(|| Error::Invalid("a minimal view needs a staging folder".into()))?;
    let mut root = Skeleton {
        stage,
        steps,
        made: Vec::new(),
    };
    root.steps
        .push(tmpfs(cstring(stage)?, 1 << 20, 1024, "0755"));
    root.program_folders(read_only)?;
    root.devices()?;
    root.proc()?;
    let owner = match r.identity {
        Identity::Host { uid } => Some(uid),
        Identity::Namespace { .. } => None,
    };
    root.scratch(r.limits.tmpfs, owner)?;
    root.work_files(r.files, owner)?;
    let steps = root.steps;
    steps.push(Step::PivotRoot(cstring(stage)?));
    // The skeleton itself (mount points, links) becomes read-only too.
    steps.push(Step::SetAttr {
        target: cstring("/")?,
        set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        recursive: false,
    });
    steps.push(Step::Chdir(cstring("/work")?));
    Ok(())
}

/// A tmpfs mount of `size` bytes and `inodes` inodes at `target`.
fn tmpfs(target: CString, size: u64, inodes: u64, mode: &str) -> Step {
    Step::Mount {
        source: Some(c"tandem-sandbox".to_owned()),
        target,
        fstype: Some(c"tmpfs".to_owned()),
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some(
            CString::new(format!("size={size},nr_inodes={inodes},mode={mode}"))
                .expect("no NUL in numbers"),
        ),
    }
}

/// The steps that build a minimal root under `stage`, and the folders they made.
struct Skeleton<'a> {
    stage: &'a Path,
    steps: &'a mut Vec<Step>,
    made: Vec<PathBuf>,
}

impl Skeleton<'_> {
    /// `p` (an absolute path of the new root) on the staging folder.
    fn at(&self, p: &str) -> Result<CString, Error> {
        cstring(under(self.stage, Path::new(p)))
    }

    fn bind_read_only(&mut self, path: &Path, is_dir: bool) -> Result<(), Error> {
        bind_read_only(self.stage, path, is_dir, self.steps, &mut self.made)
    }

    fn mkdir_all(&mut self, path: &str) -> Result<(), Error> {
        mkdir_all(self.stage, Path::new(path), self.steps, &mut self.made)
    }

    /// The system's program folders, then the caller's paths, each read-only. A path
    /// inside one already shown is visible through it.
    fn program_folders(&mut self, read_only: &[PathBuf]) -> Result<(), Error> {
        let mut shown: Vec<PathBuf> = Vec::new();
        for dir in SYSTEM {
            let p = Path::new(dir);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(p)
                        .map_err(|e| Error::Invalid(format!("{dir}: reading the link: {e}")))?;
                    let link = self.at(dir)?;
                    self.steps.push(Step::Symlink {
                        target: cstring(&target)?,
                        link,
                    });
                }
                Ok(m) if m.is_dir() => {
                    self.bind_read_only(p, true)?;
                    shown.push(p.to_path_buf());
                }
                _ => {}
            }
        }
        let cache = Path::new("/etc/ld.so.cache");
        if cache.is_file() {
            self.bind_read_only(cache, false)?;
        }
        for p in read_only {
            let p = checked_host_path(p)?;
            if shown.iter().any(|s| within(&p, s)) {
                continue;
            }
            self.bind_read_only(&p, p.is_dir())?;
            shown.push(p);
        }
        Ok(())
    }

    /// The host's device nodes of [`DEVICES`], bound (a user namespace cannot make
    /// nodes) and not executable, and the `/dev/std*` links.
    fn devices(&mut self) -> Result<(), Error> {
        self.mkdir_all("/dev")?;
        for d in DEVICES {
            let host = Path::new("/dev").join(d);
            if !host.exists() {
                continue;
            }
            let target = self.at(&format!("/dev/{d}"))?;
            self.steps.push(Step::Touch(target.clone()));
            self.steps.push(Step::Mount {
                source: Some(cstring(&host)?),
                target: target.clone(),
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            });
            self.steps.push(Step::SetAttr {
                target,
                set: MOUNT_ATTR_NOSUID | MOUNT_ATTR_NOEXEC,
                recursive: false,
            });
        }
        for (link, target) in [
            ("/dev/fd", "/proc/self/fd"),
            ("/dev/stdin", "/proc/self/fd/0"),
            ("/dev/stdout", "/proc/self/fd/1"),
            ("/dev/stderr", "/proc/self/fd/2"),
        ] {
            let link = self.at(link)?;
            self.steps.push(Step::Symlink {
                target: cstring(target)?,
                link,
            });
        }
        Ok(())
    }

    /// The call's own `/proc` (it is process 1 of its PID namespace).
    fn proc(&mut self) -> Result<(), Error> {
        self.mkdir_all("/proc")?;
        let target = self.at("/proc")?;
        self.steps.push(Step::Mount {
            source: Some(c"proc".to_owned()),
            target,
            fstype: Some(c"proc".to_owned()),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data: None,
        });
        Ok(())
    }

    /// One writable tmpfs of `size` bytes: the working directory `/work` (owned by
    /// `owner` when the call runs as a host user), `/tmp` and `/dev/shm` share it.
    fn scratch(&mut self, size: u64, owner: Option<u32>) -> Result<(), Error> {
        let scratch = self.at("/.scratch")?;
        self.steps.push(Step::Mkdir {
            path: scratch.clone(),
            mode: 0o700,
        });
        let inodes = (size / 4096).clamp(256, 1 << 16);
        self.steps
            .push(tmpfs(scratch.clone(), size, inodes, "0755"));
        for (name, mode, mount) in [
            ("work", 0o755, "/work"),
            ("tmp", 0o1777, "/tmp"),
            ("shm", 0o1777, "/dev/shm"),
        ] {
            let inside = self.at(&format!("/.scratch/{name}"))?;
            self.steps.push(Step::Mkdir {
                path: inside.clone(),
                mode,
            });
            if let (Some(uid), "work") = (owner, name) {
                self.steps.push(Step::Chown {
                    path: inside.clone(),
                    uid,
                    gid: uid,
                });
            }
            self.mkdir_all(mount)?;
            let target = self.at(mount)?;
            self.steps.push(Step::Mount {
                source: Some(inside),
                target,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            });
        }
        self.steps.push(Step::Unmount(scratch.clone()));
        self.steps.push(Step::Rmdir(scratch));
        Ok(())
    }

    /// The call's files in `/work`, each a plain name.
    fn work_files(&mut self, files: &[(String, Vec<u8>)], owner: Option<u32>) -> Result<(), Error> {
        for (name, bytes) in files {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(Error::Invalid(format!(
                    "{name:?}: a file of the working directory is a plain name"
                )));
            }
            let path = self.at(&format!("/work/{name}"))?;
            self.steps.push(Step::WriteNew {
                path: path.clone(),
                bytes: bytes.clone(),
                mode: 0o644,
            });
            if let Some(uid) = owner {
                self.steps.push(Step::Chown {
                    path,
                    uid,
                    gid: uid,
                });
            }
        }
        Ok(())
    }
}

/// Binds host `path` read-only at the same place under `stage`.
fn bind_read_only(
    stage: &Path,
    path: &Path,
    dir: bool,
    steps: &mut Vec<Step>,
    made: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let target = under(stage, path);
    if dir {
        mkdir_all(stage, path, steps, made)?;
    } else {
        if let Some(parent) = path.parent() {
            mkdir_all(stage, parent, steps, made)?;
        }
        steps.push(Step::Touch(cstring(&target)?));
    }
    let target = cstring(&target)?;
    steps.push(Step::Mount {
        source: Some(cstring(path)?),
        target: target.clone(),
        fstype: None,
        flags: libc::MS_BIND | libc::MS_REC,
        data: None,
    });
    steps.push(Step::SetAttr {
        target,
        set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
        recursive: true,
    });
    Ok(())
}

/// `mkdir -p` of `path` under `stage`, each folder once.
fn mkdir_all(
    stage: &Path,
    path: &Path,
    steps: &mut Vec<Step>,
    made: &mut Vec<PathBuf>,
) -> Result<(), Error> {
    let mut p = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => p.push(n),
            Component::RootDir => continue,
            _ => {
                return Err(Error::Invalid(format!(
                    "{}: use a path without . or ..",
                    path.display()
                )))
            }
        }
        if !made.contains(&p) {
            steps.push(Step::Mkdir {
                path: cstring(under(stage, &p))?,
                mode: 0o755,
            });
            made.push(p.clone());
        }
    }
    Ok(())
}

/// The host's files with `hidden` covered, its own `/proc` and `/dev/shm`.
fn host(r: &Request, hidden: &[PathBuf], steps: &mut Vec<Step>) -> Result<(), Error> {
    for p in hidden {
        // A path that does not exist here has nothing to hide.
        let Ok(p) = p.canonicalize() else { continue };
        if p == Path::new("/") {
            return Err(Error::Invalid(
                "hiding / would hide the program itself: name the folders to hide".into(),
            ));
        }
        let target = cstring(&p)?;
        if p.is_dir() {
            steps.push(Step::Mount {
                source: Some(c"tandem-hidden".to_owned()),
                target,
                fstype: Some(c"tmpfs".to_owned()),
                flags: libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data: Some(c"size=4096,nr_inodes=1,mode=0".to_owned()),
            });
        } else {
            steps.push(Step::Mount {
                source: Some(c"/dev/null".to_owned()),
                target: target.clone(),
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            });
            steps.push(Step::SetAttr {
                target,
                set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                recursive: false,
            });
        }
    }
    steps.push(Step::Mount {
        source: Some(c"proc".to_owned()),
        target: cstring("/proc")?,
        fstype: Some(c"proc".to_owned()),
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    });
    if Path::new("/dev/shm").is_dir() {
        steps.push(Step::Mount {
            source: Some(c"tandem-sandbox".to_owned()),
            target: cstring("/dev/shm")?,
            fstype: Some(c"tmpfs".to_owned()),
            flags: libc::MS_NOSUID | libc::MS_NODEV,
            data: Some(
                CString::new(format!("size={},mode=1777", r.limits.tmpfs))
                    .expect("no NUL in numbers"),
            ),
        });
    }
    if let Some(cwd) = r.cwd {
        steps.push(Step::Chdir(cstring(cwd)?));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_uids_are_in_their_range_and_differ() {
        let a: Vec<u32> = (0..100).map(|_| call_uid()).collect();
        assert!(a
            .iter()
            .all(|&u| (CALL_UID_BASE..CALL_UID_BASE + CALL_UID_SPAN).contains(&u)));
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(b.len(), a.len());
    }

    #[test]
    fn host_paths_must_be_absolute_existing_and_not_the_root() {
        assert!(checked_host_path(Path::new("usr")).is_err());
        assert!(checked_host_path(Path::new("/no/such/path")).is_err());
        let e = checked_host_path(Path::new("/usr/..")).unwrap_err();
        assert!(e.to_string().contains("whole file system"), "{e}");
        assert_eq!(
            checked_host_path(Path::new("/usr/bin/../bin")).unwrap(),
            Path::new("/usr/bin")
        );
    }

    #[test]
    fn working_directory_files_are_plain_names() {
        let limits = Limits::default();
        let stage = tempfile::tempdir().unwrap();
        for bad in ["../x", "a/b", "", ".."] {
            let files = [(bad.to_string(), Vec::new())];
            let r = Request {
                view: &View::Minimal { read_only: vec![] },
                network: Network::None,
                identity: Identity::Namespace { uid: 1, gid: 1 },
                limits: &limits,
                files: &files,
                stage: Some(stage.path()),
                cwd: None,
            };
            assert!(prepare(&r).is_err(), "{bad:?}");
        }
    }

    /// Every mount point is made under the stage, never on the host: each `Mkdir`,
    /// `Touch` and mount target of a minimal view starts with the stage until the
    /// root moves there.
    #[test]
    fn a_minimal_view_builds_only_under_its_stage() {
        let limits = Limits::default();
        let stage = tempfile::tempdir().unwrap();
        let files = [("main.py".to_string(), b"print(1)".to_vec())];
        let r = Request {
            view: &View::Minimal {
                read_only: vec![PathBuf::from("/usr/lib"), PathBuf::from("/etc/hostname")],
            },
            network: Network::None,
            identity: Identity::Host { uid: call_uid() },
            limits: &limits,
            files: &files,
            stage: Some(stage.path()),
            cwd: None,
        };
        let plan = prepare(&r).unwrap();
        let s = stage.path().as_os_str().as_bytes();
        let mut pivoted = false;
        for step in &plan.after {
            let path = match step {
                Step::PivotRoot(_) => {
                    pivoted = true;
                    None
                }
                Step::Mkdir { path, .. } | Step::Touch(path) | Step::WriteNew { path, .. } => {
                    Some(path)
                }
                Step::Mount { target, .. } if target.as_bytes() != b"/" => Some(target),
                _ => None,
            };
            if let (Some(p), false) = (path, pivoted) {
                assert!(p.as_bytes().starts_with(s), "{step:?} outside the stage");
            }
        }
        assert!(pivoted);
        // /usr/lib is inside /usr, shown already: bound once.
        let binds = plan
            .after
            .iter()
            .filter(|s| matches!(s, Step::Mount { source: Some(src), .. } if src.as_bytes().starts_with(b"/usr")))
            .count();
        assert_eq!(binds, 1);
        assert!(plan
            .describe(plan.before.len() + plan.after.len() - 1)
            .contains("close_range"));
    }
}
