//! Delivery: one delivery from arrival to ack, the I/O around `decision`
//! (docs/consuming.md, The decision on a delivery).
//!
//! Owns the steps that touch the world: waiting for the message id's turn,
//! reading the row's status, running the handler, committing its result,
//! telling the broker, and the metrics and logs of each outcome. What to do
//! at each step is `decision`'s answer.
//!
//! Invariants:
//! - The ack (or nack, or reject) is sent only after the store has
//!   committed what it rests on. An answer lost on a dead channel is
//!   harmless: the broker redelivers and the row deduplicates it.
//! - A store error sends the delivery back to the queue after
//!   [`STORE_ERROR_PAUSE`], so a database that stays broken is no hot loop.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;

use super::decision::{self, Arrival, Settle};
use super::handler::Handler;
use super::in_flight::InFlight;
use super::message::Message;
use crate::metrics::Metrics;
use crate::store::{ConsumeVerdict, Status, Store, StoreError};

/// After a store error, how long a delivery waits before going back to the queue.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// One delivery, start to ack. `Err` means the store failed; the delivery
/// has been sent back to the queue.
pub(crate) async fn handle(
    delivery: Delivery,
    store: Store,
    handler: Arc<Handler>,
    max_attempts: u32,
    metrics: Arc<Metrics>,
    in_flight: Arc<InFlight>,
) -> Result<(), StoreError> {
    let message = Message::from_delivery(&delivery);
    // Copies of one message delivered together go one at a time: the later
    // one then finds status 3 and is acked as a duplicate.
    let _turn = match message.id.as_deref() {
        Some(id) => Some(in_flight.turn(id).await),
        None => None,
    };
    let settle = match process(&store, &handler, max_attempts, &message, &metrics).await {
        Ok(settle) => settle,
        Err(e) => {
            tokio::time::sleep(STORE_ERROR_PAUSE).await;
            let _ = tell(&delivery.acker, decision::on_store_error()).await;
            return Err(e);
        }
    };
    match tell(&delivery.acker, settle).await {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            tracing::debug!(message_id = ?message.id, ?settle,
                "could not tell the broker (channel gone); the delivery will come again and be deduplicated");
        }
    }
    Ok(())
}

/// Sends `settle` for the delivery of `acker`.
async fn tell(acker: &Acker, settle: Settle) -> lapin::Result<bool> {
    match settle {
        Settle::Ack => acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
        Settle::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
    }
}

/// Decides one delivery: dedupe, run, record. Returns what to tell the
/// broker; the store has committed whatever the answer rests on.
async fn process(
    store: &Store,
    handler: &Handler,
    max_attempts: u32,
    message: &Message,
    metrics: &Metrics,
) -> Result<Settle, StoreError> {
    metrics.deliveries.inc();
    let Some(id) = message.id.as_deref() else {
        return Ok(process_without_id(handler, max_attempts, message, metrics).await);
    };
    if decision::on_arrival(status_of(store, id).await?) == Arrival::Duplicate {
        metrics.duplicates.inc();
        tracing::info!(message_id = %id, "duplicate delivery of a consumed message: acked, not run again");
        return Ok(Settle::Ack);
    }
    let handled = handler.run(message).await;
    if let Err(error) = &handled {
        metrics.handler_failures.inc();
        tracing::warn!(message_id = %id, error = %error, "handler failed");
    }
    let consumption = decision::to_commit(message.delivered(id), handled, max_attempts);
    let verdict = store.record_consumption(consumption).await?;
    match verdict {
        ConsumeVerdict::Ack => tracing::debug!(message_id = %id, "consumed"),
        ConsumeVerdict::Requeue { attempts } => {
            tracing::info!(message_id = %id, attempts, "requeued for another attempt");
        }
        ConsumeVerdict::GiveUp { attempts } => {
            metrics.dead_lettered.inc();
            tracing::warn!(message_id = %id, attempts, "giving up on the message: rejected, marked failed");
        }
    }
    Ok(decision::on_commit(verdict))
}

/// A delivery without `message_id`: run, and settle on the result alone.
async fn process_without_id(
    handler: &Handler,
    max_attempts: u32,
    message: &Message,
    metrics: &Metrics,
) -> Settle {
    tracing::warn!(exchange = %message.exchange, routing_key = %message.routing_key,
        "delivery without message_id: handled without deduplication");
    let handled = handler.run(message).await;
    let settle = decision::without_id(&handled, message.redelivered, max_attempts);
    if let Err(error) = &handled {
        metrics.handler_failures.inc();
        if settle == Settle::Reject {
            metrics.dead_lettered.inc();
            tracing::warn!(error = %error, "handler failed again; rejecting the delivery");
        } else {
            tracing::warn!(error = %error, "handler failed; requeueing the delivery");
        }
    }
    settle
}

/// The status of `id`'s row, read off the async runtime.
async fn status_of(store: &Store, id: &str) -> Result<Option<Status>, StoreError> {
    let reader = store.reader().clone();
    let lookup = id.to_string();
    tokio::task::spawn_blocking(move || reader.status_of(&lookup))
        .await
        .map_err(|e| StoreError::WriteFailed(format!("status lookup: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;

    fn message(id: Option<&str>) -> Message {
        Message {
            id: id.map(str::to_string),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            redelivered: false,
            body: b"body".to_vec(),
            headers: None,
            content_type: None,
        }
    }

    fn failing() -> Handler {
        Handler::Exec {
            argv: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 1".into()],
            timeout: Duration::from_secs(10),
        }
    }

    fn open(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("t.db"),
            ..StoreConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn failures_requeue_then_reject_at_max_attempts_and_mark_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let metrics = Metrics::new();
        let m = message(Some("m-1"));
        let first = process(&store, &failing(), 2, &m, &metrics).await.unwrap();
        assert_eq!(first, Settle::Requeue);
        let second = process(&store, &failing(), 2, &m, &metrics).await.unwrap();
        assert_eq!(second, Settle::Reject);
        let row = store.reader().get("m-1").unwrap().unwrap();
        assert_eq!(row.status, Status::Failed);
        assert!(row.last_error.unwrap().contains("nope"));
        store.close().await;
    }

    #[tokio::test]
    async fn a_consumed_message_is_acked_again_without_running_the_handler() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let metrics = Metrics::new();
        let m = message(Some("m-1"));
        let first = process(&store, &Handler::Record, 2, &m, &metrics).await;
        assert_eq!(first.unwrap(), Settle::Ack);
        assert_eq!(
            store.reader().status_of("m-1").unwrap(),
            Some(Status::Consumed)
        );
        // A failing handler would requeue: the ack shows it did not run.
        let again = process(&store, &failing(), 2, &m, &metrics).await.unwrap();
        assert_eq!(again, Settle::Ack);
        store.close().await;
    }

    #[tokio::test]
    async fn without_message_id_nothing_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let metrics = Metrics::new();
        let m = message(None);
        let settle = process(&store, &failing(), 2, &m, &metrics).await.unwrap();
        assert_eq!(settle, Settle::Requeue);
        let redelivered = Message {
            redelivered: true,
            ..m
        };
        let settle = process(&store, &failing(), 2, &redelivered, &metrics).await;
        assert_eq!(settle.unwrap(), Settle::Reject);
        assert_eq!(store.reader().counts().unwrap().total(), 0);
        store.close().await;
    }
}
