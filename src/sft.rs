//! `tandem sft CONFIG`: supervised fine-tuning on a JSONL / Parquet file with TRL's
//! fields, or on the synthetic arithmetic task; loss on assistant tokens only, a
//! held-out validation loss, a metrics log, checkpoints and the final model as HF
//! folders. Every record is read and checked before anything is written.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tandem_coordinator::dataset::{DataConfig, DataKind};
use tandem_model::ChatMessage;
use tandem_trainer::config::OptimizerConfig;
use tandem_trainer::sft::{self, Example, Masking, Render, Tokenized};
use tandem_trainer::step::Optimizer;

use crate::offline::{self, save_model, Stage, TrainSection};
use crate::run_config::{read_config, ModelSection};

/// `[sft]` (docs/pipeline.md); the schedule is `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftSection {
    /// `all_assistant` or `last_turn`.
    pub masking: Masking,
    /// Records drawn from the synthetic task ([data] kind = "arithmetic").
    pub examples: usize,
}

impl Default for SftSection {
    fn default() -> Self {
        SftSection {
            masking: Masking::AllAssistant,
            examples: 2000,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SftConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainSection,
    pub sft: SftSection,
    pub optimizer: OptimizerConfig,
}

impl SftConfig {
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        self.optimizer.validate()?;
        self.train.validate()?;
        if self.data.kind == DataKind::Arithmetic && self.sft.examples == 0 {
            bail!("[sft] examples: the synthetic task needs ≥ 1");
        }
        Ok(())
    }
}

#[derive(Args)]
pub struct SftArgs {
    /// The SFT config (see docs/pipeline.md; examples/tiny-sft.toml).
    pub config: PathBuf,
    /// Config overrides, `section.key=value` (repeatable).
    #[arg(long = "set")]
    pub overrides: Vec<String>,
}

/// The records of the configured data, checked; errors name the file, line and field.
pub fn examples(cfg: &DataConfig, synthetic: usize) -> Result<Vec<Example>> {
    match cfg.kind {
        DataKind::Arithmetic => Ok(offline::synthetic(cfg, synthetic)?
            .into_iter()
            .map(|(q, a)| {
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
            .collect()),
        DataKind::Jsonl | DataKind::Parquet => {
            let rows = offline::file_rows(cfg)?;
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

struct Sft {
    p: tandem_model::Pretrained,
    opt: Optimizer,
    opt_cfg: OptimizerConfig,
}

impl Stage for Sft {
    type Item = Tokenized;

    fn step(&mut self, batch: &[Tokenized], step: u64) -> Result<Value> {
        let m = sft::step(&self.p.model, &mut self.opt, &self.opt_cfg, batch, step)?;
        Ok(serde_json::to_value(m)?)
    }

    fn evaluate(&mut self, items: &[Tokenized]) -> Result<Map<String, Value>> {
        let model = &self.p.model;
        let w = model.inference_weights();
        let (mut nll, mut n) = (0.0, 0usize);
        for chunk in items.chunks(16) {
            let (l, k) = sft::eval_nll(model, &w, chunk)?;
            nll += l;
            n += k;
        }
        let mut m = Map::new();
        m.insert("loss".into(), (nll / n as f64).into());
        Ok(m)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(&self.p, dir)
    }
}

pub fn run(a: SftArgs) -> Result<()> {
    let cfg: SftConfig = read_config(&a.config, &a.overrides)?;
    cfg.validate()
        .with_context(|| format!("in {}", a.config.display()))?;
    let p = crate::load_model(&crate::run::materialize_model(&cfg.model.path)?)?;

    // Read, check and tokenize everything before writing anything.
    let records = examples(&cfg.data, cfg.sft.examples)?;
    let render = Render::for_model(
        &p,
        cfg.data.system.as_deref(),
        cfg.sft.masking,
        cfg.train.max_len,
    );
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
            max_len = cfg.train.max_len,
            "records with no trained token left after truncation were skipped"
        );
    }
    let opt = Optimizer::new(&cfg.optimizer, &p.model, Vec::new())?;
    let mut stage = Sft {
        p,
        opt,
        opt_cfg: cfg.optimizer.clone(),
    };
    offline::train(&mut stage, data, &cfg.train, "sft")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/pipeline.md lists exactly the keys of `[train]`, `[sft]`, `[rm]` and `[dpo]`,
    /// with the code's defaults.
    #[test]
    fn offline_sections_are_documented_with_their_defaults() {
        let doc = include_str!("../docs/pipeline.md");
        documented_table(doc, "**`[sft]`**", SftSection::default());
        documented_table(doc, "**`[train]`**", TrainSection::default());
        documented_table(doc, "**`[rm]`**", crate::rm::RmSection::default());
        documented_table(doc, "**`[dpo]`**", crate::dpo::DpoSection::default());
        documented_table(
            doc,
            "**`[rejection]`**",
            crate::rejection::RejectionSection::default(),
        );
    }

    /// The `| key | default |` rows after `heading` match `defaults`.
    fn documented_table<T: Serialize>(doc: &str, heading: &str, defaults: T) {
        // The table right after the heading; keys documented "unset" have no default.
        let after = doc.split(heading).nth(1).unwrap();
        let mut documented: Vec<(String, String)> = after
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|l| l.strip_prefix("| `"))
            .map(|row| {
                let cells: Vec<&str> = row.split(" | ").collect();
                (
                    cells[0].trim_end_matches('`').to_string(),
                    cells[1].trim().trim_matches('`').to_string(),
                )
            })
            .filter(|(_, default)| default != "unset")
            .collect();
        documented.sort();
        let code = toml::Value::try_from(defaults).unwrap();
        let mut code: Vec<(String, String)> = code
            .as_table()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let shown = match v {
                    toml::Value::String(s) => format!("{s:?}"),
                    other => other.to_string(),
                };
                (k.clone(), shown)
            })
            .collect();
        code.sort();
        assert_eq!(documented, code, "{heading}");
    }

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
            let e = crate::run_config::parse_with_overrides::<SftConfig>("", &[set.to_string()])
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{set}: {e}");
        }
    }
}
