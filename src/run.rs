//! `tandem run CONFIG`: the whole loop on this machine — a coordinator, a trainer and
//! N generators as separate processes on loopback (`tandem_launch`) — with a progress
//! line, until the configured steps are done.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tandem_coordinator::store::STATE_FILE;
use tandem_launch::{CoordinatorStatus, Event, Outcome, Program, RunPlan, Supervisor};

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

pub fn run(a: RunArgs) -> Result<()> {
    let mut cfg = RunConfig::read(&a.config, &a.overrides)?;
    if let Some(why) = tandem_weights::plane::unsupported(cfg.trainer.broadcast) {
        bail!("{why}");
    }
    let run_dir = PathBuf::from(&cfg.run.run_dir);
    // Refused before anything is fetched or written when another user controls it.
    tandem_launch::run_dir::prepare(&run_dir)?;
    // Resolve the model once, here, so the processes do not race to fetch or create it.
    cfg.model.path = tandem_model::materialize(&cfg.model.path)
        .with_context(|| format!("[model] path: {}", cfg.model.path))?;
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
    let mut supervisor = Supervisor::start(plan(&a, &cfg, token)?, program)?;
    eprintln!(
        "run: coordinator {}, trainer, {} generators; logs in {}",
        supervisor.coordinator(),
        cfg.run.generators,
        supervisor.logs().display()
    );
    let mut status = CoordinatorStatus::connect(supervisor.coordinator(), &creds)?;
    let outcome = watch(&mut supervisor, &mut status, cfg.run.steps)?;
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
fn plan(a: &RunArgs, cfg: &RunConfig, token: String) -> Result<RunPlan> {
    Ok(RunPlan {
        run_dir: PathBuf::from(&cfg.run.run_dir),
        config_toml: cfg.to_toml()?,
        token,
        tls: a.security.tls_files(Some(&cfg.tls)),
        generators: cfg.run.generators,
        max_restarts: cfg.run.max_restarts,
        trainer_listen: a.trainer_listen.clone(),
        trainer_advertise: a.trainer_advertise.clone(),
        // A new run's logs and the coordinator's saved state start empty.
        fresh: ["metrics.jsonl", "eval.jsonl", STATE_FILE]
            .map(String::from)
            .to_vec(),
        poll: Duration::from_millis(500),
    })
}

/// Watches the run with a progress bar of `steps` steps; restarts are printed above it.
fn watch(s: &mut Supervisor, status: &mut CoordinatorStatus, steps: u64) -> Result<Outcome> {
    let bar = progress_bar(steps);
    let watched = s.watch(status, &mut |event| match event {
        Event::Progress(p) => {
            bar.set_position(p.step);
            bar.set_message(p.message());
        }
        Event::Restarting(r) => bar.suspend(|| eprintln!("{r}")),
    });
    match &watched {
        Ok(_) => bar.finish(),
        Err(_) => bar.abandon(),
    }
    Ok(watched?)
}

fn progress_bar(steps: u64) -> ProgressBar {
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
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
