//! The checks of a deserialized configuration that its types do not make:
//! bounds on paths, sizes and durations, the broker URLs, a key another key
//! requires (docs/configuration.md, "Keys").
//!
//! Role: the last step of [`super::load`]. What a type can say (a count of
//! at least 1, a file mode, a time of day, an address, an exchange type) is
//! refused earlier, at deserialization ([`super::values`]); what is left is
//! here.
//!
//! Also the warnings ([`Config::warnings`]): values that are allowed but
//! probably not meant (docs/configuration.md, Warnings). `check-config`
//! prints them, `run` logs them at WARN; neither refuses.
//!
//! Invariants:
//! - Every error names its key, with the same words as the table of
//!   docs/configuration.md ("must be more than 0").
//! - A URL in an error is redacted ([`redact_url`]).

use std::time::Duration;

use super::{
    format_duration, invalid, redact_url, BrokerConfig, Config, ConfigError, ConsumerConfig,
    HandlerKind, PublishConfig, SubmitConfig,
};

impl Config {
    /// Checks what types alone cannot say; every error names its key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        validate_submit(&self.submit)?;
        validate_broker(&self.broker)?;
        validate_publish(&self.publish)?;
        validate_consumer(&self.consumer)?;
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!(
                    "{:?} is not a level (error, warn, info, debug, trace) or filter",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// What is allowed but probably not what the operator wants: each a
    /// sentence that names its keys and says what follows from it.
    pub(crate) fn warnings(&self) -> Vec<String> {
        heartbeat_warnings(&self.broker, &self.publish)
    }
}

/// The heartbeats the agent asks for, each with the key that sets it: the
/// URLs' own `?heartbeat=`, and `broker.heartbeat` when a URL has none.
fn heartbeats(b: &BrokerConfig) -> Vec<(String, u64)> {
    let mut asked: Vec<(String, u64)> = Vec::new();
    let mut key_used = false;
    for (i, url) in b.urls.iter().enumerate() {
        // The URLs were checked in `validate`; one that does not parse
        // asks for nothing of its own.
        match url
            .parse::<lapin::uri::AMQPUri>()
            .ok()
            .and_then(|u| u.query.heartbeat)
        {
            Some(h) => asked.push((format!("the ?heartbeat= of broker.urls[{i}]"), u64::from(h))),
            None => key_used = true,
        }
    }
    if key_used {
        asked.insert(0, ("broker.heartbeat".to_string(), b.heartbeat.as_secs()));
    }
    asked
}

/// A peer that misses two heartbeats is dead: with a confirm timeout no
/// longer than that, or no heartbeat at all, a silent partition is first
/// seen as unconfirmed publishes (docs/configuration.md, Warnings).
fn heartbeat_warnings(b: &BrokerConfig, p: &PublishConfig) -> Vec<String> {
    let timeout = p.confirm_timeout;
    let shown = format_duration(timeout);
    let probe = "the agent then relies on its liveness probe: an unconfirmed publish is \
                 charged an attempt only if the connection proved alive after it, else the \
                 connection is closed and nothing is charged";
    heartbeats(b)
        .into_iter()
        .filter_map(|(key, secs)| {
            if secs == 0 {
                return Some(format!(
                    "{key} is 0 (no heartbeat): a silent network partition is noticed only by \
                     publish.confirm_timeout ({shown}); {probe}. Set a heartbeat (the default \
                     is 10s)"
                ));
            }
            let detection = Duration::from_secs(secs.saturating_mul(2));
            (timeout <= detection).then(|| {
                format!(
                    "publish.confirm_timeout ({shown}) is not more than twice {key} ({}): a \
                     silent network partition is noticed by a confirm timeout before the \
                     heartbeat notices it (after about {}); {probe}. Set \
                     publish.confirm_timeout above {} to let the heartbeat notice first",
                    format_duration(Duration::from_secs(secs)),
                    format_duration(detection),
                    format_duration(detection),
                )
            })
        })
        .collect()
}

fn validate_submit(s: &SubmitConfig) -> Result<(), ConfigError> {
    if s.socket.as_os_str().is_empty() {
        return Err(invalid("submit.socket", "must not be empty"));
    }
    // sun_path holds 108 bytes including the terminating NUL.
    if s.socket.as_os_str().len() > 107 {
        return Err(invalid(
            "submit.socket",
            "path is longer than the 107 bytes a Unix socket path may have",
        ));
    }
    if s.max_message_size.as_u64() == 0 {
        return Err(invalid(
            "submit.max_message_size",
            "must be at least 1 byte",
        ));
    }
    if s.max_message_size.as_u64() > 128 * 1024 * 1024 {
        return Err(invalid(
            "submit.max_message_size",
            "must be at most 128MiB (RabbitMQ's own limit is lower: 16MiB by default)",
        ));
    }
    if s.idle_timeout.is_zero() {
        return Err(invalid("submit.idle_timeout", "must be more than 0"));
    }
    Ok(())
}

fn validate_broker(b: &BrokerConfig) -> Result<(), ConfigError> {
    if b.urls.is_empty() {
        return Err(invalid("broker.urls", "must name at least one broker"));
    }
    for (i, url) in b.urls.iter().enumerate() {
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid(
                &format!("broker.urls[{i}]"),
                format!("{} is not an amqp:// or amqps:// URL", redact_url(url)),
            ));
        }
        if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
            return Err(invalid(
                &format!("broker.urls[{i}]"),
                format!("{}: {e}", redact_url(url)),
            ));
        }
    }
    if b.heartbeat.as_secs() > u64::from(u16::MAX) {
        return Err(invalid("broker.heartbeat", "must be at most 65535s"));
    }
    if b.connect_timeout.is_zero() {
        return Err(invalid("broker.connect_timeout", "must be more than 0"));
    }
    Ok(())
}

fn validate_publish(p: &PublishConfig) -> Result<(), ConfigError> {
    if p.confirm_timeout.is_zero() {
        return Err(invalid("publish.confirm_timeout", "must be more than 0"));
    }
    if p.resend_every.is_zero() {
        return Err(invalid("publish.resend_every", "must be more than 0"));
    }
    if p.max_age.is_some_and(|d| d.is_zero()) {
        return Err(invalid(
            "publish.max_age",
            "must be more than 0 (\"\" turns it off)",
        ));
    }
    Ok(())
}

fn validate_consumer(c: &ConsumerConfig) -> Result<(), ConfigError> {
    if c.handler == HandlerKind::Exec && c.exec.is_empty() {
        return Err(invalid(
            "consumer.exec",
            "handler = \"exec\" needs the command to run, e.g. [\"/usr/bin/handler\", \"--flag\"]",
        ));
    }
    if c.handler_timeout.is_zero() {
        return Err(invalid("consumer.handler_timeout", "must be more than 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::load_from;

    fn warnings(text: &str) -> Vec<String> {
        match load_from(Some(text), "f", &[]) {
            Ok(config) => config.warnings(),
            Err(e) => panic!("refused: {e}"),
        }
    }

    #[test]
    fn the_defaults_warn_of_nothing() {
        assert_eq!(warnings(""), Vec::<String>::new());
        // Strictly more than twice the heartbeat is fine.
        assert!(warnings("[publish]\nconfirm_timeout = \"21s\"\n").is_empty());
    }

    #[test]
    fn a_confirm_timeout_within_two_heartbeats_warns_and_names_both_keys() {
        let w = warnings("[publish]\nconfirm_timeout = \"20s\"\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with(
                "publish.confirm_timeout (20s) is not more than twice broker.heartbeat (10s)"
            ),
            "{w:?}"
        );
        assert!(w[0].contains("liveness probe"), "{w:?}");
        assert!(w[0].contains("above 20s"), "{w:?}");
    }

    #[test]
    fn no_heartbeat_warns_from_the_key_or_the_url_that_turns_it_off() {
        let w = warnings("[broker]\nheartbeat = \"0s\"\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("broker.heartbeat is 0 (no heartbeat)"),
            "{w:?}"
        );
        assert!(w[0].contains("liveness probe"), "{w:?}");
        // A URL's own heartbeat replaces the key's: the key is not used.
        let w = warnings(
            "[broker]\nheartbeat = \"0s\"\nurls = [\"amqp://h/%2f?heartbeat=5\", \"amqp://g/%2f?heartbeat=0\"]\n",
        );
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("the ?heartbeat= of broker.urls[1] is 0"),
            "{w:?}"
        );
        let w = warnings("[broker]\nurls = [\"amqp://h/%2f?heartbeat=20\"]\n");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("twice the ?heartbeat= of broker.urls[0] (20s)"),
            "{w:?}"
        );
    }

    fn refused(text: &str) -> String {
        match load_from(Some(text), "f", &[]) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn what_types_cannot_say_is_checked_by_key() {
        let e = refused("[store]\npath = \"\"\n");
        assert_eq!(e, "store.path: must not be empty");
        let e = refused(&format!("[submit]\nsocket = \"/{}\"\n", "s".repeat(107)));
        assert!(e.starts_with("submit.socket: path is longer"), "{e}");
        let e = refused("[submit]\nmax_message_size = \"200MiB\"\n");
        assert!(e.starts_with("submit.max_message_size"), "{e}");
        let e = refused("[broker]\nurls = [\"http://u:secret@h\"]\n");
        assert!(e.starts_with("broker.urls[0]"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        let e = refused("[broker]\nurls = []\n");
        assert!(e.starts_with("broker.urls"), "{e}");
        let e = refused("[publish]\nresend_every = \"0s\"\n");
        assert_eq!(e, "publish.resend_every: must be more than 0");
        let e = refused("[publish]\nmax_age = \"0s\"\n");
        assert!(e.starts_with("publish.max_age: must be more than 0"), "{e}");
        let e = refused("[consumer]\nhandler = \"exec\"\n");
        assert!(e.starts_with("consumer.exec"), "{e}");
        let e = refused("[log]\nlevel = \"[[\"\n");
        assert!(e.starts_with("log.level"), "{e}");
    }
}
