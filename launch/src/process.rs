//! One process of a run: a role of the `tandem` binary started as a child with its
//! output in its own log, started again after it dies (the trainer with `--resume`),
//! and killed when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::env::Env;
use crate::{run_dir, Error, Result};

/// The exit status with which a process says that starting it again cannot help (a
/// generator most of whose groups failed through no doing of the model: its
/// environment is broken). The supervisor stops the run instead of restarting it.
/// 78 is `EX_CONFIG` of sysexits.h: something is misconfigured.
pub const EXIT_DO_NOT_RESTART: i32 = 78;

/// How a run's processes are started: an executable that takes the role as its first
/// argument (`tandem coordinator …`), and a setup of each child's `Command`.
#[derive(Clone, Debug)]
pub struct Program {
    pub exe: PathBuf,
    /// Arguments before the role's (an interpreter's script, a wrapper's flags).
    pub args: Vec<String>,
    /// Applied to each child's `Command` before it starts. The binary makes each child
    /// die with its parent there (`PR_SET_PDEATHSIG`, the one `unsafe` this needs, which
    /// stays in the binary).
    pub configure: fn(&mut Command),
}

impl Program {
    /// `exe` with no setup.
    pub fn new(exe: impl Into<PathBuf>) -> Self {
        Program {
            exe: exe.into(),
            args: Vec::new(),
            configure: |_| {},
        }
    }
}

/// The role a process plays, which decides how it is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Restarted as it was (it continues from its saved state).
    Coordinator,
    /// Restarted with `--resume` (from its newest checkpoint), and only once one exists.
    Trainer,
    /// Restarted as it was.
    Generator,
}

/// A running (or exited) process of the run.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub role: Role,
    pub child: Child,
    /// `RUN_DIR/logs/NAME.log`: its standard output and error, across restarts.
    pub log: PathBuf,
    /// Its command line and environment, to start it again.
    pub args: Vec<String>,
    env: Env,
    /// How often it has been started again.
    pub restarts: u32,
    /// The coordinator has listed it (it listens, for the coordinator): it started.
    /// One that fails before is a start-up failure, not restarted.
    pub registered: bool,
}

impl Proc {
    /// Starts `program ARGS` as `name`, its output in `logs/NAME.log` (a new log, or
    /// the earlier one continued when `append`: a resumed run).
    pub fn spawn(
        program: &Program,
        (name, role): (&str, Role),
        args: Vec<String>,
        (logs, append): (&Path, bool),
        env: &Env,
    ) -> Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let child = start(program, name, &args, &log, env, append)?;
        Ok(Proc {
            name: name.to_string(),
            role,
            child,
            log,
            args,
            env: env.clone(),
            restarts: 0,
            registered: false,
        })
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(|e| Error::io(format!("waiting for the {} process", self.name), e))
    }

    /// Starts the process again after it died (its log continues). A trainer resumes
    /// from its newest checkpoint in `run_dir`; without one it cannot be restarted: the
    /// coordinator's published versions would not match a fresh trainer.
    pub fn restart(&mut self, program: &Program, run_dir: &Path) -> Result<()> {
        let mut args = self.args.clone();
        if self.role == Role::Trainer {
            if !run_dir.join("checkpoints/latest").exists() {
                return Err(Error::Process(format!(
                    "the trainer died before its first checkpoint ([trainer] checkpoint_every): nothing to resume from; last lines of {}:\n{}",
                    self.log.display(),
                    self.tail()
                )));
            }
            if !args.iter().any(|a| a == "--resume") {
                args.push("--resume".into());
            }
        }
        self.child = start(program, &self.name, &args, &self.log, &self.env, true)?;
        self.restarts += 1;
        Ok(())
    }

    /// The last 15 lines of its log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Asks it to stop (SIGTERM) if it still runs: each role stops cleanly on it.
    pub fn terminate(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                tracing::warn!(process = %self.name, "SIGTERM: {e}");
            }
        }
    }

    /// Kills it if it still runs, and reaps it.
    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `program ARGS` with its output in `log` (appended to when `append`), in a
/// process group of its own: a Ctrl-C at the terminal reaches `tandem run` alone, which
/// stops the run's processes in order (trainer and generators first, the coordinator
/// last).
fn start(
    program: &Program,
    name: &str,
    args: &[String],
    log: &Path,
    env: &Env,
    append: bool,
) -> Result<Child> {
    let file = run_dir::open_log(log, append)?;
    let err = |e| Error::io(format!("starting the {name} process"), e);
    let mut cmd = Command::new(&program.exe);
    (program.configure)(&mut cmd);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.args(&program.args)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(err)?)
        .stderr(file)
        .spawn()
        .map_err(err)
}

/// A process still running when its `Proc` goes (an error or Ctrl-C path) is killed.
impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn a_restarted_process_appends_to_its_log_and_a_trainer_resumes() {
        let d = tempfile::tempdir().unwrap();
        let program = Program::new("/bin/sh");
        let env = vec![("GREETING", "hello".to_string())];
        // `sh -c SCRIPT --resume` runs SCRIPT with $0 = --resume.
        let mut p = Proc::spawn(
            &program,
            ("trainer", Role::Trainer),
            sh("echo $GREETING $0; exit 3"),
            (d.path(), false),
            &env,
        )
        .unwrap();
        assert_eq!(p.child.wait().unwrap().code(), Some(3));
        let e = p.restart(&program, d.path()).unwrap_err().to_string();
        assert!(
            e.contains("before its first checkpoint") && e.contains("hello"),
            "{e}"
        );
        std::fs::create_dir_all(d.path().join("checkpoints/latest")).unwrap();
        p.restart(&program, d.path()).unwrap();
        assert!(p.child.wait().unwrap().code() == Some(3) && p.restarts == 1);
        p.restart(&program, d.path()).unwrap();
        p.child.wait().unwrap();
        // One `--resume`, however often it was restarted; the log continued.
        let tail = p.tail();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), 3, "{tail}");
        assert!(
            lines[0].starts_with("hello ") && !lines[0].contains("--resume"),
            "{tail}"
        );
        assert_eq!(lines[1..], ["hello --resume", "hello --resume"]);
        assert_eq!(p.args, sh("echo $GREETING $0; exit 3"));
    }

    #[test]
    fn a_generator_restarts_as_it_was_and_a_dropped_proc_is_killed() {
        let d = tempfile::tempdir().unwrap();
        let program = Program::new("/bin/sh");
        let mut g = Proc::spawn(
            &program,
            ("gen-0", Role::Generator),
            sh("echo $0"),
            (d.path(), false),
            &Env::new(),
        )
        .unwrap();
        g.child.wait().unwrap();
        g.restart(&program, d.path()).unwrap();
        g.child.wait().unwrap();
        let tail = g.tail();
        let lines: Vec<&str> = tail.lines().collect();
        assert!(
            lines.len() == 2 && lines[0] == lines[1] && !tail.contains("--resume"),
            "{tail}"
        );
        let sleeper = Proc::spawn(
            &program,
            ("sleeper", Role::Generator),
            sh("sleep 60"),
            (d.path(), false),
            &Env::new(),
        )
        .unwrap();
        let pid = sleeper.child.id();
        drop(sleeper);
        // Killed and reaped: no such process any more.
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
}
