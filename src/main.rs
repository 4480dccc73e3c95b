//! `tandem`: the one binary. Each subcommand wires library crates; the logic lives there.

mod bench;
mod bench_system;
mod certs;
mod dpo;
mod generate;
mod health;
mod model_cmd;
mod offline;
mod rejection;
mod report;
mod rm;
mod run;
mod run_config;
mod score;
mod security;
mod serve;
mod sft;
mod status;
mod train_step;
mod weight_broadcast;

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
    Bench(bench::BenchArgs),
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
    /// Plot a run (reward, staleness, throughput, losses over steps) as SVG and summarise it.
    Report(report::ReportArgs),
    /// Supervised fine-tuning (assistant tokens only) on a JSONL / Parquet file or a synthetic task.
    Sft(sft::SftArgs),
    /// Train a reward model (scalar head on the last token) on preference records.
    Rm(rm::RmArgs),
    /// Direct preference optimisation (DPO / IPO) against the starting model.
    Dpo(dpo::DpoArgs),
    /// Sample N completions per prompt, keep the best by reward, write an SFT dataset.
    RejectionSample(rejection::RejectionArgs),
    /// Create a private CA and issue certificates for TLS / mTLS between a run's hosts.
    TlsCerts(certs::CertsArgs),
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
        Command::Bench(a) => bench::run(a),
        Command::Run(a) => run::run(a),
        Command::Coordinator(a) => serve::coordinator(a),
        Command::Trainer(a) => serve::trainer(a),
        Command::Generator(a) => serve::generator(a),
        Command::Status(a) => status::run(a),
        Command::Report(a) => report::run(a),
        Command::TlsCerts(a) => certs::run(a),
        Command::Sft(a) => sft::run(a),
        Command::Rm(a) => rm::run(a),
        Command::Dpo(a) => dpo::run(a),
        Command::RejectionSample(a) => rejection::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The device commands run on, from `TANDEM_DEVICE`: `cpu`, `cuda` (= `cuda:0`) or
/// `cuda:N`. Unset (or `auto`): the first CUDA device when built with the `cuda`
/// feature and one opens, else the CPU. Opened once per process: every caller gets the
/// same device (candle refuses to mix tensors of two opened handles of one GPU).
pub(crate) fn device() -> Result<candle_core::Device> {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    if let Some(d) = DEVICE.get() {
        return Ok(d.clone());
    }
    let spec = std::env::var("TANDEM_DEVICE").unwrap_or_default();
    let d = open_device(spec.trim())?;
    Ok(DEVICE.get_or_init(|| d).clone())
}

fn open_device(spec: &str) -> Result<candle_core::Device> {
    use anyhow::bail;
    let ordinal = match spec {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "" | "auto" => {
            if !cfg!(feature = "cuda") {
                return Ok(candle_core::Device::Cpu);
            }
            return Ok(match candle_core::Device::new_cuda(0) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(
                        "no usable CUDA device ({}); running on the CPU",
                        first_line(&e)
                    );
                    candle_core::Device::Cpu
                }
            });
        }
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("TANDEM_DEVICE=`{s}`: expected `cpu`, `cuda` or `cuda:N`"),
        },
    };
    if !cfg!(feature = "cuda") {
        bail!(
            "TANDEM_DEVICE=`{spec}`: this tandem was built without CUDA; rebuild it with \
             scripts/build-cuda.sh (cargo build --release --features cuda), or set TANDEM_DEVICE=cpu"
        );
    }
    candle_core::Device::new_cuda(ordinal).map_err(|e| {
        anyhow::anyhow!(
            "TANDEM_DEVICE=`{spec}`: opening CUDA device {ordinal}: {}",
            first_line(&e)
        )
    })
}

/// An error's first line: candle appends a backtrace to its message when
/// `RUST_BACKTRACE` is set, which a one-line warning does not need.
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The dtype models are loaded in on `device`: `TANDEM_DTYPE` (`f32`, `bf16`, `f16`),
/// else f32 on CPU and bf16 on CUDA ([`tandem_model::default_dtype`]). Presets are
/// always f32.
pub(crate) fn dtype(device: &candle_core::Device) -> Result<candle_core::DType> {
    use candle_core::DType;
    match std::env::var("TANDEM_DTYPE").unwrap_or_default().trim() {
        "" => Ok(tandem_model::default_dtype(device)),
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("TANDEM_DTYPE=`{other}`: expected `f32`, `bf16` or `f16`"),
    }
}

/// Loads a model argument (folder, .gguf, or a fetchable name) with context for errors.
pub(crate) fn load_model(spec: &str) -> Result<tandem_model::Pretrained> {
    use anyhow::Context;
    let device = device()?;
    let dtype = dtype(&device)?;
    if let Some(name) = spec.strip_prefix("preset:") {
        return tandem_model::preset::init(name, 0, &device)
            .with_context(|| format!("model `{spec}`"));
    }
    tandem_model::load(spec, dtype, &device).with_context(|| format!("loading model `{spec}`"))
}
