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

use std::path::{Path, PathBuf};

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, OpenFlags, OptionalExtension};

use super::open::BUSY_TIMEOUT;
use super::{OutgoingRow, PurgeCutoffs, Row, Status, StatusCounts, StoreError};

/// Read-only access: the reader pool. What the CLI uses when the agent is down.
#[derive(Clone)]
pub struct Reader {
    path: PathBuf,
    pool: r2d2::Pool<SqliteConnectionManager>,
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
