//! The reply bodies: OpenAI's chat and text completion objects with vLLM's token-level
//! fields (`logprobs`, `prompt_token_ids`, `token_ids`) and usage.

use super::*;

pub(super) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token as the logprobs name it: its text, or `token_id:<id>`
/// (`return_tokens_as_token_ids`).
pub(super) fn token_name(tok: &Tokenizer, id: u32, as_id: bool) -> String {
    if as_id {
        format!("token_id:{id}")
    } else {
        tok.decode(&[id], false).unwrap_or_default()
    }
}

/// `{"token", "logprob", "bytes"}`: `bytes` are the UTF-8 bytes of the token's text.
pub(super) fn logprob_entry(tok: &Tokenizer, id: u32, logprob: f32, as_id: bool) -> Value {
    let name = token_name(tok, id, as_id);
    let bytes: Vec<u8> = if as_id {
        tok.decode(&[id], false).unwrap_or_default().into_bytes()
    } else {
        name.clone().into_bytes()
    };
    json!({"token": name, "logprob": logprob, "bytes": bytes})
}

pub(super) fn usage(prompt: usize, tokens: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens})
}

/// A `chat.completion` reply: the message (none when the budget was spent: empty,
/// finish `length`), with `logprobs.content` (one entry per sampled token, the final
/// end-of-turn token included) and vLLM's `prompt_token_ids` / `token_ids` when asked.
pub(super) fn chat_reply(
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
pub(super) fn text_reply(
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
