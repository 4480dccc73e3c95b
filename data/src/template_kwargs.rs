//! `[data] chat_template_kwargs`: extra variables for the model's chat template, as
//! transformers' `apply_chat_template(messages, **kwargs)` takes them (Qwen3's
//! `enable_thinking`, a template's `tools`, …).
//!
//! A value is what TOML can write and a Jinja template can read: a bool, an integer, a
//! finite float, a string, an array or a table of them. Tables keep the order they were
//! written in (a template that prints one with `tojson` prints its keys in that order,
//! as Python does); a TOML date is its text, as if quoted. `messages` and
//! `add_generation_prompt` are Tandem's to set and refused by name.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::error::{invalid, Result};

/// The variables Tandem sets itself when it renders a template.
pub const RESERVED: [&str; 2] = ["messages", "add_generation_prompt"];

/// One template variable's value.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Array(Vec<TemplateValue>),
    /// Keys in the order they were written.
    Table(Vec<(String, TemplateValue)>),
}

/// The variables of `[data] chat_template_kwargs`, in the order they were written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TemplateKwargs(pub Vec<(String, TemplateValue)>);

impl TemplateKwargs {
    /// Refuses a reserved name, a repeated one, and a float that is not finite, naming
    /// the key (`[data] chat_template_kwargs.KEY`).
    pub fn validate(&self) -> Result<()> {
        self.validate_as("[data] chat_template_kwargs")
    }

    /// [`TemplateKwargs::validate`], the keys named `{source}.KEY` (a command-line
    /// flag's name, say).
    pub fn validate_as(&self, source: &str) -> Result<()> {
        let name = |k: &str| format!("{source}.{k}");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if RESERVED.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "{}: `{k}` is reserved: Tandem sets it when it renders the template (the conversation, and whether the assistant's turn is opened); remove it",
                    name(k)
                )));
            }
            if self.0[..i].iter().any(|(earlier, _)| earlier == k) {
                return Err(invalid(format!("{}: given twice; keep one", name(k))));
            }
            v.check(&name(k))?;
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TemplateValue {
    fn check(&self, at: &str) -> Result<()> {
        match self {
            TemplateValue::Float(x) if !x.is_finite() => Err(invalid(format!(
                "{at}: {x} is not a finite number; a template value must be one"
            ))),
            TemplateValue::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| v.check(&format!("{at}[{i}]"))),
            TemplateValue::Table(entries) => entries
                .iter()
                .try_for_each(|(k, v)| v.check(&format!("{at}.{k}"))),
            _ => Ok(()),
        }
    }
}

/// How TOML hands a date to serde: a table of this one key.
const TOML_DATETIME: &str = "$__toml_private_datetime";

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = TemplateValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a bool, a number, a string, an array or a table")
    }

    fn visit_bool<E>(self, v: bool) -> Result<TemplateValue, E> {
        Ok(TemplateValue::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<TemplateValue, E> {
        Ok(TemplateValue::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<TemplateValue, E> {
        i64::try_from(v)
            .map(TemplateValue::Int)
            .map_err(|_| E::custom(format!("{v} is beyond a 64-bit integer")))
    }

    fn visit_f64<E>(self, v: f64) -> Result<TemplateValue, E> {
        Ok(TemplateValue::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<TemplateValue, E> {
        Ok(TemplateValue::String(v.to_string()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<TemplateValue, E> {
        Err(E::custom(
            "null is not a template value: leave the key out instead",
        ))
    }

    fn visit_none<E: de::Error>(self) -> Result<TemplateValue, E> {
        self.visit_unit()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TemplateValue, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(TemplateValue::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TemplateValue, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            if k == TOML_DATETIME {
                let text: String = map.next_value()?;
                return Ok(TemplateValue::String(text));
            }
            entries.push((k, map.next_value()?));
        }
        Ok(TemplateValue::Table(entries))
    }
}

impl<'de> Deserialize<'de> for TemplateValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl<'de> Deserialize<'de> for TemplateKwargs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match TemplateValue::deserialize(d)? {
            TemplateValue::Table(entries) => Ok(TemplateKwargs(entries)),
            _ => Err(de::Error::custom(
                "a table of variables, e.g. { enable_thinking = false }",
            )),
        }
    }
}

fn serialize_entries<S: Serializer>(
    entries: &[(String, TemplateValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(entries.len()))?;
    for (k, v) in entries {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

impl Serialize for TemplateValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TemplateValue::Bool(b) => s.serialize_bool(*b),
            TemplateValue::Int(i) => s.serialize_i64(*i),
            TemplateValue::Float(x) => s.serialize_f64(*x),
            TemplateValue::String(t) => s.serialize_str(t),
            TemplateValue::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            TemplateValue::Table(entries) => serialize_entries(entries, s),
        }
    }
}

impl Serialize for TemplateKwargs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_entries(&self.0, s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> std::result::Result<TemplateKwargs, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            k: TemplateKwargs,
        }
        toml::from_str::<Doc>(text)
            .map(|d| d.k)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_toml_value_is_read_in_order() {
        let k = parse(
            "k = { z = true, a = 3, m = 0.5, s = \"x\", xs = [1, \"two\"], t = { b = 1, a = 2 } }",
        )
        .unwrap();
        let keys: Vec<&str> = k.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["z", "a", "m", "s", "xs", "t"], "document order");
        assert_eq!(k.0[0].1, TemplateValue::Bool(true));
        assert_eq!(k.0[1].1, TemplateValue::Int(3));
        assert_eq!(k.0[2].1, TemplateValue::Float(0.5));
        assert_eq!(
            k.0[5].1,
            TemplateValue::Table(vec![
                ("b".into(), TemplateValue::Int(1)),
                ("a".into(), TemplateValue::Int(2))
            ])
        );
        k.validate().unwrap();
        // Written back as TOML, read again: the same, in the same order.
        #[derive(serde::Serialize)]
        struct Out<'a> {
            k: &'a TemplateKwargs,
        }
        let text = toml::to_string(&Out { k: &k }).unwrap();
        assert_eq!(parse(&text).unwrap(), k, "{text}");
        // A date is its text (toml::Value hands it on so too).
        let k = parse("k = { when = 1979-05-27 }").unwrap();
        assert_eq!(k.0[0].1, TemplateValue::String("1979-05-27".into()));
        let e = parse("k = 3").unwrap_err();
        assert!(e.contains("a table of variables"), "{e}");
    }

    #[test]
    fn reserved_names_and_non_finite_numbers_are_refused_by_key() {
        for name in RESERVED {
            let e = parse(&format!("k = {{ {name} = 1 }}"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("[data] chat_template_kwargs.{name}"))
                    && e.contains("reserved"),
                "{e}"
            );
        }
        let e = parse("k = { t = { xs = [1.0, nan] } }")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[data] chat_template_kwargs.t.xs[1]") && e.contains("finite"),
            "{e}"
        );
        let twice = TemplateKwargs(vec![
            ("a".into(), TemplateValue::Int(1)),
            ("a".into(), TemplateValue::Int(2)),
        ]);
        assert!(twice.validate().unwrap_err().to_string().contains("twice"));
    }
}
