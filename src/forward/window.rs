//! Window: the rows in flight, from their publish to a recorded outcome
//! (docs/forwarding.md, Outcomes).
//!
//! Role: the forwarder's bookkeeping of what it has sent and not yet
//! settled, so that no row is published twice at once and no row is
//! forgotten: the confirms being awaited, the outcomes waiting to be handed
//! to the store, and the commits in progress.
//!
//! Owns: the in-flight set and the part of it still awaiting a confirm,
//! the confirm futures (each bounded by `publish.confirm_timeout`), the
//! outcome buffer, the commit futures.
//!
//! Invariants:
//! - A row is in `in_flight` from [`Window::publishing`] until its outcome
//!   is committed ([`Window::settled`]), is known to be unknown
//!   ([`Window::unknown`]), its publish did not go out, or the link is
//!   lost; the backlog skips the rows in it.
//! - `awaiting_confirm` is the part of `in_flight` with a confirm future in
//!   `confirms`; [`Window::abandon`] drops both together.
//! - An outcome that cannot be committed leaves its row delivering: it is
//!   published again (a duplicate at worst, never a loss).
//!
//! The forwarder's `select!` polls `confirms`, `settling` and the backlog
//! (with `in_flight`) at once, so those fields are visible to it: borrows
//! of distinct fields can coexist there, borrows through methods cannot.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::PublisherConfirm;

use super::outcome::ConfirmResult;
use crate::store::{PublishOutcome, RetryPolicy, Store, StoreError};

/// A confirm that came (or timed out), with what it is about.
pub(super) struct Confirmed {
    pub(super) sent_at: Instant,
    pub(super) id: String,
    pub(super) exchange: String,
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
    /// Rows published and not settled: awaiting a confirm or its commit.
    pub(super) in_flight: HashSet<String>,
    /// The part of `in_flight` still awaiting a confirm.
    awaiting_confirm: HashSet<String>,
    pub(super) confirms: FuturesUnordered<ConfirmFuture>,
    pub(super) settling: FuturesUnordered<SettleFuture>,
    outcomes: Vec<PublishOutcome>,
}

impl Window {
    pub(super) fn new() -> Window {
        Window {
            in_flight: HashSet::new(),
            awaiting_confirm: HashSet::new(),
            confirms: FuturesUnordered::new(),
            settling: FuturesUnordered::new(),
            outcomes: Vec::new(),
        }
    }

    /// Confirms being awaited: the window `publish.max_in_flight` bounds.
    pub(super) fn awaiting(&self) -> usize {
        self.confirms.len()
    }

    /// A row is about to be published.
    pub(super) fn publishing(&mut self, id: &str) {
        self.in_flight.insert(id.to_string());
        self.awaiting_confirm.insert(id.to_string());
    }

    /// Its publish went out: its confirm is awaited for at most `timeout`.
    pub(super) fn published(
        &mut self,
        id: String,
        exchange: String,
        generation: u64,
        confirm: PublisherConfirm,
        timeout: Duration,
    ) {
        let sent_at = Instant::now();
        self.confirms.push(Box::pin(async move {
            let result = tokio::time::timeout(timeout, confirm).await;
            Confirmed {
                sent_at,
                id,
                exchange,
                generation,
                result,
            }
        }));
    }

    /// Its publish did not go out: it is due again.
    pub(super) fn not_published(&mut self, id: &str) {
        self.in_flight.remove(id);
        self.awaiting_confirm.remove(id);
    }

    /// A confirm that is already there, if any.
    pub(super) fn ready_confirm(&mut self) -> Option<Confirmed> {
        self.confirms.next().now_or_never().flatten()
    }

    /// A confirm says what became of its row: recorded at the next flush.
    pub(super) fn record(&mut self, outcome: PublishOutcome) {
        self.awaiting_confirm.remove(outcome_id(&outcome));
        self.outcomes.push(outcome);
    }

    /// A confirm left the outcome unknown: the row is due again at once.
    pub(super) fn unknown(&mut self, id: &str) {
        self.awaiting_confirm.remove(id);
        self.in_flight.remove(id);
    }

    /// Hands the buffered outcomes to the store; their rows stay in flight
    /// until the commit (so no pass re-publishes a row being settled).
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

    /// A commit of outcomes finished: its rows leave the window.
    pub(super) fn settled(&mut self, (ids, result): Settled) {
        if let Err(e) = result {
            // The rows stay delivering: they will be published again (a
            // duplicate at worst, never a loss).
            tracing::warn!(error = %e, rows = ids.len(), "could not record publish outcomes");
        }
        for id in ids {
            self.in_flight.remove(&id);
        }
    }

    /// The link is gone: every confirm still awaited is abandoned and its
    /// row is due again (no attempt counted). Returns how many there were.
    /// Outcomes already known stay buffered, to be recorded.
    pub(super) fn abandon(&mut self) -> usize {
        let unknown = self.confirms.len();
        // Dropping the futures abandons the confirms.
        self.confirms = FuturesUnordered::new();
        for id in self.awaiting_confirm.drain() {
            self.in_flight.remove(&id);
        }
        unknown
    }
}

fn outcome_id(outcome: &PublishOutcome) -> &str {
    match outcome {
        PublishOutcome::Delivered { id } | PublishOutcome::Rejected { id, .. } => id,
    }
}
