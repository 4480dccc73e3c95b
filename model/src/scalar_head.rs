//! A scalar head on the transformer's final hidden state, s(h) = h·w + b. Two uses:
//! - the **value head** of PPO with GAE: V at each position that predicts the next
//!   token (a critic sharing the policy trunk), saved as [`VALUE_HEAD_FILE`];
//! - the **reward head** of a reward model: r(x, y) on the last token of prompt +
//!   completion ([`ScalarHead::sequence_scores`]), saved as [`REWARD_HEAD_FILE`].
//!
//! Either file sits beside the model's HF files.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::transformer::{Model, Weights};

/// The value head's file beside the model's HF files.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
/// The reward head's file beside the model's HF files.
pub const REWARD_HEAD_FILE: &str = "reward_head.safetensors";

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// A linear head to one scalar; its parameters join the optimizer with the model's.
#[derive(Clone, Debug)]
pub struct ScalarHead {
    pub weight: Var,
    pub bias: Var,
}

impl ScalarHead {
    /// Zero-initialised (V ≡ 0 at the start, the common choice for a fresh critic).
    pub fn zeros(hidden_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(ScalarHead {
            weight: Var::zeros(hidden_size, dtype, device)?,
            bias: Var::zeros(1, dtype, device)?,
        })
    }

    pub fn from_tensors(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        if weight.rank() != 1 || bias.dims() != [1] {
            return Err(invalid(format!(
                "scalar head: weight must be (d,), bias (1,); got {:?}, {:?}",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(ScalarHead {
            weight: Var::from_tensor(weight)?,
            bias: Var::from_tensor(bias)?,
        })
    }

    /// V for hidden states (N, d) → (N,).
    pub fn values(&self, hidden: &Tensor) -> Result<Tensor> {
        // A bf16 policy's hidden states are read in f32, as the loss is computed.
        let hidden = match hidden.dtype() {
            DType::BF16 | DType::F16 => hidden.to_dtype(DType::F32)?,
            _ => hidden.clone(),
        };
        let w = self.weight.as_tensor().to_dtype(hidden.dtype())?;
        let b = self.bias.as_tensor().to_dtype(hidden.dtype())?;
        Ok(hidden
            .matmul(&w.unsqueeze(1)?)?
            .squeeze(1)?
            .broadcast_add(&b)?)
    }

    /// The head's parameters by name (`value_head.*` in both files, as they have always
    /// been saved), for the optimizer and for saving.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("value_head.weight".into(), self.weight.clone()),
            ("value_head.bias".into(), self.bias.clone()),
        ]
    }

    /// Scores (N,) of whole sequences: the head on each one's last token.
    pub fn sequence_scores(&self, model: &Model, w: &Weights, seqs: &[Vec<u32>]) -> Result<Tensor> {
        self.values(&model.last_hidden(w, seqs)?)
    }

    /// Saves the head as `dir/file` ([`VALUE_HEAD_FILE`] or [`REWARD_HEAD_FILE`]).
    pub fn save(&self, dir: &Path, file: &str) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(file))?;
        Ok(())
    }

    /// The head saved as `dir/file` beside a model, or a zero head (a fresh critic or
    /// reward head) when there is none; sized, typed and placed as `model`.
    pub fn load_or_zeros(dir: &Path, file: &str, model: &Model) -> Result<Self> {
        let (d, dtype, device) = (model.config().hidden_size, model.dtype(), model.device());
        match Self::load(dir, file, d, dtype, device)? {
            Some(h) => Ok(h),
            None => Self::zeros(d, dtype, device),
        }
    }

    /// Loads `dir/file`, or `None` when the folder has no such file.
    pub fn load(
        dir: &Path,
        file: &str,
        hidden_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>> {
        let path = dir.join(file);
        if !path.exists() {
            return Ok(None);
        }
        let t = candle_core::safetensors::load(&path, device)?;
        let get = |n: &str| {
            t.get(n)
                .ok_or_else(|| invalid(format!("{}: missing tensor `{n}`", path.display())))
        };
        let head = Self::from_tensors(
            &get("value_head.weight")?.to_dtype(dtype)?,
            &get("value_head.bias")?.to_dtype(dtype)?,
        )?;
        if head.weight.dim(0)? != hidden_size {
            return Err(invalid(format!(
                "{}: weight has {} features, the model {hidden_size}",
                path.display(),
                head.weight.dim(0)?
            )));
        }
        Ok(Some(head))
    }
}
