//! Checks of the configuration that the types alone cannot say.

use std::net::SocketAddr;

use super::{invalid, parse_time_of_day, redact_url, Config, ConfigError, HandlerKind};

impl Config {
    /// Checks what types alone cannot say; every error names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty"));
        }
        if self.store.max_pending == 0 {
            return Err(invalid("store.max_pending", "must be at least 1"));
        }
        let s = &self.submit;
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
        match u32::from_str_radix(&s.socket_mode, 8) {
            Ok(m) if m <= 0o777 => {}
            _ => {
                return Err(invalid(
                    "submit.socket_mode",
                    format!(
                        "{:?} is not an octal file mode like \"0660\"",
                        s.socket_mode
                    ),
                ))
            }
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
        if s.max_connections == 0 {
            return Err(invalid("submit.max_connections", "must be at least 1"));
        }
        if s.idle_timeout.is_zero() {
            return Err(invalid("submit.idle_timeout", "must be more than 0"));
        }
        let b = &self.broker;
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
        let p = &self.publish;
        if p.max_in_flight == 0 {
            return Err(invalid("publish.max_in_flight", "must be at least 1"));
        }
        if p.max_attempts == 0 {
            return Err(invalid("publish.max_attempts", "must be at least 1"));
        }
        if p.confirm_timeout.is_zero() {
            return Err(invalid("publish.confirm_timeout", "must be more than 0"));
        }
        if p.resend_every.is_zero() {
            return Err(invalid("publish.resend_every", "must be more than 0"));
        }
        let c = &self.consumer;
        if c.prefetch == 0 {
            return Err(invalid("consumer.prefetch", "must be at least 1"));
        }
        if c.max_attempts == 0 {
            return Err(invalid("consumer.max_attempts", "must be at least 1"));
        }
        if c.handler == HandlerKind::Exec && c.exec.is_empty() {
            return Err(invalid(
                "consumer.exec",
                "handler = \"exec\" needs the command to run, e.g. [\"/usr/bin/handler\", \"--flag\"]",
            ));
        }
        if c.handler_timeout.is_zero() {
            return Err(invalid("consumer.handler_timeout", "must be more than 0"));
        }
        for (i, binding) in c.bindings.iter().enumerate() {
            if !matches!(
                binding.exchange_type.as_str(),
                "direct" | "fanout" | "topic" | "headers"
            ) {
                return Err(invalid(
                    &format!("consumer.bindings[{i}].exchange_type"),
                    format!(
                        "{:?} is not one of direct, fanout, topic, headers",
                        binding.exchange_type
                    ),
                ));
            }
        }
        parse_time_of_day(&self.purge.at).map_err(|m| invalid("purge.at", m))?;
        if self.purge.batch_size == 0 {
            return Err(invalid("purge.batch_size", "must be at least 1"));
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{:?} is not an address like \"127.0.0.1:9464\"",
                    self.metrics.listen
                ),
            ));
        }
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
