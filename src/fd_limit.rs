//! File descriptors: the agent's budget under `RLIMIT_NOFILE`
//! (docs/operations.md, File descriptors).
//!
//! Role: at start, before anything is opened, raise the soft limit to the
//! hard one (outside systemd the soft limit is usually 1024, the default
//! `submit.max_connections`), set aside what everything but the submit
//! connections needs ([`Reserve`]), and clamp `submit.max_connections` to
//! what is left, with a warning naming both numbers.
//!
//! Invariants:
//! - A flood of clients can take at most `submit.max_connections`
//!   descriptors (one each); the reserve stays free for the broker
//!   connections, the database, the metrics endpoint and the handlers, so
//!   a reconnect never fails with "Too many open files" because of clients.
//! - The limit is only ever raised, never lowered; the hard limit is left
//!   as it is (raising it needs privileges the agent does not have under
//!   its systemd unit).
//! - A client beyond the limit is still answered `buffer_full`, by the
//!   submit server (docs/protocol.md, Connection limit); the clamp only
//!   makes that the normal path instead of `EMFILE`.

use std::num::NonZeroUsize;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::config::{Config, HandlerKind};

/// Descriptors the process holds whatever it does: stdin, stdout, stderr
/// (3); the runtime's epoll and waker (2); the signal handlers' pipe (2);
/// the submit listener (1); the spare the submit server keeps to answer a
/// client while out of descriptors (1); a refused client, answered and
/// closed at once (1); the systemd notification socket (1); files read
/// while connecting (password, TLS CA, certificate, key: 4). 15, rounded up.
const PROCESS: u64 = 16;
/// Per broker connection: its socket; during a reconnect the old socket
/// may not be closed yet when the new one opens; a DNS lookup opens a
/// socket and reads `/etc/hosts` and `/etc/resolv.conf`.
const PER_BROKER_CONNECTION: u64 = 4;
/// The database: the writer's file and WAL (2), the shared-memory file
/// (1, shared by every connection of the process), the lock file (1), four
/// pooled readers' file and WAL (8), SQLite's temporary files for large
/// sorts (2). 14, rounded up.
const DATABASE: u64 = 16;
/// The metrics endpoint: its listener and the scrapes being served.
const METRICS: u64 = 8;
/// Per running `exec` handler: its stdin and stderr pipes, both ends while
/// it is spawned (4), the pipe that reports a failed exec (2), the pidfd
/// that reaps it (1). Handlers run at once: `consumer.prefetch`.
const PER_HANDLER: u64 = 7;

/// What the agent sets aside for everything but the submit connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reserve {
    pub(crate) broker: u64,
    pub(crate) database: u64,
    pub(crate) metrics: u64,
    pub(crate) handlers: u64,
}

impl Reserve {
    /// The reserve `config` needs: only what it turns on is counted.
    pub(crate) fn for_config(config: &Config) -> Reserve {
        let consumer = config.consumer.queue.is_some();
        let broker_connections = if consumer { 2 } else { 1 };
        let handlers = if consumer && config.consumer.handler == HandlerKind::Exec {
            PER_HANDLER * u64::from(config.consumer.prefetch.get())
        } else {
            0
        };
        Reserve {
            broker: PER_BROKER_CONNECTION * broker_connections,
            database: DATABASE,
            metrics: if config.metrics.listen.is_some() {
                METRICS
            } else {
                0
            },
            handlers,
        }
    }

    pub(crate) fn total(&self) -> u64 {
        PROCESS + self.broker + self.database + self.metrics + self.handlers
    }
}

/// The soft limit before and after [`raise_soft_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Raised {
    pub(crate) before: Option<u64>,
    /// The limit in force; `None`: unlimited.
    pub(crate) now: Option<u64>,
    /// Why the soft limit could not be raised, if it could not.
    pub(crate) error: Option<rustix::io::Errno>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub(crate) fn raise_soft_limit() -> Raised {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    let target = match (limit.current, limit.maximum) {
        // Linux never reports an unlimited hard limit for descriptors (it
        // is bounded by fs.nr_open); if it did, asking for it would fail.
        (_, None) => None,
        (Some(soft), Some(hard)) if soft < hard => Some(hard),
        _ => None,
    };
    let Some(target) = target else {
        return Raised {
            before,
            now: before,
            error: None,
        };
    };
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => Raised {
            before,
            now: getrlimit(Resource::Nofile).current,
            error: None,
        },
        Err(e) => Raised {
            before,
            now: before,
            error: Some(e),
        },
    }
}

/// `max_connections` if the limit leaves room for it beside `reserve`,
/// else what is left (at least 1: a limit that low is reported, and the
/// submit server answers `buffer_full` when even that one cannot be had).
pub(crate) fn clamp(
    max_connections: NonZeroUsize,
    limit: Option<u64>,
    reserve: u64,
) -> NonZeroUsize {
    let Some(limit) = limit else {
        return max_connections;
    };
    let room = usize::try_from(limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
    NonZeroUsize::new(room.min(max_connections.get())).unwrap_or(NonZeroUsize::MIN)
}

/// Raises the limit, clamps `config.submit.max_connections` to it and logs
/// what it did: a warning when a limit could not be raised or the
/// configured connections do not fit.
pub(crate) fn apply(config: &mut Config) {
    let raised = raise_soft_limit();
    if let Some(error) = raised.error {
        tracing::warn!(
            limit = ?raised.before,
            error = %error,
            "cannot raise the soft file descriptor limit (RLIMIT_NOFILE) to the hard limit"
        );
    } else if raised.before != raised.now {
        tracing::debug!(
            from = ?raised.before,
            to = ?raised.now,
            "raised the soft file descriptor limit (RLIMIT_NOFILE) to the hard limit"
        );
    }
    let reserve = Reserve::for_config(config);
    let configured = config.submit.max_connections;
    let allowed = clamp(configured, raised.now, reserve.total());
    if allowed != configured {
        tracing::warn!(
            max_connections = configured.get(),
            allowed = allowed.get(),
            "submit.max_connections = {configured} does not fit the file descriptor limit \
             (RLIMIT_NOFILE {limit}, {reserved} set aside for the broker, the database, \
             metrics and handlers): serving at most {allowed} connections at once; raise \
             the hard limit (LimitNOFILE=, ulimit -Hn) to serve more",
            limit = raised.now.unwrap_or(0),
            reserved = reserve.total(),
        );
        config.submit.max_connections = allowed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn n(v: usize) -> NonZeroUsize {
        NonZeroUsize::new(v).unwrap()
    }

    #[test]
    fn the_reserve_counts_only_what_the_configuration_turns_on() {
        let mut config = Config::default();
        let plain = Reserve::for_config(&config);
        assert_eq!(plain.metrics, 0);
        assert_eq!(plain.handlers, 0);
        assert_eq!(plain.total(), PROCESS + PER_BROKER_CONNECTION + DATABASE);

        config.metrics.listen = Some("127.0.0.1:9464".parse().unwrap());
        config.consumer.queue = Some("q".into());
        config.consumer.handler = HandlerKind::Exec;
        config.consumer.prefetch = std::num::NonZeroU16::new(10).unwrap();
        let full = Reserve::for_config(&config);
        assert_eq!(full.broker, 2 * PER_BROKER_CONNECTION);
        assert_eq!(full.metrics, METRICS);
        assert_eq!(full.handlers, 10 * PER_HANDLER);
    }

    #[test]
    fn connections_are_clamped_to_what_the_reserve_leaves() {
        assert_eq!(clamp(n(1024), Some(1024), 36), n(988));
        assert_eq!(clamp(n(1024), Some(8192), 36), n(1024));
        assert_eq!(clamp(n(1024), None, 36), n(1024));
        assert_eq!(clamp(n(5), Some(30), 36), n(1));
    }

    /// Only ever raised: a second call changes nothing, and the limit in
    /// force is the hard one when the process may raise it.
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let first = raise_soft_limit();
        let limit = getrlimit(Resource::Nofile);
        if first.error.is_none() {
            assert_eq!(limit.current, limit.maximum.or(limit.current));
        }
        let again = raise_soft_limit();
        assert_eq!(again.before, again.now);
        assert!(again.now >= first.before);
    }
}
