//! The monitoring files of deploy/: the Prometheus configs, alert rules and their unit
//! tests (checked by `promtool`), and the Grafana dashboard (structure, PromQL, and
//! that it names only metrics the coordinator exports).
//!
//! `promtool` is looked up as `$TANDEM_PROMTOOL`, else in `$TANDEM_DEPLOY_TOOLS` or on
//! `PATH`. Without it the promtool checks fail, naming it; with
//! `TANDEM_SKIP_MISSING_TOOLS=1` they are reported as ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

// ----------------------------------------------------------------------------------
// The histograms the coordinator exports (their series carry `_bucket`, `_sum`,
// `_count`). Which metric names exist at all is checked against a live scrape of a
// run in tests/distributed.rs.

const HISTOGRAMS: &[&str] = &["tandem_rollout_staleness", "tandem_weight_sync_seconds"];

// ----------------------------------------------------------------------------------
// PromQL names.

/// Every identifier of a PromQL expression outside label matchers, strings, range
/// brackets and comments, and not a Grafana variable (`$name`).
fn identifiers(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let (mut braces, mut brackets, mut i) = (0usize, 0usize, 0usize);
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            '[' => {
                brackets += 1;
                i += 1;
            }
            ']' => {
                brackets = brackets.saturating_sub(1);
                i += 1;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let variable = start > 0 && chars[start - 1] == '$';
                if braces == 0 && brackets == 0 && !variable {
                    out.push(chars[start..i].iter().collect());
                }
            }
            c if c.is_ascii_digit() => {
                // A number or a duration (1e-9, 0x1f, 5m): never a name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The recording-rule names (`level:metric:operations`) an expression references.
fn recording_names(expr: &str) -> BTreeSet<String> {
    identifiers(expr)
        .into_iter()
        .filter(|w| w.contains(':'))
        .collect()
}

// ----------------------------------------------------------------------------------
// Files.

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn prometheus_dir() -> PathBuf {
    root().join("deploy/prometheus")
}

fn dashboard_path() -> PathBuf {
    root().join("deploy/grafana/dashboards/tandem.json")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn dashboard() -> serde_json::Value {
    let path = dashboard_path();
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// The values of `key:` lines of a YAML file (single-line, or a `|`/`>` block).
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let prefix = format!("{key}:");
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start().trim_start_matches("- ");
        let Some(rest) = t.strip_prefix(&prefix) else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .map(|l| l.trim())
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(unquote(rest));
        }
    }
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        s[1..s.len() - 1].replace("''", "'")
    } else if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        serde_json::from_str(s).unwrap_or_else(|_| s[1..s.len() - 1].to_string())
    } else {
        s.to_string()
    }
}

/// Every rule of rules.yml: its name (alert or record) and its lines.
fn rule_blocks(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t
            .strip_prefix("- alert:")
            .or_else(|| t.strip_prefix("- record:"))
        {
            out.push((name.trim().to_string(), String::new()));
        } else if t.starts_with("- name:") {
            // A new group ends the block.
            out.push((String::new(), String::new()));
        }
        if let Some((_, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out.retain(|(n, _)| !n.is_empty());
    out
}

fn alerts(text: &str) -> Vec<(String, String)> {
    rule_blocks(text)
        .into_iter()
        .filter(|(_, b)| b.trim_start().starts_with("- alert:"))
        .collect()
}

/// Every panel, rows' nested panels included.
fn all_panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(ps: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for p in ps.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

fn dashboard_exprs(d: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["definition"].as_str() {
            out.push((
                format!("${}", v["name"].as_str().unwrap_or("?")),
                q.to_string(),
            ));
        }
    }
    out
}

// ----------------------------------------------------------------------------------
// promtool.

/// promtool; a missing one fails the test.
#[track_caller]
fn promtool() -> PathBuf {
    common::require_program(common::Tool::Promtool)
}

/// Runs promtool; returns success and its output.
fn run_promtool(tool: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", tool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn promtool_ok(tool: &Path, args: &[&str]) {
    let (ok, text) = run_promtool(tool, args);
    assert!(ok, "promtool {} failed:\n{text}", args.join(" "));
}

/// The config with each `kubernetes_sd_configs:` block replaced by a static target,
/// for a promtool built without Kubernetes discovery (Debian's).
fn without_kubernetes_sd(text: &str) -> String {
    let mut out = String::new();
    let mut skip_deeper_than: Option<usize> = None;
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(d) = skip_deeper_than {
            if line.trim().is_empty() || indent > d {
                continue;
            }
            skip_deeper_than = None;
        }
        if line.trim() == "kubernetes_sd_configs:" {
            let pad = " ".repeat(indent);
            out += &format!("{pad}static_configs:\n{pad}  - targets: [\"placeholder:9090\"]\n");
            skip_deeper_than = Some(indent);
            continue;
        }
        out += line;
        out.push('\n');
    }
    out
}

// ----------------------------------------------------------------------------------
// The tests.

#[test]
fn recording_names_are_told_from_metrics_labels_and_strings() {
    assert_eq!(
        recording_names(
            r#"tandem:rollout_staleness:p90_10m >= on(job) (0.8 * tandem_staleness_bound) and rate(x{reason="a:b"}[5m]) # c:d"#
        ),
        BTreeSet::from(["tandem:rollout_staleness:p90_10m".to_string()])
    );
}

#[test]
fn dashboard_and_rules_use_histograms_and_recording_rules_correctly() {
    let rules = read(&prometheus_dir().join("rules.yml"));
    let tests = read(&prometheus_dir().join("rules.test.yml"));
    let mut sources: Vec<(String, String)> = yaml_values(&rules, "expr")
        .into_iter()
        .map(|e| ("rules.yml".to_string(), e))
        .collect();
    sources.extend(
        yaml_values(&tests, "series")
            .into_iter()
            .chain(yaml_values(&tests, "expr"))
            .map(|e| ("rules.test.yml".to_string(), e)),
    );
    sources.extend(
        dashboard_exprs(&dashboard())
            .into_iter()
            .map(|(title, e)| (format!("tandem.json panel {title:?}"), e)),
    );
    assert!(
        sources.len() > 50,
        "too few expressions found: {}",
        sources.len()
    );

    let defined: BTreeSet<String> = yaml_values(&rules, "record").into_iter().collect();
    let mut bad = Vec::new();
    for (origin, expr) in &sources {
        // A histogram's series only with its suffixes, and a suffix only on a histogram.
        for w in identifiers(expr)
            .iter()
            .filter(|w| w.starts_with("tandem_"))
        {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| w.strip_suffix(s));
            let histogram = HISTOGRAMS.contains(&base.unwrap_or(w));
            if base.is_some() != histogram {
                bad.push(format!("{origin}: {w} is not a series the service exports"));
            }
        }
        for name in recording_names(expr) {
            if !defined.contains(&name) {
                bad.push(format!(
                    "{origin}: recording rule {name} is not defined in rules.yml"
                ));
            }
        }
    }
    assert!(bad.is_empty(), "unknown names:\n{}", bad.join("\n"));
}

#[test]
fn alerts_carry_severity_annotations_and_runbook() {
    let rules = read(&prometheus_dir().join("rules.yml"));
    let alerts = alerts(&rules);
    assert!(alerts.len() >= 10, "only {} alerts", alerts.len());
    let operations = std::fs::read_to_string(root().join("docs/operations.md")).ok();
    let anchors: BTreeSet<String> = operations
        .iter()
        .flat_map(|t| t.lines())
        .filter(|l| l.starts_with('#'))
        .map(|l| github_anchor(l.trim_start_matches('#')))
        .collect();
    let mut names = BTreeSet::new();
    for (name, body) in &alerts {
        assert!(names.insert(name.clone()), "alert {name} defined twice");
        let severity = yaml_values(body, "severity");
        assert!(
            matches!(severity.as_slice(), [s] if ["critical", "warning", "info"].contains(&s.as_str())),
            "{name}: severity must be critical, warning or info, got {severity:?}"
        );
        for key in ["summary", "description"] {
            let v = yaml_values(body, key);
            assert!(
                matches!(v.as_slice(), [s] if !s.is_empty()),
                "{name}: no {key}"
            );
        }
        let runbook = yaml_values(body, "runbook");
        let anchor = runbook
            .first()
            .and_then(|r| r.strip_prefix("docs/operations.md#"))
            .unwrap_or_else(|| {
                panic!("{name}: runbook must be docs/operations.md#…, got {runbook:?}")
            });
        assert_eq!(anchor, name.to_lowercase(), "{name}: runbook anchor");
        if operations.is_some() {
            assert!(
                anchors.contains(anchor),
                "{name}: docs/operations.md has no heading for #{anchor}"
            );
        }
        // Only the coordinator-down alert may hold when the coordinator is gone or
        // the run finished; every other one waits for a running, unfinished run.
        let expr = yaml_values(body, "expr").join(" ");
        if name != "TandemCoordinatorDown" {
            assert!(
                expr.contains("tandem_run_finished == 0"),
                "{name}: must hold only while the run is not finished: {expr}"
            );
        }
    }
}

/// GitHub's anchor of a Markdown heading.
fn github_anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_is_tested_firing_and_not_firing() {
    let rules = read(&prometheus_dir().join("rules.yml"));
    let tests = read(&prometheus_dir().join("rules.test.yml"));
    // alertname → (cases expecting alerts, cases expecting none)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = tests.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start().trim_start_matches("- ");
        let Some(name) = t.strip_prefix("alertname:") else {
            continue;
        };
        // The case's exp_alerts: `[]` for none, a list otherwise.
        let exp = lines[i + 1..]
            .iter()
            .take(3)
            .find_map(|l| {
                l.trim_start()
                    .trim_start_matches("- ")
                    .strip_prefix("exp_alerts:")
            })
            .unwrap_or_else(|| panic!("rules.test.yml line {}: no exp_alerts", i + 1));
        let entry = cases.entry(unquote(name)).or_default();
        if exp.trim() == "[]" {
            entry.1 += 1;
        } else {
            entry.0 += 1;
        }
    }
    for (name, _) in alerts(&rules) {
        let (fires, quiet) = cases.get(&name).copied().unwrap_or_default();
        assert!(fires > 0, "{name}: no unit test where it fires");
        assert!(quiet > 0, "{name}: no unit test where it does not fire");
    }
    // Firing cases check labels and annotations.
    assert!(tests.contains("exp_labels:") && tests.contains("exp_annotations:"));
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn prometheus_configs_pass_promtool() {
    let tool = promtool();
    let dir = prometheus_dir();
    promtool_ok(
        &tool,
        &[
            "check",
            "config",
            dir.join("prometheus.yml").to_str().unwrap(),
        ],
    );

    let k8s = dir.join("prometheus-k8s.yml");
    let text = read(&k8s);
    for needle in [
        "kubernetes_sd_configs:",
        "role: pod",
        "names: [tandem]",
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape",
        "__meta_kubernetes_pod_annotation_prometheus_io_port",
        "job_name: tandem",
    ] {
        assert!(text.contains(needle), "prometheus-k8s.yml lacks {needle:?}");
    }
    let (ok, out) = run_promtool(&tool, &["check", "config", k8s.to_str().unwrap()]);
    if !ok && out.contains("kubernetes_sd_configs not found") {
        // Debian's promtool is built without Kubernetes discovery: check the rest of
        // the file (relabelling, rules) with the discovery swapped for a static target.
        eprintln!(
            "note: this promtool has no Kubernetes discovery; checking prometheus-k8s.yml \
             with kubernetes_sd_configs replaced by a static target"
        );
        let scratch = tempfile::tempdir().unwrap();
        let tmp = scratch.path();
        std::fs::copy(dir.join("rules.yml"), tmp.join("rules.yml")).unwrap();
        let swapped = without_kubernetes_sd(&text);
        assert!(
            swapped
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .all(|l| !l.contains("kubernetes_sd_configs")),
            "a kubernetes_sd_configs block the stand-in cannot replace:\n{swapped}"
        );
        std::fs::write(tmp.join("prometheus-k8s.yml"), swapped).unwrap();
        let (ok, out) = run_promtool(
            &tool,
            &[
                "check",
                "config",
                tmp.join("prometheus-k8s.yml").to_str().unwrap(),
            ],
        );
        assert!(
            ok,
            "promtool check config prometheus-k8s.yml (static stand-in):\n{out}"
        );
    } else {
        assert!(ok, "promtool check config prometheus-k8s.yml:\n{out}");
    }
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn rules_pass_promtool_check_and_unit_tests() {
    let tool = promtool();
    let dir = prometheus_dir();
    promtool_ok(
        &tool,
        &["check", "rules", dir.join("rules.yml").to_str().unwrap()],
    );
    promtool_ok(
        &tool,
        &[
            "test",
            "rules",
            dir.join("rules.test.yml").to_str().unwrap(),
        ],
    );
}

#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn dashboard_queries_are_valid_promql() {
    let tool = promtool();
    // Each query as a recording rule (Grafana's variables given values), so that
    // promtool parses it.
    let rules: Vec<serde_json::Value> = dashboard_exprs(&dashboard())
        .into_iter()
        .filter(|(origin, _)| !origin.starts_with('$'))
        .enumerate()
        .map(|(i, (_, e))| {
            let e = e
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h")
                .replace("$generator", ".*");
            assert!(!e.contains('$'), "unexpected variable in {e}");
            serde_json::json!({"record": format!("dashboard:query:{i}"), "expr": e})
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dashboard-queries.yml");
    let doc = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    let (ok, out) = run_promtool(&tool, &["check", "rules", path.to_str().unwrap()]);
    assert!(ok, "a dashboard query is not valid PromQL:\n{out}");
}

#[test]
fn dashboard_is_a_provisionable_grafana_dashboard() {
    let d = dashboard();
    assert!(
        d.get("dashboard").is_none(),
        "provisioning wants the dashboard object itself"
    );
    assert_eq!(d["uid"], "tandem-lag");
    assert_eq!(d["title"], "Tandem — lag");
    assert!(d["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    assert!(d["id"].is_null(), "a provisioned dashboard has no fixed id");

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let generator = var("generator");
    assert_eq!(generator["type"], "query");
    assert_eq!(generator["multi"], true);
    assert_eq!(generator["datasource"]["uid"], "${datasource}");
    assert_eq!(
        generator["definition"],
        "label_values(tandem_generator_policy_version, generator)"
    );

    let panels = all_panels(&d);
    assert!(panels.len() >= 20, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut uids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?}: no id"));
        assert!(ids.insert(id), "panel id {id} used twice ({title:?})");
        if let Some(uid) = p["uid"].as_str() {
            assert!(uids.insert(uid.to_string()), "panel uid {uid} used twice");
        }
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(
            w >= 1 && x + w <= 24 && g["h"].as_u64().unwrap() >= 1,
            "panel {title:?}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(!title.is_empty() && title != "?", "panel {id} has no title");
        assert_eq!(
            p["datasource"]["type"], "prometheus",
            "panel {title:?}: datasource"
        );
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title:?}: datasource"
        );
        let targets = p["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(
                !expr.trim().is_empty(),
                "panel {title:?}: a target has no expr"
            );
            let r = t["refId"].as_str().unwrap_or_default();
            assert!(
                !r.is_empty() && refs.insert(r),
                "panel {title:?}: refId {r:?} missing or repeated"
            );
            if !t["datasource"].is_null() {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "panel {title:?}: target datasource"
                );
            }
        }
    }

    // Dashboard uids unique across the provisioned folder.
    let mut seen = BTreeMap::new();
    for entry in std::fs::read_dir(dashboard_path().parent().unwrap()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: serde_json::Value = serde_json::from_str(&read(&path))
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let uid = v["uid"].as_str().unwrap_or_default().to_string();
            assert!(!uid.is_empty(), "{}: no uid", path.display());
            if let Some(other) = seen.insert(uid.clone(), path.clone()) {
                panic!(
                    "uid {uid} in both {} and {}",
                    other.display(),
                    path.display()
                );
            }
        }
    }
}

#[test]
fn dashboard_shows_the_lag_signals() {
    let d = dashboard();
    let used: BTreeSet<String> = dashboard_exprs(&d)
        .iter()
        .flat_map(|(_, e)| identifiers(e))
        .collect();
    // The lag panels the deploy issue names: policy version per generator, the
    // staleness histogram, buffer size, tokens/s, weight-sync time, reward and KL.
    for name in [
        "tandem_generator_policy_version",
        "tandem_generator_lag",
        "tandem_rollout_staleness_bucket",
        "tandem_buffer_groups",
        "tandem_generated_tokens_total",
        "tandem_weight_sync_seconds_bucket",
        "tandem_train_reward_mean",
        "tandem_train_kl",
        "tandem_trainer_wait_seconds_total",
    ] {
        assert!(used.contains(name), "the dashboard does not show {name}");
    }
    // The bound η is drawn next to the lag and the staleness.
    let bound_panels =
        all_panels(&d)
            .into_iter()
            .filter(|p| {
                p["targets"].as_array().into_iter().flatten().any(|t| {
                    t["expr"] == "tandem_staleness_bound" && t["legendFormat"] == "bound η"
                })
            })
            .count();
    assert!(
        bound_panels >= 2,
        "the bound η is drawn on {bound_panels} panels"
    );
}
