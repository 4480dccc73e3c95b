//! `tandem-env`: the environments a policy acts in, between the engine
//! (`tandem-model`) and the generator. It runs a group's samples as episodes on an
//! [`Engine`](tandem_model::Engine) it is handed, answers model turns with tools or a
//! service, and hands back each group's samples (the model's tokens exactly as sampled,
//! the environment's tokenized once with loss mask 0); it knows nothing of leases,
//! rewards or the trainer, so the generator's online loop and offline sampling share it.
//!
//! - [`config`] — the `[env]` section
//! - [`task`] — a prompt as the environment sees it ([`Task`])
//! - [`sample_groups`] — the groups being sampled as episodes: a group's first turn is
//!   one engine request, each later turn of a sample its own; tool calls on threads
//! - [`episode`] — one sample's turns as sampled plus the environment's
//! - [`failure`] — episodes that failed through no doing of the model (agent program,
//!   Environment service, a tool's infrastructure): never trained, run again
//! - [`environment`] — [`Env`]: the run's tools or service and how its turns are
//!   written; [`Env::act`] answers a model turn
//! - [`tool_call`] — the Hermes tool-call convention, the tool list in the system turn,
//!   the environment turn's delimiters; [`calculator`] — the calculator tool;
//!   [`python`] — the `python` tool, run in [`tandem_sandbox`]
//! - [`service`] — the Environment service's client (`Reset`, `Step`)
//! - [`agent`] — `[env] agent` programs, one process per episode; [`openai`] — the
//!   OpenAI-compatible endpoint they talk to (chat and completions with vLLM's
//!   token-level fields, `/tokenize`, `/detokenize`); [`chat_episode`] — an agent's
//!   requests merged into samples, the model's tokens as sampled

#![forbid(unsafe_code)]

pub mod agent;
pub mod calculator;
pub mod chat_episode;
pub mod config;
pub mod environment;
pub mod episode;
pub mod error;
pub mod failure;
pub mod openai;
pub mod python;
pub mod sample_groups;
pub mod service;
pub mod task;
pub mod tool_call;

pub use config::EnvConfig;
pub use environment::{Act, Env, Observation};
pub use episode::EpisodeStats;
pub use error::{Error, Result};
pub use failure::{Failed, Failure, FailureKind};
pub use sample_groups::{FinishedGroup, GroupRequest, GroupSamples, SampleGroups};
pub use task::Task;
