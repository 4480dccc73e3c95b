//! `tandem run CONFIG`: the whole loop on this machine — a coordinator, a trainer and
//! N generators as separate processes on loopback — with a progress line, until the
//! configured steps are done.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngCore;
use tandem_proto::client;
use tandem_proto::v1::StatusRequest;

use crate::run_config::RunConfig;

#[derive(Args)]
pub struct RunArgs {
    /// The run's config file (see docs/config.md); examples/ has ready ones.
    config: PathBuf,
    /// Config overrides, `section.key=value` (repeatable), e.g. --set run.steps=50.
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Where the trainer listens (default: any free port on loopback). A fixed address
    /// stays the same when the trainer is restarted.
    #[arg(long)]
    trainer_listen: Option<String>,
    /// The address generators dial for the trainer, when it differs from where it
    /// listens (a proxy, a load balancer, NAT).
    #[arg(long)]
    trainer_advertise: Option<String>,
    #[command(flatten)]
    security: crate::security::SecurityArgs,
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// Its command line and environment, to start it again.
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    restarts: u32,
}

impl Proc {
    fn spawn(
        name: &str,
        args: &[&str],
        logs: &Path,
        env: &[(&'static str, String)],
    ) -> Result<Self> {
        let log = logs.join(format!("{name}.log"));
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = start(name, &args, &log, env, false)?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
            args,
            env: env.to_vec(),
            restarts: 0,
        })
    }

    /// Starts the process again after it died (its log continues); a trainer resumes
    /// from its newest checkpoint when it has one.
    fn restart(&mut self, run_dir: &Path) -> Result<()> {
        let mut args = self.args.clone();
        if self.name == "trainer" {
            // Its steps since the newest checkpoint are redone; without one, the
            // coordinator's published versions would not match a fresh trainer.
            if !run_dir.join("checkpoints/latest").exists() {
                bail!(
                    "the trainer died before its first checkpoint ([trainer] checkpoint_every): nothing to resume from; last lines of {}:\n{}",
                    self.log.display(),
                    self.tail()
                );
            }
            if !args.iter().any(|a| a == "--resume") {
                args.push("--resume".into());
            }
        }
        self.child = start(&self.name, &args, &self.log, &self.env, true)?;
        self.restarts += 1;
        Ok(())
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// Kills every process still running when dropped (an error or Ctrl-C path).
struct Procs(Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            if let Ok(None) = p.child.try_wait() {
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
        }
    }
}

pub fn run(a: RunArgs) -> Result<()> {
    let mut cfg = RunConfig::read(&a.config, &a.overrides)?;
    if let Some(why) = tandem_weights::plane::unsupported(cfg.trainer.broadcast) {
        anyhow::bail!("{why}");
    }
    let run_dir = PathBuf::from(&cfg.run.run_dir);
    // Ours alone: no other user can plant a link where a file is about to be written.
    crate::run_dir::prepare(&run_dir)?;
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    // A new run's logs and the coordinator's saved state start empty.
    for file in [
        "metrics.jsonl",
        "eval.jsonl",
        tandem_coordinator::store::STATE_FILE,
    ] {
        if run_dir.join(file).exists() {
            std::fs::remove_file(run_dir.join(file))
                .with_context(|| format!("removing {}", run_dir.join(file).display()))?;
        }
    }
    // Resolve the model once, here, so the processes do not race to fetch or create it.
    cfg.model.path = tandem_model::materialize(&cfg.model.path)
        .with_context(|| format!("[model] path: {}", cfg.model.path))?;
    let token = match (std::env::var("TANDEM_TOKEN").ok(), &cfg.run.token) {
        (Some(t), _) if !t.is_empty() => t,
        (_, Some(t)) => t.clone(),
        _ => {
            let mut b = [0u8; 16];
            rand::rng().fill_bytes(&mut b);
            hex::encode(b)
        }
    };
    cfg.run.token = None;
    // For `tandem status` and scrapers while the run goes: readable by this user only.
    crate::security::write_private(&run_dir.join("token"), &token)?;
    // Every process gets the token and the TLS files through its environment; the
    // flags of `tandem run` (or TANDEM_TLS_*) override `[tls]`.
    let tls_files = a.security.tls_files(Some(&cfg.tls));
    let creds = a.security.credentials(Some(&token), Some(&cfg.tls))?;
    // Two roles: the coordinator and the trainer hold the run's token and accept the
    // generator token too; generators hold only the generator token, which cannot
    // publish, commit, exclude or register as the trainer.
    let generator_token = {
        let mut b = [0u8; 16];
        rand::rng().fill_bytes(&mut b);
        hex::encode(b)
    };
    crate::security::write_private(&run_dir.join("generator-token"), &generator_token)?;
    let tls_env = crate::security::tls_env(&tls_files)?;
    let mut env = tls_env.clone();
    env.push(("TANDEM_TOKEN", token.clone()));
    env.push(("TANDEM_GENERATOR_TOKEN", generator_token.clone()));
    let mut gen_env = tls_env;
    gen_env.push(("TANDEM_TOKEN", generator_token.clone()));
    // It may hold secrets ([reward] service_token, the dataset's answers): this user's.
    let cfg_path = run_dir.join("config.toml");
    crate::run_dir::write_private_atomic(&cfg_path, &cfg.to_toml()?)?;

    let addr_file = run_dir.join("coordinator.json");
    let _ = std::fs::remove_file(&addr_file);
    let mut procs = Procs(vec![Proc::spawn(
        "coordinator",
        &[
            "coordinator",
            "--config",
            path_str(&cfg_path)?,
            "--addr-file",
            path_str(&addr_file)?,
        ],
        &logs,
        &env,
    )?]);
    let t0 = Instant::now();
    let (addr, http) = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            break (field("grpc"), field("http"));
        }
        if let Some(st) = procs.0[0].child.try_wait()? {
            bail!(
                "the coordinator exited ({st}) before listening:\n{}",
                procs.0[0].tail()
            );
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "the coordinator did not start listening within 60 s; see {}",
                procs.0[0].log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Started again, it listens where the workers already dial, and continues the run
    // from its saved state.
    procs.0[0].args.extend([
        "--set".to_string(),
        format!("coordinator.listen={addr}"),
        "--set".to_string(),
        format!("coordinator.http_listen={http}"),
    ]);
    let run_dir_arg = path_str(&run_dir)?.to_string();
    let mut trainer_args = vec!["trainer", "--coordinator", &addr, "--run-dir", &run_dir_arg];
    if let Some(listen) = &a.trainer_listen {
        trainer_args.extend(["--listen", listen]);
    }
    if let Some(advertise) = &a.trainer_advertise {
        trainer_args.extend(["--advertise", advertise]);
    }
    procs
        .0
        .push(Proc::spawn("trainer", &trainer_args, &logs, &env)?);
    for i in 0..cfg.run.generators {
        let name = format!("gen-{i}");
        procs.0.push(Proc::spawn(
            &name,
            &["generator", "--coordinator", &addr, "--name", &name],
            &logs,
            &gen_env,
        )?);
    }
    eprintln!(
        "run: coordinator {addr}, trainer, {} generators; logs in {}",
        cfg.run.generators,
        logs.display()
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut coord = rt
        .block_on(client::connect(&addr, &creds))
        .map(|ch| client::coordinator(ch, &creds))
        .map_err(|e| anyhow!("coordinator: {e}"))?;
    let bar = ProgressBar::new(cfg.run.steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut last_reward = f64::NAN;
    write_pids(&run_dir, &procs.0)?;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let mut restarted = false;
        for p in procs.0.iter_mut() {
            if let Some(st) = p.child.try_wait()? {
                if st.success() {
                    continue;
                }
                // Any process is started again: the coordinator continues from its
                // saved state, the trainer from its newest checkpoint.
                if p.restarts >= cfg.run.max_restarts {
                    bar.abandon();
                    bail!(
                        "the {} process failed ({st}); [run] max_restarts = {} used up; last lines of {}:\n{}",
                        p.name,
                        cfg.run.max_restarts,
                        p.log.display(),
                        p.tail()
                    );
                }
                bar.suspend(|| {
                    eprintln!(
                        "the {} process failed ({st}): restarting it ({} of {}); its log: {}",
                        p.name,
                        p.restarts + 1,
                        cfg.run.max_restarts,
                        p.log.display()
                    )
                });
                p.restart(&run_dir)?;
                restarted = true;
            }
        }
        if restarted {
            write_pids(&run_dir, &procs.0)?;
        }
        let trainer_done = procs.0[1].child.try_wait()?.is_some();
        if let Ok(s) = rt.block_on(coord.status(StatusRequest {})) {
            let s = s.into_inner();
            bar.set_position(s.step);
            last_reward = s.metrics.get("reward_mean").copied().unwrap_or(f64::NAN);
            bar.set_message(format!(
                "reward {:.3} | staleness ≤{} | {:.0} tok/s | v{} | {} generators",
                last_reward,
                s.max_staleness_seen,
                s.tokens_per_second,
                s.policy_version,
                s.workers
                    .iter()
                    .filter(|w| w.role == tandem_proto::v1::Role::Generator as i32)
                    .count()
            ));
            if s.finished && trainer_done {
                break;
            }
        } else if trainer_done {
            break;
        }
    }
    bar.finish();
    // Generators and the coordinator leave on their own once the run is finished.
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in procs.0.iter_mut() {
        loop {
            match p.child.try_wait()? {
                Some(st) if st.success() => break,
                Some(st) => bail!("the {} process failed ({st}):\n{}", p.name, p.tail()),
                None if Instant::now() > deadline => {
                    let _ = p.child.kill();
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    eprintln!(
        "done: {} steps in {:.0} s, last reward {:.3}; model in {}, metrics in {}",
        cfg.run.steps,
        started.elapsed().as_secs_f64(),
        last_reward,
        run_dir.join("final").display(),
        run_dir.join("metrics.jsonl").display()
    );
    if let Some(line) = crate::eval::before_after(&run_dir, &cfg) {
        eprintln!("{line}");
    }
    Ok(())
}

/// Starts `tandem ARGS` with its output in `log` (appended to when `append`).
fn start(
    name: &str,
    args: &[String],
    log: &Path,
    env: &[(&str, String)],
    append: bool,
) -> Result<Child> {
    let file = crate::run_dir::open_log(log, append)?;
    let exe = std::env::current_exe().context("finding the tandem executable")?;
    let mut cmd = Command::new(exe);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // A child outlives no `tandem run` (even one killed with -9): the kernel sends
        // it SIGTERM when its parent dies.
        // SAFETY: prctl is async-signal-safe and touches only the child being started.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting the {name} process"))
}

/// Writes `RUN_DIR/processes.json`: each process's name and pid (updated on restarts).
fn write_pids(run_dir: &Path, procs: &[Proc]) -> Result<()> {
    let pids: serde_json::Map<String, serde_json::Value> = procs
        .iter()
        .map(|p| (p.name.clone(), p.child.id().into()))
        .collect();
    tandem_model::write_atomic(
        &run_dir.join("processes.json"),
        serde_json::Value::Object(pids).to_string(),
    )?;
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("{} is not valid UTF-8", p.display()))
}
