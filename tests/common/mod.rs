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

/// The `tandem_…` metric names a PromQL text (dashboard queries, alert rules) refers
/// to, as exported families: histogram series (`_bucket`, `_sum`, `_count`) count as
/// their histogram; recording-rule names (`tandem:…`) are not metrics.
pub fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = std::collections::BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("tandem_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            let name = &text[start..end];
            if !name.contains(':') {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                out.insert(family.to_string());
            }
        }
        i = end.max(start + 1);
    }
    out
}
