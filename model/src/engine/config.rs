//! `EngineConfig`: how the engine batches and how much KV memory it may hold (the
//! `[generator]` keys of the same names).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the engine batches and how much KV memory it may hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Sequences decoding at once (a request's unforked prompt counts its samples).
    pub max_running: usize,
    /// Tokens the paged KV cache holds, every layer included (rounded up to pages).
    pub kv_cache_tokens: usize,
    /// Tokens per page.
    pub kv_page_size: usize,
    /// Prompt tokens prefilled per step beside the decoding rows (chunked prefill).
    pub prefill_chunk: usize,
    /// Prefill a request's prompt once and fork its samples; off, every sample
    /// prefills the prompt itself.
    pub share_prefix: bool,
    /// Tokens of KV pages the prefix cache keeps after the sequences that computed them
    /// are done (whole pages; 0 = no prefix cache): a request starts from its longest
    /// cached prefix. These pages come out of `kv_cache_tokens` and are given back
    /// whenever a sequence needs one.
    pub prefix_cache_tokens: usize,
    /// Admit new sequences as soon as slots free up; off, a batch runs until its last
    /// sequence finishes before the next is admitted (static batching, for
    /// measurements).
    pub continuous: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_running: 64,
            kv_cache_tokens: 32768,
            kv_page_size: 16,
            prefill_chunk: 256,
            share_prefix: true,
            prefix_cache_tokens: 8192,
            continuous: true,
        }
    }
}

impl EngineConfig {
    /// Room for `requests` requests of `samples` samples and `longest` tokens each,
    /// all running at once (whole-batch callers: `generate`, scoring, judges).
    pub fn fitting(requests: usize, samples: usize, longest: usize) -> Self {
        EngineConfig {
            max_running: (requests * samples).max(1),
            ..EngineConfig::default()
        }
        .with_room(requests, samples, longest)
    }

    /// These settings with a KV cache that holds `requests` requests of `samples`
    /// samples and `longest` tokens each at once, in pages of `kv_page_size`: each
    /// sample's pages plus the one a fork may copy, and a partial page per prompt.
    pub fn with_room(self, requests: usize, samples: usize, longest: usize) -> Self {
        let rows = (requests * samples).max(1);
        let ps = self.kv_page_size;
        EngineConfig {
            kv_cache_tokens: (rows * (longest.div_ceil(ps) + 1) + requests) * ps,
            ..self
        }
    }

    /// Errors name the key as `[generator]` writes it (the fields are its keys).
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(Error::invalid(format!("{key}: {why}")));
        if self.max_running == 0 {
            return bad("max_running", "must be ≥ 1");
        }
        if self.kv_page_size == 0 {
            return bad("kv_page_size", "must be ≥ 1");
        }
        if self.kv_cache_tokens < self.kv_page_size {
            return bad("kv_cache_tokens", "must hold at least one page");
        }
        if self.prefill_chunk == 0 {
            return bad("prefill_chunk", "must be ≥ 1");
        }
        Ok(())
    }
}
