//! The `[env]` section: multi-turn episodes with tools, an Environment service or an
//! agent program. With `max_turns = 1` and no tools (the default) a rollout is one
//! prompt and one completion, as always.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::python::PythonLimits;
use crate::tool_call;

/// `[env]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvConfig {
    /// Model turns per episode at most: an episode ends when the model answers without
    /// a tool call, or after this many turns.
    pub max_turns: u32,
    /// Built-in tools the model may call (`"calculator"`), announced in the system turn.
    pub tools: Vec<String>,
    /// The role of the environment's messages in the chat template: `"tool"`, or
    /// `"user"` for templates without a tool role.
    pub observation_role: String,
    /// An Environment service (`host:port`) that answers every model turn (`Step`)
    /// and starts each episode (`Reset`); unset = tools only.
    pub service: Option<String>,
    /// The service's own token (or `TANDEM_ENV_TOKEN`); never the run's.
    pub service_token: Option<String>,
    /// Weight of the environment's summed rewards in a completion's reward.
    pub reward_weight: f64,
    /// `[env.python]`: the `python` tool's sandbox limits.
    pub python: PythonLimits,
    /// An agent program (argv) run once per episode: it reads its task as JSON on
    /// stdin, talks to the policy through the generator's OpenAI-compatible endpoint
    /// (`OPENAI_BASE_URL`, the episode id in `TANDEM_EPISODE_ID`) and may print
    /// `{"reward": r}` as its last line. Unset = Tandem runs the episodes itself.
    pub agent: Vec<String>,
    /// Seconds an agent program may run before it is killed (a failure: its group is
    /// run again).
    pub agent_timeout_s: f64,
    /// Times a group with a failed episode (agent program, Environment service, a
    /// tool's infrastructure, the reward service) is run again, with new episodes,
    /// before its lease is given back; a failure is never trained as a reward.
    pub max_retries: u32,
}

impl Default for EnvConfig {
    fn default() -> Self {
        EnvConfig {
            max_turns: 1,
            tools: Vec::new(),
            observation_role: "tool".into(),
            service: None,
            service_token: None,
            reward_weight: 1.0,
            python: PythonLimits::default(),
            agent: Vec::new(),
            agent_timeout_s: 600.0,
            max_retries: 2,
        }
    }
}

impl EnvConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_turns == 0 {
            return Err(invalid("[env] max_turns: must be ≥ 1"));
        }
        for t in &self.tools {
            if tool_call::schema(t).is_none() {
                return Err(invalid(format!(
                    "[env] tools: unknown tool {t:?} (built in: \"calculator\", \"python\")"
                )));
            }
        }
        self.python.validate().map_err(invalid)?;
        if !self.reward_weight.is_finite() {
            return Err(invalid("[env] reward_weight: must be finite"));
        }
        if self.service.is_some() && !self.tools.is_empty() {
            return Err(invalid(
                "[env] service and [env] tools: choose one (the service answers every turn)",
            ));
        }
        if !self.agent.is_empty() {
            if self.agent[0].trim().is_empty() {
                return Err(invalid(
                    "[env] agent: the first element is the program to run, e.g. [\"python3\", \"agent.py\"]",
                ));
            }
            if self.service.is_some() || !self.tools.is_empty() {
                return Err(invalid(
                    "[env] agent with [env] tools or [env] service: choose one (the agent program runs its own tools)",
                ));
            }
        }
        if !(self.agent_timeout_s.is_finite() && self.agent_timeout_s > 0.0) {
            return Err(invalid(
                "[env] agent_timeout_s: must be a number of seconds > 0",
            ));
        }
        if self.max_retries > tandem_proto::limits::GROUP_RETRIES {
            return Err(invalid(format!(
                "[env] max_retries: {} is more than {} (tandem_proto::limits::GROUP_RETRIES)",
                self.max_retries,
                tandem_proto::limits::GROUP_RETRIES
            )));
        }
        if let Some(s) = &self.service {
            if !s.contains(':') {
                return Err(invalid(format!(
                    "[env] service: {s:?} is not host:port (or http[s]://host:port)"
                )));
            }
        }
        if !["tool", "user"].contains(&self.observation_role.as_str()) {
            return Err(invalid(format!(
                "[env] observation_role: {:?} is not \"tool\" or \"user\"",
                self.observation_role
            )));
        }
        Ok(())
    }

    /// Whether episodes have more than one turn.
    pub fn multi_turn(&self) -> bool {
        self.max_turns > 1
    }

    /// Samples one episode may yield: an agent's turn that does not extend its previous
    /// one starts another sample, so up to one per turn; one otherwise.
    pub fn samples_per_episode(&self) -> u32 {
        if self.agent.is_empty() {
            1
        } else {
            self.max_turns
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_sections_are_refused() {
        for (c, needle) in [
            (
                EnvConfig {
                    max_turns: 0,
                    ..Default::default()
                },
                "max_turns",
            ),
            (
                EnvConfig {
                    tools: vec!["shell".into()],
                    ..Default::default()
                },
                "unknown tool",
            ),
            (
                EnvConfig {
                    observation_role: "system".into(),
                    ..Default::default()
                },
                "observation_role",
            ),
            (
                EnvConfig {
                    agent: vec!["".into()],
                    ..Default::default()
                },
                "[env] agent",
            ),
            (
                EnvConfig {
                    agent: vec!["python3".into()],
                    tools: vec!["calculator".into()],
                    ..Default::default()
                },
                "choose one",
            ),
            (
                EnvConfig {
                    agent_timeout_s: 0.0,
                    ..Default::default()
                },
                "agent_timeout_s",
            ),
            (
                EnvConfig {
                    max_retries: 1000,
                    ..Default::default()
                },
                "max_retries",
            ),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
