//! What the forwarder knows about the exchanges it publishes to. A pure
//! core: no I/O, no clock (docs/forwarding.md, "Missing exchanges").
//!
//! Role: publishing to an exchange that does not exist makes the broker
//! close the channel (404), and with it lose the confirms of every other
//! message on that channel. So before the first publish to an exchange the
//! forwarder asks the broker (a passive declare on a side channel) and
//! remembers the answer: a row for a missing exchange is charged an
//! attempt with the broker's own 404 reply and never published, and the
//! publishing channel never sees that 404.
//!
//! Invariants:
//! - The default exchange (`""`) always exists; nothing is asked for it.
//! - "Missing" is believed for [`MISSING_FOR`] only, so an exchange created
//!   later is used within that time and an attempt is charged only on a
//!   fresh refusal; "exists" is believed for [`EXISTS_FOR`] (an exchange
//!   deleted meanwhile closes the channel once, and the isolation of
//!   `ledger` handles that; the cache entry is then dropped).
//! - Memory is bounded: at most [`MAX_ENTRIES`] exchanges are remembered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a 404 from a passive declare is believed.
pub(crate) const MISSING_FOR: Duration = Duration::from_secs(2);
/// How long a successful passive declare is believed.
pub(crate) const EXISTS_FOR: Duration = Duration::from_secs(60);
/// Exchanges remembered at most (the oldest answers are forgotten first).
pub(crate) const MAX_ENTRIES: usize = 4096;

/// What is known of one exchange now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Known {
    /// Publish.
    Exists,
    /// Charge the row an attempt with this reply; do not publish.
    Missing(String),
    /// Ask the broker first.
    Unknown,
}

#[derive(Debug, Clone)]
struct Answer {
    missing: Option<String>,
    at: Instant,
}

/// The exchanges the forwarder has asked about, and their answers.
#[derive(Debug, Default)]
pub(crate) struct Exchanges {
    answers: HashMap<String, Answer>,
}

impl Exchanges {
    pub(crate) fn lookup(&self, exchange: &str, now: Instant) -> Known {
        if exchange.is_empty() {
            return Known::Exists;
        }
        let Some(answer) = self.answers.get(exchange) else {
            return Known::Unknown;
        };
        let age = now.saturating_duration_since(answer.at);
        match &answer.missing {
            None if age < EXISTS_FOR => Known::Exists,
            Some(reply) if age < MISSING_FOR => Known::Missing(reply.clone()),
            _ => Known::Unknown,
        }
    }

    /// The broker answered a passive declare: `None` it exists,
    /// `Some(reply)` its 404 reply.
    pub(crate) fn answered(&mut self, exchange: &str, missing: Option<String>, now: Instant) {
        if self.answers.len() >= MAX_ENTRIES && !self.answers.contains_key(exchange) {
            self.evict_oldest();
        }
        self.answers
            .insert(exchange.to_string(), Answer { missing, at: now });
    }

    /// Forget every answer (an exchange was deleted under us, or the
    /// connection is new and the broker may have changed).
    pub(crate) fn forget_all(&mut self) {
        self.answers.clear();
    }

    fn evict_oldest(&mut self) {
        if let Some(oldest) = self
            .answers
            .iter()
            .min_by_key(|(_, a)| a.at)
            .map(|(name, _)| name.clone())
        {
            self.answers.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_exchange_always_exists() {
        assert_eq!(
            Exchanges::default().lookup("", Instant::now()),
            Known::Exists
        );
    }

    #[test]
    fn answers_are_believed_for_their_time() {
        let mut e = Exchanges::default();
        let t = Instant::now();
        assert_eq!(e.lookup("x", t), Known::Unknown);
        e.answered("x", Some("404 NOT_FOUND - no exchange 'x'".into()), t);
        assert!(
            matches!(e.lookup("x", t + Duration::from_millis(500)), Known::Missing(r) if r.starts_with("404"))
        );
        assert_eq!(e.lookup("x", t + MISSING_FOR), Known::Unknown);
        e.answered("y", None, t);
        assert_eq!(
            e.lookup("y", t + EXISTS_FOR - Duration::from_millis(1)),
            Known::Exists
        );
        assert_eq!(e.lookup("y", t + EXISTS_FOR), Known::Unknown);
        e.forget_all();
        assert_eq!(e.lookup("y", t), Known::Unknown);
    }

    #[test]
    fn memory_is_bounded() {
        let mut e = Exchanges::default();
        let t = Instant::now();
        for n in 0..MAX_ENTRIES + 10 {
            e.answered(&format!("x{n}"), None, t + Duration::from_millis(n as u64));
        }
        assert_eq!(e.answers.len(), MAX_ENTRIES);
        assert_eq!(e.lookup("x0", t + Duration::from_secs(1)), Known::Unknown);
    }
}
