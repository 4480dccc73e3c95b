//! Running the `tandem` binary from integration tests.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod python_sdk;
pub mod tools;

pub use tools::Tool;

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

/// The tool's command line (a program, then arguments); a missing tool fails the test,
/// naming it and how to install it. Under `TANDEM_SKIP_MISSING_TOOLS=1`, build.rs marks
/// the test ignored instead (it must carry `#[cfg_attr(missing_<tool>, ignore = …)]`).
#[track_caller]
pub fn require(tool: Tool) -> Vec<PathBuf> {
    match tool.find() {
        Ok(cmd) => cmd,
        Err(why) => panic!(
            "{why}. Install it ({}), or run the tests through scripts/test.sh, which installs \
             everything the suite needs. With TANDEM_SKIP_MISSING_TOOLS=1 the tests that need \
             it are reported as ignored instead.",
            tool.install()
        ),
    }
}

/// [`require`] for a tool that is one program.
#[track_caller]
pub fn require_program(tool: Tool) -> PathBuf {
    let mut cmd = require(tool);
    assert_eq!(cmd.len(), 1, "{tool:?} is the command line {cmd:?}");
    cmd.remove(0)
}

/// `text` with its one occurrence of `from` replaced by `to`; panics unless `from`
/// occurs exactly once (an edit that silently matched nothing would test another case).
pub fn replace_once(text: &str, from: &str, to: &str) -> String {
    let n = text.matches(from).count();
    assert_eq!(n, 1, "{from:?} occurs {n} times, not once, in:\n{text}");
    text.replacen(from, to, 1)
}

/// A TOML config with `sets` applied as `tandem run --set` applies them
/// (`section.key=value`, the value in TOML syntax): for the processes that read a config
/// file but take no `--set` (the coordinator). Panics on a malformed override.
pub fn with_set(text: &str, sets: &[&str]) -> String {
    let mut doc: toml::Table = toml::from_str(text).expect("the config is TOML");
    for s in sets {
        let (key, value) = s.split_once('=').expect("section.key=value");
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .unwrap_or_else(|e| panic!("{s}: the value is not TOML: {e}"))
            .remove("v")
            .unwrap();
        let parts: Vec<&str> = key.split('.').collect();
        assert!(
            parts.len() >= 2,
            "{s}: the key must be dotted, like run.steps"
        );
        let mut table = &mut doc;
        for p in &parts[..parts.len() - 1] {
            table = table
                .entry(p.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("{s}: `{p}` is not a section"));
        }
        table.insert(parts[parts.len() - 1].to_string(), value);
    }
    toml::to_string(&doc).unwrap()
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

/// Serves `service` as an Environment service that requires `token`, on a loopback
/// port of its own runtime (kept alive by the caller); returns the runtime and the
/// address.
pub fn serve_environment<E: tandem_proto::v1::environment_server::Environment>(
    token: &str,
    service: E,
) -> (tokio::runtime::Runtime, String) {
    use tandem_proto::v1::environment_server::EnvironmentServer;
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
                EnvironmentServer::new(service),
                tandem_proto::auth::RequireToken::new(token),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (rt, addr)
}

/// Whether a call ("Reset", "Step") of an episode (its id) fails.
pub type FailsWhen = dyn Fn(&str, &str) -> bool + Send + Sync;

/// An Environment service for failure tests: every episode ends at its first `Step`
/// with reward 1 (so a trained completion's reward is 1, never a made-up 0), and the
/// calls of each episode are recorded. `fails` says which calls fail (with
/// `INTERNAL`, which no client retries): given the call ("Reset" or "Step") and the
/// episode id (`LEASE/SAMPLE`, `LEASE/SAMPLE/RETRY` when the group runs again).
#[derive(Clone)]
pub struct FlakyEnvironment {
    pub fails: std::sync::Arc<FailsWhen>,
    /// (call, episode id) of every call, in order.
    pub calls: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl FlakyEnvironment {
    pub fn new(fails: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        FlakyEnvironment {
            fails: std::sync::Arc::new(fails),
            calls: Default::default(),
        }
    }

    fn call(&self, call: &str, episode: &str) -> Result<(), tonic::Status> {
        self.calls
            .lock()
            .unwrap()
            .push((call.to_string(), episode.to_string()));
        if (self.fails)(call, episode) {
            return Err(tonic::Status::internal(format!(
                "{call} broke for {episode}"
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl tandem_proto::v1::environment_server::Environment for FlakyEnvironment {
    async fn reset(
        &self,
        req: tonic::Request<tandem_proto::v1::ResetRequest>,
    ) -> Result<tonic::Response<tandem_proto::v1::ResetReply>, tonic::Status> {
        self.call("Reset", &req.get_ref().episode_id)?;
        Ok(tonic::Response::new(tandem_proto::v1::ResetReply {
            observation: String::new(),
        }))
    }

    async fn step(
        &self,
        req: tonic::Request<tandem_proto::v1::StepRequest>,
    ) -> Result<tonic::Response<tandem_proto::v1::StepReply>, tonic::Status> {
        self.call("Step", &req.get_ref().episode_id)?;
        Ok(tonic::Response::new(tandem_proto::v1::StepReply {
            observation: String::new(),
            reward: 1.0,
            done: true,
        }))
    }
}
