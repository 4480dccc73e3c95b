//! Gradients reach every parameter, and they are right (finite differences in f64).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use tandem_model::{preset, Model};

/// loss = Σ aᵢ·logprobᵢ + Σ bᵢ·entropyᵢ over every completion token of two sequences
/// of different lengths (so padding and masking are on the path).
fn loss(model: &Model, w: &tandem_model::Weights) -> Tensor {
    let seqs = vec![vec![5u32, 17, 99, 3, 250, 7, 8], vec![11u32, 400, 2, 9]];
    let out = model.completion_logprobs(w, &seqs, &[2, 1], 0.8).unwrap();
    let n = out.logprobs.dim(0).unwrap();
    let dtype = out.logprobs.dtype();
    let a = Tensor::from_vec(
        (0..n).map(|i| 1.0 + 0.1 * i as f64).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    let b = Tensor::from_vec(
        (0..n).map(|i| 0.5 - 0.05 * i as f64).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    ((out.logprobs * a).unwrap().sum_all().unwrap() + (out.entropy * b).unwrap().sum_all().unwrap())
        .unwrap()
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    for name in preset::TINY_PRESETS {
        let p = tiny(name, 3);
        let grads = loss(&p.model, &p.model.weights()).backward().unwrap();
        for (pname, var) in p.model.params().iter() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient of {pname} has norm {norm}"
            );
        }
    }
}

/// Central differences (h = 1e-5, f64) against autograd for a few entries of every
/// parameter tensor: relative error below 1e-5 (absolute below 1e-8 for tiny gradients).
#[test]
fn gradients_match_finite_differences_in_f64() {
    for name in preset::TINY_PRESETS {
        let cfg = preset::preset_config(name).unwrap();
        let model = Model::random(cfg, 4, DType::F64, &Device::Cpu).unwrap();
        // Non-trivial norms and biases, so their gradients are not special cases.
        let mut perturbed = std::collections::HashMap::new();
        for (pname, var) in model.params().iter() {
            if pname.contains("norm") || pname.ends_with(".bias") {
                let n = var.elem_count();
                let data: Vec<f64> = (0..n)
                    .map(|i| 1.0 + 0.1 * ((i * 37 % 11) as f64 - 5.0) / 5.0)
                    .collect();
                perturbed.insert(
                    pname.to_string(),
                    Tensor::from_vec(data, var.dims(), &Device::Cpu).unwrap(),
                );
            }
        }
        model.params().assign(&perturbed).unwrap();
        let grads = loss(&model, &model.weights()).backward().unwrap();
        let eval = || {
            loss(&model, &model.inference_weights())
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-5;
        let mut worst = 0.0f64;
        for (pname, var) in model.params().iter() {
            let g = grads
                .get(var)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let n = g.len();
            for &idx in &[0, n / 3, n - 1] {
                let orig = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let set = |delta: f64| {
                    let mut v = orig.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                };
                set(h);
                let up = eval();
                set(-h);
                let down = eval();
                set(0.0);
                let numeric = (up - down) / (2.0 * h);
                // Rounding noise of the difference quotient is ~ε·|loss|/h ≈ 1e-9.
                let scale = numeric.abs().max(g[idx].abs());
                let err = (numeric - g[idx]).abs() / scale.max(1e-3);
                worst = worst.max(err);
                assert!(err < 1e-5, "{name}: d loss / d {pname}[{idx}]: autograd {} vs numeric {numeric} (rel err {err:.2e})", g[idx]);
            }
        }
        eprintln!("{name}: worst relative error {worst:.2e}");
    }
}
