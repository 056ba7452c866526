//! Environment overrides: each `EDGE_OUTBOX_<SECTION>_<KEY>` variable
//! replaces one key of the file's table before it is deserialized
//! (docs/configuration.md, "Environment overrides").
//!
//! Role: merge the variables into the table, and remember which variable set
//! which key so that an error about the key names the variable.
//!
//! Invariants:
//! - The `EDGE_OUTBOX_` namespace is ours: every variable in it is either an
//!   override of a known key or one of the documented non-key variables
//!   ([`NON_KEY_VARIABLES`], the test suite's `EDGE_OUTBOX_TEST_*`); any
//!   other is an error naming the variable, whether its key or its section
//!   is misspelt, so a typo never silently falls back to a default
//!   (docs/decisions/0039-the-environment-namespace-is-checked.md).
//! - The known keys and their kinds are those of the serialized defaults:
//!   the same names and syntax as the file.

use std::collections::BTreeMap;

use super::{Config, ConfigError};

const ENV_PREFIX: &str = "EDGE_OUTBOX_";

/// The `EDGE_OUTBOX_*` variables that are not overrides
/// (docs/configuration.md, "Environment overrides"): the configuration
/// file's path, the exec handler's per-message variables (a handler that
/// runs `edge-outbox` passes them on), and the test-hooks build's wedge.
const NON_KEY_VARIABLES: [&str; 6] = [
    "EDGE_OUTBOX_CONFIG",
    "EDGE_OUTBOX_MESSAGE_ID",
    "EDGE_OUTBOX_EXCHANGE",
    "EDGE_OUTBOX_ROUTING_KEY",
    "EDGE_OUTBOX_REDELIVERED",
    "EDGE_OUTBOX_WEDGE_FOR_TESTS",
];

/// The test suite's own knobs (`EDGE_OUTBOX_TEST_SEED`, ...): set for a test
/// run, inherited by the agents it starts.
const TEST_PREFIX: &str = "EDGE_OUTBOX_TEST_";

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
/// variable set which key. The non-key variables are skipped; any other
/// `EDGE_OUTBOX_*` variable that names no known key is an error naming it.
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
        if NON_KEY_VARIABLES.contains(&name.as_str()) || name.starts_with(TEST_PREFIX) {
            continue;
        }
        let rest = rest.to_ascii_lowercase();
        let Some((section, default_section)) = defaults
            .iter()
            .find(|(s, _)| rest.starts_with(&format!("{s}_")))
        else {
            return Err(unknown_variable(name, &rest, &defaults));
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

/// The error for an `EDGE_OUTBOX_*` variable whose section is not one of
/// ours: it names the variable, says what is accepted and, when one known
/// key is a near miss (a letter or two off), which.
fn unknown_variable(name: &str, rest: &str, defaults: &toml::Table) -> ConfigError {
    let known = defaults.iter().flat_map(|(section, keys)| {
        keys.as_table()
            .into_iter()
            .flat_map(move |t| t.keys().map(move |key| format!("{section}_{key}")))
    });
    let nearest = known
        .map(|k| (edit_distance(rest, &k), k))
        .filter(|(d, _)| *d <= 2)
        .min();
    let hint = match nearest {
        Some((_, key)) => format!("; did you mean {ENV_PREFIX}{}?", key.to_ascii_uppercase()),
        None => String::new(),
    };
    ConfigError::Invalid {
        key: name.to_string(),
        message: format!(
            "unknown variable: not {ENV_PREFIX}<SECTION>_<KEY> for a known key, nor one of {}, \
             {TEST_PREFIX}*{hint}",
            NON_KEY_VARIABLES.join(", ")
        ),
        origin: None,
    }
}

/// Levenshtein distance, for the "did you mean" of a misspelt variable.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
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
    fn every_unknown_variable_in_the_namespace_is_refused_by_name() {
        // A misspelt section, the issue's own example: refused, with the
        // near miss named.
        let e = load_from(
            None,
            "d",
            &env(&[("EDGE_OUTBOX_PUBLSH_MAX_IN_FLIGHT", "64")]),
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("EDGE_OUTBOX_PUBLSH_MAX_IN_FLIGHT: unknown variable"),
            "{text}"
        );
        assert!(
            text.ends_with("did you mean EDGE_OUTBOX_PUBLISH_MAX_IN_FLIGHT?"),
            "{text}"
        );
        // Far from every key: refused, without a guess.
        let e = load_from(None, "d", &env(&[("EDGE_OUTBOX_SOCKET", "/x")])).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("EDGE_OUTBOX_SOCKET: unknown variable"));
        assert!(!e.to_string().contains("did you mean"), "{e}");
        // The documented non-key variables and the test suite's knobs pass.
        for name in [
            "EDGE_OUTBOX_CONFIG",
            "EDGE_OUTBOX_MESSAGE_ID",
            "EDGE_OUTBOX_EXCHANGE",
            "EDGE_OUTBOX_ROUTING_KEY",
            "EDGE_OUTBOX_REDELIVERED",
            "EDGE_OUTBOX_WEDGE_FOR_TESTS",
            "EDGE_OUTBOX_TEST_SEED",
        ] {
            load_from(None, "d", &env(&[(name, "1")])).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        // Outside the namespace nothing is ours.
        load_from(
            None,
            "d",
            &env(&[("EDGE_OUTBOXPUBLISH", "1"), ("PATH", "/bin")]),
        )
        .unwrap();
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
