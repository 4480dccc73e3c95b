//! The configured optimizer (`[optimizer]`), shared by the RL step and the offline
//! stages.

use candle_core::backprop::GradStore;
use candle_core::Var;
use tandem_model::optim::{AdamW, AdamWConfig, Sgd, StepStats};
use tandem_model::Model;

use crate::config::{OptimizerConfig, OptimizerName};
use crate::error::Result;

/// The configured optimizer.
pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// An optimizer over the model's trainable parameters (every one, or a LoRA
    /// adapter's A and B: a frozen base has no state) and `extra` ones (a value head).
    pub fn new(cfg: &OptimizerConfig, model: &Model, extra: Vec<(String, Var)>) -> Result<Self> {
        let mut params: Vec<(String, Var)> = model
            .trainable()
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        params.extend(extra);
        Ok(match cfg.name {
            OptimizerName::Adamw => Optimizer::AdamW(AdamW::new(
                params,
                AdamWConfig {
                    lr: cfg.lr,
                    beta1: cfg.betas[0],
                    beta2: cfg.betas[1],
                    eps: cfg.eps,
                    weight_decay: cfg.weight_decay,
                },
            )?),
            OptimizerName::Sgd => Optimizer::Sgd(Sgd::new(params, cfg.lr)),
        })
    }

    /// Saves the optimizer state into `dir` (SGD has none).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => Ok(o.save(dir)?),
            Optimizer::Sgd(_) => Ok(()),
        }
    }

    /// Restores what [`Optimizer::save`] wrote.
    pub fn load(&mut self, dir: &std::path::Path) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => Ok(o.load(dir)?),
            Optimizer::Sgd(_) => Ok(()),
        }
    }

    /// One update with learning rate `lr`, clipping the global gradient norm first.
    pub fn apply(
        &mut self,
        grads: &GradStore,
        lr: f64,
        max_grad_norm: Option<f64>,
    ) -> Result<StepStats> {
        Ok(match self {
            Optimizer::AdamW(o) => {
                o.config.lr = lr;
                o.step(grads, max_grad_norm)?
            }
            Optimizer::Sgd(o) => {
                o.lr = lr;
                o.step(grads, max_grad_norm)?
            }
        })
    }
}
