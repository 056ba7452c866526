//! Admin: the operator's direct changes from the CLI (`retry`, `discard`,
//! `purge`), made on a connection of their own whether or not an agent runs
//! (docs/cli.md).
//!
//! Owns [`Admin`], a read-write connection that never creates a database.
//!
//! Invariants:
//! - Each change is one `BEGIN IMMEDIATE` transaction with
//!   `synchronous = FULL`: durable when the command returns.
//! - WAL and the busy timeout let it write beside a running agent; the
//!   agent's writer recounts the delivering rows now and then, so a `retry`
//!   behind its back is seen (docs/storage.md, Limits).
//! - `retry` moves only failed rows (docs/storage.md, Statuses and
//!   transitions); `discard` deletes only failed rows and moves only
//!   delivering ones (to failed, forward: a confirm arriving later for a
//!   row in flight finds it failed and leaves it so); delivered and
//!   consumed rows are refused. The purge shares the writer's statement
//!   (`store/write.rs`), so both delete exactly the same rows.
//! - A change selected by a filter (`retry --failed`, `discard --failed`)
//!   goes in batches of [`BATCH`] rows, one transaction each, so the agent's
//!   writer waits for one small batch at most, never for the whole change.

use std::time::Duration;

use rusqlite::{named_params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::filter::RowFilter;
use super::types::Move;
use super::write::{purge_batch, reclaim_slice};
use super::{now_ms, Database, PurgeCutoffs, Status, StatusCounts, StoreError};

/// Rows per transaction of a filtered `retry` or `discard`.
const BATCH: i64 = 1000;

/// An operator's `retry`: failed rows go back to delivering.
pub(crate) const RETRIED: Move = Move::allowed(Status::Failed, Status::Delivering);

/// [`RETRIED`]: due now, with fresh attempt counts (publish and consume).
/// `Admin::retry` narrows it to one id.
const RETRY_SQL: &str = "UPDATE msg_log SET status = :to, try_count = 0, next_try_time = :now, \
     update_time = :now, consume_count = 0 WHERE status = :from";

/// An operator's `discard` of a delivering row: forward to failed, the
/// reason in `last_error` ([`DISCARDED_ERROR`]).
pub(crate) const DISCARDED: Move = Move::allowed(Status::Delivering, Status::Failed);

/// `last_error` of a row an operator discarded while it was delivering.
pub(crate) const DISCARDED_ERROR: &str = "discarded by operator";

const DISCARD_MOVE_SQL: &str = "UPDATE msg_log SET status = :to, last_error = :error, \
     update_time = :now WHERE id = :id AND status = :from";

/// The only status `discard` deletes.
const DELETED: Status = Status::Failed;

/// What `Admin::discard` did with each id it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Discarded {
    /// Failed rows, deleted.
    pub(crate) deleted: Vec<String>,
    /// Delivering rows, now failed ([`DISCARDED_ERROR`]).
    pub(crate) failed: Vec<String>,
    /// Rows left as they were, in a status `discard` does not touch.
    pub(crate) refused: Vec<(String, Status)>,
    /// Ids with no row.
    pub(crate) missing: Vec<String>,
}

/// Operator changes made from the CLI, on a connection of their own (the
/// agent may be running: WAL and the busy timeout let both write).
pub(crate) struct Admin {
    conn: Connection,
}

impl Admin {
    pub(crate) fn open(database: &Database) -> Result<Admin, StoreError> {
        let path = database.path();
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let conn = database.connect(OpenFlags::SQLITE_OPEN_READ_WRITE)?;
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        Ok(Admin { conn })
    }

    /// Moves the given failed rows back to delivering, due now, try_count 0.
    /// Returns the ids that were not failed rows (missing or in another status).
    pub(crate) fn retry(&mut self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut skipped = Vec::new();
        {
            let mut stmt = tx.prepare(&format!("{RETRY_SQL} AND id = :id"))?;
            for id in ids {
                let params = named_params! {
                    ":from": RETRIED.from,
                    ":to": RETRIED.to,
                    ":now": now,
                    ":id": id,
                };
                if stmt.execute(params)? == 0 {
                    skipped.push(id.clone());
                }
            }
        }
        tx.commit()?;
        Ok(skipped)
    }

    /// One purge batch in its own `BEGIN IMMEDIATE` transaction.
    pub(crate) fn purge_batch(
        &mut self,
        cutoffs: PurgeCutoffs,
        limit: u32,
    ) -> Result<StatusCounts, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let deleted = purge_batch(&tx, cutoffs, limit)?;
        tx.commit()?;
        Ok(deleted)
    }

    /// Hands one slice of freed pages (at most `budget` of work) back to
    /// the filesystem, and checkpoints the WAL this connection wrote, so that
    /// the agent's next commit does not pay for it. Returns whether the
    /// freelist is done; the caller pauses between slices, so a running
    /// agent's writer takes the lock in between.
    pub(crate) fn reclaim_slice(&mut self, budget: Duration) -> Result<bool, StoreError> {
        let slice = reclaim_slice(&self.conn, budget)?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(slice.done)
    }

    /// Moves every failed row `filter` selects back to delivering (its
    /// `status` is ignored: only failed rows move), in batches. Returns how
    /// many.
    pub(crate) fn retry_failed(&mut self, filter: &RowFilter) -> Result<u64, StoreError> {
        let clause = filter.clause(false);
        let sql = format!(
            "{RETRY_SQL} AND rowid IN (SELECT rowid FROM msg_log WHERE status = :from \
             AND {} ORDER BY rowid LIMIT :batch)",
            clause.condition
        );
        let mut total = 0;
        loop {
            let now = now_ms();
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let params = clause.params(&[
                (":from", &RETRIED.from),
                (":to", &RETRIED.to),
                (":now", &now),
                (":batch", &BATCH),
            ]);
            let n = tx.execute(&sql, params.as_slice())?;
            tx.commit()?;
            total += n as u64;
            if (n as i64) < BATCH {
                return Ok(total);
            }
        }
    }

    /// Deletes every failed row `filter` selects (its `status` is ignored:
    /// only failed rows go), in batches. Returns how many.
    pub(crate) fn discard_failed(&mut self, filter: &RowFilter) -> Result<u64, StoreError> {
        let clause = filter.clause(false);
        let sql = format!(
            "DELETE FROM msg_log WHERE rowid IN (SELECT rowid FROM msg_log \
             WHERE status = :deleted AND {} ORDER BY rowid LIMIT :batch)",
            clause.condition
        );
        let mut total = 0;
        loop {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let params = clause.params(&[(":deleted", &DELETED), (":batch", &BATCH)]);
            let n = tx.execute(&sql, params.as_slice())?;
            tx.commit()?;
            total += n as u64;
            if (n as i64) < BATCH {
                return Ok(total);
            }
        }
    }

    /// Discards the given rows in one transaction: a failed row is deleted,
    /// a delivering row becomes failed ([`DISCARDED`]); any other row, and
    /// an id with no row, is left alone and reported.
    pub(crate) fn discard(&mut self, ids: &[String]) -> Result<Discarded, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut done = Discarded::default();
        {
            let mut delete =
                tx.prepare("DELETE FROM msg_log WHERE id = :id AND status = :deleted")?;
            let mut fail = tx.prepare(DISCARD_MOVE_SQL)?;
            let mut status = tx.prepare("SELECT status FROM msg_log WHERE id = ?1")?;
            for id in ids {
                if delete.execute(named_params! { ":id": id, ":deleted": DELETED })? == 1 {
                    done.deleted.push(id.clone());
                    continue;
                }
                let moved = fail.execute(named_params! {
                    ":id": id,
                    ":from": DISCARDED.from,
                    ":to": DISCARDED.to,
                    ":error": DISCARDED_ERROR,
                    ":now": now,
                })?;
                if moved == 1 {
                    done.failed.push(id.clone());
                    continue;
                }
                match status
                    .query_row([id], |r| r.get::<_, Status>(0))
                    .optional()?
                {
                    Some(status) => done.refused.push((id.clone(), status)),
                    None => done.missing.push(id.clone()),
                }
            }
        }
        tx.commit()?;
        Ok(done)
    }
}
