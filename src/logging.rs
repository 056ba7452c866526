//! Logging: where the agent's log goes and in what form (docs/operations.md,
//! Logs).
//!
//! Role: install the one `tracing` subscriber of `edge-outbox run`, by
//! `log.format` and by where stderr goes:
//! - `json`: one JSON object per line on stderr;
//! - `auto`, stderr connected to journald: journald's native protocol
//!   (`tracing-journald`), so each entry carries its priority (ERROR 3,
//!   WARN 4, INFO 5, DEBUG 6, TRACE 7) and the event's fields as journal
//!   fields (`EO_MESSAGE_ID`, `EO_BROKER`, …);
//! - `auto` otherwise: plain lines on stderr, with timestamps.
//!
//! Invariants:
//! - stderr counts as journald only when `JOURNAL_STREAM` names the device
//!   and inode stderr has (systemd.exec(5)): a service whose stderr was
//!   redirected to a file keeps its lines in that file.
//! - When the journal's socket cannot be reached, the log goes to stderr
//!   (plain lines, no timestamps: journald adds them) and stderr says so,
//!   once.
//! - `RUST_LOG` wins over `log.level`; the AMQP library is limited to errors
//!   unless `RUST_LOG` says otherwise (the agent logs each returned message
//!   and channel close itself, once, with the message id).

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Prefix of the journal fields made from an event's fields: journald
/// reserves some names (`MESSAGE_ID` is a catalog id, not ours), and a prefix
/// keeps the agent's apart.
const JOURNAL_FIELD_PREFIX: &str = "EO";

/// Installs the subscriber; a second call does nothing.
pub(crate) fn init(config: &LogConfig) {
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(format!("{},lapin=error", config.level)))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let lines = || {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
    };
    let registry = tracing_subscriber::registry().with(filter());
    let _ = match (config.format, stderr_is_journal()) {
        (LogFormat::Json, _) => registry.with(lines().json().flatten_event(true)).try_init(),
        (LogFormat::Auto, false) => registry.with(lines()).try_init(),
        (LogFormat::Auto, true) => match tracing_journald::layer() {
            Ok(journal) => registry
                .with(journal.with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into())))
                .try_init(),
            Err(e) => {
                eprintln!(
                    "edge-outbox: cannot reach journald ({e}); logging to stderr without priorities"
                );
                registry.with(lines().without_time()).try_init()
            }
        },
    };
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of the stream systemd connected, compared with stderr's.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&value.to_string_lossy(), stat.st_dev, stat.st_ino)
}

fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert!(journal_stream_matches("8:1234", 8, 1234));
        assert!(!journal_stream_matches("8:1235", 8, 1234));
        assert!(!journal_stream_matches("9:1234", 8, 1234));
        for bad in ["", "1", "8:", ":1234", "a:b", "8:1234:5"] {
            assert!(!journal_stream_matches(bad, 8, 1234), "{bad:?}");
        }
    }
}
