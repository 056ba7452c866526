//! Store: the `msg_log` table, the only place in the agent that speaks SQL.
//!
//! Role: keep every message the agent has acknowledged, durably, and every
//! change of its status. The contract this implements is docs/storage.md
//! (schema, statuses and transitions, durability, limits, start-up); this
//! header is the design that meets it.
//!
//! # Layout
//!
//! - `mod.rs`: the [`Store`] handle the agent's tasks share, and this design;
//! - `open.rs`: the lock file, the pragmas, `quick_check`, the migrations;
//! - `writer.rs`: the group-commit writer thread;
//! - `write.rs`: the write SQL (insert, publish outcomes, consumer results,
//!   expiry batch, purge batch, page reclaim, live size);
//! - `room.rs`: making room under `store.max_db_size` before refusing;
//! - `reader.rs`: the pooled read-only connections and their queries;
//! - `admin.rs`: the CLI's direct changes (`retry`, `discard`, `purge`);
//! - `filter.rs`: the operator's row filters as SQL (`list`, `export`,
//!   `retry`, `discard`);
//! - `types.rs`, `error.rs`: what goes in and out, and what can fail.
//!
//! # Statuses and transitions
//!
//! | code | status | meaning |
//! |---|---|---|
//! | 0 | delivering | stored; not yet confirmed by the broker |
//! | 1 | delivered | the broker confirmed it |
//! | 2 | failed | publish attempts exhausted, or the consumer gave up |
//! | 3 | consumed | the consumer handled it |
//!
//! A row is born delivering (a submit) or delivered (a delivery this agent
//! did not publish: it is in the broker). It then moves only as
//! docs/storage.md, Statuses and transitions, allows: forward, except by an
//! operator's `retry` (failed → delivering). An operator's `discard` moves
//! a delivering row forward to failed, or deletes a failed row. A late confirm never moves a
//! row the consumer already settled.
//!
//! The allowed moves are one table, `TRANSITIONS` in `types.rs`. Each
//! status-changing statement binds its guard (`WHERE status = :from`) and
//! new status from a `Move` that is checked against the table when the
//! crate compiles; the consumer's moves ask `Status::can_move`; a unit test
//! drives every such write from every status and compares with the table.
//!
//! # Group commit
//!
//! Every write of the agent (a submit, a publish outcome, a consumer
//! result, a purge batch) is a request on the writer's channel. One thread
//! takes all requests waiting, applies them in one `BEGIN IMMEDIATE`
//! transaction, commits (one sync for the whole group), and only then
//! answers each request: many concurrent submits share one fsync, and none
//! is answered before it. Readers are an r2d2 pool of read-only connections;
//! WAL lets them read while the writer writes.
//!
//! # Start-up and recovery
//!
//! [`Store::open`], in order:
//! 1. lock `<path>.lock` (one database, one agent), creating the directory;
//! 2. open the file (creating it), key it when `store.key_file` is set,
//!    set WAL and `synchronous`, read both back;
//! 3. `PRAGMA quick_check`: a damaged file stops the agent, untouched;
//! 4. apply the migrations up to [`SCHEMA_VERSION`];
//! 5. open the reader pool;
//! 6. count the delivering rows (the `store.max_pending` limit) and start
//!    the writer thread.
//!
//! Nothing else needs recovering: SQLite's WAL rolls back a group that did
//! not commit, and its requests were never answered. No publish state lives
//! outside `msg_log`: a row still delivering after a crash is due again and
//! is published again with the same `message_id` (docs/forwarding.md).
//!
//! # Migration rules
//!
//! - One ordered list; entry `i` brings `PRAGMA user_version` from `i` to
//!   `i + 1` in one transaction with the version bump, so a crash leaves the
//!   file at a version, never between two.
//! - A migration that shipped is never edited; changes are new entries.
//! - A file newer than this binary is refused ([`StoreError::TooNew`]),
//!   never downgraded; migrations run only under the lock.
//! - A new file gets `auto_vacuum = INCREMENTAL` before its first table
//!   (the purge hands pages back to the filesystem).
//!
//! # Invariants
//!
//! - A submit is answered `Ok` only after the COMMIT that holds its row
//!   returned; any error in the group (a full disk included) rolls back the
//!   whole group and every request in it gets the error: no ack.
//! - WAL is required; `synchronous` is what the configuration says, checked.
//! - A corrupt database is reported ([`StoreError::Corrupt`]) and never
//!   replaced or repaired behind the operator's back.
//! - Limits refuse, never evict a message still to deliver: past
//!   `max_pending` or `min_free_disk` a submit gets
//!   [`StoreError::BufferFull`] or [`StoreError::StorageFull`]; at
//!   `max_db_size`, measured as live data, settled rows are purged to make
//!   room first (delivered and consumed, then failed past
//!   `store.room_failed_grace`; never status 0), and the submit is refused
//!   only when none is left (docs/storage.md, Limits; decisions/0024, 0025).
//! - Freed pages go back to the filesystem to the end of the freelist, in
//!   slices between groups (decisions/0023).
//! - Only this module writes SQL; the rest of the agent speaks in
//!   [`Status`], rows and outcomes.

mod admin;
mod error;
mod filter;
mod key;
mod open;
mod reader;
mod room;
#[cfg(test)]
mod tests;
mod types;
mod write;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::StoreConfig;

pub(crate) use admin::{Admin, Discarded};
pub use error::StoreError;
pub(crate) use filter::{ListOrder, RowFilter};
pub use key::Database;
pub use open::{apply_schema, SCHEMA_VERSION};
pub use reader::Reader;
pub use types::{
    Backlog, Cursor, NewMessage, OutgoingRow, PurgeCutoffs, Status, StatusCounts, EXPIRED,
    MAX_PRIORITY,
};
pub(crate) use types::{
    ConsumeVerdict, Consumption, Delivered, Inserted, PublishOutcome, RetryPolicy, Row,
};
use writer::{Limits, WriteRequest};

/// How long closing the store waits for the writer thread.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The agent's handle on the database: the writer's channel and the readers.
/// Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Held for the agent's lifetime: one database, one agent.
    _lock: Arc<std::fs::File>,
    writer: mpsc::Sender<WriteRequest>,
    writer_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    new_rows: Arc<Notify>,
    /// The highest priority committed since the forwarder last asked
    /// ([`Store::take_new_priority`]), -1 for none.
    new_priority: Arc<AtomicI64>,
    reader: Reader,
    /// `publish.max_age` in ms: the expiry of a message without a `ttl`.
    default_ttl_ms: Option<i64>,
}

impl Store {
    /// Opens (creating if needed) the database and starts the writer thread
    /// (the start-up steps above), counting nowhere the rows purged to make
    /// room (the unit tests' store).
    #[cfg(test)]
    pub(crate) fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        Store::open_counting(config, Counter::default())
    }

    /// Opens (creating if needed) the database and starts the writer thread
    /// (the start-up steps above); the rows purged to make room under
    /// `store.max_db_size` are counted in `room_purged` (the metric).
    pub(crate) fn open_counting(
        config: &StoreConfig,
        room_purged: Counter,
    ) -> Result<Store, StoreError> {
        let database = Database::from_config(config)?;
        let path = config.path.clone();
        // Before anything touches the file: a second agent must not migrate
        // or write the live agent's database.
        let lock = open::lock_database(&path)?;
        let conn = open::open_writer_connection(&database, config.synchronous)?;
        let limits = Limits {
            max_pending: config.max_pending.get(),
            max_db_size: config.max_db_size.as_u64(),
            min_free_disk: config.min_free_disk.as_u64(),
            room_failed_grace_ms: i64::try_from(config.room_failed_grace.as_millis())
                .unwrap_or(i64::MAX),
        };
        let reader = Reader::open(&database)?;
        let new_rows = Arc::new(Notify::new());
        let new_priority = Arc::new(AtomicI64::new(-1));
        let (writer, thread) = writer::start(
            conn,
            path,
            limits,
            new_rows.clone(),
            new_priority.clone(),
            room_purged,
        )?;
        Ok(Store {
            _lock: Arc::new(lock),
            writer,
            writer_thread: Arc::new(Mutex::new(Some(thread))),
            new_rows,
            new_priority,
            reader,
            default_ttl_ms: None,
        })
    }

    /// Messages submitted without a `ttl` expire `max_age` after their
    /// submit (`publish.max_age`; docs/forwarding.md, Expiry).
    pub(crate) fn with_max_age(mut self, max_age: Option<Duration>) -> Store {
        self.default_ttl_ms = max_age.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        self
    }

    /// The highest priority of the rows committed since the last call, if
    /// any were: whether new rows go before the forwarder's cursor.
    pub(crate) fn take_new_priority(&self) -> Option<u8> {
        u8::try_from(self.new_priority.swap(-1, Ordering::AcqRel)).ok()
    }

    /// Queues `request` for the writer ([`StoreError::Closed`] once it stopped).
    async fn send(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.writer
            .send(request)
            .await
            .map_err(|_| StoreError::Closed)
    }

    /// Hands `message` to the writer now and returns the answer to await
    /// later, so one client's pipelined requests share a group commit. The
    /// answer resolves once its group is committed and synced (or refused,
    /// or failed: then nothing is stored).
    pub(crate) async fn enqueue_insert(
        &self,
        mut message: NewMessage,
    ) -> Result<PendingInsert, StoreError> {
        message.ttl_ms = message.ttl_ms.or(self.default_ttl_ms);
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Insert { message, reply }).await?;
        Ok(Pending(answer))
    }

    /// Hands publish outcomes to the writer; the answer resolves after their
    /// commit (they share group commits with the submits).
    pub(crate) async fn record_outcomes(
        &self,
        outcomes: Vec<PublishOutcome>,
        policy: RetryPolicy,
    ) -> Result<Pending<()>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Outcomes {
            outcomes,
            policy,
            reply,
        })
        .await?;
        Ok(Pending(answer))
    }

    /// Records a handler's result; resolves after the commit, with what to
    /// tell the broker.
    pub(crate) async fn record_consumption(
        &self,
        result: Consumption,
    ) -> Result<ConsumeVerdict, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Consumption { result, reply })
            .await?;
        Pending(answer).await
    }

    /// Deletes one batch of purgeable rows in its own transaction (shared
    /// with whatever else the writer holds); returns how many.
    pub(crate) async fn purge_batch(
        &self,
        cutoffs: PurgeCutoffs,
        limit: u32,
    ) -> Result<StatusCounts, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Purge {
            cutoffs,
            limit,
            reply,
        })
        .await?;
        Pending(answer).await
    }

    /// Moves up to `limit` delivering rows past their expiry to failed
    /// (`last_error` "expired") in one transaction; returns how many.
    pub(crate) async fn expire_batch(&self, limit: u32) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Expire { limit, reply }).await?;
        Pending(answer).await
    }

    /// Resolves once the writer has committed a group after this call: the
    /// watchdog's proof that writes make progress.
    pub(crate) async fn probe(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(WriteRequest::Probe { reply }).await?;
        Pending(answer).await
    }

    /// Notified after every commit that stored new rows: the forwarder's cue.
    pub(crate) fn new_rows(&self) -> Arc<Notify> {
        self.new_rows.clone()
    }

    pub(crate) fn reader(&self) -> &Reader {
        &self.reader
    }

    /// Commits what the writer holds, stops it, and waits for its thread
    /// (at most [`CLOSE_WAIT`]: a wedged writer must not hold up the exit;
    /// what it did not commit was not acknowledged).
    /// Requests sent afterwards get [`StoreError::Closed`].
    pub(crate) async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_WAIT, self.writer.send(WriteRequest::Stop)).await;
        let thread = self.writer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let joined = tokio::task::spawn_blocking(move || thread.join());
            if tokio::time::timeout(CLOSE_WAIT, joined).await.is_err() {
                tracing::error!("the store writer did not stop in time");
            }
        }
    }
}

/// A write's answer: resolves after the commit that holds it.
pub(crate) struct Pending<T>(oneshot::Receiver<Result<T, StoreError>>);

/// The answer to an [`Store::enqueue_insert`].
pub(crate) type PendingInsert = Pending<Inserted>;

impl<T> std::future::Future for Pending<T> {
    type Output = Result<T, StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(StoreError::Closed)))
    }
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub(crate) fn free_disk(path: &Path) -> Option<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    rustix::fs::statvfs(dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}
