//! Broker: reaching RabbitMQ, shared by the forwarder and the consumer
//! (docs/configuration.md, `[broker]`; docs/forwarding.md, Reconnecting).
//!
//! Role: turn `[broker]` into connectable targets (password file and
//! heartbeat applied), connect to them in turn with a timeout, and space
//! failed attempts with capped exponential backoff and jitter. lapin's
//! auto-recovery is not used: each caller owns its connection, and drives
//! its reconnects through one [`Reconnect`] of its own.
//!
//! Owns:
//! - this file: [`BrokerTarget`]s, the [`Connector`] (one attempt at the next
//!   URL), [`backoff`];
//! - [`link`]: [`Reconnect`], the one reconnect driver (backoff, connect,
//!   the caller's setup step, failure accounting) and [`close`], the bounded
//!   clean close;
//! - [`headers`]: the one codec between the stored JSON headers object and
//!   an AMQP field table, both ways.
//!
//! Invariants:
//! - Passwords never leave this module in text meant for people: targets
//!   carry a redacted URL, and connection errors are scrubbed of the password.
//! - Every connection attempt is bounded by `broker.connect_timeout`.
//! - `amqps://` targets verify the broker against `broker.tls_ca_file` (or
//!   the system's CAs); a certificate that does not verify fails the attempt
//!   at once, and it is retried like any unreachable broker.

use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

use crate::config::{redact_url, BrokerConfig};

pub(crate) mod headers;
pub(crate) mod link;

pub(crate) use link::{close, Linked, Reconnect, SetupError};

/// First reconnect delay; doubles per failure up to [`RECONNECT_DELAY_MAX`].
pub(crate) const RECONNECT_DELAY_MIN: Duration = Duration::from_millis(250);
pub(crate) const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum BrokerError {
    #[error("broker.urls[{index}] ({url}): {message}")]
    BadUrl {
        index: usize,
        url: String,
        message: String,
    },
    #[error("cannot read broker.password_file {path}: {source}")]
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {key} {path}: {source}")]
    TlsFile {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A broker to connect to: the parsed URI (password and heartbeat applied)
/// and its redacted form for humans.
#[derive(Clone)]
pub(crate) struct BrokerTarget {
    uri: AMQPUri,
    pub(crate) shown: String,
    /// For `amqps://` targets: the CA to trust and the client identity.
    tls: Option<OwnedTLSConfig>,
}

fn read_tls_file(key: &'static str, path: &std::path::Path) -> Result<Vec<u8>, BrokerError> {
    std::fs::read(path).map_err(|source| BrokerError::TlsFile {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// The TLS settings of `[broker]`: `tls_ca_file` (else the system's CAs),
/// and a client certificate when both `tls_cert_file` and `tls_key_file` are set.
fn tls_config(config: &BrokerConfig) -> Result<OwnedTLSConfig, BrokerError> {
    let cert_chain = if let Some(ca_file) = &config.tls_ca_file {
        let pem = read_tls_file("broker.tls_ca_file", ca_file)?;
        Some(String::from_utf8_lossy(&pem).into_owned())
    } else {
        None
    };
    let identity =
        if let (Some(cert_file), Some(key_file)) = (&config.tls_cert_file, &config.tls_key_file) {
            Some(OwnedIdentity::PKCS8 {
                pem: read_tls_file("broker.tls_cert_file", cert_file)?,
                key: read_tls_file("broker.tls_key_file", key_file)?,
            })
        } else {
            None
        };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// Parses `broker.urls`, applies `broker.password_file` and `broker.heartbeat`.
/// Every file `[broker]` names is read here, once, whether or not a URL
/// needs it (a TLS file with only `amqp://` URLs too): `run` and
/// `check-config` both call this, so a file that cannot be read fails both
/// alike, with this error, at start
/// (docs/decisions/0038-check-config-opens-what-run-opens.md).
pub(crate) fn broker_targets(config: &BrokerConfig) -> Result<Vec<BrokerTarget>, BrokerError> {
    let password = match &config.password_file {
        None => None,
        Some(password_file) => {
            let text = std::fs::read_to_string(password_file).map_err(|source| {
                BrokerError::PasswordFile {
                    path: password_file.clone(),
                    source,
                }
            })?;
            Some(text.trim_end_matches(['\r', '\n']).to_string())
        }
    };
    let tls = tls_config(config)?;
    config
        .urls
        .iter()
        .enumerate()
        .map(|(index, url)| {
            let mut uri: AMQPUri = url.parse().map_err(|message| BrokerError::BadUrl {
                index,
                url: redact_url(url),
                message,
            })?;
            let tls = url.starts_with("amqps://").then(|| tls.clone());
            if let Some(p) = &password {
                uri.authority.userinfo.password = p.clone();
            }
            if uri.query.heartbeat.is_none() {
                // 0 turns heartbeats off, as AMQP defines it: a partition is then
                // noticed by the forwarder's liveness probe (docs/forwarding.md).
                uri.query.heartbeat = Some(config.heartbeat.as_secs().min(65_535) as u16);
            }
            Ok(BrokerTarget {
                uri,
                shown: redact_url(url),
                tls,
            })
        })
        .collect()
}

/// Connects to `broker.urls` in turn.
// `pub` only while `consume::Consumer::new` (pub) takes one.
pub(crate) struct Connector {
    targets: Vec<BrokerTarget>,
    next: usize,
    connect_timeout: Duration,
    /// Shown in the broker's management UI: which part of the agent this is.
    role: &'static str,
}

/// A live connection and where it goes.
pub(crate) struct Connected {
    pub(crate) connection: Connection,
    pub(crate) url: String,
}

impl Connected {
    /// A failure of a step after connecting (opening a channel, say).
    pub(crate) fn failure(&self, error: impl Into<String>) -> ConnectFailure {
        ConnectFailure {
            url: self.url.clone(),
            error: error.into(),
        }
    }
}

/// Why an attempt failed, without the password.
#[derive(Debug, Clone)]
pub(crate) struct ConnectFailure {
    pub(crate) url: String,
    pub(crate) error: String,
}

impl Connector {
    pub(crate) fn new(config: &BrokerConfig, role: &'static str) -> Result<Connector, BrokerError> {
        Ok(Connector {
            targets: broker_targets(config)?,
            next: 0,
            connect_timeout: config.connect_timeout,
            role,
        })
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// One attempt at the next URL, bounded by `broker.connect_timeout`.
    pub(crate) async fn connect(&mut self) -> Result<Connected, ConnectFailure> {
        let Some(target) = self.targets.get(self.next % self.targets.len().max(1)) else {
            return Err(ConnectFailure {
                url: String::new(),
                error: "broker.urls is empty".into(),
            });
        };
        self.next = self.next.wrapping_add(1);
        let properties = ConnectionProperties::default().with_connection_name(
            format!("edge-outbox {} {}", env!("CARGO_PKG_VERSION"), self.role).into(),
        );
        let attempt = async {
            match &target.tls {
                Some(tls) => {
                    let runtime = lapin::runtime::default_runtime()?;
                    Connection::connect_uri_with_config(
                        target.uri.clone(),
                        properties,
                        tls.clone(),
                        runtime,
                    )
                    .await
                }
                None => Connection::connect_uri(target.uri.clone(), properties).await,
            }
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(connection)) => Ok(Connected {
                connection,
                url: target.shown.clone(),
            }),
            Ok(Err(e)) => Err(ConnectFailure {
                url: target.shown.clone(),
                error: scrub(&e.to_string(), &target.uri),
            }),
            Err(_) => Err(ConnectFailure {
                url: target.shown.clone(),
                error: format!(
                    "no connection within broker.connect_timeout ({})",
                    humantime::format_duration(self.connect_timeout)
                ),
            }),
        }
    }
}

/// Capped exponential backoff with jitter: in [delay/2, delay].
pub(crate) fn backoff(failures: u32) -> Duration {
    let exp = RECONNECT_DELAY_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let cap = exp.min(RECONNECT_DELAY_MAX);
    cap.mul_f64(0.5 + fastrand::f64() * 0.5)
}

/// Removes the password from an error text, should it carry the URI.
fn scrub(text: &str, uri: &AMQPUri) -> String {
    let password = &uri.authority.userinfo.password;
    if password.is_empty() {
        text.to_string()
    } else {
        text.replace(password.as_str(), "***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        for failures in 1..40 {
            let d = backoff(failures);
            assert!(d <= RECONNECT_DELAY_MAX, "{d:?}");
            assert!(d >= RECONNECT_DELAY_MIN / 2, "{d:?}");
        }
    }

    #[test]
    fn password_file_and_heartbeat_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let config = BrokerConfig {
            urls: vec!["amqp://user:old@host:5672/%2f".into()],
            password_file: Some(file),
            ..BrokerConfig::default()
        };
        let targets = broker_targets(&config).unwrap();
        assert_eq!(targets[0].uri.authority.userinfo.password, "s3cret");
        assert_eq!(targets[0].uri.query.heartbeat, Some(10));
        assert!(!targets[0].shown.contains("old"));
        assert_eq!(scrub("bad s3cret here", &targets[0].uri), "bad *** here");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_failure_without_the_password() {
        let config = BrokerConfig {
            urls: vec!["amqp://user:hunter2@127.0.0.1:1/%2f".into()],
            connect_timeout: Duration::from_secs(2),
            ..BrokerConfig::default()
        };
        let mut connector = Connector::new(&config, "test").unwrap();
        let failure = connector.connect().await.err().unwrap();
        assert!(!failure.error.contains("hunter2"), "{failure:?}");
        assert!(!failure.url.contains("hunter2"), "{failure:?}");
    }
}
