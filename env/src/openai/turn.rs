//! `POST /v1/chat/completions` and `POST /v1/completions`: a request admitted, planned
//! against its episode, sampled by the engine, recorded, and answered.

use super::*;

pub(super) async fn chat(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    turn_endpoint(ep, headers, body, false).await
}

pub(super) async fn completions(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    turn_endpoint(ep, headers, body, true).await
}

/// A turn request: the body read, the key checked, the fields checked, then the turn.
pub(super) async fn turn_endpoint(
    ep: Arc<Endpoint>,
    headers: HeaderMap,
    body: Bytes,
    text: bool,
) -> Response {
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
pub(super) async fn serve_turn(ep: Arc<Endpoint>, shared: Shared, asked: Asked) -> Response {
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
pub(super) struct Cut {
    pub(super) keep: usize,
    pub(super) text: String,
    pub(super) stopped: bool,
}

/// The first of `stops` in the turn's text, vLLM's way: the text ends before it, and
/// the tokens end with the one that completed it (the rest was sampled but is dropped,
/// as if the engine had stopped there: the kept tokens are what the trainer trains).
pub(super) fn cut_at_stop(
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
pub(super) struct Sampled<'a> {
    pub(super) prompt: &'a [u32],
    pub(super) turn: &'a Turn,
    pub(super) keep: usize,
}

/// Marks an episode free for its next request when dropped.
pub(super) struct Busy<'a>(&'a Shared);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(self.0).busy = false;
    }
}

/// What planning a request gave: a turn to sample (its plan, the group and the random
/// stream), or the reply already (an error, or an empty turn when the budget is spent).
pub(super) enum Planned {
    Turn(TurnPlan, u64, u64),
    Done(Response),
}

/// Checks the episode's state and plans its turn (renders and tokenizes the
/// conversation or the prompt), holding only this episode's slot; marks it busy.
pub(super) fn plan_turn(ep: &Endpoint, shared: &Mutex<Slot>, asked: &Asked) -> Planned {
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
