//! `tandem sft CONFIG`: supervised fine-tuning on a JSONL / Parquet file with TRL's
//! fields, or on the synthetic arithmetic task; loss on assistant tokens only, a
//! held-out validation loss, a metrics log, checkpoints and the final model as HF
//! folders. Every record is read and checked before anything is written.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tandem_coordinator::dataset::{read_rows, DataConfig, DataKind, Dataset, PromptBody};
use tandem_model::ChatMessage;
use tandem_trainer::config::OptimizerConfig;
use tandem_trainer::sft::{self, Example, Masking, Render, Tokenized};
use tandem_trainer::step::Optimizer;

use crate::run_config::{parse_with_overrides, ModelSection};

/// `[sft]` (docs/pipeline.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftSection {
    /// Passes over the training split.
    pub epochs: u32,
    /// Stop after this many steps (0 = run the epochs).
    pub max_steps: u64,
    /// Sequences per optimizer step.
    pub batch_size: usize,
    /// Sequences are cut to this many tokens.
    pub max_len: usize,
    /// `all_assistant` or `last_turn`.
    pub masking: Masking,
    /// Share of the records held out for the validation loss (0 = none).
    pub val_fraction: f64,
    /// Validation every this many steps (and at the end; 0 = only at the end).
    pub eval_every: u64,
    /// A checkpoint every this many steps (0 = only the final model).
    pub save_every: u64,
    /// Where `metrics.jsonl`, `checkpoints/`, `final/` and `summary.json` go.
    pub out_dir: PathBuf,
    /// Records drawn from the synthetic task ([data] kind = "arithmetic").
    pub examples: usize,
    /// Seed of the split and of the order of each epoch.
    pub seed: u64,
}

impl Default for SftSection {
    fn default() -> Self {
        SftSection {
            epochs: 1,
            max_steps: 0,
            batch_size: 8,
            max_len: 1024,
            masking: Masking::AllAssistant,
            val_fraction: 0.05,
            eval_every: 50,
            save_every: 0,
            out_dir: "runs/sft".into(),
            examples: 2000,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub sft: SftSection,
    pub optimizer: OptimizerConfig,
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.optimizer.validate()?;
        let s = &self.sft;
        if s.epochs == 0 && s.max_steps == 0 {
            bail!("[sft] epochs: must be ≥ 1 (or set max_steps)");
        }
        if s.batch_size == 0 {
            bail!("[sft] batch_size: must be ≥ 1");
        }
        if s.max_len < 2 {
            bail!("[sft] max_len: must be ≥ 2 (a token and its successor)");
        }
        if !(0.0..1.0).contains(&s.val_fraction) {
            bail!("[sft] val_fraction: must be in [0, 1)");
        }
        if self.data.kind == DataKind::Arithmetic && s.examples == 0 {
            bail!("[sft] examples: the synthetic task needs ≥ 1");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct SftArgs {
    /// The SFT config (see docs/pipeline.md; examples/tiny-sft.toml).
    config: PathBuf,
    /// Config overrides, `section.key=value` (repeatable).
    #[arg(long = "set")]
    overrides: Vec<String>,
}

/// The records of the configured data, checked; errors name the file, line and field.
pub fn examples(cfg: &DataConfig, synthetic: usize) -> Result<Vec<Example>> {
    match cfg.kind {
        DataKind::Arithmetic => {
            let d = Dataset::load(cfg)?;
            Ok((0..synthetic as u64)
                .map(|i| {
                    let p = d.get(i);
                    let (PromptBody::Text(q), Some(a)) = (p.body, p.answer) else {
                        unreachable!("the arithmetic task gives text prompts with answers")
                    };
                    if cfg.chat {
                        Example::Conversation(vec![
                            ChatMessage::user(q),
                            ChatMessage {
                                role: "assistant".into(),
                                content: a,
                            },
                        ])
                    } else {
                        Example::Text {
                            prompt: q,
                            completion: format!(" {a}"),
                        }
                    }
                })
                .collect())
        }
        DataKind::Jsonl | DataKind::Parquet => {
            let path = cfg
                .path
                .as_deref()
                .context("[data] path: required with kind = \"jsonl\" or \"parquet\"")?;
            let rows = read_rows(path, cfg.kind == DataKind::Parquet)?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let ex = Example::from_row(&r.value, &r.at)?;
                if matches!(ex, Example::Text { .. }) && cfg.chat {
                    // String prompt and completion under a chat model: one exchange.
                    let Example::Text { prompt, completion } = ex else {
                        unreachable!()
                    };
                    out.push(Example::Conversation(vec![
                        ChatMessage::user(prompt),
                        ChatMessage {
                            role: "assistant".into(),
                            content: completion,
                        },
                    ]));
                } else if matches!(ex, Example::Conversation(_)) && !cfg.chat {
                    bail!(
                        "{}: a conversation needs the chat template: set [data] chat = true",
                        r.at
                    );
                } else {
                    out.push(ex);
                }
            }
            Ok(out)
        }
    }
}

pub fn run(a: SftArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg: SftConfig = parse_with_overrides(&text, &a.overrides)
        .with_context(|| format!("in {}", a.config.display()))?;
    cfg.validate()
        .with_context(|| format!("in {}", a.config.display()))?;
    let s = &cfg.sft;
    let model_path = crate::run::materialize_model(&cfg.model.path)?;
    let p = crate::load_model(&model_path)?;

    // Read, check and tokenize everything before writing anything.
    let records = examples(&cfg.data, s.examples)?;
    let render = Render {
        tokenizer: &p.tokenizer,
        system: cfg.data.system.as_deref(),
        masking: s.masking,
        eos: p.model.config().eos_token_ids.first().copied(),
        max_len: s.max_len.min(p.model.config().max_position_embeddings),
    };
    let mut data = Vec::with_capacity(records.len());
    let mut skipped = 0usize;
    for (i, ex) in records.iter().enumerate() {
        match render
            .tokenize(ex)
            .with_context(|| format!("record {}", i + 1))?
        {
            Some(t) => data.push(t),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            max_len = s.max_len,
            "records with no trained token left after truncation were skipped"
        );
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    data.shuffle(&mut rng);
    let n_val = ((data.len() as f64) * s.val_fraction).round() as usize;
    let (val, train) = data.split_at(n_val.min(data.len().saturating_sub(1)));
    if train.is_empty() {
        bail!("no training records");
    }
    let steps_per_epoch = train.len().div_ceil(s.batch_size) as u64;
    let total = if s.max_steps > 0 {
        s.max_steps
    } else {
        steps_per_epoch * s.epochs as u64
    };
    std::fs::create_dir_all(&s.out_dir)
        .with_context(|| format!("creating {}", s.out_dir.display()))?;
    let metrics_path = s.out_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("creating {}", metrics_path.display()))?;
    eprintln!(
        "sft: {} training and {} validation records ({} skipped), {total} steps of {}",
        train.len(),
        val.len(),
        skipped,
        s.batch_size
    );

    let model = &p.model;
    let mut opt = Optimizer::new(&cfg.optimizer, model, Vec::new())?;
    let val_loss = |model: &tandem_model::Model| -> Result<Option<f64>> {
        if val.is_empty() {
            return Ok(None);
        }
        let w = model.inference_weights();
        let (mut nll, mut n) = (0.0, 0usize);
        for chunk in val.chunks(s.batch_size) {
            let (l, k) = sft::eval_nll(model, &w, chunk)?;
            nll += l;
            n += k;
        }
        Ok(Some(nll / n as f64))
    };
    let first_val = val_loss(model)?;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut first_loss, mut last_loss, mut last_val) = (None, 0.0, first_val);
    let mut step = 0u64;
    'epochs: loop {
        order.shuffle(&mut rng);
        for idx in order.chunks(s.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let batch: Vec<Tokenized> = idx.iter().map(|&i| train[i].clone()).collect();
            let m = sft::step(model, &mut opt, &cfg.optimizer, &batch, step)?;
            step += 1;
            first_loss.get_or_insert(m.loss);
            last_loss = m.loss;
            let mut line = serde_json::to_value(&m)?;
            line["epoch"] = ((step - 1) / steps_per_epoch).into();
            if (s.eval_every > 0 && step.is_multiple_of(s.eval_every)) || step == total {
                last_val = val_loss(model)?;
                line["val_loss"] = last_val.into();
            }
            use std::io::Write;
            writeln!(metrics, "{line}")?;
            bar.set_message(format!(
                "loss {:.4}{}",
                m.loss,
                last_val.map(|v| format!(" val {v:.4}")).unwrap_or_default()
            ));
            bar.inc(1);
            if s.save_every > 0 && step.is_multiple_of(s.save_every) && step < total {
                save(
                    &p,
                    &s.out_dir.join("checkpoints").join(format!("step-{step}")),
                )?;
            }
        }
    }
    bar.finish();
    let out = s.out_dir.join("final");
    save(&p, &out)?;
    let summary = serde_json::json!({
        "steps": step,
        "train_records": train.len(),
        "val_records": val.len(),
        "skipped_records": skipped,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val_loss_before": first_val,
        "val_loss_after": last_val,
        "seconds": started.elapsed().as_secs_f64(),
        "model": out,
    });
    crate::serve::write_atomic(
        &s.out_dir.join("summary.json"),
        &serde_json::to_string_pretty(&summary)?,
    )?;
    eprintln!(
        "sft: loss {:.4} → {last_loss:.4}{}; model in {}",
        first_loss.unwrap_or(f64::NAN),
        match (first_val, last_val) {
            (Some(a), Some(b)) => format!(", validation {a:.4} → {b:.4}"),
            _ => String::new(),
        },
        out.display()
    );
    Ok(())
}

fn save(p: &tandem_model::Pretrained, dir: &Path) -> Result<()> {
    tandem_model::save_hf(&p.model, &p.tokenizer, dir)
        .with_context(|| format!("saving the model into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/pipeline.md lists exactly the `[sft]` keys, with the code's defaults.
    #[test]
    fn sft_keys_are_documented_with_their_defaults() {
        let doc = include_str!("../docs/pipeline.md");
        let table = doc
            .split("**`[sft]`**")
            .nth(1)
            .and_then(|t| t.split("**`[optimizer]`**").next())
            .unwrap();
        let mut documented: Vec<(String, String)> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .map(|row| {
                let cells: Vec<&str> = row.split(" | ").collect();
                (
                    cells[0].trim_end_matches('`').to_string(),
                    cells[1].trim().trim_matches('`').to_string(),
                )
            })
            .collect();
        documented.sort();
        let code = toml::Value::try_from(SftSection::default()).unwrap();
        let mut code: Vec<(String, String)> = code
            .as_table()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    toml::Value::String(s) => format!("\"{s}\""),
                    other => other.to_string(),
                };
                (k.clone(), shown)
            })
            .collect();
        code.sort();
        assert_eq!(documented, code);
    }

    #[test]
    fn bad_sft_configs_name_the_key() {
        for (set, needle) in [
            ("sft.batch_size=0", "batch_size"),
            ("sft.val_fraction=1.0", "val_fraction"),
            ("sft.max_len=1", "max_len"),
            ("sft.epochs=0", "epochs"),
            ("sft.masking=\"first\"", "masking"),
            ("sft.epoch=3", "epoch"),
        ] {
            let e = parse_with_overrides::<SftConfig>("", &[set.to_string()])
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
    }
}
