//! The offline stages (`tandem sft | rm | dpo`) and the loop they share: a held-out
//! split, epochs of shuffled batches, a metrics line per step, validation every N steps
//! and at the end, checkpoints and the final model, a summary, a progress bar.
//!
//! Each stage is a folder holding its data, its loss and the stage itself:
//!
//! - [`sft`] — supervised fine-tuning on assistant tokens
//! - [`rm`] — a reward model on preference records (and the records `dpo` reads too)
//! - [`dpo`] — DPO / IPO against the starting model
//!
//! [`preference`] holds the pairwise and listwise losses `rm` and `dpo` share
//! (Bradley–Terry, Plackett–Luce, DPO, IPO).

pub mod dpo;
pub mod preference;
pub mod rm;
pub mod sft;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{bail, Context, Result};

/// `[train]` (docs/pipeline.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    /// Passes over the training split.
    pub epochs: u32,
    /// Stop after this many steps (0 = run the epochs).
    pub max_steps: u64,
    /// Records per optimizer step.
    pub batch_size: usize,
    /// Sequences are cut to this many tokens.
    pub max_len: usize,
    /// Share of the records held out for validation (0 = none).
    pub val_fraction: f64,
    /// Validation every this many steps (and before and after training; 0 = only then).
    pub eval_every: u64,
    /// A checkpoint every this many steps (0 = only the final model).
    pub save_every: u64,
    /// Where `metrics.jsonl`, `checkpoints/`, `final/` and `summary.json` go.
    pub out_dir: PathBuf,
    /// Seed of the split and of the order of each epoch.
    pub seed: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            epochs: 1,
            max_steps: 0,
            batch_size: 8,
            max_len: 1024,
            val_fraction: 0.05,
            eval_every: 50,
            save_every: 0,
            out_dir: "runs/offline".into(),
            seed: 0,
        }
    }
}

impl TrainSection {
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 && self.max_steps == 0 {
            bail!("[train] epochs: must be ≥ 1 (or set max_steps)");
        }
        if self.batch_size == 0 {
            bail!("[train] batch_size: must be ≥ 1");
        }
        if self.max_len < 2 {
            bail!("[train] max_len: must be ≥ 2 (a token and its successor)");
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            bail!("[train] val_fraction: must be in [0, 1)");
        }
        Ok(())
    }
}

/// One offline stage: how a batch trains, how held-out records are scored, how the
/// result is saved.
pub trait Stage {
    type Item: Clone;
    /// One optimizer step; its metrics (with `loss`).
    fn step(&mut self, batch: &[Self::Item], step: u64) -> Result<Value>;
    /// Metrics of held-out records (with `loss`); reported with a `val_` prefix.
    fn evaluate(&mut self, items: &[Self::Item]) -> Result<Map<String, Value>>;
    fn save(&self, dir: &Path) -> Result<()>;
}

/// Trains `stage` on `items` under the schedule `t`; writes the metrics, checkpoints,
/// final model and summary into `t.out_dir` and returns the summary.
pub fn train<S: Stage>(
    stage: &mut S,
    mut items: Vec<S::Item>,
    t: &TrainSection,
    what: &str,
) -> Result<Value> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(t.seed);
    items.shuffle(&mut rng);
    let n_val = ((items.len() as f64) * t.val_fraction).round() as usize;
    let (val, train) = items.split_at(n_val.min(items.len().saturating_sub(1)));
    if train.is_empty() {
        bail!("no training records");
    }
    let steps_per_epoch = train.len().div_ceil(t.batch_size) as u64;
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        steps_per_epoch * t.epochs as u64
    };
    std::fs::create_dir_all(&t.out_dir)
        .with_context(|| format!("creating {}", t.out_dir.display()))?;
    let metrics_path = t.out_dir.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path)
        .with_context(|| format!("creating {}", metrics_path.display()))?;
    eprintln!(
        "{what}: {} training and {} validation records, {total} steps of {}",
        train.len(),
        val.len(),
        t.batch_size
    );
    let evaluate = |stage: &mut S| -> Result<Map<String, Value>> {
        if val.is_empty() {
            return Ok(Map::new());
        }
        Ok(stage
            .evaluate(val)?
            .into_iter()
            .map(|(k, v)| (format!("val_{k}"), v))
            .collect())
    };
    let before = evaluate(stage)?;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let started = Instant::now();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut first, mut last, mut after) = (Value::Null, Value::Null, before.clone());
    let mut step = 0u64;
    'epochs: loop {
        order.shuffle(&mut rng);
        for idx in order.chunks(t.batch_size) {
            if step >= total {
                break 'epochs;
            }
            let batch: Vec<S::Item> = idx.iter().map(|&i| train[i].clone()).collect();
            let mut line = stage.step(&batch, step)?;
            step += 1;
            line["step"] = step.into();
            line["epoch"] = ((step - 1) / steps_per_epoch).into();
            if (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || step == total {
                after = evaluate(stage)?;
                for (k, v) in &after {
                    line[k] = v.clone();
                }
            }
            writeln!(metrics, "{line}")?;
            if first.is_null() {
                first = line["loss"].clone();
            }
            last = line["loss"].clone();
            bar.set_message(format!(
                "loss {:.4}{}",
                line["loss"].as_f64().unwrap_or(f64::NAN),
                after
                    .get("val_loss")
                    .and_then(Value::as_f64)
                    .map(|v| format!(" val {v:.4}"))
                    .unwrap_or_default()
            ));
            bar.inc(1);
            if t.save_every > 0 && step.is_multiple_of(t.save_every) && step < total {
                stage.save(&t.out_dir.join("checkpoints").join(format!("step-{step}")))?;
            }
        }
    }
    bar.finish();
    let out = t.out_dir.join("final");
    stage.save(&out)?;
    let summary = serde_json::json!({
        "steps": step,
        "train_records": train.len(),
        "val_records": val.len(),
        "first_loss": first,
        "last_loss": last,
        "before": before,
        "after": after,
        "seconds": started.elapsed().as_secs_f64(),
        "model": out,
    });
    tandem_model::write_atomic(
        &t.out_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    eprintln!(
        "{what}: loss {first} → {last}; validation {} → {}; model in {}",
        Value::Object(before),
        Value::Object(after),
        out.display()
    );
    Ok(summary)
}

/// The model a stage starts from (`[model] path`, fetched if named; under `[lora]`
/// with its adapter), its tokenizer given `[data] chat_template_kwargs` for every
/// render of its chat template.
pub fn load_policy(
    model: &tandem_model::ModelSection,
    data: &tandem_data::DataConfig,
    lora: Option<&tandem_model::LoraSection>,
) -> Result<tandem_model::Pretrained> {
    let mut p = tandem_model::load_policy(&tandem_model::materialize(&model.path)?, lora, None)?;
    let kwargs = data.chat_template_kwargs.clone().unwrap_or_default();
    kwargs.validate()?;
    p.tokenizer
        .set_chat_template_kwargs(kwargs.0)
        .with_context(|| "[data] chat_template_kwargs".to_string())?;
    Ok(p)
}

/// Saves what a stage trained: the model (and its tokenizer) as an HF folder, its
/// weights in `dtype`, or under LoRA the adapter in PEFT's format naming `base`.
pub fn save_model(
    p: &tandem_model::Pretrained,
    dir: &Path,
    dtype: DType,
    base: &str,
) -> Result<()> {
    Ok(tandem_model::save_policy(p, dir, dtype, base)
        .with_context(|| format!("saving the model into {}", dir.display()))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stages' model gets `[data] chat_template_kwargs` on its tokenizer.
    #[test]
    fn the_stages_model_renders_with_the_template_kwargs() {
        let data: tandem_data::DataConfig =
            toml::from_str("chat_template_kwargs = { enable_thinking = false, n = 1 }").unwrap();
        let model = tandem_model::ModelSection {
            path: "preset:tiny".into(),
            ..Default::default()
        };
        let p = load_policy(&model, &data, None).unwrap();
        assert_eq!(p.tokenizer.chat_template_kwargs(), ["enable_thinking", "n"]);
        let bad: tandem_data::DataConfig =
            toml::from_str("chat_template_kwargs = { add_generation_prompt = true }").unwrap();
        let e = load_policy(&model, &bad, None).unwrap_err().to_string();
        assert!(
            e.contains("chat_template_kwargs.add_generation_prompt"),
            "{e}"
        );
    }
}
