//! The environment of a run: its built-in tools or its Environment service, and how
//! its turns are written; [`Env::act`] answers what a model turn asked for.

use std::time::Instant;

use serde_json::Value;
use tandem_model::Tokenizer;

use crate::calculator;
use crate::config::EnvConfig;
use crate::error::{invalid, Result};
use crate::failure::{Failure, FailureKind};
use crate::python::PythonTool;
use crate::tool_call::{self, TurnFormat};

/// What the environment is asked after a model turn.
#[derive(Clone, Debug, PartialEq)]
pub enum Act {
    /// The turn's tool call (or a malformed one, answered with the error).
    Tool(tool_call::Action),
    /// The Environment service's `Step` of episode `episode` with the turn's text.
    Step { episode: String, text: String },
}

/// What the environment answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    pub text: String,
    /// The call failed (malformed, unknown tool, bad arguments, the tool's error, the
    /// service's failure).
    pub error: bool,
    pub seconds: f64,
    /// The service's reward for the turn (0 for tools).
    pub reward: f64,
    /// The service ended the episode.
    pub done: bool,
    /// A tool answered (counted as a tool call), not the service.
    pub tool: bool,
    /// Not the model's doing: the service failed, or the tool's infrastructure (its
    /// sandbox, its interpreter). The episode ends and its group is not trained.
    pub failure: Option<Failure>,
}

/// The environment of a run: its tools or its service, and how its turns are written.
#[derive(Clone, Debug)]
pub struct Env {
    pub config: EnvConfig,
    pub format: TurnFormat,
    pub service: Option<crate::service::EnvService>,
    /// The `python` tool's sandbox, when `[env] tools` has it.
    pub python: Option<PythonTool>,
}

impl Env {
    /// The environment for `tokenizer`'s model: the chat template's delimiters when
    /// `chat`, plain lines otherwise.
    /// With the `python` tool, the sandbox is tried once here (a clear error at start-up
    /// rather than one per call).
    pub fn new(config: EnvConfig, tokenizer: &Tokenizer, chat: bool, stop: &[u32]) -> Result<Self> {
        config.validate()?;
        let python = python_tool(&config)?;
        let format = if chat && (config.multi_turn() || config.service.is_some()) {
            let end_of_turn = stop
                .first()
                .map(|&id| tokenizer.decode(&[id], false))
                .transpose()?
                .unwrap_or_default();
            TurnFormat::from_template(tokenizer, &config.observation_role, &end_of_turn)?
        } else {
            TurnFormat::raw()
        };
        Ok(Env {
            config,
            format,
            service: None,
            python,
        })
    }

    /// The environment's built-in tools alone (no chat format, no service), as
    /// `tandem tool` runs them; the `python` tool's sandbox is tried here.
    pub fn tools_only(config: EnvConfig) -> Result<Self> {
        config.validate()?;
        let python = python_tool(&config)?;
        Ok(Env {
            config,
            format: TurnFormat::raw(),
            service: None,
            python,
        })
    }

    /// Answers what a model turn asked for. Never fails: a failing call is an
    /// observation with `error`; a failed `Step` or a tool whose infrastructure failed
    /// also ends the episode, as a `failure` (never trained).
    pub fn act(&self, act: &Act) -> Observation {
        let t0 = Instant::now();
        let mut obs = Observation {
            text: String::new(),
            error: false,
            seconds: 0.0,
            reward: 0.0,
            done: false,
            tool: true,
            failure: None,
        };
        match act {
            Act::Tool(tool_call::Action::Answer) => {
                obs.text = "error: no tool call".into();
                obs.error = true;
            }
            Act::Tool(tool_call::Action::Malformed(why)) => {
                obs.text = format!("error: {why}");
                obs.error = true;
            }
            Act::Tool(tool_call::Action::Call { name, arguments }) => {
                (obs.text, obs.error) = match self.call(name, arguments) {
                    Ok(out) => out,
                    Err(CallError::Model(e)) => (format!("error: {e}"), true),
                    Err(CallError::Infrastructure(e)) => {
                        let why = format!("[env] tools: {name}: {e}");
                        tracing::warn!("{why}: the episode fails");
                        obs.failure = Some(Failure {
                            kind: FailureKind::Tool,
                            why: why.clone(),
                        });
                        obs.done = true;
                        (format!("error: {why}"), true)
                    }
                };
            }
            Act::Step { episode, text } => {
                obs.tool = false;
                match self.service.as_ref().map(|s| s.step(episode, text)) {
                    Some(Ok(r)) => {
                        obs.text = r.observation;
                        obs.reward = r.reward;
                        obs.done = r.done;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(episode = %episode, "{e}: the episode fails");
                        obs.text = format!("error: {e}");
                        (obs.error, obs.done) = (true, true);
                        obs.failure = Some(Failure {
                            kind: FailureKind::Environment,
                            why: e,
                        });
                    }
                    None => {
                        obs.text = "error: no [env] service".into();
                        (obs.error, obs.done) = (true, true);
                        obs.failure = Some(Failure {
                            kind: FailureKind::Environment,
                            why: "no [env] service".into(),
                        });
                    }
                }
            }
        }
        obs.seconds = t0.elapsed().as_secs_f64();
        obs
    }

    /// The tool's output and whether it failed (a program that raised or was killed
    /// still shows its output).
    fn call(
        &self,
        name: &str,
        arguments: &Value,
    ) -> std::result::Result<(String, bool), CallError> {
        if !self.config.tools.iter().any(|t| t == name) {
            return Err(format!(
                "unknown tool {name:?}; available: {}",
                self.config.tools.join(", ")
            )
            .into());
        }
        match name {
            "calculator" => {
                let expr = arguments
                    .get("expression")
                    .and_then(Value::as_str)
                    .ok_or("calculator needs {\"expression\": \"...\"}")?;
                Ok(calculator::evaluate(expr).map(|v| (calculator::format(v), false))?)
            }
            "python" => {
                let code = arguments
                    .get("code")
                    .and_then(Value::as_str)
                    .ok_or("python needs {\"code\": \"...\"}")?;
                let tool = self
                    .python
                    .as_ref()
                    .ok_or(CallError::Infrastructure("the tool was not set up".into()))?;
                // The sandbox itself failed: not the program's doing.
                let ran = tool.run(code).map_err(CallError::Infrastructure)?;
                Ok((ran.observation(), ran.failure.is_some()))
            }
            other => Err(format!("tool {other:?} is not built in").into()),
        }
    }
}

/// Why a tool call failed: the model's call (an observation it reads), or the tool's
/// infrastructure (a failure of the episode).
enum CallError {
    Model(String),
    Infrastructure(String),
}

impl From<String> for CallError {
    fn from(e: String) -> Self {
        CallError::Model(e)
    }
}

impl From<&str> for CallError {
    fn from(e: &str) -> Self {
        CallError::Model(e.into())
    }
}

/// The `python` tool's sandbox, built and tried once, when `[env] tools` lists it.
fn python_tool(config: &EnvConfig) -> Result<Option<PythonTool>> {
    if !config.tools.iter().any(|t| t == "python") {
        return Ok(None);
    }
    PythonTool::new(&config.python).map(Some).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::python::PythonLimits;
    use serde_json::json;

    fn env(tools: &[&str]) -> Env {
        Env {
            config: EnvConfig {
                max_turns: 3,
                tools: tools.iter().map(|t| t.to_string()).collect(),
                ..Default::default()
            },
            format: TurnFormat::raw(),
            service: None,
            python: tools
                .contains(&"python")
                .then(|| PythonTool::new(&PythonLimits::default()).expect("the sandbox runs here")),
        }
    }

    #[test]
    fn tools_answer_and_errors_are_observations() {
        let e = env(&["calculator"]);
        let call = |name: &str, args| {
            Act::Tool(tool_call::Action::Call {
                name: name.into(),
                arguments: args,
            })
        };
        assert!(e.act(&Act::Tool(tool_call::Action::Answer)).error);
        let o = e.act(&call("calculator", json!({"expression": "347*86"})));
        assert_eq!((o.text.as_str(), o.error), ("29842", false));
        for (action, needle) in [
            (call("calculator", json!({"expr": "1"})), "needs"),
            (
                call("calculator", json!({"expression": "1/0"})),
                "division by zero",
            ),
            (call("python", json!({"code": "1"})), "unknown tool"),
            (
                Act::Tool(tool_call::Action::Malformed("no JSON".into())),
                "no JSON",
            ),
        ] {
            let o = e.act(&action);
            assert!(
                o.error && o.text.starts_with("error: ") && o.text.contains(needle),
                "{o:?}"
            );
        }
        assert!(
            env(&[])
                .act(&call("calculator", json!({"expression": "1"})))
                .error
        );
        // The python tool: what the program printed; a failing program is an error
        // that still shows its output.
        let e = env(&["python"]);
        let o = e.act(&call("python", json!({"code": "print(6 * 7)"})));
        assert_eq!((o.text.trim(), o.error), ("42", false));
        let o = e.act(&call(
            "python",
            json!({"code": "print('partial')\nraise ValueError('bad')"}),
        ));
        assert!(
            o.error && o.text.contains("partial") && o.text.contains("ValueError: bad"),
            "{o:?}"
        );
        assert!(e
            .act(&call("python", json!({"source": "1"})))
            .text
            .contains("needs"));
        // The model's doing, however it failed: never a failure of the episode.
        let o = e.act(&call("python", json!({"code": "raise SystemExit(127)"})));
        assert!(o.error && o.failure.is_none() && !o.done, "{o:?}");
    }

    /// Not the model's doing: a tool whose sandbox cannot be set up, a service that
    /// failed (or is missing) end the episode as a failure, never as an observation
    /// the model is scored on.
    #[test]
    fn infrastructure_failures_end_the_episode_as_failures() {
        let call = Act::Tool(tool_call::Action::Call {
            name: "python".into(),
            arguments: json!({"code": "print(1)"}),
        });
        // A folder shown to every call, gone after the tool was tried: the sandbox
        // cannot be set up any more.
        let data = tempfile::tempdir().unwrap();
        let mounted = data.path().join("data");
        std::fs::create_dir(&mounted).unwrap();
        let tool = PythonTool::new(&PythonLimits {
            mounts: vec![mounted.to_str().unwrap().to_string()],
            ..Default::default()
        })
        .expect("the sandbox runs here");
        std::fs::remove_dir(&mounted).unwrap();
        let mut e = env(&["python"]);
        e.python = Some(tool);
        let o = e.act(&call);
        let f = o.failure.clone().unwrap_or_else(|| panic!("{o:?}"));
        assert_eq!(f.kind, FailureKind::Tool);
        assert!(f.why.contains("python") && o.done, "{o:?}");
        e.python = None;
        let o = e.act(&call);
        assert_eq!(o.failure.map(|f| f.kind), Some(FailureKind::Tool));
        let o = env(&[]).act(&Act::Step {
            episode: "1/0".into(),
            text: "x".into(),
        });
        assert_eq!(o.failure.map(|f| f.kind), Some(FailureKind::Environment));
        assert!(o.done);
    }
}
