//! A config file as every command reads it: TOML, a section per part, unknown keys
//! refused by name, and `--set section.key=value` overrides from the command line
//! applied before the file is checked.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads the config file at `path` into `T` with `overrides` applied; errors name the
/// file.
pub fn read_config<T: DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|cause| Error::Io {
        what: format!("reading {}", path.display()),
        cause,
    })?;
    parse_with_overrides(&text, overrides)
        .map_err(|e| Error::Invalid(format!("in {}: {e}", path.display())))
}

/// Parses a TOML config into `T` with `overrides` (`section.key=value`, the value in
/// TOML syntax, or a bare string) applied; unknown keys are errors naming the key.
pub fn parse_with_overrides<T: DeserializeOwned>(text: &str, overrides: &[String]) -> Result<T> {
    let mut doc: toml::Table = toml::from_str(text)
        .map_err(|e| Error::Invalid(format!("config is not valid TOML: {e}")))?;
    for o in overrides {
        apply_override(&mut doc, o)?;
    }
    serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.message().trim().to_string();
        if path.is_empty() || path == "." || msg.contains(&path) {
            Error::Invalid(format!("config: {msg}"))
        } else {
            Error::Invalid(format!("config: {path}: {msg}"))
        }
    })
}

/// Sets one `section.key=value` in `doc`, making the sections it names.
fn apply_override(doc: &mut toml::Table, o: &str) -> Result<()> {
    let (key, value) = o
        .split_once('=')
        .ok_or_else(|| Error::Invalid(format!("--set {o:?}: expected section.key=value")))?;
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(Error::Invalid(format!(
            "--set {o:?}: the key must be dotted, like run.steps"
        )));
    }
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", value.trim()))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(value.trim().to_string()));
    let mut table = doc;
    for p in &parts[..parts.len() - 1] {
        let entry = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| Error::Invalid(format!("--set {o:?}: `{p}` is not a section")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
