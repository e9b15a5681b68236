//! `CREDITGATE_A__B=value` overrides: each names a key of the file
//! (`__` between levels) and replaces its value before validation.

use super::{ConfigError, ENV_PREFIX, invalid};

/// The top-level keys of the file that are not tables: set whole, by a
/// variable without `__` (`CREDITGATE_WEBHOOKS='[{ url = …, secret = … }]'`).
const TOP_LEVEL_ARRAYS: [&str; 1] = ["WEBHOOKS"];

/// `CREDITGATE_MODULES__RAG__UPSTREAM=http://x` sets `modules.rag.upstream`.
/// Overrides are the variables with a `__`, and those naming a top-level
/// array ([`TOP_LEVEL_ARRAYS`]); that leaves `CREDITGATE_CONFIG` and
/// friends to the CLI.
pub(super) fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix(ENV_PREFIX)
                .is_some_and(|key| key.contains("__") || TOP_LEVEL_ARRAYS.contains(&key))
        })
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(invalid(name, "empty segment in environment override"));
        }
        let mut cursor = &mut *table;
        for segment in &path[..path.len() - 1] {
            let entry = cursor
                .entry(segment.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = match entry {
                toml::Value::Table(t) => t,
                _ => return Err(invalid(name, format!("{segment} is not a table"))),
            };
        }
        let leaf = &path[path.len() - 1];
        let value = match cursor.get(leaf) {
            // Keep strings strings even when they look like numbers ("1234").
            Some(toml::Value::String(_)) => toml::Value::String(raw),
            _ => parse_env_value(&raw),
        };
        cursor.insert(leaf.clone(), value);
    }
    Ok(())
}

/// Numbers, booleans and arrays are read as TOML literals; anything else is
/// a string, so URLs and addresses need no quoting.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}
