//! The model's side of LoRA: attaching an adapter (the base frozen from then on),
//! what is trainable, the base alone, merging, and folding for inference.

use std::collections::HashMap;
use std::sync::Arc;

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
        for layer in 0..a.layers() {
            for t in a.spec().targets.iter().copied() {
                let name = format!("{}.weight", module_name(layer, t));
                let w = self
                    .params
                    .get(&name)
                    .ok_or_else(|| Error::invalid(format!("fold_adapter: no tensor `{name}`")))?;
                originals.insert(name, w.as_tensor().detach().copy()?);
            }
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
        let mut merged = HashMap::with_capacity(originals.len());
        for layer in 0..a.layers() {
            for t in a.spec().targets.iter().copied() {
                let name = format!("{}.weight", module_name(layer, t));
                if let (Some(d), Some(w0)) = (a.delta(layer, t)?, originals.get(&name)) {
                    merged.insert(name, (w0 + d.to_dtype(w0.dtype())?)?);
                }
            }
        }
        self.params.assign(&merged)
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
            for layer in 0..a.layers() {
                for t in Target::ALL {
                    if let Some(d) = a.delta(layer, t)? {
                        let name = format!("{}.weight", module_name(layer, t));
                        let w = tensors.remove(&name).ok_or_else(|| {
                            Error::invalid(format!("merging the adapter: no tensor `{name}`"))
                        })?;
                        tensors.insert(name, (w + d.to_dtype(self.dtype)?)?);
                    }
                }
            }
        }
        Model::from_tensors(self.config.clone(), tensors, self.dtype, &self.device)
    }
}
