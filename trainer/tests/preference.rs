//! The preference losses against tools/preference_reference.py (PyTorch, float64):
//! values and gradients within 1e-9.

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use tandem_trainer::offline::preference::{self, DirectLoss};

fn fixture() -> Value {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/preference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn var(v: &Value) -> Var {
    let x: Vec<f64> = serde_json::from_value(v.clone()).unwrap();
    Var::from_vec(x.clone(), x.len(), &Device::Cpu).unwrap()
}

fn close(got: &Tensor, want: &Value, what: &str) {
    let got: Vec<f64> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f64> = match want {
        Value::Array(a) if a.first().is_some_and(Value::is_array) => a
            .iter()
            .flat_map(|r| serde_json::from_value::<Vec<f64>>(r.clone()).unwrap())
            .collect(),
        v => serde_json::from_value(v.clone()).unwrap(),
    };
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-9, "{what}: {g} vs {w}");
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

#[test]
fn bradley_terry_with_and_without_margin() {
    let f = fixture();
    for (case, with_margin) in [("bradley_terry", false), ("bradley_terry_margin", true)] {
        let c = &f[case];
        let (w, l) = (var(&c["r_w"]), var(&c["r_l"]));
        let m = with_margin.then(|| var(&c["margin"]).as_tensor().clone());
        let loss = preference::bradley_terry(w.as_tensor(), l.as_tensor(), m.as_ref()).unwrap();
        assert!(
            (scalar(&loss) - c["loss"].as_f64().unwrap()).abs() < 1e-9,
            "{case}"
        );
        let g = loss.backward().unwrap();
        close(g.get(w.as_tensor()).unwrap(), &c["grads"][0], case);
        close(g.get(l.as_tensor()).unwrap(), &c["grads"][1], case);
    }
}

#[test]
fn plackett_luce_ranks() {
    let f = fixture();
    let c = &f["plackett_luce"];
    let rows: Vec<Vec<f64>> = serde_json::from_value(c["r"].clone()).unwrap();
    let (b, k) = (rows.len(), rows[0].len());
    let r = Var::from_vec(rows.concat(), (b, k), &Device::Cpu).unwrap();
    let loss = preference::plackett_luce(r.as_tensor()).unwrap();
    assert!((scalar(&loss) - c["loss"].as_f64().unwrap()).abs() < 1e-9);
    let g = loss.backward().unwrap();
    close(
        g.get(r.as_tensor()).unwrap(),
        &c["grads"][0],
        "plackett_luce",
    );
    // With two responses it is Bradley–Terry.
    let two = r.as_tensor().narrow(1, 0, 2).unwrap();
    let bt = preference::bradley_terry(
        &two.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
        &two.narrow(1, 1, 1).unwrap().squeeze(1).unwrap(),
        None,
    )
    .unwrap();
    let pl2 = preference::plackett_luce(&two).unwrap();
    assert!((scalar(&bt) - scalar(&pl2)).abs() < 1e-12);
    let e = preference::plackett_luce(&r.as_tensor().narrow(1, 0, 1).unwrap()).unwrap_err();
    assert!(e.to_string().contains("at least 2 ranked responses"), "{e}");
}

#[test]
fn dpo_and_ipo() {
    let f = fixture();
    for (case, kind) in [("dpo", DirectLoss::Dpo), ("ipo", DirectLoss::Ipo)] {
        let c = &f[case];
        let (pw, pl) = (var(&c["pi_w"]), var(&c["pi_l"]));
        let (rw, rl) = (var(&c["ref_w"]), var(&c["ref_l"]));
        let beta = c["beta"].as_f64().unwrap();
        let (loss, chosen, rejected) = preference::direct(
            kind,
            beta,
            pw.as_tensor(),
            pl.as_tensor(),
            rw.as_tensor(),
            rl.as_tensor(),
        )
        .unwrap();
        assert!(
            (scalar(&loss) - c["loss"].as_f64().unwrap()).abs() < 1e-9,
            "{case}"
        );
        let g = loss.backward().unwrap();
        close(g.get(pw.as_tensor()).unwrap(), &c["grads"][0], case);
        close(g.get(pl.as_tensor()).unwrap(), &c["grads"][1], case);
        // The implicit rewards are β(log π − log π_ref).
        let want = ((pw.as_tensor() - rw.as_tensor()).unwrap() * beta).unwrap();
        let d: f64 = (chosen - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-12);
        assert_eq!(rejected.dims(), [5]);
    }
    let x = Tensor::zeros(2, candle_core::DType::F64, &Device::Cpu).unwrap();
    let e = preference::direct(DirectLoss::Dpo, 0.0, &x, &x, &x, &x).unwrap_err();
    assert!(e.to_string().contains("beta must be positive"), "{e}");
}
