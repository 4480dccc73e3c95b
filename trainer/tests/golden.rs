//! The RL functions against golden values from tools/rl_reference.py (PyTorch), ≤ 1e-6,
//! and the properties the algorithms promise.

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use tandem_trainer::rl::advantage::{self, Estimator};
use tandem_trainer::rl::aggregate::{aggregate, LossAgg};
use tandem_trainer::rl::correction::{behaviour_weights, Correction, Level};
use tandem_trainer::rl::kl::{self, KlEstimator};
use tandem_trainer::rl::overlong::overlong_penalty;
use tandem_trainer::rl::policy_loss::{self, PolicyLoss};
use tandem_trainer::rl::proximal;
use tandem_trainer::rl::tokens::Tokens;

const TOL: f64 = 1e-6;

fn golden() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/rl_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn t(v: &[f64]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec1::<f64>().unwrap()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= TOL, "{what}[{i}]: {x} vs {y}");
    }
}

/// Every token trained.
fn ones(n: usize) -> Vec<f64> {
    vec![1.0; n]
}

fn offsets(lengths: &[usize]) -> Vec<usize> {
    let mut o = vec![0];
    for l in lengths {
        o.push(o.last().unwrap() + l);
    }
    o
}

fn correction(name: &str, p: &Value) -> (Correction, Level) {
    let (kind, level) = name.split_once('/').unwrap();
    let c = match kind {
        "none" => Correction::None,
        "tis" => Correction::Tis {
            cap: p["tis_cap"].as_f64().unwrap(),
        },
        _ => Correction::Icepop {
            low: p["icepop_low"].as_f64().unwrap(),
            high: p["icepop_high"].as_f64().unwrap(),
        },
    };
    (
        c,
        if level == "token" {
            Level::Token
        } else {
            Level::Sequence
        },
    )
}

#[test]
fn advantages_match_reference() {
    let g = golden();
    let rewards = f64s(&g["rewards"]);
    let groups: Vec<usize> = g["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    for (name, est) in [
        ("reinforce", Estimator::Reinforce),
        ("reinforce_no_baseline", Estimator::ReinforceNoBaseline),
        ("rloo", Estimator::Rloo),
        ("grpo", Estimator::Grpo),
        ("drgrpo", Estimator::Drgrpo),
        ("reinforce_pp", Estimator::ReinforcePp),
    ] {
        let a = advantage::compute(est, &rewards, &groups).unwrap();
        assert_close(&a.values, &f64s(&g["advantages"][name]), name);
        assert_eq!(a.zero_std_groups, 1, "{name}: group 1 has equal rewards");
    }
}

#[test]
fn kl_estimators_match_reference() {
    let g = golden();
    let (logp, r) = (
        t(&f64s(&g["tokens"]["logp"])),
        t(&f64s(&g["tokens"]["ref_logp"])),
    );
    for (name, est) in [
        ("k1", KlEstimator::K1),
        ("k2", KlEstimator::K2),
        ("k3", KlEstimator::K3),
    ] {
        assert_close(
            &vals(&kl::per_token(est, &logp, &r).unwrap()),
            &f64s(&g["kl"][name]),
            name,
        );
    }
}

#[test]
fn behaviour_weights_match_reference() {
    let g = golden();
    let tok = &g["tokens"];
    let lengths: Vec<usize> = tok["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let prox = t(&f64s(&tok["prox_logp"]));
    let off = offsets(&lengths);
    let all = ones(off[off.len() - 1]);
    let masked = f64s(&tok["mask"]);
    for (name, expect) in g["weights"].as_object().unwrap() {
        let (corr, m) = name.split_once('|').unwrap_or((name, "all"));
        let (mask, mu) = match m {
            "masked" => (&masked, t(&f64s(&tok["behaviour_logp_masked"]))),
            _ => (&all, t(&f64s(&tok["behaviour_logp"]))),
        };
        let (c, level) = correction(corr, &g["params"]);
        let tokens = Tokens {
            offsets: &off,
            mask,
        };
        let w = behaviour_weights(c, level, &prox, &mu, tokens).unwrap();
        assert_close(&vals(&w.weights), &f64s(expect), name);
    }
}

/// AReaL's log-linear proximal approximation: α per token and log π_prox.
#[test]
fn loglinear_proximal_matches_reference() {
    let g = golden();
    let (tok, ll) = (&g["tokens"], &g["loglinear"]);
    let versions: Vec<u64> = ll["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let alpha =
        proximal::loglinear_alpha(&versions, ll["policy_version"].as_u64().unwrap()).unwrap();
    assert_close(&alpha, &f64s(&ll["alpha"]), "alpha");
    let prox = proximal::loglinear(
        &t(&f64s(&tok["behaviour_logp"])),
        &t(&f64s(&tok["logp"])),
        &t(&alpha),
    )
    .unwrap();
    assert_close(&vals(&prox), &f64s(&ll["prox_logp"]), "prox_logp");
}

/// Per-token policy losses, aggregated losses and d(loss)/d(logp), for every policy
/// loss × correction × aggregation combination the reference wrote.
#[test]
fn policy_losses_and_gradients_match_reference() {
    let g = golden();
    let tok = &g["tokens"];
    let p = &g["params"];
    let lengths: Vec<usize> = tok["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let off = offsets(&lengths);
    let max_len = tok["max_completion_len"].as_u64().unwrap() as usize;
    let (prox, mu, adv) = (
        t(&f64s(&tok["prox_logp"])),
        t(&f64s(&tok["behaviour_logp"])),
        t(&f64s(&tok["advantages"])),
    );
    let all = ones(off[off.len() - 1]);
    let masked = f64s(&tok["mask"]);
    let mu_masked = t(&f64s(&tok["behaviour_logp_masked"]));
    let eps = |key: &str| p[key].as_f64().unwrap();
    for (key, expect) in g["policy"].as_object().unwrap() {
        let mut parts = key.split('|');
        let (pl, corr, agg, m) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let (mask, mu) = match m {
            "masked" => (&masked, &mu_masked),
            _ => (&all, &mu),
        };
        let tokens = Tokens {
            offsets: &off,
            mask,
        };
        let kind = match pl {
            "reinforce" => PolicyLoss::Reinforce,
            "gspo" => PolicyLoss::Gspo {
                eps_low: eps("gspo_eps_low"),
                eps_high: eps("gspo_eps_high"),
            },
            "cispo" => PolicyLoss::Cispo {
                eps_low: eps("cispo_eps_low"),
                eps_high: eps("cispo_eps_high"),
            },
            "ppo_clip" => PolicyLoss::PpoClip {
                eps_low: p["eps_low"].as_f64().unwrap(),
                eps_high: p["eps_high"].as_f64().unwrap(),
                dual_clip: None,
            },
            _ => PolicyLoss::PpoClip {
                eps_low: p["eps_low"].as_f64().unwrap(),
                eps_high: p["eps_high"].as_f64().unwrap(),
                dual_clip: p["clip_c"].as_f64(),
            },
        };
        let agg = match agg {
            "token_mean" => LossAgg::TokenMean,
            "seq_mean_token_mean" => LossAgg::SeqMeanTokenMean,
            _ => LossAgg::SeqSumNorm,
        };
        let (c, level) = correction(corr, p);
        let w = behaviour_weights(c, level, &prox, mu, tokens).unwrap();
        let logp = Var::from_tensor(&t(&f64s(&tok["logp"]))).unwrap();
        let out = policy_loss::per_token(kind, logp.as_tensor(), &prox, &adv, &w.weights, tokens)
            .unwrap();
        let total = aggregate(agg, &out.loss, tokens, max_len).unwrap();
        assert_close(
            &vals(&out.loss),
            &f64s(&expect["per_token"]),
            &format!("{key}: per-token loss"),
        );
        assert_close(
            &[total.to_scalar::<f64>().unwrap()],
            &[expect["loss"].as_f64().unwrap()],
            &format!("{key}: loss"),
        );
        let grad = total.backward().unwrap();
        assert_close(
            &vals(grad.get(&logp).unwrap()),
            &f64s(&expect["grad_logp"]),
            &format!("{key}: gradient"),
        );
    }
}

/// With μ = π_prox every correction is the identity (no truncation, nothing masked).
#[test]
fn corrections_equal_none_when_on_policy() {
    let lp = t(&[-0.1, -2.0, -0.7, -3.3, -1.2]);
    let off = [0, 2, 5];
    for level in [Level::Token, Level::Sequence] {
        for c in [
            Correction::Tis { cap: 2.0 },
            Correction::Icepop {
                low: 0.5,
                high: 2.0,
            },
        ] {
            let tokens = Tokens {
                offsets: &off,
                mask: &ones(5),
            };
            let w = behaviour_weights(c, level, &lp, &lp, tokens).unwrap();
            assert_eq!(vals(&w.weights), vec![1.0; 5], "{c:?} {level:?}");
            assert_eq!(w.masked_fraction, 0.0);
        }
    }
}

/// All rewards of a group equal: GRPO advantages are 0, so the policy term has zero gradient.
#[test]
fn equal_rewards_give_zero_grpo_gradient() {
    let a = advantage::compute(Estimator::Grpo, &[0.7; 4], &[0; 4]).unwrap();
    let adv = t(&[
        a.values[0],
        a.values[0],
        a.values[1],
        a.values[2],
        a.values[3],
    ]);
    let logp = Var::from_tensor(&t(&[-0.5, -1.0, -0.2, -2.0, -0.9])).unwrap();
    let old = t(&[-0.6, -0.9, -0.2, -1.5, -1.0]);
    let kind = PolicyLoss::PpoClip {
        eps_low: 0.2,
        eps_high: 0.2,
        dual_clip: None,
    };
    let out = policy_loss::per_token(
        kind,
        logp.as_tensor(),
        &old,
        &adv,
        &adv.ones_like().unwrap(),
        Tokens {
            offsets: &[0, 2, 5],
            mask: &ones(5),
        },
    )
    .unwrap();
    let tokens = Tokens {
        offsets: &[0, 2, 5],
        mask: &ones(5),
    };
    let g = aggregate(LossAgg::TokenMean, &out.loss, tokens, 3)
        .unwrap()
        .backward()
        .unwrap();
    assert!(vals(g.get(&logp).unwrap()).iter().all(|&x| x == 0.0));
}

/// PPO's clip: the gradient is exactly zero when A > 0 and ρ > 1 + ε, or A < 0 and
/// ρ < 1 − ε; it is not zero in the other four cases.
#[test]
fn ppo_clip_zeroes_the_gradient_exactly_where_the_table_says() {
    let eps = 0.2;
    // (advantage, ratio, gradient should be zero)
    let cases = [
        (1.0, 1.5, true),
        (-1.0, 0.5, true),
        (1.0, 0.5, false),
        (-1.0, 1.5, false),
        (1.0, 1.1, false),
        (-1.0, 0.9, false),
    ];
    let adv = t(&cases.iter().map(|c| c.0).collect::<Vec<_>>());
    let old = t(&[-1.0; 6]);
    let logp = Var::from_tensor(&t(&cases
        .iter()
        .map(|c| -1.0 + f64::ln(c.1))
        .collect::<Vec<_>>()))
    .unwrap();
    let kind = PolicyLoss::PpoClip {
        eps_low: eps,
        eps_high: eps,
        dual_clip: None,
    };
    let out = policy_loss::per_token(
        kind,
        logp.as_tensor(),
        &old,
        &adv,
        &adv.ones_like().unwrap(),
        Tokens {
            offsets: &[0, 6],
            mask: &ones(6),
        },
    )
    .unwrap();
    assert!(
        (out.clip_fraction_high - 1.0 / 6.0).abs() < 1e-12
            && (out.clip_fraction_low - 1.0 / 6.0).abs() < 1e-12
    );
    let g = vals(
        out.loss
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(&logp)
            .unwrap(),
    );
    for (c, gi) in cases.iter().zip(&g) {
        assert_eq!(*gi == 0.0, c.2, "A {} ratio {}: gradient {gi}", c.0, c.1);
    }
}

#[test]
fn bad_parameters_are_errors() {
    let x = t(&[-1.0, -2.0]);
    let two = Tokens {
        offsets: &[0, 2],
        mask: &[1.0, 1.0],
    };
    assert!(
        behaviour_weights(Correction::Tis { cap: 0.0 }, Level::Token, &x, &x, two)
            .unwrap_err()
            .to_string()
            .contains("tis_cap")
    );
    assert!(behaviour_weights(
        Correction::Icepop {
            low: 2.0,
            high: 1.0
        },
        Level::Token,
        &x,
        &x,
        two
    )
    .unwrap_err()
    .to_string()
    .contains("icepop_low"));
    let bad = PolicyLoss::PpoClip {
        eps_low: 0.2,
        eps_high: 0.2,
        dual_clip: Some(0.5),
    };
    assert!(policy_loss::per_token(bad, &x, &x, &x, &x, two)
        .unwrap_err()
        .to_string()
        .contains("clip_c"));
    let bad = PolicyLoss::Cispo {
        eps_low: 1.5,
        eps_high: 0.28,
    };
    assert!(policy_loss::per_token(bad, &x, &x, &x, &x, two)
        .unwrap_err()
        .to_string()
        .contains("cispo_eps_low"));
    assert!(aggregate(LossAgg::SeqSumNorm, &x, two, 1)
        .unwrap_err()
        .to_string()
        .contains("max_completion_len"));
    let short = Tokens {
        offsets: &[0, 3],
        mask: &[1.0, 1.0, 1.0],
    };
    let e = aggregate(LossAgg::TokenMean, &x, short, 3).unwrap_err();
    assert!(
        e.to_string().contains("2 losses for a mask of 3 tokens"),
        "{e}"
    );
    // A mask whose length differs from the losses'.
    let long_mask = Tokens {
        offsets: &[0, 3],
        mask: &[1.0, 1.0, 1.0],
    };
    let e = policy_loss::per_token(PolicyLoss::Reinforce, &x, &x, &x, &x, long_mask).unwrap_err();
    assert!(e.to_string().contains("2 logprobs for a mask of 3"), "{e}");
}

/// GAE(γ, λ) and the clipped value loss (with its gradient) against the reference.
#[test]
fn gae_and_value_loss_match_reference() {
    let g = golden();
    let c = &g["critic"];
    let lengths: Vec<usize> = g["tokens"]["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let values = f64s(&c["values"]);
    let (adv, ret) = tandem_trainer::rl::gae::gae(
        &values,
        &f64s(&c["rewards"]),
        &offsets(&lengths),
        c["gamma"].as_f64().unwrap(),
        c["lambda"].as_f64().unwrap(),
    )
    .unwrap();
    assert_close(&adv, &f64s(&c["advantages"]), "gae advantages");
    assert_close(&ret, &f64s(&c["returns"]), "gae returns");
    let new_values = Var::from_tensor(&t(&f64s(&c["new_values"]))).unwrap();
    let vl = tandem_trainer::rl::gae::value_loss(
        new_values.as_tensor(),
        &t(&values),
        &t(&ret),
        c["value_clip"].as_f64().unwrap(),
    )
    .unwrap();
    assert_close(&vals(&vl), &f64s(&c["value_loss"]), "value loss");
    let grad = vl.sum_all().unwrap().backward().unwrap();
    assert_close(
        &vals(grad.get(&new_values).unwrap()),
        &f64s(&c["value_loss_grad"]),
        "value loss gradient",
    );
}

/// DAPO's overlong penalty against the reference's table.
#[test]
fn overlong_penalty_matches_reference() {
    let g = golden();
    for case in g["overlong"].as_array().unwrap() {
        let u = |k: &str| case[k].as_u64().unwrap() as usize;
        let got = overlong_penalty(
            u("len"),
            u("max_len"),
            u("buffer_len"),
            case["penalty"].as_f64().unwrap(),
        )
        .unwrap();
        assert_close(
            &[got],
            &[case["reward"].as_f64().unwrap()],
            &format!("{case}"),
        );
    }
}

/// A masked token gets no gradient and moves no denominator: adding a masked token of
/// any logprob, advantage and μ to a completion changes neither the loss nor the other
/// tokens' gradients, for every policy loss and aggregation.
#[test]
fn masked_tokens_change_nothing() {
    let kinds = [
        PolicyLoss::Reinforce,
        PolicyLoss::PpoClip {
            eps_low: 0.2,
            eps_high: 0.28,
            dual_clip: Some(3.0),
        },
        PolicyLoss::Gspo {
            eps_low: 3e-4,
            eps_high: 4e-4,
        },
        PolicyLoss::Cispo {
            eps_low: 1.0,
            eps_high: 0.28,
        },
    ];
    let base = [-0.5, -1.2, -0.3, -2.0, -0.8];
    let old = [-0.6, -1.0, -0.2, -2.2, -0.9];
    let adv = [0.7, 0.7, -1.1, -1.1, -1.1];
    for kind in kinds {
        for agg in [
            LossAgg::TokenMean,
            LossAgg::SeqMeanTokenMean,
            LossAgg::SeqSumNorm,
        ] {
            let run = |lp: &[f64], old: &[f64], adv: &[f64], off: &[usize], mask: &[f64]| {
                let tokens = Tokens { offsets: off, mask };
                let logp = Var::from_tensor(&t(lp)).unwrap();
                let out = policy_loss::per_token(
                    kind,
                    logp.as_tensor(),
                    &t(old),
                    &t(adv),
                    &t(&ones(lp.len())),
                    tokens,
                )
                .unwrap();
                let total = aggregate(agg, &out.loss, tokens, 8).unwrap();
                let grad = vals(total.backward().unwrap().get(&logp).unwrap());
                (total.to_scalar::<f64>().unwrap(), grad)
            };
            let (l0, g0) = run(&base, &old, &adv, &[0, 2, 5], &ones(5));
            // A masked token inside the second completion, and a wholly masked third one.
            let lp = [-0.5, -1.2, -0.3, -7.0, -2.0, -0.8, -0.1];
            let o = [-0.6, -1.0, -0.2, -0.01, -2.2, -0.9, -9.0];
            let a = [0.7, 0.7, -1.1, 5.0, -1.1, -1.1, 3.0];
            let mask = [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0];
            let (l1, g1) = run(&lp, &o, &a, &[0, 2, 6, 7], &mask);
            let what = format!("{kind:?} {agg:?}");
            if agg == LossAgg::SeqSumNorm {
                // Its constant counts completions: 2 against 3.
                assert!((l0 * 2.0 / 3.0 - l1).abs() < 1e-12, "{what}: {l0} vs {l1}");
            } else {
                assert!((l0 - l1).abs() < 1e-12, "{what}: {l0} vs {l1}");
                let kept: Vec<f64> = [0, 1, 2, 4, 5].iter().map(|&i| g1[i]).collect();
                assert_close(&kept, &g0, &what);
            }
            assert_eq!((g1[3], g1[6]), (0.0, 0.0), "{what}");
        }
    }
}

/// On-policy distillation's advantage term and reverse-KL estimate against the
/// reference, masked tokens (with garbage μ) untouched.
#[test]
fn distillation_advantage_matches_reference() {
    let g = golden();
    let (tok, d) = (&g["tokens"], &g["distill"]);
    let mut adv = f64s(&tok["advantages"]);
    let kl = tandem_trainer::rl::distill::add_teacher_term(
        &mut adv,
        &f64s(&d["teacher_logp"]),
        &f64s(&tok["behaviour_logp_masked"]),
        &f64s(&tok["mask"]),
        d["coef"].as_f64().unwrap(),
    )
    .unwrap();
    assert_close(&adv, &f64s(&d["advantages"]), "advantages");
    assert_close(&[kl], &[d["reverse_kl"].as_f64().unwrap()], "reverse KL");
}
