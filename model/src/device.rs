//! The device and dtype a process computes on, chosen once from the environment, and
//! loading a model there.
//!
//! `TANDEM_DEVICE`: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`; unset (or `auto`): the first
//! CUDA device when built with the `cuda` feature and one opens, else the CPU.
//! `TANDEM_DTYPE`: `f32`, `bf16` or `f16`; unset: [`crate::default_dtype`] (f32 on CPU,
//! bf16 on CUDA).

use candle_core::{DType, Device};

use crate::checkpoint::Pretrained;
use crate::error::{Error, Result};

/// The process's device, opened once: every caller gets the same handle (candle refuses
/// to mix tensors of two opened handles of one GPU).
pub fn process_device() -> Result<Device> {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    if let Some(d) = DEVICE.get() {
        return Ok(d.clone());
    }
    let spec = std::env::var("TANDEM_DEVICE").unwrap_or_default();
    let d = open(spec.trim())?;
    Ok(DEVICE.get_or_init(|| d).clone())
}

fn open(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "" | "auto" => {
            if !cfg!(feature = "cuda") {
                return Ok(Device::Cpu);
            }
            return Ok(match Device::new_cuda(0) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(
                        "no usable CUDA device ({}); running on the CPU",
                        first_line(&e)
                    );
                    Device::Cpu
                }
            });
        }
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(Error::invalid(format!(
                    "TANDEM_DEVICE=`{s}`: expected `cpu`, `cuda` or `cuda:N`"
                )))
            }
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::invalid(format!(
            "TANDEM_DEVICE=`{spec}`: this tandem was built without CUDA; rebuild it with \
             scripts/build-cuda.sh (cargo build --release --features cuda), or set TANDEM_DEVICE=cpu"
        )));
    }
    Device::new_cuda(ordinal).map_err(|e| {
        Error::invalid(format!(
            "TANDEM_DEVICE=`{spec}`: opening CUDA device {ordinal}: {}",
            first_line(&e)
        ))
    })
}

/// An error's first line: candle appends a backtrace to its message when
/// `RUST_BACKTRACE` is set, which a one-line message does not need.
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// The dtype models load in on `device`: `TANDEM_DTYPE`, else [`crate::default_dtype`].
pub fn process_dtype(device: &Device) -> Result<DType> {
    match std::env::var("TANDEM_DTYPE").unwrap_or_default().trim() {
        "" => Ok(crate::default_dtype(device)),
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(Error::invalid(format!(
            "TANDEM_DTYPE=`{other}`: expected `f32`, `bf16` or `f16`"
        ))),
    }
}

/// [`crate::load`] on the process's device in its dtype; errors name the model.
pub fn load_model(spec: &str) -> Result<Pretrained> {
    let device = process_device()?;
    let dtype = process_dtype(&device)?;
    crate::load(spec, dtype, &device).map_err(|e| Error::invalid(format!("model `{spec}`: {e}")))
}

/// The policy a run trains, on the process's device: `base` alone, or under `[lora]`
/// `base` with its adapter: the one saved in `adapter_dir` (a checkpoint, PEFT's
/// format) when given, else the section's (`from`, or a fresh one).
pub fn load_policy(
    base: &str,
    lora: Option<&crate::LoraSection>,
    adapter_dir: Option<&std::path::Path>,
) -> Result<Pretrained> {
    let mut p = load_model(base)?;
    let Some(section) = lora else {
        return Ok(p);
    };
    p.model = match adapter_dir {
        Some(dir) => {
            let a =
                crate::lora::load_peft(dir, p.model.config(), p.model.dtype(), p.model.device())?;
            p.model.with_adapter(a)?
        }
        None => section.attach(p.model)?,
    };
    Ok(p)
}
