//! The write SQL: every statement that changes `msg_log`, each run inside
//! the writer's group transaction (or the CLI's own, `store/admin.rs`).
//!
//! Owns the insert of a submitted message, the publish outcomes, the
//! consumer's results, the purge batch and the page reclaim.
//!
//! Invariants:
//! - Statuses move only as docs/storage.md, Statuses and transitions, allows:
//!   every `UPDATE` of `status` is guarded by the row's current status.
//! - These functions never commit: the caller's transaction holds them, so a
//!   failure anywhere in a group rolls all of it back.
//! - The purge never deletes a delivering row (docs/purge.md).

use rusqlite::{params, Connection, OptionalExtension};

use super::writer::Limits;
use super::{
    ConsumeVerdict, Consumption, Inserted, NewMessage, PublishOutcome, PurgeCutoffs, RetryPolicy,
    Status, StatusCounts, StoreError,
};

const INSERT_SQL: &str = "INSERT INTO msg_log (id, msg, exchange, routing_key, status, \
     try_count, next_try_time, create_time, update_time, headers, content_type) \
     VALUES (?1, ?2, ?3, ?4, 0, 0, ?5, ?5, ?5, ?6, ?7) ON CONFLICT (id) DO NOTHING";
/// Forward only: a row the consumer already settled (3 or 2) stays as it is.
const DELIVERED_SQL: &str =
    "UPDATE msg_log SET status = 1, update_time = ?2 WHERE id = ?1 AND status = 0";
/// A failed attempt: counted, explained, delayed `try_count × retry_interval`,
/// failed for good at `max_attempts`.
const REJECTED_SQL: &str = "UPDATE msg_log SET try_count = try_count + 1, last_error = ?2, \
     next_try_time = ?3 + (try_count + 1) * ?4, update_time = ?3, \
     status = CASE WHEN try_count + 1 >= ?5 THEN 2 ELSE 0 END \
     WHERE id = ?1 AND status = 0 RETURNING status";

/// Stores one message inside the group's transaction. The outer `Err` is a
/// database failure (the group rolls back); the inner result is this
/// message's answer (stored, duplicate, or refused for lack of room).
pub(crate) fn insert_one(
    tx: &rusqlite::Transaction<'_>,
    message: NewMessage,
    now: i64,
    storage_refusal: Option<StoreError>,
    delivering: &mut u64,
    limits: Limits,
) -> Result<Result<Inserted, StoreError>, StoreError> {
    let refusal = storage_refusal.or_else(|| {
        (*delivering >= limits.max_pending).then_some(StoreError::BufferFull {
            pending: *delivering,
            max: limits.max_pending,
        })
    });
    if let Some(refusal) = refusal {
        // A duplicate of a stored message is still answered ok.
        let mut exists = tx.prepare_cached("SELECT 1 FROM msg_log WHERE id = ?1")?;
        return Ok(if exists.exists(params![message.id])? {
            Ok(Inserted { duplicate: true })
        } else {
            Err(refusal)
        });
    }
    let mut insert = tx.prepare_cached(INSERT_SQL)?;
    let changed = insert.execute(params![
        message.id,
        body_value(message.body),
        message.exchange,
        message.routing_key,
        now,
        message.headers,
        message.content_type,
    ])?;
    if changed == 0 {
        return Ok(Ok(Inserted { duplicate: true }));
    }
    *delivering += 1;
    Ok(Ok(Inserted { duplicate: false }))
}

/// Records a handler's result. Returns the verdict and whether the row
/// left status 0.
pub(crate) fn record_consumption(
    tx: &rusqlite::Transaction<'_>,
    consumption: &Consumption,
    now: i64,
) -> Result<(ConsumeVerdict, bool), StoreError> {
    let delivery = match consumption {
        Consumption::Succeeded(d) | Consumption::Failed { delivery: d, .. } => d,
    };
    let status: Option<i64> = tx
        .prepare_cached("SELECT status FROM msg_log WHERE id = ?1")?
        .query_row(params![delivery.id], |r| r.get(0))
        .optional()?;
    let was_pending = status == Some(Status::Delivering as i64);
    let unsettled = matches!(status, None | Some(0) | Some(1));
    if status.is_none() {
        // A message this agent did not publish: it is in the broker, so 1.
        tx.prepare_cached(
            "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
             create_time, update_time, headers, content_type) \
             VALUES (?1, ?2, ?3, ?4, 1, 0, ?5, ?5, ?6, ?7)",
        )?
        .execute(params![
            delivery.id,
            body_value(delivery.body.clone()),
            delivery.exchange,
            delivery.routing_key,
            now,
            delivery.headers,
            delivery.content_type,
        ])?;
    }
    match consumption {
        Consumption::Succeeded(_) => {
            if unsettled {
                tx.prepare_cached("UPDATE msg_log SET status = 3, update_time = ?2 WHERE id = ?1")?
                    .execute(params![delivery.id, now])?;
            }
            Ok((ConsumeVerdict::Ack, was_pending))
        }
        Consumption::Failed {
            error,
            max_attempts,
            ..
        } => {
            let attempts: i64 = tx
                .prepare_cached(
                    "UPDATE msg_log SET consume_count = consume_count + 1, last_error = ?2, \
                     update_time = ?3 WHERE id = ?1 RETURNING consume_count",
                )?
                .query_row(params![delivery.id, error, now], |r| r.get(0))?;
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            if attempts < *max_attempts {
                return Ok((ConsumeVerdict::Requeue { attempts }, false));
            }
            if unsettled {
                tx.prepare_cached("UPDATE msg_log SET status = 2 WHERE id = ?1")?
                    .execute(params![delivery.id])?;
            }
            Ok((
                ConsumeVerdict::GiveUp { attempts },
                was_pending && unsettled,
            ))
        }
    }
}

/// Applies publish outcomes; returns how many rows left status 0.
pub(crate) fn record_outcomes(
    tx: &rusqlite::Transaction<'_>,
    outcomes: &[PublishOutcome],
    policy: RetryPolicy,
    now: i64,
) -> Result<u64, StoreError> {
    let mut delivered = tx.prepare_cached(DELIVERED_SQL)?;
    let mut rejected = tx.prepare_cached(REJECTED_SQL)?;
    let mut settled = 0u64;
    for outcome in outcomes {
        match outcome {
            PublishOutcome::Delivered { id } => {
                settled += delivered.execute(params![id, now])? as u64;
            }
            PublishOutcome::Rejected { id, error } => {
                let status: Option<i64> = rejected
                    .query_row(
                        params![
                            id,
                            error,
                            now,
                            policy.retry_interval_ms,
                            i64::from(policy.max_attempts)
                        ],
                        |r| r.get(0),
                    )
                    .optional()?;
                if status == Some(Status::Failed as i64) {
                    settled += 1;
                }
            }
        }
    }
    Ok(settled)
}

/// The body as SQLite stores it: TEXT when it is UTF-8, else a BLOB.
fn body_value(body: Vec<u8>) -> rusqlite::types::Value {
    match String::from_utf8(body) {
        Ok(text) => rusqlite::types::Value::Text(text),
        Err(e) => rusqlite::types::Value::Blob(e.into_bytes()),
    }
}

/// Deletes up to `limit` purgeable rows, oldest first; returns how many.
pub(crate) fn purge_batch(
    conn: &Connection,
    cutoffs: PurgeCutoffs,
    limit: u32,
) -> Result<StatusCounts, StoreError> {
    // Two index lookups rather than one OR: each walks the status index in
    // rowid (age) order, so old rows are found first.
    let mut stmt = conn.prepare_cached(
        "DELETE FROM msg_log WHERE rowid IN ( \
           SELECT rowid FROM msg_log WHERE status IN (1, 3) AND create_time < ?1 \
           UNION ALL \
           SELECT rowid FROM msg_log WHERE status = 2 AND create_time < ?2 \
           LIMIT ?3) RETURNING status",
    )?;
    let statuses = stmt.query_map(
        params![cutoffs.settled_before, cutoffs.failed_before, limit],
        |r| r.get::<_, i64>(0),
    )?;
    let mut deleted = StatusCounts::default();
    for status in statuses {
        deleted.add(status?, 1);
    }
    Ok(deleted)
}

/// Hands freed pages back to the filesystem (the database uses
/// `auto_vacuum = INCREMENTAL`).
pub(crate) fn reclaim(conn: &Connection) -> Result<(), StoreError> {
    // Bounded, like the purge batches: a whole backlog of free pages at once
    // would hold the write lock for as long as it takes to move them.
    conn.execute_batch(&format!("PRAGMA incremental_vacuum({RECLAIM_PAGES})"))?;
    Ok(())
}

/// Free pages handed back to the filesystem per step.
const RECLAIM_PAGES: u32 = 2048;

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rusqlite::params;

    use crate::config::StoreConfig;
    use crate::store::{
        now_ms, ConsumeVerdict, Consumption, Delivered, NewMessage, PublishOutcome, PurgeCutoffs,
        RetryPolicy, Status, Store, StoreError,
    };

    fn config(dir: &Path) -> StoreConfig {
        StoreConfig {
            path: dir.join("t.db"),
            ..StoreConfig::default()
        }
    }

    fn message(id: &str, body: &[u8]) -> NewMessage {
        NewMessage {
            id: id.into(),
            body: body.to_vec(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            headers: None,
            content_type: "text/plain".into(),
        }
    }

    #[tokio::test]
    async fn insert_dedupes_and_round_trips_binary() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        let body = vec![0u8, 255, 1, 128];
        let first = store.insert(message("a", &body)).await.unwrap();
        assert!(!first.duplicate);
        let again = store.insert(message("a", b"other")).await.unwrap();
        assert!(again.duplicate);
        let row = store.reader().get("a").unwrap().unwrap();
        assert_eq!(row.body, body);
        assert!(!row.body_is_text);
        assert_eq!(row.status, Status::Delivering);
        assert_eq!(store.reader().counts().unwrap().delivering, 1);
        store.close().await;
        assert!(matches!(
            store.insert(message("b", b"x")).await,
            Err(StoreError::Closed)
        ));
    }

    #[tokio::test]
    async fn max_pending_refuses_without_evicting() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.max_pending = 2;
        let store = Store::open(&cfg).unwrap();
        store.insert(message("1", b"x")).await.unwrap();
        store.insert(message("2", b"x")).await.unwrap();
        let refused = store.insert(message("3", b"x")).await;
        assert!(matches!(refused, Err(StoreError::BufferFull { .. })));
        // A duplicate of a stored message is still ok.
        assert!(store.insert(message("2", b"x")).await.unwrap().duplicate);
        assert_eq!(store.reader().counts().unwrap().delivering, 2);
        store.close().await;
    }

    fn delivered(id: &str) -> Delivered {
        Delivered {
            id: id.into(),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            body: b"body".to_vec(),
            headers: None,
            content_type: None,
        }
    }

    #[tokio::test]
    async fn outcomes_move_status_forward_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        let policy = RetryPolicy {
            max_attempts: 2,
            retry_interval_ms: 1000,
        };
        for id in ["a", "b", "c"] {
            store.insert(message(id, b"x")).await.unwrap();
        }
        let record = |outcomes| async {
            store
                .record_outcomes(outcomes, policy)
                .await
                .unwrap()
                .await
                .unwrap()
        };
        record(vec![PublishOutcome::Delivered { id: "a".into() }]).await;
        let rejected = |id: &str| PublishOutcome::Rejected {
            id: id.into(),
            error: "312 NO_ROUTE".into(),
        };
        record(vec![rejected("b")]).await;
        let b = store.reader().get("b").unwrap().unwrap();
        assert_eq!((b.status, b.try_count), (Status::Delivering, 1));
        assert!(b.next_try_time.unwrap() >= b.update_time.unwrap() + 1000);
        record(vec![rejected("b")]).await;
        let b = store.reader().get("b").unwrap().unwrap();
        assert_eq!((b.status, b.try_count), (Status::Failed, 2));
        assert_eq!(b.last_error.as_deref(), Some("312 NO_ROUTE"));
        // The consumer settles c before its confirm arrives: 3 stays.
        let verdict = store
            .record_consumption(Consumption::Succeeded(delivered("c")))
            .await
            .unwrap();
        assert_eq!(verdict, ConsumeVerdict::Ack);
        record(vec![PublishOutcome::Delivered { id: "c".into() }]).await;
        assert_eq!(
            store.reader().status_of("c").unwrap(),
            Some(Status::Consumed)
        );
        assert_eq!(
            store.reader().status_of("a").unwrap(),
            Some(Status::Delivered)
        );
        store.close().await;
    }

    #[tokio::test]
    async fn handler_failures_are_counted_in_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        let failed = |id: &str| Consumption::Failed {
            delivery: delivered(id),
            error: "exit 1".into(),
            max_attempts: 2,
        };
        // A message this agent did not publish gets a row on first sight.
        let v = store.record_consumption(failed("foreign")).await.unwrap();
        assert_eq!(v, ConsumeVerdict::Requeue { attempts: 1 });
        let row = store.reader().get("foreign").unwrap().unwrap();
        assert_eq!(row.status, Status::Delivered);
        assert_eq!(row.body, b"body");
        let v = store.record_consumption(failed("foreign")).await.unwrap();
        assert_eq!(v, ConsumeVerdict::GiveUp { attempts: 2 });
        let row = store.reader().get("foreign").unwrap().unwrap();
        assert_eq!(row.status, Status::Failed);
        assert_eq!(row.last_error.as_deref(), Some("exit 1"));
        store
            .record_consumption(Consumption::Succeeded(delivered("new")))
            .await
            .unwrap();
        assert_eq!(
            store.reader().status_of("new").unwrap(),
            Some(Status::Consumed)
        );
        store.close().await;
    }

    #[tokio::test]
    async fn purge_deletes_old_settled_rows_in_batches_never_pending() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&config(dir.path())).unwrap();
        // (id, status, age in days)
        let rows = [
            ("old-pending", 0, 400),
            ("old-delivered", 1, 40),
            ("old-consumed", 3, 40),
            ("new-delivered", 1, 1),
            ("old-failed", 2, 40),
            ("very-old-failed", 2, 100),
            ("very-old-consumed", 3, 100),
        ];
        for (id, _, _) in rows {
            store.insert(message(id, b"x")).await.unwrap();
        }
        let now = now_ms();
        let db = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
        for (id, status, days) in rows {
            db.execute(
                "UPDATE msg_log SET status = ?2, create_time = ?3 WHERE id = ?1",
                params![id, status, now - days * 86_400_000],
            )
            .unwrap();
        }
        let cutoffs = PurgeCutoffs {
            settled_before: now - 30 * 86_400_000,
            failed_before: now - 90 * 86_400_000,
        };
        let would = store.reader().purgeable(cutoffs).unwrap();
        assert_eq!((would.delivered, would.failed, would.consumed), (1, 1, 2));
        assert_eq!(store.purge_batch(cutoffs, 3).await.unwrap().total(), 3);
        assert_eq!(store.purge_batch(cutoffs, 3).await.unwrap().total(), 1);
        assert_eq!(store.purge_batch(cutoffs, 3).await.unwrap().total(), 0);
        let mut left: Vec<String> = store
            .reader()
            .list(None, 100)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        left.sort();
        assert_eq!(left, ["new-delivered", "old-failed", "old-pending"]);
        store.close().await;
    }
}
