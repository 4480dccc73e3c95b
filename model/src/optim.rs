//! Optimizers whose state can be saved and restored: AdamW (fused on CPU) and SGD,
//! with global-norm gradient clipping.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, DType, InplaceOp2, Layout, Shape, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cpu_storage::contiguous;
use crate::error::{read_file, write_file, Error, Result};

/// AdamW hyper-parameters (defaults as `torch.optim.AdamW`, lr as common for RL fine-tuning).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms or biases),
    /// as the Hugging Face Trainer does.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(Error::invalid(format!("`lr` must be ≥ 0, got {}", self.lr)));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::invalid(format!(
                    "`{name}` must be in [0, 1), got {b}"
                )));
            }
        }
        if self.eps.is_nan()
            || self.eps <= 0.0
            || self.weight_decay.is_nan()
            || self.weight_decay < 0.0
        {
            return Err(Error::invalid("`eps` must be > 0 and `weight_decay` ≥ 0"));
        }
        Ok(())
    }
}

/// Global L2 norm of the gradients of `params`: sqrt(Σ_p ‖g_p‖²), accumulated in f64.
/// On an accelerator the per-tensor sums stay on the device and are read back once.
pub fn grad_norm(params: &[(String, Var)], grads: &GradStore) -> Result<f64> {
    let mut sq = 0.0f64;
    let mut on_device: Option<Tensor> = None;
    for (_, v) in params {
        let Some(g) = grads.get(v) else { continue };
        if g.device().is_cpu() && g.dtype() == DType::F32 {
            sq += g
                .contiguous()?
                .apply_op1_no_bwd(&SumOfSquares)?
                .to_vec1::<f64>()?[0];
        } else {
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            on_device = Some(match on_device {
                Some(acc) => (acc + s)?,
                None => s,
            });
        }
    }
    if let Some(t) = on_device {
        sq += t.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

struct SumOfSquares;

impl CustomOp1 for SumOfSquares {
    fn name(&self) -> &'static str {
        "sum-of-squares"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, self.name())?;
        let total: f64 = x
            .par_chunks(1 << 14)
            .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
            .sum();
        Ok((CpuStorage::F64(vec![total]), Shape::from(1)))
    }
}

/// The factor that brings the global norm down to `max_norm` (1 when already below),
/// as `torch.nn.utils.clip_grad_norm_`: max_norm / (norm + 1e-6), capped at 1.
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(m) if norm > m => m / (norm + 1e-6),
        _ => 1.0,
    }
}

/// Statistics of one optimizer step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Scale applied to the gradients (1 when not clipped).
    pub clip_coef: f64,
}

/// AdamW (Loshchilov & Hutter), exactly as `torch.optim.AdamW`:
///
///   θ ← θ·(1 − lr·λ)
///   m ← β₁m + (1 − β₁)g,   v ← β₂v + (1 − β₂)g²
///   θ ← θ − lr/(1 − β₁ᵗ) · m / (sqrt(v)/sqrt(1 − β₂ᵗ) + ε)
///
/// On CPU with f32 parameters the moments live in host memory and the whole update of
/// a tensor is one parallel pass over (θ, g, m, v), θ written in place; elsewhere it is
/// composed of tensor ops on device-resident moments.
///
/// Half-precision parameters (bf16 on CUDA) get an f32 master copy beside f32 moments:
/// the update is computed and accumulated in f32 and only then rounded into the
/// parameter. Without it an update below half a bf16 ulp (|θ|·2⁻⁹, e.g. lr 1e-6 on a
/// weight of 0.02) would round away every step and the model would never move. The
/// master copy is then the parameter's value of record: a parameter written by anyone
/// but this optimizer after [`AdamW::new`] / [`AdamW::load`] is overwritten at the next
/// step.
pub struct AdamW {
    params: Vec<(String, Var)>,
    state: Vec<Moments>,
    step: u64,
    pub config: AdamWConfig,
}

/// First and second moments of one parameter.
enum Moments {
    Host {
        m: Vec<f32>,
        v: Vec<f32>,
    },
    /// On the parameter's device, in [`state_dtype`]; `master` holds the parameter's
    /// value in that dtype when the parameter itself is of lower precision.
    Device {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
}

/// The dtype the optimizer state of a parameter of dtype `d` is kept in: f64 for f64,
/// f32 for everything else.
fn state_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// One fused AdamW update of a parameter, in place; the moments are borrowed mutably
/// for the duration of the op.
struct FusedAdamW<'a> {
    moments: std::sync::Mutex<(&'a mut [f32], &'a mut [f32])>,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    bc1: f32,
    bc2_sqrt: f32,
    grad_scale: f32,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let g = contiguous::<f32>(s2, l2, self.name())?;
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fused AdamW: param not contiguous".into()))?;
        let CpuStorage::F32(p) = s1 else {
            candle_core::bail!("fused AdamW: f32 only")
        };
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused AdamW: poisoned lock".into()))?;
        let (m, v) = &mut *guard;
        let step = self.lr / self.bc1;
        const CHUNK: usize = 1 << 14;
        p[a..b]
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let g = g[i] * self.grad_scale;
                    m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g;
                    v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g * g;
                    p[i] =
                        p[i] * self.decay - step * m[i] / (v[i].sqrt() / self.bc2_sqrt + self.eps);
                }
            });
        Ok(())
    }
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let state = params
            .iter()
            .map(|(_, p)| Self::zero_moments(p))
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            state,
            step: 0,
            config,
        })
    }

    fn zero_moments(p: &Var) -> Result<Moments> {
        Ok(
            if p.device().is_cpu() && p.dtype() == DType::F32 && p.is_contiguous() {
                Moments::Host {
                    m: vec![0.0; p.elem_count()],
                    v: vec![0.0; p.elem_count()],
                }
            } else {
                let sd = state_dtype(p.dtype());
                Moments::Device {
                    m: Tensor::zeros(p.shape(), sd, p.device())?,
                    v: Tensor::zeros(p.shape(), sd, p.device())?,
                    master: (p.dtype() != sd)
                        .then(|| p.as_tensor().detach().to_dtype(sd))
                        .transpose()?,
                }
            },
        )
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update from `grads`, clipping the global norm to `max_grad_norm` first.
    /// Parameters without a gradient are left untouched (their moments too).
    pub fn step(&mut self, grads: &GradStore, max_grad_norm: Option<f64>) -> Result<StepStats> {
        let norm = grad_norm(&self.params, grads)?;
        if !norm.is_finite() {
            return Err(Error::invalid(format!(
                "gradient norm is {norm}: refusing to update (check the loss and learning rate)"
            )));
        }
        let coef = clip_coefficient(norm, max_grad_norm);
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for ((_, p), state) in self.params.iter().zip(self.state.iter_mut()) {
            let Some(g) = grads.get(p) else { continue };
            let decay = if p.rank() >= 2 {
                1.0 - c.lr * c.weight_decay
            } else {
                1.0
            };
            match state {
                Moments::Host { m, v } => {
                    // Weight gradients of x·Wᵀ arrive transposed: one copy makes them streamable.
                    let g = g.to_dtype(DType::F32)?.contiguous()?;
                    p.inplace_op2(
                        &g,
                        &FusedAdamW {
                            moments: std::sync::Mutex::new((m.as_mut_slice(), v.as_mut_slice())),
                            lr: c.lr as f32,
                            beta1: c.beta1 as f32,
                            beta2: c.beta2 as f32,
                            eps: c.eps as f32,
                            decay: decay as f32,
                            bc1: bc1 as f32,
                            bc2_sqrt: bc2.sqrt() as f32,
                            grad_scale: coef as f32,
                        },
                    )?;
                }
                Moments::Device { m, v, master } => {
                    let g = (g.to_dtype(m.dtype())? * coef)?;
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                    let update = (m.broadcast_div(&denom)? * (c.lr / bc1))?;
                    match master {
                        Some(theta) => {
                            *theta = ((&*theta * decay)? - update)?;
                            p.set(&theta.to_dtype(p.dtype())?)?;
                        }
                        None => p.set(&((p.as_tensor() * decay)? - update)?)?,
                    }
                }
            }
        }
        Ok(StepStats {
            grad_norm: norm,
            clip_coef: coef,
        })
    }

    /// Saves the moments (`<name>.exp_avg`, `<name>.exp_avg_sq`, and `<name>.master` for
    /// half-precision parameters) to `dir/optimizer.safetensors` and the step and
    /// hyper-parameters to `dir/optimizer.json`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for ((name, p), state) in self.params.iter().zip(&self.state) {
            let (m, v) = match state {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, p.shape(), &candle_core::Device::Cpu)?,
                    Tensor::from_slice(v, p.shape(), &candle_core::Device::Cpu)?,
                ),
                Moments::Device { m, v, master } => {
                    if let Some(theta) = master {
                        tensors.insert(format!("{name}.master"), theta.clone());
                    }
                    (m.clone(), v.clone())
                }
            };
            tensors.insert(format!("{name}.exp_avg"), m);
            tensors.insert(format!("{name}.exp_avg_sq"), v);
        }
        let st = dir.join("optimizer.safetensors");
        candle_core::safetensors::save(&tensors, &st)
            .map_err(|e| Error::format(&st, e.to_string()))?;
        let meta = serde_json::json!({"kind": "adamw", "step": self.step, "config": self.config});
        write_file(
            &dir.join("optimizer.json"),
            serde_json::to_string_pretty(&meta).map_err(|e| Error::invalid(e.to_string()))?,
        )
    }

    /// Restores what [`AdamW::save`] wrote. Every parameter's moments must be present
    /// with the parameter's shape; nothing changes unless all are. A half-precision
    /// parameter without a saved master copy starts one from its current value.
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let meta_path = dir.join("optimizer.json");
        let meta: serde_json::Value = serde_json::from_slice(&read_file(&meta_path)?)
            .map_err(|e| Error::format(&meta_path, format!("not valid JSON: {e}")))?;
        if meta.get("kind").and_then(|k| k.as_str()) != Some("adamw") {
            return Err(Error::format(&meta_path, "`kind` must be \"adamw\""));
        }
        let step = meta
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| Error::format(&meta_path, "missing integer `step`"))?;
        let config: AdamWConfig =
            serde_json::from_value(meta.get("config").cloned().unwrap_or_default())
                .map_err(|e| Error::format(&meta_path, format!("`config`: {e}")))?;
        let st = dir.join("optimizer.safetensors");
        let tensors = candle_core::safetensors::load(&st, &candle_core::Device::Cpu)
            .map_err(|e| Error::format(&st, e.to_string()))?;
        let mut restored = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let get = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| Error::format(&st, format!("missing tensor `{key}`")))?;
                if t.dims() != p.dims() {
                    return Err(Error::format(
                        &st,
                        format!(
                            "`{key}` has shape {:?}, parameter has {:?}",
                            t.dims(),
                            p.dims()
                        ),
                    ));
                }
                Ok(t.to_dtype(state_dtype(p.dtype()))?.to_device(p.device())?)
            };
            let (m, v) = (get("exp_avg")?, get("exp_avg_sq")?);
            restored.push(match Self::zero_moments(p)? {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1::<f32>()?,
                    v: v.flatten_all()?.to_vec1::<f32>()?,
                },
                Moments::Device { master, .. } => {
                    let master = match master {
                        Some(_) if tensors.contains_key(&format!("{name}.master")) => {
                            Some(get("master")?)
                        }
                        fresh => fresh,
                    };
                    Moments::Device { m, v, master }
                }
            });
        }
        self.state = restored;
        self.step = step;
        self.config = config;
        Ok(())
    }
}

/// Plain stochastic gradient descent: θ ← θ − lr·g (after clipping).
pub struct Sgd {
    params: Vec<(String, Var)>,
    pub lr: f64,
}

impl Sgd {
    pub fn new(params: Vec<(String, Var)>, lr: f64) -> Self {
        Sgd { params, lr }
    }

    pub fn step(&mut self, grads: &GradStore, max_grad_norm: Option<f64>) -> Result<StepStats> {
        let norm = grad_norm(&self.params, grads)?;
        let coef = clip_coefficient(norm, max_grad_norm);
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p) {
                p.set(&(p.as_tensor() - (g.to_dtype(p.dtype())? * (self.lr * coef))?)?)?;
            }
        }
        Ok(StepStats {
            grad_norm: norm,
            clip_coef: coef,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(w: &Var, g: &Tensor) -> GradStore {
        (w.as_tensor() * g.to_dtype(w.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// bf16 parameters follow an f32 run to within bf16 rounding although every step is
    /// below half a bf16 ulp, and a saved master copy is restored exactly.
    #[test]
    fn bf16_parameters_accumulate_updates_in_f32() {
        let d = &Device::Cpu;
        let init = Tensor::new(&[[0.02f32, -0.5], [1.0, 0.25]], d).unwrap();
        let g = Tensor::new(&[[0.125f32, -0.25], [0.5, 0.0625]], d).unwrap();
        let cfg = AdamWConfig {
            lr: 1e-4,
            weight_decay: 0.01,
            ..Default::default()
        };
        let w32 = Var::from_tensor(&init).unwrap();
        let w16 = Var::from_tensor(&init.to_dtype(DType::BF16).unwrap()).unwrap();
        let mut o32 = AdamW::new(vec![("w".into(), w32.clone())], cfg.clone()).unwrap();
        let mut o16 = AdamW::new(vec![("w".into(), w16.clone())], cfg.clone()).unwrap();
        for _ in 0..50 {
            o32.step(&grads(&w32, &g), None).unwrap();
            o16.step(&grads(&w16, &g), None).unwrap();
        }
        let (a, b) = (values(w32.as_tensor()), values(w16.as_tensor()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= x.abs() / 128.0, "f32 {x} vs bf16 {y}");
        }
        assert!(b[2] < 1.0, "the bf16 weight at 1.0 moved: {}", b[2]);

        let dir = tempfile::tempdir().unwrap();
        o16.save(dir.path()).unwrap();
        let w16b = Var::from_tensor(&w16.as_tensor().copy().unwrap()).unwrap();
        let mut o16b = AdamW::new(vec![("w".into(), w16b.clone())], cfg).unwrap();
        o16b.load(dir.path()).unwrap();
        for _ in 0..20 {
            o16.step(&grads(&w16, &g), None).unwrap();
            o16b.step(&grads(&w16b, &g), None).unwrap();
        }
        assert_eq!(values(w16.as_tensor()), values(w16b.as_tensor()));
    }
}
