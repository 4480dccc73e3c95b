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

/// An optional boolean field (null = absent).
fn flag(v: &Value, field: &str) -> Result<bool, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(format!("{field}: {} must be true or false", short(other))),
    }
}

/// An optional integer field in `lo..=hi` (null = absent).
fn integer(v: &Value, field: &str, lo: u64, hi: u64) -> Result<Option<u64>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "{field}: {} must be an integer from {lo} to {hi}",
                short(x)
            )),
        },
    }
}

/// A value as the start of its JSON, for an error message.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

/// Fields both turn endpoints read the same way.
fn common(v: &Value) -> Result<usize, String> {
    if flag(v, "stream")? {
        return Err("stream: streaming is not served; send \"stream\": false".into());
    }
    match v.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(n) => {
            return Err(format!(
                "n: {} choices asked; one is served per request (the group's samples are episodes of their own)",
                short(n)
            ))
        }
    }
    for field in ["temperature", "top_p"] {
        match v.get(field) {
            None | Some(Value::Null) => {}
            Some(x) if x.as_f64().is_some_and(|t| t.is_finite() && t >= 0.0) => {}
            Some(x) => return Err(format!("{field}: {} must be a number ≥ 0", short(x))),
        }
    }
    match v
        .get("max_completion_tokens")
        .filter(|m| !m.is_null())
        .or_else(|| v.get("max_tokens"))
    {
        None | Some(Value::Null) => Ok(usize::MAX),
        Some(m) => match m.as_u64() {
            Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
            _ => Err(format!("max_tokens: {} must be an integer ≥ 1", short(m))),
        },
    }
}

/// What a turn request asks for.
enum Kind {
    Chat {
        messages: Vec<chat_episode::Message>,
        tools: Vec<Value>,
    },
    Text {
        prompt: Prompt,
        stop: Vec<String>,
    },
}

/// What the reply carries beside the turn.
#[derive(Clone, Copy, Default)]
struct Extras {
    /// Chat: `logprobs: true`; completions: `logprobs` was given.
    logprobs: bool,
    /// Most likely tokens per token (chat `top_logprobs`, completions `logprobs`).
    top: usize,
    /// vLLM's `return_token_ids`: `prompt_token_ids` and each choice's `token_ids`.
    token_ids: bool,
    /// vLLM's `return_tokens_as_token_ids`: tokens named `token_id:<id>`.
    tokens_as_ids: bool,
}

/// A turn request, checked.
struct Asked {
    episode: String,
    kind: Kind,
    max_tokens: usize,
    extras: Extras,
}

/// A `/v1/chat/completions` request's fields, checked; the error names the field.
fn read_chat(v: &Value) -> Result<(Kind, usize, Extras), String> {
    let max_tokens = common(v)?;
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
    let logprobs = flag(v, "logprobs")?;
    let top = integer(v, "top_logprobs", 0, MAX_TOP_LOGPROBS as u64)?.unwrap_or(0) as usize;
    if top > 0 && !logprobs {
        return Err("top_logprobs: needs \"logprobs\": true".into());
    }
    let extras = Extras {
        logprobs,
        top,
        token_ids: flag(v, "return_token_ids")?,
        tokens_as_ids: flag(v, "return_tokens_as_token_ids")?,
    };
    Ok((Kind::Chat { messages, tools }, max_tokens, extras))
}

/// A `/v1/completions` request's fields, checked against the vocabulary (`vocab`) and
/// the context; the error names the field.
fn read_completions(
    v: &Value,
    vocab: usize,
    context: usize,
) -> Result<(Kind, usize, Extras), String> {
    let max_tokens = common(v)?;
    if flag(v, "echo")? {
        return Err("echo: the prompt is not echoed; send \"echo\": false (return_token_ids gives prompt_token_ids)".into());
    }
    let prompt = match v.get("prompt") {
        Some(Value::String(s)) => Prompt::Text(s.clone()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Prompt::Text(items[0].as_str().unwrap_or_default().to_string())
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            if items.len() >= context {
                return Err(format!(
                    "prompt: {} tokens, the model's context {}",
                    items.len(),
                    context
                ));
            }
            let ids = items
                .iter()
                .enumerate()
                .map(|(i, x)| match x.as_u64() {
                    Some(id) if id < vocab as u64 => Ok(id as u32),
                    _ => Err(format!(
                        "prompt[{i}]: {} is not a token id below the vocabulary size {vocab}",
                        short(x)
                    )),
                })
                .collect::<Result<Vec<u32>, String>>()?;
            Prompt::Tokens(ids)
        }
        None | Some(Value::Null) => {
            return Err("prompt: missing (a string, or a list of token ids)".into())
        }
        Some(_) => {
            return Err("prompt: one prompt per request: a string, or a list of token ids".into())
        }
    };
    if matches!(&prompt, Prompt::Text(t) if t.is_empty())
        || matches!(&prompt, Prompt::Tokens(t) if t.is_empty())
    {
        return Err("prompt: empty; at least one token is needed".into());
    }
    let stop = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= MAX_STOP => items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("stop[{i}]: must be a string"))
            })
            .collect::<Result<Vec<String>, String>>()?,
        Some(Value::Array(items)) => {
            return Err(format!("stop: {} strings, at most {MAX_STOP}", items.len()))
        }
        Some(_) => return Err("stop: must be a string or a list of strings".into()),
    };
    for (i, s) in stop.iter().enumerate() {
        if s.is_empty() || s.len() > MAX_STOP_BYTES {
            return Err(format!(
                "stop[{i}]: {} bytes; a stop string has 1 to {MAX_STOP_BYTES}",
                s.len()
            ));
        }
    }
    let logprobs = integer(v, "logprobs", 0, MAX_TOP_LOGPROBS as u64)?;
    let extras = Extras {
        logprobs: logprobs.is_some(),
        top: logprobs.unwrap_or(0) as usize,
        token_ids: flag(v, "return_token_ids")?,
        tokens_as_ids: flag(v, "return_tokens_as_token_ids")?,
    };
    Ok((Kind::Text { prompt, stop }, max_tokens, extras))
}

async fn chat(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    turn_endpoint(ep, headers, body, false).await
}

async fn completions(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    turn_endpoint(ep, headers, body, true).await
}

/// A turn request: the body read, the key checked, the fields checked, then the turn.
async fn turn_endpoint(ep: Arc<Endpoint>, headers: HeaderMap, body: Bytes, text: bool) -> Response {
    let (v, episode, shared) = match admit(&ep, &headers, &body) {
        Ok(a) => a,
        Err((status, why)) => return error(status, why),
    };
    let read = if text {
        read_completions(&v, ep.policy.vocab, ep.policy.context)
    } else {
        read_chat(&v)
    };
    let (kind, max_tokens, extras) = match read {
        Ok(r) => r,
        Err(why) => return bad(why),
    };
    drop(v);
    let asked = Asked {
        episode,
        kind,
        max_tokens,
        extras,
    };
    serve_turn(ep, shared, asked).await
}

/// Plans, samples and records one turn of the episode in `shared`.
async fn serve_turn(ep: Arc<Endpoint>, shared: Shared, asked: Asked) -> Response {
    // Rendering and tokenizing may take a while on a long conversation: on a blocking
    // thread, holding only this episode.
    let asked = Arc::new(asked);
    let planning = {
        let (ep, shared, asked) = (ep.clone(), shared.clone(), asked.clone());
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
        top_logprobs: asked.extras.top,
        reply: tx,
    });
    let sampled = match sent {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    if ep.slot(&asked.episode).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            "the episode ended while its turn was sampled",
        );
    }
    let turn = match sampled {
        Some(Ok(t)) => t,
        Some(Err(why)) => return bad(why),
        None => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the generator stopped sampling this episode's group; end the episode",
            )
        }
    };
    let held = (ep.policy.held)();
    let tok = &ep.policy.tokenizer;
    let mut slot = lock(&shared);
    let prompt = plan.prompt.clone();
    let id = format!("{}-{}", asked.episode, slot.episode.turns);
    match &asked.kind {
        Kind::Chat { .. } => {
            let finish = turn.completion.finish_reason;
            let recorded = slot.episode.record(
                plan,
                turn.completion.clone(),
                turn.tags.clone(),
                held,
                tok,
                &ep.policy.stop,
            );
            match recorded {
                Ok(reply) => {
                    let out = Sampled {
                        prompt: &prompt,
                        turn: &turn,
                        keep: turn.completion.tokens.len(),
                    };
                    chat_reply(&ep, &id, Some((&reply, finish)), &out, asked.extras)
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        Kind::Text { stop, .. } => {
            let cut = match cut_at_stop(tok, &turn.completion.tokens, &ep.policy.stop, stop) {
                Ok(c) => c,
                Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            };
            let mut kept = turn.completion.clone();
            kept.tokens.truncate(cut.keep);
            kept.logprobs.truncate(cut.keep);
            if cut.stopped {
                kept.finish_reason = Some(FinishReason::Stop);
            }
            let mut tags = turn.tags.clone();
            tags.truncate(cut.keep);
            if let Err(e) = slot
                .episode
                .record_text(plan, kept.clone(), tags, held, tok)
            {
                return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
            let out = Sampled {
                prompt: &prompt,
                turn: &turn,
                keep: cut.keep,
            };
            text_reply(&ep, &id, &cut.text, kept.finish_reason, &out, asked.extras)
        }
    }
}

/// Where a completions turn ends: the tokens kept (all, or through the one that
/// completed the first stop string) and the reply's text (without the turn's final stop
/// token, cut before the stop string).
struct Cut {
    keep: usize,
    text: String,
    stopped: bool,
}

/// The first of `stops` in the turn's text, vLLM's way: the text ends before it, and
/// the tokens end with the one that completed it (the rest was sampled but is dropped,
/// as if the engine had stopped there: the kept tokens are what the trainer trains).
fn cut_at_stop(
    tok: &Tokenizer,
    tokens: &[u32],
    stop_ids: &[u32],
    stops: &[String],
) -> tandem_model::Result<Cut> {
    let body = match tokens.split_last() {
        Some((last, body)) if stop_ids.contains(last) => body,
        _ => tokens,
    };
    let text = tok.decode(body, false)?;
    let first = stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
        .min_by_key(|(at, _)| *at);
    let Some((at, stop)) = first else {
        return Ok(Cut {
            keep: tokens.len(),
            text,
            stopped: false,
        });
    };
    // The shortest prefix of tokens whose text holds the stop string (holding it is
    // monotone in the prefix's length).
    let (mut lo, mut hi) = (1, body.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if tok.decode(&body[..mid], false)?.contains(stop.as_str()) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(Cut {
        keep: hi,
        text: text[..at].to_string(),
        stopped: true,
    })
}

/// A sampled turn as a reply shows it: the engine's prompt, the turn, and how many of
/// its tokens were kept.
struct Sampled<'a> {
    prompt: &'a [u32],
    turn: &'a Turn,
    keep: usize,
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
    Turn(TurnPlan, u64, u64),
    Done(Response),
}

/// Checks the episode's state and plans its turn (renders and tokenizes the
/// conversation or the prompt), holding only this episode's slot; marks it busy.
fn plan_turn(ep: &Endpoint, shared: &Mutex<Slot>, asked: &Asked) -> Planned {
    let mut slot = lock(shared);
    if slot.busy {
        return Planned::Done(error(
            StatusCode::CONFLICT,
            "this episode has a request being served; send its turns one at a time",
        ));
    }
    if slot.episode.turns >= ep.policy.max_turns {
        return Planned::Done(bad(format!(
            "the episode has had its [env] max_turns = {} model turns; end it (or raise max_turns)",
            ep.policy.max_turns
        )));
    }
    let tok = &ep.policy.tokenizer;
    let (field, planned) = match &asked.kind {
        Kind::Chat { messages, tools } => (
            "messages",
            slot.episode.render(tok, messages, tools).and_then(|text| {
                slot.episode
                    .plan(tok, &text, asked.max_tokens, ep.policy.budget)
            }),
        ),
        Kind::Text { prompt, .. } => (
            "prompt",
            slot.episode
                .plan_prompt(tok, prompt, asked.max_tokens, ep.policy.budget),
        ),
    };
    let mut plan = match planned {
        Ok(p) => p,
        Err(e) => return Planned::Done(bad(format!("{field}: {e}"))),
    };
    if plan.prompt.is_empty() {
        return Planned::Done(bad(format!("{field}: no tokens; at least one is needed")));
    }
    if plan.prompt.len() >= ep.policy.context {
        return Planned::Done(bad(format!(
            "{field}: the prompt is {} tokens, the model's context {}; end the episode",
            plan.prompt.len(),
            ep.policy.context
        )));
    }
    // The reply ends at the context's end, as it would at max_tokens.
    plan.max_new = plan.max_new.min(ep.policy.context - plan.prompt.len());
    if plan.max_new == 0 {
        // The sample's token budget is spent: nothing is sampled or recorded.
        let id = format!("{}-{}", asked.episode, slot.episode.turns);
        let empty = Turn {
            completion: Completion {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish_reason: Some(FinishReason::Length),
            },
            tags: Vec::new(),
            tops: Vec::new(),
        };
        let out = Sampled {
            prompt: &plan.prompt,
            turn: &empty,
            keep: 0,
        };
        return Planned::Done(match &asked.kind {
            Kind::Chat { .. } => chat_reply(ep, &id, None, &out, asked.extras),
            Kind::Text { .. } => text_reply(ep, &id, "", None, &out, asked.extras),
        });
    }
    slot.busy = true;
    let k = slot.group_size as u64;
    let stream = slot.sample as u64 + u64::from(slot.episode.turns) * k;
    Planned::Turn(plan, slot.group, stream)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token as the logprobs name it: its text, or `token_id:<id>`
/// (`return_tokens_as_token_ids`).
fn token_name(tok: &Tokenizer, id: u32, as_id: bool) -> String {
    if as_id {
        format!("token_id:{id}")
    } else {
        tok.decode(&[id], false).unwrap_or_default()
    }
}

/// `{"token", "logprob", "bytes"}`: `bytes` are the UTF-8 bytes of the token's text.
fn logprob_entry(tok: &Tokenizer, id: u32, logprob: f32, as_id: bool) -> Value {
    let name = token_name(tok, id, as_id);
    let bytes: Vec<u8> = if as_id {
        tok.decode(&[id], false).unwrap_or_default().into_bytes()
    } else {
        name.clone().into_bytes()
    };
    json!({"token": name, "logprob": logprob, "bytes": bytes})
}

fn usage(prompt: usize, tokens: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens})
}

/// A `chat.completion` reply: the message (none when the budget was spent: empty,
/// finish `length`), with `logprobs.content` (one entry per sampled token, the final
/// end-of-turn token included) and vLLM's `prompt_token_ids` / `token_ids` when asked.
fn chat_reply(
    ep: &Endpoint,
    id: &str,
    reply: Option<(&chat_episode::Message, Option<FinishReason>)>,
    out: &Sampled,
    extras: Extras,
) -> Response {
    let tok = &ep.policy.tokenizer;
    let (message, finish) = match reply {
        Some((m, f)) => {
            let finish = if !m.calls.is_empty() {
                "tool_calls"
            } else if f == Some(FinishReason::Stop) {
                "stop"
            } else {
                "length"
            };
            (chat_episode::reply_json(m, id), finish)
        }
        None => (json!({"role": "assistant", "content": ""}), "length"),
    };
    let c = &out.turn.completion;
    let logprobs = if extras.logprobs {
        let content: Vec<Value> = c
            .tokens
            .iter()
            .zip(&c.logprobs)
            .enumerate()
            .map(|(j, (&t, &lp))| {
                let mut e = logprob_entry(tok, t, lp, extras.tokens_as_ids);
                let tops: Vec<Value> = out
                    .turn
                    .tops
                    .get(j)
                    .map(|tops| {
                        tops.iter()
                            .take(extras.top)
                            .map(|&(t, lp)| logprob_entry(tok, t, lp, extras.tokens_as_ids))
                            .collect()
                    })
                    .unwrap_or_default();
                e["top_logprobs"] = Value::Array(tops);
                e
            })
            .collect();
        json!({"content": content, "refusal": null})
    } else {
        Value::Null
    };
    let mut choice =
        json!({"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs});
    let mut reply = json!({
        "id": format!("chatcmpl-{id}"),
        "object": "chat.completion",
        "created": now(),
        "model": ep.policy.model,
        "usage": usage(out.prompt.len(), c.tokens.len()),
    });
    if extras.token_ids {
        choice["token_ids"] = json!(c.tokens);
        reply["prompt_token_ids"] = json!(out.prompt);
    }
    reply["choices"] = json!([choice]);
    axum::Json(reply).into_response()
}

/// A `text_completion` reply: the text, the legacy `logprobs` (`tokens`,
/// `token_logprobs`, `top_logprobs` as {token: logprob} with the sampled token among
/// them, `text_offset`) over the kept tokens, and vLLM's `prompt_token_ids` /
/// `token_ids` on the choice when asked.
fn text_reply(
    ep: &Endpoint,
    id: &str,
    text: &str,
    finish: Option<FinishReason>,
    out: &Sampled,
    extras: Extras,
) -> Response {
    let tok = &ep.policy.tokenizer;
    let c = &out.turn.completion;
    let kept = &c.tokens[..out.keep];
    let finish = match finish {
        Some(FinishReason::Stop) => "stop",
        _ => "length",
    };
    let logprobs = if extras.logprobs {
        let mut offset = 0usize;
        let (mut tokens, mut offsets, mut tops) = (Vec::new(), Vec::new(), Vec::new());
        for (j, &t) in kept.iter().enumerate() {
            let name = token_name(tok, t, extras.tokens_as_ids);
            offsets.push(offset);
            offset += tok.decode(&[t], false).unwrap_or_default().chars().count();
            let mut top = serde_json::Map::new();
            if let Some(listed) = out.turn.tops.get(j) {
                for &(u, lp) in listed.iter().take(extras.top) {
                    top.insert(token_name(tok, u, extras.tokens_as_ids), json!(lp));
                }
            }
            top.entry(name.clone()).or_insert(json!(c.logprobs[j]));
            tops.push(Value::Object(top));
            tokens.push(name);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": &c.logprobs[..out.keep],
            "top_logprobs": tops,
            "text_offset": offsets,
        })
    } else {
        Value::Null
    };
    let mut choice =
        json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs});
    if extras.token_ids {
        choice["prompt_token_ids"] = json!(out.prompt);
        choice["token_ids"] = json!(kept);
    }
    axum::Json(json!({
        "id": format!("cmpl-{id}"),
        "object": "text_completion",
        "created": now(),
        "model": ep.policy.model,
        "choices": [choice],
        "usage": usage(out.prompt.len(), kept.len()),
    }))
    .into_response()
}

/// `POST /tokenize`: vLLM's. `{"prompt", "add_special_tokens" (default true: BOS where
/// the model's tokenizer adds one)}` or `{"messages", "tools", "add_generation_prompt"
/// (default true)}` rendered as the chat endpoint renders this episode's conversation
/// → `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` when
/// `return_token_strs`).
async fn tokenize(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    let (v, _, shared) = match admit(&ep, &headers, &body) {
        Ok(a) => a,
        Err((status, why)) => return error(status, why),
    };
    let work = tokio::task::spawn_blocking(move || tokenize_request(&ep, &shared, &v));
    match work.await {
        Ok(Ok(reply)) => axum::Json(reply).into_response(),
        Ok(Err(why)) => bad(why),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("tokenizing: {e}"),
        ),
    }
}

fn tokenize_request(ep: &Endpoint, shared: &Mutex<Slot>, v: &Value) -> Result<Value, String> {
    let tok = &ep.policy.tokenizer;
    let strs = flag(v, "return_token_strs")?;
    let ids = match (
        v.get("prompt").filter(|p| !p.is_null()),
        v.get("messages").filter(|m| !m.is_null()),
    ) {
        (Some(_), Some(_)) => return Err("prompt, messages: send one of them".into()),
        (Some(p), None) => {
            let text = p.as_str().ok_or("prompt: must be a string")?;
            let special = match v.get("add_special_tokens") {
                None | Some(Value::Null) => true,
                Some(_) => flag(v, "add_special_tokens")?,
            };
            let ids = if special {
                tok.encode_prompt(text)
            } else {
                tok.encode(text)
            };
            ids.map_err(|e| format!("prompt: {e}"))?
        }
        (None, Some(m)) => {
            let messages = chat_episode::parse_messages(
                m.as_array()
                    .ok_or("messages: must be a list of {\"role\", \"content\"}")?,
            )?;
            let tools = match v.get("tools") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(t)) => chat_episode::parse_tools(t)?,
                Some(_) => return Err("tools: must be a list".into()),
            };
            let generation = match v.get("add_generation_prompt") {
                None | Some(Value::Null) => true,
                Some(_) => flag(v, "add_generation_prompt")?,
            };
            let slot = lock(shared);
            slot.episode
                .render_with(tok, &messages, &tools, generation)
                .and_then(|text| tok.encode(&text))
                .map_err(|e| format!("messages: {e}"))?
        }
        (None, None) => {
            return Err(
                "prompt: missing; send \"prompt\" (text) or \"messages\" (a conversation)".into(),
            )
        }
    };
    let mut reply = json!({
        "count": ids.len(),
        "max_model_len": ep.policy.context,
        "tokens": ids,
        "token_strs": null,
    });
    if strs {
        let names: Vec<String> = ids.iter().map(|&t| token_name(tok, t, false)).collect();
        reply["token_strs"] = json!(names);
    }
    Ok(reply)
}

/// `POST /detokenize`: vLLM's. `{"tokens"}` (each below the vocabulary size, at most
/// the model's context of them) → `{"prompt": text}`.
async fn detokenize(State(ep): State<Arc<Endpoint>>, headers: HeaderMap, body: Bytes) -> Response {
    let v = match admit(&ep, &headers, &body) {
        Ok((v, _, _)) => v,
        Err((status, why)) => return error(status, why),
    };
    let ids = match token_ids(&v, "tokens", ep.policy.vocab, ep.policy.context) {
        Ok(ids) => ids,
        Err(why) => return bad(why),
    };
    match ep.policy.tokenizer.decode(&ids, false) {
        Ok(text) => axum::Json(json!({"prompt": text})).into_response(),
        Err(e) => bad(format!("tokens: {e}")),
    }
}

/// A list of token ids in `field`: each below `vocab`, at most `most` of them.
fn token_ids(v: &Value, field: &str, vocab: usize, most: usize) -> Result<Vec<u32>, String> {
    let items = v
        .get(field)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{field}: missing (a list of token ids)"))?;
    if items.len() > most {
        return Err(format!(
            "{field}: {} tokens, at most the model's context of {most}",
            items.len()
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x.as_u64() {
            Some(id) if id < vocab as u64 => Ok(id as u32),
            _ => Err(format!(
                "{field}[{i}]: {} is not a token id below the vocabulary size {vocab}",
                short(x)
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use tandem_model::preset::EOS_ID;

    const KEY: &str = "tandem-key-0";
    const EPISODE: &str = "7-0-ab";
    const CONTEXT: usize = 96;

    /// The endpoint over a stand-in engine that answers every turn with the tokens of
    /// "12 apples. The end", then the end-of-turn token (cut at `max_new`), each with
    /// logprob −0.25 − j/100 and version 3, and, when asked, `top_logprobs` entries:
    /// the sampled token first, then ids 10, 11, ….
    struct Fake {
        addr: std::net::SocketAddr,
        ep: Arc<Endpoint>,
        _rt: tokio::runtime::Runtime,
    }

    fn tokenizer() -> Tokenizer {
        tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu)
            .unwrap()
            .tokenizer
    }

    fn fake() -> Fake {
        let tok = tokenizer();
        let (tx, rx) = std::sync::mpsc::channel::<TurnRequest>();
        let mut answer = tok.encode("12 apples. The end").unwrap();
        answer.push(EOS_ID);
        std::thread::spawn(move || {
            for t in rx {
                let tokens: Vec<u32> = answer.iter().copied().take(t.max_new).collect();
                let logprobs: Vec<f32> = (0..tokens.len())
                    .map(|j| -0.25 - j as f32 / 100.0)
                    .collect();
                let tops = if t.top_logprobs == 0 {
                    Vec::new()
                } else {
                    tokens
                        .iter()
                        .zip(&logprobs)
                        .map(|(&tok, &lp)| {
                            let mut top = vec![(tok, lp)];
                            top.extend((10..).take(t.top_logprobs - 1).map(|u| (u, -5.0)));
                            top
                        })
                        .collect()
                };
                let finish = if tokens.last() == Some(&EOS_ID) {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                };
                let _ = t.reply.send(Ok(Turn {
                    tags: vec![3; tokens.len()],
                    completion: Completion {
                        tokens,
                        logprobs,
                        finish_reason: Some(finish),
                    },
                    tops,
                }));
            }
        });
        let policy = Policy {
            vocab: tok.vocab_size(),
            tokenizer: tok,
            stop: vec![EOS_ID],
            max_turns: 8,
            budget: 64,
            context: CONTEXT,
            held: Arc::new(|| 2),
            model: "tandem".into(),
        };
        let ep = Arc::new(Endpoint::new(tx, policy));
        ep.insert(EPISODE.into(), Slot::new(7, 0, 2, KEY.into()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(serve(listener, ep.clone()));
        Fake { addr, ep, _rt: rt }
    }

    /// POSTs `body` to `path` (HTTP/1.1, one request per connection): status and JSON.
    fn post(f: &Fake, path: &str, key: Option<&str>, body: &str) -> (u16, Value) {
        let mut s = std::net::TcpStream::connect(f.addr).unwrap();
        let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nX-Episode-Id: {EPISODE}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status: u16 = out[9..12].parse().unwrap();
        let json = out
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(Value::Null);
        (status, json)
    }

    fn refused(f: &Fake, path: &str, key: Option<&str>, body: &str, status: u16, needle: &str) {
        let (got, v) = post(f, path, key, body);
        let message = v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert_eq!(got, status, "{path} {body}: {message}");
        assert!(
            message.contains(needle),
            "{path} {body}: {message:?} lacks {needle:?}"
        );
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    /// Chat with vLLM's token fields: `prompt_token_ids` is the engine's prompt, the
    /// choice's `token_ids` and `logprobs.content` are the sampled tokens (the
    /// end-of-turn token too) with their recorded logprobs, `top_logprobs` as many as
    /// asked; the episode records exactly those tokens.
    #[test]
    fn chat_returns_the_sampled_tokens_and_their_logprobs() {
        let f = fake();
        let body = json!({
            "model": "tandem",
            "messages": [{"role": "user", "content": "How many apples?"}],
            "logprobs": true,
            "top_logprobs": 3,
            "max_completion_tokens": 32,
            "return_token_ids": true,
        });
        let (status, v) = post(&f, "/v1/chat/completions", Some(KEY), &body.to_string());
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["content"], "12 apples. The end");
        assert_eq!(choice["finish_reason"], "stop");
        let sampled = ids(&choice["token_ids"]);
        assert_eq!(sampled.last(), Some(&EOS_ID));
        let content = choice["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), sampled.len());
        for (j, e) in content.iter().enumerate() {
            let lp = e["logprob"].as_f64().unwrap();
            assert!((lp - (-0.25 - j as f64 / 100.0)).abs() < 1e-6, "{e}");
            assert_eq!(e["top_logprobs"].as_array().unwrap().len(), 3);
            assert_eq!(e["top_logprobs"][0]["logprob"], e["logprob"]);
            let bytes: Vec<u8> = e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            assert_eq!(bytes, e["token"].as_str().unwrap().as_bytes());
        }
        let prompt = ids(&v["prompt_token_ids"]);
        assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
        let episode = f.ep.remove(EPISODE).unwrap();
        let s = &episode.samples[0].tokens;
        assert_eq!(s.ids, [prompt.clone(), sampled.clone()].concat());
        let recorded: Vec<f32> = (0..sampled.len())
            .map(|j| -0.25 - j as f32 / 100.0)
            .collect();
        assert_eq!(&s.logprobs[prompt.len()..], &recorded[..]);
        assert!(s.mask[prompt.len()..].iter().all(|&m| m == 1));
        // Without the fields: no logprobs, no token ids.
        let f = fake();
        let plain = json!({"messages": [{"role": "user", "content": "hi"}], "return_tokens_as_token_ids": true});
        let (status, v) = post(&f, "/v1/chat/completions", Some(KEY), &plain.to_string());
        assert_eq!(status, 200, "{v}");
        assert!(v["choices"][0]["logprobs"].is_null() && v.get("prompt_token_ids").is_none());
        let named = json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "return_tokens_as_token_ids": true});
        let (_, v) = post(&f, "/v1/chat/completions", Some(KEY), &named.to_string());
        let first = &v["choices"][0]["logprobs"]["content"][0];
        assert!(
            first["token"].as_str().unwrap().starts_with("token_id:"),
            "{first}"
        );
    }

    /// Completions: a text prompt and its continuation by token ids extend one sample
    /// (the second prompt is the first's tokens and the reply's, then new ones); the
    /// legacy logprobs; a stop string cuts the text before it and the recorded tokens
    /// after the token that completed it.
    #[test]
    fn completions_merge_into_samples_and_stop_strings_cut_the_tokens() {
        let f = fake();
        let tok = tokenizer();
        let body = json!({"model": "tandem", "prompt": "Apples:", "max_tokens": 40, "logprobs": 2, "return_token_ids": true, "temperature": 1.0});
        let (status, v) = post(&f, "/v1/completions", Some(KEY), &body.to_string());
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], "12 apples. The end");
        let prompt = ids(&choice["prompt_token_ids"]);
        assert_eq!(prompt, tok.encode_prompt("Apples:").unwrap());
        let sampled = ids(&choice["token_ids"]);
        let lp = &choice["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), sampled.len());
        assert_eq!(
            lp["token_logprobs"].as_array().unwrap().len(),
            sampled.len()
        );
        assert_eq!(lp["text_offset"][0], 0);
        // Top 2 (the sampled token is the first of them here).
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
        // The next request continues by token ids.
        let more = tok.encode(" More:").unwrap();
        let next: Vec<u32> = [prompt.clone(), sampled.clone(), more.clone()].concat();
        let body = json!({"prompt": next, "stop": [". "], "return_token_ids": true});
        let (status, v) = post(&f, "/v1/completions", Some(KEY), &body.to_string());
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], "12 apples");
        assert_eq!(choice["finish_reason"], "stop");
        let kept = ids(&choice["token_ids"]);
        let text = tok.decode(&kept, false).unwrap();
        assert!(
            text.contains(". ")
                && !tok
                    .decode(&kept[..kept.len() - 1], false)
                    .unwrap()
                    .contains(". "),
            "{text:?}"
        );
        assert!(choice["logprobs"].is_null());
        let episode = f.ep.remove(EPISODE).unwrap();
        assert_eq!(
            episode.samples.len(),
            1,
            "the token prompt extended the sample"
        );
        let s = &episode.samples[0].tokens;
        assert_eq!(s.ids, [next, kept.clone()].concat());
        let mask: Vec<u8> = [
            vec![0; prompt.len()],
            vec![1; sampled.len()],
            vec![0; more.len()],
            vec![1; kept.len()],
        ]
        .concat();
        assert_eq!(s.mask, mask);
        assert_eq!(s.finish, Some(FinishReason::Stop));
    }

    /// `/tokenize` gives the tokens the chat endpoint would feed for a conversation and
    /// a raw prompt's with BOS rules; `/detokenize` gives the text back.
    #[test]
    fn tokenize_and_detokenize_round_trip() {
        let f = fake();
        let tok = tokenizer();
        let messages = json!([{"role": "user", "content": "How many apples?"}]);
        let (status, v) = post(
            &f,
            "/tokenize",
            Some(KEY),
            &json!({"model": "tandem", "messages": messages}).to_string(),
        );
        assert_eq!(status, 200, "{v}");
        let rendered = tok
            .apply_chat_template(&[tandem_model::ChatMessage::user("How many apples?")], true)
            .unwrap();
        assert_eq!(ids(&v["tokens"]), tok.encode(&rendered).unwrap());
        assert_eq!(v["count"], v["tokens"].as_array().unwrap().len());
        assert_eq!(v["max_model_len"], CONTEXT);
        let (_, no_gen) = post(
            &f,
            "/tokenize",
            Some(KEY),
            &json!({"messages": messages, "add_generation_prompt": false}).to_string(),
        );
        assert!(no_gen["count"].as_u64() < v["count"].as_u64());
        let (_, raw) = post(
            &f,
            "/v1/tokenize",
            Some(KEY),
            &json!({"prompt": "12 apples", "return_token_strs": true}).to_string(),
        );
        let raw_ids = ids(&raw["tokens"]);
        assert_eq!(raw_ids, tok.encode_prompt("12 apples").unwrap());
        assert_eq!(raw["token_strs"].as_array().unwrap().len(), raw_ids.len());
        let (status, back) = post(
            &f,
            "/detokenize",
            Some(KEY),
            &json!({"model": "tandem", "tokens": raw_ids}).to_string(),
        );
        assert_eq!(status, 200, "{back}");
        assert_eq!(back["prompt"], tok.decode(&raw_ids, false).unwrap());
    }

    /// Every endpoint is served only with the episode's key, and every field it reads
    /// is checked: each abuse is refused with its status, naming the field.
    #[test]
    fn every_endpoint_checks_the_key_and_every_field() {
        let f = fake();
        let hi = json!([{"role": "user", "content": "hi"}]);
        let vocab = tokenizer().vocab_size();
        for path in [
            "/v1/chat/completions",
            "/v1/completions",
            "/tokenize",
            "/detokenize",
        ] {
            let body = json!({"messages": hi, "prompt": "x", "tokens": [1]}).to_string();
            refused(&f, path, None, &body, 401, "missing");
            refused(
                &f,
                path,
                Some("tandem-guess"),
                &body,
                401,
                "not this episode's key",
            );
            refused(&f, path, Some(KEY), "{\"messages\": [", 400, "not JSON");
            refused(&f, path, Some(KEY), "[1, 2]", 400, "JSON object");
        }
        let chat = "/v1/chat/completions";
        for (body, needle) in [
            (
                json!({"messages": hi, "logprobs": true, "top_logprobs": 1000}),
                "top_logprobs",
            ),
            (
                json!({"messages": hi, "logprobs": true, "top_logprobs": -1}),
                "top_logprobs",
            ),
            (
                json!({"messages": hi, "top_logprobs": 2}),
                "needs \"logprobs\": true",
            ),
            (json!({"messages": hi, "logprobs": "yes"}), "logprobs"),
            (
                json!({"messages": hi, "return_token_ids": 1}),
                "return_token_ids",
            ),
            (json!({"messages": hi, "n": 2}), "n:"),
            (json!({"messages": hi, "temperature": "hot"}), "temperature"),
            (json!({"messages": hi, "max_tokens": 0}), "max_tokens"),
        ] {
            refused(&f, chat, Some(KEY), &body.to_string(), 400, needle);
        }
        let long = "apples ".repeat(CONTEXT);
        refused(
            &f,
            chat,
            Some(KEY),
            &json!({"messages": [{"role": "user", "content": long}]}).to_string(),
            400,
            "context",
        );
        let text = "/v1/completions";
        for (body, needle) in [
            (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
            (json!({"prompt": "x", "logprobs": true}), "logprobs"),
            (json!({"prompt": [1, vocab]}), "prompt[1]"),
            (json!({"prompt": [1, -3]}), "prompt[1]"),
            (json!({"prompt": vec![1; CONTEXT]}), "context"),
            (json!({"prompt": ["a", "b"]}), "one prompt per request"),
            (json!({"prompt": ""}), "empty"),
            (json!({"prompt": {"text": "x"}}), "prompt"),
            (json!({"max_tokens": 3}), "prompt: missing"),
            (json!({"prompt": "x", "n": 3}), "n:"),
            (
                json!({"prompt": "x", "stop": vec!["a"; MAX_STOP + 1]}),
                "stop",
            ),
            (json!({"prompt": "x", "stop": ["a", 3]}), "stop[1]"),
            (json!({"prompt": "x", "stop": [""]}), "stop[0]"),
            (
                json!({"prompt": "x", "stop": ["a".repeat(MAX_STOP_BYTES + 1)]}),
                "stop[0]",
            ),
            (json!({"prompt": "x", "echo": true}), "echo"),
            (json!({"prompt": "x", "stream": true}), "stream"),
            (json!({"prompt": "x", "temperature": -1}), "temperature"),
        ] {
            refused(&f, text, Some(KEY), &body.to_string(), 400, needle);
        }
        refused(
            &f,
            text,
            Some(KEY),
            &json!({"prompt": long}).to_string(),
            400,
            "context",
        );
        for (body, needle) in [
            (json!({"tokens": [1, vocab]}), "tokens[1]"),
            (json!({"tokens": [1, 1u64 << 40]}), "tokens[1]"),
            (json!({"tokens": ["a"]}), "tokens[0]"),
            (json!({"tokens": vec![1; CONTEXT + 1]}), "at most"),
            (json!({"tokens": 5}), "tokens: missing"),
        ] {
            refused(&f, "/detokenize", Some(KEY), &body.to_string(), 400, needle);
        }
        for (body, needle) in [
            (json!({"prompt": "x", "messages": hi}), "one of them"),
            (json!({"prompt": 3}), "prompt"),
            (json!({"messages": "hi"}), "messages"),
            (
                json!({"messages": hi, "add_generation_prompt": "no"}),
                "add_generation_prompt",
            ),
            (json!({}), "prompt: missing"),
        ] {
            refused(&f, "/tokenize", Some(KEY), &body.to_string(), 400, needle);
        }
        // Nothing refused was sampled or recorded.
        assert_eq!(f.ep.remove(EPISODE).unwrap().turns, 0);
    }
}
