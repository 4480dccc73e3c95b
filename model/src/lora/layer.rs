//! A layer's adapters as the forward applies them, unmerged beside each projection.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::config::Target;
use crate::transformer::project;

/// One decoder layer's adapters: (A, B) per targeted projection, and their scale s.
#[derive(Clone, Debug)]
pub struct LayerLora {
    pub scale: f64,
    /// Indexed by [`Target`] (`None`: not targeted).
    pub pairs: [Option<(Tensor, Tensor)>; 7],
}

impl LayerLora {
    /// (A, B) of projection `t`, if targeted.
    pub fn pair(&self, t: Target) -> Option<(&Tensor, &Tensor)> {
        self.pairs[t as usize].as_ref().map(|(a, b)| (a, b))
    }
}

/// y + s·(x·Aᵀ)·Bᵀ, the projection `t`'s output y of input x with its adapter added
/// (PEFT's order: B(A(x)) then the scale); y itself when `t` has none. `fused` lets
/// decode-sized inputs take the bandwidth-bound kernel, as the projection does.
pub(crate) fn adapted(
    y: Tensor,
    x: &Tensor,
    lora: Option<&LayerLora>,
    t: Target,
    fused: bool,
) -> Result<Tensor> {
    let Some(l) = lora else { return Ok(y) };
    let Some((a, b)) = l.pair(t) else {
        return Ok(y);
    };
    let low = project(x, a, None, None, fused)?;
    let delta = project(&low, b, None, None, fused)?.affine(l.scale, 0.0)?;
    Ok((y + delta)?)
}
