//! Configuration: the typed tree of `../shared/SPEC.md` "Configuration".
//!
//! Role: turn a TOML file (from `-c FILE` or `EDGE_OUTBOX_CONFIG`), plus
//! `EDGE_OUTBOX_<SECTION>_<KEY>` environment overrides, into one validated
//! [`Config`]. Every key is optional; the defaults are the spec's.
//!
//! Layers, lowest first: built-in defaults, the file, the environment.
//! Each component later receives only its own section.
//!
//! Invariants:
//! - Unknown keys are an error, in the file and in the environment (for the
//!   known sections): a typo never silently falls back to a default.
//! - Every error names the key it is about (`publish.max_in_flight: ...`).
//! - A [`Config`] that left [`load`] is valid: components do not re-check it.
//! - Passwords never appear in `Debug` output or error messages
//!   ([`redact_url`]).

mod env;
mod validate;
mod values;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use env::{apply_env, attribute_to_env};
use values::human_duration;
pub use values::{
    format_duration, parse_time_of_day, redact_url, HandlerKind, LogFormat, QueueType, Synchronous,
};

/// Environment variable naming the configuration file when `-c` is absent.
pub const CONFIG_ENV: &str = "EDGE_OUTBOX_CONFIG";

/// A configuration that cannot be used. Its `Display` names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{key}: {message}{}", origin_suffix(origin))]
    Invalid {
        key: String,
        message: String,
        origin: Option<String>,
    },
}

fn origin_suffix(origin: &Option<String>) -> String {
    origin
        .as_ref()
        .map(|o| format!(" (from {o})"))
        .unwrap_or_default()
}

pub(crate) fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
        origin: None,
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub submit: SubmitConfig,
    pub broker: BrokerConfig,
    pub publish: PublishConfig,
    pub consumer: ConsumerConfig,
    pub purge: PurgeConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// Status-0 rows past which a submit is refused with `buffer_full`.
    pub max_pending: u64,
    /// Database size past which a submit is refused with `storage_full`.
    pub max_db_size: ByteSize,
    /// Free space on the database's filesystem below which a submit is refused.
    pub min_free_disk: ByteSize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("edge-outbox.db"),
            synchronous: Synchronous::Full,
            max_pending: 1_000_000,
            max_db_size: ByteSize::gib(2),
            min_free_disk: ByteSize::mib(64),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubmitConfig {
    pub socket: PathBuf,
    /// Octal file mode of the socket, as a string ("0660").
    pub socket_mode: String,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Largest decoded body accepted.
    pub max_message_size: ByteSize,
    pub max_connections: usize,
    /// A connection that sends no complete line for this long is closed.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
}

impl Default for SubmitConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("edge-outbox.sock"),
            socket_mode: "0660".into(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_message_size: ByteSize::mib(1),
            max_connections: 1024,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl SubmitConfig {
    /// The socket mode as bits; valid after [`load`].
    pub fn socket_mode_bits(&self) -> u32 {
        u32::from_str_radix(&self.socket_mode, 8).unwrap_or(0o660)
    }

    /// Longest request line accepted. A JSON string may escape every byte of
    /// the body (`\u0000` is six bytes for one), base64 takes 4/3: six times
    /// the body plus room for the other fields covers every valid request.
    pub fn max_line_length(&self) -> usize {
        let body = usize::try_from(self.max_message_size.as_u64()).unwrap_or(usize::MAX / 8);
        body.saturating_mul(6).saturating_add(64 * 1024)
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub urls: Vec<String>,
    /// A file whose content replaces the URLs' password (systemd credentials).
    pub password_file: PathBuf,
    #[serde(with = "human_duration")]
    pub heartbeat: Duration,
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    pub tls_ca_file: PathBuf,
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
}

impl std::fmt::Debug for BrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("BrokerConfig")
            .field("urls", &urls)
            .field("password_file", &self.password_file)
            .field("heartbeat", &self.heartbeat)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            urls: vec!["amqp://guest:guest@127.0.0.1:5672/%2f".into()],
            password_file: PathBuf::new(),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            tls_ca_file: PathBuf::new(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishConfig {
    pub max_in_flight: usize,
    #[serde(with = "human_duration")]
    pub confirm_timeout: Duration,
    pub max_attempts: u32,
    #[serde(with = "human_duration")]
    pub retry_interval: Duration,
    #[serde(with = "human_duration")]
    pub resend_every: Duration,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            confirm_timeout: Duration::from_secs(30),
            max_attempts: 4,
            retry_interval: Duration::from_secs(60),
            resend_every: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub exchange: String,
    #[serde(default = "default_exchange_type")]
    pub exchange_type: String,
    #[serde(default)]
    pub routing_key: String,
}

fn default_exchange_type() -> String {
    "direct".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    pub queue: String,
    pub queue_type: QueueType,
    pub bindings: Vec<Binding>,
    pub prefetch: u16,
    pub handler: HandlerKind,
    pub exec: Vec<String>,
    #[serde(with = "human_duration")]
    pub handler_timeout: Duration,
    pub max_attempts: u32,
    pub dead_letter_exchange: String,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            queue: String::new(),
            queue_type: QueueType::Classic,
            bindings: Vec::new(),
            prefetch: 1,
            handler: HandlerKind::Record,
            exec: Vec::new(),
            handler_timeout: Duration::from_secs(30),
            max_attempts: 2,
            dead_letter_exchange: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurgeConfig {
    /// Local time of day, "HH:MM".
    pub at: String,
    #[serde(with = "human_duration")]
    pub retention: Duration,
    #[serde(with = "human_duration")]
    pub failed_retention: Duration,
    pub batch_size: u32,
}

impl Default for PurgeConfig {
    fn default() -> Self {
        Self {
            at: "03:00".into(),
            retention: Duration::from_secs(30 * 86_400),
            failed_retention: Duration::from_secs(90 * 86_400),
            batch_size: 1000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on; empty: no metrics endpoint.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// Loads the configuration: `file` (or `EDGE_OUTBOX_CONFIG`, or nothing),
/// then the process environment's overrides, then validation.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let from_env = env
        .iter()
        .find(|(k, _)| k == CONFIG_ENV)
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| !p.as_os_str().is_empty());
    let path = file.map(Path::to_path_buf).or(from_env);
    let text = match &path {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let origin = path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "defaults".into());
    load_from(text.as_deref(), &origin, &env)
}

/// [`load`] without touching the filesystem or the process environment.
pub fn load_from(
    text: Option<&str>,
    origin: &str,
    env: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut table: toml::Table = match text {
        Some(t) => toml::from_str(t).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?,
        None => toml::Table::new(),
    };
    // Deserialize the file alone first, so its errors name the file.
    from_table(table.clone(), Some(origin))?;
    let sources = apply_env(&mut table, env)?;
    let config = from_table(table, None).map_err(|e| attribute_to_env(e, &sources))?;
    config.validate()?;
    Ok(config)
}

fn from_table(table: toml::Table, origin: Option<&str>) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Invalid {
        key: e.path().to_string(),
        message: e.inner().to_string(),
        origin: origin.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = load_from(None, "defaults", &[]).unwrap();
        assert_eq!(c.store.path, PathBuf::from("edge-outbox.db"));
        assert_eq!(c.store.synchronous, Synchronous::Full);
        assert_eq!(c.store.max_db_size, ByteSize::gib(2));
        assert_eq!(c.submit.socket_mode_bits(), 0o660);
        assert_eq!(c.publish.max_in_flight, 256);
        assert_eq!(c.publish.retry_interval, Duration::from_secs(60));
        assert_eq!(c.purge.retention, Duration::from_secs(30 * 86_400));
        assert_eq!(c.consumer.max_attempts, 2);
    }

    #[test]
    fn file_values_and_human_units() {
        let c = load_from(
            Some("[store]\nmax_db_size = \"10MiB\"\n[publish]\nconfirm_timeout = \"500ms\"\n[purge]\nretention = \"7d\"\n"),
            "test.toml",
            &[],
        )
        .unwrap();
        assert_eq!(c.store.max_db_size, ByteSize::mib(10));
        assert_eq!(c.publish.confirm_timeout, Duration::from_millis(500));
        assert_eq!(c.purge.retention, Duration::from_secs(7 * 86_400));
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = load_from(Some("[store]\npaht = \"x\"\n"), "f.toml", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("paht"), "{msg}");
        let e = load_from(Some("[stroe]\n"), "f.toml", &[]).unwrap_err();
        assert!(e.to_string().contains("stroe"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = load_from(Some("[publish]\nmax_in_flight = 0\n"), "f", &[]).unwrap_err();
        assert!(e.to_string().starts_with("publish.max_in_flight"), "{e}");
        let e = load_from(Some("[publish]\nconfirm_timeout = \"soon\"\n"), "f", &[]).unwrap_err();
        assert!(e.to_string().contains("publish.confirm_timeout"), "{e}");
        let e = load_from(Some("[submit]\nsocket_mode = \"999\"\n"), "f", &[]).unwrap_err();
        assert!(e.to_string().contains("submit.socket_mode"), "{e}");
        let e = load_from(Some("[store]\nsynchronous = \"off\"\n"), "f", &[]).unwrap_err();
        assert!(e.to_string().contains("store.synchronous"), "{e}");
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
            ]),
        )
        .unwrap();
        assert_eq!(c.publish.max_in_flight, 20);
        assert_eq!(c.store.path, PathBuf::from("/tmp/x.db"));
        assert_eq!(c.broker.urls.len(), 2);
        assert_eq!(c.submit.max_message_size, ByteSize::mib(2));
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
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://host/vh"), "amqp://host/vh");
        let c = Config::default();
        assert!(!format!("{c:?}").contains("guest:guest"));
    }

    #[test]
    fn durations_print_in_whole_units() {
        let f = human_duration::format;
        assert_eq!(f(Duration::from_secs(90 * 86_400)), "90d");
        assert_eq!(f(Duration::from_secs(7_200)), "2h");
        assert_eq!(f(Duration::from_secs(90)), "90s");
        assert_eq!(f(Duration::from_millis(500)), "500ms");
        let shown = toml::to_string(&Config::default()).unwrap();
        assert!(shown.contains("failed_retention = \"90d\""), "{shown}");
        let again = load_from(Some(&shown), "round trip", &[]).unwrap();
        assert_eq!(
            again.purge.failed_retention,
            Duration::from_secs(90 * 86_400)
        );
    }

    #[test]
    fn time_of_day() {
        assert_eq!(parse_time_of_day("03:00"), Ok(180));
        assert!(parse_time_of_day("24:00").is_err());
        assert!(parse_time_of_day("3").is_err());
    }
}
