//! docs/pipeline.md documents the offline stages' sections (`[train]`, `[sft]`, `[rm]`,
//! `[dpo]`, `[rejection]`) with exactly the keys and defaults the code has.

use serde::Serialize;
use tandem_generator::rejection;
use tandem_trainer::offline::{dpo, rm, sft, TrainSection};

/// docs/pipeline.md lists exactly the keys of `[train]`, `[sft]`, `[rm]` and `[dpo]`,
/// with the code's defaults.
#[test]
fn offline_sections_are_documented_with_their_defaults() {
    let doc = include_str!("../docs/pipeline.md");
    documented_table(doc, "**`[sft]`**", sft::SftSection::default());
    documented_table(doc, "**`[train]`**", TrainSection::default());
    documented_table(doc, "**`[rm]`**", rm::RmSection::default());
    documented_table(doc, "**`[dpo]`**", dpo::DpoSection::default());
    documented_table(
        doc,
        "**`[rejection]`**",
        rejection::RejectionSection::default(),
    );
}

/// The `| key | default |` rows after `heading` match `defaults`.
fn documented_table<T: Serialize>(doc: &str, heading: &str, defaults: T) {
    // The table right after the heading; keys documented "unset" have no default.
    let after = doc.split(heading).nth(1).unwrap();
    let mut documented: Vec<(String, String)> = after
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|row| {
            let cells: Vec<&str> = row.split(" | ").collect();
            (
                cells[0].trim_end_matches('`').to_string(),
                cells[1].trim().trim_matches('`').to_string(),
            )
        })
        .filter(|(_, default)| default != "unset")
        .collect();
    documented.sort();
    let code = toml::Value::try_from(defaults).unwrap();
    let mut code: Vec<(String, String)> = code
        .as_table()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let shown = match v {
                toml::Value::String(s) => format!("{s:?}"),
                other => other.to_string(),
            };
            (k.clone(), shown)
        })
        .collect();
    code.sort();
    assert_eq!(documented, code, "{heading}");
}
