//! `tandem sft | rm | dpo | rejection-sample CONFIG`: each reads its config (with
//! `--set` overrides) and runs its stage (`tandem_trainer::offline`,
//! `tandem_generator::rejection`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tandem_generator::rejection::RejectionConfig;
use tandem_trainer::offline::dpo::DpoConfig;
use tandem_trainer::offline::rm::RmConfig;
use tandem_trainer::offline::sft::SftConfig;

use tandem_launch::config_file::read_config;

/// A stage's config file and its overrides.
#[derive(Args)]
pub struct StageArgs {
    /// The stage's config (docs/pipeline.md; examples/tiny-*.toml).
    pub config: PathBuf,
    /// Config overrides, `section.key=value` (repeatable).
    #[arg(long = "set")]
    pub overrides: Vec<String>,
}

/// Reads `a`'s config as `T` (errors name the file) and runs `stage` on it, its errors
/// naming the command and the file; returns the config.
fn run_stage<T: serde::de::DeserializeOwned, E>(
    a: &StageArgs,
    command: &str,
    stage: impl FnOnce(&T) -> std::result::Result<serde_json::Value, E>,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let cfg: T = read_config(&a.config, &a.overrides)?;
    stage(&cfg).with_context(|| format!("{command}: {}", a.config.display()))?;
    Ok(cfg)
}

pub fn sft(a: StageArgs) -> Result<()> {
    run_stage::<SftConfig, _>(&a, "sft", |cfg: &SftConfig| {
        if cfg.sft.tools.is_empty() {
            return tandem_trainer::offline::sft::run(cfg);
        }
        // Tool-use transcripts: the tools announced in the system turn as the generators
        // announce them, the calls written as the generators parse them.
        let tools = cfg.sft.tools.clone();
        // One tool's transcripts (the calculator's): refused up front, never dropped.
        if tools.len() != 1 {
            return Err(tandem_trainer::Error::Invalid(
                "[sft] tools: name one tool (transcripts call one tool each)".into(),
            ));
        }
        tandem_env::tool_call::transcript(&tools[0], "1 + 1", "2")
            .map_err(|e| tandem_trainer::Error::Invalid(e.to_string()))?;
        let mut cfg = cfg.clone();
        cfg.data.system = Some(
            tandem_env::tool_call::system_prompt(cfg.data.system.as_deref(), &tools)
                .map_err(|e| tandem_trainer::Error::Invalid(e.to_string()))?,
        );
        let transcript = |question: &str, answer: &str| {
            tandem_env::tool_call::transcript(&tools[0], question, answer).unwrap_or_default()
        };
        tandem_trainer::offline::sft::run_with(&cfg, Some(&transcript))
    })
    .map(drop)
}

pub fn rm(a: StageArgs) -> Result<()> {
    run_stage::<RmConfig, _>(&a, "rm", tandem_trainer::offline::rm::run).map(drop)
}

pub fn dpo(a: StageArgs) -> Result<()> {
    run_stage::<DpoConfig, _>(&a, "dpo", tandem_trainer::offline::dpo::run).map(drop)
}

/// Rejection sampling, then `tandem sft` on the written dataset when `[rejection] sft`
/// names an SFT config (its `[data] path` set to the dataset).
pub fn rejection_sample(a: StageArgs) -> Result<()> {
    let cfg: RejectionConfig = run_stage(&a, "rejection-sample", tandem_generator::rejection::run)?;
    let r = &cfg.rejection;
    if let Some(config) = &r.sft {
        let out = r
            .out
            .to_str()
            .with_context(|| format!("{} is not UTF-8", r.out.display()))?;
        sft(StageArgs {
            config: config.clone(),
            overrides: vec![format!("data.path={out:?}")],
        })
        .with_context(|| format!("[rejection] sft: {}", config.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tandem_trainer::offline::sft;

    #[test]
    fn bad_sft_configs_name_the_key() {
        for (set, needle) in [
            ("train.batch_size=0", "batch_size"),
            ("train.val_fraction=1.0", "val_fraction"),
            ("train.max_len=1", "max_len"),
            ("train.epochs=0", "epochs"),
            ("sft.masking=\"first\"", "masking"),
            ("sft.epoch=3", "epoch"),
        ] {
            let e = match tandem_launch::config_file::parse_with_overrides::<sft::SftConfig>(
                "",
                &[set.to_string()],
            ) {
                Ok(c) => c.validate().unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(needle), "{set}: {e}");
        }
    }
}
