//! Running the `tandem` binary from integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_LOG", "warn")
        .output()
        .expect("run tandem")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success, showing stderr otherwise.
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// Fails with a message that contains every `needle`, without a panic.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panicked instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

/// `tandem model init --preset tiny --seed 0` into `dir/tiny`.
pub fn init_tiny(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    ok(tandem(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]));
    out
}

/// `tandem train-step` with these paths (not asserted: callers check success or failure).
pub fn train_step(model: &Path, rollouts: &Path, config: &Path, out: &Path) -> Output {
    tandem(&[
        "train-step",
        "--model",
        model.to_str().unwrap(),
        "--rollouts",
        rollouts.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}
