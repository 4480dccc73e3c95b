//! AdamW against torch.optim.AdamW (fixture), state save/restore, SGD.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use tandem_model::optim::{AdamW, AdamWConfig, Sgd};

fn tensor(v: &serde_json::Value, dtype: DType) -> Tensor {
    let rows = v.as_array().unwrap();
    let t = if rows[0].is_array() {
        let data: Vec<f64> = rows.iter().flat_map(f64s).collect();
        Tensor::from_vec(
            data,
            (rows.len(), rows[0].as_array().unwrap().len()),
            &Device::Cpu,
        )
        .unwrap()
    } else {
        Tensor::from_vec(f64s(v), rows.len(), &Device::Cpu).unwrap()
    };
    t.to_dtype(dtype).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A GradStore holding exactly `g` for `var`s: the gradient of Σ var ⊙ g.
fn grads_of(vars: &[&Var], gs: &[Tensor]) -> candle_core::backprop::GradStore {
    let mut loss = Tensor::zeros((), vars[0].dtype(), &Device::Cpu).unwrap();
    for (v, g) in vars.iter().zip(gs) {
        loss = (loss + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

/// f32 takes the fused CPU kernel, f64 the composed path: both must match torch.
#[test]
fn adamw_with_clipping_matches_torch() {
    let fx = fixture("adamw.json");
    let c = &fx["config"];
    for (dtype, tol) in [(DType::F32, 2e-6), (DType::F64, 1e-12)] {
        let w = Var::from_tensor(&tensor(&fx["w0"], dtype)).unwrap();
        let b = Var::from_tensor(&tensor(&fx["b0"], dtype)).unwrap();
        let cfg = AdamWConfig {
            lr: c["lr"].as_f64().unwrap(),
            beta1: c["beta1"].as_f64().unwrap(),
            beta2: c["beta2"].as_f64().unwrap(),
            eps: c["eps"].as_f64().unwrap(),
            weight_decay: c["weight_decay"].as_f64().unwrap(),
        };
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        for (i, step) in fx["steps"].as_array().unwrap().iter().enumerate() {
            let grads = grads_of(
                &[&w, &b],
                &[
                    tensor(&step["grad_w"], dtype),
                    tensor(&step["grad_b"], dtype),
                ],
            );
            let stats = opt.step(&grads, c["max_grad_norm"].as_f64()).unwrap();
            assert!(
                (stats.grad_norm - step["grad_norm"].as_f64().unwrap()).abs() < 1e-5,
                "step {i}: grad norm"
            );
            let dw = max_abs_diff(
                &flat(&w),
                &step["w"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .flat_map(f64s)
                    .collect::<Vec<_>>(),
            );
            let db = max_abs_diff(&flat(&b), &f64s(&step["b"]));
            assert!(
                dw <= tol && db <= tol,
                "{dtype:?} step {i}: |Δw| {dw:e}, |Δb| {db:e}"
            );
        }
    }
}

#[test]
fn adamw_state_round_trips() {
    let make = || {
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &Device::Cpu).unwrap())
                .unwrap();
        let opt = AdamW::new(
            vec![("w".into(), w.clone())],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.01,
                ..Default::default()
            },
        )
        .unwrap();
        (w, opt)
    };
    let g1 = Tensor::new(&[[0.1f32, -0.2], [0.3, 0.05]], &Device::Cpu).unwrap();
    let g2 = Tensor::new(&[[-0.4f32, 0.2], [0.1, 0.9]], &Device::Cpu).unwrap();
    let (w, mut opt) = make();
    opt.step(&grads_of(&[&w], std::slice::from_ref(&g1)), None)
        .unwrap();
    let after_first = w.as_tensor().copy().unwrap();
    let dir = tempfile::tempdir().unwrap();
    opt.save(dir.path()).unwrap();
    opt.step(&grads_of(&[&w], std::slice::from_ref(&g2)), None)
        .unwrap();

    // A fresh optimizer restored from the save, on the same weights, takes the same step.
    let (w2, mut opt2) = make();
    w2.set(&after_first).unwrap();
    opt2.load(dir.path()).unwrap();
    assert_eq!(opt2.step_count(), 1);
    opt2.step(&grads_of(&[&w2], std::slice::from_ref(&g2)), None)
        .unwrap();
    assert_eq!(
        flat(&w2),
        flat(&w),
        "a restored optimizer continues exactly"
    );

    std::fs::write(dir.path().join("optimizer.json"), "{\"kind\": \"adamw\"}").unwrap();
    let err = opt2.load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.json") && err.contains("step"),
        "{err}"
    );
}

#[test]
fn sgd_steps_against_the_gradient_and_clips() {
    let w = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap()).unwrap();
    let mut opt = Sgd::new(vec![("w".into(), w.clone())], 0.5);
    let g = Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
    let stats = opt.step(&grads_of(&[&w], &[g]), Some(1.0)).unwrap();
    assert!((stats.grad_norm - 5.0).abs() < 1e-12);
    let coef = 1.0 / (5.0 + 1e-6);
    let expect = [1.0 - 0.5 * 3.0 * coef, 2.0 - 0.5 * 4.0 * coef];
    assert!(max_abs_diff(&flat(&w), &expect) < 1e-12);
}
