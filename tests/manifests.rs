//! The deploy files (deploy/) checked by the tools that consume them, offline:
//!
//! - Kubernetes: every manifest and the rendered kustomization (base, and base + the
//!   autoscaling component) against the Kubernetes OpenAPI schemas with
//!   `kubernetes-validate --strict`; `kubectl kustomize` renders them;
//! - Compose: `docker-compose config` of Docker Compose v2 (its own loader and schema);
//! - Dockerfiles: hadolint (with ShellCheck on the RUN lines);
//! - the prometheus-adapter query: promtool parses it as PromQL;
//!
//! and what no schema sees: selectors and ports that agree, probes on declared ports,
//! every `tandem` flag the files use exists in the binary, the configs are accepted by
//! `tandem coordinator`, the trainer's resume wrapper passes `--resume` exactly when a
//! checkpoint exists, the files compose mounts exist.
//!
//! Tools: TANDEM_KUBE_VALIDATE, TANDEM_KUBECTL, TANDEM_COMPOSE, TANDEM_HADOLINT and
//! TANDEM_PROMTOOL name an executable; else TANDEM_DEPLOY_TOOLS names a folder holding
//! them (a venv's bin/); else PATH (tests/common/tools.rs). A check whose tool is
//! missing fails, naming it; with TANDEM_SKIP_MISSING_TOOLS=1 it is reported as
//! ignored. `deploy/install-validators.sh` installs them all (scripts/test.sh runs it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::Tool;

/// Kubernetes versions the manifests are validated against: the oldest supported
/// here and the newest schema kubernetes-validate ships (no -k).
const KUBE_VERSIONS: &[Option<&str>] = &[Some("1.30.0"), None];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cmd: &mut Command) -> Output {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed ({}):\n{}",
        o.status,
        text(&o)
    );
    o
}

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A Kubernetes object file (not a kustomization, not Helm values).
fn is_manifest(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("apiVersion:"))
        && !text.contains("apiVersion: kustomize.config.k8s.io")
}

/// kubernetes-validate --strict on `files` for every version of KUBE_VERSIONS; every
/// object must have been checked against a schema (an unknown kind only warns).
fn kube_validate(kv: &Path, files: &[PathBuf]) {
    for version in KUBE_VERSIONS {
        let mut cmd = Command::new(kv);
        cmd.arg("--strict");
        if let Some(v) = version {
            cmd.args(["-k", v]);
        }
        cmd.args(files);
        let o = run(&mut cmd);
        let out = text(&o);
        assert!(
            o.status.success(),
            "kubernetes-validate {version:?} failed:\n{out}"
        );
        assert!(
            !out.contains("Couldn't find schema") && !out.contains("could not be validated"),
            "kubernetes-validate {version:?} checked not every object:\n{out}"
        );
        let passed = out.matches(" passed for resource ").count();
        let docs: usize = files
            .iter()
            .map(|f| {
                read(f)
                    .split("\n---")
                    .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
                    .count()
            })
            .sum();
        assert_eq!(
            passed, docs,
            "objects validated vs objects in the files:\n{out}"
        );
    }
}

/// The documents of a YAML stream as JSON (through PyYAML's safe loader).
fn yaml_docs(python: &Path, yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python)
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "YAML → JSON: {}", text(&o));
    serde_json::from_slice::<Vec<Value>>(&o.stdout).unwrap()
}

/// The text of the one block scalar introduced by a line ending in `- |` (a shell
/// script inside YAML), dedented.
fn block_scalar(yaml: &str) -> String {
    let n = yaml
        .lines()
        .filter(|l| l.trim_end().ends_with("- |"))
        .count();
    assert_eq!(n, 1, "expected one `- |` block");
    block_after(yaml, "- |")
}

/// The options `tandem SUB --help` lists.
fn cli_flags(sub: &str) -> BTreeSet<String> {
    let o = ok(Command::new(env!("CARGO_BIN_EXE_tandem")).args([sub, "--help"]));
    let help = String::from_utf8_lossy(&o.stdout).into_owned();
    flags_in(&help)
}

fn flags_in(s: &str) -> BTreeSet<String> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

/// Fails unless every `--flag` in `args` is an option of `tandem SUB`.
fn assert_cli(sub: &str, args: &str, place: &str) {
    let known = cli_flags(sub);
    for f in flags_in(args) {
        assert!(
            known.contains(&f),
            "{place}: `tandem {sub}` has no option {f} (known: {known:?})"
        );
    }
}

// ---------------------------------------------------------------------------------
// Kubernetes

#[test]
#[cfg_attr(
    missing_kubernetes_validate,
    ignore = "kubernetes-validate not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn kubernetes_manifests_match_the_openapi_schemas() {
    let kv = common::require_program(Tool::KubernetesValidate);
    let files: Vec<PathBuf> = yaml_files(&deploy("k8s"))
        .into_iter()
        .filter(|f| is_manifest(&read(f)))
        .collect();
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.strip_prefix(deploy("k8s")).unwrap().display().to_string())
        .collect();
    for want in [
        "namespace.yaml",
        "configmap.yaml",
        "secret.yaml",
        "coordinator.yaml",
        "trainer.yaml",
        "generator.yaml",
        "components/autoscaling/hpa.yaml",
    ] {
        assert!(names.contains(want), "deploy/k8s/{want} missing: {names:?}");
    }
    kube_validate(&kv, &files);
}

/// What `kubectl kustomize` makes of the base, of base + autoscaling component and of
/// base + sandbox component.
struct Rendered {
    base: String,
    autoscaled: String,
    sandboxed: String,
}

fn render(kubectl: &Path) -> Rendered {
    let k8s = deploy("k8s");
    let base = ok(Command::new(kubectl).arg("kustomize").arg(&k8s));
    // An overlay outside the tree (one inside the base's folder would be a cycle);
    // kustomize wants relative paths.
    let with = |component: &str| {
        let tmp = tempfile::tempdir().unwrap();
        let up = "../".repeat(tmp.path().components().count() - 1);
        let rel = |p: &Path| format!("{up}{}", p.strip_prefix("/").unwrap().display());
        std::fs::write(
            tmp.path().join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n  - {}\n",
                rel(&k8s),
                rel(&k8s.join(component))
            ),
        )
        .unwrap();
        let out = ok(Command::new(kubectl).arg("kustomize").arg(tmp.path()));
        String::from_utf8(out.stdout).unwrap()
    };
    Rendered {
        base: String::from_utf8(base.stdout).unwrap(),
        autoscaled: with("components/autoscaling"),
        sandboxed: with("components/sandbox"),
    }
}

#[test]
#[cfg_attr(
    any(missing_kubectl, missing_kubernetes_validate),
    ignore = "kubectl or kubernetes-validate not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn kustomization_renders_and_validates() {
    let kubectl = common::require_program(Tool::Kubectl);
    let kv = common::require_program(Tool::KubernetesValidate);
    let r = render(&kubectl);
    let tmp = tempfile::tempdir().unwrap();
    let (base, autoscaled, sandboxed) = (
        tmp.path().join("base.yaml"),
        tmp.path().join("autoscaled.yaml"),
        tmp.path().join("sandboxed.yaml"),
    );
    std::fs::write(&base, &r.base).unwrap();
    std::fs::write(&autoscaled, &r.autoscaled).unwrap();
    std::fs::write(&sandboxed, &r.sandboxed).unwrap();
    kube_validate(&kv, &[base, autoscaled, sandboxed]);

    // The documented way to make the real Secret (secret.yaml's comment) yields a
    // valid drop-in for the placeholder.
    let secret = ok(Command::new(&kubectl).args([
        "create",
        "secret",
        "generic",
        "tandem-token",
        "--namespace",
        "tandem",
        "--from-literal=token=0123456789abcdef",
        "--from-literal=generator-token=fedcba9876543210",
        "--dry-run=client",
        "-o",
        "yaml",
    ]));
    let secret_file = tmp.path().join("secret.yaml");
    std::fs::write(&secret_file, &secret.stdout).unwrap();
    kube_validate(&kv, &[secret_file]);
    assert!(read(&deploy("k8s/secret.yaml"))
        .contains("kubectl create secret generic tandem-token --namespace tandem"));

    let python = common::tools::yaml_python(&kv).expect("PyYAML: checked with kubernetes-validate");
    let generated = yaml_docs(&python, &String::from_utf8(secret.stdout).unwrap());
    assert_eq!(generated[0]["metadata"]["name"], "tandem-token");
    assert!(generated[0]["data"]["token"].is_string());
    assert!(generated[0]["data"]["generator-token"].is_string());
    let base = yaml_docs(&python, &r.base);
    let with_hpa = yaml_docs(&python, &r.autoscaled);
    check_cluster(&base, false);
    check_cluster(&with_hpa, true);
    check_adapter_matches_hpa(&python, &with_hpa);
    check_sandbox_component(&base, &yaml_docs(&python, &r.sandboxed));
}

/// The sandbox component lifts exactly what the generators' sandbox needs, on the
/// generators only: a user namespace for the pod, an unmasked /proc, no seccomp or
/// AppArmor profile; the rest of their security context stays as the base has it.
fn check_sandbox_component(base: &[Value], sandboxed: &[Value]) {
    let gen = |objs: &[Value]| find(objs, "Deployment", "tandem-generator").clone();
    let (b, s) = (gen(base), gen(sandboxed));
    let (bspec, sspec) = (
        &b["spec"]["template"]["spec"],
        &s["spec"]["template"]["spec"],
    );
    assert!(
        bspec["hostUsers"].is_null(),
        "the base keeps the host's users"
    );
    assert_eq!(sspec["hostUsers"], false);
    assert_eq!(
        bspec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(
        sspec["securityContext"]["seccompProfile"]["type"],
        "Unconfined"
    );
    let sc = &sspec["containers"][0]["securityContext"];
    assert_eq!(sc["procMount"], "Unmasked");
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sspec["securityContext"]["runAsNonRoot"], true);
    // Nothing else changes.
    for (kind, name) in base.iter().map(key) {
        if name != "tandem-generator" {
            assert_eq!(
                find(base, &kind, &name),
                find(sandboxed, &kind, &name),
                "{kind} {name}"
            );
        }
    }
}

fn key(o: &Value) -> (String, String) {
    (
        o["kind"].as_str().unwrap().to_string(),
        o["metadata"]["name"].as_str().unwrap().to_string(),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The value after `flag` in `args`, or inside a shell line `… flag VALUE …`.
fn arg_after(args: &[String], flag: &str) -> String {
    let words: Vec<String> = args
        .iter()
        .flat_map(|a| a.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    let i = words
        .iter()
        .position(|w| w == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    words[i + 1].trim_matches('"').to_string()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Cross-references of the rendered objects that the schemas cannot see.
fn check_cluster(objs: &[Value], autoscaled: bool) {
    let kinds: BTreeSet<(String, String)> = objs.iter().map(key).collect();
    let mut want: Vec<(&str, &str)> = vec![
        ("Namespace", "tandem"),
        ("ConfigMap", "tandem-config"),
        ("Secret", "tandem-token"),
        ("Deployment", "tandem-coordinator"),
        ("PersistentVolumeClaim", "tandem-coordinator-state"),
        ("Service", "tandem-coordinator"),
        ("StatefulSet", "tandem-trainer"),
        ("Service", "tandem-trainer"),
        ("Deployment", "tandem-generator"),
        ("PodDisruptionBudget", "tandem-generator"),
    ];
    if autoscaled {
        want.push(("HorizontalPodAutoscaler", "tandem-generator"));
    }
    for (k, n) in &want {
        assert!(
            kinds.contains(&(k.to_string(), n.to_string())),
            "{k} {n} missing"
        );
    }
    assert_eq!(kinds.len(), want.len(), "unexpected objects: {kinds:?}");
    for o in objs {
        if o["kind"] != "Namespace" {
            assert_eq!(
                o["metadata"]["namespace"],
                "tandem",
                "{:?} not in namespace tandem",
                key(o)
            );
        }
    }

    let coord = find(objs, "Deployment", "tandem-coordinator");
    let trainer = find(objs, "StatefulSet", "tandem-trainer");
    let gens = find(objs, "Deployment", "tandem-generator");
    assert_eq!(coord["spec"]["replicas"], 1);
    assert_eq!(coord["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(trainer["spec"]["replicas"], 1);
    assert_eq!(gens["spec"]["replicas"], 4, "the generators' replicas knob");

    // Every workload: selector ⊆ template labels; containers non-root, read-only root,
    // /tmp writable, probes on declared ports, the token from the Secret.
    let secret = find(objs, "Secret", "tandem-token");
    let mut pod_ports: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for w in [coord, trainer, gens] {
        let name = w["metadata"]["name"].as_str().unwrap();
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        for (k, v) in w["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "{name}: selector {k} not on its pods");
        }
        let spec = &w["spec"]["template"]["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        let containers = spec["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1, "{name}");
        let c = &containers[0];
        let sc = &c["securityContext"];
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        let mounts: BTreeSet<String> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap().to_string())
            .collect();
        assert!(mounts.contains("/tmp"), "{name}: /tmp not writable");
        let ports: BTreeMap<String, u64> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    p["containerPort"].as_u64().unwrap(),
                )
            })
            .collect();
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            let h = &c[probe]["httpGet"];
            assert_eq!(h["path"], path, "{name} {probe}");
            let port = h["port"].as_str().unwrap();
            assert!(ports.contains_key(port), "{name} {probe}: no port {port}");
        }
        let env: BTreeMap<String, &Value> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e))
            .collect();
        // Two roles: generators hold only the generators' token; the coordinator and
        // the trainer hold the run's and accept the generators'.
        let want: &[(&str, &str)] = if name == "tandem-generator" {
            &[("TANDEM_TOKEN", "generator-token")]
        } else {
            &[
                ("TANDEM_TOKEN", "token"),
                ("TANDEM_GENERATOR_TOKEN", "generator-token"),
            ]
        };
        assert_eq!(
            env.keys().filter(|k| k.contains("TOKEN")).count(),
            want.len(),
            "{name}"
        );
        for (var, key) in want {
            let token = &env[*var]["valueFrom"]["secretKeyRef"];
            assert_eq!(token["name"], "tandem-token", "{name}");
            assert_eq!(token["key"], *key, "{name} {var}");
            assert!(
                secret["stringData"].get(*key).is_some() || secret["data"].get(*key).is_some(),
                "{name}: secret has no key {key}"
            );
        }
        pod_ports.insert(name.to_string(), ports);
    }

    // Services select the pods of their workload and target their named ports.
    for (svc, wl) in [("tandem-coordinator", coord), ("tandem-trainer", trainer)] {
        let s = find(objs, "Service", svc);
        let labels = &wl["spec"]["template"]["metadata"]["labels"];
        for (k, v) in s["spec"]["selector"].as_object().unwrap() {
            assert_eq!(&labels[k], v, "Service {svc}: selector {k}");
        }
        let ports = &pod_ports[wl["metadata"]["name"].as_str().unwrap()];
        for p in s["spec"]["ports"].as_array().unwrap() {
            let t = p["targetPort"].as_str().unwrap();
            assert!(ports.contains_key(t), "Service {svc}: no pod port {t}");
        }
    }

    // The coordinator listens where its ports and Service say, and is scraped there.
    let cc = &coord["spec"]["template"]["spec"]["containers"][0];
    let args = strs(&cc["args"]);
    assert_eq!(args[0], "coordinator");
    assert_cli(
        "coordinator",
        &args[1..].join(" "),
        "coordinator Deployment",
    );
    let sets: BTreeMap<String, String> = args
        .windows(2)
        .filter(|w| w[0] == "--set")
        .map(|w| {
            let (k, v) = w[1].split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let cport = &pod_ports["tandem-coordinator"];
    assert_eq!(port_of(&sets["coordinator.listen"]), cport["grpc"]);
    assert_eq!(port_of(&sets["coordinator.http_listen"]), cport["http"]);
    let ann = &coord["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/scrape"], "true");
    assert_eq!(ann["prometheus.io/port"], cport["http"].to_string());
    let svc_coord = find(objs, "Service", "tandem-coordinator");
    let grpc_port = svc_coord["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc")
        .unwrap()["port"]
        .as_u64()
        .unwrap();
    let coordinator_addr = format!("tandem-coordinator:{grpc_port}");
    let config = find(objs, "ConfigMap", "tandem-config");
    assert!(config["data"]["config.toml"].is_string());
    assert!(cc["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"] == "/etc/tandem"));

    // The trainer: the run folder on its claim, resumed from there, advertised under
    // the headless Service's DNS name, with a GPU.
    let run_dir = &sets["run.run_dir"];
    let ts = &trainer["spec"]["template"]["spec"];
    let tc = &ts["containers"][0];
    let claim = &trainer["spec"]["volumeClaimTemplates"][0];
    let claim_name = claim["metadata"]["name"].as_str().unwrap();
    let run_mount = tc["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == claim_name)
        .expect("the claim is mounted")["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        run_dir.starts_with(&format!("{run_mount}/")),
        "run_dir {run_dir} is not on the trainer's volume {run_mount}"
    );
    assert_eq!(strs(&claim["spec"]["accessModes"]), ["ReadWriteOnce"]);
    let script = strs(&tc["args"]).join("\n");
    assert!(
        script.contains(&format!("{run_dir}/checkpoints/latest")),
        "{script}"
    );
    assert!(script.contains("--resume"), "{script}");
    let line = script
        .split("exec tandem trainer")
        .nth(1)
        .expect("exec tandem trainer");
    assert_cli(
        "trainer",
        &format!("{line} --resume"),
        "trainer StatefulSet",
    );
    let targs = vec![line.replace('\\', " ")];
    let headless = find(objs, "Service", "tandem-trainer");
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(trainer["spec"]["serviceName"], "tandem-trainer");
    let tport = pod_ports["tandem-trainer"]["grpc"];
    assert_eq!(
        arg_after(&targs, "--advertise"),
        format!("${{POD_NAME}}.tandem-trainer:{tport}")
    );
    assert_eq!(port_of(&arg_after(&targs, "--listen")), tport);
    assert_eq!(
        port_of(&arg_after(&targs, "--http")),
        pod_ports["tandem-trainer"]["http"]
    );
    assert_eq!(arg_after(&targs, "--coordinator"), coordinator_addr);

    // Generators: named after their pods, one GPU each.
    let gc = &gens["spec"]["template"]["spec"]["containers"][0];
    let gargs = strs(&gc["args"]);
    assert_eq!(gargs[0], "generator");
    assert_cli("generator", &gargs[1..].join(" "), "generator Deployment");
    assert_eq!(arg_after(&gargs, "--name"), "$(POD_NAME)");
    assert_eq!(arg_after(&gargs, "--coordinator"), coordinator_addr);
    assert_eq!(
        port_of(&arg_after(&gargs, "--http")),
        pod_ports["tandem-generator"]["http"]
    );
    for c in [tc, gc] {
        assert_eq!(
            c["resources"]["limits"]["nvidia.com/gpu"], 1,
            "{}",
            c["name"]
        );
        assert_eq!(
            c["resources"]["requests"]["nvidia.com/gpu"], 1,
            "{}",
            c["name"]
        );
        let env = c["env"].as_array().unwrap();
        assert!(
            env.iter().any(|e| e["name"] == "POD_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
            "{}: POD_NAME from the downward API",
            c["name"]
        );
    }

    let pdb = find(objs, "PodDisruptionBudget", "tandem-generator");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        gens["spec"]["selector"]["matchLabels"]
    );
    if autoscaled {
        let hpa = find(objs, "HorizontalPodAutoscaler", "tandem-generator");
        let t = &hpa["spec"]["scaleTargetRef"];
        assert_eq!(
            (t["kind"].as_str(), t["name"].as_str()),
            (Some("Deployment"), Some("tandem-generator"))
        );
        assert_eq!(hpa["spec"]["metrics"][0]["type"], "External");
    }
}

/// The HPA asks for the metric the adapter's rule serves, and that rule reads the
/// trainer's wait counter.
fn check_adapter_matches_hpa(python: &Path, objs: &[Value]) {
    let hpa = find(objs, "HorizontalPodAutoscaler", "tandem-generator");
    let wanted = hpa["spec"]["metrics"][0]["external"]["metric"]["name"].clone();
    let values = yaml_docs(
        python,
        &read(&deploy("k8s/extras/prometheus-adapter-values.yaml")),
    );
    let rules = values[0]["rules"]["external"]
        .as_array()
        .expect("rules.external");
    let rule = rules
        .iter()
        .find(|r| r["name"]["as"] == wanted)
        .unwrap_or_else(|| panic!("no adapter rule serves {wanted}"));
    assert!(rule["seriesQuery"]
        .as_str()
        .unwrap()
        .starts_with("tandem_trainer_wait_seconds_total"));
    assert_eq!(
        rule["resources"]["overrides"]["namespace"]["resource"],
        "namespace"
    );
}

/// The adapter's query, with its template filled in, is PromQL that promtool parses.
#[test]
#[cfg_attr(
    missing_promtool,
    ignore = "promtool not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn prometheus_adapter_query_is_promql() {
    let promtool = common::require_program(Tool::Promtool);
    let values = read(&deploy("k8s/extras/prometheus-adapter-values.yaml"));
    let field = |k: &str| -> String {
        let line = values
            .lines()
            .find(|l| {
                l.trim_start()
                    .trim_start_matches("- ")
                    .starts_with(&format!("{k}:"))
            })
            .unwrap_or_else(|| panic!("no {k}"));
        line.split_once(':')
            .unwrap()
            .1
            .trim()
            .trim_matches('\'')
            .to_string()
    };
    let series_query = field("seriesQuery");
    let query = common::replace_once(
        &field("metricsQuery"),
        "<<.Series>>",
        "tandem_trainer_wait_seconds_total",
    );
    let query = common::replace_once(&query, "<<.LabelMatchers>>", "namespace=\"tandem\"");
    assert!(!query.contains("<<"), "unfilled template in {query}");
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("adapter.rules.yml");
    std::fs::write(
        &rules,
        format!(
            "groups:\n  - name: adapter\n    rules:\n      - record: tandem_trainer_wait_fraction\n        expr: '{query}'\n      - record: adapter_series\n        expr: '{series_query}'\n"
        ),
    )
    .unwrap();
    ok(Command::new(promtool).args(["check", "rules"]).arg(&rules));
}

// ---------------------------------------------------------------------------------
// Compose

fn compose_cmd(c: &[PathBuf]) -> Command {
    let mut cmd = Command::new(&c[0]);
    cmd.args(&c[1..])
        .arg("-f")
        .arg(deploy("compose.yaml"))
        .env_remove("TANDEM_IMAGE")
        .env_remove("TANDEM_CONFIG")
        // Not the developer's deploy/.env: the file as committed.
        .arg("--env-file")
        .arg("/dev/null");
    cmd
}

#[test]
#[cfg_attr(
    missing_compose,
    ignore = "Docker Compose v2 not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn compose_file_is_valid_compose() {
    let c = common::require(Tool::Compose);
    // The token is required.
    let o = run(compose_cmd(&c)
        .args(["config", "--quiet"])
        .env_remove("TANDEM_TOKEN")
        .env("TANDEM_GENERATOR_TOKEN", "compose-generator-token"));
    assert!(
        !o.status.success(),
        "compose config without TANDEM_TOKEN succeeded"
    );
    assert!(text(&o).contains("TANDEM_TOKEN"), "{}", text(&o));

    let o = run(compose_cmd(&c)
        .args(["config", "--quiet"])
        .env("TANDEM_TOKEN", "compose-test-token")
        .env_remove("TANDEM_GENERATOR_TOKEN"));
    assert!(
        !o.status.success() && text(&o).contains("TANDEM_GENERATOR_TOKEN"),
        "compose config without TANDEM_GENERATOR_TOKEN: {}",
        text(&o)
    );
    let o = ok(compose_cmd(&c)
        .args(["config", "--format", "json"])
        .env("TANDEM_TOKEN", "compose-test-token")
        .env("TANDEM_GENERATOR_TOKEN", "compose-generator-token"));
    let project: Value = serde_json::from_slice(&o.stdout).unwrap();
    let services = project["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "coordinator",
            "trainer",
            "gen-0",
            "gen-1",
            "prometheus",
            "grafana"
        ])
    );
    let mut generator_names = BTreeSet::new();
    for (name, s) in services {
        // Every bind mount's source is in the repository.
        for v in s["volumes"].as_array().into_iter().flatten() {
            if v["type"] == "bind" {
                let src = PathBuf::from(v["source"].as_str().unwrap());
                assert!(
                    src.exists(),
                    "{name}: mounts {} which does not exist",
                    src.display()
                );
            }
        }
        if ["prometheus", "grafana"].contains(&name.as_str()) {
            continue;
        }
        // Two roles: generators hold only the generators' token.
        let env = &s["environment"];
        if name.starts_with("gen-") {
            assert_eq!(env["TANDEM_TOKEN"], "compose-generator-token", "{name}");
            assert!(env["TANDEM_GENERATOR_TOKEN"].is_null(), "{name}");
        } else {
            assert_eq!(env["TANDEM_TOKEN"], "compose-test-token", "{name}");
            assert_eq!(
                env["TANDEM_GENERATOR_TOKEN"], "compose-generator-token",
                "{name}"
            );
        }
        assert_eq!(s["read_only"], true, "{name}");
        assert_eq!(
            s["image"], services["coordinator"]["image"],
            "{name}: one image"
        );
        let check = strs(&s["healthcheck"]["test"]).join(" ");
        assert!(check.contains("/healthz"), "{name}: healthcheck {check}");
        let cmd = strs(&s["command"]);
        if name.starts_with("gen-") {
            assert_eq!(cmd[0], "generator");
            assert_cli("generator", &cmd[1..].join(" "), name);
            assert_eq!(
                arg_after(&cmd, "--name"),
                *name,
                "generator named after its service"
            );
            assert_eq!(arg_after(&cmd, "--coordinator"), "coordinator:50051");
            assert!(check.contains(&format!(":{}/", port_of(&arg_after(&cmd, "--http")))));
            generator_names.insert(name.clone());
        } else if name == "coordinator" {
            assert_eq!(cmd[0], "coordinator");
            assert_cli("coordinator", &cmd[1..].join(" "), name);
            assert!(check.contains(":9090/"));
        } else {
            assert_eq!(name, "trainer");
            let script = cmd.join("\n").replace("$$", "$");
            let line = script
                .split("exec tandem trainer")
                .nth(1)
                .expect("exec tandem trainer");
            assert_cli("trainer", &format!("{line} --resume"), name);
            let targs = vec![line.replace('\\', " ")];
            assert_eq!(arg_after(&targs, "--advertise"), "trainer:50052");
            assert_eq!(arg_after(&targs, "--coordinator"), "coordinator:50051");
            assert!(check.contains(&format!(":{}/", port_of(&arg_after(&targs, "--http")))));
        }
    }
    assert_eq!(generator_names.len(), 2);
    for name in ["coordinator", "trainer", "gen-0", "gen-1"] {
        // The base gives no Tandem service more than no-new-privileges.
        let opts = strs(&services[name]["security_opt"]);
        assert_eq!(opts, ["no-new-privileges:true"], "{name}");
    }

    // compose.sandbox.yaml: the generators, and only they, may build namespaces.
    let o = ok(compose_cmd(&c)
        .arg("-f")
        .arg(deploy("compose.sandbox.yaml"))
        .args(["config", "--format", "json"])
        .env("TANDEM_TOKEN", "compose-test-token")
        .env("TANDEM_GENERATOR_TOKEN", "compose-generator-token"));
    let sandboxed: Value = serde_json::from_slice(&o.stdout).unwrap();
    for (name, s) in sandboxed["services"].as_object().unwrap() {
        let opts: BTreeSet<String> = strs(&s["security_opt"]).into_iter().collect();
        let want: BTreeSet<String> = if name.starts_with("gen-") {
            [
                "no-new-privileges:true",
                "seccomp=unconfined",
                "apparmor=unconfined",
                "systempaths=unconfined",
            ]
            .map(String::from)
            .into()
        } else {
            strs(&services[name.as_str()]["security_opt"])
                .into_iter()
                .collect()
        };
        assert_eq!(opts, want, "{name}");
        if name.starts_with("gen-") {
            assert_eq!(strs(&s["cap_drop"]), ["ALL"], "{name}");
            assert_eq!(s["read_only"], true, "{name}");
        }
    }

    // The coordinator serves where the scrape config looks and the healthcheck asks.
    let config = read(&deploy("config/tiny.toml"));
    assert!(config.contains("http_listen = \"0.0.0.0:9090\""));
    assert!(config.contains("listen = \"0.0.0.0:50051\""));
    assert!(config.contains("run_dir = \"/var/lib/tandem/run\""));
    let prom = read(&deploy("prometheus/prometheus.yml"));
    assert!(
        prom.contains("coordinator:9090"),
        "prometheus.yml does not scrape coordinator:9090"
    );

    // Grafana: the provisioned dashboards folder is where compose mounts the JSON, and
    // the dashboards use the provisioned datasource.
    let grafana = &services["grafana"];
    let provider = read(&deploy("grafana/provisioning/dashboards/tandem.yml"));
    let mounted: Vec<(String, String)> = grafana["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["type"] == "bind")
        .map(|v| {
            (
                v["source"].as_str().unwrap().to_string(),
                v["target"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let (dash_source, dash_target) = mounted
        .iter()
        .find(|(s, _)| s.ends_with("grafana/dashboards"))
        .expect("dashboards mounted");
    assert!(
        provider.contains(&format!("path: {dash_target}")),
        "{provider}"
    );
    // The home dashboard is one of the mounted files.
    let home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        .as_str()
        .unwrap();
    let home_rel = home
        .strip_prefix(&format!("{dash_target}/"))
        .unwrap_or_else(|| panic!("home dashboard {home} is not under {dash_target}"));
    assert!(
        Path::new(dash_source).join(home_rel).is_file(),
        "the home dashboard {home_rel} is not in {dash_source}"
    );
    let datasource = read(&deploy("grafana/provisioning/datasources/prometheus.yml"));
    assert!(datasource.contains("url: http://prometheus:9090"));
    let uid = datasource
        .lines()
        .find_map(|l| l.trim().strip_prefix("uid: "))
        .expect("datasource uid")
        .to_string();
    for entry in std::fs::read_dir(deploy("grafana/dashboards")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let dash: Value = serde_json::from_str(&read(&p)).unwrap();
        let mut uids = BTreeSet::new();
        datasource_uids(&dash, &mut uids);
        for u in uids {
            assert!(
                u == uid || u.starts_with('$') || u == "-- Grafana --" || u == "grafana",
                "{}: datasource uid {u:?} is neither {uid:?} nor a variable",
                p.display()
            );
        }
    }
}

fn datasource_uids(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(ds) = m.get("datasource") {
                if let Some(u) = ds.get("uid").and_then(Value::as_str) {
                    out.insert(u.to_string());
                }
            }
            m.values().for_each(|x| datasource_uids(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| datasource_uids(x, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------
// Dockerfiles

/// The images run `tandem` as a non-root user, build with cache mounts, and the CUDA
/// image builds a feature that exists; the build context leaves out targets and runs.
#[test]
fn dockerfiles_are_non_root_and_build_existing_features() {
    for f in ["Dockerfile", "Dockerfile.cuda"] {
        let text = read(&deploy(&format!("docker/{f}")));
        assert!(text.contains("ENTRYPOINT [\"tandem\"]"), "{f}");
        assert!(text.contains("USER 10001:10001"), "{f}: not non-root");
        assert!(
            text.contains("--mount=type=cache"),
            "{f}: no cargo cache mounts"
        );
    }
    // The CUDA image builds a cargo feature that exists.
    let cuda = read(&deploy("docker/Dockerfile.cuda"));
    assert!(cuda.contains("ARG CARGO_FEATURES=cuda\n"));
    assert!(cuda.contains("--features \"${CARGO_FEATURES}\""));
    let cargo = read(&root().join("Cargo.toml"));
    assert!(
        cargo.contains("\ncuda = ["),
        "no `cuda` feature in Cargo.toml"
    );
    let ignore = read(&root().join(".dockerignore"));
    for want in ["**/target", "runs/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == want),
            ".dockerignore lacks {want}"
        );
    }
}

/// The Dockerfiles pass hadolint (with ShellCheck on their RUN lines).
#[test]
#[cfg_attr(
    missing_hadolint,
    ignore = "hadolint not installed (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn dockerfiles_pass_hadolint() {
    let hadolint = common::require_program(Tool::Hadolint);
    ok(Command::new(hadolint)
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(deploy("docker/Dockerfile"))
        .arg(deploy("docker/Dockerfile.cuda")));
}

// ---------------------------------------------------------------------------------
// Without external tools: the binary and /bin/sh.

/// The trainer's start script passes --resume exactly when the run folder holds a
/// checkpoint, starts no trainer on a finished run, and advertises the pod's DNS name
/// (Kubernetes) or the service (compose).
#[test]
fn trainer_wrapper_resumes_only_from_a_checkpoint() {
    let cases = [
        (
            block_scalar(&read(&deploy("k8s/trainer.yaml"))),
            "tandem-trainer-0.tandem-trainer:50052",
        ),
        (
            // Compose turns `$$` into `$`.
            block_scalar(&read(&deploy("compose.yaml"))).replace("$$", "$"),
            "trainer:50052",
        ),
    ];
    for (script, advertise) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let fake = bin.join("tandem");
        std::fs::write(&fake, "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$ARGS_OUT\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let run_dir = tmp.path().join("run");
        assert!(
            script.contains("/var/lib/tandem/run/checkpoints/latest"),
            "{script}"
        );
        let script = script.replace("/var/lib/tandem/run", run_dir.to_str().unwrap());
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let args_out = tmp.path().join("args");
        let start = |expect_resume: bool| {
            ok(Command::new("/bin/sh")
                .args(["-ec", &script])
                .env("PATH", &path)
                .env("POD_NAME", "tandem-trainer-0")
                .env("ARGS_OUT", &args_out));
            let args: Vec<String> = read(&args_out).lines().map(str::to_string).collect();
            assert_eq!(args[0], "trainer");
            assert_eq!(
                args.contains(&"--resume".to_string()),
                expect_resume,
                "{args:?}"
            );
            assert_eq!(arg_after(&args, "--advertise"), advertise);
        };
        start(false);
        std::fs::create_dir_all(run_dir.join("checkpoints")).unwrap();
        start(false);
        std::fs::write(run_dir.join("checkpoints/latest"), "step-20\n").unwrap();
        start(true);
        // A finished run is not trained again: the script exits without the trainer.
        std::fs::remove_file(&args_out).unwrap();
        std::fs::write(run_dir.join("trainer-summary.json"), "{}").unwrap();
        let o = ok(Command::new("/bin/sh")
            .args(["-ec", &script])
            .env("PATH", &path)
            .env("POD_NAME", "tandem-trainer-0")
            .env("ARGS_OUT", &args_out));
        assert!(!args_out.exists(), "a finished run started the trainer");
        assert!(text(&o).contains("has finished"), "{}", text(&o));
    }
}

/// The shipped configs are accepted by `tandem coordinator` (unknown keys, bad values
/// and a bad data section fail at start), which then serves /readyz. Loopback only.
#[test]
fn deploy_configs_start_a_coordinator() {
    let configmap = read(&deploy("k8s/configmap.yaml"));
    let k8s_config = block_after(&configmap, "config.toml: |");
    let tmp = tempfile::tempdir().unwrap();
    let k8s_path = tmp.path().join("k8s.toml");
    std::fs::write(&k8s_path, &k8s_config).unwrap();
    for (name, path) in [
        ("deploy/config/tiny.toml", deploy("config/tiny.toml")),
        ("deploy/k8s/configmap.yaml", k8s_path),
    ] {
        let dir = tmp.path().join(name.replace('/', "_"));
        std::fs::create_dir_all(&dir).unwrap();
        let addr_file = dir.join("addr.json");
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("coordinator")
            .arg("--config")
            .arg(&path)
            .args(["--set", "coordinator.listen=127.0.0.1:0"])
            .args(["--set", "coordinator.http_listen=127.0.0.1:0"])
            .arg("--set")
            .arg(format!("run.run_dir={}", dir.join("run").display()))
            .arg("--addr-file")
            .arg(&addr_file)
            .env("TANDEM_TOKEN", "manifests-test-token")
            .env("TANDEM_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let ready = loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "{name}: coordinator exited ({status}):\n{}",
                    read(&dir.join("log"))
                );
            }
            if let Ok(t) = std::fs::read_to_string(&addr_file) {
                if let Ok(v) = serde_json::from_str::<Value>(&t) {
                    break http_get(v["http"].as_str().unwrap(), "/readyz");
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("{name}: the coordinator did not start in 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            ready.starts_with("HTTP/1.1 200"),
            "{name}: /readyz answered {ready}"
        );
    }
}

/// The indented block after the line that ends with `marker`, dedented.
fn block_after(yaml: &str, marker: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let i = lines
        .iter()
        .position(|l| l.trim_end().ends_with(marker))
        .unwrap_or_else(|| panic!("no {marker}"));
    let indent_of = |l: &str| l.len() - l.trim_start().len();
    let outer = indent_of(lines[i]);
    let body: Vec<&str> = lines[i + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent_of(l) > outer)
        .copied()
        .collect();
    let inner = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent_of(l))
        .min()
        .unwrap();
    body.iter()
        .map(|l| if l.len() >= inner { &l[inner..] } else { "" })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
