//! The write SQL: every statement that changes `msg_log`, each run inside
//! the writer's group transaction (or the CLI's own, `store/admin.rs`).
//!
//! Owns the insert of a submitted message, the publish outcomes, the
//! consumer's results, the expiry batch, the purge batch, the purge that
//! makes room under `store.max_db_size`, and the page reclaim.
//!
//! Invariants:
//! - Statuses move only as docs/storage.md, Statuses and transitions, allows:
//!   every `UPDATE` of `status` is guarded by the row's current status.
//! - These functions never commit: the caller's transaction holds them, so a
//!   failure anywhere in a group rolls all of it back.
//! - The purge, and the purge that makes room, never delete a delivering
//!   row (docs/purge.md, docs/storage.md).

use rusqlite::{named_params, Connection, OptionalExtension, Transaction};

use super::types::Move;
use super::writer::Limits;
use super::{
    ConsumeVerdict, Consumption, Delivered, Inserted, NewMessage, PublishOutcome, PurgeCutoffs,
    RetryPolicy, Status, StatusCounts, StoreError,
};

/// What a submitted message is born as.
const SUBMITTED: Status = Status::Delivering;
/// What a delivery this agent did not publish is born as: it is in the broker.
const FOREIGN: Status = Status::Delivered;

/// A broker ack. Forward only: a row the consumer already settled stays.
pub(crate) const CONFIRMED: Move = Move::allowed(Status::Delivering, Status::Delivered);
/// The failed attempt that reaches `publish.max_attempts`.
pub(crate) const EXHAUSTED: Move = Move::allowed(Status::Delivering, Status::Failed);

/// A row that passed its expiry before it was published
/// (docs/storage.md, Statuses and transitions).
pub(crate) const EXPIRED_MOVE: Move = Move::allowed(Status::Delivering, Status::Failed);

const INSERT_SQL: &str = "INSERT INTO msg_log (id, msg, exchange, routing_key, status, \
     try_count, next_try_time, create_time, update_time, headers, content_type, priority, \
     expire_time) \
     VALUES (:id, :msg, :exchange, :routing_key, :status, 0, :now, :now, :now, :headers, \
     :content_type, :priority, :expire_time) ON CONFLICT (id) DO NOTHING";
/// [`EXPIRED_MOVE`] for up to `:limit` rows past their expiry, through the
/// partial index `msg_log_expiry`; returns how many moved.
const EXPIRE_SQL: &str = "UPDATE msg_log SET status = :to, last_error = :error, \
     update_time = :now WHERE rowid IN (SELECT rowid FROM msg_log \
     WHERE status = :from AND expire_time <= :now LIMIT :limit)";
/// [`CONFIRMED`].
const DELIVERED_SQL: &str = "UPDATE msg_log SET status = :to, update_time = :now \
     WHERE id = :id AND status = :from";
/// A failed attempt: counted, explained, delayed `try_count × retry_interval`,
/// failed for good at `max_attempts` ([`EXHAUSTED`]).
const REJECTED_SQL: &str = "UPDATE msg_log SET try_count = try_count + 1, last_error = :error, \
     next_try_time = :now + (try_count + 1) * :interval, update_time = :now, \
     status = CASE WHEN try_count + 1 >= :max_attempts THEN :to ELSE status END \
     WHERE id = :id AND status = :from RETURNING status";
/// A consumer's verdict on a row; `from` is the status it was read with
/// and `to` one [`TRANSITIONS`](super::types::TRANSITIONS) allows from it.
const SETTLE_SQL: &str = "UPDATE msg_log SET status = :to, update_time = :now \
     WHERE id = :id AND status = :from";

/// Stores one message inside the group's transaction. The outer `Err` is a
/// database failure (the group rolls back); the inner result is this
/// message's answer (stored, duplicate, or refused for lack of room).
pub(crate) fn insert_one(
    tx: &Transaction<'_>,
    message: NewMessage,
    now: i64,
    storage_refusal: Option<StoreError>,
    delivering: &mut u64,
    limits: Limits,
) -> Result<Result<Inserted, StoreError>, StoreError> {
    let refusal = storage_refusal.or_else(|| {
        (*delivering >= limits.max_pending).then_some(StoreError::BufferFull {
            delivering: *delivering,
            max: limits.max_pending,
        })
    });
    if let Some(refusal) = refusal {
        // A duplicate of a stored message is still answered ok.
        let mut exists = tx.prepare_cached("SELECT 1 FROM msg_log WHERE id = ?1")?;
        return Ok(if exists.exists([&message.id])? {
            Ok(Inserted {
                duplicate: true,
                made_room: 0,
            })
        } else {
            Err(refusal)
        });
    }
    let mut insert = tx.prepare_cached(INSERT_SQL)?;
    let changed = insert.execute(named_params! {
        ":id": message.id,
        ":msg": body_value(message.body),
        ":exchange": message.exchange,
        ":routing_key": message.routing_key,
        ":status": SUBMITTED,
        ":now": now,
        ":headers": message.headers,
        ":content_type": message.content_type,
        ":priority": message.priority,
        ":expire_time": message.ttl_ms.map(|ttl| now.saturating_add(ttl)),
    })?;
    if changed == 0 {
        return Ok(Ok(Inserted {
            duplicate: true,
            made_room: 0,
        }));
    }
    *delivering += 1;
    Ok(Ok(Inserted::default()))
}

/// Records a handler's result. Returns the verdict and whether the row
/// left delivering.
pub(crate) fn record_consumption(
    tx: &Transaction<'_>,
    consumption: &Consumption,
    now: i64,
) -> Result<(ConsumeVerdict, bool), StoreError> {
    let delivery = match consumption {
        Consumption::Succeeded(d) | Consumption::Failed { delivery: d, .. } => d,
    };
    let found: Option<Status> = tx
        .prepare_cached("SELECT status FROM msg_log WHERE id = ?1")?
        .query_row([&delivery.id], |r| r.get(0))
        .optional()?;
    let status = match found {
        Some(status) => status,
        None => insert_foreign(tx, delivery, now)?,
    };
    match consumption {
        Consumption::Succeeded(_) => {
            let moved = settle(tx, &delivery.id, status, Status::Consumed, now)?;
            Ok((ConsumeVerdict::Ack, moved && status == Status::Delivering))
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
                .query_row((&delivery.id, error, now), |r| r.get(0))?;
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            if attempts < *max_attempts {
                return Ok((ConsumeVerdict::Requeue { attempts }, false));
            }
            let moved = settle(tx, &delivery.id, status, Status::Failed, now)?;
            Ok((
                ConsumeVerdict::GiveUp { attempts },
                moved && status == Status::Delivering,
            ))
        }
    }
}

/// Inserts the row of a delivery this agent did not publish; returns its
/// status.
fn insert_foreign(
    tx: &Transaction<'_>,
    delivery: &Delivered,
    now: i64,
) -> Result<Status, StoreError> {
    tx.prepare_cached(
        "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
         create_time, update_time, headers, content_type) \
         VALUES (:id, :msg, :exchange, :routing_key, :status, 0, :now, :now, :headers, \
         :content_type)",
    )?
    .execute(named_params! {
        ":id": delivery.id,
        ":msg": body_value(delivery.body.clone()),
        ":exchange": delivery.exchange,
        ":routing_key": delivery.routing_key,
        ":status": FOREIGN,
        ":now": now,
        ":headers": delivery.headers,
        ":content_type": delivery.content_type,
    })?;
    Ok(FOREIGN)
}

/// Moves row `id` from `from` (its status now) to `to` if the transition
/// table allows it; a settled row stays as it is. Returns whether it moved.
fn settle(
    tx: &Transaction<'_>,
    id: &str,
    from: Status,
    to: Status,
    now: i64,
) -> Result<bool, StoreError> {
    if !from.can_move(to) {
        return Ok(false);
    }
    let changed = tx.prepare_cached(SETTLE_SQL)?.execute(named_params! {
        ":id": id,
        ":from": from,
        ":to": to,
        ":now": now,
    })?;
    Ok(changed > 0)
}

/// Applies publish outcomes; returns how many rows left delivering.
pub(crate) fn record_outcomes(
    tx: &Transaction<'_>,
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
                settled += delivered.execute(named_params! {
                    ":id": id,
                    ":from": CONFIRMED.from,
                    ":to": CONFIRMED.to,
                    ":now": now,
                })? as u64;
            }
            PublishOutcome::Rejected { id, error } => {
                let status: Option<Status> = rejected
                    .query_row(
                        named_params! {
                            ":id": id,
                            ":error": error,
                            ":now": now,
                            ":interval": policy.retry_interval_ms,
                            ":max_attempts": i64::from(policy.max_attempts),
                            ":from": EXHAUSTED.from,
                            ":to": EXHAUSTED.to,
                        },
                        |r| r.get(0),
                    )
                    .optional()?;
                if status == Some(EXHAUSTED.to) {
                    settled += 1;
                }
            }
        }
    }
    Ok(settled)
}

/// Moves up to `limit` delivering rows past their expiry at `now` to
/// failed, `last_error` [`EXPIRED`](super::types::EXPIRED); returns how many.
pub(crate) fn expire_batch(conn: &Connection, now: i64, limit: u32) -> Result<u64, StoreError> {
    let moved = conn.prepare_cached(EXPIRE_SQL)?.execute(named_params! {
        ":from": EXPIRED_MOVE.from,
        ":to": EXPIRED_MOVE.to,
        ":error": super::types::EXPIRED,
        ":now": now,
        ":limit": i64::from(limit),
    })?;
    Ok(moved as u64)
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
           SELECT rowid FROM msg_log WHERE status IN (:settled_a, :settled_b) \
             AND create_time < :settled_before \
           UNION ALL \
           SELECT rowid FROM msg_log WHERE status = :failed AND create_time < :failed_before \
           LIMIT :limit) RETURNING status",
    )?;
    let [settled_a, settled_b] = PurgeCutoffs::SETTLED;
    let statuses = stmt.query_map(
        named_params! {
            ":settled_a": settled_a,
            ":settled_b": settled_b,
            ":settled_before": cutoffs.settled_before,
            ":failed": PurgeCutoffs::FAILED,
            ":failed_before": cutoffs.failed_before,
            ":limit": limit,
        },
        |r| r.get::<_, Status>(0),
    )?;
    let mut deleted = StatusCounts::default();
    for status in statuses {
        deleted.add(status?, 1);
    }
    Ok(deleted)
}

/// What one [`reclaim_slice`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reclaimed {
    /// Free pages handed back to the filesystem.
    pub(crate) pages: u64,
    /// The vacuum ran to its end: no free page is left to hand back (or
    /// the file cannot hand any back: a database without
    /// `auto_vacuum = INCREMENTAL`).
    pub(crate) done: bool,
}

/// Hands free pages back to the filesystem (the database uses
/// `auto_vacuum = INCREMENTAL`), for at most `budget` or
/// [`RECLAIM_SLICE_PAGES`] pages, in one transaction of its own (the
/// connection must not be inside one).
///
/// `PRAGMA incremental_vacuum` returns one row per page it frees, so each
/// step of the statement moves one page: the statement is stepped until it
/// ends, or until the slice's bound, and then reset, which commits what it
/// moved. Running it to completion in slices, with other writes between
/// them, gives the whole freelist back without holding the write lock for
/// long (docs/purge.md, How; decisions/0023).
pub(crate) fn reclaim_slice(
    conn: &Connection,
    budget: std::time::Duration,
) -> Result<Reclaimed, StoreError> {
    let started = std::time::Instant::now();
    let mut stmt = conn.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut rows = stmt.query([])?;
    let mut pages = 0u64;
    loop {
        if rows.next()?.is_none() {
            return Ok(Reclaimed { pages, done: true });
        }
        pages += 1;
        if pages >= RECLAIM_SLICE_PAGES || started.elapsed() >= budget {
            return Ok(Reclaimed { pages, done: false });
        }
    }
}

/// Most pages one reclaim slice moves, whatever its time budget.
pub(crate) const RECLAIM_SLICE_PAGES: u64 = 4096;

/// Bytes of live data: the pages in use, not on the freelist
/// (docs/storage.md, Limits; decisions/0024).
pub(crate) fn live_bytes(page_count: i64, freelist_count: i64, page_size: u64) -> u64 {
    let in_use = page_count.max(0).saturating_sub(freelist_count.max(0));
    (in_use as u64).saturating_mul(page_size)
}

/// The live data of the database `conn` is open on (inside a transaction:
/// what that transaction sees).
pub(crate) fn live_size(conn: &Connection, page_size: u64) -> Result<u64, StoreError> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    Ok(live_bytes(pages, free, page_size))
}

/// Deletes one slice of the rows that may go to make room under
/// `store.max_db_size`: delivered and consumed rows of any age, oldest
/// first, then failed rows created before `failed_before`; never a
/// delivering row (docs/storage.md, Making room; decisions/0025).
pub(crate) fn purge_for_room(
    conn: &Connection,
    failed_before: i64,
    limit: u32,
) -> Result<StatusCounts, StoreError> {
    // The purge's own statement with the settled rows' age lifted: it takes
    // the settled rows first (oldest first), then the failed ones.
    let cutoffs = PurgeCutoffs {
        settled_before: i64::MAX,
        failed_before,
    };
    purge_batch(conn, cutoffs, limit)
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, OptionalExtension};

    use super::{expire_batch, record_consumption, record_outcomes};
    use crate::config::Synchronous;
    use crate::store::open::open_writer_connection;
    use crate::store::types::TRANSITIONS;
    use crate::store::{
        now_ms, Admin, Consumption, Database, Delivered, PublishOutcome, RetryPolicy, Status,
    };

    fn delivered(id: &str) -> Delivered {
        Delivered::sample(id)
    }

    /// Every write that changes a status, applied to a row in every status:
    /// the SQL makes exactly the moves the transition table allows, and
    /// each move of the table is made by some write.
    #[test]
    fn the_write_sql_agrees_with_the_transition_table() {
        use std::collections::BTreeSet;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        let policy = RetryPolicy {
            max_attempts: 1,
            retry_interval_ms: 1000,
        };
        let give_up = |id: &str| Consumption::Failed {
            delivery: delivered(id),
            error: "exit 1".into(),
            max_attempts: 1,
        };
        let writes = [
            "confirm", "reject", "consume", "give-up", "retry", "expire", "discard",
        ];
        let mut made = BTreeSet::new();
        for from in Status::ALL {
            for write in writes {
                let id = format!("{from:?}-{write}");
                // Already expired: only the expiry sweep looks at it.
                conn.execute(
                    "INSERT INTO msg_log (id, msg, status, create_time, expire_time) \
                     VALUES (?1, 'x', ?2, ?3, 0)",
                    params![id, from, now_ms()],
                )
                .unwrap();
                let tx = conn.transaction().unwrap();
                let now = now_ms();
                match write {
                    "confirm" => {
                        let confirmed = PublishOutcome::Delivered { id: id.clone() };
                        record_outcomes(&tx, &[confirmed], policy, now).unwrap();
                    }
                    "reject" => {
                        let rejected = PublishOutcome::Rejected {
                            id: id.clone(),
                            error: "nack".into(),
                        };
                        record_outcomes(&tx, &[rejected], policy, now).unwrap();
                    }
                    "consume" => {
                        let ok = Consumption::Succeeded(delivered(&id));
                        record_consumption(&tx, &ok, now).unwrap();
                    }
                    "give-up" => {
                        record_consumption(&tx, &give_up(&id), now).unwrap();
                    }
                    "expire" => {
                        expire_batch(&tx, now, u32::MAX).unwrap();
                    }
                    _ => {}
                }
                tx.commit().unwrap();
                let mut admin = Admin::open(&Database::plain(&path)).unwrap();
                match write {
                    "retry" => drop(admin.retry(std::slice::from_ref(&id)).unwrap()),
                    "discard" => drop(admin.discard(std::slice::from_ref(&id)).unwrap()),
                    _ => {}
                }
                let to: Option<Status> = conn
                    .query_row("SELECT status FROM msg_log WHERE id = ?1", [&id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .unwrap();
                // A deletion is no move: only `discard` deletes, and only
                // failed rows.
                let Some(to) = to else {
                    assert_eq!((write, from), ("discard", Status::Failed));
                    continue;
                };
                if to != from {
                    assert!(from.can_move(to), "{write} moved {from:?} to {to:?}");
                    made.insert((from.code(), to.code()));
                }
            }
        }
        let table: BTreeSet<_> = TRANSITIONS
            .iter()
            .map(|t| (t.from.code(), t.to.code()))
            .collect();
        assert_eq!(made, table, "every allowed move is made by some write");
    }
}
