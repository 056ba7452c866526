//! Store: the `msg_log` table, the only place that speaks SQL.
//!
//! Role: keep every message the agent has acknowledged, durably, and every
//! state change of it, one transaction per change.
//!
//! Owns:
//! - the **writer**: one connection on a dedicated thread. Every write (a
//!   submit, a publish outcome, a consumer result) is a [`WriteRequest`] on
//!   its channel. The thread takes all requests waiting, applies them in one
//!   `BEGIN IMMEDIATE` transaction, commits (one sync for the whole group),
//!   and only then answers each request. This is group commit: many
//!   concurrent submits share one fsync, none is answered before it.
//! - the **readers**: an r2d2 pool of read-only connections for status,
//!   listings and the forwarder's pages. WAL lets them read while the writer
//!   writes.
//!
//! Invariants:
//! - A submit is answered `Ok` only after the COMMIT that holds its row
//!   returned; any error in the group (a full disk included) rolls back the
//!   whole group and every request in it gets the error: no ack.
//! - `synchronous` is read back after it is set; WAL is required.
//! - A corrupt database is reported ([`StoreError::Corrupt`]) and never
//!   replaced or repaired behind the operator's back.
//! - Limits refuse, never evict: past `max_pending`, `max_db_size` or
//!   `min_free_disk` a submit gets [`StoreError::BufferFull`] or
//!   [`StoreError::StorageFull`] and nothing is deleted to make room.
//!
//! Start-up steps ([`Store::open`]): open the file (creating it and its
//! directory), set and verify the pragmas, `quick_check`, apply the schema
//! migrations up to [`SCHEMA_VERSION`] through `PRAGMA user_version`, count
//! the pending rows, start the writer thread, open the reader pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::config::{StoreConfig, Synchronous};

/// Migrations, in order: entry `i` brings `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../../schema.sql")];
/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Requests one writer transaction takes at most.
const MAX_GROUP: usize = 4096;
/// How often the writer recounts the pending rows exactly (the CLI's `retry`
/// adds pending rows behind its back).
const PENDING_RECOUNT_EVERY: Duration = Duration::from_secs(5);
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing the store waits for the writer thread.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database {path} is corrupt ({details}); it was left untouched: \
         restore it from a backup, or move it aside to start empty"
    )]
    Corrupt { path: PathBuf, details: String },
    #[error("cannot open database {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "another edge-outbox agent is already using the database {0} \
         (it holds {0}.lock); one database, one agent"
    )]
    Locked(PathBuf),
    #[error("no database at {0} (the agent creates it on its first start)")]
    Missing(PathBuf),
    #[error(
        "database {path} has schema version {found}, newer than this agent's {known}: \
         upgrade the agent"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("{pending} messages are waiting to be forwarded (store.max_pending = {max})")]
    BufferFull { pending: u64, max: u64 },
    #[error("{0}")]
    StorageFull(String),
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("database reader pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("the store is shut down")]
    Closed,
    #[error("database write failed: {0}")]
    WriteFailed(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => StoreError::StorageFull(format!("disk full: {e}")),
            Some(ErrorCode::DatabaseCorrupt) | Some(ErrorCode::NotADatabase) => {
                StoreError::Corrupt {
                    path: PathBuf::new(),
                    details: e.to_string(),
                }
            }
            _ => StoreError::Sqlite(e),
        }
    }
}

/// Where a message is in its life. Only moves forward (see the spec), except
/// by an explicit `retry` (2 → 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Delivering = 0,
    Delivered = 1,
    Failed = 2,
    Consumed = 3,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Delivering,
        Status::Delivered,
        Status::Failed,
        Status::Consumed,
    ];

    pub fn from_code(code: i64) -> Option<Status> {
        Status::ALL.into_iter().find(|s| *s as i64 == code)
    }

    pub fn name(self) -> &'static str {
        match self {
            Status::Delivering => "delivering",
            Status::Delivered => "delivered",
            Status::Failed => "failed",
            Status::Consumed => "consumed",
        }
    }

    pub fn from_name(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A message accepted on the socket, ready to be stored.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    /// AMQP headers as a JSON object text.
    pub headers: Option<String>,
    pub content_type: String,
}

/// What storing a [`NewMessage`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    /// A row with this id already existed; nothing was stored.
    pub duplicate: bool,
}

/// One row of `msg_log`.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub id: String,
    pub status: Status,
    pub exchange: String,
    pub routing_key: String,
    pub try_count: i64,
    pub next_try_time: Option<i64>,
    pub create_time: Option<i64>,
    pub update_time: Option<i64>,
    pub last_error: Option<String>,
    pub headers: Option<String>,
    pub content_type: Option<String>,
    #[serde(skip)]
    pub body: Vec<u8>,
    /// `msg` is stored as TEXT (valid UTF-8) rather than a BLOB.
    #[serde(skip)]
    pub body_is_text: bool,
}

/// Rows per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StatusCounts {
    pub delivering: u64,
    pub delivered: u64,
    pub failed: u64,
    pub consumed: u64,
}

impl StatusCounts {
    /// Adds `n` rows of status code `status` (unknown codes are ignored).
    pub fn add(&mut self, status: i64, n: u64) {
        match Status::from_code(status) {
            Some(Status::Delivering) => self.delivering += n,
            Some(Status::Delivered) => self.delivered += n,
            Some(Status::Failed) => self.failed += n,
            Some(Status::Consumed) => self.consumed += n,
            None => {}
        }
    }

    pub fn total(&self) -> u64 {
        self.delivering + self.delivered + self.failed + self.consumed
    }

    /// Sums two counts.
    pub fn plus(self, other: StatusCounts) -> StatusCounts {
        StatusCounts {
            delivering: self.delivering + other.delivering,
            delivered: self.delivered + other.delivered,
            failed: self.failed + other.failed,
            consumed: self.consumed + other.consumed,
        }
    }
}

/// The writer's refusal thresholds (from [`StoreConfig`]).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_pending: u64,
    max_db_size: u64,
    min_free_disk: u64,
}

enum WriteRequest {
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
    /// Liveness: answered after a commit, proving the writer turns.
    Probe {
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Stop,
}

/// Rows the purge may delete: status 1 and 3 created before
/// `settled_before`, status 2 created before `failed_before`. Never status 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeCutoffs {
    pub settled_before: i64,
    pub failed_before: i64,
}

/// Deletes up to `limit` purgeable rows, oldest first; returns how many.
fn purge_batch(
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
fn reclaim(conn: &Connection) -> Result<(), StoreError> {
    // Bounded, like the purge batches: a whole backlog of free pages at once
    // would hold the write lock for as long as it takes to move them.
    conn.execute_batch(&format!("PRAGMA incremental_vacuum({RECLAIM_PAGES})"))?;
    Ok(())
}

/// Free pages handed back to the filesystem per step.
const RECLAIM_PAGES: u32 = 2048;

/// A delivery as the consumer saw it (enough to insert the row for a
/// message this agent did not publish).
#[derive(Debug, Clone)]
pub struct Delivered {
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Option<String>,
    pub content_type: Option<String>,
}

/// What the handler made of a delivery.
#[derive(Debug, Clone)]
pub enum Consumption {
    /// The handler succeeded: status 3 (from 0 or 1; inserted if missing).
    Succeeded(Delivered),
    /// The handler failed: one more attempt counted in `consume_count`; at
    /// `max_attempts` the row becomes status 2 (from 0 or 1).
    Failed {
        delivery: Delivered,
        error: String,
        max_attempts: u32,
    },
}

/// What the consumer does with the delivery after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeVerdict {
    /// Recorded as consumed (or already settled): ack.
    Ack,
    /// Failed `attempts` times, fewer than allowed: nack with requeue.
    Requeue { attempts: u32 },
    /// Failed for the last time: reject without requeue (dead-letter).
    GiveUp { attempts: u32 },
}

/// What one publish attempt of a row came to, as the store records it.
/// ("Unknown" outcomes are not recorded: the row simply stays due.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// Broker ack without a return: status 0 → 1.
    Delivered { id: String },
    /// Nack, return, channel closed because of it, or a confirm timeout on a
    /// live connection: one failed attempt.
    Rejected { id: String, error: String },
}

/// How failed attempts are spaced and when they end (from `[publish]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub retry_interval_ms: i64,
}

/// A row due for publishing, as the forwarder reads it.
#[derive(Debug, Clone)]
pub struct OutgoingRow {
    /// Insertion order: the backlog cursor.
    pub rowid: i64,
    pub id: String,
    pub body: Vec<u8>,
    pub exchange: String,
    pub routing_key: String,
    pub headers: Option<String>,
    pub content_type: Option<String>,
    pub create_time: Option<i64>,
}

/// The agent's handle on the database: the writer's channel and the readers.
/// Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Held for the agent's lifetime: one database, one agent.
    _lock: Arc<std::fs::File>,
    writer: mpsc::Sender<WriteRequest>,
    writer_thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    new_rows: Arc<Notify>,
    reader: Reader,
}

/// Read-only access: the reader pool. What the CLI uses when the agent is down.
#[derive(Clone)]
pub struct Reader {
    path: PathBuf,
    pool: r2d2::Pool<SqliteConnectionManager>,
}

/// Epoch milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn open_error(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Opens the writer connection, sets and checks its pragmas.
fn open_writer_connection(path: &Path, sync: Synchronous) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, e))?;
    }
    let conn = Connection::open(path).map_err(|e| open_error(path, e))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
        path: path.to_path_buf(),
        details: e.to_string(),
    };
    // A file that is not a database fails here, on the first read.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(corrupt)?;
    if version == 0 {
        // Must precede the first table: purge hands pages back to the filesystem.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(corrupt)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_error(
            path,
            format!("journal_mode is {mode}, WAL could not be set"),
        ));
    }
    let (want, code) = match sync {
        Synchronous::Full => ("FULL", 2),
        Synchronous::Normal => ("NORMAL", 1),
    };
    conn.execute_batch(&format!("PRAGMA synchronous = {want}"))?;
    let got: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if got != code {
        return Err(open_error(
            path,
            format!("synchronous is {got}, {want} could not be set"),
        ));
    }
    let check: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(corrupt)?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            details: check,
        });
    }
    migrate(&conn, path, version)?;
    Ok(conn)
}

/// Takes the exclusive lock on `<path>.lock` (released by the kernel when
/// the process ends, however it ends).
fn lock_database(path: &Path) -> Result<std::fs::File, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, e))?;
    }
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| open_error(&lock_path, e))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(file),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::Locked(path.to_path_buf())),
        Err(e) => Err(open_error(&lock_path, e)),
    }
}

fn migrate(conn: &Connection, path: &Path, found: i64) -> Result<(), StoreError> {
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let next = i as i64 + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {next}; COMMIT;"
        ))
        .map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            open_error(path, format!("schema migration to version {next}: {e}"))
        })?;
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database and starts the writer thread.
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let path = config.path.clone();
        // Before anything touches the file: a second agent must not migrate
        // or write the live agent's database.
        let lock = lock_database(&path)?;
        let conn = open_writer_connection(&path, config.synchronous)?;
        let limits = Limits {
            max_pending: config.max_pending,
            max_db_size: config.max_db_size.as_u64(),
            min_free_disk: config.min_free_disk.as_u64(),
        };
        let reader = Reader::open(&path)?;
        let (tx, rx) = mpsc::channel(MAX_GROUP * 4);
        let new_rows = Arc::new(Notify::new());
        let mut writer = Writer::new(conn, path.clone(), limits, rx, new_rows.clone())?;
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| open_error(&path, format!("cannot start the writer thread: {e}")))?;
        Ok(Store {
            _lock: Arc::new(lock),
            writer: tx,
            writer_thread: Arc::new(Mutex::new(Some(thread))),
            new_rows,
            reader,
        })
    }

    /// Stores `message` durably. Resolves once its group is committed and
    /// synced (or refused, or failed: then nothing is stored).
    pub async fn insert(&self, message: NewMessage) -> Result<Inserted, StoreError> {
        self.enqueue_insert(message).await?.await
    }

    /// Hands `message` to the writer now and returns the answer to await
    /// later, so one client's pipelined requests share a group commit.
    pub async fn enqueue_insert(&self, message: NewMessage) -> Result<PendingInsert, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest::Insert { message, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Pending(answer))
    }

    /// Hands publish outcomes to the writer; the answer resolves after their
    /// commit (they share group commits with the submits).
    pub async fn record_outcomes(
        &self,
        outcomes: Vec<PublishOutcome>,
        policy: RetryPolicy,
    ) -> Result<Pending<()>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest::Outcomes {
                outcomes,
                policy,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(Pending(answer))
    }

    /// Records a handler's result; resolves after the commit, with what to
    /// tell the broker.
    pub async fn record_consumption(
        &self,
        result: Consumption,
    ) -> Result<ConsumeVerdict, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest::Consumption { result, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Pending(answer).await
    }

    /// Deletes one batch of purgeable rows in its own transaction (shared
    /// with whatever else the writer holds); returns how many.
    pub async fn purge_batch(
        &self,
        cutoffs: PurgeCutoffs,
        limit: u32,
    ) -> Result<StatusCounts, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest::Purge {
                cutoffs,
                limit,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Pending(answer).await
    }

    /// Resolves once the writer has committed a group after this call: the
    /// watchdog's proof that writes make progress.
    pub async fn probe(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteRequest::Probe { reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        Pending(answer).await
    }

    /// Notified after every commit that stored new rows: the forwarder's cue.
    pub fn new_rows(&self) -> Arc<Notify> {
        self.new_rows.clone()
    }

    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// Commits what the writer holds, stops it, and waits for its thread
    /// (at most [`CLOSE_WAIT`]: a wedged writer must not hold up the exit;
    /// what it did not commit was not acknowledged).
    /// Requests sent afterwards get [`StoreError::Closed`].
    pub async fn close(&self) {
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
pub struct Pending<T>(oneshot::Receiver<Result<T, StoreError>>);

/// The answer to an [`Store::enqueue_insert`].
pub type PendingInsert = Pending<Inserted>;

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

/// Test hook: `EDGE_OUTBOX_WEDGE_FOR_TESTS=SECONDS` wedges the writer that
/// long after start, so tests can see the watchdog stop pinging.
const WEDGE_ENV: &str = "EDGE_OUTBOX_WEDGE_FOR_TESTS";

fn wedge_for_tests() -> Option<Instant> {
    let seconds: f64 = std::env::var(WEDGE_ENV).ok()?.parse().ok()?;
    Some(Instant::now() + Duration::from_secs_f64(seconds.max(0.0)))
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    path: PathBuf,
    limits: Limits,
    requests: mpsc::Receiver<WriteRequest>,
    new_rows: Arc<Notify>,
    page_size: u64,
    /// Status-0 rows, kept by the writer between exact recounts.
    pending: u64,
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
        }
    }
}

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

impl Writer {
    fn new(
        conn: Connection,
        path: PathBuf,
        limits: Limits,
        requests: mpsc::Receiver<WriteRequest>,
        new_rows: Arc<Notify>,
    ) -> Result<Writer, StoreError> {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let mut writer = Writer {
            conn,
            path,
            limits,
            requests,
            new_rows,
            page_size: page_size.max(512) as u64,
            pending: 0,
            counted_at: Instant::now(),
        };
        writer.recount_pending()?;
        Ok(writer)
    }

    fn recount_pending(&mut self) -> Result<(), StoreError> {
        let n: i64 =
            self.conn
                .query_row("SELECT COUNT(*) FROM msg_log WHERE status = 0", [], |r| {
                    r.get(0)
                })?;
        self.pending = n.max(0) as u64;
        self.counted_at = Instant::now();
        Ok(())
    }

    fn run(&mut self) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        let wedge_at = wedge_for_tests();
        loop {
            let Some(first) = self.requests.blocking_recv() else {
                return;
            };
            if wedge_at.is_some_and(|at| Instant::now() >= at) {
                tracing::warn!("store writer wedged on purpose ({WEDGE_ENV})");
                loop {
                    std::thread::park();
                }
            }
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
        if self.counted_at.elapsed() > PENDING_RECOUNT_EVERY {
            let _ = self.recount_pending();
        }
        let pending_before = self.pending;
        let purged = group
            .iter()
            .any(|r| matches!(r, WriteRequest::Purge { .. }));
        let mut replies = Vec::with_capacity(group.len());
        let outcome = self.apply(group, &mut replies);
        let mut inserted_any = false;
        match outcome {
            Ok(()) => {
                for reply in replies {
                    inserted_any |= reply.send(None);
                }
            }
            Err(error) => {
                self.pending = pending_before;
                let message = error.to_string();
                for reply in replies {
                    reply.send(Some((&error, &message)));
                }
                tracing::warn!(error = %message, "write group rolled back, nothing in it acknowledged");
            }
        }
        if inserted_any {
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
    ) -> Result<(), StoreError> {
        let storage_refusal = self.storage_refusal();
        let mut result: Result<(), StoreError> = Ok(());
        let tx = match self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
        {
            Ok(tx) => Some(tx),
            Err(e) => {
                result = Err(e.into());
                None
            }
        };
        let now = now_ms();
        for request in group.drain(..) {
            match request {
                WriteRequest::Insert { message, reply } => {
                    let answer = match (&tx, &result) {
                        (Some(tx), Ok(())) => {
                            let refusal = storage_refusal.clone().map(StoreError::StorageFull);
                            insert_one(tx, message, now, refusal, &mut self.pending, self.limits)
                        }
                        _ => Ok(Ok(Inserted { duplicate: false })),
                    };
                    match answer {
                        Ok(answer) => replies.push(Reply::Insert(reply, answer)),
                        Err(e) => {
                            result = Err(e);
                            replies.push(Reply::Insert(reply, Ok(Inserted { duplicate: false })));
                        }
                    }
                }
                WriteRequest::Outcomes {
                    outcomes,
                    policy,
                    reply,
                } => {
                    if let (Some(tx), Ok(())) = (&tx, &result) {
                        match record_outcomes(tx, &outcomes, policy, now) {
                            Ok(settled) => self.pending = self.pending.saturating_sub(settled),
                            Err(e) => result = Err(e),
                        }
                    }
                    replies.push(Reply::Done(reply));
                }
                WriteRequest::Consumption {
                    result: consumption,
                    reply,
                } => {
                    let mut verdict = ConsumeVerdict::Ack;
                    if let (Some(tx), Ok(())) = (&tx, &result) {
                        match record_consumption(tx, &consumption, now) {
                            Ok((v, left_pending)) => {
                                verdict = v;
                                if left_pending {
                                    self.pending = self.pending.saturating_sub(1);
                                }
                            }
                            Err(e) => result = Err(e),
                        }
                    }
                    replies.push(Reply::Consumption(reply, verdict));
                }
                WriteRequest::Purge {
                    cutoffs,
                    limit,
                    reply,
                } => {
                    let mut deleted = StatusCounts::default();
                    if let (Some(tx), Ok(())) = (&tx, &result) {
                        match purge_batch(tx, cutoffs, limit) {
                            Ok(n) => deleted = n,
                            Err(e) => result = Err(e),
                        }
                    }
                    replies.push(Reply::Purge(reply, deleted));
                }
                WriteRequest::Probe { reply } => replies.push(Reply::Done(reply)),
                WriteRequest::Stop => {}
            }
        }
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

/// Stores one message inside the group's transaction. The outer `Err` is a
/// database failure (the group rolls back); the inner result is this
/// message's answer (stored, duplicate, or refused for lack of room).
fn insert_one(
    tx: &rusqlite::Transaction<'_>,
    message: NewMessage,
    now: i64,
    storage_refusal: Option<StoreError>,
    pending: &mut u64,
    limits: Limits,
) -> Result<Result<Inserted, StoreError>, StoreError> {
    let refusal = storage_refusal.or_else(|| {
        (*pending >= limits.max_pending).then_some(StoreError::BufferFull {
            pending: *pending,
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
    *pending += 1;
    Ok(Ok(Inserted { duplicate: false }))
}

/// Records a handler's result. Returns the verdict and whether the row
/// left status 0.
fn record_consumption(
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
fn record_outcomes(
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

/// A copy of a group's error for each of its requests.
fn same_kind(error: &StoreError, message: &str) -> StoreError {
    match error {
        StoreError::StorageFull(_) => StoreError::StorageFull(message.to_string()),
        StoreError::Closed => StoreError::Closed,
        _ => StoreError::WriteFailed(message.to_string()),
    }
}

/// The body as SQLite stores it: TEXT when it is UTF-8, else a BLOB.
fn body_value(body: Vec<u8>) -> rusqlite::types::Value {
    match String::from_utf8(body) {
        Ok(text) => rusqlite::types::Value::Text(text),
        Err(e) => rusqlite::types::Value::Blob(e.into_bytes()),
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
pub fn free_disk(path: &Path) -> Option<u64> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    rustix::fs::statvfs(dir)
        .ok()
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
}

const ROW_COLUMNS: &str = "id, status, exchange, routing_key, try_count, next_try_time, \
     create_time, update_time, last_error, headers, content_type, msg";

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let code: i64 = r.get(1)?;
    let (body, body_is_text) = match r.get_ref(11)? {
        rusqlite::types::ValueRef::Text(t) => (t.to_vec(), true),
        rusqlite::types::ValueRef::Blob(b) => (b.to_vec(), false),
        _ => (Vec::new(), true),
    };
    Ok(Row {
        id: r.get(0)?,
        status: Status::from_code(code).unwrap_or(Status::Failed),
        exchange: r.get(2)?,
        routing_key: r.get(3)?,
        try_count: r.get(4)?,
        next_try_time: r.get(5)?,
        create_time: r.get(6)?,
        update_time: r.get(7)?,
        last_error: r.get(8)?,
        headers: r.get(9)?,
        content_type: r.get(10)?,
        body,
        body_is_text,
    })
}

impl Reader {
    /// Opens read-only connections on an existing database.
    pub fn open(path: &Path) -> Result<Reader, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        let manager = SqliteConnectionManager::file(path)
            .with_flags(OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .with_init(|c| c.busy_timeout(BUSY_TIMEOUT));
        let pool = r2d2::Pool::builder()
            .max_size(4)
            .min_idle(Some(0))
            .build(manager)?;
        Ok(Reader {
            path: path.to_path_buf(),
            pool,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, StoreError> {
        Ok(self.pool.get()?)
    }

    pub fn counts(&self) -> Result<StatusCounts, StoreError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare_cached("SELECT status, COUNT(*) FROM msg_log GROUP BY status")?;
        let mut counts = StatusCounts::default();
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (status, n) = row?;
            counts.add(status, n.max(0) as u64);
        }
        Ok(counts)
    }

    /// `create_time` of the oldest status-0 row.
    pub fn oldest_pending(&self) -> Result<Option<i64>, StoreError> {
        let conn = self.conn()?;
        let t = conn
            .query_row(
                "SELECT create_time FROM msg_log WHERE status = 0 ORDER BY rowid LIMIT 1",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?;
        Ok(t.flatten())
    }

    /// Bytes of the database file and its WAL.
    pub fn db_size(&self) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        [self.path.as_path(), wal.as_path()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Up to `limit` rows, newest first, optionally of one status.
    pub fn list(&self, status: Option<Status>, limit: u64) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match status {
            Some(s) => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM msg_log WHERE status = ?1 ORDER BY rowid DESC LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![s as i64, limit], row_from)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM msg_log ORDER BY rowid DESC LIMIT ?1"
                ))?;
                let rows = stmt.query_map(params![limit], row_from)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(rows)
    }

    /// Up to `limit` status-0 rows after `after_rowid` that are due at `now`,
    /// oldest first: one page of the forwarder's backlog.
    pub fn due_page(
        &self,
        after_rowid: i64,
        now: i64,
        limit: usize,
    ) -> Result<Vec<OutgoingRow>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT rowid, id, msg, exchange, routing_key, headers, content_type, create_time \
             FROM msg_log WHERE status = 0 AND rowid > ?1 \
             AND (next_try_time IS NULL OR next_try_time <= ?2) ORDER BY rowid LIMIT ?3",
        )?;
        let rows = stmt.query_map(
            params![after_rowid, now, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                let body = match r.get_ref(2)? {
                    rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                        t.to_vec()
                    }
                    _ => Vec::new(),
                };
                Ok(OutgoingRow {
                    rowid: r.get(0)?,
                    id: r.get(1)?,
                    body,
                    exchange: r.get(3)?,
                    routing_key: r.get(4)?,
                    headers: r.get(5)?,
                    content_type: r.get(6)?,
                    create_time: r.get(7)?,
                })
            },
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// How many rows a purge with `cutoffs` would delete, per status.
    pub fn purgeable(&self, cutoffs: PurgeCutoffs) -> Result<StatusCounts, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT status, COUNT(*) FROM msg_log WHERE status IN (1, 3) AND create_time < ?1 \
             GROUP BY status \
             UNION ALL \
             SELECT status, COUNT(*) FROM msg_log WHERE status = 2 AND create_time < ?2 \
             GROUP BY status",
        )?;
        let rows = stmt.query_map(
            params![cutoffs.settled_before, cutoffs.failed_before],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
        )?;
        let mut counts = StatusCounts::default();
        for row in rows {
            let (status, n) = row?;
            counts.add(status, n.max(0) as u64);
        }
        Ok(counts)
    }

    /// The status of row `id`, if there is one.
    pub fn status_of(&self, id: &str) -> Result<Option<Status>, StoreError> {
        let conn = self.conn()?;
        let code: Option<i64> = conn
            .prepare_cached("SELECT status FROM msg_log WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        Ok(code.and_then(Status::from_code))
    }

    pub fn get(&self, id: &str) -> Result<Option<Row>, StoreError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM msg_log WHERE id = ?1"))?;
        Ok(stmt.query_row(params![id], row_from).optional()?)
    }
}

/// Operator changes made from the CLI, on a connection of their own (the
/// agent may be running: WAL and the busy timeout let both write).
pub struct Admin {
    conn: Connection,
}

impl Admin {
    pub fn open(path: &Path) -> Result<Admin, StoreError> {
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
    pub fn retry(&mut self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut skipped = Vec::new();
        {
            let mut stmt = tx.prepare(
                "UPDATE msg_log SET status = 0, try_count = 0, next_try_time = ?1, \
                 update_time = ?1, consume_count = 0 WHERE id = ?2 AND status = 2",
            )?;
            for id in ids {
                if stmt.execute(params![now, id])? == 0 {
                    skipped.push(id.clone());
                }
            }
        }
        tx.commit()?;
        Ok(skipped)
    }

    /// One purge batch in its own `BEGIN IMMEDIATE` transaction.
    pub fn purge_batch(
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

    /// Hands one step of freed pages back to the filesystem, and
    /// checkpoints the WAL this connection wrote, so that the agent's next
    /// commit does not pay for it.
    pub fn reclaim(&mut self) -> Result<(), StoreError> {
        reclaim(&self.conn)?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    }

    /// Moves every failed row back to delivering. Returns how many.
    pub fn retry_failed(&mut self) -> Result<u64, StoreError> {
        let now = now_ms();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE msg_log SET status = 0, try_count = 0, next_try_time = ?1, \
             update_time = ?1, consume_count = 0 WHERE status = 2",
            params![now],
        )?;
        tx.commit()?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn schema_version_is_set_and_reopen_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let conn = open_writer_connection(&cfg.path, Synchronous::Full).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        drop(conn);
        open_writer_connection(&cfg.path, Synchronous::Full).unwrap();
    }

    #[test]
    fn garbage_file_is_reported_corrupt_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let junk = vec![0x42u8; 8192];
        std::fs::write(&cfg.path, &junk).unwrap();
        let err = open_writer_connection(&cfg.path, Synchronous::Full).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&cfg.path).unwrap(), junk);
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
        let admin = Admin::open(&dir.path().join("t.db")).unwrap();
        for (id, status, days) in rows {
            admin
                .conn
                .execute(
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
