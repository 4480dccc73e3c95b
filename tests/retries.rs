//! Failures are retried, never zeroed (ARCHITECTURE.md): `tandem run`s of the tiny model
//! whose episodes fail through no doing of the model. A failed group runs again with
//! new episodes (an agent program that fails once; an Environment service whose
//! `Reset` or `Step` fails), its lease is given back after `[env] max_retries` (an agent
//! that always fails on one prompt), it is never trained on a made-up reward, and it is
//! counted in `metrics.jsonl` and at `/metrics`; a run whose groups all fail stops,
//! naming the failure, instead of restarting its generator. (The reward service's
//! failures: tests/distributed.rs.) The agent tests need a Python with httpx
//! (`$TANDEM_TEST_PYTHON`, as tests/environment.rs).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const ENV_TOKEN: &str = "environment-token-retries-0123";

/// Steps of every run here, and groups per step.
const STEPS: u64 = 2;
const BATCH_GROUPS: u64 = 2;

/// A run config for the tiny model in `dir` (the run folder `dir/run`): 2 steps of 2
/// groups of 2, every `[reward]` weight 0 (the environment's or agent's reward alone),
/// with `sets` applied; returns the config's path.
fn config(dir: &Path, model: &Path, sets: &[&str]) -> PathBuf {
    let text = format!(
        r#"
[run]
steps = {STEPS}
batch_groups = {BATCH_GROUPS}
group_size = 2
max_staleness = 1
generators = 1
run_dir = "{run}"
seed = 1

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

[algorithm]
temperature = 1.0

[trainer]
dump_batches = true

[coordinator]
heartbeat_interval_ms = 100
"#,
        run = dir.join("run").display(),
        model = model.display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, with_set(&text, sets)).unwrap();
    path
}

/// How a `tandem run` ended: its exit status, its stderr, and the last scrape of the
/// coordinator's `/metrics` taken while it ran (its counters only grow).
struct Ran {
    status: ExitStatus,
    stderr: String,
    metrics: String,
}

impl Ran {
    /// The value of the `/metrics` series `series` (name and labels as exported), 0
    /// when absent.
    fn counter(&self, series: &str) -> f64 {
        self.metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

/// Runs `tandem run CONFIG` to its end (at most 4 minutes), scraping `/metrics` every
/// 100 ms meanwhile.
fn run(cfg: &Path) -> Ran {
    let dir = cfg.parent().unwrap();
    let run = dir.join("run");
    let err = dir.join("run.stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap()])
        .env("TANDEM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut metrics = String::new();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            panic!("tandem run did not end in 4 minutes: {}", log_tails(&run));
        }
        if let Some(m) = scrape(&run) {
            metrics = m;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ran {
        status,
        stderr: std::fs::read_to_string(err).unwrap(),
        metrics,
    }
}

/// The coordinator's `/metrics` (its address from `RUN_DIR/coordinator.json`), when it
/// answers.
fn scrape(run: &Path) -> Option<String> {
    let text = std::fs::read_to_string(run.join("coordinator.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let addr = v["http"].as_str()?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The last lines of every log of the run (for a failure's message).
fn log_tails(run: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(run.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out += &format!(
            "--- {}\n{}\n",
            e.path().display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    out
}

/// Every trained completion (`[trainer] dump_batches`), one JSON object each.
fn trained(run: &Path) -> Vec<Value> {
    let mut rows = Vec::new();
    for step in 1..=STEPS {
        let text =
            std::fs::read_to_string(run.join(format!("batches/step-{step:06}.jsonl"))).unwrap();
        rows.extend(
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()),
        );
    }
    rows
}

/// Sums of `metrics.jsonl`'s `episodes_failed` and `groups_retried` over the run's
/// steps (checking there are `STEPS` lines).
fn failures_trained(run: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, STEPS, "{text}");
    let sum = |k: &str| lines.iter().map(|l| l[k].as_u64().unwrap()).sum();
    (sum("episodes_failed"), sum("groups_retried"))
}

/// Asserts the run succeeded, showing its logs otherwise.
fn succeeded(ran: &Ran, run: &Path) {
    assert!(ran.status.success(), "{}\n{}", ran.stderr, log_tails(run));
}

/// Every trained completion carries the reward the agent or the environment gave
/// (1 here): a failed episode scored 0 would show.
fn every_reward_is_one(rows: &[Value]) {
    assert_eq!(rows.len() as u64, STEPS * BATCH_GROUPS * 2);
    for r in rows {
        assert_eq!(r["reward"].as_f64(), Some(1.0), "{r}");
    }
}

/// `[env] agent` running `tests/fixtures/flaky_agent.py MODE MARKERS` on the chat
/// template, with `extra` sets.
fn agent_sets(python: &Path, mode: &str, markers: &Path, extra: &[&str]) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flaky_agent.py");
    let mut sets = vec![
        "data.chat=true".to_string(),
        "data.template=\"What is {question}?\"".to_string(),
        format!(
            "env.agent=[{:?}, {:?}, {mode:?}, {:?}]",
            python.display().to_string(),
            script.display().to_string(),
            markers.display().to_string()
        ),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

/// An agent whose first run of each group fails after its turn (sample 0 exits 3): the
/// group runs again with new agents and is trained with the rewards they report; each
/// trained group counts one re-run and one failed episode, in metrics.jsonl and at
/// /metrics.
#[test]
#[cfg_attr(
    missing_python_httpx,
    ignore = "no Python with httpx (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn an_agent_that_fails_once_is_run_again_and_trained_with_its_rewards() {
    let python = require_program(Tool::PythonHttpx);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let markers = dir.path().join("markers");
    std::fs::create_dir(&markers).unwrap();
    let sets = agent_sets(&python, "once", &markers, &[]);
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let cfg = config(dir.path(), &model, &sets);
    let ran = run(&cfg);
    let run_dir = dir.path().join("run");
    succeeded(&ran, &run_dir);
    every_reward_is_one(&trained(&run_dir));
    // Every trained group's first run failed on one episode.
    let groups = STEPS * BATCH_GROUPS;
    assert_eq!(failures_trained(&run_dir), (groups, groups));
    assert!(std::fs::read_dir(&markers).unwrap().count() as u64 >= groups);
    assert!(
        ran.counter("tandem_groups_retried_total") >= 1.0
            && ran.counter("tandem_episodes_failed_total") >= 1.0,
        "{}",
        ran.metrics
    );
    assert_eq!(
        ran.counter("tandem_groups_failed_total{reason=\"agent\"}"),
        0.0,
        "{}",
        ran.metrics
    );
}

/// An agent that always fails on prompt 0 (after its turn): that group runs again once
/// (`[env] max_retries = 1`), then its lease is given back, again and again; prompt 0
/// is never trained, every trained group carries the agents' rewards, the run
/// finishes, and the failures are counted at /metrics (not in metrics.jsonl: no trained
/// group failed).
#[test]
#[cfg_attr(
    missing_python_httpx,
    ignore = "no Python with httpx (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn an_agent_that_always_fails_is_given_back_and_never_trained() {
    let python = require_program(Tool::PythonHttpx);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let markers = dir.path().join("markers");
    std::fs::create_dir(&markers).unwrap();
    // Four leases at a time: prompt 0, given back and leased first, is one in four.
    let sets = agent_sets(
        &python,
        "prompt0",
        &markers,
        &["env.max_retries=1", "generator.prompts_per_batch=4"],
    );
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let cfg = config(dir.path(), &model, &sets);
    let ran = run(&cfg);
    let run_dir = dir.path().join("run");
    succeeded(&ran, &run_dir);
    let rows = trained(&run_dir);
    every_reward_is_one(&rows);
    for r in &rows {
        let group = r["group"].as_str().unwrap();
        assert!(!group.starts_with("p0-"), "prompt 0 was trained: {r}");
    }
    assert_eq!(failures_trained(&run_dir), (0, 0));
    // Each given-back group: 2 runs × 2 failed episodes (the last run's may still wait
    // for a heartbeat when the run ends).
    assert!(
        ran.counter("tandem_groups_failed_total{reason=\"agent\"}") >= 1.0
            && ran.counter("tandem_groups_retried_total") >= 1.0
            && ran.counter("tandem_episodes_failed_total") >= 2.0,
        "{}",
        ran.metrics
    );
    let log = std::fs::read_to_string(run_dir.join("logs/gen-0.log")).unwrap();
    assert!(
        log.contains("prompt 0 always fails")
            && log.contains("the group failed 2 times: [env] max_retries = 1")
            && log.contains("giving the lease back"),
        "{log}"
    );
}

/// `[env] service` at `addr`, with its token.
fn service_sets(addr: &str) -> (String, String) {
    (
        format!("env.service={addr:?}"),
        format!("env.service_token={ENV_TOKEN:?}"),
    )
}

/// An Environment service whose `Reset` (even leases) or `Step` (odd leases) of the
/// first run's sample 0 fails: every group runs again with new episode ids and is
/// trained with the service's rewards (a failed `Step` used to end its episode with
/// reward 0, trained); one re-run and one failed episode per trained group.
#[test]
fn a_failing_environment_service_is_run_again_with_new_episodes() {
    let service = FlakyEnvironment::new(|call, episode| {
        let parts: Vec<&str> = episode.split('/').collect();
        let lease: u64 = parts[0].parse().unwrap();
        let first_sample_0 = parts.len() == 2 && parts[1] == "0";
        first_sample_0 && (call == "Reset") == lease.is_multiple_of(2)
    });
    let calls = service.calls.clone();
    let (_rt, addr) = serve_environment(ENV_TOKEN, service);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let (service, token) = service_sets(&addr);
    let cfg = config(
        dir.path(),
        &model,
        &[service.as_str(), token.as_str(), "env.max_turns=2"],
    );
    let ran = run(&cfg);
    let run_dir = dir.path().join("run");
    succeeded(&ran, &run_dir);
    every_reward_is_one(&trained(&run_dir));
    let groups = STEPS * BATCH_GROUPS;
    assert_eq!(failures_trained(&run_dir), (groups, groups));
    assert!(
        ran.counter("tandem_groups_retried_total") >= 1.0
            && ran.counter("tandem_episodes_failed_total") >= 1.0,
        "{}",
        ran.metrics
    );
    // A re-run's episodes are new ones: no episode is reset twice, each step follows its
    // reset, and both kinds of failure happened.
    let calls = calls.lock().unwrap().clone();
    let mut reset = std::collections::BTreeSet::new();
    for (call, episode) in &calls {
        match call.as_str() {
            "Reset" => assert!(reset.insert(episode.clone()), "{episode} reset twice"),
            _ => assert!(
                reset.contains(episode),
                "{episode} stepped before its reset"
            ),
        }
    }
    assert!(
        calls.iter().any(|(_, e)| e.ends_with("/0/1")),
        "no re-run: {calls:?}"
    );
    let log = std::fs::read_to_string(run_dir.join("logs/gen-0.log")).unwrap();
    assert!(
        log.contains("Reset broke") && log.contains("Step broke"),
        "{log}"
    );
}

/// An Environment service whose every `Reset` fails: each group runs twice
/// (`[env] max_retries = 1`) and is given back; once more than half of the last 20
/// groups were, the generator exits (status 78) naming the failure and what to check,
/// and `tandem run` stops the run in order instead of restarting it (`[run]
/// max_restarts` is 3), with the generator's words.
#[test]
fn a_run_whose_groups_all_fail_stops_instead_of_restarting() {
    let service = FlakyEnvironment::new(|call, _| call == "Reset");
    let calls = service.calls.clone();
    let (_rt, addr) = serve_environment(ENV_TOKEN, service);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let (service, token) = service_sets(&addr);
    let cfg = config(
        dir.path(),
        &model,
        &[service.as_str(), token.as_str(), "env.max_retries=1"],
    );
    let ran = run(&cfg);
    let run_dir = dir.path().join("run");
    assert!(!ran.status.success(), "the run finished: {}", ran.stderr);
    for needle in [
        "the gen-0 process stopped the run (exit status: 78)",
        "not restarted",
        "11 of this generator's last 11 groups failed 2 times each ([env] max_retries = 1)",
        "Reset broke for",
        "check the Environment service at [env] service",
        "--resume",
    ] {
        assert!(ran.stderr.contains(needle), "{needle}: {}", ran.stderr);
    }
    assert!(
        !ran.stderr.contains("restarting it ("),
        "the generator was restarted: {}",
        ran.stderr
    );
    // At least 11 groups, 2 runs each, each run's first Reset failing (a group or two
    // more may have started before the generator stopped).
    let resets = calls.lock().unwrap().len();
    assert!((22..40).contains(&resets), "{resets} resets");
    let trained = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    assert_eq!(trained.lines().count(), 0, "a step was trained: {trained}");
    assert!(
        ran.counter("tandem_groups_failed_total{reason=\"environment\"}") >= 1.0,
        "{}",
        ran.metrics
    );
}
