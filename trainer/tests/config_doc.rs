//! docs/config.md documents exactly the keys the config structs accept, with their
//! defaults (so the reference cannot drift from the code).

use std::collections::BTreeMap;

use tandem_trainer::config::TrainConfig;

/// `section -> key -> default` as the page's tables state them.
fn documented() -> BTreeMap<String, BTreeMap<String, String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
    let text = std::fs::read_to_string(path).unwrap();
    let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        if let Some(s) = line
            .strip_prefix("## `[")
            .and_then(|s| s.strip_suffix("]`"))
        {
            section = s.to_string();
        } else if let Some(row) = line.strip_prefix("| `") {
            let cells: Vec<&str> = row.split(" | ").collect();
            let key = cells[0].trim_end_matches('`').to_string();
            let default = cells[1].trim().trim_matches('`').to_string();
            out.entry(section.clone()).or_default().insert(key, default);
        }
    }
    out
}

#[test]
fn every_key_is_documented_with_its_default() {
    let defaults = toml::Value::try_from(TrainConfig::default()).unwrap();
    let doc = documented();
    for (section, table) in defaults.as_table().unwrap() {
        let documented = doc
            .get(section)
            .unwrap_or_else(|| panic!("section [{section}] is not documented"));
        let code: Vec<&String> = table.as_table().unwrap().keys().collect();
        let mut expected: Vec<&String> = documented.keys().collect();
        // Optional keys without a default (`clip_c`) are documented as "unset".
        expected.retain(|k| documented[*k] != "unset");
        let mut code_sorted = code.clone();
        code_sorted.sort();
        assert_eq!(
            code_sorted, expected,
            "[{section}] keys in code vs docs/config.md"
        );
        for (key, value) in table.as_table().unwrap() {
            let shown = match value {
                toml::Value::String(s) => format!("\"{s}\""),
                other => other.to_string(),
            };
            let doc_value = &documented[key];
            let same = match (doc_value.parse::<f64>(), shown.parse::<f64>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => doc_value.replace(' ', "") == shown.replace(' ', ""),
            };
            assert!(
                same,
                "[{section}] {key}: docs say {doc_value}, code says {shown}"
            );
        }
    }
    // The one optional key without a default is accepted when set.
    assert_eq!(doc["algorithm"]["clip_c"], "unset");
    assert_eq!(
        TrainConfig::from_toml("[algorithm]\nclip_c = 3.0\n")
            .unwrap()
            .algorithm
            .clip_c,
        Some(3.0)
    );
}
