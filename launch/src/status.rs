//! The run seen through the coordinator's `Status` call: the data of `tandem run`'s
//! progress line ([`Progress`]) and the lag table of `tandem status` ([`lag_table`]).

use std::fmt::Write;

use tandem_proto::auth::Credentials;
use tandem_proto::client;
use tandem_proto::v1::coordinator_client::CoordinatorClient;
use tandem_proto::v1::{Role, StatusReply, StatusRequest};

use crate::{Error, Result};

/// Where the supervisor reads a run's state.
pub trait StatusSource {
    /// The coordinator's status now; `None` while it cannot be asked (it is restarting,
    /// or gone after the run).
    fn status(&mut self) -> Option<StatusReply>;
}

/// A coordinator's `Status`, over a connection of its own (a runtime of one thread).
pub struct CoordinatorStatus {
    addr: String,
    rt: tokio::runtime::Runtime,
    client: CoordinatorClient<client::Authed>,
}

impl CoordinatorStatus {
    /// Connects to the coordinator at `addr` with `creds` (token and TLS).
    pub fn connect(addr: &str, creds: &Credentials) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the async runtime", e))?;
        let ch = rt
            .block_on(client::connect(addr, creds))
            .map_err(Error::Coordinator)?;
        Ok(CoordinatorStatus {
            addr: addr.to_string(),
            client: client::coordinator(ch, creds),
            rt,
        })
    }

    /// The status now; the error names the address.
    pub fn get(&mut self) -> Result<StatusReply> {
        self.rt
            .block_on(self.client.status(StatusRequest {}))
            .map(|r| r.into_inner())
            .map_err(|e| {
                let code = format!("{:?}", e.code());
                let hint = crate::run_address::wrong_port_hint(&self.addr, &code, e.message());
                Error::Coordinator(hint.unwrap_or_else(|| {
                    format!("status from {}: {}", self.addr, client::describe(&e))
                }))
            })
    }
}

impl StatusSource for CoordinatorStatus {
    fn status(&mut self) -> Option<StatusReply> {
        self.get().ok()
    }
}

/// What `tandem run`'s progress line shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Steps the trainer has published.
    pub step: u64,
    /// The last step's mean reward (NaN before the first).
    pub reward_mean: f64,
    /// The largest staleness among the last step's samples.
    pub max_staleness: u32,
    /// Completion tokens per second over the last ~10 s, all generators.
    pub tokens_per_second: f64,
    pub policy_version: u64,
    /// Generators registered now.
    pub generators: usize,
    /// The trainer has published its last step.
    pub finished: bool,
}

impl Progress {
    pub fn of(s: &StatusReply) -> Self {
        Progress {
            step: s.step,
            reward_mean: s.metrics.get("reward_mean").copied().unwrap_or(f64::NAN),
            max_staleness: s.max_staleness_seen,
            tokens_per_second: s.tokens_per_second,
            policy_version: s.policy_version,
            generators: s
                .workers
                .iter()
                .filter(|w| w.role == Role::Generator as i32)
                .count(),
            finished: s.finished,
        }
    }

    /// "reward R | staleness ≤S | T tok/s | vV | N generators"; the reward is `–` before
    /// the first step (never `NaN`).
    pub fn message(&self) -> String {
        let reward = if self.reward_mean.is_finite() {
            format!("{:.3}", self.reward_mean)
        } else {
            "–".to_string()
        };
        format!(
            "reward {reward} | staleness ≤{} | {:.0} tok/s | v{} | {} generators",
            self.max_staleness, self.tokens_per_second, self.policy_version, self.generators
        )
    }
}

/// The lag table of `tandem status`: the run's totals, a row per worker (its version,
/// lag, tokens, leases, last beat), the dropped counts and the last step's metrics.
pub fn lag_table(s: &StatusReply) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "version {}  step {}/{}  {}  accepted {}  leases {}  buffer {}  {:.0} tok/s",
        s.policy_version,
        s.step,
        s.total_steps,
        if s.finished { "finished" } else { "running" },
        s.groups_accepted,
        s.leases_running,
        s.buffer_groups,
        s.tokens_per_second
    );
    let _ = writeln!(
        out,
        "{:<6} {:<16} {:<10} {:>8} {:>4} {:>12} {:>7} {:>10}",
        "id", "name", "role", "version", "lag", "tokens", "leases", "last seen"
    );
    for w in &s.workers {
        let role = if w.role == Role::Trainer as i32 {
            "trainer"
        } else {
            "generator"
        };
        let _ = writeln!(
            out,
            "{:<6} {:<16} {:<10} {:>8} {:>4} {:>12} {:>7} {:>8}ms",
            w.worker_id,
            w.name,
            role,
            w.policy_version,
            w.lag,
            w.generated_tokens,
            w.leases,
            w.last_seen_ms
        );
    }
    if !s.dropped.is_empty() {
        let mut d: Vec<_> = s.dropped.iter().collect();
        d.sort();
        let d: Vec<String> = d.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(out, "dropped: {}", d.join(" "));
    }
    let mut m: Vec<_> = s.metrics.iter().collect();
    m.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in m {
        let _ = writeln!(out, "  {k:<28} {v:.6}");
    }
    out
}

#[cfg(test)]
mod tests {
    use tandem_proto::v1::WorkerStatus;

    use super::*;

    fn reply() -> StatusReply {
        let worker = |id, name: &str, role: Role, lag| WorkerStatus {
            worker_id: id,
            name: name.into(),
            role: role as i32,
            policy_version: 7 - lag,
            lag,
            generated_tokens: 1000 * id,
            last_seen_ms: 40,
            leases: 2,
        };
        StatusReply {
            policy_version: 7,
            step: 7,
            total_steps: 20,
            workers: vec![
                worker(1, "trainer", Role::Trainer, 0),
                worker(2, "gen-0", Role::Generator, 1),
                worker(3, "gen-1", Role::Generator, 0),
            ],
            groups_accepted: 30,
            leases_running: 4,
            buffer_groups: 1,
            metrics: [
                ("reward_mean".to_string(), 0.625),
                ("loss".to_string(), 0.5),
            ]
            .into(),
            dropped: [("stale".to_string(), 3), ("filtered".to_string(), 1)].into(),
            finished: false,
            tokens_per_second: 1234.4,
            max_staleness_seen: 1,
        }
    }

    #[test]
    fn the_progress_line_counts_generators_only() {
        let p = Progress::of(&reply());
        assert_eq!((p.step, p.generators, p.finished), (7, 2, false));
        assert_eq!(
            p.message(),
            "reward 0.625 | staleness ≤1 | 1234 tok/s | v7 | 2 generators"
        );
        let none = Progress::of(&StatusReply::default());
        assert!(none.reward_mean.is_nan() && none.message().starts_with("reward – |"));
    }

    #[test]
    fn the_lag_table_has_a_row_per_worker_and_sorted_counts() {
        let t = lag_table(&reply());
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("version 7  step 7/20  running  accepted 30"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("id ") && lines[1].ends_with("last seen"),
            "{t}"
        );
        assert!(
            lines[2].contains("trainer") && lines[2].ends_with("40ms"),
            "{t}"
        );
        let gen0: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            gen0,
            ["2", "gen-0", "generator", "6", "1", "2000", "2", "40ms"]
        );
        assert_eq!(lines[5], "dropped: filtered=1 stale=3");
        assert!(lines[6].trim_start().starts_with("loss") && lines[7].contains("reward_mean"));
        assert_eq!(lines.len(), 8);
    }
}
