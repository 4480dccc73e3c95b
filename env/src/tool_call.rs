//! Tool calls in the Hermes convention (Qwen, SmolLM2 and Hermes-style templates): the
//! model writes
//!
//!   <tool_call>{"name": "calculator", "arguments": {"expression": "347*86"}}</tool_call>
//!
//! and the environment answers in a tool turn, wrapped in the chat template's own
//! delimiters. The tools are announced in the system turn as a `<tools>` list of JSON
//! schemas.

use serde_json::{json, Value};
use tandem_model::{ChatMessage, Tokenizer};

use crate::error::{invalid, Result};

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// What a model turn asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// No tool call: the turn is the answer and the episode ends.
    Answer,
    /// The first well-formed call of the turn.
    Call { name: String, arguments: Value },
    /// A `<tool_call>` that does not parse; the reason goes back as the observation.
    Malformed(String),
}

/// Reads the first tool call of a decoded model turn.
pub fn parse(turn: &str) -> Action {
    let Some(start) = turn.find(OPEN) else {
        return Action::Answer;
    };
    let body = &turn[start + OPEN.len()..];
    let Some(end) = body.find(CLOSE) else {
        return Action::Malformed(format!("{OPEN} without {CLOSE}"));
    };
    let v: Value = match serde_json::from_str(body[..end].trim()) {
        Ok(v) => v,
        Err(e) => return Action::Malformed(format!("the tool call is not JSON: {e}")),
    };
    let Some(name) = v.get("name").and_then(Value::as_str) else {
        return Action::Malformed("the tool call has no \"name\" string".into());
    };
    let arguments = v.get("arguments").cloned().unwrap_or(json!({}));
    let arguments = match arguments {
        // Some models write the arguments as a JSON string.
        Value::String(s) => match serde_json::from_str(&s) {
            Ok(a) => a,
            Err(_) => return Action::Malformed("\"arguments\" is a string but not JSON".into()),
        },
        a => a,
    };
    if !arguments.is_object() {
        return Action::Malformed("\"arguments\" must be an object".into());
    }
    Action::Call {
        name: name.to_string(),
        arguments,
    }
}

/// A call as the model writes it: `<tool_call>{"name": …, "arguments": …}</tool_call>`.
pub fn call_text(name: &str, arguments: &Value) -> String {
    format!(
        "{OPEN}{}{CLOSE}",
        json!({"name": name, "arguments": arguments})
    )
}

/// A tool-use transcript of an arithmetic `question` ("47 * 86") with `answer`: the
/// model's calculator call, the tool's answer and the final answer (SFT data that
/// teaches the call format, `[sft] tools`). Only the calculator has one.
pub fn transcript(tool: &str, question: &str, answer: &str) -> Result<Vec<ChatMessage>> {
    if tool != "calculator" {
        return Err(invalid(format!(
            "[sft] tools: transcripts exist for \"calculator\" only, not {tool:?}"
        )));
    }
    let result = crate::calculator::evaluate(question)
        .map(crate::calculator::format)
        .map_err(|e| invalid(format!("the question {question:?}: {e}")))?;
    let message = |role: &str, content: String| ChatMessage {
        role: role.into(),
        content,
    };
    Ok(vec![
        message(
            "assistant",
            call_text("calculator", &json!({"expression": question})),
        ),
        message("tool", result),
        message("assistant", answer.to_string()),
    ])
}

/// The JSON schema of a built-in tool, as announced to the model.
pub fn schema(tool: &str) -> Option<Value> {
    match tool {
        "calculator" => Some(json!({
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluates an arithmetic expression (+ - * / % ^ and parentheses) exactly.",
                "parameters": {
                    "type": "object",
                    "properties": {"expression": {"type": "string", "description": "e.g. 347*86"}},
                    "required": ["expression"]
                }
            }
        })),
        "python" => Some(json!({
            "type": "function",
            "function": {
                "name": "python",
                "description": "Runs a Python 3 program in a sandbox (no network, a fresh empty directory, a few seconds of CPU) and returns what it printed.",
                "parameters": {
                    "type": "object",
                    "properties": {"code": {"type": "string", "description": "the program; print the result"}},
                    "required": ["code"]
                }
            }
        })),
        _ => None,
    }
}

/// The system text that announces the built-in `tools` (after `system`, when there is
/// one).
pub fn system_prompt(system: Option<&str>, tools: &[String]) -> Result<String> {
    let schemas = tools
        .iter()
        .map(|t| schema(t).ok_or_else(|| invalid(format!("[env] tools: unknown tool {t:?}"))))
        .collect::<Result<Vec<Value>>>()?;
    Ok(announce(system, &schemas))
}

/// The system text that announces tools by their JSON `schemas` (after `system`, when
/// there is one): a `<tools>` list and how to call one.
pub fn announce(system: Option<&str>, schemas: &[Value]) -> String {
    let listed: Vec<String> = schemas.iter().map(Value::to_string).collect();
    let mut text = String::new();
    if let Some(s) = system {
        text.push_str(s);
        text.push_str("\n\n");
    }
    text.push_str(&format!(
        "You may call tools. Available tools:\n<tools>\n{}\n</tools>\nTo call one, write {OPEN}{{\"name\": <tool name>, \"arguments\": <arguments object>}}{CLOSE} and stop; the result comes back in the next message.",
        listed.join("\n")
    ));
    text
}

/// How an environment turn is written between two model turns.
#[derive(Clone, Debug)]
pub struct TurnFormat {
    /// Text before the observation: what the template puts after the model's end of
    /// turn, then the opening of a tool (or user) message.
    pub before: String,
    /// Text after it: the message's close and the opening of the next assistant turn.
    pub after: String,
}

impl TurnFormat {
    /// Raw text models (no chat template): the observation on its own lines.
    pub fn raw() -> Self {
        TurnFormat {
            before: "\nResult: ".into(),
            after: "\n".into(),
        }
    }

    /// The chat template's delimiters around a message of `role` ("tool" or "user"),
    /// found by rendering a conversation with and without it around a marker. The model
    /// ended its turn with its end-of-turn token; what the template writes after that
    /// token (a newline, usually) opens the environment's turn.
    pub fn from_template(tokenizer: &Tokenizer, role: &str, end_of_turn: &str) -> Result<Self> {
        const MARK: &str = "\u{1}OBSERVATION\u{1}";
        let base = vec![
            ChatMessage::user("q"),
            ChatMessage {
                role: "assistant".into(),
                content: "a".into(),
            },
        ];
        let mut with = base.clone();
        with.push(ChatMessage {
            role: role.into(),
            content: MARK.into(),
        });
        let before_text = tokenizer.apply_chat_template(&base, false)?;
        let full = tokenizer.apply_chat_template(&with, true)?;
        let suffix = full.strip_prefix(before_text.as_str()).ok_or_else(|| {
            invalid("the chat template renders a conversation differently once a message is added: cannot find its tool-turn delimiters")
        })?;
        let (open, close) = suffix.split_once(MARK).ok_or_else(|| {
            invalid(format!(
                "the chat template drops {role} messages: use [env] observation_role = \"user\""
            ))
        })?;
        // What follows the model's end-of-turn token in the rendered assistant turn.
        let tail = before_text
            .rfind(end_of_turn)
            .map(|i| &before_text[i + end_of_turn.len()..])
            .unwrap_or("");
        Ok(TurnFormat {
            before: format!("{tail}{open}"),
            after: close.to_string(),
        })
    }

    /// The environment turn's text around `observation`.
    pub fn render(&self, observation: &str) -> String {
        format!("{}{observation}{}", self.before, self.after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_found_and_bad_ones_named() {
        assert_eq!(parse("The answer is 42."), Action::Answer);
        assert_eq!(
            parse("Let me compute.<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"347*86\"}}\n</tool_call>"),
            Action::Call {
                name: "calculator".into(),
                arguments: json!({"expression": "347*86"})
            }
        );
        assert_eq!(
            parse("<tool_call>{\"name\": \"calculator\", \"arguments\": \"{\\\"expression\\\": \\\"1+1\\\"}\"}</tool_call>"),
            Action::Call {
                name: "calculator".into(),
                arguments: json!({"expression": "1+1"})
            }
        );
        for (turn, needle) in [
            ("<tool_call>{\"name\": \"calculator\"", "without"),
            ("<tool_call>calculator(2)</tool_call>", "not JSON"),
            ("<tool_call>{\"arguments\": {}}</tool_call>", "\"name\""),
            (
                "<tool_call>{\"name\": \"x\", \"arguments\": [1]}</tool_call>",
                "object",
            ),
        ] {
            match parse(turn) {
                Action::Malformed(why) => assert!(why.contains(needle), "{turn}: {why}"),
                other => panic!("{turn}: {other:?}"),
            }
        }
    }

    /// A transcript's call is what the parser reads back, and the tool's turn is what
    /// the calculator answers.
    #[test]
    fn transcripts_round_trip() {
        let t = transcript("calculator", "47 * 86", "4042").unwrap();
        assert_eq!(
            t.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
            ["assistant", "tool", "assistant"]
        );
        assert_eq!(
            parse(&t[0].content),
            Action::Call {
                name: "calculator".into(),
                arguments: json!({"expression": "47 * 86"})
            }
        );
        assert_eq!(
            (t[1].content.as_str(), t[2].content.as_str()),
            ("4042", "4042")
        );
        assert!(transcript("python", "1 + 1", "2").is_err());
    }

    #[test]
    fn the_system_turn_lists_the_tools() {
        let s = system_prompt(Some("Be brief."), &["calculator".into()]).unwrap();
        assert!(s.starts_with("Be brief.\n\n") && s.contains("\"name\":\"calculator\""));
        assert!(system_prompt(None, &["shell".into()]).is_err());
    }
}
