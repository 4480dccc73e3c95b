//! `tandem status` against a real run: from the run folder alone (address, scheme and
//! token read from it), a clear message when pointed at the HTTP port, and a lag
//! column that is the coordinator's own view.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean_failure, stderr};

/// `tandem status ARGS` without TANDEM_TOKEN in its environment unless `token`.
fn status(args: &[&str], token: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    c.arg("status").args(args).env("TANDEM_LOG", "warn");
    c.env_remove("TANDEM_TOKEN");
    if let Some(t) = token {
        c.env("TANDEM_TOKEN", t);
    }
    c.output().unwrap()
}

/// The generator rows of a lag table: (version, lag, leases).
fn generator_rows(table: &str) -> Vec<(u64, u64, u64)> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 8 && f[2] == "generator")
        .map(|f| {
            (
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
                f[6].parse().unwrap(),
            )
        })
        .collect()
}

/// The published version of a lag table's first line ("version V  step …").
fn published(table: &str) -> u64 {
    table.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn status_reads_the_run_folder_and_names_the_right_port() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "run",
            root.join("examples/tiny-grpo.toml").to_str().unwrap(),
        ])
        .args(["--set", &format!("run.run_dir={}", run.display())])
        .args(["--set", "run.steps=400"])
        .env("TANDEM_LOG", "warn")
        .env_remove("TANDEM_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(180), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir_arg = run.to_str().unwrap();
    // From the folder alone: no token in the environment, no address.
    let mut tables = Vec::new();
    for _ in 0..5 {
        let o = status(&[dir_arg], None);
        let table = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success(), "{}", stderr(&o));
        tables.push(table);
    }
    // Given the HTTP port, it says so and where to go.
    let addrs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("coordinator.json")).unwrap())
            .unwrap();
    let token = std::fs::read_to_string(run.join("token")).unwrap();
    let http = addrs["http"].as_str().unwrap();
    assert_clean_failure(
        &status(&[http], Some(&token)),
        &[
            http,
            "answers HTTP, not gRPC",
            "\"grpc\" address",
            "RUN_DIR",
        ],
    );
    // The gRPC address with the token still works (the old way).
    let o = status(&[addrs["grpc"].as_str().unwrap()], Some(&token));
    assert!(o.status.success(), "{}", stderr(&o));
    // A folder that is not a run's.
    assert_clean_failure(
        &status(&[dir.path().to_str().unwrap()], None),
        &["coordinator.json", "run folder"],
    );
    let _ = child.kill();
    let _ = child.wait();

    // The lag column is the coordinator's view: the age in versions of the oldest lease
    // a generator holds, so 0 with no lease and never above the published version.
    let mut rows = 0;
    for t in &tables {
        let v = published(t);
        for (_, lag, leases) in generator_rows(t) {
            rows += 1;
            assert!(lag <= v, "{t}");
            if leases == 0 {
                assert_eq!(lag, 0, "{t}");
            }
        }
    }
    assert!(rows >= 5, "{tables:?}");
}
