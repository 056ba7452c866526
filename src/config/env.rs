//! Environment overrides: each `EDGE_OUTBOX_<SECTION>_<KEY>` variable
//! replaces one key of the file's table before it is deserialized
//! (docs/configuration.md, "Environment overrides").
//!
//! Role: merge the variables into the table, and remember which variable set
//! which key so that an error about the key names the variable.
//!
//! Invariants:
//! - A variable whose section is one of ours but whose key is not is an
//!   error naming the variable; variables of other sections
//!   (`EDGE_OUTBOX_CONFIG`, the exec handler's `EDGE_OUTBOX_MESSAGE_ID`) are
//!   not overrides and are left alone.
//! - The known keys and their kinds are those of the serialized defaults:
//!   the same names and syntax as the file.

use std::collections::BTreeMap;

use super::{Config, ConfigError};

const ENV_PREFIX: &str = "EDGE_OUTBOX_";

/// Which variable set which key (`publish.max_in_flight` →
/// `EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT`).
#[derive(Debug, Default)]
pub(super) struct Overrides(BTreeMap<String, String>);

impl Overrides {
    /// The variable that set `key`, or set a key holding it
    /// (`consumer.bindings` for `consumer.bindings[0].exchange`).
    pub(super) fn variable_for(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(set, _)| {
                key.strip_prefix(set.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
            })
            .map(|(_, variable)| variable.as_str())
    }
}

/// Merges `EDGE_OUTBOX_<SECTION>_<KEY>` variables into `table`; returns which
/// variable set which key. Variables whose section is not
/// one of ours (the exec handler's `EDGE_OUTBOX_MESSAGE_ID`, say) are not ours.
/// `origin` names the file, for a section of it that is not a table.
pub(super) fn apply_env(
    table: &mut toml::Table,
    env: &[(String, String)],
    origin: &str,
) -> Result<Overrides, ConfigError> {
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let mut sources = Overrides::default();
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
            None => {
                return Err(ConfigError::Invalid {
                    key: section.clone(),
                    message: "must be a table".into(),
                    origin: Some(origin.to_string()),
                })
            }
        }
        sources.0.insert(format!("{section}.{key}"), name.clone());
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bytesize::ByteSize;

    use super::super::load_from;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_single_keys() {
        let c = load_from(
            Some("[publish]\nmax_in_flight = 10\n"),
            "f",
            &env(&[
                ("EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT", "20"),
                ("EDGE_OUTBOX_STORE_PATH", "/tmp/x.db"),
                ("EDGE_OUTBOX_BROKER_URLS", "amqp://a:b@h1/%2f, amqp://h2"),
                ("EDGE_OUTBOX_MESSAGE_ID", "not ours"),
                ("EDGE_OUTBOX_SUBMIT_MAX_MESSAGE_SIZE", "2MiB"),
                ("EDGE_OUTBOX_SUBMIT_SOCKET_MODE", "0600"),
                ("EDGE_OUTBOX_CONSUMER_QUEUE", "demo"),
                ("EDGE_OUTBOX_PURGE_AT", "04:00"),
            ]),
        )
        .unwrap();
        assert_eq!(c.publish.max_in_flight.get(), 20);
        assert_eq!(c.store.path, PathBuf::from("/tmp/x.db"));
        assert_eq!(c.broker.urls.len(), 2);
        assert_eq!(c.submit.max_message_size, ByteSize::mib(2));
        assert_eq!(c.submit.socket_mode.bits(), 0o600);
        assert_eq!(c.consumer.queue.as_deref(), Some("demo"));
        assert_eq!(String::from(c.purge.at), "04:00");
        let e = load_from(None, "d", &env(&[("EDGE_OUTBOX_STORE_PAHT", "x")])).unwrap_err();
        assert!(e.to_string().contains("EDGE_OUTBOX_STORE_PAHT"), "{e}");
        let e = load_from(
            None,
            "d",
            &env(&[("EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT", "many")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("publish.max_in_flight"), "{e}");
        assert!(
            e.to_string().contains("EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_variable_that_set_them() {
        for (name, value, expected) in [
            (
                "EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT",
                "0",
                "publish.max_in_flight: must be at least 1 (from EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT)",
            ),
            (
                "EDGE_OUTBOX_METRICS_LISTEN",
                "nope",
                "metrics.listen: \"nope\" is not an address like \"127.0.0.1:9464\" (from EDGE_OUTBOX_METRICS_LISTEN)",
            ),
        ] {
            let e = load_from(Some("[store]\n"), "f", &env(&[(name, value)])).unwrap_err();
            assert_eq!(e.to_string(), expected);
        }
        let e = load_from(
            None,
            "d",
            &env(&[("EDGE_OUTBOX_CONSUMER_BINDINGS", "[{ exchange = 1 }]")]),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("consumer.bindings[0]"), "{e}");
        assert!(
            e.to_string()
                .ends_with("(from EDGE_OUTBOX_CONSUMER_BINDINGS)"),
            "{e}"
        );
    }

    #[test]
    fn an_overridden_file_value_is_not_read() {
        let c = load_from(
            Some("[publish]\nmax_in_flight = 0\n[submit]\nsocket_mode = \"999\"\n"),
            "f",
            &env(&[
                ("EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT", "3"),
                ("EDGE_OUTBOX_SUBMIT_SOCKET_MODE", "0600"),
            ]),
        )
        .unwrap();
        assert_eq!(c.publish.max_in_flight.get(), 3);
        assert_eq!(c.submit.socket_mode.bits(), 0o600);
    }
}
