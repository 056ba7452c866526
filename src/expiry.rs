//! Expiry: rows past their expiry become failed, `last_error = "expired"`
//! (docs/forwarding.md, Expiry).
//!
//! Role: a message submitted with a `ttl`, or while `publish.max_age` is
//! set, has an expiry time (`msg_log.expire_time`). Once it has passed, the
//! row is never published: the forwarder's pages leave it out, the
//! forwarder checks it again just before a publish, and this sweep moves it
//! to failed through the store's writer, whether the broker is reachable or
//! not. Owns the sweep's pace and its batch size.
//!
//! Invariants:
//! - An expired row is settled, never deleted: it stays for `list`,
//!   `retry` and the purge's `failed_retention` like any failed row.
//! - The move is the one `TRANSITIONS` allows (delivering → failed); a row
//!   already settled is never touched.
//! - At most [`BATCH`] rows per transaction, so a submit waits for one
//!   small batch at most, as with the purge.
//! - The sweep does not depend on the broker: it runs while disconnected.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// How often the sweep looks for expired rows: an expired row stays
/// delivering (but unpublished) for at most about this long.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Rows moved per transaction.
const BATCH: u32 = 1000;

/// The periodic expiry sweep of the running agent.
pub(crate) struct Expiry {
    store: Store,
    metrics: Arc<Metrics>,
}

impl Expiry {
    pub(crate) fn new(store: Store, metrics: Arc<Metrics>) -> Self {
        Expiry { store, metrics }
    }

    /// One whole sweep, batch after batch; returns how many rows expired.
    pub(crate) async fn run_once(&self) -> Result<u64, StoreError> {
        let mut expired = 0;
        loop {
            let moved = self.store.expire_batch(BATCH).await?;
            expired += moved;
            self.metrics.expired.inc_by(moved);
            if moved < u64::from(BATCH) {
                break;
            }
        }
        if expired > 0 {
            tracing::info!(
                expired,
                "messages expired before they could be published; marked failed (\"expired\")"
            );
        }
        Ok(expired)
    }

    /// Sweeps every [`SWEEP_EVERY`] until `shutdown`. A failed sweep is
    /// logged (once until one succeeds) and tried again: expiry must not
    /// stop the agent, and the rows stay unpublished meanwhile.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            match self.run_once().await {
                Ok(_) => failing = false,
                Err(StoreError::Closed) => return Ok(()),
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "expiry sweep failed; trying again");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;
    use crate::store::{NewMessage, Status, EXPIRED};

    /// More expired rows than one batch: one sweep takes them all, counts
    /// them in the metric, and the next finds none.
    #[tokio::test]
    async fn one_sweep_expires_every_row_past_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StoreConfig {
            path: dir.path().join("t.db"),
            ..StoreConfig::default()
        })
        .unwrap();
        let total = u64::from(BATCH) + 5;
        let mut pending = Vec::new();
        for i in 0..total {
            let message = NewMessage {
                id: format!("m{i}"),
                body: b"x".to_vec(),
                exchange: "ex".into(),
                routing_key: "rk".into(),
                headers: None,
                content_type: "text/plain".into(),
                priority: 0,
                ttl_ms: Some(1),
            };
            pending.push(store.enqueue_insert(message).await.unwrap());
        }
        for answer in pending {
            answer.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let metrics = Arc::new(Metrics::new());
        let sweep = Expiry::new(store.clone(), metrics.clone());
        assert_eq!(sweep.run_once().await.unwrap(), total);
        assert_eq!(sweep.run_once().await.unwrap(), 0);
        assert_eq!(metrics.expired.get(), total);
        let row = store.reader().get("m0").unwrap().unwrap();
        assert_eq!(row.status, Status::Failed);
        assert_eq!(row.last_error.as_deref(), Some(EXPIRED));
        assert_eq!(store.reader().counts().unwrap().failed, total);
        store.close().await;
    }
}
