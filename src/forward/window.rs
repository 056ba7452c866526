//! Window: the I/O half of the rows in flight (docs/forwarding.md,
//! Outcomes and In-flight window).
//!
//! Role: the futures the forwarder awaits for the rows it has sent: one
//! confirm future per publish (each bounded by `publish.confirm_timeout`),
//! the outcomes waiting to be handed to the store, and the commits in
//! progress. What a row's state is, and what an answer means, is the
//! [`Ledger`]'s (the pure core); this file only carries the futures.
//!
//! Invariants:
//! - Every confirm future resolves: an answer, an error, or its timeout.
//! - An outcome that cannot be committed leaves its row delivering: it is
//!   published again (a duplicate at worst, never a loss), and the ledger
//!   lets go of it either way once the commit has ended.
//!
//! The forwarder's `select!` polls `confirms`, `settling` and the backlog
//! (with `ledger`) at once, so those fields are visible to it: borrows of
//! distinct fields can coexist there, borrows through methods cannot.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::PublisherConfirm;

use super::ledger::{Ledger, Settle};
use super::outcome::ConfirmResult;
use crate::store::{PublishOutcome, RetryPolicy, Store, StoreError};

/// A confirm that came (or timed out), with what it is about.
pub(super) struct Confirmed {
    pub(super) sent_at: Instant,
    pub(super) id: String,
    /// Where the row went: the key of the failure digest.
    pub(super) exchange: String,
    pub(super) routing_key: String,
    /// The channel it was published on (see `Session::generation`).
    pub(super) generation: u64,
    pub(super) result: ConfirmResult,
}

type ConfirmFuture = Pin<Box<dyn Future<Output = Confirmed> + Send>>;
/// The rows of one commit of outcomes, and how the commit went.
pub(super) type Settled = (Vec<String>, Result<(), StoreError>);
type SettleFuture = Pin<Box<dyn Future<Output = Settled> + Send>>;

/// The rows in flight (see the module header).
pub(super) struct Window {
    pub(super) ledger: Ledger,
    pub(super) confirms: FuturesUnordered<ConfirmFuture>,
    pub(super) settling: FuturesUnordered<SettleFuture>,
    outcomes: Vec<PublishOutcome>,
}

/// Where one published row went and on which channel.
pub(super) struct Sent {
    pub(super) id: String,
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) generation: u64,
}

impl Window {
    pub(super) fn new(max_in_flight: usize) -> Window {
        Window {
            ledger: Ledger::new(max_in_flight),
            confirms: FuturesUnordered::new(),
            settling: FuturesUnordered::new(),
            outcomes: Vec::new(),
        }
    }

    /// Its publish went out: its confirm is awaited for at most `timeout`.
    pub(super) fn published(&mut self, sent: Sent, confirm: PublisherConfirm, timeout: Duration) {
        let sent_at = Instant::now();
        self.ledger
            .published(sent.id.clone(), sent.generation, sent_at);
        self.confirms.push(Box::pin(async move {
            let result = tokio::time::timeout(timeout, confirm).await;
            Confirmed {
                sent_at,
                id: sent.id,
                exchange: sent.exchange,
                routing_key: sent.routing_key,
                generation: sent.generation,
                result,
            }
        }));
    }

    /// A confirm that is already there, if any.
    pub(super) fn ready_confirm(&mut self) -> Option<Confirmed> {
        self.confirms.next().now_or_never().flatten()
    }

    /// An outcome the ledger decided: recorded at the next flush.
    pub(super) fn record(&mut self, settle: Settle) {
        self.outcomes.push(match settle {
            Settle::Delivered(id) => PublishOutcome::Delivered { id },
            Settle::Rejected(id, error) => PublishOutcome::Rejected { id, error },
        });
    }

    /// Hands the buffered outcomes to the store; their rows stay in the
    /// ledger until the commit (so no pass re-publishes a row being
    /// settled).
    pub(super) async fn flush(
        &mut self,
        store: &Store,
        policy: RetryPolicy,
    ) -> Result<(), StoreError> {
        if self.outcomes.is_empty() {
            return Ok(());
        }
        let outcomes = std::mem::take(&mut self.outcomes);
        let ids: Vec<String> = outcomes.iter().map(|o| outcome_id(o).to_string()).collect();
        let commit = store.record_outcomes(outcomes, policy).await?;
        self.settling
            .push(Box::pin(async move { (ids, commit.await) }));
        Ok(())
    }

    /// A commit of outcomes finished, `reads` backlog page reads in: its
    /// rows leave the ledger.
    pub(super) fn settled(&mut self, (ids, result): Settled, reads: u64) {
        if let Err(e) = result {
            // The rows stay delivering: they will be published again (a
            // duplicate at worst, never a loss).
            tracing::warn!(error = %e, rows = ids.len(), "could not record publish outcomes");
        }
        self.ledger.settled(ids.iter().map(String::as_str), reads);
    }

    /// The link is gone: the confirm futures are dropped (the ledger has
    /// already let go of their rows).
    pub(super) fn abandon(&mut self) {
        self.confirms = FuturesUnordered::new();
    }
}

fn outcome_id(outcome: &PublishOutcome) -> &str {
    match outcome {
        PublishOutcome::Delivered { id } | PublishOutcome::Rejected { id, .. } => id,
    }
}
