//! `tandem rm`: a reward model (the transformer with a scalar head on the last
//! token) trained on preference records, and `comparisons`, the preference data that
//! `tandem dpo` reads too.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tandem_data::{DataConfig, DataKind};
use tandem_model::ModelSection;
use tandem_model::{ScalarHead, REWARD_HEAD_FILE};

use super::data::{Comparison, Prompt, Tokens};
use super::loss;
use crate::config::OptimizerConfig;
use crate::error::{bail, Context, Result};
use crate::offline::sft::data::{Masking, Render};
use crate::offline::{save_model, Stage, TrainSection};
use crate::optimizer::Optimizer;

/// `[rm]` (docs/pipeline.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmSection {
    /// Records drawn from the synthetic preference task ([data] kind = "arithmetic").
    pub examples: usize,
}

impl Default for RmSection {
    fn default() -> Self {
        RmSection { examples: 2000 }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RmConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainSection,
    pub rm: RmSection,
    pub optimizer: OptimizerConfig,
    /// `[lora]`: train adapters on the frozen model (`None`: every parameter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<tandem_model::LoraSection>,
}

/// Preference records from a file (TRL's `prompt` / `chosen` / `rejected` [/ `margin`],
/// or `prompt` / `ranked`), or `synthetic` from the arithmetic task, where the better
/// answer is correct and short: " 7" over " 8" or " 8, I think, but I am not sure".
pub fn comparisons(cfg: &DataConfig, synthetic: usize) -> Result<Vec<Comparison>> {
    match cfg.kind {
        DataKind::Arithmetic => Ok(tandem_data::Arithmetic::new(cfg)?
            .pairs(synthetic)
            .into_iter()
            .enumerate()
            .map(|(i, (q, a))| {
                let right: i64 = a.parse().expect("arithmetic answers are integers");
                let wrong = right + 1 + (i % 3) as i64;
                let lead = if cfg.chat { "" } else { " " };
                // Every other rejected answer is as short as the chosen one: only its
                // correctness tells them apart.
                let rejected = if i % 2 == 0 {
                    format!("{lead}{wrong}")
                } else {
                    format!("{lead}{wrong}, I think, but I am not sure")
                };
                Comparison {
                    prompt: Prompt::Text(q),
                    responses: vec![format!("{lead}{right}"), rejected],
                    margin: None,
                }
            })
            .collect()),
        DataKind::Jsonl | DataKind::Parquet => tandem_data::read_records(cfg)?
            .iter()
            .map(|r| {
                let c = Comparison::from_row(&r.value, &r.at)?;
                if matches!(c.prompt, Prompt::Turns(_)) && !cfg.chat {
                    bail!(
                        "{}: a conversation prompt needs the chat template: set [data] chat = true",
                        r.at
                    );
                }
                Ok(c)
            })
            .collect(),
    }
}

/// Every comparison tokenized (response tokens as targets); records that truncation
/// empties are skipped and counted.
pub fn tokenize(
    records: &[Comparison],
    p: &tandem_model::Pretrained,
    data: &DataConfig,
    max_len: usize,
) -> Result<Vec<Tokens>> {
    let render = Render::for_model(p, data.system.as_deref(), Masking::LastTurn, max_len);
    let mut out = Vec::with_capacity(records.len());
    let mut skipped = 0;
    for (i, c) in records.iter().enumerate() {
        match c
            .tokenize(&render, data.chat)
            .with_context(|| format!("record {}", i + 1))?
        {
            Some(t) => out.push(t),
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(
            skipped,
            max_len,
            "records with a response cut to nothing were skipped"
        );
    }
    Ok(out)
}

struct Rm {
    p: tandem_model::Pretrained,
    /// `[model] save_dtype`, else the dtype the weights came in.
    save_dtype: candle_core::DType,
    /// `[model] path`: under LoRA the saved adapter's base.
    base: String,
    head: ScalarHead,
    opt: Optimizer,
    opt_cfg: OptimizerConfig,
}

impl Stage for Rm {
    type Item = Tokens;

    fn step(&mut self, batch: &[Tokens], step: u64) -> Result<Value> {
        let m = loss::step(
            &self.p.model,
            &self.head,
            &mut self.opt,
            &self.opt_cfg,
            batch,
            step,
        )?;
        Ok(serde_json::to_value(m)?)
    }

    fn evaluate(&mut self, items: &[Tokens]) -> Result<Map<String, Value>> {
        let w = self.p.model.inference_weights();
        let (mut loss_sum, mut hits, mut margin, mut n) = (0.0, 0.0, 0.0, 0usize);
        for chunk in items.chunks(16) {
            let (l, r) = loss::loss(&self.p.model, &w, &self.head, chunk)?;
            let k = chunk.len();
            loss_sum += l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()? * k as f64;
            hits += loss::top1_accuracy(&r)? * k as f64;
            margin += loss::mean_margin(&r)? * k as f64;
            n += k;
        }
        let mut m = Map::new();
        m.insert("loss".into(), (loss_sum / n as f64).into());
        m.insert("accuracy".into(), (hits / n as f64).into());
        m.insert("margin".into(), (margin / n as f64).into());
        Ok(m)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(&self.p, dir, self.save_dtype, &self.base)?;
        self.head.save(dir, REWARD_HEAD_FILE)?;
        Ok(())
    }
}

impl RmConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        self.data.validate()?;
        self.optimizer.validate()?;
        self.train.validate()
    }
}

/// Trains `cfg` (validated here); returns the summary that is also written to
/// `[train] out_dir/summary.json`.
pub fn run(cfg: &RmConfig) -> Result<Value> {
    cfg.validate()?;
    let p = crate::offline::load_policy(&cfg.model, &cfg.data, cfg.lora.as_ref())?;
    let save_dtype = cfg.model.save_dtype_or(p.trained_dtype())?;
    let records = comparisons(&cfg.data, cfg.rm.examples)?;
    let data = tokenize(&records, &p, &cfg.data, cfg.train.max_len)?;
    let k = data.first().map(|t| t.responses.len()).unwrap_or(2);
    if data.iter().any(|t| t.responses.len() != k) {
        bail!("every record needs the same number of responses ({k} in the first)");
    }
    let start = std::path::Path::new(&cfg.model.path);
    let head = ScalarHead::load_or_zeros(start, REWARD_HEAD_FILE, &p.model)?;
    let opt = Optimizer::new(&cfg.optimizer, &p.model, head.named_vars())?;
    let mut stage = Rm {
        p,
        save_dtype,
        base: cfg.model.path.clone(),
        head,
        opt,
        opt_cfg: cfg.optimizer.clone(),
    };
    crate::offline::train(&mut stage, data, &cfg.train, "rm")
}
