//! The `python` tool: a program the model wrote, run by a Python interpreter in the
//! sandbox of [`tandem_sandbox`], isolated from the run.
//!
//! Each call sees only the system's program folders and the interpreter (read-only),
//! its own empty working directory `/work` holding `main.py` (a tmpfs of `disk_mib`,
//! shared with `/tmp` and `/dev/shm`), its own `/proc` in which it is process 1, no
//! network, and runs as a user of its own. When the call ends (it exits, or is killed
//! at `wall_s`), every process it started ends with it. Limits: CPU seconds, address
//! space (`memory_mib` less the tmpfs), processes (a fork bomb meets `EAGAIN`), file
//! size, wall time. Output past the limit is cut and says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_sandbox::run::{program_prefixes, User};
use tandem_sandbox::{Call, End, Keep, Limits, Network, Sandbox, View};

/// The limits of one run (`[env.python]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PythonLimits {
    /// The interpreter, an absolute path. Its installation folder (the prefix holding
    /// its standard library) is shown to the program read-only; under root the program
    /// runs as a user of its own, which must be able to execute it.
    pub interpreter: String,
    /// CPU seconds of each process.
    pub cpu_s: u64,
    /// Wall-clock seconds of the whole call.
    pub wall_s: f64,
    /// The call's memory in MiB: the tmpfs holding its files (`disk_mib`) and the
    /// address space of each process (the rest).
    pub memory_mib: u64,
    /// MiB of the call's writable tmpfs (working directory, `/tmp`, `/dev/shm`),
    /// counted in `memory_mib`.
    pub disk_mib: u64,
    /// Processes and threads the call may have at once (its user is its own).
    pub processes: u64,
    /// Bytes of stdout and stderr kept (each).
    pub output_bytes: usize,
    /// Host folders or files shown to the program read-only at the same path (data it
    /// may read; never the run folder). The interpreter's own folders need not be
    /// listed.
    pub mounts: Vec<String>,
}

impl Default for PythonLimits {
    fn default() -> Self {
        PythonLimits {
            interpreter: "/usr/bin/python3".into(),
            cpu_s: 5,
            wall_s: 10.0,
            memory_mib: 512,
            disk_mib: 64,
            processes: 64,
            output_bytes: 4096,
            mounts: Vec::new(),
        }
    }
}

/// Address space an interpreter needs at the least, in MiB.
const MIN_ADDRESS_SPACE_MIB: u64 = 16;

impl PythonLimits {
    pub fn validate(&self) -> Result<(), String> {
        let bad = |k: &str, why: &str| Err(format!("[env.python] {k}: {why}"));
        if !self.interpreter.starts_with('/') {
            return bad(
                "interpreter",
                "give the interpreter as an absolute path, e.g. \"/usr/bin/python3\"",
            );
        }
        if self.cpu_s == 0 {
            return bad("cpu_s", "must be ≥ 1");
        }
        if !(self.wall_s.is_finite() && self.wall_s > 0.0 && self.wall_s <= 86_400.0) {
            return bad("wall_s", "must be > 0 and at most a day (86400)");
        }
        if self.disk_mib == 0 {
            return bad("disk_mib", "must be ≥ 1");
        }
        if self.memory_mib < self.disk_mib.saturating_add(MIN_ADDRESS_SPACE_MIB) {
            return bad(
                "memory_mib",
                &format!(
                    "must leave at least {MIN_ADDRESS_SPACE_MIB} MiB beside disk_mib = {} (the interpreter needs it)",
                    self.disk_mib
                ),
            );
        }
        if self.memory_mib > 1 << 30 {
            return bad("memory_mib", "must be at most 2^30 MiB");
        }
        if self.processes == 0 {
            return bad("processes", "must be ≥ 1");
        }
        if self.output_bytes == 0 {
            return bad("output_bytes", "must be ≥ 1");
        }
        for m in &self.mounts {
            if !m.starts_with('/') {
                return bad("mounts", &format!("{m:?}: give an absolute path"));
            }
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            wall: Duration::from_secs_f64(self.wall_s),
            cpu_s: Some(self.cpu_s),
            address_space: Some((self.memory_mib - self.disk_mib) << 20),
            processes: Some(self.processes),
            file_size: Some(self.disk_mib << 20),
            tmpfs: self.disk_mib << 20,
            open_files: Some(256),
        }
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

/// The `python` tool of a run: its sandbox, built and tried once.
#[derive(Clone, Debug)]
pub struct PythonTool {
    sandbox: Arc<Sandbox>,
    limits: PythonLimits,
}

impl PythonTool {
    /// The tool for `limits`, tried once on a test program: an error (with the reason
    /// and the fix) when the sandbox cannot be built here or the interpreter does not
    /// run in it. There is no weaker mode.
    pub fn new(limits: &PythonLimits) -> Result<Self, String> {
        limits.validate()?;
        let fail =
            |e: String| format!("[env] tools = [\"python\"]: the sandbox cannot start here: {e}");
        let interpreter = PathBuf::from(&limits.interpreter);
        let mut read_only = program_prefixes(&interpreter)
            .map_err(|e| fail(format!("[env.python] interpreter: {e}")))?;
        read_only.extend(limits.mounts.iter().map(PathBuf::from));
        let sandbox = Sandbox::new(View::Minimal { read_only }, Network::None, User::PerCall)
            .map_err(|e| fail(format!("[env.python] mounts: {e}")))?;
        let tool = PythonTool {
            sandbox: Arc::new(sandbox),
            limits: limits.clone(),
        };
        let ran = tool.run("print(6 * 7)").map_err(fail)?;
        if ran.failure.is_some() || ran.stdout.trim() != "42" {
            return Err(format!(
                "[env] tools = [\"python\"]: {} did not run a test program in the sandbox (it runs as a user of its own, with only the interpreter's folders visible: set [env.python] interpreter to an installation outside a private home folder, or list what it needs in [env.python] mounts): {}",
                limits.interpreter,
                ran.observation()
            ));
        }
        Ok(tool)
    }

    /// Runs `code` as `main.py`; an error only when the sandbox itself failed.
    pub fn run(&self, code: &str) -> Result<Ran, String> {
        let l = &self.limits;
        let limits = l.limits();
        let files = [("main.py".to_string(), code.as_bytes().to_vec())];
        let env = [
            ("PATH", "/usr/bin:/bin"),
            ("HOME", "/work"),
            ("TMPDIR", "/tmp"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
            ("LANG", "C.UTF-8"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let args = ["-I", "-S", "main.py"].map(String::from);
        let ran = self
            .sandbox
            .run(&Call {
                program: std::path::Path::new(&l.interpreter),
                args: &args,
                env: &env,
                files: &files,
                stdin: b"",
                cwd: None,
                limits: &limits,
                // A program's results come first; a traceback ends with the error.
                stdout: Keep::Head(l.output_bytes),
                stderr: Keep::Tail(l.output_bytes),
            })
            .map_err(|e| e.to_string())?;
        let failure = match ran.end {
            End::WallTime => Some(format!("killed: wall time {} s", l.wall_s)),
            End::Signaled(sig @ (libc::SIGXCPU | libc::SIGKILL))
                if ran.seconds + 1.0 >= l.cpu_s as f64 =>
            {
                let _ = sig;
                Some(format!("killed: CPU time {} s", l.cpu_s))
            }
            End::Signaled(sig) => Some(format!("killed: signal {sig}")),
            End::Exited(0) => None,
            End::Exited(code) => Some(format!("exit status {code}")),
        };
        Ok(Ran {
            stdout: ran.stdout,
            stderr: ran.stderr,
            failure,
            seconds: ran.seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn limits() -> PythonLimits {
        PythonLimits {
            cpu_s: 2,
            wall_s: 4.0,
            memory_mib: 256,
            disk_mib: 8,
            processes: 8,
            output_bytes: 200,
            ..Default::default()
        }
    }

    #[test]
    fn limits_are_validated_with_the_field_named() {
        for (l, needle) in [
            (
                PythonLimits {
                    interpreter: "python3".into(),
                    ..limits()
                },
                "interpreter",
            ),
            (
                PythonLimits {
                    memory_mib: 20,
                    disk_mib: 8,
                    ..limits()
                },
                "memory_mib",
            ),
            (
                PythonLimits {
                    disk_mib: 0,
                    ..limits()
                },
                "disk_mib",
            ),
            (
                PythonLimits {
                    wall_s: f64::NAN,
                    ..limits()
                },
                "wall_s",
            ),
            (
                PythonLimits {
                    mounts: vec!["data".into()],
                    ..limits()
                },
                "mounts",
            ),
        ] {
            let e = l.validate().unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e = PythonTool::new(&PythonLimits {
            interpreter: "/no/such/python".into(),
            ..limits()
        })
        .unwrap_err();
        assert!(e.contains("/no/such/python"), "{e}");
    }

    /// Each misbehaving program is stopped and reported, and the next call works.
    #[test]
    fn the_sandbox_stops_what_it_must() {
        let tool = PythonTool::new(&limits()).expect("the sandbox runs here");
        let ok = tool.run("import math\nprint(math.factorial(20))").unwrap();
        assert_eq!(
            (ok.stdout.trim(), ok.failure.clone()),
            ("2432902008176640000", None)
        );
        for (name, code, needle) in [
            (
                "memory bomb",
                "x = []\nwhile True:\n    x.append(bytearray(64 << 20))\n",
                "MemoryError",
            ),
            (
                "fork bomb",
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError as e:\n        print('fork refused:', e.errno)\n        break\n",
                "fork refused: 11",
            ),
            ("sleeping past the wall", "import time\ntime.sleep(60)\n", "killed: wall time 4 s"),
            ("a lot of output", "print('x' * 100000)\n", "output cut"),
            ("an error", "raise SystemExit(3)\n", "exit status 3"),
            (
                "filling the disk",
                "with open('big', 'wb') as f:\n    f.write(b'x' * (9 << 20))\n",
                "No space left on device",
            ),
        ] {
            let t0 = Instant::now();
            let r = tool.run(code).unwrap();
            let obs = r.observation();
            assert!(obs.contains(needle), "{name}: {obs}");
            assert!(t0.elapsed() < Duration::from_secs(8), "{name}: {:?}", t0.elapsed());
        }
        // CPU time, with a wall time far enough that a busy machine still hits the CPU
        // limit first.
        let cpu = PythonTool::new(&PythonLimits {
            cpu_s: 1,
            wall_s: 60.0,
            ..limits()
        })
        .unwrap();
        let r = cpu.run("while True:\n    pass\n").unwrap();
        assert_eq!(r.failure.as_deref(), Some("killed: CPU time 1 s"), "{r:?}");
        // A fresh directory each time: nothing written before is there.
        tool.run("open('left.txt', 'w').write('x')").unwrap();
        let r = tool
            .run("import os\nprint(sorted(os.listdir('.')))")
            .unwrap();
        assert_eq!(r.stdout.trim(), "['main.py']");
        let again = tool.run("print('still here')").unwrap();
        assert_eq!(again.stdout.trim(), "still here");
    }
}
