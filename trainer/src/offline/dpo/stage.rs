//! `tandem dpo`: direct preference optimisation (DPO or IPO, optionally with an
//! NLL term on the chosen responses) against the starting model as the frozen
//! reference, whose log-probabilities are computed once before training.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tandem_data::DataConfig;
use tandem_model::ModelSection;

use super::data::{self, Pair};
use super::loss::{self, Settings};
use crate::config::OptimizerConfig;
use crate::error::{bail, Result};
use crate::offline::preference::DirectLoss;
use crate::offline::{save_model, Stage, TrainSection};
use crate::optimizer::Optimizer;

/// `[dpo]` (docs/pipeline.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoSection {
    /// `dpo` or `ipo`.
    pub loss: DirectLoss,
    /// β: the strength of the implicit KL to the reference.
    pub beta: f64,
    /// Weight of the NLL of the chosen responses (0 = off).
    pub nll_coef: f64,
    /// Records drawn from the synthetic preference task ([data] kind = "arithmetic").
    pub examples: usize,
}

impl Default for DpoSection {
    fn default() -> Self {
        DpoSection {
            loss: DirectLoss::Dpo,
            beta: 0.1,
            nll_coef: 0.0,
            examples: 2000,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    pub model: ModelSection,
    pub data: DataConfig,
    pub train: TrainSection,
    pub dpo: DpoSection,
    pub optimizer: OptimizerConfig,
    /// `[lora]`: train adapters on the frozen model (`None`: every parameter).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora: Option<tandem_model::LoraSection>,
}

struct Dpo {
    p: tandem_model::Pretrained,
    /// `[model] save_dtype`, else the dtype the weights came in.
    save_dtype: candle_core::DType,
    /// `[model] path`: under LoRA the saved adapter's base.
    base: String,
    opt: Optimizer,
    opt_cfg: OptimizerConfig,
    settings: Settings,
}

impl Stage for Dpo {
    type Item = Pair;

    fn step(&mut self, batch: &[Pair], step: u64) -> Result<Value> {
        let m = loss::step(
            &self.p.model,
            &mut self.opt,
            &self.opt_cfg,
            self.settings,
            batch,
            step,
        )?;
        Ok(serde_json::to_value(m)?)
    }

    fn evaluate(&mut self, items: &[Pair]) -> Result<Map<String, Value>> {
        let w = self.p.model.inference_weights();
        let mut sums: Map<String, Value> = Map::new();
        let mut n = 0usize;
        for chunk in items.chunks(16) {
            let (_, m) = loss::loss(&self.p.model, &w, self.settings, chunk)?;
            let k = chunk.len() as f64;
            for (key, v) in [
                ("loss", m.loss),
                ("reward_accuracy", m.reward_accuracy),
                ("reward_margin", m.reward_margin),
                ("chosen_logps", m.chosen_logps),
                ("rejected_logps", m.rejected_logps),
            ] {
                let acc = sums.get(key).and_then(Value::as_f64).unwrap_or(0.0);
                sums.insert(key.into(), (acc + v * k).into());
            }
            n += chunk.len();
        }
        Ok(sums
            .into_iter()
            .map(|(k, v)| (k, (v.as_f64().unwrap_or(f64::NAN) / n as f64).into()))
            .collect())
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(&self.p, dir, self.save_dtype, &self.base)
    }
}

impl DpoConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if let Some(l) = &self.lora {
            l.validate()?;
        }
        self.data.validate()?;
        self.optimizer.validate()?;
        self.train.validate()?;
        if !(self.dpo.beta > 0.0 && self.dpo.beta.is_finite()) {
            bail!("[dpo] beta: must be positive");
        }
        if !(self.dpo.nll_coef >= 0.0 && self.dpo.nll_coef.is_finite()) {
            bail!("[dpo] nll_coef: must be ≥ 0");
        }
        Ok(())
    }
}

/// Trains `cfg` (validated here); returns the summary that is also written to
/// `[train] out_dir/summary.json`.
pub fn run(cfg: &DpoConfig) -> Result<Value> {
    cfg.validate()?;
    let p = crate::offline::load_policy(&cfg.model, &cfg.data, cfg.lora.as_ref())?;
    let save_dtype = cfg.model.save_dtype_or(p.trained_dtype())?;
    let records = crate::offline::rm::comparisons(&cfg.data, cfg.dpo.examples)?;
    if let Some(i) = records.iter().position(|c| c.responses.len() != 2) {
        bail!(
            "record {}: DPO needs `chosen` and `rejected`, not a ranking",
            i + 1
        );
    }
    let data = crate::offline::rm::tokenize(&records, &p, &cfg.data, cfg.train.max_len)?;
    // The reference is the starting model (under LoRA its base: the same weights, no
    // copy); its log-probabilities are fixed up front.
    let pairs = data::with_reference(&p.model.without_adapter(), &data, cfg.train.batch_size)?;
    let opt = Optimizer::new(&cfg.optimizer, &p.model, Vec::new())?;
    let mut stage = Dpo {
        p,
        save_dtype,
        base: cfg.model.path.clone(),
        opt,
        opt_cfg: cfg.optimizer.clone(),
        settings: Settings {
            loss: cfg.dpo.loss,
            beta: cfg.dpo.beta,
            nll_coef: cfg.dpo.nll_coef,
        },
    };
    crate::offline::train(&mut stage, pairs, &cfg.train, "dpo")
}
