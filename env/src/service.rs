//! The Environment service's client (`[env] service`): `Reset` starts an episode,
//! `Step` answers each model turn with an observation, a reward and whether the
//! episode is over. Calls carry the environment's own token and are retried through a
//! restart of the service (`Reset` and `Step` of one episode are made in order).

use tandem_proto::auth::Credentials;
use tandem_proto::client::{self, Authed};
use tandem_proto::v1::environment_client::EnvironmentClient;
use tandem_proto::v1::{ResetRequest, StepReply, StepRequest};
use tokio::runtime::Handle;

use crate::error::{invalid, Result};

#[derive(Clone)]
pub struct EnvService {
    client: EnvironmentClient<Authed>,
    rt: Handle,
    addr: String,
}

impl std::fmt::Debug for EnvService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvService({})", self.addr)
    }
}

impl EnvService {
    /// Connects to `addr` with `creds` (the environment's token and the run's TLS).
    pub fn connect(addr: &str, creds: &Credentials, rt: Handle) -> Result<Self> {
        let ch = rt
            .block_on(client::connect(addr, creds))
            .map_err(|e| invalid(format!("[env] service: {e}")))?;
        Ok(EnvService {
            client: client::environment(ch, creds),
            rt,
            addr: addr.to_string(),
        })
    }

    /// Starts episode `episode` on `prompt`, its reference answer and its record's info
    /// (`info_json`, the text of one JSON object; empty = none); its first observation
    /// (empty = the prompt as it is).
    pub fn reset(
        &self,
        episode: &str,
        prompt: &str,
        answer: &str,
        info_json: &str,
    ) -> std::result::Result<String, String> {
        let req = ResetRequest {
            episode_id: episode.to_string(),
            prompt: prompt.to_string(),
            answer: answer.to_string(),
            info_json: info_json.to_string(),
        };
        let client = &self.client;
        self.rt
            .block_on(tandem_proto::retry::retry(
                "the environment's Reset",
                || {
                    let (mut c, req) = (client.clone(), req.clone());
                    async move { c.reset(client::unary(req)).await }
                },
            ))
            .map(|r| r.into_inner().observation)
            .map_err(|e| {
                format!(
                    "[env] service {}: Reset: {}",
                    self.addr,
                    client::describe(&e)
                )
            })
            .and_then(|o| observation_within_limit(&self.addr, "Reset", &o).map(|_| o))
    }

    /// The environment's answer to a model turn; a reward that is not finite, or an
    /// observation past `tandem_proto::limits::OBSERVATION_BYTES`, is an error.
    pub fn step(&self, episode: &str, action: &str) -> std::result::Result<StepReply, String> {
        let req = StepRequest {
            episode_id: episode.to_string(),
            action: action.to_string(),
        };
        let client = &self.client;
        let reply = self
            .rt
            .block_on(tandem_proto::retry::retry("the environment's Step", || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.step(client::unary(req)).await }
            }))
            .map_err(|e| {
                format!(
                    "[env] service {}: Step: {}",
                    self.addr,
                    client::describe(&e)
                )
            })?
            .into_inner();
        if !reply.reward.is_finite() {
            return Err(format!(
                "[env] service {}: Step returned reward {} (must be finite)",
                self.addr, reply.reward
            ));
        }
        observation_within_limit(&self.addr, "Step", &reply.observation)?;
        Ok(reply)
    }
}

/// An observation of at most `tandem_proto::limits::OBSERVATION_BYTES`.
fn observation_within_limit(addr: &str, call: &str, o: &str) -> std::result::Result<(), String> {
    use tandem_proto::limits::{check_len, OBSERVATION_BYTES};
    check_len(
        "observation",
        o,
        OBSERVATION_BYTES,
        "OBSERVATION_BYTES",
        "the environment must answer with a shorter observation",
    )
    .map_err(|e| format!("[env] service {addr}: {call}: {e}"))
}
