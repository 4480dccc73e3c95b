//! A chat template rendered as transformers renders it (`apply_chat_template`): Jinja
//! with `trim_blocks` and `lstrip_blocks`, Python's string methods, `raise_exception`,
//! values printed as Python prints them (`{{ x }}` of `false` is `False`, of a list
//! `[1, 'two']`, of none `None`),
//! a `tojson` that writes what Python's `json.dumps` writes (not HTML-escaped, `", "`
//! and `": "` between items, keys in their order), `tools` and `documents` none unless
//! given, the special tokens, then the caller's extra variables (which may override
//! them), then `messages` and `add_generation_prompt`.
//!
//! tests/chat_template.rs renders Qwen3's template (`templates/qwen3.jinja`) beside the
//! strings transformers renders for the same conversations (tools/chat_template_reference.py
//! writes them to tests/fixtures/qwen3-chat-template.json).

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error as JinjaError, ErrorKind, Value};

use crate::error::{Error, Result};

/// Qwen3's chat template (Apache-2.0, from Qwen3-0.6B's `tokenizer_config.json`), as
/// published; the `qwen3-0.6b` preset ships it.
pub const QWEN3_TEMPLATE: &str = include_str!("templates/qwen3.jinja");

/// The variables Tandem sets itself on every render.
pub const RESERVED: [&str; 2] = ["messages", "add_generation_prompt"];

/// Everything a template sees besides the conversation: special tokens and the
/// caller's extra variables, in order (a later one overrides an earlier one).
pub(crate) type Variables = Vec<(String, Value)>;

/// Renders `source` with `messages` (anything serializable as a list of maps) and
/// `add_generation_prompt`, on top of `variables`.
pub(crate) fn render(
    source: &str,
    variables: &Variables,
    messages: Value,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_filter("tojson", tojson);
    env.set_formatter(|out, _state, value| {
        let text = match value.kind() {
            ValueKind::Undefined => return Ok(()),
            ValueKind::String => value.as_str().unwrap_or_default().to_string(),
            _ => python_repr(value)?,
        };
        out.write_str(&text)
            .map_err(|e| JinjaError::new(ErrorKind::WriteFailure, e.to_string()))
    });
    env.add_template("chat", source)
        .map_err(|e| Error::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    let mut ctx = Context::default();
    ctx.set("tools", Value::from(()));
    ctx.set("documents", Value::from(()));
    for (k, v) in variables {
        ctx.set(k, v.clone());
    }
    ctx.set("messages", messages);
    ctx.set("add_generation_prompt", Value::from(add_generation_prompt));
    tmpl.render(Value::from_iter(ctx.0))
        .map_err(|e| Error::Template(e.to_string()))
}

/// A render's variables: unique names, a later `set` replacing an earlier one.
#[derive(Default)]
struct Context(Vec<(String, Value)>);

impl Context {
    fn set(&mut self, k: &str, v: Value) {
        match self.0.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v,
            None => self.0.push((k.to_string(), v)),
        }
    }
}

/// Checks the names of extra variables: none may be one Tandem sets.
pub(crate) fn check_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<()> {
    for k in names {
        if RESERVED.contains(&k) {
            return Err(Error::invalid(format!(
                "chat template variable `{k}` is reserved: Tandem sets it on every render; remove it"
            )));
        }
    }
    Ok(())
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False, indent=None,
/// sort_keys=False)`, those three arguments accepted by name.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ascii: ascii.unwrap_or(false),
    };
    let mut out = String::new();
    python_json(value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
    ascii: bool,
}

/// `value` as Python's `json.dumps` writes it with `style`, at nesting `depth`.
fn python_json(
    value: &Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), JinjaError> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&python_number(value)),
        ValueKind::String => out.push_str(&json_string(value.as_str().unwrap_or(""), style.ascii)),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_items(items.len(), "[", "]", style, depth, out, |i, out| {
                python_json(&items[i], style, depth + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = value.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_items(keys.len(), "{", "}", style, depth, out, |i, out| {
                let key = match keys[i].as_str() {
                    Some(s) => s.to_string(),
                    None => keys[i].to_string(),
                };
                out.push_str(&json_string(&key, style.ascii));
                out.push_str(": ");
                python_json(&value.get_item(&keys[i])?, style, depth + 1, out)
            })?;
        }
        other => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {other} is not JSON"),
            ))
        }
    }
    Ok(())
}

/// `value` as Python's `repr` writes it (a string in quotes; what `{{ x }}` prints for
/// anything but a string).
fn python_repr(value: &Value) -> std::result::Result<String, JinjaError> {
    Ok(match value.kind() {
        ValueKind::Undefined | ValueKind::None => "None".into(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.into(),
        ValueKind::Number => python_number(value),
        ValueKind::String => python_str_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            let items: Vec<String> = value
                .try_iter()?
                .map(|v| python_repr(&v))
                .collect::<std::result::Result<_, _>>()?;
            format!("[{}]", items.join(", "))
        }
        ValueKind::Map => {
            let mut items = Vec::new();
            for k in value.try_iter()? {
                let v = value.get_item(&k)?;
                items.push(format!("{}: {}", python_repr(&k)?, python_repr(&v)?));
            }
            format!("{{{}}}", items.join(", "))
        }
        _ => value.to_string(),
    })
}

/// A string as Python's `repr` quotes it: single quotes unless it holds one and no
/// double quote; backslash, the quote and control characters escaped.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `n` items between `open` and `close`: `", "` apart on one line, or one per line
/// indented by `style.indent` per level (`","` at line ends), as `json.dumps` does.
fn write_items(
    n: usize,
    open: &str,
    close: &str,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
    mut item: impl FnMut(usize, &mut String) -> std::result::Result<(), JinjaError>,
) -> std::result::Result<(), JinjaError> {
    out.push_str(open);
    if n == 0 {
        out.push_str(close);
        return Ok(());
    }
    let pad = |level: usize| style.indent.map(|w| format!("\n{}", " ".repeat(w * level)));
    for i in 0..n {
        match pad(depth + 1) {
            Some(p) => {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&p);
            }
            None if i > 0 => out.push_str(", "),
            None => {}
        }
        item(i, out)?;
    }
    if let Some(p) = pad(depth) {
        out.push_str(&p);
    }
    out.push_str(close);
    Ok(())
}

/// A JSON string as Python writes it: `"`, `\`, `\b \f \n \r \t` and other control
/// characters escaped; with `ascii`, every non-ASCII character too (as `\uXXXX`,
/// surrogate pairs beyond the BMP).
fn json_string(s: &str, ascii: bool) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"));
    if !ascii {
        return quoted;
    }
    let mut out = String::with_capacity(quoted.len());
    for c in quoted.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// A number as Python's `repr` writes it: integers as they are; a float with `.0` when
/// whole, in exponent form (`1e-05`, `1e+16`) below 1e-4 or from 1e16 on.
fn python_number(v: &Value) -> String {
    match f64::try_from(v.clone()) {
        Ok(x) if !v.is_integer() => python_float(x),
        _ => v.to_string(),
    }
}

fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Shortest round-trip digits and the decimal exponent: "d.ddde±x".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if negative { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let frac = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{frac}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(v: serde_json::Value, args: &str) -> String {
        let vars = vec![("x".to_string(), Value::from_serialize(&v))];
        render(
            &format!("{{{{ x | tojson{args} }}}}"),
            &vars,
            Value::from(Vec::<Value>::new()),
            false,
        )
        .unwrap()
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        // The strings below are Python's json.dumps of the same values.
        let v = serde_json::json!({"b": [1, 2.5, "x<y>&'"], "a": {"c": null, "d": true}, "e": []});
        assert_eq!(
            dumps(v.clone(), ""),
            r#"{"a": {"c": null, "d": true}, "b": [1, 2.5, "x<y>&'"], "e": []}"#
        );
        assert_eq!(
            dumps(serde_json::json!({"a": [1, {}], "b": "é"}), "(indent=2)"),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": \"é\"\n}"
        );
        assert_eq!(
            dumps(serde_json::json!("é\n\u{1}"), "(ensure_ascii=true)"),
            r#""\u00e9\n\u0001""#
        );
        for (x, py) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (123456789012345.6, "123456789012345.6"),
            (-2.5e-7, "-2.5e-07"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(python_float(x), py, "{x}");
        }
        let e = render(
            "{{ 1 | tojson(width=3) }}",
            &vec![],
            Value::from(Vec::<Value>::new()),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("width"), "{e}");
    }

    #[test]
    fn blocks_are_trimmed_as_transformers_trims_them() {
        // trim_blocks drops the newline after a tag, lstrip_blocks the indent before it.
        let t = "{% for m in messages %}\n  {% if m %}\n{{ m }}\n  {% endif %}\n{% endfor %}";
        let out = render(t, &vec![], Value::from(vec!["a", "b"]), false).unwrap();
        assert_eq!(out, "a\nb\n");
        // `tools` and `documents` are none unless given; variables override in order.
        let t = "{{ tools is none }} {{ documents is none }} {{ x }}";
        let vars = vec![
            ("x".to_string(), Value::from(1)),
            ("x".to_string(), Value::from(2)),
        ];
        let mut ctx = Context::default();
        for (k, v) in &vars {
            ctx.set(k, v.clone());
        }
        assert_eq!(ctx.0.len(), 1);
        let out = render(t, &vars, Value::from(Vec::<Value>::new()), false).unwrap();
        assert_eq!(out, "True True 2", "as Python prints them");
    }
}
