//! `tandem run CONFIG`: the whole loop on this machine — a coordinator, a trainer and N
//! generators as separate processes on loopback (`tandem_launch`) — with its progress,
//! until the configured steps are done or Ctrl-C stops it (`--resume` continues).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_coordinator::store::STATE_FILE;
use tandem_launch::resume::{self, Decision, Mode};
use tandem_launch::{
    progress::View, CoordinatorStatus, Ending, Program, RunPlan, Stop, Supervisor,
};

use crate::run_config::RunConfig;

#[derive(Args)]
pub struct RunArgs {
    /// The run's config file (see docs/config.md); examples/ has ready ones.
    #[arg(
        value_name = "CONFIG",
        required_unless_present = "config_flag",
        conflicts_with = "config_flag"
    )]
    config: Option<PathBuf>,
    /// The run's config file (the same as CONFIG).
    #[arg(long = "config", value_name = "CONFIG")]
    config_flag: Option<PathBuf>,
    /// Continue the run in `[run] run_dir` (after Ctrl-C, a crash or a reboot): the
    /// coordinator's saved state, the trainer's newest checkpoint; metrics appended.
    #[arg(long, conflicts_with = "fresh")]
    resume: bool,
    /// Delete the earlier run in `[run] run_dir` (checkpoints, metrics, the
    /// coordinator's state) and start over.
    #[arg(long)]
    fresh: bool,
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

pub fn run(a: RunArgs) -> Result<()> {
    let config = a
        .config
        .as_ref()
        .or(a.config_flag.as_ref())
        .context("CONFIG")?;
    let mut cfg = RunConfig::read(config, &a.overrides)?;
    if let Some(why) = tandem_weights::plane::unsupported(cfg.trainer.broadcast) {
        bail!("{why}");
    }
    let run_dir = PathBuf::from(&cfg.run.run_dir);
    // Refused before anything is fetched or written when another user controls it.
    tandem_launch::run_dir::prepare(&run_dir)?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = |flag: &str| resume::command_line(&args, flag);
    let mode = Mode::of(a.resume, a.fresh);
    let decision = resume::decide(&run_dir, mode, &resume::outputs(STATE_FILE), &command)?;
    // Config, model and data errors once, here, before any process is started; the
    // model resolved once so the processes do not race to fetch it.
    let spec = std::mem::take(&mut cfg.model.path);
    cfg.model.path = tandem_model::materialize(&spec)
        .and_then(|p| tandem_model::check(&p).map(|()| p))
        .map_err(|e| anyhow::anyhow!("[model] path = {spec:?}: {e}"))?;
    tandem_data::Dataset::load(&cfg.data)?;
    let token = match (std::env::var("TANDEM_TOKEN").ok(), cfg.run.token.take()) {
        (Some(t), _) if !t.is_empty() => t,
        (_, Some(t)) => t,
        _ => tandem_launch::env::new_token(),
    };
    // Every process gets the token and the TLS files through its environment; the
    // flags of `tandem run` (or TANDEM_TLS_*) override `[tls]`.
    let creds = a.security.credentials(Some(&token), Some(&cfg.tls))?;
    let exe = std::env::current_exe().context("finding the tandem executable")?;
    let program = Program {
        configure: die_with_parent,
        ..Program::new(exe)
    };
    let stop = Stop::on_signals()?;
    let mut supervisor = Supervisor::start(plan(&a, &cfg, token, decision)?, program)?;
    eprintln!(
        "run: coordinator {}, trainer, {} generators; logs in {}{}",
        supervisor.coordinator(),
        cfg.run.generators,
        supervisor.logs().display(),
        if mode == Mode::Resume {
            "; resumed"
        } else {
            ""
        }
    );
    let mut status = CoordinatorStatus::connect(supervisor.coordinator(), &creds)?;
    let mut view = View::new(
        cfg.run.steps,
        cfg.run.log_every,
        std::io::stderr().is_terminal(),
    );
    let watched = supervisor.watch(&mut status, &stop, &mut |e| view.show(e));
    view.finish(matches!(&watched, Ok(o) if o.ending == Ending::Finished));
    let outcome = watched?;
    if outcome.ending != Ending::Finished {
        eprintln!("{}", resume::kept(&run_dir, &outcome, &command("--resume")));
        std::process::exit(130);
    }
    eprintln!(
        "done: {} steps in {:.0} s, last reward {:.3}; model in {}, metrics in {}",
        cfg.run.steps,
        outcome.seconds,
        outcome.last_reward,
        run_dir.join("final").display(),
        run_dir.join("metrics.jsonl").display()
    );
    if let Some(h) = tandem_report::held_out::HeldOut::read(&run_dir) {
        let e = &cfg.eval;
        eprintln!("{}", h.line(e.prompts, e.samples, e.temperature));
    }
    Ok(())
}

/// What the supervisor starts: the run's config (without its token) and settings.
fn plan(a: &RunArgs, cfg: &RunConfig, token: String, d: Decision) -> Result<RunPlan> {
    Ok(RunPlan {
        run_dir: PathBuf::from(&cfg.run.run_dir),
        config_toml: cfg.to_toml()?,
        token,
        tls: a.security.tls_files(Some(&cfg.tls)),
        generators: cfg.run.generators,
        max_restarts: cfg.run.max_restarts,
        trainer_listen: a.trainer_listen.clone(),
        trainer_advertise: a.trainer_advertise.clone(),
        fresh: d.remove,
        resume: d.resume,
        poll: std::time::Duration::from_millis(500),
    })
}

/// A child outlives no `tandem run` (even one killed with -9): the kernel sends it
/// SIGTERM when its parent dies.
fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
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
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
