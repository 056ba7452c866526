//! Environment overrides: `EDGE_OUTBOX_<SECTION>_<KEY>` variables merged
//! into the file's table before it is deserialized.

use std::collections::BTreeMap;

use super::{invalid, Config, ConfigError};

const ENV_PREFIX: &str = "EDGE_OUTBOX_";

pub(super) fn attribute_to_env(e: ConfigError, sources: &BTreeMap<String, String>) -> ConfigError {
    match e {
        ConfigError::Invalid { key, message, .. } => {
            let origin = sources.get(&key).cloned();
            ConfigError::Invalid {
                key,
                message,
                origin,
            }
        }
        other => other,
    }
}

/// Merges `EDGE_OUTBOX_<SECTION>_<KEY>` variables into `table`. Returns which
/// variable set which key, for error messages. Variables whose section is not
/// one of ours (the exec handler's `EDGE_OUTBOX_MESSAGE_ID`, say) are not ours.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let mut sources = BTreeMap::new();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, default_section)) = defaults
            .iter()
            .find(|(s, _)| rest.starts_with(&format!("{s}_")))
        else {
            continue;
        };
        let key = &rest[section.len() + 1..];
        let keys = default_section.as_table();
        let Some(default_value) = keys.and_then(|t| t.get(key)) else {
            return Err(ConfigError::Invalid {
                key: format!("{section}.{key}"),
                message: "unknown key".into(),
                origin: Some(name.clone()),
            });
        };
        let value = env_value(raw, default_value);
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry.as_table_mut() {
            Some(t) => {
                t.insert(key.to_string(), value);
            }
            None => return Err(invalid(section, "must be a table")),
        }
        sources.insert(format!("{section}.{key}"), name.clone());
    }
    Ok(sources)
}

/// An environment value is TOML when it parses as the key's kind of value,
/// else a plain string (a list key takes a comma-separated list).
fn env_value(raw: &str, default: &toml::Value) -> toml::Value {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    match (parsed, default) {
        (Some(v), d) if v.same_type(d) => v,
        (_, toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        (Some(v), _) if !matches!(v, toml::Value::String(_)) && !default.is_str() => v,
        _ => toml::Value::String(raw.to_string()),
    }
}
