//! The value head of PPO with GAE: V(s) = h(s)·w + b on the policy's final hidden state
//! at the position that predicts the next token (a critic sharing the policy trunk).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{invalid, Result};

/// File the head is saved to beside the model's HF files.
pub const FILE: &str = "value_head.safetensors";

/// A linear value head; its parameters join the optimizer with the model's.
#[derive(Clone, Debug)]
pub struct ValueHead {
    pub weight: Var,
    pub bias: Var,
}

impl ValueHead {
    /// Zero-initialised (V ≡ 0 at the start, the common choice for a fresh critic).
    pub fn zeros(hidden_size: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(ValueHead {
            weight: Var::zeros(hidden_size, dtype, device)?,
            bias: Var::zeros(1, dtype, device)?,
        })
    }

    pub fn from_tensors(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        if weight.rank() != 1 || bias.dims() != [1] {
            return Err(invalid(format!(
                "value head: weight must be (d,), bias (1,); got {:?}, {:?}",
                weight.dims(),
                bias.dims()
            )));
        }
        Ok(ValueHead {
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

    pub fn named_vars(&self) -> Vec<(String, Var)> {
        vec![
            ("value_head.weight".into(), self.weight.clone()),
            ("value_head.bias".into(), self.bias.clone()),
        ]
    }

    pub fn save(&self, dir: &Path) -> Result<()> {
        self.save_as(dir, FILE)
    }

    /// Saves the head as `dir/file` (a reward model's head goes to
    /// [`crate::reward_model::FILE`]).
    pub fn save_as(&self, dir: &Path, file: &str) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().detach()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(file))?;
        Ok(())
    }

    /// Loads `dir/value_head.safetensors`, or `None` when the folder has no head.
    pub fn load(
        dir: &Path,
        hidden_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Self>> {
        Self::load_from(dir, FILE, hidden_size, dtype, device)
    }

    /// Loads `dir/file`, or `None` when the folder has no such file.
    pub fn load_from(
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
