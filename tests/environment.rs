//! The Environment service from another language: `examples/envs/guess_number.py`
//! (Python; its gRPC stubs generated from the `.proto` at start) plays multi-turn
//! episodes with a `tandem run` of the tiny model. Needs a Python with grpcio and
//! grpcio-tools (`deploy/install-validators.sh` installs them; required in CI).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const ENV_TOKEN: &str = "environment-token-0123";

/// A Python that has `modules`: `TANDEM_TEST_PYTHON`, else the validators' venv's.
fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let python = deploy_tool(Some("TANDEM_TEST_PYTHON"), &["python3"])?;
    let check = format!("import {}", modules.join(", "));
    Command::new(&python)
        .args(["-c", &check])
        .status()
        .ok()?
        .success()
        .then_some(python)
}

/// The running example environment; killed on drop.
struct EnvServer(Child, String);

impl Drop for EnvServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_env(python: &Path) -> EnvServer {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envs/guess_number.py");
    let mut child = Command::new(python)
        .arg(script)
        .args(["--port", "0"])
        .env("TANDEM_ENV_TOKEN", ENV_TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the environment said {line:?}"))
        .to_string();
    EnvServer(child, addr)
}

#[test]
fn a_python_environment_plays_multi_turn_episodes() {
    let Some(python) = python_with(&["grpc", "grpc_tools"]) else {
        return unavailable(
            "no Python with grpcio and grpcio-tools (deploy/install-validators.sh)",
        );
    };
    let env = start_env(&python);

    // Token-checked like every Tandem service: another token is refused.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = rt.block_on(async {
        use tandem_proto::auth::Credentials;
        let creds = Credentials::new("not-the-environment-token", Default::default()).unwrap();
        let ch = tandem_proto::client::connect(&env.1, &creds).await.unwrap();
        tandem_proto::client::environment(ch, &creds)
            .reset(tandem_proto::v1::ResetRequest::default())
            .await
    });
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unauthenticated);

    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let run = dir.path().join("run");
    let steps = 4;
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
steps = {steps}
batch_groups = 2
group_size = 4
max_staleness = 1
generators = 1
run_dir = "{run}"

[model]
path = "{model}"

[data]
kind = "arithmetic"
chat = false
template = "{{question}} ="

[generator]
temperature = 1.0
max_new_tokens = 64
prompts_per_batch = 2

[reward]
math = 0.0
format = 0.0

[env]
service = "{addr}"
max_turns = 4

[algorithm]
temperature = 1.0

[trainer]
dump_batches = true
"#,
            run = run.display(),
            model = model.display(),
            addr = env.1,
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap()])
        .env("TANDEM_LOG", "warn")
        .env("TANDEM_ENV_TOKEN", ENV_TOKEN)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Episodes had several turns, and every environment span is the environment's
    // answer as the generator wrote it: "\nResult: <observation>\n".
    let tok = tandem_model::Tokenizer::from_hf_dir(&model).unwrap();
    let mut multi_turn = 0;
    let mut spans = 0;
    for step in 1..=steps {
        let text =
            std::fs::read_to_string(run.join(format!("batches/step-{step:06}.jsonl"))).unwrap();
        for line in text.lines() {
            let r: Value = serde_json::from_str(line).unwrap();
            let reward = r["reward"].as_f64().unwrap();
            assert!(
                reward == 0.0 || reward == 1.0,
                "reward {reward}: only the game's"
            );
            let turns = r["episode"]["turns"].as_u64().unwrap();
            assert!((1..=4).contains(&turns), "{turns} turns");
            if turns > 1 {
                multi_turn += 1;
            }
            let ids: Vec<u32> = r["completion_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let Some(mask) = r["loss_mask"].as_array() else {
                assert_eq!(turns, 1);
                continue;
            };
            // The environment's spans: runs of 0.
            let mut t = 0;
            while t < mask.len() {
                if mask[t] == 0 {
                    let start = t;
                    while t < mask.len() && mask[t] == 0 {
                        t += 1;
                    }
                    let span = tok.decode(&ids[start..t], false).unwrap();
                    let obs = span
                        .strip_prefix("\nResult: ")
                        .and_then(|s| s.strip_suffix('\n'))
                        .unwrap_or_else(|| panic!("environment span {span:?}"));
                    assert!(
                        obs == "Say a number from 0 to 99."
                            || obs.ends_with(" is wrong: higher.")
                            || obs.ends_with(" is wrong: lower."),
                        "{obs:?}"
                    );
                    spans += 1;
                } else {
                    t += 1;
                }
            }
        }
    }
    assert!(
        multi_turn > 0 && spans >= multi_turn,
        "{multi_turn} multi-turn episodes, {spans} spans"
    );
    let last: Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert!(last["turns_per_episode"].as_f64().unwrap() >= 1.0);
    // The report plots turns and tool calls per episode for a multi-turn run.
    ok(tandem(&["report", run.to_str().unwrap()]));
    let svg = std::fs::read_to_string(run.join("report/episodes.svg")).unwrap();
    assert!(svg.contains("turns") && svg.contains("tool calls"), "{svg}");
}
