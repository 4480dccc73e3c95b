//! The supervisor of `tandem run`: the run's folder and secrets prepared, the
//! coordinator started and its address read, then the trainer and the generators;
//! every process that fails started again (up to `[run] max_restarts` times each)
//! while the run's progress is read from the coordinator, until the trainer has
//! finished and every process has left, or a stop was asked for ([`crate::stop`]). A
//! process that fails before the coordinator ever listed it failed at start-up (a
//! bad file, a device it cannot get): that ends the run at once, with its log, and is
//! not restarted; `[run] max_restarts` is for crashes after a healthy start. A process
//! that exits with [`EXIT_DO_NOT_RESTART`] (a generator whose groups keep failing
//! through no doing of the model) says restarting cannot help: the run is stopped in
//! order (so `--resume` continues it once the cause is fixed) and ends with its log.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tandem_proto::tls::TlsFiles;

use crate::env::{new_token, role_envs, Env};
use crate::process::{Proc, Program, Role, EXIT_DO_NOT_RESTART};
use crate::status::{Progress, StatusSource};
use crate::{run_dir, Error, Result};

/// How long the coordinator has to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the processes have to leave once the run is finished.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a run starts: everything the supervisor needs, read from the run's config and
/// the command line by the caller.
#[derive(Clone, Debug)]
pub struct RunPlan {
    /// The run folder (`[run] run_dir`).
    pub run_dir: PathBuf,
    /// The effective config as TOML, written to `RUN_DIR/config.toml` (mode 0600) for the
    /// coordinator; without the token.
    pub config_toml: String,
    /// The run's token, written to `RUN_DIR/token` (mode 0600) for `tandem status` and
    /// scrapers, and handed to the coordinator and the trainer.
    pub token: String,
    /// The TLS files every process gets (`TANDEM_TLS_*`).
    pub tls: TlsFiles,
    /// `[run] generators`, `[run] max_restarts`.
    pub generators: u32,
    pub max_restarts: u32,
    /// The trainer's `--listen` and `--advertise`, when given.
    pub trainer_listen: Option<String>,
    pub trainer_advertise: Option<String>,
    /// Files and folders of an earlier run in the folder that this run starts without
    /// (its logs, the coordinator's saved state, checkpoints): see [`crate::resume`].
    pub fresh: Vec<String>,
    /// Continue the run in the folder: the trainer starts with `--resume` (from its
    /// newest checkpoint), the coordinator from its saved state.
    pub resume: bool,
    /// How often the processes and the coordinator are looked at.
    pub poll: Duration,
}

/// What happened, for the caller to show.
#[derive(Debug)]
pub enum Event<'a> {
    /// A process failed and is started again.
    Restarting(Restart<'a>),
    /// The run's state, read from the coordinator.
    Progress(&'a Progress),
    /// A stop was asked for: the processes are being stopped in order.
    Stopping,
    /// A second stop request: every process is killed now.
    Killing,
}

/// A process that failed and is started again.
#[derive(Debug)]
pub struct Restart<'a> {
    pub name: &'a str,
    pub status: ExitStatus,
    /// This restart's number, of at most `max`.
    pub attempt: u32,
    pub max: u32,
    pub log: &'a Path,
}

impl std::fmt::Display for Restart<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} process failed ({}): restarting it ({} of {}); its log: {}",
            self.name,
            self.status,
            self.attempt,
            self.max,
            self.log.display()
        )
    }
}

/// Why the supervisor stopped watching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The trainer did the run's last step.
    Finished,
    /// A stop was asked for and every process stopped cleanly.
    Stopped,
    /// A second stop request killed the processes.
    Killed,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub ending: Ending,
    /// The last step the coordinator reported (0 if none).
    pub step: u64,
    /// From when the trainer and generators were started to the end.
    pub seconds: f64,
    /// The last step's mean reward the coordinator reported (NaN if none).
    pub last_reward: f64,
}

/// A run's processes, started and watched.
#[derive(Debug)]
pub struct Supervisor {
    plan: RunPlan,
    program: Program,
    /// Coordinator first, trainer second, then the generators.
    pub(crate) procs: Vec<Proc>,
    grpc: String,
    started: Instant,
}

impl Supervisor {
    /// Prepares the run folder (private, the earlier run's files in `plan.fresh` gone,
    /// tokens and `config.toml` written), starts the coordinator and waits for its
    /// address (`RUN_DIR/coordinator.json`), then starts the trainer and the generators.
    pub fn start(plan: RunPlan, program: Program) -> Result<Self> {
        let (servers, generators) = prepare(&plan)?;
        let coordinator = start_coordinator(&plan, &program, &servers)?;
        let mut s = Supervisor {
            grpc: coordinator.1,
            procs: vec![coordinator.0],
            plan,
            program,
            started: Instant::now(),
        };
        let (grpc, dir) = (s.grpc.clone(), s.plan.run_dir.clone());
        let mut trainer = strings(&["trainer", "--coordinator", &grpc, "--run-dir", utf8(&dir)?]);
        if let Some(listen) = &s.plan.trainer_listen {
            trainer.extend(strings(&["--listen", listen]));
        }
        if let Some(advertise) = &s.plan.trainer_advertise {
            trainer.extend(strings(&["--advertise", advertise]));
        }
        if s.plan.resume {
            trainer.push("--resume".into());
        }
        s.spawn("trainer", Role::Trainer, trainer, &servers)?;
        for i in 0..s.plan.generators {
            let name = format!("gen-{i}");
            let args = strings(&["generator", "--coordinator", &grpc, "--name", &name]);
            s.spawn(&name, Role::Generator, args, &generators)?;
        }
        s.started = Instant::now();
        s.write_pids()?;
        Ok(s)
    }

    fn spawn(&mut self, name: &str, role: Role, args: Vec<String>, env: &Env) -> Result<()> {
        let logs = self.logs();
        let p = Proc::spawn(
            &self.program,
            (name, role),
            args,
            (&logs, self.plan.resume),
            env,
        )?;
        self.procs.push(p);
        Ok(())
    }

    /// The coordinator's gRPC address.
    pub fn coordinator(&self) -> &str {
        &self.grpc
    }

    /// The folder of the processes' logs.
    pub fn logs(&self) -> PathBuf {
        self.plan.run_dir.join("logs")
    }

    /// Watches the run until the trainer has finished: restarts what fails and reports
    /// each restart and the progress read from `status` to `on`; then waits for every
    /// process to leave (killing what has not within a minute). A request on `stop`
    /// stops the run's processes instead ([`crate::stop`]).
    pub fn watch(
        &mut self,
        status: &mut dyn StatusSource,
        stop: &crate::stop::Stop,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<Outcome> {
        let (mut last_reward, mut step) = (f64::NAN, 0);
        let ending = loop {
            std::thread::sleep(self.plan.poll);
            if stop.requests() > 0 {
                break self.stop_all(stop, on)?;
            }
            let reply = status.status();
            if let Some(s) = &reply {
                self.mark_registered(s);
            }
            if let Some(why) = self.not_restartable() {
                // Stopped in order: the trainer checkpoints, so the run can go on once fixed.
                self.stop_all(&crate::stop::Stop::default(), on)?;
                return Err(Error::Process(why));
            }
            if self.restart_failed(on)? {
                self.write_pids()?;
            }
            let trainer_done = self.procs[1].exited()?.is_some();
            match reply {
                Some(s) => {
                    let progress = Progress::of(&s);
                    (last_reward, step) = (progress.reward_mean, progress.step);
                    on(Event::Progress(&progress));
                    if progress.finished && trainer_done {
                        break Ending::Finished;
                    }
                }
                None if trainer_done => break Ending::Finished,
                None => {}
            }
        };
        if ending == Ending::Finished {
            self.wait_for_exits()?;
        }
        Ok(Outcome {
            ending,
            step,
            seconds: self.started.elapsed().as_secs_f64(),
            last_reward,
        })
    }

    /// Marks the processes the coordinator lists (by name) as started.
    fn mark_registered(&mut self, s: &tandem_proto::v1::StatusReply) {
        for p in self.procs.iter_mut() {
            if s.workers.iter().any(|w| w.name == p.name) {
                p.registered = true;
            }
        }
    }

    /// Why the run must stop: a process exited with [`EXIT_DO_NOT_RESTART`] (restarting it
    /// cannot help), with the end of its log.
    fn not_restartable(&mut self) -> Option<String> {
        for p in self.procs.iter_mut() {
            let Ok(Some(st)) = p.exited() else { continue };
            if st.code() == Some(EXIT_DO_NOT_RESTART) {
                return Some(format!(
                    "the {} process stopped the run ({st}): restarting it cannot help, so it was not restarted and the run was stopped in order; fix the cause its log names, then continue with `tandem run … --resume`; last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    p.tail()
                ));
            }
        }
        None
    }

    /// Starts every process that failed again; an error once one has used up
    /// `max_restarts`, or when one failed before it ever registered (at start-up).
    /// Returns whether any was restarted.
    fn restart_failed(&mut self, on: &mut dyn FnMut(Event<'_>)) -> Result<bool> {
        let max = self.plan.max_restarts;
        let mut restarted = false;
        for p in self.procs.iter_mut() {
            let Some(st) = p.exited()? else { continue };
            if st.success() {
                continue;
            }
            if !p.registered {
                return Err(Error::Process(format!(
                    "the {} process failed at start-up ({st}), before it registered with the coordinator: not restarted ([run] max_restarts is for crashes after a healthy start); last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    p.tail()
                )));
            }
            if p.restarts >= max {
                return Err(Error::Process(format!(
                    "the {} process failed ({st}); [run] max_restarts = {max} used up; last lines of {}:\n{}",
                    p.name,
                    p.log.display(),
                    p.tail()
                )));
            }
            on(Event::Restarting(Restart {
                name: &p.name,
                status: st,
                attempt: p.restarts + 1,
                max,
                log: &p.log,
            }));
            p.restart(&self.program, &self.plan.run_dir)?;
            restarted = true;
        }
        Ok(restarted)
    }

    /// Waits for every process to leave on its own (they do once the run is finished);
    /// a failure is an error, one still running after [`EXIT_TIMEOUT`] is killed.
    fn wait_for_exits(&mut self) -> Result<()> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        for p in self.procs.iter_mut() {
            loop {
                match p.exited()? {
                    Some(st) if st.success() => break,
                    Some(st) => {
                        return Err(Error::Process(format!(
                            "the {} process failed ({st}):\n{}",
                            p.name,
                            p.tail()
                        )))
                    }
                    None if Instant::now() > deadline => {
                        tracing::warn!(process = %p.name, "still running a minute after the run finished: killed");
                        p.kill();
                        break;
                    }
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    }

    /// Writes `RUN_DIR/processes.json`: each process's name and pid (updated on
    /// restarts).
    fn write_pids(&self) -> Result<()> {
        let pids: serde_json::Map<String, serde_json::Value> = self
            .procs
            .iter()
            .map(|p| (p.name.clone(), p.child.id().into()))
            .collect();
        run_dir::write_private_atomic(
            &self.plan.run_dir.join("processes.json"),
            &serde_json::Value::Object(pids).to_string(),
        )
    }
}

/// Makes the run folder ready: private (refused when another user controls it), the
/// earlier run's files in `plan.fresh` removed, `logs/` made, the tokens and
/// `config.toml` written (mode 0600). Returns the environments of the coordinator and
/// trainer, and of the generators.
fn prepare(plan: &RunPlan) -> Result<(Env, Env)> {
    let dir = &plan.run_dir;
    // Ours alone: no other user can plant a link where a file is about to be written.
    run_dir::prepare(dir)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| Error::io(format!("creating {}", logs.display()), e))?;
    for file in &plan.fresh {
        remove_if_there(&dir.join(file))?;
    }
    let secret = |name: &str, text: &str| {
        let path = dir.join(name);
        tandem_proto::secret::write_private(&path, text)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    };
    secret("token", &plan.token)?;
    let generator_token = new_token();
    secret("generator-token", &generator_token)?;
    // It may hold secrets ([reward] service_token, the dataset's answers): this user's.
    run_dir::write_private_atomic(&dir.join("config.toml"), &plan.config_toml)?;
    role_envs(&plan.tls, &plan.token, &generator_token)
}

/// Starts the coordinator on `RUN_DIR/config.toml` and waits for its gRPC address.
/// Started again later, it listens where the workers already dial (its arguments name
/// the bound addresses) and continues the run from its saved state.
fn start_coordinator(plan: &RunPlan, program: &Program, env: &Env) -> Result<(Proc, String)> {
    let dir = &plan.run_dir;
    let addr_file = dir.join("coordinator.json");
    remove_if_there(&addr_file)?;
    let config = dir.join("config.toml");
    let args = [
        "coordinator",
        "--config",
        utf8(&config)?,
        "--addr-file",
        utf8(&addr_file)?,
    ];
    let logs = dir.join("logs");
    let mut p = Proc::spawn(
        program,
        ("coordinator", Role::Coordinator),
        strings(&args),
        (&logs, plan.resume),
        env,
    )?;
    let poll = plan.poll.min(Duration::from_millis(50));
    let (grpc, http) = wait_for_address(&mut p, &addr_file, poll)?;
    p.registered = true;
    p.args.extend(strings(&[
        "--set",
        &format!("coordinator.listen={grpc}"),
        "--set",
        &format!("coordinator.http_listen={http}"),
    ]));
    Ok((p, grpc))
}

/// Waits for the coordinator to write its addresses to `file` ({"grpc", "http"}); an
/// error with its log's end when it exits first or does not listen in time.
fn wait_for_address(
    coordinator: &mut Proc,
    file: &Path,
    poll: Duration,
) -> Result<(String, String)> {
    let t0 = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Process(format!("{}: {e}", file.display())))?;
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            return Ok((field("grpc"), field("http")));
        }
        if let Some(st) = coordinator.exited()? {
            return Err(Error::Process(format!(
                "the coordinator exited ({st}) before listening:\n{}",
                coordinator.tail()
            )));
        }
        if t0.elapsed() > LISTEN_TIMEOUT {
            return Err(Error::Process(format!(
                "the coordinator did not start listening within {} s; see {}",
                LISTEN_TIMEOUT.as_secs(),
                coordinator.log.display()
            )));
        }
        std::thread::sleep(poll);
    }
}

/// Removes the file or folder at `path` (a link itself, never what it points at).
fn remove_if_there(path: &Path) -> Result<()> {
    let is_dir = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir());
    let removed = if is_dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("{} is not valid UTF-8", p.display())))
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use tandem_proto::v1::StatusReply;

    use super::*;
    use crate::stop::Stop;

    /// A stand-in for the `tandem` binary: a shell script (run by `/bin/sh`, so it is
    /// never executed while a file handle to it may be open) that logs its role, token
    /// and arguments, then runs the role's snippet. `$D` is the test's folder; a role
    /// leaves once `$D/finished` exists (`wait_finished`); `once NAME` is true the first
    /// time only.
    fn fake(dir: &Path, coordinator: &str, trainer: &str, generator: &str) -> Program {
        let script = format!(
            r#"D='{d}'
role=$1
echo "token=$TANDEM_TOKEN $*"
wait_finished() {{ while [ ! -e "$D/finished" ]; do sleep 0.02; done; }}
once() {{ if [ -e "$D/$1" ]; then return 1; fi; touch "$D/$1"; }}
listen() {{ while [ $# -gt 0 ]; do if [ "$1" = --addr-file ]; then echo '{{"grpc":"127.0.0.1:1","http":"127.0.0.1:2"}}' > "$2.tmp"; mv "$2.tmp" "$2"; fi; shift; done; }}
case $role in
coordinator) {coordinator} ;;
trainer) {trainer} ;;
generator) {generator} ;;
esac
"#,
            d = dir.display()
        );
        let path = dir.join("fake-tandem.sh");
        std::fs::write(&path, script).unwrap();
        Program {
            args: vec![path.to_str().unwrap().to_string()],
            ..Program::new("/bin/sh")
        }
    }

    fn plan(run_dir: &Path, generators: u32, max_restarts: u32) -> RunPlan {
        RunPlan {
            run_dir: run_dir.to_path_buf(),
            config_toml: "[run]\nsteps = 2\n".into(),
            token: "the-runs-token-0123456789".into(),
            tls: TlsFiles::default(),
            generators,
            max_restarts,
            trainer_listen: None,
            trainer_advertise: Some("10.0.0.1:5000".into()),
            fresh: vec!["metrics.jsonl".into(), "checkpoints".into()],
            resume: false,
            poll: Duration::from_millis(20),
        }
    }

    /// The coordinator's status as the test's folder says: finished once
    /// `$D/finished` exists; the trainer and generators `gen-0`, `gen-1` registered.
    struct Markers(PathBuf);

    impl StatusSource for Markers {
        fn status(&mut self) -> Option<StatusReply> {
            let worker = |name: &str| tandem_proto::v1::WorkerStatus {
                name: name.into(),
                ..Default::default()
            };
            Some(StatusReply {
                step: 1,
                finished: self.0.join("finished").exists(),
                metrics: [("reward_mean".to_string(), 0.5)].into(),
                workers: ["trainer", "gen-0", "gen-1"].map(worker).to_vec(),
                ..Default::default()
            })
        }
    }

    /// A coordinator that lists no worker: none ever registered.
    struct Nobody;

    impl StatusSource for Nobody {
        fn status(&mut self) -> Option<StatusReply> {
            Some(StatusReply::default())
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn failed_processes_restart_and_the_trainer_resumes_from_its_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run) = (d.path(), d.path().join("run"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("metrics.jsonl"), "{\"step\":9}\n").unwrap();
        std::fs::create_dir_all(run.join("checkpoints/step-000009")).unwrap();
        // The trainer dies once after its first checkpoint; each generator dies once.
        let program = fake(
            dir,
            r#"listen "$@"; wait_finished"#,
            r#"if once trainer-died; then mkdir -p "$D/run/checkpoints/latest"; exit 1; fi; touch "$D/finished""#,
            r#"if once "died-$5"; then exit 7; fi; wait_finished"#,
        );
        let mut s = Supervisor::start(plan(&run, 2, 1), program).unwrap();
        assert_eq!(s.coordinator(), "127.0.0.1:1");
        // The fake trainer may already have made `checkpoints/latest`: the earlier
        // run's step is what must be gone.
        assert!(
            !run.join("metrics.jsonl").exists() && !run.join("checkpoints/step-000009").exists(),
            "an earlier run's log or checkpoints stayed"
        );
        let mut restarts = Vec::new();
        let mut progress = 0;
        let outcome = s
            .watch(
                &mut Markers(dir.to_path_buf()),
                &Stop::default(),
                &mut |e| match e {
                    Event::Restarting(r) => restarts.push(r.to_string()),
                    Event::Progress(_) => progress += 1,
                    _ => {}
                },
            )
            .unwrap();
        assert_eq!(outcome.last_reward, 0.5);
        assert_eq!((outcome.ending, outcome.step), (Ending::Finished, 1));
        assert!(progress > 0);
        restarts.sort();
        assert_eq!(restarts.len(), 3, "{restarts:?}");
        assert!(
            restarts[0].starts_with(
                "the gen-0 process failed (exit status: 7): restarting it (1 of 1); its log: "
            ),
            "{restarts:?}"
        );
        assert!(
            restarts[2].starts_with("the trainer process failed"),
            "{restarts:?}"
        );
        let log =
            |name: &str| std::fs::read_to_string(run.join(format!("logs/{name}.log"))).unwrap();
        // The trainer's second start resumes; its log goes on.
        let trainer: Vec<String> = log("trainer").lines().map(String::from).collect();
        assert_eq!(trainer.len(), 2, "{trainer:?}");
        assert!(
            !trainer[0].contains("--resume") && trainer[1].ends_with("--resume"),
            "{trainer:?}"
        );
        assert!(
            trainer[0].contains("--run-dir") && trainer[0].contains("--advertise 10.0.0.1:5000")
        );
        // Tokens: the run's for the coordinator and the trainer, the generators' own for them.
        let token = std::fs::read_to_string(run.join("token")).unwrap();
        let generator_token = std::fs::read_to_string(run.join("generator-token")).unwrap();
        assert_eq!(token, "the-runs-token-0123456789");
        assert!(trainer[0].contains(&format!("token={token} ")));
        assert!(log("gen-1").contains(&format!(
            "token={generator_token} generator --coordinator 127.0.0.1:1 --name gen-1"
        )));
        assert!(log("coordinator").contains(&format!("token={token} coordinator --config ")));
        for f in ["token", "generator-token", "config.toml", "processes.json"] {
            assert_eq!(mode(&run.join(f)), 0o600, "{f}");
        }
        assert_eq!(
            std::fs::read_to_string(run.join("config.toml")).unwrap(),
            "[run]\nsteps = 2\n"
        );
        let pids: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("processes.json")).unwrap())
                .unwrap();
        let names: Vec<&String> = pids.as_object().unwrap().keys().collect();
        assert_eq!(names, ["coordinator", "gen-0", "gen-1", "trainer"]);
    }

    #[test]
    fn a_process_past_max_restarts_ends_the_run_and_everything_is_killed() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run) = (d.path(), d.path().join("run"));
        let program = fake(
            dir,
            r#"listen "$@"; wait_finished"#,
            "wait_finished",
            r#"echo "out of memory"; exit 9"#,
        );
        let mut s = Supervisor::start(plan(&run, 1, 2), program).unwrap();
        let pids: Vec<u32> = s.procs.iter().map(|p| p.child.id()).collect();
        let mut restarts = 0;
        let e = s
            .watch(
                &mut Markers(dir.to_path_buf()),
                &Stop::default(),
                &mut |e| {
                    if let Event::Restarting(_) = e {
                        restarts += 1
                    }
                },
            )
            .unwrap_err()
            .to_string();
        assert_eq!(restarts, 2);
        assert!(
            e.contains("the gen-0 process failed (exit status: 9); [run] max_restarts = 2 used up")
                && e.contains("out of memory"),
            "{e}"
        );
        drop(s);
        for pid in pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(
                stat.is_empty(),
                "process {pid} outlived the supervisor: {stat}"
            );
        }
    }

    /// A generator that exits with EXIT_DO_NOT_RESTART (its groups keep failing) is not
    /// restarted, whatever `max_restarts`: the others are stopped in order (SIGTERM, the
    /// coordinator last) and the run ends with its log.
    #[test]
    fn a_process_that_says_restarting_cannot_help_stops_the_run() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run) = (d.path(), d.path().join("run"));
        let stopped = |role: &str| {
            format!(
                r#"trap 'echo {role} >> "$D/order"; exit 0' TERM; while :; do sleep 0.02; done"#
            )
        };
        let program = fake(
            dir,
            &format!(r#"listen "$@"; {}"#, stopped("coordinator")),
            &stopped("trainer"),
            r#"sleep 0.3; echo "error: 11 of this generator's last 20 groups failed"; exit 78"#,
        );
        let mut s = Supervisor::start(plan(&run, 1, 5), program).unwrap();
        let mut events = Vec::new();
        let e = s
            .watch(
                &mut Markers(dir.to_path_buf()),
                &Stop::default(),
                &mut |e| {
                    if !matches!(e, Event::Progress(_)) {
                        events.push(format!("{e:?}"))
                    }
                },
            )
            .unwrap_err()
            .to_string();
        assert_eq!(events, ["Stopping"], "never restarted");
        assert!(
            e.contains("the gen-0 process stopped the run (exit status: 78)")
                && e.contains("not restarted")
                && e.contains("11 of this generator's last 20 groups failed")
                && e.contains("--resume"),
            "{e}"
        );
        let order = std::fs::read_to_string(dir.join("order")).unwrap();
        assert_eq!(
            order.lines().collect::<Vec<_>>(),
            ["trainer", "coordinator"]
        );
    }

    #[test]
    fn a_coordinator_that_never_listens_or_a_trainer_without_checkpoint_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run) = (d.path(), d.path().join("run"));
        let program = fake(dir, r#"echo "cannot bind"; exit 2"#, "exit 0", "exit 0");
        let e = Supervisor::start(plan(&run, 1, 1), program)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the coordinator exited (exit status: 2) before listening")
                && e.contains("cannot bind"),
            "{e}"
        );

        let program = fake(
            dir,
            r#"listen "$@"; wait_finished"#,
            "exit 1",
            "wait_finished",
        );
        let mut s = Supervisor::start(plan(&run, 1, 3), program).unwrap();
        let e = s
            .watch(
                &mut Markers(dir.to_path_buf()),
                &Stop::default(),
                &mut |_| {},
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("the trainer died before its first checkpoint"),
            "{e}"
        );
    }

    #[test]
    fn a_process_that_fails_before_it_registered_is_not_restarted() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run) = (d.path(), d.path().join("run"));
        let program = fake(
            dir,
            r#"listen "$@"; wait_finished"#,
            "wait_finished",
            r#"echo "cannot open the model"; exit 3"#,
        );
        let mut s = Supervisor::start(plan(&run, 1, 3), program).unwrap();
        let mut restarts = 0;
        let e = s
            .watch(&mut Nobody, &Stop::default(), &mut |e| {
                if let Event::Restarting(_) = e {
                    restarts += 1
                }
            })
            .unwrap_err()
            .to_string();
        assert_eq!(restarts, 0);
        assert!(
            e.contains(
                "the gen-0 process failed at start-up (exit status: 3), before it registered"
            ) && e.contains("not restarted")
                && e.contains("cannot open the model"),
            "{e}"
        );
    }

    /// A stop request: the trainer and the generators get SIGTERM first, the
    /// coordinator only once they are gone; nothing is restarted; a resumed run's
    /// trainer starts with `--resume` and the logs go on.
    #[test]
    fn a_stop_request_stops_workers_then_the_coordinator_and_resume_continues() {
        let d = tempfile::tempdir().unwrap();
        let (dir, run) = (d.path(), d.path().join("run"));
        // Each role notes its SIGTERM in $D/order and exits (the trainer with 5: a
        // failure is not restarted while stopping).
        let stopped = |role: &str, code: u32| {
            format!(
                r#"trap 'echo {role} >> "$D/order"; exit {code}' TERM; touch "$D/up-{role}"; while :; do sleep 0.02; done"#
            )
        };
        let program = fake(
            dir,
            &format!(r#"listen "$@"; {}"#, stopped("coordinator", 0)),
            &stopped("trainer", 5),
            &stopped("generator", 0),
        );
        let mut p = plan(&run, 1, 3);
        let mut s = Supervisor::start(p.clone(), program.clone()).unwrap();
        let stop = Stop::default();
        let mut events = Vec::new();
        let outcome = s
            .watch(&mut Markers(dir.to_path_buf()), &stop, &mut |e| match e {
                Event::Progress(_)
                    if ["trainer", "generator"]
                        .iter()
                        .all(|r| dir.join(format!("up-{r}")).exists()) =>
                {
                    stop.request()
                }
                Event::Progress(_) => {}
                other => events.push(format!("{other:?}")),
            })
            .unwrap();
        assert_eq!(outcome.ending, Ending::Stopped);
        assert_eq!(events, ["Stopping"]);
        let order = std::fs::read_to_string(dir.join("order")).unwrap();
        let order: Vec<&str> = order.lines().collect();
        assert_eq!(order.len(), 3, "{order:?}");
        assert_eq!(order[2], "coordinator", "{order:?}");
        for proc in s.procs.iter_mut() {
            assert!(proc.exited().unwrap().is_some(), "{} still runs", proc.name);
        }
        drop(s);
        // Resumed: the trainer continues from its checkpoint, the logs are appended to.
        p.resume = true;
        p.fresh.clear();
        std::fs::remove_file(dir.join("order")).unwrap();
        let mut s = Supervisor::start(p, program).unwrap();
        let stop = Stop::default();
        stop.request();
        stop.request();
        let outcome = s
            .watch(&mut Markers(dir.to_path_buf()), &stop, &mut |_| {})
            .unwrap();
        assert_eq!(outcome.ending, Ending::Killed);
        let trainer = std::fs::read_to_string(run.join("logs/trainer.log")).unwrap();
        let lines: Vec<&str> = trainer.lines().collect();
        assert!(
            lines.len() == 2 && !lines[0].ends_with("--resume") && lines[1].ends_with("--resume"),
            "{trainer}"
        );
    }
}
