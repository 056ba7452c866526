//! Stop: the account of what an orderly stop waited for.
//!
//! Role: the components that drain on shutdown note here what they waited
//! for, so the wiring can say it in one log line when the agent has
//! stopped (docs/operations.md, Signals and shutdown):
//! `edge-outbox stopped` with `connections` (connections answered and
//! closed), `confirms` (confirms outstanding when the forwarder stopped
//! publishing), `unconfirmed` (those still unanswered when its wait ended)
//! and `duration_ms` (from the signal to the store closed).
//!
//! Owns only counters: writing one never blocks a stop, and a component
//! that never notes anything leaves its figure at 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the stop waited for; shared by the submit server, the forwarder
/// and the wiring.
#[derive(Debug, Default)]
pub(crate) struct StopTally {
    connections: AtomicU64,
    confirms: AtomicU64,
    unconfirmed: AtomicU64,
}

/// A figure of [`StopTally`], read at the end of the stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StopFigures {
    pub(crate) connections: u64,
    pub(crate) confirms: u64,
    pub(crate) unconfirmed: u64,
}

impl StopTally {
    pub(crate) fn new() -> Arc<StopTally> {
        Arc::new(StopTally::default())
    }

    /// A connection open when the stop began got its last answers and was closed.
    pub(crate) fn connection_answered(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The forwarder stopped publishing with `outstanding` confirms to wait
    /// for; `left` of them were still unanswered when its wait ended.
    pub(crate) fn confirms_awaited(&self, outstanding: u64, left: u64) {
        self.confirms.fetch_add(outstanding, Ordering::Relaxed);
        self.unconfirmed.fetch_add(left, Ordering::Relaxed);
    }

    pub(crate) fn figures(&self) -> StopFigures {
        StopFigures {
            connections: self.connections.load(Ordering::Relaxed),
            confirms: self.confirms.load(Ordering::Relaxed),
            unconfirmed: self.unconfirmed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_add_up_what_was_noted() {
        let tally = StopTally::new();
        assert_eq!(
            tally.figures(),
            StopFigures {
                connections: 0,
                confirms: 0,
                unconfirmed: 0
            }
        );
        tally.connection_answered();
        tally.connection_answered();
        tally.confirms_awaited(120, 3);
        assert_eq!(
            tally.figures(),
            StopFigures {
                connections: 2,
                confirms: 120,
                unconfirmed: 3
            }
        );
    }
}
