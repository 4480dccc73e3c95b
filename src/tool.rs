//! `tandem tool python FILE` and `tandem tool calculator EXPRESSION`: a built-in tool
//! run exactly as an episode's tool call runs it (the same `[env.python]` limits and
//! sandbox), printing the observation the model would read. For trying a sandbox and
//! its limits before a run.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use tandem_env::tool_call::Action;
use tandem_env::{Act, Env};

use crate::run_config::RunConfig;

#[derive(Args)]
pub struct ToolArgs {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Args)]
struct Settings {
    /// A run config: its `[env]` (and `[env.python]`) section is used; default: the
    /// documented defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key: `section.key=value` (repeatable), e.g. `--set env.python.wall_s=2`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Tool {
    /// Run a Python program (a file, or `-` for standard input) in the python tool's
    /// sandbox.
    Python {
        file: PathBuf,
        #[command(flatten)]
        settings: Settings,
    },
    /// Evaluate an arithmetic expression with the calculator tool.
    Calculator {
        expression: String,
        #[command(flatten)]
        settings: Settings,
    },
}

pub fn run(a: ToolArgs) -> Result<()> {
    let (name, arguments, settings) = match a.tool {
        Tool::Python { file, settings } => {
            let code = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .context("reading the program from standard input")?;
                s
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            ("python", json!({ "code": code }), settings)
        }
        Tool::Calculator {
            expression,
            settings,
        } => ("calculator", json!({ "expression": expression }), settings),
    };
    let cfg = match &settings.config {
        Some(path) => RunConfig::read(path, &settings.set)?,
        None => RunConfig::parse("", &settings.set)?,
    };
    let mut env = cfg.env.clone();
    // The tool is tried whether or not the run lists it, with the run's limits.
    env.tools = vec![name.to_string()];
    env.service = None;
    env.agent.clear();
    let env = Env::tools_only(env)?;
    let obs = env.act(&Act::Tool(Action::Call {
        name: name.into(),
        arguments,
    }));
    // The tool's infrastructure failed: no observation the model would read.
    if let Some(f) = obs.failure {
        anyhow::bail!("{}", f.why);
    }
    print!("{}", obs.text);
    if !obs.text.ends_with('\n') {
        println!();
    }
    if obs.error {
        tracing::warn!(
            seconds = obs.seconds,
            "the model would read this as a failed tool call"
        );
    }
    Ok(())
}
