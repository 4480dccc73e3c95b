//! The key/value cache of batched decoding: one preallocated buffer per layer,
//! written in place, read through views (no copy per step).

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Keys and values of every layer, `(batch, kv_heads, capacity, head_dim)` each.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        cfg: &ModelConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            capacity,
        })
    }

    /// Number of positions written so far.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k`, `v` (B, KV, T, D) of `layer` at the current end and returns views of
    /// everything cached so far, (B, KV, len + T, D). `advance` must follow once every
    /// layer has appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.capacity {
            return Err(Error::invalid(format!(
                "KV cache full: {} + {t} positions exceed its capacity {}",
                self.len, self.capacity
            )));
        }
        let (kc, vc) = &self.layers[layer];
        kc.slice_set(&k.contiguous()?, 2, self.len)?;
        vc.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((
            kc.narrow(2, 0, self.len + t)?,
            vc.narrow(2, 0, self.len + t)?,
        ))
    }

    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Keeps only the batch rows in `rows` (in that order): finished sequences leave
    /// the batch so that decoding stops paying for them.
    pub fn retain_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}
