//! `POST /tokenize` and `POST /detokenize` (vLLM's), with the model's tokenizer and the
//! episode's chat template.

use super::*;

/// `POST /tokenize`: vLLM's. `{"prompt", "add_special_tokens" (default true: BOS where
/// the model's tokenizer adds one)}` or `{"messages", "tools", "add_generation_prompt"
/// (default true)}` rendered as the chat endpoint renders this episode's conversation
/// → `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` when
/// `return_token_strs`).
pub(super) async fn tokenize(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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

pub(super) fn tokenize_request(
    ep: &Endpoint,
    shared: &Mutex<Slot>,
    v: &Value,
) -> Result<Value, String> {
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
pub(super) async fn detokenize(
    State(ep): State<Arc<Endpoint>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
pub(super) fn token_ids(
    v: &Value,
    field: &str,
    vocab: usize,
    most: usize,
) -> Result<Vec<u32>, String> {
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
