//! The three training layouts (padded, packed, prompts shared) give the same logprobs,
//! entropies and gradients, and equal the sum of computing every sequence alone.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use tandem_model::packing::{ForwardOptions, Packing};
use tandem_model::{preset, Model};

/// Two prompts with three and two completions of different lengths, then a sequence
/// whose prompt no other shares.
fn batch() -> (Vec<Vec<u32>>, Vec<usize>) {
    let p1: Vec<u32> = vec![5, 17, 99, 3, 250, 7, 8];
    let p2: Vec<u32> = vec![11, 400, 2];
    let mut seqs = Vec::new();
    let mut starts = Vec::new();
    for (p, completions) in [
        (
            &p1,
            vec![vec![40u32, 41], vec![50, 51, 52, 53, 54], vec![60]],
        ),
        (&p2, vec![vec![70, 71, 72], vec![80, 81]]),
    ] {
        for c in completions {
            seqs.push([p.as_slice(), &c].concat());
            starts.push(p.len());
        }
    }
    seqs.push(vec![9, 8, 7, 6, 5, 4]);
    starts.push(2);
    (seqs, starts)
}

/// Σ aₜ·logprobₜ + Σ bₜ·entropyₜ with fixed weights, its values and its gradients.
fn run(
    model: &Model,
    seqs: &[Vec<u32>],
    starts: &[usize],
    options: impl Into<ForwardOptions>,
) -> (Vec<f64>, GradStore) {
    let out = model
        .completion_logprobs_with(&model.weights(), seqs, starts, 0.8, options)
        .unwrap();
    let n = out.logprobs.dim(0).unwrap();
    let dtype = out.logprobs.dtype();
    let weights = |f: &dyn Fn(usize) -> f64| {
        Tensor::from_vec((0..n).map(f).collect::<Vec<_>>(), n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let a = weights(&|i| 1.0 + 0.1 * i as f64);
    let b = weights(&|i| 0.5 - 0.05 * i as f64);
    let loss = ((&out.logprobs * a).unwrap().sum_all().unwrap()
        + (&out.entropy * b).unwrap().sum_all().unwrap())
    .unwrap();
    let values = Tensor::cat(&[&out.logprobs, &out.entropy], 0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (values, out.backward(&loss).unwrap())
}

fn grad_diff(model: &Model, a: &GradStore, b: &GradStore) -> f64 {
    let mut worst = 0f64;
    for (name, var) in model.params().iter() {
        let ga = a.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
        let gb = b.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
        let max_abs = |t: &Tensor| {
            let t = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let (d, scale) = (max_abs(&(ga - gb).unwrap()), max_abs(gb));
        worst = worst.max(d / scale.max(1e-12));
    }
    worst
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn layouts_agree_in_f32_and_f64() {
    let (seqs, starts) = batch();
    for name in preset::TINY_PRESETS {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-10)] {
            let cfg = preset::preset_config(name).unwrap();
            let model = Model::random(cfg, 5, dtype, &Device::Cpu).unwrap();
            let (v_pad, g_pad) = run(&model, &seqs, &starts, Packing::Padded);
            for packing in [Packing::Packed, Packing::SharedPrefix] {
                let (v, g) = run(&model, &seqs, &starts, packing);
                let dv = max_diff(&v, &v_pad);
                assert!(
                    dv < tol,
                    "{name} {dtype:?} {packing:?}: values differ by {dv}"
                );
                let dg = grad_diff(&model, &g, &g_pad);
                assert!(
                    dg < tol,
                    "{name} {dtype:?} {packing:?}: gradients differ by {dg} (relative)"
                );
            }
        }
    }
}

/// Prompt sharing against the definition: every sequence computed alone (its own
/// forward and backward, gradients summed), in f64.
#[test]
fn shared_prompts_equal_each_sequence_alone_in_f64() {
    let (seqs, starts) = batch();
    for name in preset::TINY_PRESETS {
        let cfg = preset::preset_config(name).unwrap();
        let model = Model::random(cfg, 6, DType::F64, &Device::Cpu).unwrap();
        let (values, shared) = run(&model, &seqs, &starts, Packing::SharedPrefix);
        let n = values.len() / 2;
        let (mut lp, mut ent) = (Vec::new(), Vec::new());
        let mut sum: Option<GradStore> = None;
        let mut offset = 0;
        for (s, &start) in seqs.iter().zip(&starts) {
            // The same per-token weights as in the batch: a sequence alone is scored
            // with the weights of its tokens' batch positions.
            let out = model
                .completion_logprobs_with(
                    &model.weights(),
                    std::slice::from_ref(s),
                    &[start],
                    0.8,
                    Packing::Padded,
                )
                .unwrap();
            let k = out.logprobs.dim(0).unwrap();
            let a: Vec<f64> = (offset..offset + k).map(|i| 1.0 + 0.1 * i as f64).collect();
            let b: Vec<f64> = (offset..offset + k)
                .map(|i| 0.5 - 0.05 * i as f64)
                .collect();
            let a = Tensor::from_vec(a, k, &Device::Cpu).unwrap();
            let b = Tensor::from_vec(b, k, &Device::Cpu).unwrap();
            let loss = ((&out.logprobs * a).unwrap().sum_all().unwrap()
                + (&out.entropy * b).unwrap().sum_all().unwrap())
            .unwrap();
            lp.extend(out.logprobs.to_vec1::<f64>().unwrap());
            ent.extend(out.entropy.to_vec1::<f64>().unwrap());
            let g = loss.backward().unwrap();
            sum = Some(match sum {
                None => g,
                Some(mut acc) => {
                    for (_, var) in model.params().iter() {
                        let total = (acc.get(var).unwrap() + g.get(var).unwrap()).unwrap();
                        acc.insert(var, total);
                    }
                    acc
                }
            });
            offset += k;
        }
        assert_eq!(offset, n);
        let alone = [lp, ent].concat();
        let dv = max_diff(&values, &alone);
        assert!(dv < 1e-10, "{name}: values differ by {dv}");
        let dg = grad_diff(&model, &shared, &sum.unwrap());
        assert!(dg < 1e-10, "{name}: gradients differ by {dg} (relative)");
    }
}

/// Activation checkpointing replays the layers in the backward: the same values and
/// gradients as the recorded forward, in every layout.
#[test]
fn checkpointed_layers_give_the_same_gradients() {
    let (seqs, starts) = batch();
    for name in preset::TINY_PRESETS {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let cfg = preset::preset_config(name).unwrap();
            let model = Model::random(cfg, 7, dtype, &Device::Cpu).unwrap();
            for packing in [Packing::Padded, Packing::SharedPrefix] {
                let (v, g) = run(&model, &seqs, &starts, packing);
                let options = ForwardOptions {
                    packing,
                    checkpoint_layers: true,
                };
                let (vc, gc) = run(&model, &seqs, &starts, options);
                let dv = max_diff(&v, &vc);
                assert!(
                    dv < tol,
                    "{name} {dtype:?} {packing:?}: values differ by {dv}"
                );
                let dg = grad_diff(&model, &gc, &g);
                assert!(
                    dg < tol,
                    "{name} {dtype:?} {packing:?}: gradients differ by {dg}"
                );
            }
        }
    }
}
