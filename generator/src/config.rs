//! `[generator]`: how a generator samples and when it takes new weights.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Sampling temperature (must equal `[algorithm] temperature`: the trainer scores
    /// tokens under the distribution they were drawn from).
    pub temperature: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Longest completion.
    pub max_new_tokens: usize,
    /// Prompt groups leased and generated together in one batch.
    pub prompts_per_batch: u32,
    /// between_batches: swap weights before a new batch; in_flight: also between
    /// decode steps (PipelineRL), so later tokens of a sequence carry the new version.
    pub weight_update: WeightUpdate,
    /// Benchmarks only: sleep this long per batch instead of sampling and send
    /// `max_new_tokens` placeholder tokens (0 = sample for real).
    pub mock_generate_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightUpdate {
    BetweenBatches,
    InFlight,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            prompts_per_batch: 2,
            weight_update: WeightUpdate::BetweenBatches,
            mock_generate_ms: 0,
        }
    }
}

impl GeneratorConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[generator] {key}: {why}")));
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                "must be > 0 (RL needs sampling, not greedy decoding)",
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "must be ≥ 1");
        }
        if self.prompts_per_batch == 0 {
            return bad("prompts_per_batch", "must be ≥ 1");
        }
        Ok(())
    }
}
