//! The OpenAI-compatible endpoint agent programs talk to: `POST /v1/chat/completions`
//! (and `GET /v1/models`), backed by the generator's engine and its current weights.
//!
//! Each request names its episode (header `X-Episode-Id`, or the `user` field) and
//! carries that episode's key as `Authorization: Bearer <key>` (the agent's
//! `OPENAI_API_KEY`, which every OpenAI client sends): only the episodes of agent
//! programs this generator started are served, each only to the holder of its key, one
//! request at a time. A request body is at most [`body_limit`] bytes (a conversation
//! that long could not fit the model's context). Tokenizing a request holds only its
//! own episode, on a blocking thread: a long conversation delays no other episode and
//! no sampling. The request's conversation is rendered with the model's chat template
//! (its `tools` announced in the system turn) and planned against the episode
//! ([`ChatEpisode::plan`]); the turn is sampled by the worker's engine beside every
//! other row, with the run's sampling settings (a request's `temperature`, `top_p` and
//! `seed` are not used: the trainer corrects for exactly the distribution that sampled),
//! and recorded (tokens, logprobs, versions) before the reply goes out.

use std::collections::HashMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};
use tandem_model::{Completion, Tokenizer};
use tokio::sync::oneshot;

use crate::chat_episode::{self, ChatEpisode};

/// The version of the weights the generator holds.
pub type Held = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A sampled turn and each token's version, or why the engine refused it.
pub type TurnResult = Result<(Completion, Vec<u64>), String>;

/// A turn for the worker's engine to sample: `max_new` tokens after `prompt`, from
/// random stream `stream` of group `group`'s seed.
pub struct TurnRequest {
    pub group: u64,
    pub stream: u64,
    pub prompt: Vec<u32>,
    pub max_new: usize,
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
    let limit = body_limit(endpoint.policy.context);
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(endpoint);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("the OpenAI-compatible endpoint stopped: {e}");
    }
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

async fn models(State(ep): State<Arc<Endpoint>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": ep.policy.model, "object": "model", "owned_by": "tandem"}],
    }))
    .into_response()
}

/// What a request asks, checked.
struct Asked {
    episode: String,
    /// The bearer token of `Authorization`.
    key: Option<String>,
    messages: Vec<chat_episode::Message>,
    tools: Vec<Value>,
    max_tokens: usize,
}

/// The request's fields, checked; the error names the field and the fix.
fn read_request(headers: &HeaderMap, body: &[u8]) -> Result<Asked, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    if !v.is_object() {
        return Err("the body must be a JSON object".into());
    }
    if v.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err("stream: streaming is not served; send \"stream\": false".into());
    }
    match v.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(n) => {
            return Err(format!(
                "n: {n} choices asked; one is served per request (the group's samples are episodes of their own)"
            ))
        }
    }
    let episode = match headers.get("x-episode-id") {
        Some(h) => h
            .to_str()
            .map_err(|_| "X-Episode-Id: not text")?
            .to_string(),
        None => v
            .get("user")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or(
                "no episode: send the TANDEM_EPISODE_ID the agent was started with as header X-Episode-Id or as \"user\"",
            )?,
    };
    let key = match headers.get("authorization") {
        None => None,
        Some(h) => Some(
            h.to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or("Authorization: expected \"Bearer <OPENAI_API_KEY>\"")?
                .trim()
                .to_string(),
        ),
    };
    let messages = chat_episode::parse_messages(
        v.get("messages")
            .and_then(Value::as_array)
            .ok_or("messages: missing (a list of {\"role\", \"content\"})")?,
    )?;
    let tools = match v.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(t)) => chat_episode::parse_tools(t)?,
        Some(_) => return Err("tools: must be a list".into()),
    };
    let max_tokens = match v
        .get("max_completion_tokens")
        .or_else(|| v.get("max_tokens"))
    {
        None | Some(Value::Null) => usize::MAX,
        Some(m) => match m.as_u64() {
            Some(n) if n >= 1 => n as usize,
            _ => return Err(format!("max_tokens: {m} must be an integer ≥ 1")),
        },
    };
    Ok(Asked {
        episode,
        key,
        messages,
        tools,
        max_tokens,
    })
}

async fn chat(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    let asked = match read_request(&headers, &body) {
        Ok(a) => a,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let Some(shared) = ep.slot(&asked.episode) else {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "episode {:?} is not running on this generator (it ended, or was never started here)",
                asked.episode
            ),
        );
    };
    // Rendering and tokenizing may take a while on a long conversation: on a blocking
    // thread, holding only this episode.
    let episode = asked.episode.clone();
    let planning = {
        let (ep, shared) = (ep.clone(), shared.clone());
        tokio::task::spawn_blocking(move || plan_turn(&ep, &shared, &asked))
    };
    let (plan, group, stream) = match planning.await {
        Ok(Planned::Turn(plan, group, stream)) => (plan, group, stream),
        Ok(Planned::Done(response)) => return response,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("planning the turn: {e}"),
            )
        }
    };
    // Whatever happens next (the client may go away mid-turn), the episode takes
    // requests again after this one.
    let _busy = Busy(&shared);
    let (tx, rx) = oneshot::channel();
    let sent = ep.turns.send(TurnRequest {
        group,
        stream,
        prompt: plan.prompt.clone(),
        max_new: plan.max_new,
        reply: tx,
    });
    let sampled = match sent {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    if ep.slot(&episode).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "the episode ended while its turn was sampled",
        );
    }
    let (turn, tags) = match sampled {
        Some(Ok(t)) => t,
        Some(Err(why)) => return error(StatusCode::BAD_REQUEST, why),
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the generator stopped sampling this episode's group; end the episode",
            )
        }
    };
    let prompt_tokens = plan.prompt.len();
    let finish = turn.finish_reason;
    let n = turn.tokens.len();
    let held = (ep.policy.held)();
    let mut slot = lock(&shared);
    match slot.episode.record(
        plan,
        turn,
        tags,
        held,
        &ep.policy.tokenizer,
        &ep.policy.stop,
    ) {
        Ok(reply) => {
            let turns = slot.episode.turns;
            let usage = (prompt_tokens, n);
            completion(&ep, &episode, turns, Some((&reply, finish)), usage)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Marks an episode free for its next request when dropped.
struct Busy<'a>(&'a Shared);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(self.0).busy = false;
    }
}

/// What planning a request gave: a turn to sample (its plan, the group and the random
/// stream), or the reply already (an error, or an empty turn when the budget is spent).
enum Planned {
    Turn(chat_episode::TurnPlan, u64, u64),
    Done(Response),
}

/// Checks the request's key and the episode's state and plans its turn (renders and
/// tokenizes the conversation), holding only this episode's slot; marks it busy.
fn plan_turn(ep: &Endpoint, shared: &Mutex<Slot>, asked: &Asked) -> Planned {
    let mut slot = lock(shared);
    match &asked.key {
        Some(k) if same_key(k, &slot.key) => {}
        Some(_) => {
            return Planned::Done(error(
                StatusCode::UNAUTHORIZED,
                "Authorization: not this episode's key (send the OPENAI_API_KEY the agent was started with)",
            ))
        }
        None => {
            return Planned::Done(error(
                StatusCode::UNAUTHORIZED,
                "Authorization: missing; send \"Bearer <OPENAI_API_KEY>\" (the key the agent was started with)",
            ))
        }
    }
    if slot.busy {
        return Planned::Done(error(
            StatusCode::CONFLICT,
            "this episode has a request being served; send its turns one at a time",
        ));
    }
    if slot.episode.turns >= ep.policy.max_turns {
        return Planned::Done(error(
            StatusCode::BAD_REQUEST,
            format!(
                "the episode has had its [env] max_turns = {} model turns; end it (or raise max_turns)",
                ep.policy.max_turns
            ),
        ));
    }
    let planned = slot
        .episode
        .render(&ep.policy.tokenizer, &asked.messages, &asked.tools)
        .and_then(|text| {
            slot.episode.plan(
                &ep.policy.tokenizer,
                &text,
                asked.max_tokens,
                ep.policy.budget,
            )
        });
    let mut plan = match planned {
        Ok(p) => p,
        Err(e) => return Planned::Done(error(StatusCode::BAD_REQUEST, format!("messages: {e}"))),
    };
    if plan.prompt.len() >= ep.policy.context {
        return Planned::Done(error(
            StatusCode::BAD_REQUEST,
            format!(
                "messages: the conversation is {} tokens, the model's context {}; end the episode",
                plan.prompt.len(),
                ep.policy.context
            ),
        ));
    }
    // The reply ends at the context's end, as it would at max_tokens.
    plan.max_new = plan.max_new.min(ep.policy.context - plan.prompt.len());
    if plan.max_new == 0 {
        // The sample's token budget is spent: nothing is sampled or recorded.
        let usage = (plan.prompt.len(), 0);
        return Planned::Done(completion(
            ep,
            &asked.episode,
            slot.episode.turns,
            None,
            usage,
        ));
    }
    slot.busy = true;
    let k = slot.group_size as u64;
    let stream = slot.sample as u64 + u64::from(slot.episode.turns) * k;
    Planned::Turn(plan, slot.group, stream)
}

/// A `chat.completion` reply: the message (none when the budget was spent: empty,
/// finish `length`) and `usage` = (prompt tokens, completion tokens).
fn completion(
    ep: &Endpoint,
    episode: &str,
    turn: u32,
    reply: Option<(&chat_episode::Message, Option<tandem_model::FinishReason>)>,
    (prompt, tokens): (usize, usize),
) -> Response {
    let id = format!("{episode}-{turn}");
    let (message, finish) = match reply {
        Some((m, f)) => {
            let finish = if !m.calls.is_empty() {
                "tool_calls"
            } else if f == Some(tandem_model::FinishReason::Stop) {
                "stop"
            } else {
                "length"
            };
            (chat_episode::reply_json(m, &id), finish)
        }
        None => (json!({"role": "assistant", "content": ""}), "length"),
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    axum::Json(json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": created,
        "model": ep.policy.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens},
    }))
    .into_response()
}
