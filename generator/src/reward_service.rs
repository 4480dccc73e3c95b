//! The external reward service's client (`[reward] service`): one `Score` call per
//! group (the prompt, the reference answer, the record's `info_json` and the
//! completions), with the service's own token, retried with backoff; its scores are
//! checked against `[reward] bound`. Called from the scorer stage (never from the
//! engine's loop) and by the held-out evaluation (`eval.rs`).

use std::time::Duration;

use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::tls::Tls;
use tandem_proto::v1::reward_client::RewardClient;
use tandem_proto::v1::ScoreRequest;
use tokio::runtime::Handle;

use crate::error::{rpc, Result};
use crate::reward::RewardConfig;

/// Calls of one group before its lease is given back.
const ATTEMPTS: u32 = 4;

pub(crate) struct RewardService {
    client: RewardClient<Authed>,
    rt: Handle,
    /// `[reward] bound`.
    bound: f64,
}

impl RewardService {
    /// The service of `[reward] service` (`None` when unset), reached with its own token
    /// (`TANDEM_REWARD_TOKEN`, else `[reward] service_token`) and the process's TLS
    /// material `tls`: the run's and the generators' tokens are never sent to it.
    pub fn connect(cfg: &RewardConfig, tls: &Tls, rt: Handle) -> Result<Option<Self>> {
        let Some(addr) = &cfg.service else {
            return Ok(None);
        };
        let token = std::env::var("TANDEM_REWARD_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| cfg.service_token.clone())
            .ok_or_else(|| {
                rpc(
                    "[reward] service",
                    "needs its own token: set TANDEM_REWARD_TOKEN (or [reward] service_token); the generator's token is not sent to it",
                )
            })?;
        let service_creds =
            Credentials::new(&token, tls.clone()).map_err(|e| rpc("[reward] service_token", e))?;
        let ch = rt
            .block_on(client::connect(addr, &service_creds))
            .map_err(|e| rpc("[reward] service", e))?;
        Ok(Some(RewardService {
            client: client::reward(ch, &service_creds),
            rt,
            bound: cfg.bound,
        }))
    }

    /// The service's scores of one group, retried with exponential backoff and jitter
    /// (0.5 s, 1 s, 2 s, each ±25 %) when the call fails or the reply is malformed
    /// (a score per completion, each finite and within `[reward] bound`); after the
    /// last attempt, why it failed.
    pub fn score(&mut self, req: ScoreRequest) -> std::result::Result<Vec<f64>, String> {
        let n = req.completions.len();
        let mut why = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let base = 0.5 * f64::from(1u32 << (attempt - 1));
                let jitter = 0.75 + 0.5 * tandem_proto::retry::unit_noise();
                std::thread::sleep(Duration::from_secs_f64(base * jitter));
            }
            match self
                .rt
                .block_on(self.client.score(client::unary(req.clone())))
            {
                Ok(r) => {
                    let scored = r.into_inner().rewards;
                    let bound = self.bound;
                    if scored.len() == n && scored.iter().all(|r| r.is_finite() && r.abs() <= bound)
                    {
                        return Ok(scored);
                    }
                    why = format!(
                        "returned {} rewards for {n} completions (all must be finite and within [reward] bound ±{bound})",
                        scored.len()
                    );
                }
                Err(e) => why = client::describe(&e),
            }
            tracing::warn!(
                attempt = attempt + 1,
                of = ATTEMPTS,
                "[reward] service: {why}"
            );
        }
        Err(format!("[reward] service failed {ATTEMPTS} times: {why}"))
    }
}
