//! Running the `tandem` binary from integration tests.
#![allow(dead_code)]

pub mod fault_proxy;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env("TANDEM_LOG", "warn")
        .output()
        .expect("run tandem")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success, showing stderr otherwise.
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", stderr(&o));
    o
}

/// Fails with a message that contains every `needle`, without a panic.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panicked instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "error should mention `{n}`: {err}");
    }
}

/// `tandem model init --preset tiny --seed 0` into `dir/tiny`.
pub fn init_tiny(dir: &Path) -> PathBuf {
    let out = dir.join("tiny");
    ok(tandem(&[
        "model",
        "init",
        "--preset",
        "tiny",
        "--seed",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]));
    out
}

/// `tandem train-step` with these paths (not asserted: callers check success or failure).
pub fn train_step(model: &Path, rollouts: &Path, config: &Path, out: &Path) -> Output {
    tandem(&[
        "train-step",
        "--model",
        model.to_str().unwrap(),
        "--rollouts",
        rollouts.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
}

/// The `tandem_…` metric names a PromQL text (dashboard queries, alert rules) refers
/// to, as exported families: histogram series (`_bucket`, `_sum`, `_count`) count as
/// their histogram; recording-rule names (`tandem:…`) are not metrics.
pub fn referenced_metrics(text: &str) -> std::collections::BTreeSet<String> {
    let bytes = text.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = std::collections::BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("tandem_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            let name = &text[start..end];
            if !name.contains(':') {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(name);
                out.insert(family.to_string());
            }
        }
        i = end.max(start + 1);
    }
    out
}

/// Whether the deploy tests must find their tools (`TANDEM_REQUIRE_DEPLOY_TOOLS=1`, set
/// by `deploy/install-validators.sh` once it installed them all, as in CI).
pub fn deploy_tools_required() -> bool {
    std::env::var("TANDEM_REQUIRE_DEPLOY_TOOLS").is_ok_and(|v| v == "1")
}

/// A deploy check that cannot run here: fails when the tools are required, else says
/// why and lets the test return.
pub fn unavailable(what: &str) {
    if deploy_tools_required() {
        panic!("{what} (TANDEM_REQUIRE_DEPLOY_TOOLS=1)");
    }
    eprintln!("SKIPPED: {what}");
}

pub fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A validator: `$var` (when given) if set, else the first of `names` in `$TANDEM_DEPLOY_TOOLS`
/// (the venv deploy/install-validators.sh makes), on `PATH`, or in /usr/sbin and /sbin
/// (daemons, often off a user's PATH).
pub fn deploy_tool(var: Option<&str>, names: &[&str]) -> Option<PathBuf> {
    let set = var.and_then(|v| Some((v, std::env::var_os(v).filter(|p| !p.is_empty())?)));
    if let Some((var, p)) = set {
        let p = PathBuf::from(p);
        assert!(executable(&p), "{var}={} is not an executable", p.display());
        return Some(p);
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("TANDEM_DEPLOY_TOOLS").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.extend([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]);
    dirs.iter()
        .flat_map(|d| names.iter().map(move |n| d.join(n)))
        .find(|p| executable(p))
}

/// Serves `service` as a reward service that requires `token`, on a loopback port of
/// its own runtime (kept alive by the caller); returns the runtime and the address.
pub fn serve_reward<R: tandem_proto::v1::reward_server::Reward>(
    token: &str,
    service: R,
) -> (tokio::runtime::Runtime, String) {
    use tandem_proto::v1::reward_server::RewardServer;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(tonic::service::interceptor::InterceptedService::new(
                RewardServer::new(service),
                tandem_proto::auth::RequireToken::new(token),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (rt, addr)
}
