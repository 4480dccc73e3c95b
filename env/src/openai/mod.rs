//! The OpenAI-compatible endpoint agent programs talk to, backed by the generator's
//! engine and its current weights:
//!
//! - `POST /v1/chat/completions`: a conversation's next model turn; with vLLM's
//!   token-level extensions (`logprobs` / `top_logprobs`, `return_token_ids`,
//!   `return_tokens_as_token_ids`).
//! - `POST /v1/completions`: a text (or token-id) prompt's continuation, OpenAI's legacy
//!   shape (`logprobs` an integer, `stop` strings, `return_token_ids`).
//! - `POST /tokenize` and `POST /detokenize` (also under `/v1`): vLLM's, with the
//!   model's tokenizer and chat template.
//! - `GET /v1/models`.
//!
//! Each request names its episode (header `X-Episode-Id`, or the `user` field) and
//! carries that episode's key as `Authorization: Bearer <key>` (the agent's
//! `OPENAI_API_KEY`, which every OpenAI client sends): only the episodes of agent
//! programs this generator started are served, each only to the holder of its key (the
//! key is checked before any other field), one sampled turn at a time. A request body
//! is at most [`body_limit`] bytes (a conversation that long could not fit the model's
//! context); every field read is checked (type, bound: [`MAX_TOP_LOGPROBS`],
//! [`MAX_STOP`], token ids below the vocabulary, prompts within the context) and refused
//! with a 400 naming it. Tokenizing a request holds only its own episode, on a blocking
//! thread: a long conversation delays no other episode and no sampling. A chat request's
//! conversation is rendered with the model's chat template (its `tools` announced in the
//! system turn) and planned against the episode ([`ChatEpisode::plan`]); a completions
//! request's prompt likewise ([`ChatEpisode::plan_prompt`]). The turn is sampled by the
//! worker's engine beside every other row, with the run's sampling settings (a request's
//! `temperature`, `top_p` and `seed` are not used: the trainer corrects for exactly the
//! distribution that sampled), and recorded (tokens, logprobs, versions) before the reply
//! goes out. The logprobs a reply carries are the recorded ones: log softmax(logits / τ)
//! at the run's `[generator] temperature` τ, renormalised over the top-k / top-p set
//! when those are on, and at τ = 1 when sampling is greedy.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};
use tandem_model::{Completion, FinishReason, Tokenizer};
use tokio::sync::oneshot;

use crate::chat_episode::{self, ChatEpisode, Prompt, TurnPlan};

mod reply;
mod request;
mod tokenize;
mod turn;

use reply::*;
use request::*;
use tokenize::*;
use turn::*;

/// The version of the weights the generator holds.
pub type Held = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Top logprobs a request may ask for per token (`top_logprobs`, a completions
/// request's `logprobs`): vLLM's default `max_logprobs`.
pub const MAX_TOP_LOGPROBS: usize = tandem_model::engine::MAX_TOP_LOGPROBS;

/// Stop strings a completions request may send, and bytes of each.
pub const MAX_STOP: usize = 16;
pub const MAX_STOP_BYTES: usize = 1024;

/// A sampled turn: its tokens and logprobs, each token's version, and each token's
/// most likely tokens when the request asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    pub completion: Completion,
    pub tags: Vec<u64>,
    pub tops: Vec<Vec<(u32, f32)>>,
}

/// A sampled turn, or why the engine refused it.
pub type TurnResult = Result<Turn, String>;

/// A turn for the worker's engine to sample: `max_new` tokens after `prompt`, from
/// random stream `stream` of group `group`'s seed, with the `top_logprobs` most likely
/// tokens of each step.
pub struct TurnRequest {
    pub group: u64,
    pub stream: u64,
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub top_logprobs: usize,
    pub reply: oneshot::Sender<TurnResult>,
}

/// A live episode: whose it is and what it has sampled.
pub struct Slot {
    pub group: u64,
    /// The episode's index in its group.
    pub sample: usize,
    pub group_size: usize,
    pub episode: ChatEpisode,
    /// The key a request for this episode must carry (its agent's `OPENAI_API_KEY`).
    key: String,
    /// A request of it is being served.
    busy: bool,
}

impl Slot {
    pub fn new(group: u64, sample: usize, group_size: usize, key: String) -> Self {
        Slot {
            group,
            sample,
            group_size,
            episode: ChatEpisode::default(),
            key,
            busy: false,
        }
    }
}

/// An episode's slot, locked by its own requests only.
type Shared = Arc<Mutex<Slot>>;

fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    // A handler that panicked left no half-written slot (each write is one call).
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of a request body the endpoint reads at most: 64 KiB of framing and tool
/// schemas plus 64 bytes per token of the model's context (no tokenizer spends more on
/// one token of a real conversation, so a longer body cannot fit the context).
pub fn body_limit(context: usize) -> usize {
    (64usize << 10).saturating_add(context.saturating_mul(64))
}

/// Whether `a` equals `b`, in time that depends only on their lengths.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// What the endpoint samples with and the limits of its episodes.
pub struct Policy {
    pub tokenizer: Tokenizer,
    /// Tokens that end a model turn.
    pub stop: Vec<u32>,
    /// `[env] max_turns`: model turns per episode.
    pub max_turns: u32,
    /// `[generator] max_new_tokens`: each sample's tokens after its first prompt.
    pub budget: usize,
    /// The model's context (prompt and reply together).
    pub context: usize,
    /// Token ids a request may send are below this (the model's and the tokenizer's
    /// vocabularies, the smaller).
    pub vocab: usize,
    /// The weights' version the generator holds (tags the masked tokens).
    pub held: Held,
    /// The name `/v1/models` reports.
    pub model: String,
}

/// What the endpoint's handlers share with the worker.
pub struct Endpoint {
    /// Episode id → its slot. Held only to find, add or remove a slot.
    episodes: Mutex<HashMap<String, Shared>>,
    turns: Sender<TurnRequest>,
    policy: Policy,
}

impl Endpoint {
    pub fn new(turns: Sender<TurnRequest>, policy: Policy) -> Self {
        Endpoint {
            episodes: Mutex::new(HashMap::new()),
            turns,
            policy,
        }
    }

    fn episodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Shared>> {
        self.episodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves episode `id` from now on.
    pub fn insert(&self, id: String, slot: Slot) {
        self.episodes().insert(id, Arc::new(Mutex::new(slot)));
    }

    /// Stops serving episode `id`; what it sampled.
    pub fn remove(&self, id: &str) -> Option<ChatEpisode> {
        let slot = self.episodes().remove(id)?;
        let episode = std::mem::take(&mut lock(&slot).episode);
        Some(episode)
    }

    fn slot(&self, id: &str) -> Option<Shared> {
        self.episodes().get(id).cloned()
    }
}

/// Serves the endpoint on `listener` until the runtime stops.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Arc<Endpoint>) {
    if let Err(e) = axum::serve(listener, router(endpoint)).await {
        tracing::error!("the OpenAI-compatible endpoint stopped: {e}");
    }
}

/// The endpoint's routes.
fn router(endpoint: Arc<Endpoint>) -> axum::Router {
    let limit = body_limit(endpoint.policy.context);
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .route("/v1/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/v1/detokenize", post(detokenize))
        .route("/v1/models", get(models))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(endpoint)
}

/// An error in the OpenAI shape: `{"error": {"message", "type", "param"}}`.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

fn bad(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, message)
}

async fn models(State(ep): State<Arc<Endpoint>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": ep.policy.model,
            "object": "model",
            "owned_by": "tandem",
            "max_model_len": ep.policy.context,
        }],
    }))
    .into_response()
}

/// A refusal: its status and message (made into the reply by [`error`]).
type Refused = (StatusCode, String);

fn refused(status: StatusCode, message: impl Into<String>) -> Refused {
    (status, message.into())
}

/// The request's body as a JSON object.
fn read_body(body: &[u8]) -> Result<Value, Refused> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        refused(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(refused(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok(v)
}

/// The body read and the key checked ([`read_body`], [`authorize`]).
fn admit(
    ep: &Endpoint,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Value, String, Shared), Refused> {
    let v = read_body(body)?;
    let (episode, shared) = authorize(ep, headers, &v)?;
    Ok((v, episode, shared))
}

/// The episode a request names (its slot) once its key is checked: 400 without an
/// episode, 404 for one not running here, 401 without its key.
fn authorize(ep: &Endpoint, headers: &HeaderMap, v: &Value) -> Result<(String, Shared), Refused> {
    let episode = match headers.get("x-episode-id") {
        Some(h) => h
            .to_str()
            .map_err(|_| refused(StatusCode::BAD_REQUEST, "X-Episode-Id: not text"))?
            .to_string(),
        None => v
            .get("user")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| {
                refused(
                    StatusCode::BAD_REQUEST,
                    "no episode: send the TANDEM_EPISODE_ID the agent was started with as header X-Episode-Id or as \"user\"",
                )
            })?,
    };
    let key = match headers.get("authorization") {
        None => None,
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    refused(
                        StatusCode::BAD_REQUEST,
                        "Authorization: expected \"Bearer <OPENAI_API_KEY>\"",
                    )
                })?
                .trim()
                .to_string(),
        ),
    };
    let Some(shared) = ep.slot(&episode) else {
        return Err(refused(
            StatusCode::NOT_FOUND,
            format!(
                "episode {:?} is not running on this generator (it ended, or was never started here)",
                episode
            ),
        ));
    };
    let allowed = match &key {
        Some(k) => same_key(k, &lock(&shared).key),
        None => {
            return Err(refused(
                StatusCode::UNAUTHORIZED,
                "Authorization: missing; send \"Bearer <OPENAI_API_KEY>\" (the key the agent was started with)",
            ))
        }
    };
    if !allowed {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "Authorization: not this episode's key (send the OPENAI_API_KEY the agent was started with)",
        ));
    }
    Ok((episode, shared))
}

#[cfg(test)]
mod tests;
