//! The Slurm deploy files (deploy/slurm/) on a real Slurm cluster started here by
//! `deploy/slurm/one-node-cluster.sh` (munged, slurmctld and two slurmd daemons on
//! loopback, in a temporary folder): `tandem.sbatch` runs the tiny model as a
//! heterogeneous job (coordinator + trainer in component 0, one generator in component
//! 1, everything bound to 127.0.0.1, no GPU request); once the first step is done,
//! `add-generators.sh` submits a second job whose generator joins the running run. Both
//! jobs must complete with status 0, the trainer must write every step, and groups of
//! both generators must be trained.
//!
//! Needs root and Slurm 22.05 + munge (Debian 12:
//! `apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge`).
//! Without them the test fails, naming what is missing; with TANDEM_SKIP_MISSING_TOOLS=1
//! it is reported as ignored.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

/// Steps of the run: enough that a generator added after the first step has time to
/// join and contribute (about 10–20 s on two idle cores).
const STEPS: u64 = 40;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn slurm_file(name: &str) -> PathBuf {
    root().join("deploy/slurm").join(name)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tail(path: &Path, lines: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let v: Vec<&str> = t.lines().collect();
    format!(
        "== {} ==\n{}",
        path.display(),
        v[v.len().saturating_sub(lines)..].join("\n")
    )
}

/// A Slurm cluster on this machine; stopped (every job cancelled, daemons gone) on drop.
struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

impl Cluster {
    /// Starts the cluster in `dir`. The port base depends on the process id, so that
    /// two test runs on one machine do not collide; a clash is retried on other ports.
    fn start(dir: &Path) -> Cluster {
        let mut last = String::new();
        for attempt in 0..3u32 {
            // 20000..32000: below the usual ephemeral range (32768..).
            let base = 20000 + (std::process::id().wrapping_mul(7) + attempt * 1009) % 3000 * 4;
            let o = Command::new("bash")
                .arg(slurm_file("one-node-cluster.sh"))
                .args(["start", dir.to_str().unwrap()])
                .env("TANDEM_SLURM_PORT_BASE", base.to_string())
                .env("TANDEM_SLURM_NODES", "2")
                .env("TANDEM_SLURM_CPUS", "4")
                .env("TANDEM_SLURM_TIMEOUT", "30")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let c = Cluster {
                dir: dir.to_path_buf(),
                conf: dir.join("slurm.conf"),
            };
            if o.status.success() {
                return c;
            }
            last = format!("{}\n{}", text(&o), tail(&dir.join("log/slurmctld.log"), 20));
            drop(c); // stops what did start
        }
        panic!("the Slurm cluster did not start:\n{last}");
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(
            common::tools::deploy_tool(None, &[program]).unwrap_or_else(|| program.into()),
        );
        c.env("SLURM_CONF", &self.conf).stdin(Stdio::null());
        c
    }

    /// `scontrol show job ID`: every component's (JobState, ExitCode).
    fn job_states(&self, id: &str) -> Vec<(String, String)> {
        let o = self
            .cmd("scontrol")
            .args(["show", "job", id])
            .output()
            .unwrap();
        let t = text(&o);
        let field = |key: &str| -> Vec<String> {
            t.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .map(str::to_string)
                .collect()
        };
        field("JobState=")
            .into_iter()
            .zip(field("ExitCode="))
            .collect()
    }

    /// Whether a job is still queued, running or completing (this cluster runs only
    /// the test's jobs).
    fn busy(&self) -> bool {
        let o = self
            .cmd("squeue")
            .args(["-h", "-o", "%i %T"])
            .output()
            .unwrap();
        assert!(o.status.success(), "squeue: {}", text(&o));
        !String::from_utf8_lossy(&o.stdout).trim().is_empty()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(slurm_file("one-node-cluster.sh"))
            .args(["stop", self.dir.to_str().unwrap()])
            .stdin(Stdio::null())
            .output();
    }
}

/// GET `path` from an HTTP server at `addr` (HTTP/1.1, Connection: close); the body.
/// The run's token (RUN_DIR/token), empty until the job wrote it.
fn token_of(run: &Path) -> String {
    std::fs::read_to_string(run.join("token"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn http_get(addr: &str, path: &str, token: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn config() -> String {
    // [run] run_dir is overridden by tandem.sbatch (TANDEM_RUN_DIR).
    format!(
        r#"
[run]
steps = {STEPS}
batch_groups = 4
group_size = 8
max_staleness = 2
run_dir = "overridden"

[model]
path = "preset:tiny"

[data]
kind = "arithmetic"
chat = false
template = "{{question}} ="

[generator]
temperature = 1.0
max_new_tokens = 16
prompts_per_batch = 2

[reward]
math = 1.0
format = 0.5
format_kind = "digits"

[optimizer]
lr = 1e-2

[coordinator]
heartbeat_interval_ms = 200
heartbeat_timeout_ms = 3000
"#
    )
}

/// tandem.sbatch as a heterogeneous job, add-generators.sh mid-run, on a real cluster.
#[test]
#[cfg_attr(
    missing_slurm,
    ignore = "Slurm not installed or not root (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn sbatch_run_with_generators_added_mid_run() {
    common::require(common::Tool::Slurm);
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(&tmp.path().join("slurm"));
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(&cfg, config()).unwrap();
    let bin = env!("CARGO_BIN_EXE_tandem");
    // The batch output, every process's log and the controller's, for failures.
    let diag = || -> String {
        let mut files: Vec<PathBuf> = Vec::new();
        for d in [run.clone(), run.join("logs")] {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".out") || n.ends_with(".log") {
                    files.push(e.path());
                }
            }
        }
        files.sort();
        files.push(cluster.dir.join("log/slurmctld.log"));
        files
            .iter()
            .map(|f| tail(f, 15))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // The run: component 0 = coordinator + trainer, component 1 = one generator.
    let o = cluster
        .cmd("sbatch")
        .current_dir(tmp.path())
        .env_remove("TANDEM_TOKEN")
        .env_remove("TANDEM_RESUME")
        .env_remove("TANDEM_TLS_CA")
        .env_remove("TANDEM_TLS_CERT")
        .env_remove("TANDEM_TLS_KEY")
        .env_remove("TANDEM_TLS_CLIENT_AUTH")
        .env_remove("TANDEM_CPUS_PER_TASK")
        .env_remove("TANDEM_TRAINER_GPUS")
        .env("TANDEM_CONFIG", &cfg)
        .env("TANDEM_RUN_DIR", &run)
        .env("TANDEM_SET", "run.seed=3 trainer.dump_batches=true")
        .env("TANDEM_BIN", bin)
        .env("TANDEM_BIND", "127.0.0.1")
        .env("TANDEM_ADVERTISE_HOST", "127.0.0.1")
        .env("TANDEM_PORT", "0")
        .env("TANDEM_HTTP_PORT", "0")
        .env("TANDEM_TRAINER_PORT", "0")
        .env("TANDEM_GPUS_PER_TASK", "0")
        .env("TANDEM_STOP_GRACE", "30")
        .arg("--parsable")
        .arg(format!("--output={}/slurm-%j.out", run.display()))
        .arg(slurm_file("tandem.sbatch"))
        .output()
        .unwrap();
    assert!(o.status.success(), "sbatch failed: {}", text(&o));
    let job = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(job.parse::<u64>().is_ok(), "sbatch --parsable said {job:?}");

    // Generators seen live on the coordinator's /status (the advertised HTTP address),
    // with the tokens each generated.
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut http: Option<String> = None;
    let mut poll_status = |seen: &mut BTreeSet<String>| {
        if http.is_none() {
            http = std::fs::read_to_string(run.join("coordinator.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["http"].as_str().map(str::to_string));
        }
        let Some(addr) = &http else { return };
        let Some(v) = http_get(addr, "/status", &token_of(&run))
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        else {
            return;
        };
        for w in v["workers"].as_array().into_iter().flatten() {
            if w["role"] == "generator" && w["generated_tokens"].as_u64().unwrap_or(0) > 0 {
                seen.insert(w["name"].as_str().unwrap_or("").to_string());
            }
        }
    };

    // Once the first step is in metrics.jsonl, another job adds a generator.
    let metrics = run.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        poll_status(&mut seen);
        let lines = std::fs::read_to_string(&metrics)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 1 {
            break;
        }
        assert!(
            cluster.busy(),
            "the job ended before its first step: {:?}\n{}",
            cluster.job_states(&job),
            diag()
        );
        assert!(
            Instant::now() < deadline,
            "no step within 120 s: {:?}\n{}",
            cluster.job_states(&job),
            diag()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Two roles, two private files: the run's token and the generators'.
    for file in ["token", "generator-token"] {
        use std::os::unix::fs::PermissionsExt;
        let token = run.join(file);
        let mode = std::fs::metadata(&token).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is mode {mode:o}", token.display());
    }
    assert_ne!(
        std::fs::read_to_string(run.join("generator-token")).unwrap(),
        token_of(&run)
    );
    // No token in the environment: the job reads RUN_DIR/generator-token.
    let o = cluster
        .cmd("bash")
        .current_dir(tmp.path())
        .env_remove("TANDEM_TOKEN")
        .env_remove("TANDEM_GENERATOR_TOKEN")
        .env("TANDEM_BIN", bin)
        .env("TANDEM_GPUS_PER_TASK", "0")
        .arg(slurm_file("add-generators.sh"))
        .args([run.to_str().unwrap(), "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "add-generators.sh failed: {}", text(&o));
    let added = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        added.parse::<u64>().is_ok(),
        "add-generators.sh said {added:?}"
    );
    eprintln!(
        "run job {job}, generators job {added} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Both jobs end on their own when the run is done.
    let deadline = Instant::now() + Duration::from_secs(240);
    while cluster.busy() {
        poll_status(&mut seen);
        assert!(
            Instant::now() < deadline,
            "the jobs did not finish within 240 s: {:?} {:?}\n{}",
            cluster.job_states(&job),
            cluster.job_states(&added),
            diag()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("both jobs done after {:.1} s", t0.elapsed().as_secs_f64());

    // Every component of both jobs COMPLETED with status 0.
    let states = cluster.job_states(&job);
    assert_eq!(states.len(), 2, "a two-component job: {states:?}");
    let added_states = cluster.job_states(&added);
    for (state, code) in states.iter().chain(&added_states) {
        assert!(
            state == "COMPLETED" && code == "0:0",
            "run job {job}: {states:?}, generators job {added}: {added_states:?}\n{}",
            diag()
        );
    }

    // The run itself: every step once, the summary, the coordinator's final status.
    let steps: Vec<u64> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=STEPS).collect::<Vec<_>>(),
        "metrics.jsonl steps"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("trainer-summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["steps"].as_u64(), Some(STEPS), "{summary}");
    assert!(run.join("final").is_dir(), "no final model");
    let status: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("coordinator-status.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(status["finished"], true, "{status}");
    assert_eq!(status["step"].as_u64(), Some(STEPS), "{status}");
    assert!(
        status["groups_accepted"].as_u64().unwrap_or(0) >= STEPS * 4,
        "{status}"
    );

    // Both generators took part. The final status lists no workers (all have left by
    // then), so: both registered (coordinator log), both generated (live /status), and
    // groups of both were trained (the dumped batches name the worker id of a group).
    let coord_log = std::fs::read_to_string(run.join(format!("logs/coordinator-{job}.log")))
        .unwrap_or_default();
    let registered_id = |name: &str| -> Option<u64> {
        coord_log
            .lines()
            .find(|l| l.contains("worker registered") && l.contains(&format!("name={name} ")))
            .and_then(|l| l.split("id=").nth(1))
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
    };
    let first = format!("gen-{job}-0");
    let second = format!("gen-{added}-0");
    let ids: Vec<u64> = [&first, &second]
        .iter()
        .map(|n| registered_id(n).unwrap_or_else(|| panic!("{n} did not register:\n{}", diag())))
        .collect();
    assert!(
        seen.contains(&first) && seen.contains(&second),
        "generators seen generating on /status: {seen:?}, expected {first} and {second}"
    );
    let mut trained_by: BTreeSet<u64> = BTreeSet::new();
    for e in std::fs::read_dir(run.join("batches")).unwrap().flatten() {
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            let v: Value = serde_json::from_str(l).unwrap();
            let group = v["group"].as_str().unwrap();
            if let Some(w) = group.rsplit_once("-w").and_then(|(_, w)| w.parse().ok()) {
                trained_by.insert(w);
            }
        }
    }
    for (name, id) in [&first, &second].iter().zip(&ids) {
        assert!(
            trained_by.contains(id),
            "no group of {name} (worker {id}) was trained; trained: {trained_by:?}"
        );
    }

    // Logs where the scripts promise them.
    let logs: Vec<String> = std::fs::read_dir(run.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for prefix in [
        "coordinator-",
        "trainer-",
        "generator-",
        &format!("add-generators-{added}"),
    ] {
        assert!(
            logs.iter().any(|l| l.starts_with(prefix)),
            "no logs/{prefix}* in {logs:?}"
        );
    }
    assert!(run.join(format!("slurm-{job}.out")).is_file());
    eprintln!("slurm test took {:.1} s", t0.elapsed().as_secs_f64());
    drop(cluster);
}
