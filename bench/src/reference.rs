//! The reference side of `tandem bench model|generate|train-step`: the Python scripts
//! (tools/bench_transformers.py, bench_generate.py, bench_train_step.py) that measure
//! the same work with PyTorch.
//!
//! The protocol: the benchmark runs `PYTHON SCRIPT --gguf MODEL …` (or, for a preset,
//! `--config DIR`: [`model_args`]) with the arguments each benchmark passes, and reads the script's result from its standard output: the
//! last non-empty line, one JSON object on one line ([`crate::timing::run_child`]).
//! tools/bench_protocol.py parses those arguments and writes that line for every
//! script. The result must carry the fields of the types below, which the benchmarks'
//! tables read: a missing or mistyped field is an error naming it, never a "–" in the
//! table. tests/bench_reference.rs runs each benchmark against a stub script that
//! writes through the same Python module, so a change of format on either side fails
//! a test.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::process::Command;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{bail, invalid, Result};
use crate::timing::run_child;

/// The model a benchmark measures: `--preset NAME` (a random model of the preset's
/// shape, `preset:NAME` to Tandem) or `--model SPEC`.
pub fn model_spec(model: &str, preset: Option<&str>) -> Result<String> {
    match preset {
        Some(name) => {
            tandem_model::preset::preset_config(name)
                .map_err(|e| invalid(format!("--preset: {e}")))?;
            Ok(format!("preset:{name}"))
        }
        None => Ok(model.to_string()),
    }
}

/// The reference script's model arguments for the model `spec` names: `--gguf PATH` (the
/// file or folder), or for `preset:NAME` `--config DIR`, DIR a new folder holding the
/// preset's `config.json` (what `tandem model init` writes), from which the script builds
/// a model of the same shape with random weights. The folder lives as long as the
/// returned guard.
pub fn model_args(spec: &str) -> Result<(Vec<OsString>, Option<tempfile::TempDir>)> {
    match spec.strip_prefix("preset:") {
        Some(name) => {
            let config = tandem_model::preset::preset_config(name)
                .map_err(|e| invalid(format!("--preset: {e}")))?;
            let dir = tempfile::tempdir()?;
            let text = serde_json::to_string_pretty(&config.to_hf_json())?;
            std::fs::write(dir.path().join("config.json"), text)?;
            Ok((
                vec!["--config".into(), dir.path().as_os_str().to_owned()],
                Some(dir),
            ))
        }
        None => {
            let path = tandem_model::fetch::resolve(spec)?;
            Ok((vec!["--gguf".into(), path.into_os_string()], None))
        }
    }
}

/// One phase of `tandem bench model`'s reference.
#[derive(Debug, Deserialize)]
pub struct ModelPhase {
    pub seconds: f64,
    pub peak_rss_mib: f64,
    /// The peak once the model is loaded, where the watermark could be reset.
    pub phase_peak_rss_mib: Option<f64>,
    /// Decode and fwd+bwd phases.
    pub tokens_per_s: Option<f64>,
}

/// `tandem bench model`'s reference: every phase, measured with `threads` threads.
#[derive(Debug, Deserialize)]
pub struct ModelReference {
    pub engine: String,
    pub threads: usize,
    pub phases: BTreeMap<String, ModelPhase>,
}

impl ModelReference {
    /// Fails unless it measured every phase of `phases` (with tokens/s where the phase
    /// has them) with `threads` threads.
    pub fn check(&self, phases: &[String], threads: usize) -> Result<()> {
        if self.threads != threads {
            bail!(
                "the reference script ran with {} threads, not the {threads} asked",
                self.threads
            );
        }
        for ph in phases {
            let Some(p) = self.phases.get(ph) else {
                bail!(
                    "the reference script's result has no phase `{ph}` (it has {:?})",
                    self.phases.keys().collect::<Vec<_>>()
                );
            };
            if (ph.starts_with("decode_b") || ph == "fwd_bwd") && p.tokens_per_s.is_none() {
                bail!("the reference script's phase `{ph}` has no tokens_per_s");
            }
        }
        Ok(())
    }
}

/// `tandem bench generate`'s reference: one `generate` call on the workload.
#[derive(Debug, Deserialize)]
pub struct GenerateReference {
    pub tok_per_s: f64,
    pub seconds: f64,
    pub tokens: u64,
    pub sequences: u64,
    pub max_running: u64,
    pub peak_rss_mib: f64,
}

/// `tandem bench train-step`'s reference: one TRL-style GRPO step on the batch.
#[derive(Debug, Deserialize)]
pub struct TrainStepReference {
    pub seconds: f64,
    pub tokens: u64,
    pub peak_rss_mib: f64,
    pub loss: f64,
    pub grad_norm: f64,
}

/// Runs the reference script `cmd` and checks that its result has the fields of `T`;
/// returns both, the result as the script printed it (extra fields kept).
pub fn run<T: DeserializeOwned>(cmd: Command) -> Result<(T, Value)> {
    let value = run_child(cmd, "the reference script")?;
    let typed = serde_json::from_value(value.clone()).map_err(|e| {
        invalid(format!(
            "the reference script's result: {e} (the format is tools/bench_protocol.py's): {value}"
        ))
    })?;
    Ok((typed, value))
}
