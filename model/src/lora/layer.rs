//! A layer's adapters as the forward applies them, unmerged beside each projection.

use candle_core::Tensor;

use crate::error::Result;
use crate::lora::config::Target;
use crate::lora::op::lora_linear;
use crate::packed_matmul::PackedMatrix;
use crate::transformer::{project, project_each};

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

/// The projections of one input x by the weights `ws` (biases `bs`, targets `ts`) with
/// their adapters: for inference (`fused`), the base's products (on the packed kernel
/// when `packed`) and then each adapter's delta ([`adapted`]); for training, each
/// adapted projection as one autograd node ([`lora_linear`]), so that an adapter adds
/// no (rows, out) activation to the graph. Without adapters, [`project_each`].
pub(crate) fn project_adapted<const N: usize>(
    x: &Tensor,
    ws: [&Tensor; N],
    bs: [Option<&Tensor>; N],
    packed: Option<[&PackedMatrix; N]>,
    fused: bool,
    lora: Option<&LayerLora>,
    ts: [Target; N],
) -> Result<[Tensor; N]> {
    let Some(l) = lora.filter(|_| !fused) else {
        let ys = project_each(x, ws, bs, packed, fused)?;
        let mut out = Vec::with_capacity(N);
        for (y, t) in ys.into_iter().zip(ts) {
            out.push(adapted(y, x, lora, t, fused)?);
        }
        return Ok(out.try_into().expect("one output per weight"));
    };
    let dims = x.dims().to_vec();
    let d = *dims.last().unwrap_or(&0);
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, d))?.contiguous()?;
    let mut out = Vec::with_capacity(N);
    for ((w, b), t) in ws.into_iter().zip(bs).zip(ts) {
        let y = match l.pair(t) {
            Some((a, bb)) => {
                let y = lora_linear(&x2, w, a, bb, l.scale)?;
                let y = match b {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                };
                let mut shape = dims.clone();
                *shape.last_mut().expect("x has a feature axis") = w.dim(0)?;
                y.reshape(shape)?
            }
            None => project(x, w, b, None, false)?,
        };
        out.push(y);
    }
    Ok(out.try_into().expect("one output per weight"))
}
