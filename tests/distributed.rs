//! The distributed system with real processes on loopback and the tiny model:
//! coordinator + trainer + generators, `tandem run`, failures and bad input.

mod common;
// A hostile generator against the wire: tests/distributed/wire.rs.
#[path = "distributed/wire.rs"]
mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TOKEN: &str = "test-token-123-distributed";
/// The generator token: the roles are split in every cluster here, as `tandem run` does.
const GEN_TOKEN: &str = "generator-token-89abcdef";
/// The reward service's own token (never the run's).
const REWARD_TOKEN: &str = "reward-service-token-4567";

/// A config for the tiny model that trains in a few seconds.
fn config(dir: &Path, model: &Path, steps: u64, max_staleness: u64, extra: &str) -> String {
    format!(
        r#"
[run]
steps = {steps}
batch_groups = 2
group_size = 4
max_staleness = {max_staleness}
generators = 2
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
max_new_tokens = 6
prompts_per_batch = 2

[reward]
math = 1.0
format = 0.5
format_kind = "digits"

[algorithm]
temperature = 1.0

[optimizer]
lr = 1e-2

[trainer]
dump_batches = true

[coordinator]
heartbeat_interval_ms = 100
heartbeat_timeout_ms = 1000
{extra}
"#,
        run = dir.join("run").display(),
        model = model.display(),
    )
}

/// Processes of one run; every one still running is killed on drop.
struct Cluster {
    dir: PathBuf,
    run: PathBuf,
    grpc: String,
    http: String,
    procs: Vec<(String, Child)>,
    /// Flags every worker (trainer, generator) gets, e.g. its TLS files.
    worker_flags: Vec<String>,
}

impl Cluster {
    fn spawn_proc(dir: &Path, name: &str, args: &[&str]) -> Child {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        // Generators hold only the generator token; the servers accept both.
        let (token, generator_token) = match args.first() {
            Some(&"generator") => (GEN_TOKEN, ""),
            _ => (TOKEN, GEN_TOKEN),
        };
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .env("TANDEM_TOKEN", token)
            .env("TANDEM_GENERATOR_TOKEN", generator_token)
            .env("TANDEM_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Starts a coordinator on `config_text` and waits for its addresses.
    fn start(dir: &Path, config_text: &str) -> Cluster {
        let cfg = dir.join("run.toml");
        std::fs::write(&cfg, config_text).unwrap();
        let addr_file = dir.join("coordinator.json");
        let child = Self::spawn_proc(
            dir,
            "coordinator",
            &[
                "coordinator",
                "--config",
                cfg.to_str().unwrap(),
                "--addr-file",
                addr_file.to_str().unwrap(),
            ],
        );
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            run: dir.join("run"),
            grpc: String::new(),
            http: String::new(),
            procs: vec![("coordinator".into(), child)],
            worker_flags: Vec::new(),
        };
        let t0 = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                let v: Value = serde_json::from_str(&text).unwrap();
                c.grpc = v["grpc"].as_str().unwrap().to_string();
                c.http = v["http"].as_str().unwrap().to_string();
                return c;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "coordinator did not start: {}",
                c.log("coordinator")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn add(&mut self, name: &str, args: &[&str]) {
        let child = Self::spawn_proc(&self.dir, name, args);
        self.procs.push((name.to_string(), child));
    }

    fn trainer(&mut self) {
        let a = self.grpc.clone();
        let run = self.run.to_str().unwrap().to_string();
        let mut args = vec!["trainer", "--coordinator", &a, "--run-dir", &run];
        let flags = self.worker_flags.clone();
        args.extend(flags.iter().map(String::as_str));
        self.add("trainer", &args);
    }

    fn generator(&mut self, name: &str) {
        let a = self.grpc.clone();
        let mut args = vec!["generator", "--coordinator", &a, "--name", name];
        let flags = self.worker_flags.clone();
        args.extend(flags.iter().map(String::as_str));
        self.add(name, &args);
    }

    /// SIGKILLs `name` and renames it `NAME-killed` (its exit is not a failure).
    fn kill(&mut self, name: &str) {
        let p = self.procs.iter_mut().find(|(n, _)| n == name).unwrap();
        p.1.kill().unwrap();
        p.1.wait().unwrap();
        p.0 = format!("{name}-killed");
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every process's state and log, for a failure message.
    fn report(&mut self) -> String {
        let mut out = String::new();
        for i in 0..self.procs.len() {
            let state = match self.procs[i].1.try_wait() {
                Ok(Some(st)) => format!("exited ({st})"),
                Ok(None) => "running".to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            let name = self.procs[i].0.clone();
            out += &format!("\n=== {name}: {state}\n{}", self.log(&name));
        }
        out
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self.procs.iter_mut().find(|(n, _)| n == name).unwrap().1
    }

    fn steps_done(&self) -> usize {
        std::fs::read_to_string(self.run.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    fn wait_steps(&mut self, n: usize, timeout: Duration) {
        let t0 = Instant::now();
        while self.steps_done() < n {
            if let Some(st) = self.child("trainer").try_wait().unwrap() {
                panic!(
                    "trainer exited ({st}) at step {}: {}",
                    self.steps_done(),
                    self.log("trainer")
                );
            }
            assert!(
                t0.elapsed() < timeout,
                "step {n} not reached: {}",
                self.log("trainer")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every process to exit successfully.
    fn wait_all(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        let names: Vec<String> = self.procs.iter().map(|(n, _)| n.clone()).collect();
        for name in names {
            loop {
                match self.child(&name).try_wait().unwrap() {
                    Some(st) => {
                        assert!(
                            st.success() || name.ends_with("-killed"),
                            "{name} failed ({st}): {}",
                            self.log(&name)
                        );
                        break;
                    }
                    None => {
                        if t0.elapsed() >= timeout {
                            panic!("{name} still running; {}", self.report());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Each step's dumped batch: (step, rollouts).
fn batches(run: &Path) -> Vec<(u64, Vec<Value>)> {
    let dir = run.join("batches");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| {
            let step: u64 = p.file_stem().unwrap().to_str().unwrap()["step-".len()..]
                .parse()
                .unwrap();
            let rows = std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (step, rows)
        })
        .collect()
}

fn metrics_lines(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Checks the invariants every run keeps; returns trained group keys → prompt index.
fn check_trained(
    run: &Path,
    steps: u64,
    batch_groups: usize,
    group_size: usize,
    max_staleness: u64,
) -> BTreeMap<String, u64> {
    let b = batches(run);
    assert_eq!(b.len() as u64, steps);
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    let mut prompts = BTreeSet::new();
    for (step, rows) in &b {
        // Step s trains on policy version s − 1.
        let version = step - 1;
        let mut in_batch: BTreeMap<String, usize> = BTreeMap::new();
        for r in rows {
            let key = r["group"].as_str().unwrap().to_string();
            *in_batch.entry(key).or_default() += 1;
            for v in r["versions"].as_array().unwrap() {
                let v = v.as_u64().unwrap();
                assert!(v <= version, "step {step}: a token from the future (v{v})");
                assert!(
                    version - v <= max_staleness,
                    "step {step}: staleness {} > {max_staleness}",
                    version - v
                );
            }
        }
        assert_eq!(
            in_batch.len(),
            batch_groups,
            "step {step}: groups in the batch"
        );
        for (key, n) in in_batch {
            assert_eq!(n, group_size, "{key}: completions");
            let prompt: u64 = key[1..key.find('-').unwrap()].parse().unwrap();
            assert!(
                groups.insert(key.clone(), prompt).is_none(),
                "{key} trained twice"
            );
            assert!(prompts.insert(prompt), "prompt {prompt} trained twice");
        }
    }
    groups
}

/// Nothing lost: every prompt the coordinator handed out is trained, still buffered,
/// was dropped as stale (by any trainer incarnation) or filtered out by dynamic
/// sampling (never also trained), and accepted groups add up.
fn check_nothing_lost(run: &Path, trained: &BTreeMap<String, u64>, exact_accounting: bool) {
    let status = coordinator_status(run);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("trainer-summary.json")).unwrap())
            .unwrap();
    let prompt = |k: &str| -> u64 { k[1..k.find('-').unwrap()].parse().unwrap() };
    let left: Vec<u64> = summary["groups_left_in_buffer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| prompt(k.as_str().unwrap()))
        .collect();
    let stale_text = std::fs::read_to_string(run.join("stale-groups.txt")).unwrap_or_default();
    let stale: Vec<u64> = stale_text.lines().map(prompt).collect();
    let filtered: Vec<u64> = status["filtered_prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    let mut covered: BTreeSet<u64> = trained.values().copied().collect();
    for p in &filtered {
        assert!(!covered.contains(p), "prompt {p} filtered out and trained");
    }
    covered.extend(&left);
    covered.extend(&stale);
    covered.extend(&filtered);
    assert_eq!(status["leases_running"].as_u64(), Some(0), "{status}");
    // Prompts whose leases were still open when the run finished wait, unserved, to
    // be leased again; every other prompt handed out is accounted for.
    let unserved: BTreeSet<u64> = status["pending_reissue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap())
        .collect();
    let cursor = status["prompt_cursor"].as_u64().unwrap();
    let missing: Vec<u64> = (0..cursor)
        .filter(|p| !covered.contains(p) && !unserved.contains(p))
        .collect();
    assert!(missing.is_empty(), "prompts lost: {missing:?}; {status}");
    // Groups dropped as stale were discarded at once (no longer accepted), unless the
    // step that consumed them was published first.
    let accepted =
        status["groups_accepted"].as_u64().unwrap() + status["discarded_groups"].as_u64().unwrap();
    let accounted = trained.len() as u64 + left.len() as u64 + stale.len() as u64;
    if exact_accounting {
        assert_eq!(accepted, accounted, "{status}");
    } else {
        // Stale drops of a lost trainer lineage were re-issued: accepted counts them once.
        assert!(
            accepted >= trained.len() as u64 + left.len() as u64 && accepted <= accounted,
            "{status}"
        );
    }
}

fn http_get(addr: &str, path: &str) -> String {
    let (status, body) = http_status(addr, path);
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// GET `path`: the status code and the body.
fn http_status(addr: &str, path: &str) -> (u16, String) {
    http_status_as(addr, path, None)
}

/// GET `path` with `authorization: Bearer <token>` when a token is given.
fn http_status_as(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect(head);
    (code, body.to_string())
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A Prometheus text-format check: every line is a comment or `name{labels} value`,
/// every sample's family is typed. Returns the metric families.
fn parse_prometheus(text: &str) -> BTreeSet<String> {
    let mut typed = BTreeMap::new();
    let mut families = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            assert!(line.starts_with("# HELP "), "{line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap();
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "{line}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "untyped sample: {line}");
        families.insert(family.to_string());
    }
    families
}

/// Tests 1, 4 and 8: `tandem run` with 2 generators completes its steps; every
/// trained group is trained once and no token is staler than the bound; the policy
/// version advances; the reward on a learnable task rises; `/metrics` is Prometheus
/// text with the lag metrics; the held-out evaluation runs before the first step,
/// every 10 steps and after the last, and reaches eval.jsonl, metrics.jsonl,
/// `/metrics`, the report and the run's last line.
#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn tandem_run_trains_each_group_once_within_the_staleness_bound() {
    let promtool = common::require_program(common::Tool::Promtool);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 40;
    let cfg = dir.path().join("run.toml");
    // A batch of 4 × 8 and a larger step make the rise certain, not likely.
    let eval = "[eval]\nevery = 10\nprompts = 16\nsamples = 2\ntemperature = 1.0\n";
    let text = with_set(
        &config(dir.path(), &model, steps, 1, eval),
        &[
            "run.batch_groups=4",
            "run.group_size=8",
            "optimizer.lr=2e-2",
        ],
    );
    let (child, run) = spawn_run(&cfg, &text);
    // Scrape /metrics mid-run.
    let t0 = Instant::now();
    let metrics_text = loop {
        let lines = std::fs::read_to_string(run.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        // After step 10's evaluation has been published.
        if lines >= 11 {
            let v: Value = serde_json::from_str(
                &std::fs::read_to_string(run.join("coordinator.json")).unwrap(),
            )
            .unwrap();
            // `tandem status` with the token the run left for this user.
            let token_file = run.join("token");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
                assert_eq!(mode & 0o077, 0, "the token file is readable by others");
            }
            let st = Command::new(env!("CARGO_BIN_EXE_tandem"))
                .args(["status", v["grpc"].as_str().unwrap()])
                .env(
                    "TANDEM_TOKEN",
                    std::fs::read_to_string(&token_file).unwrap(),
                )
                .output()
                .unwrap();
            let table = String::from_utf8_lossy(&st.stdout);
            assert!(
                st.status.success() && table.contains("generator") && table.contains("version"),
                "{table}"
            );
            break http_get(v["http"].as_str().unwrap(), "/metrics");
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let families = parse_prometheus(&metrics_text);
    // Prometheus's own checker too.
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics_text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    for name in [
        "tandem_policy_version",
        "tandem_generator_policy_version",
        "tandem_generator_lag",
        "tandem_rollout_staleness",
        "tandem_buffer_groups",
        "tandem_leases_running",
        "tandem_groups_accepted_total",
        "tandem_generated_tokens_total",
        "tandem_generator_prefill_tokens_total",
        "tandem_generator_prefix_cache_hit_tokens_total",
        "tandem_trainer_wait_seconds_total",
        "tandem_train_loss",
        "tandem_train_reward_mean",
        "tandem_eval_accuracy",
        "tandem_eval_pass_at_2",
        "tandem_eval_maj_at_2",
    ] {
        assert!(
            families.contains(name),
            "{name} missing from /metrics:\n{metrics_text}"
        );
    }
    // The shipped dashboard and alert rules refer only to metrics a run exports.
    for file in [
        "deploy/grafana/dashboards/tandem.json",
        "deploy/prometheus/rules.yml",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let used = common::referenced_metrics(&text);
        assert!(used.len() >= 8, "{file}: only {used:?}");
        let missing: Vec<&String> = used.difference(&families).collect();
        assert!(
            missing.is_empty(),
            "{file} refers to metrics /metrics does not export: {missing:?}\n{metrics_text}"
        );
    }

    let trained = check_trained(&run, steps, 4, 8, 1);
    let m = metrics_lines(&run);
    assert_eq!(
        m.iter()
            .map(|x| x["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    let mean = |xs: &[Value]| {
        xs.iter()
            .map(|x| x["reward_mean"].as_f64().unwrap())
            .sum::<f64>()
            / xs.len() as f64
    };
    let (first, last) = (mean(&m[..10]), mean(&m[m.len() - 10..]));
    assert!(
        last > first + 0.1,
        "reward did not rise: {first:.3} → {last:.3}"
    );

    check_nothing_lost(&run, &trained, true);
    assert!(run.join("final/model.safetensors").exists());

    // Held-out evaluations at steps 0, 10, …, 40, each in its step's metrics line.
    let evals: Vec<Value> = std::fs::read_to_string(run.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let eval_steps: Vec<u64> = evals.iter().map(|e| e["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, vec![0, 10, 20, 30, 40]);
    for e in &evals {
        let acc = e["eval_accuracy"].as_f64().unwrap();
        let (p1, p2) = (
            e["eval_pass_at_1"].as_f64().unwrap(),
            e["eval_pass_at_2"].as_f64().unwrap(),
        );
        assert!((0.0..=1.5).contains(&acc) && p1 <= p2 + 1e-12, "{e}");
        let step = e["step"].as_u64().unwrap();
        if step > 0 {
            let line = &m[step as usize - 1];
            assert_eq!(line["eval_accuracy"].as_f64(), Some(acc), "{line}");
        }
    }
    assert!(m
        .iter()
        .filter(|l| l["step"].as_u64().unwrap() % 10 != 0)
        .all(|l| l.get("eval_accuracy").is_none()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last_line = stderr.lines().last().unwrap_or_default();
    assert!(
        last_line.starts_with("held-out accuracy") && last_line.contains("(step 0)"),
        "{stderr}"
    );

    // `tandem report` plots the run and summarises what metrics.jsonl says.
    let o = ok(tandem(&["report", run.to_str().unwrap()]));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["steps"].as_f64(), Some(steps as f64));
    let r5 = |xs: &[Value]| {
        xs.iter()
            .map(|x| x["reward_mean"].as_f64().unwrap())
            .sum::<f64>()
            / xs.len() as f64
    };
    assert!((summary["reward_last_5"].as_f64().unwrap() - r5(&m[m.len() - 5..])).abs() < 1e-9);
    assert_eq!(
        summary["eval_accuracy_last"].as_f64(),
        evals.last().unwrap()["eval_accuracy"].as_f64()
    );
    for f in [
        "reward.svg",
        "staleness.svg",
        "throughput.svg",
        "loss.svg",
        "eval.svg",
    ] {
        let svg = std::fs::read_to_string(run.join("report").join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("polyline"), "{f}");
    }
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_clean_failure(
        &tandem(&["report", empty.to_str().unwrap()]),
        &["metrics.jsonl"],
    );
}

/// Tests 2 and 3: kill -9 a generator mid-run: the run completes, its leased prompts
/// are re-issued and trained once; a generator started mid-run joins, gets the
/// current weights and its groups are trained.
#[test]
fn killed_generator_loses_nothing_and_a_late_one_joins() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 40;
    let mut c = Cluster::start(dir.path(), &config(dir.path(), &model, steps, 1, ""));
    // The trainer and gen-1 serve the probes (--http).
    let (trainer_http, gen1_http) = (free_addr(), free_addr());
    c.worker_flags = vec!["--http".into(), trainer_http.clone()];
    c.trainer();
    c.worker_flags.clear();
    c.generator("gen-0");
    c.worker_flags = vec!["--http".into(), gen1_http.clone()];
    c.generator("gen-1");
    c.worker_flags.clear();
    c.wait_steps(8, Duration::from_secs(120));
    for addr in [&trainer_http, &gen1_http] {
        assert_eq!(http_status(addr, "/healthz"), (200, "ok\n".into()));
        assert_eq!(http_status(addr, "/readyz"), (200, "ready\n".into()));
    }
    // The coordinator's /status needs the run's token; its probes do not.
    let coord_http = c.http.clone();
    assert_eq!(http_status(&coord_http, "/healthz").0, 200);
    assert_eq!(http_status(&coord_http, "/status").0, 401);
    assert_eq!(
        http_status_as(&coord_http, "/status", Some("wrong-token-0123456789")).0,
        401
    );
    let (code, body) = http_status_as(&coord_http, "/status", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"workers\""), "{body}");
    c.kill("gen-0");
    // The coordinator drops gen-0: counted, and its heartbeat age series goes while
    // gen-1's stays.
    let t0 = Instant::now();
    loop {
        let text = http_get(&c.http, "/metrics");
        let sample = |series: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(series)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
        };
        if sample("tandem_workers_dropped_total{role=\"generator\"}") == Some(1.0) {
            let age = "tandem_generator_heartbeat_age_seconds";
            assert_eq!(
                sample(&format!("{age}{{generator=\"gen-0\"}}")),
                None,
                "{text}"
            );
            let live = sample(&format!("{age}{{generator=\"gen-1\"}}")).expect(&text);
            assert!((0.0..1.0).contains(&live), "{text}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "gen-0 not dropped: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_steps(14, Duration::from_secs(120));
    // gen-1 is held while gen-2 joins, so the rest of the run cannot finish without
    // the newcomer (under load gen-1 alone could otherwise outrun its start-up). The
    // hold outlasts the heartbeat timeout: gen-1 is dropped and registers again.
    let gen1 = c.child("gen-1").id().to_string();
    signal("-STOP", &gen1);
    c.generator("gen-2");
    let t0 = Instant::now();
    loop {
        let log2 = c.log("gen-2");
        let id2 = log2
            .split("generator running")
            .nth(1)
            .and_then(|s| s.split("id=").nth(1))
            .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
            .and_then(|s| s.parse::<u64>().ok());
        let trained = id2.is_some_and(|id| {
            batches(&c.run).iter().flat_map(|(_, rows)| rows).any(|r| {
                r["group"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(&format!("-w{id}"))
            })
        });
        if trained {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "gen-2 joined but none of its groups was trained: {}",
            c.report()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    signal("-CONT", &gen1);
    c.wait_all(Duration::from_secs(180));

    let trained = check_trained(&c.run, steps, 2, 4, 1);
    check_nothing_lost(&c.run, &trained, true);
    assert!(
        c.log("coordinator").contains("gen-0") && c.log("coordinator").contains("dropped"),
        "the killed generator was not dropped"
    );
    // The rollout stream the kill cut is a disconnection, never a malformed group.
    let dropped = &coordinator_status(&c.run)["dropped"];
    assert!(dropped.get("malformed").is_none(), "{dropped}");
    assert!(
        !c.log("trainer").contains("reason=\"malformed\""),
        "{}",
        c.log("trainer")
    );
    // gen-2 fetched weights newer than the start and its groups were trained.
    let log2 = c.log("gen-2");
    assert!(log2.contains("weights updated"), "{log2}");
    let id2: u64 = log2
        .split("generator running")
        .nth(1)
        .and_then(|s| s.split("id=").nth(1))
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect(&log2);
    assert!(
        trained.keys().any(|k| k.ends_with(&format!("-w{id2}"))),
        "no group of gen-2 (id {id2}) was trained"
    );
}

/// `[trainer] broadcast = "tcp"`: the trainer pushes each version to the generators of
/// the broadcast group. A generator that stalls (SIGSTOP, shorter than the heartbeat
/// timeout) is named by the trainer and excluded; it then fetches over gRPC, the other
/// generator joins the new epoch and keeps receiving by broadcast, and nothing about the
/// run's guarantees changes.
#[test]
fn broadcast_feeds_generators_and_a_stalled_one_falls_back_to_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    // Long enough that the run outlives the stall below, and a deadline long enough
    // for a generator to join while 2 cores also run the other tests (one that misses
    // it at the start is excluded for good, and there would be nothing to stall).
    let steps = 150;
    let text = with_set(
        &config(dir.path(), &model, steps, 1, ""),
        &[
            "trainer.broadcast=\"tcp\"",
            "trainer.broadcast_timeout_s=2.0",
            "coordinator.heartbeat_timeout_ms=5000",
        ],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.generator("gen-1");
    // Both generators take versions by broadcast.
    let t0 = Instant::now();
    while !["gen-0", "gen-1"]
        .iter()
        .all(|g| c.log(g).contains("weights updated by broadcast"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no broadcast received: {}\n{}",
            c.log("gen-1"),
            c.log("trainer")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = c.child("gen-1").id().to_string();
    let signal = |s: &str| {
        assert!(Command::new("kill")
            .args([s, &pid])
            .status()
            .unwrap()
            .success());
    };
    let before = c.steps_done();
    signal("-STOP");
    // Steps go on with gen-0 while gen-1 neither reads nor acknowledges.
    let t1 = Instant::now();
    // Longer than the broadcast deadline, shorter than the heartbeat timeout.
    while c.steps_done() < before + 4 || t1.elapsed() < Duration::from_secs(3) {
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "{}",
            c.log("trainer")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    signal("-CONT");
    c.wait_all(Duration::from_secs(180));

    let trainer = c.log("trainer");
    assert!(
        trainer.contains("weight broadcast failed for gen-1 (rank") && trainer.contains("stalled"),
        "{trainer}"
    );
    let coordinator = c.log("coordinator");
    assert!(
        coordinator.contains("excluded from the weight-broadcast group")
            && coordinator.contains("gen-1"),
        "{coordinator}"
    );
    // gen-1 fetches over gRPC after its exclusion; gen-0 re-joined the new epoch and
    // went on receiving by broadcast.
    let gen1 = c.log("gen-1");
    let last_broadcast = gen1.rfind("weights updated by broadcast").unwrap();
    assert!(
        gen1[last_broadcast..].contains("weights updated by fetch"),
        "{gen1}"
    );
    let gen0 = c.log("gen-0");
    assert!(
        gen0.matches("joined the weight broadcast").count() >= 2,
        "{gen0}"
    );
    let last_join = gen0.rfind("joined the weight broadcast").unwrap();
    assert!(
        gen0[last_join..].contains("weights updated by broadcast"),
        "{gen0}"
    );
    let trained = check_trained(&c.run, steps, 2, 4, 1);
    check_nothing_lost(&c.run, &trained, true);
}

/// Test 5: max_staleness = 0 is synchronous on-policy training: every token comes
/// from the version being trained, and the sampler's logprobs match the trainer's.
/// The run goes over mutual TLS with certificates from `tandem tls-certs` (the
/// coordinator reads `[tls]`, the workers take flags), and clients without the CA's
/// certificate, without a client certificate, or in plaintext are refused.
#[test]
fn max_staleness_zero_is_on_policy() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let certs = dir.path().join("certs");
    let other = dir.path().join("other-ca");
    for (out, name) in [(&certs, "node"), (&certs, "second"), (&other, "node")] {
        let o = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["tls-certs", out.to_str().unwrap(), "--name", name])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let pem = |d: &Path, f: &str| d.join(f).to_str().unwrap().to_string();
    let tls = format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nclient_auth = true\n",
        pem(&certs, "ca.pem"),
        pem(&certs, "node.pem"),
        pem(&certs, "node.key")
    );
    let steps = 8;
    let mut c = Cluster::start(dir.path(), &config(dir.path(), &model, steps, 0, &tls));
    // Workers hold a second certificate of the same CA.
    c.worker_flags = vec![
        "--tls-ca".into(),
        pem(&certs, "ca.pem"),
        "--tls-cert".into(),
        pem(&certs, "second.pem"),
        "--tls-key".into(),
        pem(&certs, "second.key"),
        "--tls-client-auth".into(),
    ];
    tls_refuses_strangers(&c.grpc, &certs, &other);
    status_goes_over_tls(&c.http, &certs.join("ca.pem"));
    c.trainer();
    c.generator("gen-0");
    c.generator("gen-1");
    c.wait_all(Duration::from_secs(120));
    check_trained(&c.run, steps, 2, 4, 0);
    for m in metrics_lines(&c.run) {
        let k = m["mismatch_kl"].as_f64().unwrap();
        assert!(k.abs() < 1e-5, "mismatch_kl {k} at step {}", m["step"]);
        assert_eq!(m["staleness_max"].as_u64().unwrap(), 0);
    }
}

/// Calls Status on the coordinator at `addr` (mTLS, CA in `certs`) as different clients,
/// and asserts how each stranger is refused: the TLS alert the server sends (seen with
/// rustls alone, [`tls_verdict`]) and the gRPC status the real client gets.
fn tls_refuses_strangers(addr: &str, certs: &Path, other: &Path) {
    use tandem_proto::auth::Credentials;
    use tandem_proto::client;
    use tandem_proto::tls::TlsFiles;
    use tandem_proto::v1::StatusRequest;
    use tokio_rustls::rustls::{AlertDescription, CertificateError, Error as TlsError};
    use tonic::Code;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let files = |dir: &Path, ca: bool, cert: bool| TlsFiles {
        ca: ca.then(|| dir.join("ca.pem")),
        cert: cert.then(|| dir.join("second.pem").to_path_buf()),
        key: cert.then(|| dir.join("second.key").to_path_buf()),
        client_auth: false,
    };
    // Err(connect error) or Err(the RPC's status).
    let status = |files: TlsFiles, token: &str| -> Result<(), Result<String, tonic::Status>> {
        let creds = Credentials::new(token, files.load().map_err(Ok)?).map_err(Ok)?;
        rt.block_on(async {
            let ch = client::connect(addr, &creds).await.map_err(Ok)?;
            client::coordinator(ch, &creds)
                .status(StatusRequest {})
                .await
                .map(|_| ())
                .map_err(Err)
        })
    };
    let rpc_error = |r: Result<(), Result<String, tonic::Status>>, what: &str| match r {
        Err(Err(status)) => status,
        other => panic!("{what}: expected the call to fail, got {other:?}"),
    };
    // A refused handshake ends the connection under the call: the client sees the
    // server's alert (Unknown, "transport error") or, when the connection task has
    // already closed, a cancelled call; which one is a race inside hyper.
    let refused_by_tls = |st: &tonic::Status, what: &str| {
        assert!(
            matches!(
                (st.code(), st.message()),
                (Code::Unknown, "transport error") | (Code::Cancelled, "operation was canceled")
            ),
            "{what}: {st:?}"
        );
    };
    let (second, other_node) = (
        (certs.join("second.pem"), certs.join("second.key")),
        (other.join("node.pem"), other.join("node.key")),
    );
    let ca = certs.join("ca.pem");

    status(files(certs, true, true), TOKEN).expect("the CA's client certificate");
    assert_eq!(tls_verdict(&rt, addr, &ca, Some(&second)), Ok(()));
    let st = rpc_error(status(files(certs, true, true), "wrong"), "wrong token");
    assert_eq!(
        (st.code(), st.message()),
        (Code::Unauthenticated, "wrong token")
    );

    // No client certificate: the server ends the handshake with certificate_required.
    assert_eq!(
        tls_verdict(&rt, addr, &ca, None),
        Err(TlsError::AlertReceived(
            AlertDescription::CertificateRequired
        ))
    );
    let st = rpc_error(
        status(files(certs, true, false), TOKEN),
        "no client certificate",
    );
    refused_by_tls(&st, "no client certificate");

    // Plaintext: the server answers the HTTP/2 preface with one TLS record, a fatal
    // decode_error alert, and closes; the client gets bytes that are not HTTP/2.
    assert_eq!(
        plaintext_answer(addr),
        [21, 3, 3, 0, 2, 2, 50],
        "content type alert (21), TLS 1.2 record version, length 2, fatal (2), decode_error (50)"
    );
    let st = rpc_error(status(files(certs, false, false), TOKEN), "plaintext");
    assert_eq!(
        (st.code(), st.message()),
        (Code::Unknown, "transport error"),
        "{st:?}"
    );

    // Every CA of `tandem tls-certs` has the same name, so another CA's certificate is
    // matched to this one by issuer name and fails on its signature.
    // A client trusting another CA does not trust the server: refused at connect.
    let mut stranger = files(other, true, false);
    stranger.cert = Some(other_node.0.clone());
    stranger.key = Some(other_node.1.clone());
    assert_eq!(
        tls_verdict(&rt, addr, &other.join("ca.pem"), Some(&other_node)),
        Err(TlsError::InvalidCertificate(CertificateError::BadSignature))
    );
    match status(stranger.clone(), TOKEN) {
        Err(Ok(e)) => assert!(
            e.contains("cannot connect") && e.contains("invalid peer certificate: BadSignature"),
            "{e}"
        ),
        other => panic!("a client of another CA: expected a refused connection, got {other:?}"),
    }
    // Trusting the run's CA but presenting another CA's certificate: the server finds
    // its signature wrong and ends the handshake with decrypt_error.
    stranger.ca = Some(ca.clone());
    assert_eq!(
        tls_verdict(&rt, addr, &ca, Some(&other_node)),
        Err(TlsError::AlertReceived(AlertDescription::DecryptError))
    );
    let st = rpc_error(
        status(stranger, TOKEN),
        "a client certificate from another CA",
    );
    refused_by_tls(&st, "a client certificate from another CA");
}

/// What the TLS server at `addr` makes of a client that trusts `ca` and presents
/// `identity` (certificate, key): the handshake as the rustls under tonic does it, then
/// one read. In TLS 1.3 the server checks the client's certificate once the client's
/// side of the handshake is done, so its verdict (an alert) is what that read gets;
/// an accepted client reads the server's HTTP/2 settings. The client writes nothing
/// after the handshake, so no reset can overtake the alert.
fn tls_verdict(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<(), tokio_rustls::rustls::Error> {
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

    let pem = |p: &Path| std::fs::read(p).unwrap();
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&pem(ca)).unwrap())
        .unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(&pem(cert)).unwrap()],
                PrivateKeyDer::from_pem_slice(&pem(key)).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tls_error = |e: std::io::Error| -> rustls::Error {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| panic!("not a TLS error: {e:?}"))
    };
    let host = addr.rsplit_once(':').unwrap().0.to_string();
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(host).unwrap(), tcp)
            .await
            .map_err(tls_error)?;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(()),
            Ok(Ok(_)) => panic!("the server closed the connection without an alert"),
            Ok(Err(e)) => Err(tls_error(e)),
            Err(_) => panic!("the server said nothing within 10 s"),
        }
    })
}

/// With TLS, the coordinator's HTTP port speaks TLS too (`/status` carries the run's
/// token): `/status` answers over HTTPS with the token (401 without it), and a plaintext
/// request gets no HTTP answer at all, so the token never crosses in the clear.
fn status_goes_over_tls(addr: &str, ca: &Path) {
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(&std::fs::read(ca).unwrap()).unwrap())
        .unwrap();
    let config = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host = addr.rsplit_once(':').unwrap().0.to_string();
    let get = |token: Option<&str>| {
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(ServerName::try_from(host.clone()).unwrap(), tcp)
                .await
                .expect("the HTTP port speaks TLS, with the run's certificate");
            let auth = token
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let req =
                format!("GET /status HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
            tls.write_all(req.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let _ = tls.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let ok = get(Some(TOKEN));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("\"workers\""), "{ok}");
    let refused = get(None);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    // Plaintext: the server reads a TLS record that is not one and answers with an alert
    // (or closes), never with HTTP.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The server may close before the whole request is written (a broken pipe): what
    // matters is what, if anything, comes back.
    let _ = write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "a plaintext request was answered: {}",
        String::from_utf8_lossy(&answer)
    );
}

/// Every byte the server at `addr` sends back to a plaintext HTTP/2 client preface
/// before it closes the connection.
fn plaintext_answer(addr: &str) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    answer
}

/// Test 7: without the token every RPC of every service is refused; malformed,
/// oversized, NaN, out-of-vocabulary and future-version rollouts are refused with a
/// reason naming the field, counted, and never trained.
#[test]
fn wrong_token_is_refused_and_bad_rollouts_never_reach_the_buffer() {
    use tandem_proto::auth::Credentials;
    use tandem_proto::client;
    use tandem_proto::tls::Tls;
    use tandem_proto::v1::coordinator_client::CoordinatorClient;
    use tandem_proto::v1::health_client::HealthClient;
    use tandem_proto::v1::trainer_client::TrainerClient;
    use tandem_proto::v1::*;
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let mut c = Cluster::start(dir.path(), &config(dir.path(), &model, 2, 1, ""));
    c.trainer();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let good = Credentials::new(TOKEN, Tls::none()).unwrap();
    let bad = Credentials::new("not-the-token", Tls::none()).unwrap();
    let coord_ch = rt.block_on(client::connect(&c.grpc, &good)).unwrap();
    let mut coord = client::coordinator(coord_ch.clone(), &good);
    let fake = rt
        .block_on(coord.register(RegisterRequest {
            role: Role::Generator as i32,
            name: "fake".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    let t0 = Instant::now();
    let trainer_addr = loop {
        let r = rt
            .block_on(coord.heartbeat(HeartbeatRequest {
                worker_id: fake.worker_id,
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        if !r.trainer_address.is_empty() {
            break r.trainer_address;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{}",
            c.log("trainer")
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let trainer_ch = rt.block_on(client::connect(&trainer_addr, &good)).unwrap();

    // The generator token: a generator's calls pass; the trainer's are refused with
    // PERMISSION_DENIED, and so is registering as the trainer.
    let gen_creds = Credentials::new(GEN_TOKEN, Tls::none()).unwrap();
    let mut as_gen = client::coordinator(coord_ch.clone(), &gen_creds);
    rt.block_on(async {
        let denied = |r: Result<(), tonic::Status>, what: &str| {
            let e = r.expect_err(what);
            assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
            assert!(e.message().contains("trainer"), "{what}: {e:?}");
        };
        denied(
            as_gen
                .publish_version(PublishVersionRequest {
                    version: 99,
                    finished: true,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "publish",
        );
        denied(
            as_gen
                .commit(CommitRequest {
                    lease_id: 1,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "commit",
        );
        denied(
            as_gen
                .exclude_from_group(ExcludeRequest {
                    worker_ids: vec![fake.worker_id],
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "exclude",
        );
        denied(
            as_gen
                .register(RegisterRequest {
                    role: Role::Trainer as i32,
                    name: "usurper".into(),
                    address: "127.0.0.1:1".into(),
                })
                .await
                .map(|_| ()),
            "register as trainer",
        );
        // A generator acts for itself only: its session token (from Register) is
        // bound to its worker id.
        let me = as_gen
            .register(RegisterRequest {
                role: Role::Generator as i32,
                name: "gen-token-holder".into(),
                ..Default::default()
            })
            .await
            .expect("a generator registers")
            .into_inner();
        assert_eq!(me.session_token.len(), 64);
        gen_creds.set_session(&me.session_token);
        as_gen
            .heartbeat(HeartbeatRequest {
                worker_id: me.worker_id,
                ..Default::default()
            })
            .await
            .expect("a generator's heartbeat");
        for (what, r) in [
            (
                "heartbeat",
                as_gen
                    .heartbeat(HeartbeatRequest {
                        worker_id: fake.worker_id,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
            (
                "lease",
                as_gen
                    .lease(LeaseRequest {
                        worker_id: fake.worker_id,
                        max_groups: 1,
                        request_id: 0,
                    })
                    .await
                    .map(|_| ()),
            ),
            (
                "leave",
                as_gen
                    .leave(LeaveRequest {
                        worker_id: fake.worker_id,
                    })
                    .await
                    .map(|_| ()),
            ),
        ] {
            let e = r.expect_err(what);
            assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
            assert!(e.message().contains("session"), "{what}: {e:?}");
        }
        // Its own groups only: one in another worker's name is refused at ingest.
        let mut push = client::trainer(trainer_ch.clone(), &gen_creds);
        let forged = RolloutGroup {
            seq: 1,
            session_token: me.session_token.clone(),
            worker_id: fake.worker_id,
            lease_id: 1,
            ..Default::default()
        };
        let mut acks = push
            .push_rollouts(tokio_stream::iter(vec![forged]))
            .await
            .unwrap()
            .into_inner();
        let ack = acks.message().await.unwrap().unwrap();
        assert!(!ack.accepted && ack.reason.contains("session"), "{ack:?}");
    });

    // No token, or the wrong one: refused, whatever the call.
    let unauth = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
    };
    let mut wrong = client::coordinator(coord_ch.clone(), &bad);
    let mut none = CoordinatorClient::new(coord_ch.clone());
    rt.block_on(async {
        unauth(
            wrong
                .register(RegisterRequest {
                    role: 1,
                    name: "x".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
            "register",
        );
        unauth(
            wrong
                .heartbeat(HeartbeatRequest::default())
                .await
                .map(|_| ()),
            "heartbeat",
        );
        unauth(
            wrong
                .lease(LeaseRequest {
                    worker_id: fake.worker_id,
                    max_groups: 1,
                    request_id: 0,
                })
                .await
                .map(|_| ()),
            "lease",
        );
        unauth(
            wrong.commit(CommitRequest::default()).await.map(|_| ()),
            "commit",
        );
        unauth(
            wrong
                .publish_version(PublishVersionRequest::default())
                .await
                .map(|_| ()),
            "publish",
        );
        unauth(
            wrong.leave(LeaveRequest::default()).await.map(|_| ()),
            "leave",
        );
        unauth(wrong.status(StatusRequest {}).await.map(|_| ()), "status");
        unauth(
            none.status(StatusRequest {}).await.map(|_| ()),
            "status without a token",
        );
        let mut wt = client::trainer(trainer_ch.clone(), &bad);
        unauth(
            wt.fetch_weights(FetchWeightsRequest { version: 0 })
                .await
                .map(|_| ()),
            "fetch_weights",
        );
        unauth(
            wt.push_rollouts(tokio_stream::iter(Vec::<RolloutGroup>::new()))
                .await
                .map(|_| ()),
            "push_rollouts",
        );
        for ch in [coord_ch.clone(), trainer_ch.clone()] {
            let mut h = HealthClient::with_interceptor(ch, bad.with_token());
            unauth(h.check(HealthRequest {}).await.map(|_| ()), "health");
        }
    });

    // With the token: one lease, then bad groups for it.
    let lease = rt
        .block_on(coord.lease(LeaseRequest {
            worker_id: fake.worker_id,
            max_groups: 1,
            request_id: 0,
        }))
        .unwrap()
        .into_inner()
        .leases
        .remove(0);
    let group = |edit: &dyn Fn(&mut RolloutGroup)| {
        let mut g = RolloutGroup {
            seq: 0,
            session_token: fake.session_token.clone(),
            lease_id: lease.lease_id,
            prompt_index: lease.prompt_index,
            worker_id: fake.worker_id,
            prompt_ids: vec![1, 2, 3],
            completions: vec![
                Completion {
                    completion_ids: vec![5, 6],
                    behavior_logprobs: vec![-1.0, -1.0],
                    versions: vec![0, 0],
                    reward: 0.0,
                    finish_reason: "length".into(),
                    loss_mask: vec![],
                    ..Default::default()
                };
                4
            ],
            ..Default::default()
        };
        edit(&mut g);
        g
    };
    let bad_groups: Vec<(RolloutGroup, &str)> = vec![
        (
            group(&|g| g.completions[1].behavior_logprobs[0] = f32::NAN),
            "completions[1].behavior_logprobs[0]",
        ),
        (
            group(&|g| g.completions[0].behavior_logprobs[1] = 0.25),
            "completions[0].behavior_logprobs[1]",
        ),
        (
            group(&|g| g.completions[2].completion_ids[0] = 99_999),
            "completions[2].completion_ids[0]",
        ),
        (group(&|g| g.prompt_ids[0] = 512), "prompt_ids[0]"),
        (
            group(&|g| g.completions[3].versions[1] = 7),
            "newer than the published version",
        ),
        (
            group(&|g| {
                g.completions.pop();
            }),
            "group_size",
        ),
        (
            group(&|g| g.completions[0].versions.pop().map(|_| ()).unwrap_or(())),
            "completions[0].versions",
        ),
    ];
    let n_bad = bad_groups.len();
    let mut pusher = client::trainer(trainer_ch.clone(), &good);
    let acks: Vec<PushAck> = rt.block_on(async {
        let msgs: Vec<RolloutGroup> = bad_groups
            .iter()
            .enumerate()
            .map(|(i, (g, _))| RolloutGroup {
                seq: i as u64 + 1,
                ..g.clone()
            })
            .collect();
        let mut s = pusher
            .push_rollouts(tokio_stream::iter(msgs))
            .await
            .unwrap()
            .into_inner();
        let mut out = vec![];
        while let Some(a) = s.message().await.unwrap() {
            out.push(a);
        }
        out
    });
    assert_eq!(acks.len(), n_bad);
    for (ack, (_, needle)) in acks.iter().zip(&bad_groups) {
        assert!(!ack.accepted, "{needle}: accepted");
        assert!(ack.reason.contains(needle), "{needle}: {}", ack.reason);
        assert_eq!(ack.buffer_groups, 0, "a refused group reached the buffer");
    }
    // Oversized: the server refuses a message above its limit with a status.
    let big = RolloutGroup {
        seq: 99,
        ..group(&|g| g.prompt_ids = vec![400; 70 << 20])
    };
    let mut big_client = TrainerClient::with_interceptor(trainer_ch.clone(), good.with_token())
        .max_encoding_message_size(usize::MAX);
    let status = rt.block_on(async {
        match big_client
            .push_rollouts(tokio_stream::iter(vec![big]))
            .await
        {
            Err(e) => e,
            Ok(r) => r
                .into_inner()
                .message()
                .await
                .expect_err("oversized group accepted"),
        }
    });
    // tonic refuses a message past its decoding limit with OUT_OF_RANGE, naming the
    // length (messages are not compressed, so never the decompression limit's
    // RESOURCE_EXHAUSTED): anything else would be a crash or a bug, not the limit.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status
            .message()
            .contains("decoded message length too large"),
        "{status:?}"
    );

    // The fake generator leaves (its lease is re-issued); a real one finishes the run.
    rt.block_on(coord.leave(LeaveRequest {
        worker_id: fake.worker_id,
    }))
    .unwrap();
    c.generator("gen-0");
    c.wait_all(Duration::from_secs(120));
    let trained = check_trained(&c.run, 2, 2, 4, 1);
    assert!(
        !trained
            .keys()
            .any(|k| k.ends_with(&format!("-w{}", fake.worker_id))),
        "a refused group was trained"
    );
    let status = coordinator_status(&c.run);
    // The bad groups, and the one pushed in another worker's name.
    assert_eq!(
        status["dropped"]["invalid"].as_u64(),
        Some(n_bad as u64 + 1),
        "{status}"
    );
    assert!(status["reissued_prompts"]
        .as_array()
        .unwrap()
        .contains(&lease.prompt_index.into()));
}

/// Test 6: kill -9 the trainer, restart it with `--resume`: step, version and buffer
/// continue from the checkpoint, the coordinator re-issues what was lost with the
/// trainer, and every prompt is trained exactly once in the final lineage.
#[test]
fn trainer_killed_and_resumed_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 30;
    let text = with_set(
        &config(dir.path(), &model, steps, 1, ""),
        &["trainer.checkpoint_every=5"],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.generator("gen-1");
    c.wait_steps(12, Duration::from_secs(120));
    c.kill("trainer");
    let killed_at = c.steps_done();
    assert!(killed_at >= 12);
    let a = c.grpc.clone();
    let run = c.run.to_str().unwrap().to_string();
    c.add(
        "trainer",
        &[
            "trainer",
            "--coordinator",
            &a,
            "--run-dir",
            &run,
            "--resume",
        ],
    );
    c.wait_all(Duration::from_secs(180));

    let log = c.log("trainer");
    let resumed_at: u64 = log
        .split("resuming")
        .nth(1)
        .and_then(|s| s.split("step=").nth(1))
        .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect(&log);
    assert!(
        resumed_at >= 10 && resumed_at.is_multiple_of(5) && resumed_at <= killed_at as u64,
        "resumed at {resumed_at}"
    );
    let trained = check_trained(&c.run, steps, 2, 4, 1);
    let m = metrics_lines(&c.run);
    assert_eq!(
        m.iter()
            .map(|x| x["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    assert_eq!(
        m.iter()
            .map(|x| x["version"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    check_nothing_lost(&c.run, &trained, false);
    assert!(c.log("coordinator").contains("rewound"));
}

/// In-flight weight updates (PipelineRL): generators take new weights between decode
/// steps; every token still carries the version that produced it, within the bound.
#[test]
fn in_flight_weight_updates_keep_versions_honest() {
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 12;
    // One generator decoding one group at a time (max_running = group_size), two
    // batches leased ahead, long completions, a trainer that publishes a version 20 ms
    // after each batch (mock steps: the weights stay, versions advance) and heartbeats
    // every 20 ms: the version changes while the next batch's groups decode, so swaps
    // land inside sequences.
    let text = with_set(
        &config(dir.path(), &model, steps, 1, ""),
        &[
            "generator.max_new_tokens=160",
            "generator.prompts_per_batch=4",
            "generator.max_running=4",
            "generator.weight_update=\"in_flight\"",
            "trainer.mock_train_ms=20",
            "coordinator.heartbeat_interval_ms=20",
        ],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.wait_all(Duration::from_secs(120));
    let trained = check_trained(&c.run, steps, 2, 4, 1);
    check_nothing_lost(&c.run, &trained, true);
    // Versions never decrease along a sequence, and swaps did happen inside sequences
    // (a sequence whose tokens carry two versions), so the property is not vacuous.
    let mut swapped = 0;
    for (_, rows) in batches(&c.run) {
        for r in rows {
            let v: Vec<u64> = r["versions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert!(v.windows(2).all(|w| w[0] <= w[1]), "{v:?}");
            swapped += usize::from(v.first() != v.last());
        }
    }
    eprintln!("{swapped} trained sequences changed version mid-sequence");
    assert!(swapped > 0, "no weight swap was observed inside a sequence");
}

/// An external reward service (the `Reward` RPC, any language): generators call it once
/// per group with the run's token, and its scores are the rewards the trainer trains on.
#[test]
fn external_reward_service_scores_the_groups() {
    use std::sync::{Arc, Mutex};
    use tandem_proto::v1::reward_server::Reward;
    use tandem_proto::v1::{ScoreReply, ScoreRequest};

    #[derive(Clone, Default)]
    struct Lengths(Arc<Mutex<Vec<f64>>>);

    #[tonic::async_trait]
    impl Reward for Lengths {
        async fn score(
            &self,
            req: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
            let r = req.into_inner();
            assert!(!r.prompt.is_empty() && !r.answer.is_empty());
            // 1 + length / 100: a score no built-in verifier gives.
            let rewards: Vec<f64> = r
                .completions
                .iter()
                .map(|c| 1.0 + c.chars().count() as f64 / 100.0)
                .collect();
            self.0.lock().unwrap().extend(&rewards);
            Ok(tonic::Response::new(ScoreReply { rewards }))
        }
    }

    let service = Lengths::default();
    let seen = service.0.clone();
    let (_rt, addr) = common::serve_reward(REWARD_TOKEN, service);

    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 4;
    let text = reward_from_service(
        &config(dir.path(), &model, steps, 1, ""),
        &addr,
        &["reward.service_weight=2.0"],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.wait_all(Duration::from_secs(120));
    let scored = seen.lock().unwrap().clone();
    assert!(
        scored.len() >= (steps * 2 * 4) as usize,
        "the service scored {} completions",
        scored.len()
    );
    for (_, rows) in batches(&c.run) {
        for r in rows {
            let reward = r["reward"].as_f64().unwrap();
            assert!(
                scored.iter().any(|s| (2.0 * s - reward).abs() < 1e-9),
                "reward {reward} is not service_weight × a score the service gave"
            );
        }
    }
}

/// A dataset record's info (its `info` object and its extra columns, the file read
/// through `[data] columns` with a dotted path) reaches the reward service's `Score`,
/// the Environment service's `Reset` and the trainer's batch dump, each time with the
/// record it belongs to; the reward service's score, computed from the info, is what
/// the trainer trains on.
#[test]
fn a_record_s_info_reaches_the_services_and_the_batch_dump() {
    use std::sync::{Arc, Mutex};
    use tandem_proto::v1::environment_server::Environment;
    use tandem_proto::v1::reward_server::Reward;
    use tandem_proto::v1::{
        ResetReply, ResetRequest, ScoreReply, ScoreRequest, StepReply, StepRequest,
    };

    /// What a service was sent: (prompt, answer, info_json).
    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

    #[derive(Clone, Default)]
    struct ByLevel(Seen);

    #[tonic::async_trait]
    impl Reward for ByLevel {
        async fn score(
            &self,
            req: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
            let r = req.into_inner();
            // The score is the record's level, read from its info.
            let info: Value = serde_json::from_str(&r.info_json)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let level = info["level"].as_f64().unwrap_or(-1.0);
            self.0
                .lock()
                .unwrap()
                .push((r.prompt, r.answer, r.info_json));
            Ok(tonic::Response::new(ScoreReply {
                rewards: vec![level; r.completions.len()],
            }))
        }
    }

    #[derive(Clone, Default)]
    struct OneTurn(Seen);

    #[tonic::async_trait]
    impl Environment for OneTurn {
        async fn reset(
            &self,
            req: tonic::Request<ResetRequest>,
        ) -> Result<tonic::Response<ResetReply>, tonic::Status> {
            let r = req.into_inner();
            self.0
                .lock()
                .unwrap()
                .push((r.prompt, r.answer, r.info_json));
            Ok(tonic::Response::new(ResetReply::default()))
        }

        async fn step(
            &self,
            _req: tonic::Request<StepRequest>,
        ) -> Result<tonic::Response<StepReply>, tonic::Status> {
            Ok(tonic::Response::new(StepReply {
                observation: String::new(),
                reward: 0.0,
                done: true,
            }))
        }
    }

    const ENV_TOKEN: &str = "environment-service-token-89";
    let (reward, environment) = (ByLevel::default(), OneTurn::default());
    let (scored, reset) = (reward.0.clone(), environment.0.clone());
    let (_rt, reward_addr) = common::serve_reward(REWARD_TOKEN, reward);
    let (_rt_env, env_addr) = common::serve_environment(ENV_TOKEN, environment);

    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    // verl's names: the answer nested in `reward_model`; `level` an extra column.
    let data = dir.path().join("prompts.jsonl");
    let records: String = (0..12)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"question": format!("q{i} ="),
                    "reward_model": {"ground_truth": format!("{i}"), "style": "rule"},
                    "info": {"id": i}, "level": i % 3})
            )
        })
        .collect();
    std::fs::write(&data, records).unwrap();
    // The info record `id` has, through the mapping.
    let expected =
        |id: u64| serde_json::json!({"id": id, "level": id % 3, "reward_model": {"style": "rule"}});
    let steps = 3;
    let path = format!("data.path={:?}", data.display().to_string());
    let env_service = format!("env.service={env_addr:?}");
    let env_token = format!("env.service_token={ENV_TOKEN:?}");
    let text = reward_from_service(
        &config(dir.path(), &model, steps, 1, ""),
        &reward_addr,
        &[
            "data.kind=\"jsonl\"",
            &path,
            "data.columns={ prompt = \"question\", answer = \"reward_model.ground_truth\" }",
            &env_service,
            &env_token,
            "env.max_turns=2",
        ],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.wait_all(Duration::from_secs(120));

    // Each service call carries its record's info, prompt and answer.
    let check = |who: &str, calls: &[(String, String, String)]| {
        assert!(
            calls.len() >= (steps * 2) as usize,
            "{who}: {} calls",
            calls.len()
        );
        for (prompt, answer, info_json) in calls {
            let info: Value = serde_json::from_str(info_json).unwrap();
            let id = info["id"].as_u64().unwrap();
            assert_eq!(info, expected(id), "{who}");
            assert_eq!(
                (prompt.as_str(), answer.as_str()),
                (format!("q{id} =").as_str(), id.to_string().as_str()),
                "{who}: the info of another record"
            );
        }
    };
    check("Score", &scored.lock().unwrap());
    check("Reset", &reset.lock().unwrap());
    // Every dumped completion carries its record's info; its reward is the level the
    // service read from it.
    let mut rows = 0;
    for (_, batch) in batches(&c.run) {
        for r in batch {
            let id = r["info"]["id"].as_u64().unwrap_or_else(|| panic!("{r}"));
            assert_eq!(r["info"], expected(id));
            let prompt = r["prompt_text"].as_str().unwrap();
            assert!(
                prompt.contains(&format!("q{id} =")),
                "{prompt:?} is not record {id}'s"
            );
            assert_eq!(r["reward"].as_f64(), Some((id % 3) as f64), "{r}");
            rows += 1;
        }
    }
    assert_eq!(rows, (steps * 2 * 4) as usize);
}

/// `text` (a [`config`]) with the reward coming from the service at `addr` alone, with
/// its own token; `extra` adds overrides (`reward.service_weight=2.0`).
fn reward_from_service(text: &str, addr: &str, extra: &[&str]) -> String {
    let service = format!("reward.service={addr:?}");
    let token = format!("reward.service_token={REWARD_TOKEN:?}");
    let mut sets = vec!["reward.math=0.0", "reward.format=0.0", &service, &token];
    sets.extend(extra);
    with_set(text, &sets)
}

/// The coordinator's final status (`RUN_DIR/coordinator-status.json`).
fn coordinator_status(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("coordinator-status.json")).unwrap())
        .unwrap()
}

/// Dynamic sampling: a reward service gives every completion of a prompt with an even
/// answer the same score (an uninformative group) and the others distinct scores.
/// Those groups are filtered out, extra prompts are leased in their place, every step
/// still trains `batch_groups` informative groups, and nothing is lost or trained twice.
#[test]
fn filter_zero_std_drops_uninformative_groups_and_keeps_batches_full() {
    use tandem_proto::v1::reward_server::Reward;
    use tandem_proto::v1::{ScoreReply, ScoreRequest};

    #[derive(Clone, Default)]
    struct ByParity;

    #[tonic::async_trait]
    impl Reward for ByParity {
        async fn score(
            &self,
            req: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
            let r = req.into_inner();
            let even = r.answer.trim().parse::<i64>().unwrap() % 2 == 0;
            let rewards = (0..r.completions.len())
                .map(|i| if even { 1.0 } else { i as f64 / 10.0 })
                .collect();
            Ok(tonic::Response::new(ScoreReply { rewards }))
        }
    }

    let (_rt, addr) = common::serve_reward(REWARD_TOKEN, ByParity);

    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 4;
    let text = reward_from_service(
        &config(dir.path(), &model, steps, 1, ""),
        &addr,
        &["run.filter_zero_std=true"],
    );
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    c.generator("gen-1");
    c.wait_all(Duration::from_secs(120));
    let trained = check_trained(&c.run, steps, 2, 4, 1);
    for (step, rows) in batches(&c.run) {
        let mut by_group: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in &rows {
            by_group
                .entry(r["group"].as_str().unwrap().to_string())
                .or_default()
                .push(r["reward"].as_f64().unwrap());
        }
        for (g, rewards) in by_group {
            assert!(
                rewards.iter().any(|&x| x != rewards[0]),
                "step {step}: {g} trained with every reward equal: {rewards:?}"
            );
        }
    }
    let lines = metrics_lines(&c.run);
    for m in &lines {
        assert_eq!(m["zero_std_groups"].as_u64(), Some(0), "{m}");
    }
    let status = coordinator_status(&c.run);
    let filtered = status["filtered_prompts"].as_array().unwrap().len() as u64;
    assert!(filtered > 0, "nothing was filtered: {status}");
    assert!(
        lines.last().unwrap()["filtered_groups"].as_u64().unwrap() > 0,
        "the trainer counted no filtered group"
    );
    let share = status["informative_group_share"].as_f64().unwrap();
    let accepted = status["groups_accepted"].as_u64().unwrap() as f64;
    assert!(
        (share - accepted / (accepted + filtered as f64)).abs() < 1e-9 && share < 1.0,
        "{status}"
    );
    eprintln!("filtered {filtered} groups; informative share {share:.2}");
    check_nothing_lost(&c.run, &trained, true);
}

/// Failures are retried, never zeroed: a reward service that fails its first 5 calls.
/// The generator calls it 4 times with backoff, then runs that group again with new
/// samples (its next scoring's first call fails too, the second answers); no lease is
/// given back, every trained group carries the service's scores (never a made-up 0),
/// the re-run and its group's 4 failed episodes are counted in metrics.jsonl and at
/// /metrics, and the run finishes with nothing lost.
#[test]
fn a_failing_reward_service_runs_the_group_again_and_the_run_goes_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tandem_proto::v1::reward_server::Reward;
    use tandem_proto::v1::{ScoreReply, ScoreRequest};

    /// Fails its first 5 calls.
    #[derive(Clone, Default)]
    struct Flaky(Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl Reward for Flaky {
        async fn score(
            &self,
            req: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
            if self.0.fetch_add(1, Ordering::SeqCst) < 5 {
                return Err(tonic::Status::unavailable("warming up"));
            }
            let n = req.into_inner().completions.len();
            let rewards = (0..n).map(|i| i as f64 / 4.0).collect();
            Ok(tonic::Response::new(ScoreReply { rewards }))
        }
    }

    let service = Flaky::default();
    let calls = service.0.clone();
    let (_rt, addr) = common::serve_reward(REWARD_TOKEN, service);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 3;
    let text = reward_from_service(&config(dir.path(), &model, steps, 1, ""), &addr, &[]);
    let mut c = Cluster::start(dir.path(), &text);
    c.trainer();
    c.generator("gen-0");
    // /metrics while the run goes (heartbeats report the re-run within 100 ms).
    let (t0, mut scraped) = (Instant::now(), String::new());
    while c.child("trainer").try_wait().unwrap().is_none()
        && t0.elapsed() < Duration::from_secs(120)
    {
        if std::net::TcpStream::connect(&c.http).is_ok() {
            if let (200, body) = http_status(&c.http, "/metrics") {
                scraped = body;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    c.wait_all(Duration::from_secs(120));
    assert!(calls.load(Ordering::SeqCst) > 5);
    let trained = check_trained(&c.run, steps, 2, 4, 1);
    let status = coordinator_status(&c.run);
    assert_eq!(
        status["reissued_prompts"].as_array().map(Vec::len),
        Some(0),
        "a lease was given back: {status}"
    );
    for (_, rows) in batches(&c.run) {
        let mut by_group: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for r in rows {
            by_group
                .entry(r["group"].as_str().unwrap().to_string())
                .or_default()
                .push(r["reward"].as_f64().unwrap());
        }
        for (g, mut rewards) in by_group {
            rewards.sort_by(f64::total_cmp);
            assert_eq!(
                rewards,
                [0.0, 0.25, 0.5, 0.75],
                "{g}: not the service's scores"
            );
        }
    }
    let lines = metrics_lines(&c.run);
    let sum = |k: &str| lines.iter().map(|l| l[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        (sum("groups_retried"), sum("episodes_failed")),
        (1, 4),
        "one group ran again, its 4 episodes failed: {lines:?}"
    );
    for series in [
        "tandem_groups_retried_total 1",
        "tandem_episodes_failed_total 4",
        "tandem_groups_failed_total{reason=\"reward_service\"} 0",
    ] {
        assert!(scraped.contains(series), "{series}: {scraped}");
    }
    check_nothing_lost(&c.run, &trained, true);
}

/// Scoring never stalls sampling: with a reward service that takes 2 s a call, the
/// generator's engine keeps stepping while a group waits for its rewards (the scorer
/// stage calls the service on a thread of its own), and nothing is lost: the run
/// finishes and every group is trained once. Two witnesses: the engine's own step
/// count, which the generator logs around every slow call (`engine_steps=N`), and from
/// outside, the tokens the generator reports to the coordinator (heartbeats every
/// 100 ms): the first call holds on, past its 2 s, until more tokens are reported
/// than 0.3 s into it (at most 30 s). When scoring ran on the engine's loop, nothing
/// was sampled during a call, and the first call would wait its 30 s in vain.
#[test]
fn a_slow_reward_service_does_not_stall_the_engine() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use tandem_proto::v1::reward_server::Reward;
    use tandem_proto::v1::{ScoreReply, ScoreRequest};

    /// Answers after 2 s (the first call: once the generator has reported tokens
    /// sampled during it); records the generator's token count 0.3 s in and at the end.
    #[derive(Clone, Default)]
    struct Slow {
        /// The coordinator's HTTP address, once it listens.
        http: Arc<Mutex<String>>,
        /// Set once the first call has come.
        first_seen: Arc<AtomicBool>,
        /// Per call: tokens reported 0.3 s into it and when it answers.
        calls: Arc<Mutex<Vec<(f64, f64)>>>,
    }

    impl Slow {
        async fn tokens(&self) -> Option<f64> {
            let http = self.http.lock().unwrap().clone();
            tokio::task::spawn_blocking(move || generated_tokens(&http, "gen-0"))
                .await
                .ok()
                .flatten()
        }
    }

    #[tonic::async_trait]
    impl Reward for Slow {
        async fn score(
            &self,
            req: tonic::Request<ScoreRequest>,
        ) -> Result<tonic::Response<ScoreReply>, tonic::Status> {
            let t0 = tokio::time::Instant::now();
            let first = !self.first_seen.swap(true, Ordering::SeqCst);
            tokio::time::sleep_until(t0 + Duration::from_millis(300)).await;
            let before = self.tokens().await.unwrap_or(0.0);
            let mut after = before;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                after = self.tokens().await.unwrap_or(after);
                let waited = t0.elapsed();
                let enough = !first || after > before || waited >= Duration::from_secs(30);
                if waited >= Duration::from_secs(2) && enough {
                    break;
                }
            }
            self.calls.lock().unwrap().push((before, after));
            let n = req.into_inner().completions.len();
            let rewards = (0..n).map(|i| i as f64 / 4.0).collect();
            Ok(tonic::Response::new(ScoreReply { rewards }))
        }
    }

    let service = Slow::default();
    let (http, calls) = (service.http.clone(), service.calls.clone());
    let (_rt, addr) = common::serve_reward(REWARD_TOKEN, service);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 3;
    // One generator decoding one sample at a time, long completions and six groups
    // admitted at once: while the first group is scored, the other five (thousands of
    // steps) are still to be sampled.
    let text = reward_from_service(
        &config(dir.path(), &model, steps, 2, ""),
        &addr,
        &[
            "generator.max_new_tokens=400",
            "generator.prompts_per_batch=4",
            "generator.max_running=1",
        ],
    );
    let mut c = Cluster::start(dir.path(), &text);
    *http.lock().unwrap() = c.http.clone();
    c.trainer();
    c.generator("gen-0");
    c.wait_all(Duration::from_secs(240));
    let trained = check_trained(&c.run, steps, 2, 4, 2);
    check_nothing_lost(&c.run, &trained, true);
    let calls = calls.lock().unwrap().clone();
    let log = c.log("gen-0");
    let stepped: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("the reward service took"))
        .map(|l| {
            let at = l.find("engine_steps=").expect("engine_steps in the line") + 13;
            let digits: String = l[at..].chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        })
        .collect();
    let sampled: Vec<f64> = calls.iter().map(|(b, a)| a - b).collect();
    eprintln!(
        "{} reward calls; engine steps during each: {stepped:?}; tokens reported from 0.3 s into each to its end: {sampled:?}",
        calls.len()
    );
    assert!(
        calls.len() >= (steps * 2) as usize,
        "the service scored {} groups",
        calls.len()
    );
    // Every call answered is logged (one cut by the end of the run may not be).
    assert!(
        stepped.len() + 1 >= calls.len(),
        "{} slow calls logged for {} calls: {log}",
        stepped.len(),
        calls.len()
    );
    assert!(
        stepped[0] > 0,
        "the engine did not step during the first reward call: {stepped:?}"
    );
    assert!(
        sampled[0] > 0.0,
        "no token was sampled during the first reward call: {sampled:?}"
    );
}

/// The tokens generator `name` has reported to the coordinator at `http`
/// (`tandem_generated_tokens_total`); `None` when the coordinator does not answer or
/// no longer lists the generator (the run is over).
fn generated_tokens(http: &str, name: &str) -> Option<f64> {
    std::net::TcpStream::connect(http).ok()?;
    let (status, body) = http_status(http, "/metrics");
    if status != 200 {
        return None;
    }
    let series = format!("tandem_generated_tokens_total{{generator=\"{name}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse().unwrap())
}

/// The chaos test. A `tandem run` whose generators reach the trainer through a proxy
/// that delays chunks and cuts every connection every few seconds; at moments drawn
/// from a seed (printed; `TANDEM_CHAOS_SEED` replays one) it kills -9 the coordinator,
/// the trainer (after a checkpoint) and a generator, and SIGSTOPs the other generator
/// for longer than the heartbeat timeout. The run must finish every step; each step
/// appears once in metrics.jsonl; each prompt is trained at most once and none is
/// lost (batch dumps, the coordinator's accounting); no process is left behind.
#[test]
fn chaos_kills_stops_and_a_faulty_network_lose_nothing() {
    use common::fault_proxy::{FaultProxy, Rng};
    let seed = Rng::replayable_seed("TANDEM_CHAOS_SEED", "chaos");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let steps = 72;
    let cfg = dir.path().join("run.toml");
    let text = with_set(
        &config(dir.path(), &model, steps, 1, ""),
        &["trainer.checkpoint_every=4"],
    );
    std::fs::write(&cfg, text).unwrap();
    let trainer_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let trainer = format!("127.0.0.1:{trainer_port}");
    let proxy = FaultProxy::start(trainer.clone(), seed);
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap(), "--trainer-listen", &trainer])
        .args(["--trainer-advertise", &proxy.addr.to_string()])
        .env(
            "TANDEM_LOG",
            std::env::var("TANDEM_CHAOS_LOG").unwrap_or("warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = dir.path().join("run");
    // What happens, in this order, each once the run has logged a step drawn here.
    let mut at = 0;
    let mut plan: Vec<(u64, &str)> = [
        "kill coordinator",
        "kill trainer",
        "kill gen-0",
        "stop gen-1",
    ]
    .into_iter()
    .map(|what| {
        at += rng.between(6, 12);
        (at, what)
    })
    .collect();
    plan.reverse();
    let mut pids_seen: BTreeSet<u64> = BTreeSet::new();
    let mut stopped: Option<(String, Instant)> = None;
    let t0 = Instant::now();
    let mut child = child;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            // What the coordinator knew, for the failure's message.
            let status = std::fs::read_to_string(run.join("coordinator.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["http"].as_str().map(String::from))
                .map(|http| {
                    let token = std::fs::read_to_string(run.join("token")).unwrap_or_default();
                    http_status_as(&http, "/status", Some(&token)).1
                })
                .unwrap_or_default();
            let _ = child.kill();
            if let Ok(keep) = std::env::var("TANDEM_CHAOS_KEEP") {
                let _ = Command::new("cp")
                    .args(["-r", run.to_str().unwrap(), &keep])
                    .status();
            }
            panic!(
                "the run did not finish; seed {seed}\ncoordinator status: {status}\n{}",
                log_tails(&run)
            );
        }
        let pids: Value = std::fs::read_to_string(run.join("processes.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        if let Some(m) = pids.as_object() {
            pids_seen.extend(m.values().filter_map(|v| v.as_u64()));
        }
        if let Some((pid, since)) = &stopped {
            if since.elapsed() > Duration::from_millis(2500) {
                signal("-CONT", pid);
                stopped = None;
            }
        }
        let done = metrics_lines_or_none(&run).unwrap_or(0) as u64;
        let ready = plan.last().is_some_and(|(step, what)| {
            done >= *step && (*what != "kill trainer" || run.join("checkpoints/latest").exists())
        });
        if ready {
            let (step, what) = plan.pop().unwrap();
            let (action, name) = what.split_once(' ').unwrap();
            let pid = pids[name].as_u64().unwrap().to_string();
            eprintln!("chaos: {what} (pid {pid}) after step {done} (drawn: {step})");
            if action == "kill" {
                signal("-KILL", &pid);
            } else {
                signal("-STOP", &pid);
                stopped = Some((pid, Instant::now()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some((pid, _)) = &stopped {
        signal("-CONT", pid);
    }
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}\n{}", log_tails(&run));
    assert!(
        plan.is_empty(),
        "the run ended before the chaos did: {plan:?}\n{stderr}"
    );
    for name in ["coordinator", "trainer", "gen-0"] {
        assert!(
            stderr.contains(&format!("the {name} process failed")),
            "{name} not restarted: {stderr}"
        );
    }
    let log = |name: &str| std::fs::read_to_string(run.join(format!("logs/{name}.log"))).unwrap();
    let coordinator_log = log("coordinator");
    assert!(coordinator_log.contains("continuing the run from the saved state"));
    assert!(coordinator_log.contains("the trainer resumed from a checkpoint: rewound"));
    assert!(
        coordinator_log.contains("worker silent past the timeout"),
        "the stopped generator was not dropped"
    );
    let (connections, resets, _, _) = proxy.counts();
    assert!(connections > 1 && resets > 0, "{:?}", proxy.counts());
    // Each step once; each prompt trained at most once, none lost.
    assert_eq!(
        metrics_lines(&run)
            .iter()
            .map(|x| x["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    let trained = check_trained(&run, steps, 2, 4, 1);
    check_nothing_lost(&run, &trained, false);
    // No process left behind (a pid counts while its command line is this run's).
    std::thread::sleep(Duration::from_millis(200));
    let coordinator = coordinator_status(&run);
    let grpc = std::fs::read_to_string(run.join("coordinator.json")).unwrap();
    let grpc = serde_json::from_str::<Value>(&grpc).unwrap()["grpc"]
        .as_str()
        .unwrap()
        .to_string();
    let ours = |p: &u64| {
        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let zombie =
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| s.contains(") Z "));
        !zombie && (cmd.contains(&grpc) || cmd.contains(dir.path().to_str().unwrap()))
    };
    let alive: Vec<u64> = pids_seen.iter().copied().filter(ours).collect();
    assert_eq!(coordinator["finished"], true);
    assert!(alive.is_empty(), "processes left behind: {alive:?}");
}

/// The last lines of every log of a `tandem run` (for a failure's message).
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
            lines[lines.len().saturating_sub(12)..].join("\n")
        );
    }
    out
}

/// Sends `sig` ("-KILL", "-STOP", "-CONT") to process `pid`.
fn signal(sig: &str, pid: &str) {
    let st = Command::new("kill").args([sig, pid]).status().unwrap();
    assert!(st.success(), "kill {sig} {pid}");
}

/// Writes `text` to `cfg` and starts `tandem run` on it (warnings only, stderr
/// captured); returns the child and the run's folder (`[run] run_dir` of [`config`]).
fn spawn_run(cfg: &Path, text: &str) -> (Child, PathBuf) {
    std::fs::write(cfg, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap()])
        .env("TANDEM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, cfg.parent().unwrap().join("run"))
}

/// The lines of RUN_DIR/metrics.jsonl so far (None before the file exists).
fn metrics_lines_or_none(run: &Path) -> Option<usize> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .ok()
        .map(|t| t.lines().count())
}
