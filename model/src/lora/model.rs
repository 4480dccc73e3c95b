//! The model's side of LoRA: attaching an adapter (the base frozen from then on),
//! what is trainable, the base alone, merging, and folding for inference.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::lora::adapter::module_name;
use crate::lora::{Adapter, Target};
use crate::params::ParamStore;
use crate::transformer::Model;

impl Model {
    /// What training updates and a version carries: the adapter's A and B under LoRA,
    /// else every parameter.
    pub fn trainable(&self) -> &ParamStore {
        self.adapter.as_ref().map_or(&self.params, Adapter::params)
    }

    /// This model with `adapter` applied (its base frozen from now on, its fingerprint
    /// taken); the adapter must be built for this model's config.
    pub fn with_adapter(mut self, adapter: Adapter) -> Result<Self> {
        if adapter.layers() != self.config.num_hidden_layers {
            return Err(Error::invalid(format!(
                "adapter covers {} layers, the model has {}",
                adapter.layers(),
                self.config.num_hidden_layers
            )));
        }
        let mut adapter = adapter;
        adapter.set_base(self.params.fingerprint()?);
        self.adapter = Some(adapter);
        Ok(self)
    }

    /// The LoRA adapter, if one is applied.
    pub fn adapter(&self) -> Option<&Adapter> {
        self.adapter.as_ref()
    }

    /// The base model without its adapter (the same parameters, no copy): LoRA's
    /// reference model.
    pub fn without_adapter(&self) -> Model {
        let mut base = self.clone();
        base.adapter = None;
        base.folded = None;
        base
    }

    /// For inference (a generator): the adapter folded into the parameters,
    /// W = W₀ + s·B·A on every targeted projection, so that the forward runs the
    /// base's kernels alone (the engine's packed matmuls; applied unmerged, the
    /// adapter's small products cost SmolLM2's batch engine 29 % of its tok/s). The
    /// base values W₀ of those projections are kept (their size again in memory) so
    /// that [`Model::refold`] writes each new adapter version from them, without
    /// drift. Not for training: the forward no longer sees the adapter. The parameters
    /// are written in place: every clone of this model sees the folded weights.
    pub fn fold_adapter(mut self) -> Result<Self> {
        let Some(a) = &self.adapter else {
            return Err(Error::invalid("fold_adapter: the model has no adapter"));
        };
        let mut originals = HashMap::new();
        for (_, _, name) in targeted(a) {
            let w = self
                .params
                .get(&name)
                .ok_or_else(|| Error::invalid(format!("fold_adapter: no tensor `{name}`")))?;
            originals.insert(name, w.as_tensor().detach().copy()?);
        }
        self.folded = Some(Arc::new(originals));
        self.refold()?;
        Ok(self)
    }

    /// Writes W₀ + s·B·A into the parameters from the adapter's current values (after
    /// a new adapter version was assigned to [`Model::trainable`]); a no-op unless the
    /// adapter is folded. The parameters' generation is bumped, so the engine repacks.
    pub fn refold(&self) -> Result<()> {
        let (Some(a), Some(originals)) = (&self.adapter, &self.folded) else {
            return Ok(());
        };
        self.params.assign(&with_deltas(a, originals)?)
    }

    /// Whether the adapter is folded into the parameters ([`Model::fold_adapter`]).
    pub fn is_folded(&self) -> bool {
        self.folded.is_some()
    }

    /// A model whose weights are the base's with the adapter folded in, W + s·B·A on
    /// every targeted projection (new storage; no adapter). Without an adapter, a copy
    /// (so too when it is folded in already).
    pub fn merged(&self) -> Result<Model> {
        let mut tensors = self.params.snapshot()?;
        if let Some(a) = self.adapter.as_ref().filter(|_| self.folded.is_none()) {
            let merged = with_deltas(a, &tensors)?;
            tensors.extend(merged);
        }
        Model::from_tensors(self.config.clone(), tensors, self.dtype, &self.device)
    }
}

/// (layer, target, HF weight name) of every projection `a` targets.
fn targeted(a: &Adapter) -> impl Iterator<Item = (usize, Target, String)> + '_ {
    (0..a.layers()).flat_map(move |layer| {
        a.spec()
            .targets
            .iter()
            .map(move |&t| (layer, t, format!("{}.weight", module_name(layer, t))))
    })
}

/// W + s·B·A of every projection `a` targets, W taken from `base` by name: what merging
/// and folding write.
fn with_deltas(a: &Adapter, base: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(a.layers() * a.spec().targets.len());
    for (layer, t, name) in targeted(a) {
        let w = base
            .get(&name)
            .ok_or_else(|| Error::invalid(format!("the adapter's base has no tensor `{name}`")))?;
        if let Some(d) = a.delta(layer, t)? {
            out.insert(name, (w + d.to_dtype(w.dtype())?)?);
        }
    }
    Ok(out)
}
