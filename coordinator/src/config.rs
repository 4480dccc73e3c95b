//! The `[run]` and `[coordinator]` sections: the shape of a run and the control
//! plane's own settings. (Each part defines its own section; the binary assembles
//! the whole file.)

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// `[run]`: what every part of a run agrees on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// Optimizer steps to run.
    pub steps: u64,
    /// Prompt groups per step (B).
    pub batch_groups: u64,
    /// Completions per prompt (K).
    pub group_size: u32,
    /// η: a sample may be at most this many versions older than the policy it trains
    /// (0 = synchronous on-policy).
    pub max_staleness: u64,
    /// Generators `tandem run` starts on this machine.
    pub generators: u32,
    /// Where checkpoints, logs, metrics and dumps go.
    pub run_dir: String,
    /// The shared token (prefer the TANDEM_TOKEN environment variable; `tandem run`
    /// makes one when neither is set).
    pub token: Option<String>,
    /// Seed of sampling and of the data order.
    pub seed: u64,
    /// `tandem run`: how many times each process is started again after it dies (the
    /// trainer resumes from its newest checkpoint, the coordinator from its saved state).
    pub max_restarts: u32,
    /// Dynamic sampling (DAPO): a group whose rewards are all equal is dropped before
    /// the buffer and its lease closed; admission then leases another prompt, so every
    /// step still trains `batch_groups` informative groups.
    pub filter_zero_std: bool,
    /// Steps between the few completions of a step the trainer writes, decoded, to
    /// `RUN_DIR/samples.jsonl` (0 = none).
    pub log_samples: u64,
    /// The trainer writes TensorBoard event files under `RUN_DIR/tensorboard/`.
    pub tensorboard: bool,
    /// `tandem run` without a terminal (piped, logged): a progress line every this many
    /// steps (on a terminal the live line moves with every step).
    pub log_every: u64,
}

impl Default for RunSection {
    fn default() -> Self {
        RunSection {
            steps: 20,
            batch_groups: 4,
            group_size: 8,
            max_staleness: 1,
            generators: 2,
            run_dir: "runs/latest".into(),
            token: None,
            seed: 0,
            filter_zero_std: false,
            max_restarts: 3,
            log_samples: 10,
            tensorboard: false,
            log_every: 10,
        }
    }
}

/// `[coordinator]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC listen address (port 0 = any free port).
    pub listen: String,
    /// HTTP address of /metrics, /status, /healthz, /readyz.
    pub http_listen: String,
    /// How often workers beat.
    pub heartbeat_interval_ms: u64,
    /// A worker silent this long is dropped and its leases re-issued.
    pub heartbeat_timeout_ms: u64,
    /// A lease older than this is re-issued even if its worker still beats.
    pub lease_timeout_s: u64,
    /// A lease held longer than this many times the slowest of the run's recent groups
    /// (at least 10 s) is overdue: taken back for a generator that has none to work on
    /// (`crate::lease`, "No generator starves the run"). 0 = never.
    pub lease_overdue_factor: f64,
    /// Deadline of every unary call a worker makes (register, heartbeat, lease, commit,
    /// publish, leave, exclude, reward scores): past it the call fails with a timeout
    /// instead of hanging.
    pub rpc_timeout_s: f64,
    /// How long a worker keeps retrying a peer that is away (a coordinator or trainer
    /// restarting) before it exits saying what it waited for.
    pub reconnect_timeout_s: f64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:0".into(),
            http_listen: "127.0.0.1:0".into(),
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 5000,
            lease_timeout_s: 900,
            lease_overdue_factor: 4.0,
            rpc_timeout_s: 30.0,
            reconnect_timeout_s: 120.0,
        }
    }
}

impl RunSection {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[run] {key}: {why}")));
        if self.steps == 0 {
            return bad("steps", "must be ≥ 1");
        }
        if self.batch_groups == 0 {
            return bad("batch_groups", "must be ≥ 1");
        }
        if self.group_size == 0 {
            return bad("group_size", "must be ≥ 1 (GRPO and RLOO need ≥ 2)");
        }
        if self.run_dir.trim().is_empty() {
            return bad("run_dir", "must name a folder");
        }
        if self.log_every == 0 {
            return bad(
                "log_every",
                "must be ≥ 1 (a progress line every this many steps)",
            );
        }
        Ok(())
    }
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(invalid(format!("[coordinator] {key}: {why}")));
        if self.heartbeat_interval_ms == 0 {
            return bad("heartbeat_interval_ms", "must be ≥ 1");
        }
        if self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms {
            return bad(
                "heartbeat_timeout_ms",
                "must be at least twice heartbeat_interval_ms",
            );
        }
        if self.lease_timeout_s == 0 {
            return bad("lease_timeout_s", "must be ≥ 1");
        }
        if !(self.lease_overdue_factor.is_finite() && self.lease_overdue_factor >= 0.0) {
            return bad(
                "lease_overdue_factor",
                "must be a finite number ≥ 0 (0 = never take leases back as overdue)",
            );
        }
        if !(self.rpc_timeout_s.is_finite() && self.rpc_timeout_s >= 0.1) {
            return bad("rpc_timeout_s", "must be a number of seconds ≥ 0.1");
        }
        if !(self.reconnect_timeout_s.is_finite() && self.reconnect_timeout_s >= 1.0) {
            return bad("reconnect_timeout_s", "must be a number of seconds ≥ 1");
        }
        for (key, addr) in [("listen", &self.listen), ("http_listen", &self.http_listen)] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    key,
                    &format!("{addr:?} is not an address like 127.0.0.1:50051"),
                );
            }
        }
        Ok(())
    }
}
