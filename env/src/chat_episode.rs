//! An agent program's episode, as the OpenAI-compatible endpoint sees it: a series of
//! chat requests, each the whole conversation so far. A request whose rendered
//! conversation extends the previous turn's (the previous request's text, then the
//! model's turn as sampled) continues the same sample: only the new text after it is
//! tokenized (once, loss mask 0), and the model's tokens stay exactly as sampled. A
//! request that does not extend it starts a new sample of the same group.
//!
//! The model's earlier turns come back as the client echoes them (content, or parsed
//! tool calls). An echoed message equal to a reply this episode gave is rendered as the
//! turn's text as sampled, so a template that writes tool calls its own way cannot
//! break the prefix.

use serde_json::{json, Value};
use tandem_model::{ChatMessage, Completion, Tokenizer};

use crate::episode::Episode;
use crate::tool_call::{self, Action};

/// A request's message, normalized: its text and its tool calls.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
    pub calls: Vec<Call>,
}

/// A tool call: the function's name and its arguments (a JSON object).
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

/// The request's `messages`, checked; the error names the field.
pub fn parse_messages(messages: &[Value]) -> Result<Vec<Message>, String> {
    if messages.is_empty() {
        return Err("messages: empty; send the conversation so far".into());
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(m).map_err(|why| format!("messages[{i}]{why}")))
        .collect()
}

fn parse_message(m: &Value) -> Result<Message, String> {
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or(".role: missing (system, user, assistant or tool)")?;
    let role = match role {
        // The newer name of the system role.
        "developer" => "system",
        "system" | "user" | "assistant" | "tool" => role,
        other => {
            return Err(format!(
                ".role: {other:?} is not system, developer, user, assistant or tool"
            ))
        }
    };
    let content = match m.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (k, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(format!(
                        ".content[{k}]: only {{\"type\": \"text\", \"text\": …}} parts are served"
                    ))
                    }
                }
            }
            text
        }
        Some(_) => return Err(".content: must be a string, null or a list of text parts".into()),
    };
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) if role == "assistant" => calls
            .iter()
            .enumerate()
            .map(|(k, c)| parse_call(c).map_err(|why| format!(".tool_calls[{k}]{why}")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(".tool_calls: only an assistant message's list".into()),
    };
    Ok(Message {
        role: role.to_string(),
        content,
        calls,
    })
}

fn parse_call(c: &Value) -> Result<Call, String> {
    let f = c.get("function").ok_or(".function: missing")?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or(".function.name: missing")?;
    let arguments = match f.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s)
            .map_err(|e| format!(".function.arguments: not a JSON string: {e}"))?,
        Some(v) => v.clone(),
    };
    Ok(Call {
        name: name.to_string(),
        arguments,
    })
}

/// The request's `tools` as the schemas announced to the model; the error names the
/// field.
pub fn parse_tools(tools: &[Value]) -> Result<Vec<Value>, String> {
    for (i, t) in tools.iter().enumerate() {
        let named = t
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .is_some();
        if t.get("type").and_then(Value::as_str) != Some("function") || !named {
            return Err(format!(
                "tools[{i}]: must be {{\"type\": \"function\", \"function\": {{\"name\": …, \"parameters\": …}}}}"
            ));
        }
    }
    Ok(tools.to_vec())
}

/// A `/v1/completions` request's prompt: text, or token ids (checked against the
/// vocabulary).
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// One sample: its first prompt, then every turn since (the model's as sampled, the
/// rest tokenized once and masked).
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Its tokens, masks, logprobs, versions and turn counts; the first prompt is
    /// masked context.
    pub tokens: Episode,
    /// Tokens of the first prompt.
    pub prompt_len: usize,
    /// The conversation text the tokens stand for (model turns as decoded).
    text: String,
}

/// What a request asks the engine for: sample `max_new` tokens after `prompt`.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnPlan {
    /// The sample the turn extends, or `None` for a new one.
    pub extends: Option<usize>,
    /// The new text after the sample so far (or the whole prompt) and its tokens.
    pub text: String,
    pub new_ids: Vec<u32>,
    /// The engine's prompt: the sample so far and `new_ids`.
    pub prompt: Vec<u32>,
    /// Tokens the model may write in this turn (0: the sample's budget is spent).
    pub max_new: usize,
}

/// An episode: its samples and the replies it gave.
#[derive(Clone, Debug, Default)]
pub struct ChatEpisode {
    pub samples: Vec<Sample>,
    /// Each reply as the client echoes it, with the turn's text as sampled.
    replies: Vec<(Message, String)>,
    /// Model turns so far, all samples.
    pub turns: u32,
}

impl ChatEpisode {
    /// The conversation `messages` (the `tools` announced in its system turn) rendered
    /// with the model's chat template, ready for the assistant's turn. Echoed replies of
    /// this episode are rendered as sampled; other assistant tool calls in the Hermes
    /// convention.
    pub fn render(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        tools: &[Value],
    ) -> tandem_model::Result<String> {
        self.render_with(tokenizer, messages, tools, true)
    }

    /// [`ChatEpisode::render`], the assistant's header after the conversation only when
    /// `add_generation_prompt` (`/tokenize`'s field).
    pub fn render_with(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> tandem_model::Result<String> {
        let mut chat: Vec<ChatMessage> = messages
            .iter()
            .map(|m| {
                let sampled = (m.role == "assistant")
                    .then(|| self.replies.iter().find(|(r, _)| r == m))
                    .flatten();
                let content = match sampled {
                    Some((_, text)) => text.clone(),
                    None => {
                        let mut c = m.content.clone();
                        for call in &m.calls {
                            c.push_str(&tool_call::call_text(&call.name, &call.arguments));
                        }
                        c
                    }
                };
                ChatMessage {
                    role: m.role.clone(),
                    content,
                }
            })
            .collect();
        if !tools.is_empty() {
            let system = (chat[0].role == "system").then(|| chat.remove(0).content);
            chat.insert(
                0,
                ChatMessage {
                    role: "system".into(),
                    content: tool_call::announce(system.as_deref(), tools),
                },
            );
        }
        tokenizer.apply_chat_template(&chat, add_generation_prompt)
    }

    /// The turn for a request whose rendered conversation is `text`: the last sample
    /// extended when `text` starts with it, a new sample otherwise. At most `max_tokens`
    /// new tokens, and each sample's tokens after its prompt stay within `budget`.
    pub fn plan(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        max_tokens: usize,
        budget: usize,
    ) -> tandem_model::Result<TurnPlan> {
        if let Some(plan) = self.extend_text(tokenizer, text, max_tokens, budget)? {
            return Ok(plan);
        }
        let ids = tokenizer.encode(text)?;
        Ok(Self::new_sample(text.to_string(), ids, max_tokens, budget))
    }

    /// The turn for a `/v1/completions` request: a text prompt that starts with the
    /// last sample's text (its prompts and the model's turns as decoded) extends it,
    /// only the rest tokenized; a token prompt that starts with the last sample's tokens
    /// extends it, the rest taken as given. Anything else starts a new sample (a text
    /// prompt tokenized as a raw prompt: with BOS where the model's tokenizer adds one).
    pub fn plan_prompt(
        &self,
        tokenizer: &Tokenizer,
        prompt: &Prompt,
        max_tokens: usize,
        budget: usize,
    ) -> tandem_model::Result<TurnPlan> {
        match prompt {
            Prompt::Text(text) => {
                if let Some(plan) = self.extend_text(tokenizer, text, max_tokens, budget)? {
                    return Ok(plan);
                }
                let ids = tokenizer.encode_prompt(text)?;
                Ok(Self::new_sample(text.clone(), ids, max_tokens, budget))
            }
            Prompt::Tokens(ids) => {
                if let Some((k, s)) = self.samples.iter().enumerate().next_back() {
                    if let Some(rest) = ids.strip_prefix(s.tokens.ids.as_slice()) {
                        let used = s.tokens.ids.len() + rest.len() - s.prompt_len;
                        return Ok(TurnPlan {
                            extends: Some(k),
                            text: tokenizer.decode(rest, false)?,
                            prompt: ids.clone(),
                            new_ids: rest.to_vec(),
                            max_new: max_tokens.min(budget.saturating_sub(used)),
                        });
                    }
                }
                let text = tokenizer.decode(ids, false)?;
                Ok(Self::new_sample(text, ids.clone(), max_tokens, budget))
            }
        }
    }

    /// The turn that extends the last sample when `text` starts with its text.
    fn extend_text(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        max_tokens: usize,
        budget: usize,
    ) -> tandem_model::Result<Option<TurnPlan>> {
        let Some((k, s)) = self.samples.iter().enumerate().next_back() else {
            return Ok(None);
        };
        let Some(rest) = text.strip_prefix(s.text.as_str()) else {
            return Ok(None);
        };
        let new_ids = tokenizer.encode(rest)?;
        let used = s.tokens.ids.len() + new_ids.len() - s.prompt_len;
        Ok(Some(TurnPlan {
            extends: Some(k),
            text: rest.to_string(),
            prompt: [s.tokens.ids.as_slice(), &new_ids].concat(),
            new_ids,
            max_new: max_tokens.min(budget.saturating_sub(used)),
        }))
    }

    fn new_sample(text: String, ids: Vec<u32>, max_tokens: usize, budget: usize) -> TurnPlan {
        TurnPlan {
            extends: None,
            text,
            prompt: ids.clone(),
            new_ids: ids,
            max_new: max_tokens.min(budget),
        }
    }

    /// Records a sampled turn on its plan (`tags`: each token's version; `held` tags the
    /// masked tokens, never read) and returns the reply message: the turn's text, its
    /// tool call parsed out in the Hermes convention. `stop` are the tokens that end a
    /// turn (not part of the reply's text).
    pub fn record(
        &mut self,
        plan: TurnPlan,
        turn: Completion,
        tags: Vec<u64>,
        held: u64,
        tokenizer: &Tokenizer,
        stop: &[u32],
    ) -> tandem_model::Result<Message> {
        let k = self.push_turn(plan, &turn, tags, held, tokenizer)?;
        let s = &mut self.samples[k];
        let body = match turn.tokens.split_last() {
            Some((last, body)) if stop.contains(last) => body,
            _ => &turn.tokens[..],
        };
        let sampled = tokenizer.decode(body, false)?;
        let reply = match tool_call::parse(&sampled) {
            Action::Call { name, arguments } => {
                s.tokens.tool_calls += 1;
                let before = sampled[..sampled.find(tool_call::OPEN).unwrap_or(0)].trim();
                Message {
                    role: "assistant".into(),
                    content: before.to_string(),
                    calls: vec![Call { name, arguments }],
                }
            }
            Action::Malformed(_) => {
                // Answered as text: the agent sees what the model wrote.
                s.tokens.tool_errors += 1;
                Message {
                    role: "assistant".into(),
                    content: sampled.clone(),
                    calls: Vec::new(),
                }
            }
            Action::Answer => Message {
                role: "assistant".into(),
                content: sampled.clone(),
                calls: Vec::new(),
            },
        };
        self.replies.push((reply.clone(), sampled));
        Ok(reply)
    }

    /// Records a `/v1/completions` turn on its plan: its tokens exactly as given (the
    /// caller has cut them where a stop string ended), as [`ChatEpisode::record`] does.
    pub fn record_text(
        &mut self,
        plan: TurnPlan,
        turn: Completion,
        tags: Vec<u64>,
        held: u64,
        tokenizer: &Tokenizer,
    ) -> tandem_model::Result<()> {
        self.push_turn(plan, &turn, tags, held, tokenizer)?;
        Ok(())
    }

    /// Appends the plan's new tokens (masked) and the turn (as sampled) to its sample,
    /// a new one when it extends none; the sample's index.
    fn push_turn(
        &mut self,
        plan: TurnPlan,
        turn: &Completion,
        tags: Vec<u64>,
        held: u64,
        tokenizer: &Tokenizer,
    ) -> tandem_model::Result<usize> {
        let k = match plan.extends {
            Some(k) => k,
            None => {
                self.samples.push(Sample {
                    prompt_len: plan.new_ids.len(),
                    ..Default::default()
                });
                self.samples.len() - 1
            }
        };
        let s = &mut self.samples[k];
        s.tokens.push_context(&plan.new_ids, held);
        s.text.push_str(&plan.text);
        s.tokens.push_model(turn, tags);
        self.turns += 1;
        s.text.push_str(&tokenizer.decode(&turn.tokens, false)?);
        Ok(k)
    }

    /// The episode's final model turn (what verifiers score): the last turn of its last
    /// sample.
    pub fn final_turn(&self) -> &[u32] {
        self.samples
            .last()
            .map_or(&[][..], |s| s.tokens.final_turn())
    }
}

/// A reply message in the OpenAI shape: `content` (null when empty beside a tool call)
/// and `tool_calls` with `arguments` as a JSON string. `id` numbers the calls.
pub fn reply_json(m: &Message, id: &str) -> Value {
    let calls: Vec<Value> = m
        .calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "id": format!("call_{id}_{i}"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            })
        })
        .collect();
    let mut v = json!({"role": "assistant", "content": m.content});
    if !calls.is_empty() {
        if m.content.is_empty() {
            v["content"] = Value::Null;
        }
        v["tool_calls"] = Value::Array(calls);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_model::preset::EOS_ID;
    use tandem_model::FinishReason;

    fn tokenizer() -> Tokenizer {
        tandem_model::preset::init("tiny", 0, &candle_core::Device::Cpu)
            .unwrap()
            .tokenizer
    }

    fn user(text: &str) -> Value {
        json!({"role": "user", "content": text})
    }

    /// A turn "sampled" from `text`: its tokens, the end-of-turn token, logprobs -0.5.
    fn sampled(tok: &Tokenizer, text: &str) -> Completion {
        let mut tokens = tok.encode(text).unwrap();
        tokens.push(EOS_ID);
        Completion {
            logprobs: vec![-0.5; tokens.len()],
            tokens,
            finish_reason: Some(FinishReason::Stop),
        }
    }

    fn turn(
        e: &mut ChatEpisode,
        tok: &Tokenizer,
        messages: &[Value],
        tools: &[Value],
        model: &str,
    ) -> (TurnPlan, Completion, Message) {
        let text = e
            .render(tok, &parse_messages(messages).unwrap(), tools)
            .unwrap();
        let plan = e.plan(tok, &text, 64, 256).unwrap();
        let c = sampled(tok, model);
        let tags = vec![3; c.tokens.len()];
        let reply = e
            .record(plan.clone(), c.clone(), tags, 2, tok, &[EOS_ID])
            .unwrap();
        (plan, c, reply)
    }

    /// Three requests of one agent: a tool call echoed back as parsed `tool_calls` with
    /// the tool's answer, then the answer. One sample: the first prompt, the model's
    /// tokens exactly as sampled, and only the new messages tokenized between them,
    /// masked.
    #[test]
    fn turns_that_extend_the_conversation_are_one_sample_token_for_token() {
        let tok = tokenizer();
        let mut e = ChatEpisode::default();
        let tools = vec![tool_call::schema("calculator").unwrap()];
        let mut messages = vec![user("What is 347*86?")];
        let call = "<tool_call>{\"name\": \"calculator\", \"arguments\": {\"expression\": \"347*86\"}}</tool_call>";
        let (p1, c1, reply) = turn(&mut e, &tok, &messages, &tools, call);
        assert_eq!(p1.extends, None);
        assert_eq!(
            reply_json(&reply, "x"),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_x_0", "type": "function", "function": {"name": "calculator", "arguments": "{\"expression\":\"347*86\"}"}}]})
        );
        // The client echoes the reply as the OpenAI shape, then the tool's result.
        messages.push(reply_json(&reply, "x"));
        messages.push(json!({"role": "tool", "tool_call_id": "call_x_0", "content": "29842"}));
        let (p2, c2, reply2) = turn(&mut e, &tok, &messages, &tools, "29842");
        assert_eq!(p2.extends, Some(0));
        assert_eq!(reply2.content, "29842");
        assert_eq!(e.samples.len(), 1);
        let s = &e.samples[0].tokens;
        let expected = [
            p1.new_ids.clone(),
            c1.tokens.clone(),
            p2.new_ids.clone(),
            c2.tokens.clone(),
        ]
        .concat();
        assert_eq!(s.ids, expected);
        let mask: Vec<u8> = [
            vec![0; p1.new_ids.len()],
            vec![1; c1.tokens.len()],
            vec![0; p2.new_ids.len()],
            vec![1; c2.tokens.len()],
        ]
        .concat();
        assert_eq!(s.mask, mask);
        assert_eq!(e.samples[0].prompt_len, p1.new_ids.len());
        // The new text is exactly the tool turn and the next assistant header.
        assert!(
            p2.text.contains("29842") && !p2.text.contains("347*86"),
            "{:?}",
            p2.text
        );
        assert_eq!(p2.prompt, [p1.new_ids, c1.tokens, p2.new_ids].concat());
        assert!(s
            .logprobs
            .iter()
            .zip(&s.mask)
            .all(|(&l, &m)| (m == 1) == (l == -0.5)));
        assert!(s
            .versions
            .iter()
            .zip(&s.mask)
            .all(|(&v, &m)| v == if m == 1 { 3 } else { 2 }));
        assert_eq!((s.turns, s.tool_calls, s.tool_errors), (2, 1, 0));
        assert_eq!(e.final_turn(), &c2.tokens[..]);
    }

    /// A request that rewrites the conversation (the agent dropped the earlier turns)
    /// starts a new sample, its whole conversation a prompt.
    #[test]
    fn a_request_that_does_not_extend_the_last_turn_starts_a_new_sample() {
        let tok = tokenizer();
        let mut e = ChatEpisode::default();
        turn(&mut e, &tok, &[user("What is 3*4?")], &[], "12");
        let edited = [
            user("What is 3*4?"),
            json!({"role": "assistant", "content": "twelve"}),
            user("Digits only."),
        ];
        let (p, c, _) = turn(&mut e, &tok, &edited, &[], "12");
        assert_eq!(p.extends, None);
        assert_eq!(e.samples.len(), 2);
        assert_eq!(
            e.samples[1].tokens.ids,
            [p.new_ids.clone(), c.tokens].concat()
        );
        assert_eq!(e.samples[1].prompt_len, p.new_ids.len());
        assert_eq!(e.turns, 2);
    }

    /// A turn's budget: the request's max_tokens, and what is left of the sample's.
    #[test]
    fn budgets_count_every_token_after_the_first_prompt() {
        let tok = tokenizer();
        let mut e = ChatEpisode::default();
        let (p, c, reply) = turn(&mut e, &tok, &[user("hi")], &[], "hello there");
        assert_eq!(p.max_new, 64);
        let mut m = vec![user("hi"), reply_json(&reply, "a"), user("more")];
        let text = e.render(&tok, &parse_messages(&m).unwrap(), &[]).unwrap();
        let next = e.plan(&tok, &text, 1000, 256).unwrap();
        assert_eq!(next.max_new, 256 - c.tokens.len() - next.new_ids.len());
        let tight = e.plan(&tok, &text, 1000, c.tokens.len()).unwrap();
        assert_eq!(tight.max_new, 0);
        m.pop();
    }

    /// A completions prompt continues the last sample when it starts with its text (or
    /// its tokens), only the rest tokenized; any other starts a new sample, a raw text
    /// prompt tokenized as one (BOS rules).
    #[test]
    fn completion_prompts_extend_the_sample_they_start_with() {
        let tok = tokenizer();
        let mut e = ChatEpisode::default();
        let first = e
            .plan_prompt(&tok, &Prompt::Text("3*4=".into()), 16, 64)
            .unwrap();
        assert_eq!(
            (first.extends, first.prompt.clone()),
            (None, tok.encode_prompt("3*4=").unwrap())
        );
        let c = sampled(&tok, "12");
        e.record_text(first.clone(), c.clone(), vec![1; c.tokens.len()], 0, &tok)
            .unwrap();
        let so_far = [first.prompt.clone(), c.tokens.clone()].concat();
        let text = format!("3*4={} 5*5=", tok.decode(&c.tokens, false).unwrap());
        let by_text = e.plan_prompt(&tok, &Prompt::Text(text), 16, 64).unwrap();
        assert_eq!(by_text.extends, Some(0));
        assert_eq!(by_text.new_ids, tok.encode(" 5*5=").unwrap());
        assert_eq!(
            by_text.prompt,
            [so_far.clone(), by_text.new_ids.clone()].concat()
        );
        let more = [so_far.clone(), vec![7, 8]].concat();
        let by_ids = e
            .plan_prompt(&tok, &Prompt::Tokens(more.clone()), 16, 64)
            .unwrap();
        assert_eq!(
            (by_ids.extends, by_ids.new_ids.as_slice()),
            (Some(0), &[7, 8][..])
        );
        assert_eq!(by_ids.max_new, 16.min(64 - c.tokens.len() - 2));
        let other = e
            .plan_prompt(&tok, &Prompt::Tokens(vec![9, 9]), 16, 64)
            .unwrap();
        assert_eq!((other.extends, other.prompt), (None, vec![9, 9]));
        let rewritten = e
            .plan_prompt(&tok, &Prompt::Text("5*5=".into()), 16, 64)
            .unwrap();
        assert_eq!(rewritten.extends, None);
    }

    #[test]
    fn bad_messages_are_named() {
        for (m, needle) in [
            (json!([]), "empty"),
            (json!([{"content": "x"}]), "messages[0].role"),
            (json!([{"role": "robot", "content": "x"}]), "robot"),
            (
                json!([{"role": "user", "content": [{"type": "image_url"}]}]),
                "messages[0].content[0]",
            ),
            (json!([{"role": "user", "content": 3}]), "content"),
            (
                json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]),
                "messages[0].tool_calls[0].function.arguments",
            ),
            (
                json!([{"role": "user", "tool_calls": []}]),
                "messages[0].tool_calls",
            ),
        ] {
            let e = parse_messages(m.as_array().unwrap()).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        let e = parse_tools(&[json!({"type": "function"})]).unwrap_err();
        assert!(e.contains("tools[0]"), "{e}");
        let ok = parse_messages(&[json!({"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})]).unwrap();
        assert_eq!(
            (ok[0].role.as_str(), ok[0].content.as_str()),
            ("system", "ab")
        );
    }
}
