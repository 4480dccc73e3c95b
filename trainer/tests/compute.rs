//! A step's compute settings change its cost, not its update: padded, packed and
//! prompt-shared layouts, token-budget micro-batches, skipped zero-gradient
//! completions and activation checkpointing all give the same weights (f64).

use candle_core::{DType, Device};
use tandem_model::packing::Packing;
use tandem_model::Model;
use tandem_trainer::config::{AlgorithmConfig, Compute, OptimizerConfig};
use tandem_trainer::rl::aggregate::LossAgg;
use tandem_trainer::rl::rollout::Rollout;
use tandem_trainer::rl::step::{Frozen, Optimizer, StepMetrics, StepPlan};

/// Three groups of three; the middle group's rewards are all equal (zero advantage
/// under GRPO), so with three minibatches one minibatch has nothing to compute.
fn rollouts() -> Vec<Rollout> {
    let mut out = Vec::new();
    let groups: [(&str, Vec<u32>, [f64; 3]); 3] = [
        ("a", vec![5, 17, 99, 3, 250, 7], [1.0, 0.0, 0.3]),
        ("z", vec![11, 400, 2, 9], [1.0, 1.0, 1.0]),
        ("c", vec![30, 31, 32, 33, 34, 35, 36, 37], [0.2, 0.9, 0.1]),
    ];
    for (g, prompt, rewards) in groups {
        for (k, reward) in rewards.into_iter().enumerate() {
            let len = 2 + 3 * k;
            let completion: Vec<u32> = (0..len).map(|t| (60 + 7 * t + 13 * k) as u32).collect();
            out.push(Rollout {
                group: g.into(),
                prompt_ids: prompt.clone(),
                behavior_logprobs: (0..len).map(|t| -5.0 - 0.1 * t as f64).collect(),
                completion_ids: completion,
                reward,
                versions: None,
                loss_mask: None,
                finish_reason: None,
                episode: None,
            });
        }
    }
    out
}

fn step(algo: &AlgorithmConfig, compute: &Compute) -> (StepMetrics, Vec<(String, Vec<f64>)>) {
    let cfg = tandem_model::preset::preset_config("tiny").unwrap();
    let policy = Model::random(cfg, 9, DType::F64, &Device::Cpu).unwrap();
    let opt_cfg = OptimizerConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = Optimizer::new(&opt_cfg, &policy, vec![]).unwrap();
    let m = StepPlan {
        policy: &policy,
        frozen: Frozen::default(),
        critic: None,
        rollouts: &rollouts(),
        algorithm: algo,
        optimizer: &opt_cfg,
        step_index: 0,
        policy_version: None,
        compute,
    }
    .run(&mut opt)
    .unwrap();
    let mut weights: Vec<(String, Vec<f64>)> = policy
        .params()
        .iter()
        .map(|(n, v)| {
            let w = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (n.to_string(), w)
        })
        .collect();
    weights.sort_by(|a, b| a.0.cmp(&b.0));
    (m, weights)
}

#[test]
fn every_compute_setting_gives_the_same_update() {
    let reference = Compute {
        packing: Packing::Padded,
        max_tokens_per_microbatch: 1 << 20,
        skip_zero_gradient: false,
        activation_checkpointing: false,
    };
    let settings = [
        ("default", Compute::default()),
        (
            "packed, 10-token micro-batches",
            Compute {
                packing: Packing::Packed,
                max_tokens_per_microbatch: 10,
                ..Compute::default()
            },
        ),
        (
            "shared prompts, checkpointed, 12-token micro-batches",
            Compute {
                max_tokens_per_microbatch: 12,
                activation_checkpointing: true,
                ..Compute::default()
            },
        ),
    ];
    for loss_agg in [
        LossAgg::TokenMean,
        LossAgg::SeqMeanTokenMean,
        LossAgg::SeqSumNorm,
    ] {
        let algo = AlgorithmConfig {
            loss_agg,
            max_completion_len: 16,
            minibatches: 3,
            ..Default::default()
        };
        let (m_ref, w_ref) = step(&algo, &reference);
        assert_eq!(m_ref.skipped_sequences, 0);
        assert_eq!(m_ref.optimizer_steps, 3);
        for (name, compute) in &settings {
            let (m, w) = step(&algo, compute);
            assert_eq!(
                m.skipped_sequences, 3,
                "{name}: the equal-reward group is skipped"
            );
            assert_eq!(m.skipped_tokens, 2 + 5 + 8);
            assert!(
                m.forward_tokens < m_ref.forward_tokens,
                "{name}: {} forward tokens, padded {}",
                m.forward_tokens,
                m_ref.forward_tokens
            );
            for (what, a, b) in [
                ("loss", m.loss, m_ref.loss),
                ("policy loss", m.policy_loss, m_ref.policy_loss),
                ("grad norm", m.grad_norm, m_ref.grad_norm),
            ] {
                assert!(
                    (a - b).abs() <= 1e-10 * b.abs().max(1e-6),
                    "{loss_agg:?}, {name}: {what} {a} vs {b}"
                );
            }
            for ((n, a), (_, b)) in w.iter().zip(&w_ref) {
                let d = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(d < 1e-12, "{loss_agg:?}, {name}: {n} differs by {d}");
            }
        }
    }
}

/// With an entropy bonus every completion has a gradient: nothing is skipped.
#[test]
fn an_entropy_term_keeps_every_completion() {
    let algo = AlgorithmConfig {
        entropy_coef: 0.01,
        ..Default::default()
    };
    let (m, _) = step(&algo, &Compute::default());
    assert_eq!(m.skipped_sequences, 0);
}
