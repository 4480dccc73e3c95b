//! A run's life under `tandem run`, with real processes on the tiny model: Ctrl-C
//! (SIGINT) at a random point stops it cleanly and `--resume` continues it; a kill -9
//! of every process (a machine's reboot) is continued by `--resume` too; a folder that
//! holds a run is refused without a flag and nothing in it deleted; `--fresh` starts
//! over; a bad model path fails once, before any process starts; without a terminal,
//! progress is a line every `[run] log_every` steps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::fault_proxy::Rng;
use common::*;
use serde_json::Value;

const STEPS: u64 = 120;

/// The tiny model on one-digit sums: steps of a fraction of a second, every step's
/// batch dumped (`batches/step-N.jsonl`: which prompts it trained).
fn config(dir: &Path, model: &Path) -> PathBuf {
    let text = format!(
        r#"
[run]
steps = {STEPS}
batch_groups = 2
group_size = 4
max_staleness = 1
generators = 2
run_dir = "{run}"
log_every = 5

[model]
path = "{model}"

[data]
kind = "arithmetic"
chat = false
template = "{{question}} ="

[generator]
max_new_tokens = 6
prompts_per_batch = 2

[reward]
math = 1.0
format = 0.5
format_kind = "digits"

[trainer]
dump_batches = true
checkpoint_every = 7

[coordinator]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
"#,
        run = dir.join("run").display(),
        model = model.display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `tandem run ARGS` with stderr piped (no terminal: log lines).
fn start(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("run")
        .args(args)
        .env("TANDEM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (at most five minutes); its status and stderr.
fn finish(mut child: Child) -> (ExitStatus, String) {
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("tandem run did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

/// The steps of `metrics.jsonl`, in order.
fn steps(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

/// Waits until `metrics.jsonl` has at least `n` steps.
fn wait_steps(run: &Path, n: usize, child: &mut Child) {
    let t0 = Instant::now();
    while steps(run).len() < n {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t0.elapsed() < Duration::from_secs(240), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The step of the newest checkpoint.
fn checkpoint_step(run: &Path) -> u64 {
    let name = std::fs::read_to_string(run.join("checkpoints/latest")).unwrap();
    name.trim()["step-".len()..].parse().unwrap()
}

/// The pids of the run's processes (`processes.json`).
fn pids(run: &Path) -> Vec<u32> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("processes.json")).unwrap())
            .unwrap();
    v.as_object()
        .unwrap()
        .values()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn signal(sig: &str, pid: u32) {
    let st = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Every step's batch holds `batch_groups` groups, and no group or prompt is trained
/// twice over the whole run; returns the trained prompts.
fn trained_once(run: &Path) -> BTreeSet<u64> {
    let mut prompts = BTreeSet::new();
    let mut groups = BTreeSet::new();
    for step in 1..=STEPS {
        let path = run.join(format!("batches/step-{step:06}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap();
        let mut in_batch: BTreeMap<String, usize> = BTreeMap::new();
        for l in text.lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            *in_batch
                .entry(v["group"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        assert_eq!(in_batch.len(), 2, "step {step}: {in_batch:?}");
        for (key, n) in in_batch {
            assert_eq!(n, 4, "{key}: completions");
            let prompt: u64 = key[1..key.find('-').unwrap()].parse().unwrap();
            assert!(groups.insert(key.clone()), "{key} trained twice");
            assert!(prompts.insert(prompt), "prompt {prompt} trained twice");
        }
    }
    prompts
}

/// Nothing lost: every prompt the coordinator handed out is trained, still buffered,
/// dropped as stale or waits to be leased again; no lease is left running.
fn nothing_lost(run: &Path, trained: &BTreeSet<u64>) {
    let read = |f: &str| std::fs::read_to_string(run.join(f)).unwrap_or_default();
    let status: Value = serde_json::from_str(&read("coordinator-status.json")).unwrap();
    let summary: Value = serde_json::from_str(&read("trainer-summary.json")).unwrap();
    let prompt = |k: &str| -> u64 { k[1..k.find('-').unwrap()].parse().unwrap() };
    let mut covered = trained.clone();
    covered.extend(
        summary["groups_left_in_buffer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| prompt(k.as_str().unwrap())),
    );
    covered.extend(read("stale-groups.txt").lines().map(prompt));
    covered.extend(
        status["pending_reissue"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap()),
    );
    assert_eq!(status["leases_running"].as_u64(), Some(0), "{status}");
    let cursor = status["prompt_cursor"].as_u64().unwrap();
    let lost: Vec<u64> = (0..cursor).filter(|p| !covered.contains(p)).collect();
    assert!(lost.is_empty(), "prompts lost: {lost:?}; {status}");
}

/// Ctrl-C at a random point (the seed is printed; `TANDEM_LIFECYCLE_SEED` replays it):
/// the trainer checkpoints the step it finished, every process exits, `tandem run`
/// says what it kept and how to continue. Run again without a flag: refused, nothing
/// deleted. `--resume`: continues from that step. Then every process killed with -9
/// (a reboot) and `--resume` again: to the last step. Every step is in `metrics.jsonl`
/// once, no prompt or lease was trained twice, none was lost. `--fresh` starts over.
#[test]
fn ctrl_c_then_resume_and_a_reboot_then_resume_train_each_step_once() {
    let seed = Rng::replayable_seed("TANDEM_LIFECYCLE_SEED", "lifecycle");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let cfg = config(dir.path(), &model);
    let cfg = cfg.to_str().unwrap();
    let run = dir.path().join("run");

    // Ctrl-C once the run has logged a step drawn from the seed.
    let at = rng.between(3, 40) as usize;
    let mut child = start(&[cfg]);
    wait_steps(&run, at, &mut child);
    let pid = child.id();
    let workers = pids(&run);
    signal("-INT", pid);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(130), "{err}");
    let stopped = *steps(&run).last().unwrap();
    assert!(
        stopped >= at as u64 && stopped < STEPS,
        "stopped at {stopped}"
    );
    assert_eq!(
        checkpoint_step(&run),
        stopped,
        "the checkpoint is not of the step the trainer finished"
    );
    assert!(
        err.contains("stopping: the trainer finishes its step")
            && err.contains(&format!("stopped at step {stopped}: "))
            && err.contains(&format!("the checkpoint of step {stopped},"))
            && err.contains(&format!("continue with: tandem run {cfg} --resume")),
        "{err}"
    );
    // Without a terminal: a line every log_every (5) steps, never NaN.
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("step ")).collect();
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("/{STEPS} | reward "))),
        "{err}"
    );
    assert!(!err.contains("NaN"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    let left: Vec<u32> = workers.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left running: {left:?}");

    // Again without a flag: refused, naming both choices; nothing deleted.
    let before = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let o = tandem(&["run", cfg]);
    assert_clean_failure(
        &o,
        &[
            "[run] run_dir",
            "already holds a run",
            &format!("step {stopped} logged"),
            &format!("`tandem run {cfg} --resume`"),
            &format!("`tandem run {cfg} --fresh`"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        before
    );
    assert_eq!(checkpoint_step(&run), stopped);

    // --resume (and --config): on from the stopped step, until a kill -9 of every
    // process, the run's own first so none is told to stop.
    let mut child = start(&["--config", cfg, "--resume"]);
    let more = stopped as usize + rng.between(10, 30) as usize;
    wait_steps(&run, more.min(STEPS as usize - 5), &mut child);
    signal("-STOP", child.id());
    for p in pids(&run) {
        signal("-KILL", p);
    }
    signal("-KILL", child.id());
    let (_, err) = finish(child);
    assert!(err.contains("; resumed"), "{err}");
    // The trainer resumed at the step it stopped at, which the coordinator had
    // published last: no step was done again.
    let coordinator = std::fs::read_to_string(run.join("logs/coordinator.log")).unwrap();
    assert!(
        coordinator.contains(&format!("from={stopped} to={stopped} ")),
        "{coordinator}"
    );

    // --resume after the "reboot": to the last step.
    let (status, err) = finish(start(&[cfg, "--resume"]));
    assert!(status.success(), "{err}");
    assert!(err.contains(&format!("done: {STEPS} steps")), "{err}");
    // Without a terminal, progress lines: the run resumed past step log_every (5), so
    // the first status the supervisor reads gives one; in order, never NaN.
    let logged: Vec<u64> = err
        .lines()
        .filter_map(|l| l.strip_prefix("step ")?.split('/').next()?.parse().ok())
        .collect();
    assert!(
        !logged.is_empty() && logged.is_sorted() && !err.contains("NaN"),
        "{err}"
    );
    assert_eq!(steps(&run), (1..=STEPS).collect::<Vec<_>>());
    let trained = trained_once(&run);
    nothing_lost(&run, &trained);

    // A finished run: --resume has nothing to continue; --fresh starts over.
    assert_clean_failure(
        &tandem(&["run", cfg, "--resume"]),
        &["is finished", "--fresh"],
    );
    let (status, err) = finish(start(&[cfg, "--fresh", "--set", "run.steps=3"]));
    assert!(status.success(), "{err}");
    assert_eq!(steps(&run), [1, 2, 3]);
    assert!(!run.join(format!("batches/step-{:06}.jsonl", 4)).exists());
    assert!(
        !run.join("checkpoints/latest").exists(),
        "the earlier checkpoints stayed"
    );
}

/// A bad model path fails at once, before any process starts (no logs, no restarts),
/// naming the field and the fix; so does a data file that is not there.
#[test]
fn a_bad_model_or_data_path_fails_once_before_any_process_starts() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), Path::new("/nonexistent/model"));
    let run = dir.path().join("run");
    let o = tandem(&["run", "--config", cfg.to_str().unwrap()]);
    assert_clean_failure(
        &o,
        &[
            "[model] path = \"/nonexistent/model\"",
            "no such file or folder",
            "give an HF model folder",
        ],
    );
    assert_eq!(stderr(&o).matches("error").count(), 1, "{}", stderr(&o));
    assert!(!run.join("logs").exists(), "a process was started");
    let o = tandem(&[
        "run",
        cfg.to_str().unwrap(),
        "--set",
        "model.path=preset:tiny",
        "--set",
        "data.kind=jsonl",
        "--set",
        "data.path=/nonexistent/prompts.jsonl",
    ]);
    assert_clean_failure(&o, &["[data] path", "/nonexistent/prompts.jsonl"]);
    assert!(!run.join("logs").exists(), "a process was started");
    // The config key is checked too.
    let o = tandem(&["run", cfg.to_str().unwrap(), "--set", "run.log_every=0"]);
    assert_clean_failure(&o, &["[run] log_every", "≥ 1"]);
}

/// A `[lora]` run on the tiny model, on-policy (max_staleness 0, so the trainer's
/// π_prox is the very version each token was sampled from): every version is the
/// adapter's bytes alone; killed with -9 midway and resumed, the new generators sample
/// from the resumed version's adapter, never an older one: the sampler's and the
/// trainer's numbers agree on every trained token of every step (mismatch KL at
/// rounding level, where a stale adapter would show the adapter's whole effect, which
/// is measured too); `final/` is the adapter in PEFT's format.
#[test]
fn a_lora_run_sends_adapters_alone_and_resumes_after_kill_9_with_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let cfg = config(dir.path(), &model);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace(&format!("steps = {STEPS}"), "steps = 24")
        .replace("max_staleness = 1", "max_staleness = 0")
        + "\n[optimizer]\nlr = 0.02\n\n[lora]\nrank = 4\nalpha = 16.0\n";
    std::fs::write(&cfg, text).unwrap();
    let cfg = cfg.to_str().unwrap();
    let run = dir.path().join("run");
    let mut child = start(&[cfg]);
    wait_steps(&run, 9, &mut child);
    signal("-STOP", child.id());
    for p in pids(&run) {
        signal("-KILL", p);
    }
    signal("-KILL", child.id());
    let _ = finish(child);
    let (status, err) = finish(start(&[cfg, "--resume"]));
    assert!(status.success(), "{err}");
    assert_eq!(steps(&run), (1..=24).collect::<Vec<_>>());
    // The adapter's bytes: A (4, in) and B (out, 4) of every projection of both layers.
    let p = tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu).unwrap();
    let c = p.model.config();
    let (d, f, q, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let per_layer = 4 * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d));
    let adapter_bytes = (per_layer * c.num_hidden_layers * 4) as u64;
    let full_bytes = (p.model.params().numel() * 4) as u64;
    let lines: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut worst = 0f64;
    for l in &lines {
        assert_eq!(l["version_bytes"].as_u64(), Some(adapter_bytes), "{l}");
        worst = worst.max(l["mismatch_kl"].as_f64().unwrap());
    }
    assert!(
        adapter_bytes * 10 < full_bytes,
        "{adapter_bytes} vs {full_bytes}"
    );
    // What a stale adapter would show: the trained adapter's effect on the logprobs.
    let fin = run.join("final");
    assert!(fin.join("adapter_config.json").exists() && !fin.join("model.safetensors").exists());
    let merged = dir.path().join("merged");
    ok(tandem(&[
        "model",
        "merge",
        "--base",
        model.to_str().unwrap(),
        "--adapter",
        fin.to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]));
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt_ids\": [1, 30, 31, 32], \"completion_ids\": [33, 34, 35, 36, 37, 38]}\n",
    )
    .unwrap();
    let score = |m: &Path| -> Vec<f64> {
        let out = dir.path().join("scored.jsonl");
        ok(tandem(&[
            "score",
            "--model",
            m.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]));
        let v: Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
        v["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let (base, trained) = (score(&model), score(&merged));
    let effect = base
        .iter()
        .zip(&trained)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("adapter {adapter_bytes} B, model {full_bytes} B; adapter effect {effect:.3}, worst mismatch KL {worst:.1e}");
    assert!(
        effect > 0.02,
        "the adapter barely moved the policy: {effect}"
    );
    assert!(
        worst < 1e-5,
        "sampler and trainer disagree (mismatch KL {worst}): a stale adapter?"
    );
}
