//! Link: the one reconnect driver, shared by the forwarder and the consumer
//! (docs/forwarding.md, Reconnecting; docs/consuming.md, Reconnecting).
//!
//! Role: everything between "no connection" and "connected and set up":
//! wait out the backoff, connect through the [`Connector`] (next URL of
//! `broker.urls` each attempt), run the caller's setup step on the new
//! connection (a confirm-mode channel for the forwarder; declarations and
//! `basic.consume` for the consumer), and account for failures. Plus
//! [`close`], the bounded clean close both callers use.
//!
//! Owns: the [`Connector`], the count of failed attempts since the link was
//! last up, the time the next attempt may start.
//!
//! The caller keeps its loop: [`Reconnect::wait_backoff`] and
//! [`Reconnect::connect`] are futures it puts in its own `select!` next to
//! shutdown and whatever side duties it serves while the broker is away
//! (the forwarder answers pass requests and watchdog probes). The driver
//! never sees a shutdown token.
//!
//! Invariants:
//! - No wait before the first attempt, nor after a link that stayed up for
//!   [`STABLE_LINK`]; after `n` failures in a row, `backoff(n)` (capped,
//!   jittered), or the longer wait the setup step asked for
//!   ([`SetupError::retry_after`]). A link lost sooner than [`STABLE_LINK`]
//!   counts as a failure ([`Reconnect::lost`]), so a broker that accepts a
//!   connection and then drops it (or closes it because of what we sent)
//!   is never reconnected to in a hot loop.
//! - [`Reconnect::wait_backoff`] is cancel-safe: the next attempt's time is
//!   fixed when the failure happens, so a `select!` that polls it again
//!   and again waits once, not from scratch each time.
//! - Every step is bounded: the connection by `broker.connect_timeout` (in
//!   the [`Connector`]), the setup step by `broker.connect_timeout` again,
//!   [`close`] by [`CLOSE_WAIT`].
//! - A connection whose setup failed is closed before the next attempt.
//! - Every failure is counted in the caller's counter when it gave one
//!   ([`Reconnect::counting_failures`]) and logged with the caller's role
//!   and the redacted URL, at most once per URL per
//!   [`crate::digest::PERIOD`] (the lines in between are counted into the
//!   next one), so a week offline is a few thousand lines, not millions.

use std::time::Duration;

use lapin::Connection;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::{backoff, ConnectFailure, Connector};
use crate::digest::Digest;

/// A link that lived at least this long was healthy: losing it starts the
/// backoff over. One lost sooner counts as a failed attempt.
pub(crate) const STABLE_LINK: Duration = Duration::from_secs(10);

/// How long a clean close may take before the connection is just dropped:
/// a broker that does not answer must not hold up shutdown or a reconnect.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A failed setup step, as the caller words it.
#[derive(Debug, Clone)]
pub(crate) struct SetupError {
    /// For logs and the caller's status (no password in it).
    error: String,
    /// Wait this long before the next attempt instead of the backoff: for a
    /// failure only an operator can fix (a refused declaration), so a
    /// retry is no hot loop.
    retry_after: Option<Duration>,
}

impl SetupError {
    /// A failure retried after the usual backoff.
    pub(crate) fn new(error: impl Into<String>) -> SetupError {
        SetupError {
            error: error.into(),
            retry_after: None,
        }
    }

    /// The next attempt waits `wait` instead of the backoff.
    pub(crate) fn retry_after(mut self, wait: Duration) -> SetupError {
        self.retry_after = Some(wait);
        self
    }
}

/// A connection that is up and set up.
pub(crate) struct Linked<T> {
    pub(crate) connection: Connection,
    /// The redacted URL it goes to.
    pub(crate) url: String,
    /// What the setup step returned (the channel, the consumer, ...).
    pub(crate) setup: T,
}

/// The reconnect driver of one connection (see the module header).
pub(crate) struct Reconnect {
    connector: Connector,
    /// Failed attempts since the link was last up: sets the backoff.
    failures: u32,
    /// When the next attempt may start; `None`: at once.
    next_attempt: Option<Instant>,
    /// Counts failed attempts in `/metrics`, for the callers that report them.
    failure_counter: Option<Counter>,
    /// When the current link came up; `None` while down.
    up_since: Option<Instant>,
    /// Failure lines per URL, so a long outage logs a line per period.
    warnings: Digest<String>,
}

impl Reconnect {
    pub(crate) fn new(connector: Connector) -> Reconnect {
        Reconnect {
            connector,
            failures: 0,
            next_attempt: None,
            failure_counter: None,
            up_since: None,
            warnings: Digest::default(),
        }
    }

    /// Every failed attempt also increments `counter`.
    pub(crate) fn counting_failures(mut self, counter: Counter) -> Reconnect {
        self.failure_counter = Some(counter);
        self
    }

    /// `broker.connect_timeout`, for setup steps the caller repeats on a
    /// live connection (reopening a channel).
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connector.connect_timeout()
    }

    /// Waits until the next attempt may start: at once before the first
    /// attempt and after a link that was up, else the backoff fixed at the
    /// last failure. Cancel-safe (see the module header).
    pub(crate) async fn wait_backoff(&self) {
        if let Some(at) = self.next_attempt {
            tokio::time::sleep_until(at).await;
        }
    }

    /// One attempt: connects to the next URL, then runs `setup` on the new
    /// connection, bounded by `broker.connect_timeout`. `setup` is an async
    /// closure: it borrows the connection, and may borrow the caller's own
    /// fields (its configuration) next to this driver. `step` names the
    /// setup step in the failure of a setup that timed out.
    ///
    /// On failure the connection (if any) is closed, the failure is logged
    /// and counted, the next attempt's time is fixed, and the failure is
    /// returned for the caller's status. On success the backoff starts over.
    ///
    /// Cancelling it (on shutdown) drops a half-made connection, which
    /// lapin then closes.
    pub(crate) async fn connect<T, F>(
        &mut self,
        step: &str,
        setup: F,
    ) -> Result<Linked<T>, ConnectFailure>
    where
        F: AsyncFnOnce(&Connection) -> Result<T, SetupError>,
    {
        let connected = match self.connector.connect().await {
            Ok(connected) => connected,
            Err(failure) => return Err(self.failed(failure, None)),
        };
        let done = tokio::time::timeout(
            self.connector.connect_timeout(),
            setup(&connected.connection),
        )
        .await;
        let (failure, retry_after) = match done {
            Ok(Ok(setup)) => {
                self.up_since = Some(Instant::now());
                self.next_attempt = None;
                return Ok(Linked {
                    connection: connected.connection,
                    url: connected.url,
                    setup,
                });
            }
            Ok(Err(e)) => (connected.failure(e.error), e.retry_after),
            Err(_) => (connected.failure(format!("{step}: timed out")), None),
        };
        close(&connected.connection, "setup failed").await;
        Err(self.failed(failure, retry_after))
    }

    /// The caller's link is gone. A link that was up for [`STABLE_LINK`]
    /// reconnects at once with the backoff started over; one lost sooner
    /// counts as one more failure and waits its backoff.
    pub(crate) fn lost(&mut self) {
        let stable = self
            .up_since
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE_LINK);
        if stable {
            self.failures = 0;
            self.next_attempt = None;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.next_attempt = Some(Instant::now() + backoff(self.failures));
        }
    }

    fn failed(&mut self, failure: ConnectFailure, retry_after: Option<Duration>) -> ConnectFailure {
        self.failures = self.failures.saturating_add(1);
        let wait = retry_after.unwrap_or_else(|| backoff(self.failures));
        self.next_attempt = Some(Instant::now() + wait);
        if let Some(counter) = &self.failure_counter {
            counter.inc();
        }
        let now = std::time::Instant::now();
        for (url, count) in self.warnings.due(now) {
            tracing::warn!(role = self.connector.role, broker = %url, count,
                "cannot connect to the broker (attempts since the last line)");
        }
        if let Some(count) = self.warnings.note(&failure.url, now) {
            tracing::warn!(role = self.connector.role, broker = %failure.url, error = %failure.error,
                failures = self.failures, count, "cannot connect to the broker");
        }
        failure
    }
}

/// Closes `connection` cleanly, waiting at most [`CLOSE_WAIT`]; a broker
/// that does not answer in time gets the connection dropped instead.
pub(crate) async fn close(connection: &Connection, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_WAIT, connection.close(200, reason.into())).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BrokerConfig;

    fn unreachable() -> Reconnect {
        let config = BrokerConfig {
            urls: vec!["amqp://user:pw@127.0.0.1:1/%2f".into()],
            connect_timeout: Duration::from_secs(2),
            ..BrokerConfig::default()
        };
        Reconnect::new(Connector::new(&config, "test").unwrap())
    }

    #[tokio::test]
    async fn the_first_attempt_does_not_wait() {
        let reconnect = unreachable();
        let started = std::time::Instant::now();
        reconnect.wait_backoff().await;
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_failure_is_counted_and_backs_off() {
        let counter = Counter::default();
        let mut reconnect = unreachable().counting_failures(counter.clone());
        // A setup step may borrow what its caller owns, as the consumer's
        // borrows its configuration.
        let queue = String::from("q");
        let failure = reconnect
            .connect("setup", async |_: &Connection| Ok(queue.len()))
            .await
            .err()
            .unwrap();
        assert!(!failure.error.contains("pw"), "{failure:?}");
        assert_eq!(counter.get(), 1);
        assert_eq!(reconnect.failures, 1);
        // backoff(1) is jittered within (0, RECONNECT_DELAY_MIN].
        let wait = reconnect.next_attempt.unwrap() - Instant::now();
        assert!(
            wait <= crate::broker::RECONNECT_DELAY_MIN && wait > Duration::ZERO,
            "{wait:?}"
        );
    }

    #[tokio::test]
    async fn wait_backoff_keeps_its_deadline_across_cancellations() {
        let mut reconnect = unreachable();
        let wait = Duration::from_millis(400);
        reconnect.next_attempt = Some(Instant::now() + wait);
        let started = Instant::now();
        // Polled again and again from a select!, it still wakes at the
        // deadline: neither at the first tick nor never.
        let mut ticks = 0;
        loop {
            tokio::select! {
                _ = reconnect.wait_backoff() => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => ticks += 1,
            }
        }
        assert!(started.elapsed() >= wait, "{:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(ticks >= 2, "{ticks}");
    }

    #[test]
    fn setup_error_can_ask_for_a_longer_wait() {
        let e = SetupError::new("refused").retry_after(Duration::from_secs(60));
        assert_eq!(e.retry_after, Some(Duration::from_secs(60)));
        assert_eq!(SetupError::new("x").retry_after, None);
    }
}
