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
//! Between groups, the writer hands freed pages back to the filesystem in
//! bounded slices (`PRAGMA incremental_vacuum`, [`RECLAIM_BUDGET`] each,
//! committed without a sync and checkpointed at once),
//! one slice after each group, until the freelist is empty: after a purge,
//! and at start when the file holds free pages (decisions/0023).
//!
//! Invariants:
//! - No answer before the COMMIT that holds it returned.
//! - Any error in a group rolls back the whole group, and every request in
//!   it gets the error: nothing in it is acknowledged.
//! - A submit past `store.max_pending` or `store.min_free_disk` is refused
//!   and nothing is deleted to make room; at `store.max_db_size` (live data)
//!   settled rows are purged to make room first (`room.rs`), never a
//!   delivering row, and only then is a submit refused (docs/storage.md,
//!   Limits).
//! - A reclaim slice never runs inside a group, and a waiting group never
//!   waits for more than one slice.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Notify};

use prometheus_client::metrics::counter::Counter;

use super::error::{open_error, same_kind};
use super::room::{make_room, Room};
use super::write::{
    expire_batch, insert_one, purge_batch, reclaim_slice, record_consumption, record_outcomes,
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
/// Longest one reclaim slice holds the write lock: a submit that arrives
/// during a reclaim waits for this at most, plus its own group.
pub(crate) const RECLAIM_BUDGET: Duration = Duration::from_millis(5);
/// At most one log line per this period about rows purged to make room.
const ROOM_LOG_EVERY: Duration = Duration::from_secs(10);

/// The writer's refusal thresholds (from `StoreConfig`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// `store.max_pending`: the most delivering rows.
    pub(crate) max_pending: u64,
    /// `store.max_db_size`, measured as live data.
    pub(crate) max_db_size: u64,
    pub(crate) min_free_disk: u64,
    /// `store.room_failed_grace` in ms: failed rows older than this may be
    /// purged to make room.
    pub(crate) room_failed_grace_ms: i64,
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
    room_purged: Counter,
) -> Result<(mpsc::Sender<WriteRequest>, JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
    let mut writer = Writer::new(conn, path.clone(), limits, rx, new_rows, room_purged)?;
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
    /// `PRAGMA synchronous` as configured, restored after each reclaim slice.
    synchronous: i64,
    /// Free pages wait to be handed back to the filesystem.
    reclaim_due: bool,
    /// The reclaim under way: pages handed back and when it began.
    reclaimed: u64,
    reclaim_started: Option<Instant>,
    /// Rows purged to make room (the metric).
    room_purged: Counter,
    /// Rows purged to make room not yet logged, and when the last line was.
    room_unlogged: StatusCounts,
    room_logged_at: Option<Instant>,
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
                let inserted = matches!(
                    result,
                    Ok(Inserted {
                        duplicate: false,
                        ..
                    })
                );
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
        room_purged: Counter,
    ) -> Result<Writer, StoreError> {
        // SQLCipher answers `page_size` on a keyed database as text.
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| {
            Ok(match r.get::<_, rusqlite::types::Value>(0)? {
                rusqlite::types::Value::Integer(n) => n,
                rusqlite::types::Value::Text(t) => t.parse().unwrap_or(4096),
                _ => 4096,
            })
        })?;
        // Free pages left by an interrupted reclaim (or an older agent's
        // one-page reclaim) go back at start.
        let free_pages: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
        let synchronous: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
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
            synchronous,
            reclaim_due: free_pages > 0,
            reclaimed: 0,
            reclaim_started: None,
            room_purged,
            room_unlogged: StatusCounts::default(),
            room_logged_at: None,
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
            // One reclaim slice between groups, then the group waiting, if
            // any: neither waits for more than one of the other.
            if self.reclaim_due && !self.reclaim_step() {
                return;
            }
            let first = if self.reclaim_due {
                match self.requests.try_recv() {
                    Ok(request) => request,
                    Err(mpsc::error::TryRecvError::Empty) => continue,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            } else {
                match self.requests.blocking_recv() {
                    Some(request) => request,
                    None => return,
                }
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
            Ok(room_purged) => {
                for reply in replies {
                    inserted_any |= reply.send(None);
                }
                if room_purged.total() > 0 {
                    self.note_room_purged(room_purged);
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
            self.reclaim_due = true;
        }
    }

    /// One reclaim slice; at the end of the freelist, one log line and a
    /// passive checkpoint (in WAL mode the file shrinks when the checkpoint
    /// copies the commit that shortened it). Returns false when the writer
    /// must stop: its connection could not be made as durable as
    /// configured again (requests then get [`StoreError::Closed`]).
    fn reclaim_step(&mut self) -> bool {
        let started = *self.reclaim_started.get_or_insert_with(Instant::now);
        // A slice's commit carries no acknowledged data: it need not wait
        // for a sync (losing it to a power cut loses nothing), and the next
        // group's commit syncs the WAL it wrote.
        let relaxed = self.conn.execute_batch("PRAGMA synchronous = NORMAL");
        let sliced = reclaim_slice(&self.conn, RECLAIM_BUDGET);
        // Copy the slice's frames to the file now, a slice's worth at a time:
        // left to the automatic checkpoint they would be copied 1000 pages
        // at once, inside whichever commit crosses the mark, a submit's too.
        let _ = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        if relaxed.is_ok() {
            let restore = format!("PRAGMA synchronous = {}", self.synchronous);
            if let Err(e) = self.conn.execute_batch(&restore) {
                // Never commit a submit less durably than configured: a
                // writer that cannot restore it stops writing.
                tracing::error!(error = %e, "cannot restore PRAGMA synchronous after a reclaim slice; the writer stops");
                return false;
            }
        }
        match sliced {
            Ok(slice) => {
                self.reclaimed += slice.pages;
                if !slice.done {
                    return true;
                }
                if self.reclaimed > 0 {
                    let _ = self
                        .conn
                        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    tracing::info!(
                        pages = self.reclaimed,
                        bytes = self.reclaimed * self.page_size,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "freed pages handed back to the filesystem"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not hand freed pages back to the filesystem");
            }
        }
        self.reclaim_due = false;
        self.reclaimed = 0;
        self.reclaim_started = None;
        true
    }

    /// Counts the rows a committed group purged to make room, and logs them
    /// at most once per [`ROOM_LOG_EVERY`].
    fn note_room_purged(&mut self, purged: StatusCounts) {
        self.room_purged.inc_by(purged.total());
        self.room_unlogged = self.room_unlogged.plus(purged);
        let due = self
            .room_logged_at
            .is_none_or(|at| at.elapsed() >= ROOM_LOG_EVERY);
        if due && self.room_unlogged.total() > 0 {
            let rows = self.room_unlogged;
            tracing::info!(
                delivered = rows.delivered,
                consumed = rows.consumed,
                failed = rows.failed,
                "settled rows purged to make room under store.max_db_size"
            );
            self.room_unlogged = StatusCounts::default();
            self.room_logged_at = Some(Instant::now());
        }
    }

    /// Runs every request of `group` inside one `BEGIN IMMEDIATE` transaction
    /// and commits it; returns the rows purged to make room for its submits.
    /// On error the transaction rolls back (on drop) and the caller answers
    /// every request with the error.
    fn apply(
        &mut self,
        group: &mut Vec<WriteRequest>,
        replies: &mut Vec<Reply>,
        top_priority: &mut i64,
    ) -> Result<StatusCounts, StoreError> {
        let inserts = group
            .iter()
            .any(|r| matches!(r, WriteRequest::Insert { .. }));
        let disk_refusal = if inserts { self.disk_refusal() } else { None };
        let now = now_ms();
        let (page_size, limits) = (self.page_size, self.limits);
        let (tx, mut result) = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => (Some(tx), Ok(())),
            Err(e) => (None, Err(e.into())),
        };
        // Making room only helps the size limit: deleting rows gives no disk
        // back (their pages stay in the file, for new rows).
        let mut room = Room::default();
        if let (Some(tx), true, None) = (&tx, inserts, &disk_refusal) {
            let failed_before = now.saturating_sub(limits.room_failed_grace_ms);
            match make_room(tx, page_size, limits.max_db_size, failed_before) {
                Ok(made) => room = made,
                Err(e) => result = Err(e),
            }
        }
        let made_room = if room.refusal.is_none() {
            room.purged.total()
        } else {
            0
        };
        let mut open = OpenGroup {
            tx,
            result,
            now,
            storage_refusal: disk_refusal.or(room.refusal),
            made_room,
            limits,
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
        Ok(room.purged)
    }

    /// Why a submit must be refused for lack of free disk, if it must (the
    /// size limit is `room.rs`'s, inside the group's transaction).
    fn disk_refusal(&self) -> Option<String> {
        if self.limits.min_free_disk == 0 {
            return None;
        }
        let free = free_disk(&self.path)?;
        (free < self.limits.min_free_disk).then(|| {
            format!(
                "{} free on the database's filesystem (store.min_free_disk = {})",
                bytesize::ByteSize(free),
                bytesize::ByteSize(self.limits.min_free_disk)
            )
        })
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
    /// at its start).
    storage_refusal: Option<String>,
    /// Rows purged to make room for this group's submits (each stored one
    /// says so in its answer).
    made_room: u64,
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
                let (mut answer, applied) = split(
                    tx.map(|tx| {
                        insert_one(tx, message, now, refusal, self.delivering, self.limits)
                    }),
                    Ok(Inserted::default()),
                );
                if let (Ok(()), Ok(inserted)) = (&applied, &mut answer) {
                    if !inserted.duplicate {
                        inserted.made_room = self.made_room;
                        *self.top_priority = (*self.top_priority).max(priority);
                    }
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
