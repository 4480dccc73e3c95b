//! Each benchmark's reference protocol, without torch: `tandem bench model`, `generate`
//! and `train-step` run on the tiny model with `--reference` a stub
//! (tests/fixtures/bench_reference_stub.py) that parses the same arguments, reads the
//! same input files and writes its result through the same module
//! (tools/bench_protocol.py) as the real scripts (tools/bench_transformers.py,
//! bench_generate.py, bench_train_step.py), which are checked to write only through it.
//! A change of format on either side fails here: arguments the script does not take,
//! inputs it cannot read, a result the benchmark cannot read or that lacks a field its
//! table needs. Needs only `python3` (the standard library).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{init_tiny, stderr};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn stub() -> PathBuf {
    root().join("tests/fixtures/bench_reference_stub.py")
}

/// `tandem bench ARGS --reference STUB --python python3 --json DIR/bench.json`, the stub
/// logging to DIR/stub.json (and broken as `broken` says, if set).
fn bench(dir: &Path, args: &[&str], broken: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
    cmd.arg("bench")
        .args(args)
        .arg("--reference")
        .arg(stub())
        .args(["--python", "python3", "--json"])
        .arg(dir.join("bench.json"))
        .env("TANDEM_LOG", "warn")
        .env("BENCH_STUB_LOG", dir.join("stub.json"))
        .env_remove("BENCH_STUB_BREAK");
    if let Some(b) = broken {
        cmd.env("BENCH_STUB_BREAK", b);
    }
    cmd.output().expect("run tandem bench")
}

fn read_json(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a benchmark against the stub; asserts that it succeeded, that the stub got
/// `expect_args` (flag, value) and that the benchmark's JSON carries the stub's result
/// as it was written. Returns (the benchmark's JSON, the stub's result, stdout).
fn run_against_stub(
    dir: &Path,
    args: &[&str],
    kind: &str,
    expect_args: &[(&str, &str)],
) -> (Value, Value, String) {
    let o = bench(dir, args, None);
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}\n{stdout}", stderr(&o));
    let log = read_json(&dir.join("stub.json"));
    assert_eq!(log["kind"], kind, "{log}");
    let argv: Vec<&str> = log["argv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for (flag, value) in expect_args {
        let at = argv
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the script was not given {flag}: {argv:?}"));
        assert_eq!(argv.get(at + 1), Some(value), "{flag}: {argv:?}");
    }
    let out = read_json(&dir.join("bench.json"));
    assert_eq!(
        out["reference"], log["result"],
        "the benchmark's JSON keeps the reference's result as printed"
    );
    (out, log["result"].clone(), stdout)
}

/// The table row that starts with `| {name} |`, split into its cells.
fn row<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row `{name}` in:\n{table}"));
    line.trim_matches('|').split('|').map(str::trim).collect()
}

#[test]
fn bench_model_reads_its_reference_through_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let m = model.to_str().unwrap();
    let args = [
        "model",
        "--model",
        m,
        "--new-tokens",
        "2",
        "--decode-batches",
        "1,2",
        "--train-batch",
        "1",
        "--train-len",
        "8",
        "--reps",
        "1",
        "--threads",
        "1",
    ];
    let expect = [
        ("--gguf", m),
        ("--threads", "1"),
        ("--new-tokens", "2"),
        ("--decode-batches", "1,2"),
        ("--train-batch", "1"),
        ("--train-len", "8"),
        ("--reps", "1"),
    ];
    let (out, reference, table) = run_against_stub(dir.path(), &args, "model", &expect);
    let phases = |v: &Value| -> BTreeSet<String> {
        v["phases"].as_object().unwrap().keys().cloned().collect()
    };
    let want: BTreeSet<String> = ["decode_b1", "decode_b2", "fwd_bwd", "optimizer_step"]
        .map(String::from)
        .into();
    assert_eq!(phases(&out["tandem"]), want);
    assert_eq!(phases(&reference), want);
    // Each phase's row sets the reference's seconds and tokens/s beside Tandem's.
    for ph in &want {
        let cells = row(&table, ph);
        let r = &reference["phases"][ph];
        assert_eq!(
            cells[2],
            format!("{:.3}", r["seconds"].as_f64().unwrap()),
            "{ph}: {table}"
        );
        if let Some(t) = r["tokens_per_s"].as_f64() {
            assert_eq!(cells[4], format!("{t:.1}"), "{ph}: {table}");
        }
        assert!(cells[5].ends_with('×'), "{ph}: no speed-up in {table}");
    }
}

#[test]
fn bench_generate_reads_its_reference_through_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let m = model.to_str().unwrap();
    let args = [
        "generate",
        "--model",
        m,
        "--prompts",
        "1",
        "--samples",
        "2",
        "--prompt-tokens",
        "16",
        "--max-new-tokens",
        "4",
        "--max-running",
        "2",
        "--concurrency",
        "1",
        "--ablations=",
        "--gemm-size",
        "32",
        "--threads",
        "1",
    ];
    let expect = [("--gguf", m), ("--prompts", "1"), ("--threads", "1")];
    let (_, reference, table) = run_against_stub(dir.path(), &args, "generate", &expect);
    // The stub generated every token of the first prompt's 2 samples.
    assert_eq!(reference["sequences"], 2);
    assert_eq!(reference["tokens"], 2 * 4);
    let cells = row(&table, "transformers generate");
    assert_eq!(
        cells[3],
        format!("{:.1}", reference["tok_per_s"].as_f64().unwrap()),
        "{table}"
    );
    // Tandem's row is set against the reference's tok/s.
    let tandem = row(&table, "tandem");
    assert!(tandem[5].parse::<f64>().is_ok(), "× reference: {table}");
}

#[test]
fn bench_train_step_reads_its_reference_through_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let m = model.to_str().unwrap();
    let (out, reference, table) = run_against_stub(
        dir.path(),
        &train_step_args(m),
        "train-step",
        &[
            ("--gguf", m),
            ("--threads", "1"),
            ("--reps", "1"),
            ("--warmup", "0"),
            ("--microbatch", "2"),
        ],
    );
    // The stub read the batch the benchmark wrote: 2 prompts × 2 completions, padded
    // per micro-batch of 2 as TRL pads, counted from the batch's own lengths.
    assert!(
        reference["tokens"].as_u64().unwrap() >= 4 * (8 + 2),
        "{reference}"
    );
    assert_eq!(out["reference"]["tokens"], reference["tokens"]);
    let cells = row(&table, "reference (PyTorch, TRL-style)");
    assert_eq!(cells[2], reference["tokens"].to_string(), "{table}");
    let tandem = row(&table, "tandem default");
    assert!(tandem[4].ends_with('×'), "reference / variant: {table}");
}

/// With `--preset NAME` the script is given `--config DIR` (no `--gguf`), DIR holding
/// the preset's config.json exactly as `tandem model init` writes it, and Tandem's side
/// measures `preset:NAME`: both sides build the same shape. Checked for both benchmarks
/// that take a preset, on a Qwen3 and a Gemma 3 shape.
#[test]
fn a_preset_gives_both_sides_the_same_shape() {
    let cases: [(&str, &str, Vec<&str>); 2] = [
        (
            "model",
            "tiny-qwen3",
            vec![
                "--new-tokens",
                "2",
                "--decode-batches",
                "1",
                "--train-batch",
                "1",
                "--train-len",
                "8",
                "--reps",
                "1",
                "--threads",
                "1",
            ],
        ),
        (
            "generate",
            "tiny-gemma3",
            vec![
                "--prompts",
                "1",
                "--samples",
                "2",
                "--prompt-tokens",
                "16",
                "--max-new-tokens",
                "4",
                "--max-running",
                "2",
                "--concurrency",
                "1",
                "--ablations=",
                "--gemm-size",
                "32",
                "--threads",
                "1",
            ],
        ),
    ];
    for (kind, preset, rest) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![kind, "--preset", preset];
        args.extend(rest);
        let (out, _, _) = run_against_stub(dir.path(), &args, kind, &[("--threads", "1")]);
        assert_eq!(out["model"], format!("preset:{preset}"), "{kind}");
        let log = read_json(&dir.path().join("stub.json"));
        let argv = log["argv"].to_string();
        assert!(
            argv.contains("\"--config\"") && !argv.contains("--gguf"),
            "{kind}: {argv}"
        );
        assert_eq!(log["source"]["kind"], "config", "{kind}: {log}");
        let want = tandem_model::preset::preset_config(preset)
            .unwrap()
            .to_hf_json();
        assert_eq!(
            log["source"]["config"], want,
            "{kind}: the script's config.json"
        );
        if kind == "model" {
            assert!(
                out["tandem"]["phases"]["fwd_bwd"]["tokens_per_s"].is_number(),
                "{out}"
            );
        } else {
            assert!(out["tandem"]["tok_per_s"].is_number(), "{out}");
            assert_eq!(out["parameters"], want_params(preset), "{out}");
        }
    }
}

fn want_params(preset: &str) -> u64 {
    tandem_model::preset::preset_config(preset)
        .unwrap()
        .num_parameters() as u64
}

/// A preset the benchmark does not know is refused naming the flag and the known ones,
/// before anything runs; --preset and --model together are refused.
#[test]
fn a_bad_preset_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for kind in ["model", "generate"] {
        let o = bench(dir.path(), &[kind, "--preset", "qwen9"], None);
        let err = stderr(&o);
        assert!(!o.status.success(), "{kind}: accepted");
        assert!(!err.contains("panicked"), "{kind}: {err}");
        assert!(
            err.contains("--preset") && err.contains("qwen9") && err.contains("qwen3-0.6b"),
            "{kind}: {err}"
        );
        let o = bench(
            dir.path(),
            &[kind, "--preset", "tiny", "--model", "x"],
            None,
        );
        assert!(
            !o.status.success(),
            "{kind}: --preset with --model accepted"
        );
        assert!(stderr(&o).contains("--model"), "{kind}: {}", stderr(&o));
    }
}

fn train_step_args(model: &str) -> Vec<&str> {
    vec![
        "train-step",
        "--model",
        model,
        "--prompts",
        "2",
        "--group-size",
        "2",
        "--prompt-tokens",
        "8",
        "--min-completion",
        "2",
        "--max-completion",
        "6",
        "--variants",
        "default",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--reference-microbatch",
        "2",
        "--threads",
        "1",
    ]
}

/// A reference result out of protocol stops the benchmark with an error that names
/// the protocol or the missing field (a pretty-printed result was the regression of
/// `tandem bench model --reference tools/bench_transformers.py`).
#[test]
fn a_reference_result_out_of_protocol_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let args = train_step_args(model.to_str().unwrap());
    for (broken, needles) in [
        (
            "pretty",
            &["not one JSON object on one line", "tools/bench_protocol.py"][..],
        ),
        (
            "drop:grad_norm",
            &["missing field `grad_norm`", "tools/bench_protocol.py"][..],
        ),
    ] {
        let o = bench(dir.path(), &args, Some(broken));
        let err = stderr(&o);
        assert!(!o.status.success(), "{broken}: the benchmark accepted it");
        assert!(!err.contains("panicked"), "{broken}: {err}");
        for n in needles {
            assert!(
                err.contains(n),
                "{broken}: the error should name `{n}`: {err}"
            );
        }
    }
}

/// The real reference scripts parse their arguments and write their results only
/// through tools/bench_protocol.py (so the stub above speaks for them): no parser of
/// their own, no JSON written by hand, nothing printed to stdout but `protocol.emit`.
#[test]
fn the_reference_scripts_write_only_through_the_protocol() {
    let check = r#"
import ast, sys
for path in sys.argv[1:]:
    tree = ast.parse(open(path).read(), path)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "bench_protocol" in imported, f"{path}: does not import bench_protocol"
    called = []
    for c in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = ast.unparse(c.func)
        called.append(name)
        if name == "print":
            assert any(k.arg == "file" for k in c.keywords), f"{path}:{c.lineno}: print to stdout"
        assert name not in ("argparse.ArgumentParser", "json.dump", "json.dumps", "sys.stdout.write"), f"{path}:{c.lineno}: {name}"
    assert "protocol.emit" in called, f"{path}: never calls protocol.emit"
    if not path.endswith("bench_train_step.py"):
        # The model comes from the protocol (a file, or a preset's --config), never loaded by hand.
        assert "protocol.load_model" in called, f"{path}: does not build its model with protocol.load_model"
        assert not any(n.endswith(".from_pretrained") or n.endswith(".from_config") for n in called), f"{path}: loads a model itself"
    assert any(n.endswith("_parser") and n.startswith("protocol.") for n in called), f"{path}: no protocol parser"
print("checked", len(sys.argv) - 1)
"#;
    let scripts = [
        "bench_transformers.py",
        "bench_generate.py",
        "bench_train_step.py",
    ];
    let o = Command::new("python3")
        .arg("-c")
        .arg(check)
        .args(scripts.iter().map(|s| root().join("tools").join(s)))
        .output()
        .expect("run python3");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "checked 3");
}
