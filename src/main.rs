//! `tandem`: the one binary. Each subcommand wires library crates; the logic lives there.
//! Its only `unsafe`: the allocator's settings at start-up and a child's death signal.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod certs;
mod eval;
#[cfg(test)]
mod example_configs;
mod generate;
mod health;
mod model_cmd;
mod offline;
mod report;
mod run;
mod run_config;
mod score;
mod security;
mod serve;
mod status;
mod tool;
mod train_step;

use anyhow::Result;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Asynchronous actor-learner RL post-training for language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, convert and fetch models.
    Model(model_cmd::ModelArgs),
    /// Sample completions for a prompt.
    Generate(generate::GenerateArgs),
    /// Per-token logprobs and entropies of completions (JSONL in, JSONL out).
    Score(score::ScoreArgs),
    /// One optimizer step of the configured RL algorithm on a rollout file.
    TrainStep(train_step::TrainStepArgs),
    /// Benchmarks (side by side with a reference where one is given).
    Bench(tandem_bench::BenchArgs),
    /// Run the whole loop here: coordinator, trainer and generators on loopback.
    Run(run::RunArgs),
    /// Serve the control plane of a run.
    Coordinator(serve::CoordinatorArgs),
    /// Serve the trainer of a run (joins through the coordinator).
    Trainer(serve::TrainerArgs),
    /// Serve a generator of a run (joins through the coordinator).
    Generator(serve::GeneratorArgs),
    /// Print a run's lag table (per generator) and its last step's metrics.
    Status(status::StatusArgs),
    /// A model on a config's held-out set: accuracy, pass@k, maj@k, mean length.
    Eval(eval::EvalArgs),
    /// Plot a run (reward, staleness, throughput, losses over steps) as SVG and summarise it.
    Report(report::ReportArgs),
    /// Supervised fine-tuning (assistant tokens only) on a JSONL / Parquet file or a synthetic task.
    Sft(offline::StageArgs),
    /// Train a reward model (scalar head on the last token) on preference records.
    Rm(offline::StageArgs),
    /// Direct preference optimisation (DPO / IPO) against the starting model.
    Dpo(offline::StageArgs),
    /// Sample N completions per prompt, keep the best by reward, write an SFT dataset.
    RejectionSample(offline::StageArgs),
    /// Create a private CA and issue certificates for TLS / mTLS between a run's hosts.
    TlsCerts(certs::CertsArgs),
    /// Run a built-in tool (python, calculator) as an episode's tool call runs it and
    /// print what the model would read.
    Tool(tool::ToolArgs),
}

/// Keeps freed memory in the process. A training step allocates and frees hundreds of
/// MiB of activations and gradients; glibc's defaults hand blocks above 128 KiB back
/// to the kernel, and the next step pays a page fault per 4 KiB to get them again.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

fn main() {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Model(a) => model_cmd::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Score(a) => score::run(a),
        Command::TrainStep(a) => train_step::run(a),
        Command::Bench(a) => tandem_bench::run(a).map_err(Into::into),
        Command::Run(a) => run::run(a),
        Command::Coordinator(a) => serve::coordinator(a),
        Command::Trainer(a) => serve::trainer(a),
        Command::Generator(a) => serve::generator(a),
        Command::Status(a) => status::run(a),
        Command::Report(a) => report::run(a),
        Command::Eval(a) => eval::run(a),
        Command::TlsCerts(a) => certs::run(a),
        Command::Tool(a) => tool::run(a),
        Command::Sft(a) => offline::sft(a),
        Command::Rm(a) => offline::rm(a),
        Command::Dpo(a) => offline::dpo(a),
        Command::RejectionSample(a) => offline::rejection_sample(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        // A generator whose groups keep failing through no doing of the model: its
        // environment is broken, and `tandem run` must stop rather than restart it.
        let broken = e.chain().any(|c| {
            matches!(
                c.downcast_ref::<tandem_generator::Error>(),
                Some(tandem_generator::Error::Failing(_))
            )
        });
        std::process::exit(if broken {
            tandem_launch::EXIT_DO_NOT_RESTART
        } else {
            1
        });
    }
}
