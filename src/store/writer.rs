//! The writer: one connection on a dedicated thread that applies every write
//! of the agent, grouped (docs/storage.md, Durability).
//!
//! Owns the writer connection once the store is open, the request channel's
//! receiving end, and the count of delivering rows the `store.max_pending`
//! limit is checked against.
//!
//! Group commit: the thread takes every request waiting (up to
//! [`MAX_GROUP`]), applies them in one `BEGIN IMMEDIATE` transaction,
//! commits (one sync for the whole group), and only then answers each one.
//!
//! Invariants:
//! - No answer before the COMMIT that holds it returned.
//! - Any error in a group rolls back the whole group, and every request in
//!   it gets the error: nothing in it is acknowledged.
//! - Limits refuse, never evict: a submit past `store.max_pending`,
//!   `store.max_db_size` or `store.min_free_disk` is refused and nothing is
//!   deleted to make room (docs/storage.md, Limits).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Notify};

use super::error::{open_error, same_kind};
use super::write::{
    expire_batch, insert_one, purge_batch, reclaim, record_consumption, record_outcomes,
};
use super::{
    free_disk, now_ms, ConsumeVerdict, Consumption, Inserted, NewMessage, PublishOutcome,
    PurgeCutoffs, RetryPolicy, Status, StatusCounts, StoreError,
};

/// Requests one writer transaction takes at most.
const MAX_GROUP: usize = 4096;
/// How often the writer recounts the delivering rows exactly (the CLI's
/// `retry` adds delivering rows behind its back).
const DELIVERING_RECOUNT_EVERY: Duration = Duration::from_secs(5);

/// The writer's refusal thresholds (from `StoreConfig`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `store.max_pending`: the most delivering rows.
    pub(crate) max_pending: u64,
    pub(crate) max_db_size: u64,
    pub(crate) min_free_disk: u64,
}

/// One write for the writer thread, with where its answer goes.
pub(crate) enum WriteRequest {
    Insert {
        message: NewMessage,
        reply: oneshot::Sender<Result<Inserted, StoreError>>,
    },
    Outcomes {
        outcomes: Vec<PublishOutcome>,
        policy: RetryPolicy,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Consumption {
        result: Consumption,
        reply: oneshot::Sender<Result<ConsumeVerdict, StoreError>>,
    },
    Purge {
        cutoffs: PurgeCutoffs,
        limit: u32,
        reply: oneshot::Sender<Result<StatusCounts, StoreError>>,
    },
    /// Up to `limit` rows past their expiry become failed ("expired").
    Expire {
        limit: u32,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Liveness: answered after a commit, proving the writer turns.
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Commit what is queued, then end the thread.
    Stop,
}

/// Starts the writer thread on `conn`; returns the channel to it and the
/// thread to join.
pub(crate) fn start(
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    new_rows: Arc<Notify>,
    new_priority: Arc<AtomicI64>,
) -> Result<(mpsc::Sender<WriteRequest>, JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
    let mut writer = Writer::new(conn, path.clone(), limits, rx, new_rows)?;
    writer.new_priority = new_priority;
    let thread = std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer.run())
        .map_err(|e| open_error(&path, format!("cannot start the writer thread: {e}")))?;
    Ok((tx, thread))
}

/// Test hook (cargo feature `test-hooks`, never in a release build):
/// `EDGE_OUTBOX_WEDGE_FOR_TESTS=SECONDS` wedges the writer that long after
/// start, so tests can see the watchdog stop pinging.
#[cfg(feature = "test-hooks")]
mod wedge {
    use std::time::{Duration, Instant};

    const WEDGE_ENV: &str = "EDGE_OUTBOX_WEDGE_FOR_TESTS";

    /// When the writer wedges, if the environment asks for it.
    pub(super) fn wedge_for_tests() -> Option<Instant> {
        let seconds: f64 = std::env::var(WEDGE_ENV).ok()?.parse().ok()?;
        Some(Instant::now() + Duration::from_secs_f64(seconds.max(0.0)))
    }

    /// Parks the writer for good once `at` has passed.
    pub(super) fn wedge_if_due(at: Option<Instant>) {
        if at.is_some_and(|at| Instant::now() >= at) {
            tracing::warn!("store writer wedged on purpose ({WEDGE_ENV})");
            loop {
                std::thread::park();
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    requests: mpsc::Receiver<WriteRequest>,
    new_rows: Arc<Notify>,
    /// Raised to the highest priority of every group that stored rows,
    /// before `new_rows` is notified (the forwarder's cue to look back).
    new_priority: Arc<AtomicI64>,
    page_size: u64,
    /// Delivering rows, kept by the writer between exact recounts: the
    /// `store.max_pending` check must not count the table on every submit.
    delivering: u64,
    counted_at: Instant,
}

/// A request's answer, held until its group's COMMIT returns.
enum Reply {
    Insert(
        oneshot::Sender<Result<Inserted, StoreError>>,
        Result<Inserted, StoreError>,
    ),
    /// A request whose answer is only "committed".
    Done(oneshot::Sender<Result<(), StoreError>>),
    Consumption(
        oneshot::Sender<Result<ConsumeVerdict, StoreError>>,
        ConsumeVerdict,
    ),
    Purge(
        oneshot::Sender<Result<StatusCounts, StoreError>>,
        StatusCounts,
    ),
    Expire(oneshot::Sender<Result<u64, StoreError>>, u64),
}

impl Reply {
    /// Sends the answer: the request's own on success, the group's error else.
    fn send(self, group_error: Option<(&StoreError, &str)>) -> bool {
        match (self, group_error) {
            (Reply::Insert(tx, result), None) => {
                let inserted = matches!(result, Ok(Inserted { duplicate: false }));
                let _ = tx.send(result);
                inserted
            }
            (Reply::Insert(tx, _), Some((e, m))) => {
                let _ = tx.send(Err(same_kind(e, m)));
                false
            }
            (Reply::Done(tx), None) => {
                let _ = tx.send(Ok(()));
                false
            }
            (Reply::Done(tx), Some((e, m))) => {
                let _ = tx.send(Err(same_kind(e, m)));
                false
            }
            (Reply::Consumption(tx, verdict), None) => {
                let _ = tx.send(Ok(verdict));
                false
            }
            (Reply::Consumption(tx, _), Some((e, m))) => {
                let _ = tx.send(Err(same_kind(e, m)));
                false
            }
            (Reply::Purge(tx, deleted), None) => {
                let _ = tx.send(Ok(deleted));
                false
            }
            (Reply::Purge(tx, _), Some((e, m))) => {
                let _ = tx.send(Err(same_kind(e, m)));
                false
            }
            (Reply::Expire(tx, moved), None) => {
                let _ = tx.send(Ok(moved));
                false
            }
            (Reply::Expire(tx, _), Some((e, m))) => {
                let _ = tx.send(Err(same_kind(e, m)));
                false
            }
        }
    }
}

impl Writer {
    fn new(
        conn: Connection,
        path: PathBuf,
        limits: Limits,
        requests: mpsc::Receiver<WriteRequest>,
        new_rows: Arc<Notify>,
    ) -> Result<Writer, StoreError> {
        // SQLCipher answers `page_size` on a keyed database as text.
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| {
            Ok(match r.get::<_, rusqlite::types::Value>(0)? {
                rusqlite::types::Value::Integer(n) => n,
                rusqlite::types::Value::Text(t) => t.parse().unwrap_or(4096),
                _ => 4096,
            })
        })?;
        let mut writer = Writer {
            conn,
            path,
            limits,
            requests,
            new_rows,
            new_priority: Arc::new(AtomicI64::new(-1)),
            page_size: page_size.max(512) as u64,
            delivering: 0,
            counted_at: Instant::now(),
        };
        writer.recount_delivering()?;
        Ok(writer)
    }

    fn recount_delivering(&mut self) -> Result<(), StoreError> {
        let n: i64 = self.conn.query_row(
            "SELECT COUNT(*) FROM msg_log WHERE status = ?1",
            [Status::Delivering],
            |r| r.get(0),
        )?;
        self.delivering = n.max(0) as u64;
        self.counted_at = Instant::now();
        Ok(())
    }

    fn run(&mut self) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        #[cfg(feature = "test-hooks")]
        let wedge_at = wedge::wedge_for_tests();
        loop {
            let Some(first) = self.requests.blocking_recv() else {
                return;
            };
            #[cfg(feature = "test-hooks")]
            wedge::wedge_if_due(wedge_at);
            let mut stop = matches!(first, WriteRequest::Stop);
            group.push(first);
            while group.len() < MAX_GROUP {
                match self.requests.try_recv() {
                    Ok(WriteRequest::Stop) => stop = true,
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            self.commit_group(&mut group);
            if stop {
                self.requests.close();
                // Answer what raced in behind the stop.
                while let Ok(request) = self.requests.try_recv() {
                    group.push(request);
                }
                self.commit_group(&mut group);
                return;
            }
        }
    }

    /// Applies `group` in one transaction, commits, then answers each request.
    fn commit_group(&mut self, group: &mut Vec<WriteRequest>) {
        group.retain(|r| !matches!(r, WriteRequest::Stop));
        if group.is_empty() {
            return;
        }
        if self.counted_at.elapsed() > DELIVERING_RECOUNT_EVERY {
            let _ = self.recount_delivering();
        }
        let delivering_before = self.delivering;
        let purged = group
            .iter()
            .any(|r| matches!(r, WriteRequest::Purge { .. }));
        let mut replies = Vec::with_capacity(group.len());
        let mut top_priority = -1;
        let outcome = self.apply(group, &mut replies, &mut top_priority);
        let mut inserted_any = false;
        match outcome {
            Ok(()) => {
                for reply in replies {
                    inserted_any |= reply.send(None);
                }
            }
            Err(error) => {
                self.delivering = delivering_before;
                let message = error.to_string();
                for reply in replies {
                    reply.send(Some((&error, &message)));
                }
                tracing::warn!(error = %message, "write group rolled back, nothing in it acknowledged");
            }
        }
        if inserted_any {
            self.new_priority.fetch_max(top_priority, Ordering::AcqRel);
            self.new_rows.notify_one();
        }
        if purged {
            if let Err(e) = reclaim(&self.conn) {
                tracing::warn!(error = %e, "could not hand freed pages back to the filesystem");
            }
        }
    }

    /// Runs every request of `group` inside one `BEGIN IMMEDIATE` transaction
    /// and commits it. On error the transaction rolls back (on drop) and the
    /// caller answers every request with the error.
    fn apply(
        &mut self,
        group: &mut Vec<WriteRequest>,
        replies: &mut Vec<Reply>,
        top_priority: &mut i64,
    ) -> Result<(), StoreError> {
        let storage_refusal = self.storage_refusal();
        let (tx, result) = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => (Some(tx), Ok(())),
            Err(e) => (None, Err(e.into())),
        };
        let mut open = OpenGroup {
            tx,
            result,
            now: now_ms(),
            storage_refusal,
            limits: self.limits,
            delivering: &mut self.delivering,
            top_priority,
        };
        for request in group.drain(..) {
            open.apply(request, replies);
        }
        let OpenGroup { tx, result, .. } = open;
        result?;
        if let Some(tx) = tx {
            tx.commit()?;
        }
        Ok(())
    }

    /// Why a submit must be refused for lack of room, if it must.
    fn storage_refusal(&mut self) -> Option<String> {
        let pages: i64 = self
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap_or(0);
        let size = pages.max(0) as u64 * self.page_size;
        if size >= self.limits.max_db_size {
            return Some(format!(
                "the database is {} (store.max_db_size = {})",
                bytesize::ByteSize(size),
                bytesize::ByteSize(self.limits.max_db_size)
            ));
        }
        if self.limits.min_free_disk > 0 {
            if let Some(free) = free_disk(&self.path) {
                if free < self.limits.min_free_disk {
                    return Some(format!(
                        "{} free on the database's filesystem (store.min_free_disk = {})",
                        bytesize::ByteSize(free),
                        bytesize::ByteSize(self.limits.min_free_disk)
                    ));
                }
            }
        }
        None
    }
}

/// A group's transaction while its requests are applied.
struct OpenGroup<'a> {
    /// `None` when `BEGIN` itself failed.
    tx: Option<Transaction<'a>>,
    /// The first error; once set, later requests are only queued for their
    /// answer (the group's error), not applied.
    result: Result<(), StoreError>,
    now: i64,
    /// Why submits are refused in this group, if they are (checked once,
    /// before `BEGIN`).
    storage_refusal: Option<String>,
    limits: Limits,
    delivering: &'a mut u64,
    /// The highest priority of a row stored in this group (-1: none).
    top_priority: &'a mut i64,
}

impl OpenGroup<'_> {
    /// Applies one request (unless the group already failed) and queues its
    /// reply.
    fn apply(&mut self, request: WriteRequest, replies: &mut Vec<Reply>) {
        let tx = match (&self.tx, &self.result) {
            (Some(tx), Ok(())) => Some(tx),
            _ => None,
        };
        let now = self.now;
        let applied = match request {
            WriteRequest::Insert { message, reply } => {
                let refusal = self.storage_refusal.clone().map(StoreError::StorageFull);
                let priority = i64::from(message.priority);
                let (answer, applied) = split(
                    tx.map(|tx| {
                        insert_one(tx, message, now, refusal, self.delivering, self.limits)
                    }),
                    Ok(Inserted { duplicate: false }),
                );
                if applied.is_ok() && matches!(answer, Ok(Inserted { duplicate: false })) {
                    *self.top_priority = (*self.top_priority).max(priority);
                }
                replies.push(Reply::Insert(reply, answer));
                applied
            }
            WriteRequest::Outcomes {
                outcomes,
                policy,
                reply,
            } => {
                let (settled, applied) =
                    split(tx.map(|tx| record_outcomes(tx, &outcomes, policy, now)), 0);
                *self.delivering = self.delivering.saturating_sub(settled);
                replies.push(Reply::Done(reply));
                applied
            }
            WriteRequest::Consumption { result, reply } => {
                let ((verdict, left_delivering), applied) = split(
                    tx.map(|tx| record_consumption(tx, &result, now)),
                    (ConsumeVerdict::Ack, false),
                );
                if left_delivering {
                    *self.delivering = self.delivering.saturating_sub(1);
                }
                replies.push(Reply::Consumption(reply, verdict));
                applied
            }
            WriteRequest::Purge {
                cutoffs,
                limit,
                reply,
            } => {
                let (deleted, applied) = split(
                    tx.map(|tx| purge_batch(tx, cutoffs, limit)),
                    StatusCounts::default(),
                );
                replies.push(Reply::Purge(reply, deleted));
                applied
            }
            WriteRequest::Expire { limit, reply } => {
                let (moved, applied) = split(tx.map(|tx| expire_batch(tx, now, limit)), 0);
                *self.delivering = self.delivering.saturating_sub(moved);
                replies.push(Reply::Expire(reply, moved));
                applied
            }
            WriteRequest::Probe { reply } => {
                replies.push(Reply::Done(reply));
                Ok(())
            }
            WriteRequest::Stop => Ok(()),
        };
        if let Err(e) = applied {
            self.result = Err(e);
        }
    }
}

/// A request's own answer (`placeholder` when it was not applied, or failed:
/// a failed group answers with its error, never the placeholder), and the
/// error that fails the group, if any.
fn split<T>(applied: Option<Result<T, StoreError>>, placeholder: T) -> (T, Result<(), StoreError>) {
    match applied {
        Some(Ok(answer)) => (answer, Ok(())),
        Some(Err(e)) => (placeholder, Err(e)),
        None => (placeholder, Ok(())),
    }
}
