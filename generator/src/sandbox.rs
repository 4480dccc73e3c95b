//! The `python` tool: a program run by a Python interpreter in a sandbox. Each call
//! gets a fresh, empty working directory, its own session (process group), no network
//! (a new network namespace: only a downed loopback), and limits: CPU seconds
//! (`RLIMIT_CPU`), address space (`RLIMIT_AS`), processes (`RLIMIT_NPROC`, so a fork
//! bomb meets `EAGAIN`), written file size (`RLIMIT_FSIZE`), and wall time (the whole
//! process group is killed). Run by root, the program runs as `nobody` (root ignores
//! the process limit). Output past the limit is cut and says so.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The limits of one run (`[env.python]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PythonLimits {
    /// The interpreter (run as `nobody` when the generator runs as root: it must be
    /// executable by that user).
    pub interpreter: String,
    pub cpu_s: u64,
    pub wall_s: f64,
    pub memory_mib: u64,
    /// Processes the sandbox's user may have at once, threads included (under root the
    /// user is `nobody`, shared by every sandbox running at the same moment: a group's
    /// samples call tools in parallel).
    pub processes: u64,
    /// Bytes of stdout and stderr kept (each).
    pub output_bytes: usize,
}

impl Default for PythonLimits {
    fn default() -> Self {
        PythonLimits {
            interpreter: "/usr/bin/python3".into(),
            cpu_s: 5,
            wall_s: 10.0,
            memory_mib: 512,
            processes: 64,
            output_bytes: 4096,
        }
    }
}

impl PythonLimits {
    pub fn validate(&self) -> Result<(), String> {
        let bad = |k: &str, why: &str| Err(format!("[env.python] {k}: {why}"));
        if self.interpreter.trim().is_empty() {
            return bad("interpreter", "name a Python interpreter");
        }
        if self.cpu_s == 0 {
            return bad("cpu_s", "must be ≥ 1");
        }
        if !(self.wall_s.is_finite() && self.wall_s > 0.0) {
            return bad("wall_s", "must be > 0");
        }
        if self.memory_mib < 16 {
            return bad("memory_mib", "must be ≥ 16 (the interpreter needs it)");
        }
        if self.processes == 0 {
            return bad("processes", "must be ≥ 1");
        }
        if self.output_bytes == 0 {
            return bad("output_bytes", "must be ≥ 1");
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Ran {
    pub stdout: String,
    pub stderr: String,
    /// `None`: exited 0; else what stopped it ("exit status 1", "killed: wall time
    /// 10 s", "killed: CPU time", "killed: signal 9").
    pub failure: Option<String>,
    pub seconds: f64,
}

impl Ran {
    /// The observation the model reads.
    pub fn observation(&self) -> String {
        let mut out = self.stdout.clone();
        if !self.stderr.is_empty() {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&self.stderr);
        }
        if let Some(f) = &self.failure {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("[{f}]"));
        }
        out
    }
}

/// Runs `code` under `limits` in a fresh directory; an error when the sandbox itself
/// cannot be set up (no network namespace, no interpreter).
pub fn run_python(code: &str, limits: &PythonLimits) -> Result<Ran, String> {
    let dir = tempfile::Builder::new()
        .prefix("tandem-python-")
        .tempdir()
        .map_err(|e| format!("a working directory: {e}"))?;
    let as_root = unsafe { libc::geteuid() } == 0;
    let nobody = 65534u32;
    if as_root {
        chown(dir.path(), nobody)?;
    }
    let script = dir.path().join("main.py");
    std::fs::write(&script, code).map_err(|e| format!("writing the program: {e}"))?;
    if as_root {
        chown(&script, nobody)?;
    }
    let mut cmd = Command::new(&limits.interpreter);
    cmd.args(["-I", "-S", "main.py"])
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", dir.path())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (cpu, mem, nproc) = (limits.cpu_s, limits.memory_mib << 20, limits.processes);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe calls (setsid, unshare, setrlimit, setgid,
        // setuid, prctl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fail = |what: &str| {
                    let e = std::io::Error::last_os_error();
                    Err(std::io::Error::new(e.kind(), format!("{what}: {e}")))
                };
                if libc::setsid() < 0 {
                    return fail("setsid");
                }
                let flags = if as_root {
                    libc::CLONE_NEWNET
                } else {
                    libc::CLONE_NEWUSER | libc::CLONE_NEWNET
                };
                if libc::unshare(flags) != 0 {
                    return fail("a network namespace (unshare)");
                }
                let limit = |res, v: u64| {
                    let r = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v,
                    };
                    libc::setrlimit(res, &r)
                };
                if limit(libc::RLIMIT_CPU, cpu) != 0
                    || limit(libc::RLIMIT_AS, mem) != 0
                    || limit(libc::RLIMIT_FSIZE, 16 << 20) != 0
                    || limit(libc::RLIMIT_CORE, 0) != 0
                {
                    return fail("setrlimit");
                }
                if as_root
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(nobody) != 0
                        || libc::setuid(nobody) != 0)
                {
                    return fail("dropping to user nobody");
                }
                // After the user change: the count is nobody's (or this user's).
                if limit(libc::RLIMIT_NPROC, nproc) != 0 {
                    return fail("setrlimit NPROC");
                }
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", limits.interpreter))?;
    let pgid = child.id() as i32;
    let cap = limits.output_bytes;
    // stdout keeps its first bytes, stderr its last (a traceback ends with the error).
    let read = |mut r: Box<dyn Read + Send>, tail: bool| {
        std::thread::spawn(move || {
            let mut kept: Vec<u8> = Vec::new();
            let mut buf = [0u8; 8192];
            let mut total = 0usize;
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n;
                if tail {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * cap {
                        kept.drain(..kept.len() - cap);
                    }
                } else {
                    let room = cap.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
            if kept.len() > cap {
                kept.drain(..kept.len() - cap);
            }
            let text = String::from_utf8_lossy(&kept).into_owned();
            match (total > cap, tail) {
                (false, _) => text,
                (true, false) => {
                    format!("{text}\n[output cut: {total} bytes, the first {cap} kept]")
                }
                (true, true) => format!("[output cut: {total} bytes, the last {cap} kept]\n{text}"),
            }
        })
    };
    let out = read(Box::new(child.stdout.take().expect("piped")), false);
    let err = read(Box::new(child.stderr.take().expect("piped")), true);
    let wall = Duration::from_secs_f64(limits.wall_s);
    let mut killed_for_wall = false;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if t0.elapsed() >= wall {
            killed_for_wall = true;
            // The whole session: the program and anything it started.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait().map_err(|e| e.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever it left behind in its process group goes too.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let failure = {
        use std::os::unix::process::ExitStatusExt;
        if killed_for_wall {
            Some(format!("killed: wall time {} s", limits.wall_s))
        } else if let Some(sig) = status.signal() {
            Some(match sig {
                libc::SIGXCPU | libc::SIGKILL if t0.elapsed().as_secs() + 1 >= limits.cpu_s => {
                    format!("killed: CPU time {} s", limits.cpu_s)
                }
                s => format!("killed: signal {s}"),
            })
        } else if status.success() {
            None
        } else {
            Some(format!("exit status {}", status.code().unwrap_or(-1)))
        }
    };
    Ok(Ran {
        stdout,
        stderr,
        failure,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// A tool's check at start-up: the sandbox can be built here and the interpreter runs.
pub fn probe(limits: &PythonLimits) -> Result<(), String> {
    limits.validate()?;
    let ran = run_python("print(6 * 7)", limits)
        .map_err(|e| format!("[env] tools = [\"python\"]: the sandbox cannot start here: {e}"))?;
    if ran.failure.is_some() || ran.stdout.trim() != "42" {
        return Err(format!(
            "[env] tools = [\"python\"]: {} did not run a test program in the sandbox (it runs as user nobody when the generator is root: set [env.python] interpreter to one that user can execute): {}",
            limits.interpreter,
            ran.observation()
        ));
    }
    Ok(())
}

fn chown(path: &std::path::Path, uid: u32) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::chown(c.as_ptr(), uid, uid) } != 0 {
        return Err(format!(
            "chown {}: {}",
            PathBuf::from(path).display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PythonLimits {
        PythonLimits {
            cpu_s: 2,
            wall_s: 4.0,
            memory_mib: 256,
            processes: 8,
            output_bytes: 200,
            ..Default::default()
        }
    }

    /// Each misbehaving program is stopped and reported, and the next call works.
    #[test]
    fn the_sandbox_stops_what_it_must() {
        let l = limits();
        probe(&l).expect("the sandbox runs here");
        let ok = run_python("import math\nprint(math.factorial(20))", &l).unwrap();
        assert_eq!(
            (ok.stdout.trim(), ok.failure.clone()),
            ("2432902008176640000", None)
        );
        for (name, code, needle) in [
            ("infinite loop", "while True:\n    pass\n", "killed"),
            (
                "memory bomb",
                "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n",
                "MemoryError",
            ),
            (
                "fork bomb",
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError as e:\n        print('fork refused:', e.errno)\n        break\n",
                "fork refused",
            ),
            (
                "network call",
                "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n",
                "OSError",
            ),
            ("sleeping past the wall", "import time\ntime.sleep(60)\n", "wall time"),
            ("a lot of output", "print('x' * 100000)\n", "output cut"),
            ("an error", "raise SystemExit(3)\n", "exit status 3"),
        ] {
            let t0 = Instant::now();
            let r = run_python(code, &l).unwrap();
            let obs = r.observation();
            assert!(obs.contains(needle), "{name}: {obs}");
            assert!(t0.elapsed() < Duration::from_secs(8), "{name}: {:?}", t0.elapsed());
        }
        // A fresh directory each time: nothing written before is there.
        run_python("open('left.txt', 'w').write('x')", &l).unwrap();
        let r = run_python("import os\nprint(sorted(os.listdir('.')))", &l).unwrap();
        assert_eq!(r.stdout.trim(), "['main.py']");
        let again = run_python("print('still here')", &l).unwrap();
        assert_eq!(again.stdout.trim(), "still here");
    }
}
