//! Databases made without the agent: a new database with the agent's schema
//! ([`create_schema`], [`new_database`]) and backlogs written straight into
//! it ([`prefill_database`]) for tests and benchmarks that would take too
//! long to submit them.
//!
//! The schema comes from one place, the store's own schema code, so a
//! prefilled database is one the agent opens as its own (docs/storage.md,
//! Start-up).

use std::path::Path;

use edge_outbox::store::Status;
use rusqlite::Connection;

/// Creates the agent's schema in the empty database `conn`, at the version
/// this build writes.
pub fn create_schema(conn: &Connection) {
    edge_outbox::store::apply_schema(conn).expect("schema");
}

/// Creates the database at `path` as the agent would (incremental
/// auto-vacuum, WAL, its schema) and returns a connection on it.
pub fn new_database(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("creating the database");
    conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;")
        .expect("pragmas");
    create_schema(&conn);
    conn
}

/// One row of a prefilled backlog.
#[derive(Debug, Clone)]
pub struct PrefillRow {
    pub id: String,
    pub status: Status,
    pub routing_key: String,
    /// Epoch ms; also the row's `update_time`.
    pub create_time: i64,
    /// Epoch ms; `None` (due at once) unless a test needs a time.
    pub next_try_time: Option<i64>,
}

/// Creates the database at `path` ([`new_database`]) and fills it with
/// `rows` rows of `body_len`-byte text bodies (exchange `""`, content type
/// `text/plain`, no attempt yet) in one transaction, as the agent would have
/// stored them; `row(i)` gives the rest of the `i`-th row.
pub fn prefill_database(path: &Path, rows: i64, body_len: usize, row: impl Fn(i64) -> PrefillRow) {
    let mut db = new_database(path);
    // A bulk load: one commit at the end, no need to sync on the way.
    db.execute_batch("PRAGMA synchronous = NORMAL;")
        .expect("pragmas");
    let tx = db.transaction().expect("transaction");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
                 next_try_time, create_time, update_time, content_type) \
                 VALUES (?1, ?2, '', ?3, ?4, 0, ?5, ?6, ?6, 'text/plain')",
            )
            .expect("prepare");
        let body = "x".repeat(body_len);
        for i in 0..rows {
            let r = row(i);
            insert
                .execute(rusqlite::params![
                    r.id,
                    body,
                    r.routing_key,
                    r.status,
                    r.next_try_time,
                    r.create_time
                ])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}
