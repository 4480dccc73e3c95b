//! The rules of the code map, checked against what Cargo resolves:
//! - every dependency between Tandem crates goes downward (ARCHITECTURE.md's layers)
//!   and none is one its crate's row forbids;
//! - every library crate forbids `unsafe_code`, except the rooms ARCHITECTURE.md names
//!   ("`unsafe` lives in a few rooms"), which deny it and allow it on named modules;
//! - the workspace's `rust-version` is at least that of every locked dependency.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

/// One row of ARCHITECTURE.md's code map: layer and forbidden dependencies.
struct Row {
    layer: u32,
    never: Vec<String>,
    /// "every other Tandem crate".
    never_any: bool,
}

fn code_map() -> BTreeMap<String, Row> {
    let text = include_str!("../ARCHITECTURE.md");
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `tandem")) {
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
        assert_eq!(cells.len(), 5, "ARCHITECTURE.md code map row: {line}");
        let name = cells[0].trim_matches('`').to_string();
        let layer = cells[2]
            .parse()
            .unwrap_or_else(|_| panic!("ARCHITECTURE.md: layer of {name}: {:?}", cells[2]));
        let never: Vec<String> = cells[4]
            .split('`')
            .filter(|t| t.starts_with("tandem"))
            .map(str::to_string)
            .collect();
        let never_any = cells[4] == "every other Tandem crate";
        rows.insert(
            name,
            Row {
                layer,
                never,
                never_any,
            },
        );
    }
    assert!(
        rows.len() >= 9,
        "ARCHITECTURE.md's code map has {} rows",
        rows.len()
    );
    rows
}

fn metadata(extra: &[&str]) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata's JSON")
}

#[test]
fn crates_depend_only_downward() {
    let map = code_map();
    let meta = metadata(&["--no-deps"]);
    let mut broken = Vec::new();
    let mut seen = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        seen.push(name.to_string());
        let row = map
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no row in ARCHITECTURE.md's code map"));
        // Normal, build and dev dependencies alike: a test may not reach sideways either.
        for d in p["dependencies"].as_array().unwrap() {
            let dep = d["name"].as_str().unwrap();
            let Some(target) = map.get(dep) else { continue };
            if target.layer >= row.layer {
                broken.push(format!(
                    "{name} (layer {}) -> {dep} (layer {}): not downward",
                    row.layer, target.layer
                ));
            }
            if row.never_any || row.never.iter().any(|n| n == dep) {
                broken.push(format!("{name} -> {dep}: its row forbids it"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dependency rules broken:\n{}",
        broken.join("\n")
    );
    for name in map.keys() {
        assert!(
            seen.contains(name),
            "ARCHITECTURE.md names {name}, the workspace has no such crate"
        );
    }
}

/// The library crates that may hold `unsafe` code, each in the modules it allows by
/// name (ARCHITECTURE.md, "`unsafe` lives in a few rooms").
const UNSAFE_ROOMS: [(&str, &[&str]); 3] = [
    ("tandem-model", &["kernels"]),
    ("tandem-weights", &["nccl"]),
    ("tandem-sandbox", &["enter", "run", "plan"]),
];

#[test]
fn unsafe_stays_in_its_rooms() {
    let meta = metadata(&["--no-deps"]);
    let mut broken = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let Some(lib) = p["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "lib"))
        else {
            continue;
        };
        let path = lib["src_path"].as_str().unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        // The module each `#[allow(unsafe_code)]` stands on.
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let allowed: Vec<&str> = lines
            .windows(2)
            .filter(|w| w[0] == "#[allow(unsafe_code)]")
            .filter_map(|w| {
                let m = w[1].strip_prefix("pub ").unwrap_or(w[1]);
                let m = m.strip_prefix("pub(crate) ").unwrap_or(m);
                m.strip_prefix("mod ")?.strip_suffix(';')
            })
            .collect();
        match UNSAFE_ROOMS.iter().find(|(n, _)| *n == name) {
            None if !text.contains("#![forbid(unsafe_code)]") => {
                broken.push(format!("{name}: {path} does not forbid unsafe_code"))
            }
            None => {}
            Some((_, rooms)) => {
                if !text.contains("#![deny(unsafe_code)]") {
                    broken.push(format!("{name}: {path} does not deny unsafe_code"));
                }
                if text.matches("allow(unsafe_code)").count() != allowed.len() {
                    broken.push(format!(
                        "{name}: an allow(unsafe_code) that is not on a `mod` line"
                    ));
                }
                for m in &allowed {
                    if !rooms.contains(m) {
                        broken.push(format!("{name}: allows unsafe in `{m}`, not a named room"));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "unsafe outside its rooms:\n{}",
        broken.join("\n")
    );
}

/// `1.89` or `1.89.0` → (1, 89, 0).
fn version(v: &str) -> (u64, u64, u64) {
    let mut parts = v.split('.').map(|x| x.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[test]
fn rust_version_covers_every_locked_dependency() {
    // Every feature, so the CUDA and NCCL dependencies count too.
    let meta = metadata(&["--all-features"]);
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut ours = None;
    let mut needed = ((0, 0, 0), String::new());
    for p in meta["packages"].as_array().unwrap() {
        let Some(rv) = p["rust_version"].as_str() else {
            continue;
        };
        let id = p["id"].as_str().unwrap();
        if members.contains(&id) {
            ours = Some(version(rv));
        } else if version(rv) > needed.0 {
            let (n, v) = (
                p["name"].as_str().unwrap_or("?"),
                p["version"].as_str().unwrap_or("?"),
            );
            needed = (version(rv), format!("{n} {v}"));
        }
    }
    let ours = ours.expect("the workspace declares rust-version");
    assert!(
        ours >= needed.0,
        "Cargo.toml's rust-version is {ours:?}, but {} needs {:?}: raise [workspace.package] rust-version (and the README)",
        needed.1,
        needed.0
    );
}
