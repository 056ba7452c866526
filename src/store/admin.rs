//! Admin: the operator's direct changes from the CLI (`retry`, `purge`),
//! made on a connection of their own whether or not an agent runs
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
//!   transitions); the purge shares the writer's statement
//!   (`store/write.rs`), so both delete exactly the same rows.

use std::path::Path;
use std::time::Duration;

use rusqlite::{named_params, Connection, OpenFlags, TransactionBehavior};

use super::error::open_error;
use super::open::BUSY_TIMEOUT;
use super::types::Move;
use super::write::{purge_batch, reclaim_slice};
use super::{now_ms, PurgeCutoffs, Status, StatusCounts, StoreError};

/// An operator's `retry`: failed rows go back to delivering.
pub(crate) const RETRIED: Move = Move::allowed(Status::Failed, Status::Delivering);

/// [`RETRIED`]: due now, with fresh attempt counts (publish and consume).
/// `Admin::retry` narrows it to one id.
const RETRY_SQL: &str = "UPDATE msg_log SET status = :to, try_count = 0, next_try_time = :now, \
     update_time = :now, consume_count = 0 WHERE status = :from";

/// Operator changes made from the CLI, on a connection of their own (the
/// agent may be running: WAL and the busy timeout let both write).
pub(crate) struct Admin {
    conn: Connection,
}

impl Admin {
    pub(crate) fn open(path: &Path) -> Result<Admin, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(|e| open_error(path, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
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

    /// Moves every failed row back to delivering. Returns how many.
    pub(crate) fn retry_failed(&mut self) -> Result<u64, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            RETRY_SQL,
            named_params! {
                ":from": RETRIED.from,
                ":to": RETRIED.to,
                ":now": now,
            },
        )?;
        tx.commit()?;
        Ok(n as u64)
    }
}
