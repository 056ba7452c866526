//! Readers: the pooled read-only connections and every query that only
//! reads `msg_log` (status, listings, the forwarder's pages, purge previews).
//!
//! Owns [`Reader`] and the row decoding.
//!
//! Invariants:
//! - Read-only connections (`SQLITE_OPEN_READ_ONLY`): nothing here can
//!   write, so the writer's group commit is the only writer in the agent.
//! - WAL lets readers run while the writer writes; a reader sees the last
//!   committed state, never a group in progress.
//! - Opening a reader never creates a database: no file is
//!   [`StoreError::Missing`] (the CLI must not create one by looking).
//! - Opening a reader fails at once with the real cause when the file cannot
//!   be read (permission denied, not a database, corrupt): one connection is
//!   opened and read before the pool is built, because the pool itself
//!   retries a failing connection until its timeout and then reports only
//!   "timed out" (docs/cli.md, Exit codes: the CLI fails within 2 s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{named_params, params, OpenFlags, OptionalExtension};

use super::error::open_error;
use super::filter::{ListOrder, RowFilter};
use super::open::BUSY_TIMEOUT;
use super::types::{Backlog, Cursor, EXPIRED, MAX_PRIORITY};
use super::{Database, OutgoingRow, PurgeCutoffs, Row, Status, StatusCounts, StoreError};
use crate::config::Order;

/// Read-only access: the reader pool. What the CLI uses when the agent is down.
#[derive(Clone)]
pub struct Reader {
    path: PathBuf,
    pool: r2d2::Pool<SqliteConnectionManager>,
}

const ROW_COLUMNS: &str = "id, status, exchange, routing_key, try_count, next_try_time, \
     create_time, update_time, last_error, headers, content_type, msg, priority, expire_time";

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    let (body, body_is_text) = match r.get_ref(11)? {
        rusqlite::types::ValueRef::Text(t) => (t.to_vec(), true),
        rusqlite::types::ValueRef::Blob(b) => (b.to_vec(), false),
        _ => (Vec::new(), true),
    };
    Ok(Row {
        id: r.get(0)?,
        status: r.get(1)?,
        exchange: r.get(2)?,
        routing_key: r.get(3)?,
        try_count: r.get(4)?,
        next_try_time: r.get(5)?,
        create_time: r.get(6)?,
        update_time: r.get(7)?,
        last_error: r.get(8)?,
        headers: r.get(9)?,
        content_type: r.get(10)?,
        priority: r.get(12)?,
        expire_time: r.get(13)?,
        body,
        body_is_text,
    })
}

/// The forwarder's page within one priority, oldest first: `:status` is
/// [`Status::Delivering`]. A row past its expiry is not due: the expiry
/// sweep settles it (docs/forwarding.md, Expiry).
const DUE_PAGE_OLDEST_SQL: &str = "SELECT rowid, id, msg, exchange, routing_key, headers, \
     content_type, create_time, priority, expire_time FROM msg_log \
     WHERE status = :status AND priority = :priority AND rowid > :after \
     AND (next_try_time IS NULL OR next_try_time <= :now) \
     AND (expire_time IS NULL OR expire_time > :now) ORDER BY rowid LIMIT :limit";

/// [`DUE_PAGE_OLDEST_SQL`], newest first: the same index walked backwards.
const DUE_PAGE_NEWEST_SQL: &str = "SELECT rowid, id, msg, exchange, routing_key, headers, \
     content_type, create_time, priority, expire_time FROM msg_log \
     WHERE status = :status AND priority = :priority AND rowid < :after \
     AND (next_try_time IS NULL OR next_try_time <= :now) \
     AND (expire_time IS NULL OR expire_time > :now) ORDER BY rowid DESC LIMIT :limit";

/// One delivering row by id, with the columns of the due pages.
const OUTGOING_SQL: &str = "SELECT rowid, id, msg, exchange, routing_key, headers, \
     content_type, create_time, priority, expire_time FROM msg_log WHERE status = ?2 AND id = ?1";

/// A row of [`DUE_PAGE_SQL`] or [`OUTGOING_SQL`].
fn outgoing_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<OutgoingRow> {
    let body = match r.get_ref(2)? {
        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => t.to_vec(),
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
        priority: r.get(8)?,
        expire_time: r.get(9)?,
    })
}

/// One `(status, COUNT(*))` row.
fn count_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Status, u64)> {
    Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64))
}

/// Opens one connection as the pool would and reads the schema, so that a
/// file that cannot be read fails here, with its cause.
fn probe(database: &Database) -> Result<(), StoreError> {
    let path = database.path();
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Missing(path.to_path_buf()))
        }
        // Permission denied on the directory: say so, not "no database".
        Err(e) => return Err(open_error(path, e)),
    }
    // SQLite says only "unable to open database file"; the OS says why.
    std::fs::File::open(path).map_err(|e| open_error(path, e))?;
    database.connect(READ_FLAGS).map_err(|e| match e {
        e
        @ (StoreError::Corrupt { .. } | StoreError::WrongKey { .. } | StoreError::Open { .. }) => e,
        other => open_error(path, other),
    })?;
    Ok(())
}

/// How the reader's connections are opened: read-only, each used by one
/// thread at a time.
const READ_FLAGS: OpenFlags =
    OpenFlags::SQLITE_OPEN_READ_ONLY.union(OpenFlags::SQLITE_OPEN_NO_MUTEX);

/// How long a query waits for a free pooled connection. Longer than
/// [`BUSY_TIMEOUT`], so a pooled connection stuck behind the write lock is
/// reported as busy by SQLite, not as a pool timeout; shorter than r2d2's
/// 30 s, so a database that becomes unreadable while the agent runs is
/// reported within seconds.
const POOL_WAIT: Duration = Duration::from_secs(10);

impl Reader {
    /// Opens read-only connections on an existing database; the file's
    /// problem, if it has one, is the error (see the invariants above).
    pub(crate) fn open(database: &Database) -> Result<Reader, StoreError> {
        probe(database)?;
        let path = database.path();
        let keyed = database.clone();
        let manager = SqliteConnectionManager::file(path)
            .with_flags(READ_FLAGS)
            .with_init(move |c| {
                keyed.unlock(c)?;
                c.busy_timeout(BUSY_TIMEOUT)
            });
        let pool = r2d2::Pool::builder()
            .max_size(4)
            .min_idle(Some(0))
            .connection_timeout(POOL_WAIT)
            .build(manager)?;
        Ok(Reader {
            path: path.to_path_buf(),
            pool,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<r2d2::PooledConnection<SqliteConnectionManager>, StoreError> {
        Ok(self.pool.get()?)
    }

    pub(crate) fn counts(&self) -> Result<StatusCounts, StoreError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare_cached("SELECT status, COUNT(*) FROM msg_log GROUP BY status")?;
        let mut counts = StatusCounts::default();
        let rows = stmt.query_map([], count_from)?;
        for row in rows {
            let (status, n) = row?;
            counts.add(status, n);
        }
        Ok(counts)
    }

    /// `create_time` of the oldest delivering row.
    pub(crate) fn oldest_delivering(&self) -> Result<Option<i64>, StoreError> {
        let conn = self.conn()?;
        let t = conn
            .query_row(
                "SELECT create_time FROM msg_log WHERE status = ?1 ORDER BY rowid LIMIT 1",
                [Status::Delivering],
                |r| r.get::<_, Option<i64>>(0),
            )
            .optional()?;
        Ok(t.flatten())
    }

    /// Bytes of the database file and its WAL.
    pub(crate) fn db_size(&self) -> u64 {
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        [self.path.as_path(), wal.as_path()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Up to `limit` rows that `filter` selects, in `order`.
    pub(crate) fn list(
        &self,
        filter: &RowFilter,
        order: ListOrder,
        limit: u64,
    ) -> Result<Vec<Row>, StoreError> {
        let mut rows = Vec::new();
        self.visit(filter, order, Some(limit), |row| {
            rows.push(row);
            Ok::<(), StoreError>(())
        })?;
        Ok(rows)
    }

    /// Hands each row that `filter` selects to `each`, in `order`, at most
    /// `limit` of them; returns how many. Rows are read one at a time (an
    /// export of a million rows holds one in memory), all from one
    /// snapshot: the statement's read transaction.
    pub(crate) fn visit<E: From<StoreError>>(
        &self,
        filter: &RowFilter,
        order: ListOrder,
        limit: Option<u64>,
        mut each: impl FnMut(Row) -> Result<(), E>,
    ) -> Result<u64, E> {
        let conn = self.conn()?;
        let clause = filter.clause(true);
        let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        let sql = format!(
            "SELECT {ROW_COLUMNS} FROM msg_log WHERE {} {} LIMIT :limit",
            clause.condition,
            order.sql()
        );
        let mut stmt = conn.prepare(&sql).map_err(StoreError::from)?;
        let params = clause.params(&[(":limit", &limit)]);
        let mut rows = stmt.query(params.as_slice()).map_err(StoreError::from)?;
        let mut n = 0;
        while let Some(r) = rows.next().map_err(StoreError::from)? {
            each(row_from(r).map_err(StoreError::from)?)?;
            n += 1;
        }
        Ok(n)
    }

    /// Up to `limit` delivering rows due at `now` after `cursor`, in the
    /// backlog's order: highest priority first, and within a priority
    /// `order` by rowid (docs/forwarding.md, Passes). One page of the
    /// forwarder's backlog; each priority is one index range scan, so a page
    /// costs the same whatever the backlog's size.
    pub(crate) fn due_page(
        &self,
        cursor: Cursor,
        order: Order,
        now: i64,
        limit: usize,
    ) -> Result<Vec<OutgoingRow>, StoreError> {
        let conn = self.conn()?;
        let sql = match order {
            Order::OldestFirst => DUE_PAGE_OLDEST_SQL,
            Order::NewestFirst => DUE_PAGE_NEWEST_SQL,
        };
        let mut stmt = conn.prepare_cached(sql)?;
        let mut page = Vec::new();
        let mut at = cursor;
        loop {
            let after = at.rowid.unwrap_or(match order {
                Order::OldestFirst => i64::MIN,
                Order::NewestFirst => i64::MAX,
            });
            let want = limit.saturating_sub(page.len());
            let rows = stmt.query_map(
                named_params! {
                    ":status": Status::Delivering,
                    ":priority": at.priority,
                    ":after": after,
                    ":now": now,
                    ":limit": i64::try_from(want).unwrap_or(i64::MAX),
                },
                outgoing_from,
            )?;
            for row in rows {
                page.push(row?);
            }
            if page.len() >= limit || at.priority == 0 {
                return Ok(page);
            }
            at = Cursor {
                priority: at.priority - 1,
                rowid: None,
            };
        }
    }

    /// Delivering rows per priority, and the rows that expired (failed with
    /// `last_error` [`EXPIRED`]): the status report's backlog.
    pub(crate) fn backlog(&self) -> Result<(Backlog, u64), StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT priority, COUNT(*) FROM msg_log WHERE status = ?1 GROUP BY priority",
        )?;
        let mut backlog = Backlog::default();
        let rows = stmt.query_map([Status::Delivering], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (priority, n) = row?;
            // The schema's CHECK keeps priorities in 0..=9.
            let slot = usize::try_from(priority.clamp(0, i64::from(MAX_PRIORITY))).unwrap_or(0);
            backlog.by_priority[slot] += n.max(0) as u64;
        }
        let expired: i64 = conn
            .prepare_cached("SELECT COUNT(*) FROM msg_log WHERE status = ?1 AND last_error = ?2")?
            .query_row(params![Status::Failed, EXPIRED], |r| r.get(0))?;
        Ok((backlog, expired.max(0) as u64))
    }

    /// One row as the forwarder publishes it, if it is still delivering
    /// (the forwarder re-reads a suspect it isolates).
    pub(crate) fn outgoing(&self, id: &str) -> Result<Option<OutgoingRow>, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(OUTGOING_SQL)?;
        Ok(stmt
            .query_row(params![id, Status::Delivering], outgoing_from)
            .optional()?)
    }

    /// How many rows a purge with `cutoffs` would delete, per status.
    pub(crate) fn purgeable(&self, cutoffs: PurgeCutoffs) -> Result<StatusCounts, StoreError> {
        let conn = self.conn()?;
        let mut stmt = conn.prepare_cached(
            "SELECT status, COUNT(*) FROM msg_log WHERE status IN (:settled_a, :settled_b) \
             AND create_time < :settled_before GROUP BY status \
             UNION ALL \
             SELECT status, COUNT(*) FROM msg_log WHERE status = :failed \
             AND create_time < :failed_before GROUP BY status",
        )?;
        let [settled_a, settled_b] = PurgeCutoffs::SETTLED;
        let rows = stmt.query_map(
            named_params! {
                ":settled_a": settled_a,
                ":settled_b": settled_b,
                ":settled_before": cutoffs.settled_before,
                ":failed": PurgeCutoffs::FAILED,
                ":failed_before": cutoffs.failed_before,
            },
            count_from,
        )?;
        let mut counts = StatusCounts::default();
        for row in rows {
            let (status, n) = row?;
            counts.add(status, n);
        }
        Ok(counts)
    }

    /// The status of row `id`, if there is one.
    pub(crate) fn status_of(&self, id: &str) -> Result<Option<Status>, StoreError> {
        let conn = self.conn()?;
        let status = conn
            .prepare_cached("SELECT status FROM msg_log WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?;
        Ok(status)
    }

    pub(crate) fn get(&self, id: &str) -> Result<Option<Row>, StoreError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare_cached(&format!("SELECT {ROW_COLUMNS} FROM msg_log WHERE id = ?1"))?;
        Ok(stmt.query_row(params![id], row_from).optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::open::open_writer_connection;

    /// A database holding one row per status, and its reader.
    fn fixture(dir: &Path) -> (rusqlite::Connection, Reader) {
        let path = dir.join("t.db");
        let conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        for status in Status::ALL {
            conn.execute(
                "INSERT INTO msg_log (id, msg, status, create_time) VALUES (?1, 'x', ?2, 1)",
                params![status.name(), status],
            )
            .unwrap();
        }
        (conn, Reader::open(&Database::plain(&path)).unwrap())
    }

    #[test]
    fn rows_and_counts_read_their_status() {
        let dir = tempfile::tempdir().unwrap();
        let (_conn, reader) = fixture(dir.path());
        let counts = reader.counts().unwrap();
        assert_eq!(counts.total(), Status::ALL.len() as u64);
        for status in Status::ALL {
            assert_eq!(reader.status_of(status.name()).unwrap(), Some(status));
            assert_eq!(reader.get(status.name()).unwrap().unwrap().status, status);
            let filter = RowFilter {
                status: Some(status),
                ..RowFilter::default()
            };
            let listed = reader.list(&filter, ListOrder::NewestFirst, 10).unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].id, status.name());
        }
        let due = reader
            .due_page(Cursor::START, Order::OldestFirst, 2, 10)
            .unwrap();
        let due: Vec<&str> = due.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(due, [Status::Delivering.name()]);
        assert_eq!(reader.oldest_delivering().unwrap(), Some(1));
    }

    #[test]
    fn a_status_code_no_status_has_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, reader) = fixture(dir.path());
        let unknown = Status::ALL.iter().map(|s| s.code()).max().unwrap() + 1;
        conn.execute(
            "UPDATE msg_log SET status = ?1 WHERE id = ?2",
            params![unknown, Status::Failed.name()],
        )
        .unwrap();
        let id = Status::Failed.name();
        for err in [
            reader.get(id).map(|_| ()).unwrap_err(),
            reader.status_of(id).map(|_| ()).unwrap_err(),
            reader
                .list(&RowFilter::default(), ListOrder::NewestFirst, 10)
                .map(|_| ())
                .unwrap_err(),
            reader.counts().map(|_| ()).unwrap_err(),
        ] {
            assert!(
                err.to_string().contains("not a status this agent knows"),
                "{err}"
            );
        }
    }

    /// The pool alone retried a bad file for 30 s and then said "timed
    /// out"; opening says what is wrong at once.
    #[test]
    fn a_file_that_cannot_be_read_fails_at_once_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![0x42u8; 8192]).unwrap();
        let missing = dir.path().join("missing.db");
        let cases: [(&Path, &str); 3] = [
            (&garbage, "is corrupt"),
            (&missing, "no database at"),
            (dir.path(), "cannot open database"),
        ];
        for (path, cause) in cases {
            let start = std::time::Instant::now();
            let err = Reader::open(&Database::plain(path))
                .map(|_| ())
                .unwrap_err();
            assert!(start.elapsed() < Duration::from_secs(1), "{err}");
            assert!(err.to_string().contains(cause), "{}: {err}", path.display());
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
        }
        assert!(matches!(
            Reader::open(&Database::plain(&garbage))
                .map(|_| ())
                .unwrap_err(),
            StoreError::Corrupt { .. }
        ));
        assert_eq!(std::fs::read(&garbage).unwrap(), vec![0x42u8; 8192]);
    }

    /// The forwarder's pages walk the priority index in rowid order, either
    /// way: an index range scan, never a sort into a temporary B-tree
    /// (which would hold the whole priority's backlog to sort it).
    #[test]
    fn the_due_pages_are_index_range_scans_without_a_sort() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, _reader) = fixture(dir.path());
        for (sql, range) in [
            (DUE_PAGE_OLDEST_SQL, "rowid>?"),
            (DUE_PAGE_NEWEST_SQL, "rowid<?"),
        ] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(
                    named_params! {
                        ":status": Status::Delivering,
                        ":priority": 0,
                        ":after": 0,
                        ":now": 0,
                        ":limit": 10,
                    },
                    |r| r.get(3),
                )
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(
                plan,
                [format!(
                    "SEARCH msg_log USING INDEX msg_log_priority (status=? AND priority=? AND {range})"
                )],
                "{sql}"
            );
        }
    }

    /// Highest priority first; within a priority oldest or newest first; a
    /// page crosses priorities; the cursor resumes where a page ended; a row
    /// past its expiry or not yet due is not handed out.
    #[test]
    fn pages_follow_priority_then_order_and_resume_at_the_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        // (id, priority, expire_time, next_try_time), in insertion order.
        let rows: [(&str, i64, Option<i64>, Option<i64>); 7] = [
            ("a0", 0, None, None),
            ("b5", 5, None, None),
            ("c0", 0, None, None),
            ("d9", 9, None, None),
            ("e5", 5, None, None),
            ("x5", 5, Some(100), None),
            ("w0", 0, None, Some(10_000)),
        ];
        for (id, priority, expire, next) in rows {
            conn.execute(
                "INSERT INTO msg_log (id, msg, priority, expire_time, next_try_time) \
                 VALUES (?1, 'x', ?2, ?3, ?4)",
                params![id, priority, expire, next],
            )
            .unwrap();
        }
        let reader = Reader::open(&Database::plain(&path)).unwrap();
        let ids = |page: &[OutgoingRow]| page.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        let now = 1_000;
        let all = reader
            .due_page(Cursor::START, Order::OldestFirst, now, 100)
            .unwrap();
        assert_eq!(ids(&all), ["d9", "b5", "e5", "a0", "c0"]);
        let all = reader
            .due_page(Cursor::START, Order::NewestFirst, now, 100)
            .unwrap();
        assert_eq!(ids(&all), ["d9", "e5", "b5", "c0", "a0"]);
        // Two rows a page: the cursor of the last row read resumes the walk.
        for order in [Order::OldestFirst, Order::NewestFirst] {
            let mut cursor = Cursor::START;
            let mut walked = Vec::new();
            loop {
                let page = reader.due_page(cursor, order, now, 2).unwrap();
                let Some(last) = page.last() else { break };
                cursor = Cursor {
                    priority: last.priority,
                    rowid: Some(last.rowid),
                };
                walked.extend(ids(&page));
            }
            let whole = reader.due_page(Cursor::START, order, now, 100).unwrap();
            assert_eq!(walked, ids(&whole), "{order:?}");
        }
        let (backlog, expired) = reader.backlog().unwrap();
        assert_eq!(backlog.by_priority[0], 3);
        assert_eq!(backlog.by_priority[5], 3);
        assert_eq!(backlog.by_priority[9], 1);
        assert_eq!(expired, 0);
    }
}
