//! Side: what the forwarder asks the broker on channels other than the
//! publishing one (docs/forwarding.md, Connection and Isolating a message
//! the broker refuses), and the pacing of channel reopens.
//!
//! Role: a passive declare before the first publish to an exchange
//! ([`check_exchange`]), a liveness probe before a confirm timeout is
//! charged ([`link_alive`]), the agent's own consumer topology declared
//! before anything is published ([`declare_own_topology`]). Each uses a
//! short-lived channel of its own, so a refusal (which closes the channel
//! it happens on) never touches the publishing channel and the confirms
//! of the messages on it.
//!
//! Invariants: every call is bounded by the timeout it is given; none
//! panics or fails the link: an error is an answer ("unknown") for the
//! caller to weigh.

use std::time::{Duration, Instant};

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};

use super::outcome::{blames_a_message, broker_close};
use crate::config::ConsumerConfig;

/// Asks the broker whether `exchange` may be published to: `Some(None)`
/// yes, `Some(Some(reply))` the broker's refusal (404 no such exchange,
/// 403 access refused), `None` no answer in time or the link failed.
pub(crate) async fn check_exchange(
    connection: &Connection,
    exchange: &str,
    timeout: Duration,
) -> Option<Option<String>> {
    let ask = async {
        let channel = connection.create_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let declared = channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(()) => {
                let _ = channel.close(200, "checked".into()).await;
                Ok(None)
            }
            Err(e) => match broker_close(&e) {
                Some(close) if blames_a_message(close.code) => {
                    Ok(Some(format!("{close} (asked with a passive declare)")))
                }
                _ => Err(e),
            },
        }
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(answer)) => Some(answer),
        Ok(Err(e)) => {
            tracing::debug!(exchange, error = %e, "no answer about the exchange");
            None
        }
        Err(_) => None,
    }
}

/// Whether the broker answers on this connection now: opening a channel
/// needs its `channel.open-ok`. Any answer, even a refusal, proves the link.
pub(crate) async fn link_alive(connection: &Connection, timeout: Duration) -> bool {
    let probe = async {
        match connection.create_channel().await {
            Ok(channel) => {
                let _ = channel.close(200, "probe".into()).await;
                true
            }
            Err(e) => broker_close(&e).is_some(),
        }
    };
    tokio::time::timeout(timeout, probe).await.unwrap_or(false)
}

/// Declares the agent's own consumer topology (its exchanges, queue and
/// bindings) so that the forwarder never publishes to it before it exists.
/// A refusal is logged and publishing goes on: the consumer reports it too.
pub(crate) async fn declare_own_topology(
    connection: &Connection,
    queue: &str,
    consumer: &ConsumerConfig,
) {
    let declared = async {
        let channel = connection.create_channel().await?;
        crate::consume::topology::declare(&channel, queue, consumer).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok::<(), lapin::Error>(())
    };
    if let Err(e) = declared.await {
        tracing::warn!(queue, error = %e, "could not declare the consumer's topology before publishing");
    }
}

/// Waits (bounded) until a channel the broker closed has finished closing
/// (its close-ok sent), so no frame meant for it can follow.
pub(crate) async fn until_closed(channel: &Channel) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while channel.status().closing() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Pauses between reopens of the publishing channel: none after a calm
/// spell, then growing (50 ms doubling to 5 s) while closes come in a row.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    /// Reopens in a row, each within [`CALM`] of the last.
    in_a_row: u32,
    last: Option<Instant>,
}

/// Reopens further apart than this are not "in a row".
const CALM: Duration = Duration::from_secs(10);
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(5);

impl Pace {
    /// A close was explained (pinned on a message): the next reopen is
    /// not part of a flapping run.
    pub(crate) fn calm(&mut self) {
        self.in_a_row = 0;
        self.last = None;
    }

    /// The pause before the reopen happening now.
    pub(crate) fn next_delay(&mut self, now: Instant) -> Duration {
        let calm = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= CALM);
        self.in_a_row = if calm { 0 } else { self.in_a_row + 1 };
        self.last = Some(now);
        if self.in_a_row == 0 {
            return Duration::ZERO;
        }
        FIRST_PAUSE
            .saturating_mul(1 << (self.in_a_row - 1).min(16))
            .min(MAX_PAUSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_in_a_row_pause_longer_and_a_calm_spell_resets() {
        let mut pace = Pace::default();
        let t = Instant::now();
        assert_eq!(pace.next_delay(t), Duration::ZERO);
        assert_eq!(pace.next_delay(t + Duration::from_millis(10)), FIRST_PAUSE);
        assert_eq!(
            pace.next_delay(t + Duration::from_millis(20)),
            FIRST_PAUSE * 2
        );
        let mut later = t;
        for _ in 0..20 {
            later += Duration::from_millis(100);
            assert!(pace.next_delay(later) <= MAX_PAUSE);
        }
        assert_eq!(pace.next_delay(later + CALM), Duration::ZERO);
        pace.next_delay(later + CALM + Duration::from_millis(1));
        pace.calm();
        assert_eq!(
            pace.next_delay(later + CALM + Duration::from_millis(2)),
            Duration::ZERO
        );
    }
}
