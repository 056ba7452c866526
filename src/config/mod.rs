//! Configuration: one TOML file, every key optional, overridable key by key
//! from the environment, read once at start (docs/configuration.md).
//!
//! Role: turn the file (`-c FILE`, else the one `EDGE_OUTBOX_CONFIG` names,
//! else none) and the `EDGE_OUTBOX_<SECTION>_<KEY>` variables into one
//! [`Config`] whose values are already typed; each component then receives
//! its own section.
//!
//! Layers, lowest first (docs/configuration.md, "Where it comes from"):
//! 1. the built-in defaults: the `Default` impls of the sections below;
//! 2. the file, as a TOML table;
//! 3. the environment (`env.rs`): each variable replaces one key of the table;
//! 4. deserialization of the merged table into the typed sections
//!    (`values.rs`: file modes, times of day, exchange types, addresses,
//!    durations, `NonZero*` counts, `Option` for "not set");
//! 5. the checks types cannot say (`validate.rs`).
//!
//! Files: `mod.rs` the tree, its defaults and `load`; `values.rs` the value
//! types and their serde; `env.rs` the overrides; `validate.rs` the checks.
//!
//! Invariants:
//! - Unknown keys are an error, in the file and in the environment (for the
//!   known sections): a typo never silently falls back to a default.
//! - Every error names the key it is about (`publish.max_in_flight: ...`);
//!   one its type refuses also names where the value came from, the file or
//!   the variable (docs/configuration.md, "Validation").
//! - Values are parsed once, here: no component re-parses a string or falls
//!   back to a default on a bad value. A [`Config`] that left `load` is
//!   valid; components do not re-check it.
//! - The syntax users write does not depend on the types: `socket_mode` is
//!   the string `"0660"`, `""` means "not set", and serializing a [`Config`]
//!   prints that syntax back (`edge-outbox check-config`).
//! - Passwords never appear in `Debug` output or error messages
//!   (`redact_url`).

mod env;
#[cfg(test)]
mod tests;
mod validate;
mod values;

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use env::apply_env;
use values::{at_least_one, empty_is_none, human_duration, optional_address, optional_duration};
pub(crate) use values::{format_duration, redact_url};
pub(crate) use values::{
    ExchangeKind, FileMode, HandlerKind, LogFormat, Order, QueueType, Synchronous, TimeOfDay,
};

/// Environment variable naming the configuration file when `-c` is absent.
const CONFIG_ENV: &str = "EDGE_OUTBOX_CONFIG";

/// A configuration that cannot be used. Its `Display` names the key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
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

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
        origin: None,
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
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
pub(crate) struct StoreConfig {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// The most delivering rows: past it a submit is refused with
    /// `buffer_full` (nothing is ever evicted to make room).
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub max_pending: NonZeroU64,
    /// Live data (pages in use) at which settled rows are purged to make
    /// room, and past which, with none left, a submit is refused with
    /// `storage_full`.
    pub max_db_size: ByteSize,
    /// Free space on the database's filesystem below which a submit is refused.
    pub min_free_disk: ByteSize,
    /// A file holding the passphrase the database is encrypted with
    /// (SQLCipher; systemd credentials); `""`: not encrypted.
    #[serde(with = "empty_is_none")]
    pub key_file: Option<PathBuf>,
    /// Failed rows older than this may be purged to make room at
    /// `max_db_size` (after every delivered and consumed row).
    #[serde(with = "human_duration")]
    pub room_failed_grace: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        // The `NonZero*` defaults are `const` blocks: a zero there fails the
        // build, never a run.
        Self {
            path: PathBuf::from("edge-outbox.db"),
            synchronous: Synchronous::Full,
            max_pending: const { NonZeroU64::new(1_000_000).unwrap() },
            max_db_size: ByteSize::gib(2),
            min_free_disk: ByteSize::mib(64),
            key_file: None,
            room_failed_grace: Duration::from_secs(7 * 86_400),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct SubmitConfig {
    pub socket: PathBuf,
    /// Who may open the socket, by its file mode (written "0660").
    pub socket_mode: FileMode,
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// Largest decoded body accepted.
    pub max_message_size: ByteSize,
    /// Connections at once; the one past it is refused with `buffer_full`.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub max_connections: NonZeroUsize,
    /// A connection that sends no complete line for this long is closed.
    #[serde(with = "human_duration")]
    pub idle_timeout: Duration,
}

impl Default for SubmitConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("edge-outbox.sock"),
            socket_mode: FileMode::OWNER_AND_GROUP,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_message_size: ByteSize::mib(1),
            max_connections: const { NonZeroUsize::new(1024).unwrap() },
            idle_timeout: Duration::from_secs(300),
        }
    }
}

impl SubmitConfig {
    /// Longest request line accepted. A JSON string may escape every byte of
    /// the body (`\u0000` is six bytes for one), base64 takes 4/3: six times
    /// the body plus room for the other fields covers every valid request.
    pub(crate) fn max_line_length(&self) -> usize {
        let body = usize::try_from(self.max_message_size.as_u64()).unwrap_or(usize::MAX / 8);
        body.saturating_mul(6).saturating_add(64 * 1024)
    }
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct BrokerConfig {
    pub urls: Vec<String>,
    /// A file whose content replaces the URLs' password (systemd
    /// credentials); `""`: the URLs' own passwords.
    #[serde(with = "empty_is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(with = "human_duration")]
    pub heartbeat: Duration,
    #[serde(with = "human_duration")]
    pub connect_timeout: Duration,
    /// The CA an `amqps://` broker is verified against; `""`: the system's.
    #[serde(with = "empty_is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// The client certificate, sent when the key is set too.
    #[serde(with = "empty_is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(with = "empty_is_none")]
    pub tls_key_file: Option<PathBuf>,
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
            password_file: None,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PublishConfig {
    /// Messages published and not yet confirmed, at most.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub max_in_flight: NonZeroUsize,
    #[serde(with = "human_duration")]
    pub confirm_timeout: Duration,
    /// Failed attempts after which a message is marked failed.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub max_attempts: NonZeroU32,
    #[serde(with = "human_duration")]
    pub retry_interval: Duration,
    #[serde(with = "human_duration")]
    pub resend_every: Duration,
    /// Messages published per second, at most; 0: no cap
    /// (docs/forwarding.md, The rate cap).
    pub max_rate: u32,
    /// Body bytes published per second, at most; 0: no cap.
    pub max_bytes_rate: ByteSize,
    /// The backlog's order within a priority.
    pub order: Order,
    /// How long a message without a `ttl` of its own may wait to be
    /// published; `""` (none): it waits for ever.
    #[serde(with = "optional_duration")]
    pub max_age: Option<Duration>,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            max_in_flight: const { NonZeroUsize::new(256).unwrap() },
            confirm_timeout: Duration::from_secs(30),
            max_attempts: const { NonZeroU32::new(4).unwrap() },
            retry_interval: Duration::from_secs(60),
            resend_every: Duration::from_secs(30),
            max_rate: 0,
            max_bytes_rate: ByteSize::b(0),
            order: Order::OldestFirst,
            max_age: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Binding {
    pub exchange: String,
    #[serde(default)]
    pub exchange_type: ExchangeKind,
    #[serde(default)]
    pub routing_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ConsumerConfig {
    /// The queue to consume; `""` (none): no consumer runs.
    #[serde(with = "empty_is_none")]
    pub queue: Option<String>,
    pub queue_type: QueueType,
    pub bindings: Vec<Binding>,
    /// Unacked deliveries at once, hence handlers running at once.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub prefetch: NonZeroU16,
    pub handler: HandlerKind,
    pub exec: Vec<String>,
    #[serde(with = "human_duration")]
    pub handler_timeout: Duration,
    /// Failed handler runs after which the delivery is rejected.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub max_attempts: NonZeroU32,
    /// Where rejected deliveries go; `""` (none): they are dropped.
    #[serde(with = "empty_is_none")]
    pub dead_letter_exchange: Option<String>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            queue: None,
            queue_type: QueueType::Classic,
            bindings: Vec::new(),
            prefetch: NonZeroU16::MIN,
            handler: HandlerKind::Record,
            exec: Vec::new(),
            handler_timeout: Duration::from_secs(30),
            max_attempts: const { NonZeroU32::new(2).unwrap() },
            dead_letter_exchange: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PurgeConfig {
    /// Local time of the daily purge (written "HH:MM").
    pub at: TimeOfDay,
    #[serde(with = "human_duration")]
    pub retention: Duration,
    #[serde(with = "human_duration")]
    pub failed_retention: Duration,
    /// Rows deleted per transaction: a submit waits for one batch at most.
    #[serde(deserialize_with = "at_least_one::deserialize")]
    pub batch_size: NonZeroU32,
}

impl Default for PurgeConfig {
    fn default() -> Self {
        Self {
            at: TimeOfDay::THREE_AM,
            retention: Duration::from_secs(30 * 86_400),
            failed_retention: Duration::from_secs(90 * 86_400),
            batch_size: const { NonZeroU32::new(1000).unwrap() },
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MetricsConfig {
    /// `IP:PORT` to serve `/metrics` on; `""` (none): no metrics endpoint.
    #[serde(with = "optional_address")]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogConfig {
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
pub(crate) fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let env = environment()?;
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

/// The process environment as text. A variable of ours that is not UTF-8 is
/// an error naming it (never a panic, never silently skipped); others that
/// are not UTF-8 are none of our business.
fn environment() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (name, value) in std::env::vars_os() {
        match (name.into_string(), value.into_string()) {
            (Ok(name), Ok(value)) => env.push((name, value)),
            (Ok(name), Err(_)) if name.starts_with("EDGE_OUTBOX_") => {
                return Err(invalid(&name, "the value is not UTF-8"))
            }
            _ => {}
        }
    }
    Ok(env)
}

/// [`load`] without touching the filesystem or the process environment:
/// `text` is the file's content (`origin` names it), `env` the variables.
fn load_from(
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
    let overrides = apply_env(&mut table, env, origin)?;
    // One deserialization of the merged table: a file value that a variable
    // overrides is never read, so it cannot fail the load.
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
            let key = e.path().to_string();
            let origin = overrides.variable_for(&key).unwrap_or(origin).to_string();
            ConfigError::Invalid {
                // The key is said once, first: toml's own message repeats it.
                message: e.inner().message().to_string(),
                key,
                origin: Some(origin),
            }
        })?;
    config.validate()?;
    Ok(config)
}
