//! The Python SDK (`python/`, `tandem_sdk`), built from this checkout
//! (tests/common/python_sdk.rs): its own unit tests (python/tests: the token check,
//! huge and malformed requests, user functions that raise, hang or return NaN, the
//! command lines, the example environment), and a `tandem run` of the tiny model whose
//! reward comes from an SDK reward service, its held-out evaluation included. The
//! reasoning-gym extra (heavy dependencies: sympy, matplotlib, …) has tests of its own,
//! `reasoning_gym_*`. Needs the test Python (`$TANDEM_TEST_PYTHON`, scripts/test.sh);
//! without it the tests fail, or with TANDEM_SKIP_MISSING_TOOLS=1 are reported as
//! ignored.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::python_sdk::{build, repo, Sdk};
use common::*;
use serde_json::Value;

const TOKEN: &str = "sdk-reward-token-0123456789";

/// `python -m unittest discover` of `dir` (a folder of python/) on the built SDK; fails
/// unless every test ran and passed, none skipped, and at least `at_least` ran.
fn unittests(sdk: &Sdk, dir: &str, at_least: usize) {
    let out = sdk
        .command()
        .args(["-m", "unittest", "discover", "-v", "-s", dir])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{dir}:\n{err}");
    let ran: usize = err
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no `Ran N tests` line:\n{err}"));
    assert!(
        ran >= at_least,
        "{dir}: ran {ran} tests, expected ≥ {at_least}:\n{err}"
    );
    assert!(
        !err.contains("skipped"),
        "{dir}: a test was skipped:\n{err}"
    );
    eprintln!("{dir}: {ran} tests passed");
}

#[test]
#[cfg_attr(
    missing_python_sdk,
    ignore = "no Python with grpcio, grpcio-tools and setuptools (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn the_sdks_unit_tests_pass() {
    let sdk = build(&require_program(Tool::PythonSdk));
    unittests(sdk, "python/tests", 45);
}

/// A running SDK service; killed on drop.
struct Service {
    child: Child,
    addr: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// `python -m MODULE ARGS… --port 0`, its address read from `listening on ADDR`.
    fn start(sdk: &Sdk, module: &str, args: &[&str]) -> Service {
        let mut child = sdk
            .command()
            .args(["-m", module])
            .args(args)
            .args(["--port", "0"])
            .env("TANDEM_REWARD_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("{module} said {line:?}"))
            .to_string();
        Service { child, addr }
    }

    /// SIGTERM, then its exit status within 20 s.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "the service did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The completions the trainer dumped for step `step` (`[trainer] dump_batches`).
fn dumped_batch(run: &Path, step: u64) -> Vec<Value> {
    std::fs::read_to_string(run.join(format!("batches/step-{step:06}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A `tandem run` of the tiny model whose only reward is an SDK reward service's
/// (`python -m tandem_sdk.serve_reward FILE:score`): every trained reward is the
/// function's value for the completion's text, the function's exception on its first
/// call reached the generator as an error with its message (retried, never a 0), the
/// held-out evaluation is scored by the same service, and the service stops cleanly on
/// SIGTERM.
#[test]
#[cfg_attr(
    missing_python_sdk,
    ignore = "no Python with grpcio, grpcio-tools and setuptools (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn a_run_trains_on_an_sdk_reward_service() {
    let sdk = build(&require_program(Tool::PythonSdk));
    let dir = tempfile::tempdir().unwrap();
    let scorer = dir.path().join("lengths.py");
    std::fs::write(
        &scorer,
        r#"
calls = 0

def score(completion: str, answer: str, info: dict) -> float:
    global calls
    calls += 1
    if calls == 1:
        raise RuntimeError("the first call of lengths.score fails")
    return len(completion) / 100
"#,
    )
    .unwrap();
    let target = format!("{}:score", scorer.display());
    let mut service = Service::start(sdk, "tandem_sdk.serve_reward", &[&target]);

    let model = init_tiny(dir.path());
    let run = dir.path().join("run");
    let steps = 3;
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
steps = {steps}
batch_groups = 2
group_size = 4
max_staleness = 1
generators = 1
run_dir = "{run}"

[model]
path = "{model}"

[data]
kind = "arithmetic"
chat = false
template = "{{question}} ="

[generator]
temperature = 1.0
max_new_tokens = 16
prompts_per_batch = 2

[reward]
math = 0.0
format = 0.0
service = "{addr}"
service_token = "{TOKEN}"

[algorithm]
temperature = 1.0

[trainer]
dump_batches = true

[eval]
every = {steps}
prompts = 4
samples = 2
max_new_tokens = 16
"#,
            run = run.display(),
            model = model.display(),
            addr = service.addr,
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap()])
        .env("TANDEM_LOG", "warn")
        .env_remove("TANDEM_REWARD_TOKEN")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every trained reward is the function's value of the completion's text (decoded
    // as the generator decodes it: special tokens dropped).
    let tok = tandem_model::Tokenizer::from_hf_dir(&model).unwrap();
    let mut checked = 0;
    for step in 1..=steps {
        for r in dumped_batch(&run, step) {
            let ids: Vec<u32> = r["completion_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let text = tok.decode(&ids, true).unwrap();
            let reward = r["reward"].as_f64().unwrap();
            let expected = text.chars().count() as f64 / 100.0;
            assert!(
                (reward - expected).abs() < 1e-9,
                "reward {reward} for {text:?}, the function gives {expected}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, steps * 2 * 4);
    // The first call failed with the function's exception, named in the log of the
    // process that made it (a generator, or the trainer's first evaluation).
    let mut log = String::new();
    for entry in std::fs::read_dir(run.join("logs")).unwrap() {
        log += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    assert!(
        log.contains("the first call of lengths.score fails") && log.contains("RuntimeError"),
        "{log}"
    );
    // The held-out evaluation (before the first step and after the last) was scored by
    // the service: [reward] math and format are 0, so only its scores count.
    let evals: Vec<Value> = std::fs::read_to_string(run.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(evals.len(), 2, "{evals:?}");
    for e in &evals {
        let acc = e["eval_accuracy"].as_f64().unwrap();
        assert!(acc > 0.0 && acc.is_finite(), "{e}");
    }
    assert!(service.terminate().success());
}

/// The reasoning-gym extra's unit tests (python/tests_reasoning_gym): `export` writes
/// records with prompt, answer and JSON info, deterministic per seed; `serve` scores
/// with the task's own `score_answer` over the SDK's Reward service, the metadata from
/// the request's info or the exported records.
#[test]
#[cfg_attr(
    missing_python_reasoning_gym,
    ignore = "no Python with reasoning-gym (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn reasoning_gym_export_and_serve() {
    let sdk = build(&require_program(Tool::PythonReasoningGym));
    unittests(sdk, "python/tests_reasoning_gym", 8);
}

/// The reasoning-gym example's data files are what the commands in its header write:
/// each `python -m tandem_sdk.reasoning_gym export …` line of
/// examples/smollm2-reasoning-gym.toml run again gives the committed file byte for byte.
#[test]
#[cfg_attr(
    missing_python_reasoning_gym,
    ignore = "no Python with reasoning-gym (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn reasoning_gym_example_data_is_what_export_writes() {
    let sdk = build(&require_program(Tool::PythonReasoningGym));
    let example =
        std::fs::read_to_string(repo().join("examples/smollm2-reasoning-gym.toml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut exports = 0;
    for line in example.lines() {
        let Some(cmd) = line
            .trim_start_matches('#')
            .trim()
            .strip_prefix("python -m tandem_sdk.reasoning_gym export ")
        else {
            continue;
        };
        let mut args = shell_words(cmd);
        let committed = repo().join(args.pop().unwrap());
        let fresh = dir.path().join(format!("export-{exports}.jsonl"));
        let out = sdk
            .command()
            .args(["-m", "tandem_sdk.reasoning_gym", "export"])
            .args(&args)
            .arg(&fresh)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&fresh).unwrap() == std::fs::read(&committed).unwrap(),
            "{} differs from what `{cmd}` writes now",
            committed.display()
        );
        exports += 1;
    }
    assert_eq!(
        exports, 2,
        "the example's header names a train and an eval export"
    );
}

/// `line` split as a shell splits words: at spaces, a "double-quoted" span one word.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quoted, mut any) = (Vec::new(), String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => (quoted, any) = (!quoted, true),
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quotes in {line:?}");
    if any {
        words.push(word);
    }
    words
}
