//! Chat templates rendered with minijinja exactly as transformers renders them with
//! Python's Jinja2: Qwen3's template (model/src/templates/qwen3.jinja) and a template
//! that prints variables of every type, over the conversations and extra variables of
//! tests/fixtures/qwen3-chat-template.json (written by tools/chat_template_reference.py
//! with transformers' `apply_chat_template`).

use std::path::PathBuf;

use tandem_model::chat_template::QWEN3_TEMPLATE;
use tandem_model::tokenizer::PreTokenizer;
use tandem_model::{ChatMessage, Tokenizer};

/// The fixture, its objects' keys in the order written (as Python's dicts keep them).
fn fixture() -> minijinja::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/qwen3-chat-template.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// A tokenizer with Qwen3's special tokens (eos <|im_end|>, no bos) and `template`.
fn tokenizer(template: &str) -> Tokenizer {
    let tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .into();
    Tokenizer::from_vocab_and_merges(
        &tokens,
        vec![],
        &[0, 1, 2],
        PreTokenizer::Gpt2,
        Some(template.to_string()),
        None,
        Some(2),
    )
    .unwrap()
}

fn text(v: &minijinja::Value, key: &str) -> String {
    v.get_attr(key)
        .unwrap()
        .as_str()
        .unwrap_or_else(|| panic!("{key} is not a string"))
        .to_string()
}

#[test]
fn qwen3_template_renders_as_transformers_renders_it() {
    let fx = fixture();
    let variables_template = text(&fx, "variables_template");
    let cases: Vec<minijinja::Value> = fx.get_attr("cases").unwrap().try_iter().unwrap().collect();
    assert!(cases.len() >= 10, "the fixture lost its cases");
    let mut seen = Vec::new();
    for case in &cases {
        let name = text(case, "name");
        let template = match text(case, "template").as_str() {
            "qwen3" => QWEN3_TEMPLATE.to_string(),
            "variables" => variables_template.clone(),
            other => panic!("{name}: unknown template {other}"),
        };
        let mut tok = tokenizer(&template);
        let kwargs = case.get_attr("kwargs").unwrap();
        let pairs: Vec<(String, minijinja::Value)> = kwargs
            .try_iter()
            .unwrap()
            .map(|k| {
                let v = kwargs.get_item(&k).unwrap();
                (k.as_str().unwrap().to_string(), v)
            })
            .collect();
        tok.set_chat_template_kwargs(pairs).unwrap();
        let messages: Vec<ChatMessage> = case
            .get_attr("messages")
            .unwrap()
            .try_iter()
            .unwrap()
            .map(|m| ChatMessage {
                role: text(&m, "role"),
                content: text(&m, "content"),
            })
            .collect();
        let gen = case.get_attr("add_generation_prompt").unwrap().is_true();
        let ours = tok.apply_chat_template(&messages, gen).unwrap();
        assert_eq!(ours, text(case, "text"), "case {name}");
        seen.push(name);
    }
    for needed in [
        "user_no_thinking",
        "history_with_thinking",
        "tools_variable",
        "variables",
    ] {
        assert!(seen.iter().any(|s| s == needed), "no case {needed}");
    }
}

/// The committed template is the one the fixture was rendered from: the fixture's
/// `enable_thinking = false` prompt is the template's own empty thinking block.
#[test]
fn enable_thinking_false_opens_an_empty_thinking_block() {
    let mut tok = tokenizer(QWEN3_TEMPLATE);
    let chat = [ChatMessage::user("hi")];
    let open = tok.apply_chat_template(&chat, true).unwrap();
    assert_eq!(
        open,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
    tok.set_chat_template_kwargs([("enable_thinking", false)])
        .unwrap();
    let closed = tok.apply_chat_template(&chat, true).unwrap();
    assert_eq!(closed, format!("{open}<think>\n\n</think>\n\n"));
    assert_eq!(tok.chat_template_kwargs(), ["enable_thinking"]);
    // Tandem's own variables cannot be overridden.
    for name in ["messages", "add_generation_prompt"] {
        let e = tok
            .set_chat_template_kwargs([(name, true)])
            .unwrap_err()
            .to_string();
        assert!(e.contains(name) && e.contains("reserved"), "{e}");
    }
    assert_eq!(
        tok.chat_template_kwargs(),
        ["enable_thinking"],
        "a refused set changes nothing"
    );
}
