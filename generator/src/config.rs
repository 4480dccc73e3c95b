//! `[generator]`: how a generator samples and when it takes new weights.

use serde::{Deserialize, Serialize};
use tandem_model::EngineConfig;

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
    /// Prompt groups leased at a time and kept queued ahead of the running ones, so a
    /// finished sequence's slot is taken at once.
    pub prompts_per_batch: u32,
    /// Sequences decoding at once (continuous batching: a finished one's slot is
    /// taken by the next queued sample in the same step).
    pub max_running: usize,
    /// Tokens the paged KV cache holds (every layer; pages of `kv_page_size`). Memory
    /// is bounded by this, not by rows × longest; a sequence that cannot get a page
    /// waits or is preempted and recomputed.
    pub kv_cache_tokens: usize,
    /// Tokens per KV page.
    pub kv_page_size: usize,
    /// Prompt tokens prefilled per step beside the decoding rows (chunked prefill).
    pub prefill_chunk: usize,
    /// Prefill each group's prompt once and fork its samples (off: every sample
    /// prefills the prompt; for measurements).
    pub share_prefix: bool,
    /// Tokens of KV pages kept for prefixes of finished sequences (whole pages, out of
    /// `kv_cache_tokens`, given back when a sequence needs a page; 0 = off): a request
    /// (an episode's next turn, an agent's next call) starts from its longest cached
    /// prefix and prefills only the rest. New weights empty the cache.
    pub prefix_cache_tokens: usize,
    /// between_batches: take new weights when no sequence is running; in_flight: also
    /// between decode steps (PipelineRL), applied to every running row, so later
    /// tokens of a sequence carry the new version.
    pub weight_update: WeightUpdate,
    /// Benchmarks only: sleep this long per lease reply instead of sampling and send
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
        let d = EngineConfig::default();
        GeneratorConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 64,
            prompts_per_batch: 2,
            max_running: d.max_running,
            kv_cache_tokens: d.kv_cache_tokens,
            kv_page_size: d.kv_page_size,
            prefill_chunk: d.prefill_chunk,
            share_prefix: d.share_prefix,
            prefix_cache_tokens: d.prefix_cache_tokens,
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
        self.engine()
            .validate()
            .map_err(|e| invalid(format!("[generator] {e}")))?;
        if self.kv_cache_tokens < self.max_new_tokens + 1 {
            return bad(
                "kv_cache_tokens",
                "must hold at least one prompt token and max_new_tokens",
            );
        }
        Ok(())
    }

    /// The engine's settings.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            max_running: self.max_running,
            kv_cache_tokens: self.kv_cache_tokens,
            kv_page_size: self.kv_page_size,
            prefill_chunk: self.prefill_chunk,
            share_prefix: self.share_prefix,
            prefix_cache_tokens: self.prefix_cache_tokens,
            continuous: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_settings_are_checked_under_their_keys() {
        let bad = |f: fn(&mut GeneratorConfig)| {
            let mut c = GeneratorConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.max_running = 0).starts_with("[generator] max_running:"));
        assert!(bad(|c| c.kv_page_size = 0).starts_with("[generator] kv_page_size:"));
        assert!(bad(|c| c.prefill_chunk = 0).starts_with("[generator] prefill_chunk:"));
        assert!(bad(|c| c.kv_cache_tokens = 8).starts_with("[generator] kv_cache_tokens:"));
        assert!(bad(|c| c.kv_cache_tokens = 40).contains("max_new_tokens"));
        GeneratorConfig::default().validate().unwrap();
        // The prefix cache reaches the engine, and 0 (off) is a valid setting.
        let off = GeneratorConfig {
            prefix_cache_tokens: 0,
            ..Default::default()
        };
        off.validate().unwrap();
        assert_eq!(off.engine().prefix_cache_tokens, 0);
        assert!(GeneratorConfig::default().engine().prefix_cache_tokens > 0);
    }
}
