//! The Python SDK of `python/` (`tandem_sdk`), built for the tests as `pip install`
//! builds it (its stubs generated from `proto/proto` by its setup.py), from a copy of
//! `python/` and `proto/proto`, so nothing is written into the checkout and what runs
//! is this checkout's code, never an older install. Built once per test binary into
//! `$CARGO_TARGET_TMPDIR/python-sdk/<binary>/site`; children import it through
//! `PYTHONPATH` ([`Sdk::command`]).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A built SDK and the Python that runs it.
pub struct Sdk {
    pub python: PathBuf,
    /// The folder `pip install --target` wrote (`tandem_sdk` in it).
    pub site: PathBuf,
}

impl Sdk {
    /// `python ARGS…` importing this build of the SDK, in the repository root, with the
    /// gRPC core's own log limited to errors.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.python);
        c.current_dir(repo())
            .env("PYTHONPATH", &self.site)
            .env("GRPC_VERBOSITY", "ERROR");
        c
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The SDK built with `python` (a Python with grpcio, grpcio-tools and setuptools:
/// `Tool::PythonSdk`); the first call builds it, a failed build fails the test with
/// pip's output.
pub fn build(python: &Path) -> &'static Sdk {
    static SDK: OnceLock<Sdk> = OnceLock::new();
    SDK.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_stem().unwrap().to_string_lossy().into_owned();
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("python-sdk")
            .join(name);
        let _ = std::fs::remove_dir_all(&root);
        let staging = root.join("src");
        copy_tree(&repo().join("python"), &staging.join("python"));
        copy_tree(&repo().join("proto/proto"), &staging.join("proto/proto"));
        let site = root.join("site");
        let out = Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-build-isolation",
                "--target",
            ])
            .arg(&site)
            .arg(staging.join("python"))
            .output()
            .expect("run pip");
        assert!(
            out.status.success(),
            "building the SDK (pip install python/) failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            site.join("tandem_sdk/_proto/reward_pb2_grpc.py").is_file(),
            "the SDK's build generated no stubs"
        );
        Sdk {
            python: python.to_path_buf(),
            site,
        }
    })
}

/// Copies the files of `from` into `to`, leaving out build outputs (`build/`,
/// `*.egg-info`, `__pycache__`, stubs an editable install generated in place).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let skip = name == "build"
            || name == "__pycache__"
            || name.ends_with(".egg-info")
            || (from.ends_with("_proto") && name.contains("_pb2"));
        if skip {
            continue;
        }
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&path, &to.join(&name));
        } else {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}
