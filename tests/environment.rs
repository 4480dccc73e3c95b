//! The Environment service from another language: `examples/envs/guess_number.py`
//! (Python, on the SDK of python/, built from this checkout: tests/common/python_sdk.rs)
//! plays multi-turn episodes with a `tandem run` of the tiny model. Needs a Python with
//! grpcio, grpcio-tools and setuptools, and one with httpx for the agent test
//! (`$TANDEM_TEST_PYTHON`: scripts/test.sh makes a venv with tests/requirements.txt);
//! without it the tests fail, or with TANDEM_SKIP_MISSING_TOOLS=1 are reported as
//! ignored.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

const ENV_TOKEN: &str = "environment-token-0123";

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
    let mut child = common::python_sdk::build(python)
        .command()
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

/// The completions the trainer dumped for step `step` of the run in `run`
/// (`[trainer] dump_batches`), one JSON object each.
fn dumped_batch(run: &Path, step: u64) -> Vec<Value> {
    std::fs::read_to_string(run.join(format!("batches/step-{step:06}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A dumped completion's token ids.
fn completion_ids(r: &Value) -> Vec<u32> {
    r["completion_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
#[cfg_attr(
    missing_python_sdk,
    ignore = "no Python with grpcio, grpcio-tools and setuptools (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn a_python_environment_plays_multi_turn_episodes() {
    let python = require_program(Tool::PythonSdk);
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
        for r in dumped_batch(&run, step) {
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
            let ids = completion_ids(&r);
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

/// An agent program in Python (`examples/agents/calculator_agent.py`, through
/// `tests/fixtures/agent_probe.py`, which first checks the endpoint's refusals and
/// records every reply) drives episodes of the tiny model over the OpenAI-compatible
/// endpoint with plain `httpx`. Each episode's requests extend one conversation, so
/// they become one sample: the trained tokens are the model's replies exactly as the
/// agent received them, with the agent's messages between them masked; the trainer
/// accepts the groups and the run finishes.
#[test]
#[cfg_attr(
    missing_python_httpx,
    ignore = "no Python with httpx (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn an_agent_program_trains_through_the_openai_endpoint() {
    let python = require_program(Tool::PythonHttpx);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let run = dir.path().join("run");
    let traces = dir.path().join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    let steps = 3;
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
steps = {steps}
batch_groups = 2
group_size = 2
max_staleness = 1
generators = 1
run_dir = "{run}"

[model]
path = "{model}"

[data]
kind = "arithmetic"
chat = true
template = "What is {{question}}?"

[generator]
temperature = 1.0
max_new_tokens = 160
prompts_per_batch = 2

[reward]
math = 0.0
format = 0.0

[env]
agent = ["{python}", "{probe}", "--max-tokens", "32"]
max_turns = 3

[algorithm]
temperature = 1.0

[trainer]
dump_batches = true
"#,
            run = run.display(),
            model = model.display(),
            python = python.display(),
            probe = root.join("tests/fixtures/agent_probe.py").display(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap()])
        .env("TANDEM_LOG", "warn")
        .env(
            "AGENT_SCRIPT",
            root.join("examples/agents/calculator_agent.py"),
        )
        .env("AGENT_TRACE_DIR", &traces)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Every agent got past the probes and ended well (a failed one is logged as
    // "[env] agent: …").
    let log = std::fs::read_to_string(run.join("logs/gen-0.log")).unwrap();
    assert!(!log.contains("[env] agent:"), "{log}");

    // Each episode's trace: its lease, its sample index, the replies it received.
    let mut replies: std::collections::HashMap<(u64, u64), Vec<Value>> = Default::default();
    for entry in std::fs::read_dir(&traces).unwrap() {
        let t: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        let id = t["task"]["episode_id"].as_str().unwrap().to_string();
        let lease: u64 = id.split('-').next().unwrap().parse().unwrap();
        let sample = t["task"]["sample"].as_u64().unwrap();
        replies.insert((lease, sample), t["replies"].as_array().unwrap().clone());
    }
    let tok = tandem_model::Tokenizer::from_hf_dir(&model).unwrap();
    let eos = tandem_model::preset::EOS_ID;
    let (mut checked, mut multi_turn) = (0, 0);
    for step in 1..=steps {
        // Completions seen so far of each group.
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        for r in dumped_batch(&run, step) {
            let reward = r["reward"].as_f64().unwrap();
            assert!(
                reward == 0.0 || reward == 1.0,
                "reward {reward}: the agent's"
            );
            let lease: u64 = r["group"]
                .as_str()
                .unwrap()
                .split("-l")
                .nth(1)
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let ids = completion_ids(&r);
            let mask: Vec<u64> = match r["loss_mask"].as_array() {
                Some(m) => m.iter().map(|x| x.as_u64().unwrap()).collect(),
                None => vec![1; ids.len()],
            };
            // The model's spans (runs of 1) and the spans between them.
            let mut spans: Vec<(bool, std::ops::Range<usize>)> = Vec::new();
            for (t, &m) in mask.iter().enumerate() {
                match spans.last_mut() {
                    Some((model, range)) if *model == (m == 1) => range.end = t + 1,
                    _ => spans.push((m == 1, t..t + 1)),
                }
            }
            let model_spans: Vec<_> = spans.iter().filter(|s| s.0).map(|s| s.1.clone()).collect();
            let turns = r["episode"]["turns"].as_u64().unwrap_or(1) as usize;
            assert_eq!(model_spans.len(), turns, "{r}");
            if turns > 1 {
                multi_turn += 1;
                // Between two turns: the agent's follow-up, tokenized once, masked.
                let between = spans.iter().skip_while(|s| !s.0).find(|s| !s.0).unwrap();
                let text = tok.decode(&ids[between.1.clone()], false).unwrap();
                assert!(text.contains("Answer with the number only."), "{text:?}");
            }
            // The samples of a group are its episodes', in order; with one sample per
            // episode, completion k of the group is sample k's episode.
            let counter = seen
                .entry(r["group"].as_str().unwrap().to_string())
                .or_default();
            let sample = *counter;
            *counter += 1;
            // Each of the group's episodes left its trace (group_size = 2).
            for j in 0..2 {
                assert!(
                    replies.contains_key(&(lease, j)),
                    "lease {lease} episode {j}"
                );
            }
            let Some(got) = replies.get(&(lease, sample)) else {
                continue;
            };
            if got.len() != turns {
                continue; // An episode split into samples: matched by the unit tests.
            }
            for (span, reply) in model_spans.iter().zip(got) {
                let message = &reply["choices"][0]["message"];
                if message["tool_calls"].is_array() {
                    continue;
                }
                let tokens = &ids[span.clone()];
                let body = match tokens.split_last() {
                    Some((&last, body)) if last == eos => body,
                    _ => tokens,
                };
                assert_eq!(
                    tok.decode(body, false).unwrap(),
                    message["content"].as_str().unwrap(),
                    "the trained tokens are the reply the agent got"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 0 && multi_turn > 0,
        "{checked} turns checked, {multi_turn} multi-turn samples"
    );
}

/// The tiny tool demo as its header gives it: `tandem sft examples/tiny-tools-sft.toml`
/// teaches the tiny model the Hermes tool-call format from synthetic calculator
/// transcripts, and `tandem run examples/tiny-tools.toml` on that model makes tool
/// calls (well-formed ones among them), so episodes have several turns and the report
/// draws episodes.svg.
#[test]
fn the_tiny_tool_demo_calls_the_calculator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let sft = dir.path().join("sft");
    let run = dir.path().join("run");
    let example = |f: &str| root.join("examples").join(f).to_str().unwrap().to_string();
    ok(tandem(&[
        "sft",
        &example("tiny-tools-sft.toml"),
        "--set",
        &format!("train.out_dir={}", sft.display()),
    ]));
    ok(tandem(&[
        "run",
        &example("tiny-tools.toml"),
        "--set",
        &format!("model.path={}", sft.join("final").display()),
        "--set",
        &format!("run.run_dir={}", run.display()),
        "--set",
        "run.steps=6",
    ]));
    let rows: Vec<Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    let sum = |k: &str| rows.iter().map(|r| r[k].as_f64().unwrap()).sum::<f64>();
    // Per step: 2 groups × 4 episodes.
    let calls = sum("tool_calls_per_episode") * 8.0;
    let failed = sum("tool_errors");
    assert!(
        calls > 0.0,
        "no tool call in {} steps: {rows:?}",
        rows.len()
    );
    assert!(calls > failed, "{calls} calls, all {failed} failed");
    assert!(sum("turns_per_episode") > rows.len() as f64, "{rows:?}");
    ok(tandem(&["report", run.to_str().unwrap()]));
    let svg = std::fs::read_to_string(run.join("report/episodes.svg")).unwrap();
    assert!(svg.contains("tool calls"), "{svg}");
}

/// examples/agents/verifiers_agent.py runs a verifiers environment as an agent: here a
/// FAKE one (tests/fixtures/fake_vf_env.py, through the FAKE `verifiers` package of
/// tests/fixtures/fake_verifiers, since verifiers' ~700 MB of dependencies are not in
/// the test tools) whose rollout sends what verifiers 0.3.1's clients send: a chat turn
/// with `logprobs` and `return_token_ids`, then the same sample continued by token ids
/// on `/v1/completions` (its new text from `/tokenize`), and `/detokenize`. Each
/// episode is one sample, and the trainer trains exactly the tokens the agent was
/// answered with: the group's prompt and the completion are the last reply's
/// `prompt_token_ids` and `token_ids`, the loss mask is 1 on the sampled tokens alone
/// and their behaviour logprobs are the ones the replies carried; the reward is the
/// environment's.
#[test]
#[cfg_attr(
    missing_python_httpx,
    ignore = "no Python with httpx (TANDEM_SKIP_MISSING_TOOLS=1)"
)]
fn a_verifiers_environment_trains_through_the_adapter() {
    let python = require_program(Tool::PythonHttpx);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("tests/fixtures");
    let dir = tempfile::tempdir().unwrap();
    let model = init_tiny(dir.path());
    let run = dir.path().join("run");
    let traces = dir.path().join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    let steps = 2;
    let cfg = dir.path().join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[run]
steps = {steps}
batch_groups = 2
group_size = 2
max_staleness = 1
generators = 1
run_dir = "{run}"

[model]
path = "{model}"

[data]
kind = "arithmetic"
chat = true

[generator]
temperature = 1.0
max_new_tokens = 160
prompts_per_batch = 2

[reward]
math = 0.0
format = 0.0

[env]
agent = ["{python}", "{adapter}", "--env", "fake_vf_env", "--env-path", "{fixtures}", "--max-tokens", "24"]
max_turns = 2

[algorithm]
temperature = 1.0

[trainer]
dump_batches = true
"#,
            run = run.display(),
            model = model.display(),
            python = python.display(),
            adapter = root.join("examples/agents/verifiers_agent.py").display(),
            fixtures = fixtures.display(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", cfg.to_str().unwrap()])
        .env("TANDEM_LOG", "warn")
        .env("PYTHONPATH", fixtures.join("fake_verifiers"))
        .env("AGENT_TRACE_DIR", &traces)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let log = std::fs::read_to_string(run.join("logs/gen-0.log")).unwrap();
    assert!(!log.contains("[env] agent:"), "{log}");

    // Each episode's trace by (lease, sample): its episode id is "<lease>-<sample>-<hex>".
    let mut traces_of: std::collections::HashMap<(u64, u64), Value> = Default::default();
    for entry in std::fs::read_dir(&traces).unwrap() {
        let t: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        let id = t["episode"].as_str().unwrap().to_string();
        let mut parts = id.split('-');
        let lease: u64 = parts.next().unwrap().parse().unwrap();
        let sample: u64 = parts.next().unwrap().parse().unwrap();
        traces_of.insert((lease, sample), t);
    }
    let u32s = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let f64s = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let mut checked = 0;
    for step in 1..=steps {
        let mut seen: std::collections::HashMap<String, u64> = Default::default();
        for r in dumped_batch(&run, step) {
            let group = r["group"].as_str().unwrap().to_string();
            let lease: u64 = group
                .split("-l")
                .nth(1)
                .unwrap()
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let counter = seen.entry(group).or_default();
            let sample = *counter;
            *counter += 1;
            let t = &traces_of[&(lease, sample)];
            assert_eq!(r["reward"].as_f64(), t["reward"].as_f64(), "{r}");
            let (chat, text) = (&t["replies"][0], &t["replies"][1]);
            let chat_ids = u32s(&chat["choices"][0]["token_ids"]);
            let chat_lp: Vec<f64> = chat["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["logprob"].as_f64().unwrap())
                .collect();
            let text_prompt = u32s(&text["choices"][0]["prompt_token_ids"]);
            let text_ids = u32s(&text["choices"][0]["token_ids"]);
            let text_lp = f64s(&text["choices"][0]["logprobs"]["token_logprobs"]);
            // The trained tokens are the last reply's prompt and tokens, exactly.
            let prompt = u32s(&r["prompt_ids"]);
            let completion = completion_ids(&r);
            assert_eq!(
                [prompt.clone(), completion.clone()].concat(),
                [text_prompt.clone(), text_ids.clone()].concat(),
                "the trained sample is the tokens the agent was answered with"
            );
            // The chat reply sits right after the chat prompt within it.
            let chat_prompt = u32s(&chat["prompt_token_ids"]);
            let at = chat_prompt.len();
            assert_eq!(&text_prompt[..at], &chat_prompt[..]);
            assert_eq!(&text_prompt[at..at + chat_ids.len()], &chat_ids[..]);
            let mask: Vec<u64> = r["loss_mask"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            let behaviour = f64s(&r["behavior_logprobs"]);
            let p = prompt.len();
            let mut want_mask = vec![0u64; completion.len()];
            let mut want_lp = vec![None; completion.len()];
            for (j, lp) in chat_lp.iter().enumerate() {
                want_mask[at + j - p] = 1;
                want_lp[at + j - p] = Some(*lp);
            }
            let start = text_prompt.len() - p;
            for (j, lp) in text_lp.iter().enumerate() {
                want_mask[start + j] = 1;
                want_lp[start + j] = Some(*lp);
            }
            assert_eq!(mask, want_mask, "only the sampled tokens train");
            for (j, want) in want_lp.iter().enumerate() {
                if let Some(want) = want {
                    assert!(
                        (behaviour[j] - want).abs() < 1e-5,
                        "token {j}: behaviour logprob {} against the reply's {want}",
                        behaviour[j]
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, steps * 2 * 2, "every episode's sample was checked");
}
