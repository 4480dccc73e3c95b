//! Rotary position embeddings (RoPE), in the "rotate half" layout that Hugging Face uses.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// Precomputed cos/sin tables, `(max_positions, head_dim / 2)`.
#[derive(Clone, Debug)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies θ_i = base^(−2i/d), i = 0..d/2, with the config's scaling.
///
/// Llama 3 scaling (as `transformers`' `_compute_llama3_parameters`): wavelengths
/// longer than `orig / low_freq_factor` are divided by `factor`, shorter than
/// `orig / high_freq_factor` kept, and the band between interpolated smoothly.
pub fn inverse_frequencies(cfg: &ModelConfig) -> Vec<f64> {
    scaled_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref())
}

/// [`inverse_frequencies`] of head width `d`, base `theta` and `scaling`.
fn scaled_frequencies(d: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    let inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match scaling {
        None | Some(RopeScaling::Linear { .. }) => inv,
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let orig = *original_max_position_embeddings as f64;
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            inv.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (orig / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Rope {
    /// The tables of the global layers: the config's base and scaling.
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let scale = match cfg.rope_scaling {
            Some(RopeScaling::Linear { factor }) => 1.0 / factor,
            _ => 1.0,
        };
        Self::tables(cfg, inverse_frequencies(cfg), scale, dtype, device)
    }

    /// The tables of the local (sliding-window) layers: their own base, no scaling;
    /// `None` when every layer is global.
    pub fn local(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Option<Self>> {
        let Some(sw) = &cfg.sliding_window else {
            return Ok(None);
        };
        let inv = scaled_frequencies(cfg.head_dim, sw.rope_theta, None);
        Ok(Some(Self::tables(cfg, inv, 1.0, dtype, device)?))
    }

    /// cos and sin of (p · scale) · θ_i for every position p < `max_position_embeddings`.
    fn tables(
        cfg: &ModelConfig,
        inv: Vec<f64>,
        scale: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let n = cfg.max_position_embeddings;
        let half = inv.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for &f in &inv {
                // Angles in f64, as transformers computes them in f32 from f32 inv_freq;
                // the difference is far below every tolerance used.
                let a = (p as f64 * scale) * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?;
        Ok(Rope { cos, sin })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// cos and sin gathered at `positions` (B, T) u32 → each (B, T, head_dim / 2).
    pub fn at(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t) = positions.dims2()?;
        let flat = positions.flatten_all()?;
        let half = self.cos.dim(1)?;
        let cos = self.cos.index_select(&flat, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&flat, 0)?.reshape((b, t, half))?;
        Ok((cos, sin))
    }
}
