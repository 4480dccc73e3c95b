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
