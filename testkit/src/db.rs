//! Looking into an agent's database (the `msg_log` table, docs/storage.md)
//! from a test, while the agent runs or after it stopped.
//!
//! Connections are opened per call, read-write, with a 10 s busy timeout:
//! the database is in WAL mode, so readers never block the agent's writer.
//! Statuses are [`Status`] values, never the codes 0-3.

use std::time::Duration;

use edge_outbox::store::Status;
use rusqlite::OptionalExtension;

use crate::agent::Agent;
use crate::wait::wait_until;

/// Reads column `idx` of `row` as a [`Status`] (its `FromSql`: an unknown
/// code is an error, not a guess).
pub fn get_status(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Status> {
    row.get(idx)
}

/// What a test looks at in a `msg_log` row.
#[derive(Debug)]
pub struct Row {
    pub status: Status,
    pub try_count: i64,
    pub consume_count: i64,
    pub last_error: Option<String>,
    pub exchange: String,
    pub routing_key: String,
    /// The body, byte-exact (stored as TEXT or BLOB).
    pub body: Vec<u8>,
}

impl Agent {
    /// A read-write connection on the database (the agent may run: WAL).
    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.db).expect("opening the database");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    /// One integer from `sql`.
    pub fn db_count(&self, sql: &str) -> i64 {
        self.db()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Rows in `msg_log` with `status`.
    pub fn count_status(&self, status: Status) -> i64 {
        self.db()
            .query_row(
                "SELECT COUNT(*) FROM msg_log WHERE status = ?1",
                [status],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("counting {} rows: {e}", status.name()))
    }

    /// Rows in `msg_log`.
    pub fn rows(&self) -> i64 {
        self.db_count("SELECT COUNT(*) FROM msg_log")
    }

    /// Rows per status, for the statuses that have any, in status order.
    pub fn status_counts(&self) -> Vec<(Status, i64)> {
        let conn = self.db();
        let mut stmt = conn
            .prepare("SELECT status, COUNT(*) FROM msg_log GROUP BY status ORDER BY status")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((get_status(r, 0)?, r.get(1)?)))
            .expect("query");
        rows.map(|r| r.expect("row")).collect()
    }

    /// The status of the row `id`; `None` when there is no such row.
    pub fn status_of(&self, id: &str) -> Option<Status> {
        self.db()
            .query_row("SELECT status FROM msg_log WHERE id = ?1", [id], |r| {
                get_status(r, 0)
            })
            .optional()
            .expect("querying a row")
    }

    /// The row `id`; `None` when there is no such row.
    pub fn row(&self, id: &str) -> Option<Row> {
        use rusqlite::types::Value;
        self.db()
            .query_row(
                "SELECT status, try_count, consume_count, last_error, exchange, routing_key, msg \
                 FROM msg_log WHERE id = ?1",
                [id],
                |r| {
                    let body = match r.get::<_, Value>(6)? {
                        Value::Text(s) => s.into_bytes(),
                        Value::Blob(b) => b,
                        _ => Vec::new(),
                    };
                    Ok(Row {
                        status: get_status(r, 0)?,
                        try_count: r.get(1)?,
                        consume_count: r.get(2)?,
                        last_error: r.get(3)?,
                        exchange: r.get(4)?,
                        routing_key: r.get(5)?,
                        body,
                    })
                },
            )
            .optional()
            .unwrap_or_else(|e| panic!("row {id}: {e}"))
    }

    /// Waits until the row `id` has status `want` and returns it; panics
    /// after `deadline`.
    pub fn wait_status(&self, id: &str, want: Status, deadline: Duration) -> Row {
        wait_until(
            &format!("row {id} to reach status {}", want.name()),
            deadline,
            || self.status_of(id) == Some(want),
        );
        self.row(id).expect("the row")
    }

    /// Asserts that every id in `ids` is a row, still delivering: nothing
    /// the agent acknowledged was lost.
    pub fn assert_all_stored(&self, ids: &[String]) {
        let conn = self.db();
        let mut stmt = conn
            .prepare("SELECT status FROM msg_log WHERE id = ?1")
            .expect("prepare");
        let missing: Vec<&String> = ids
            .iter()
            .filter(|id| {
                stmt.query_row([id.as_str()], |r| get_status(r, 0))
                    .map(|s| s != Status::Delivering)
                    .unwrap_or(true)
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{} of {} acknowledged messages lost or not delivering, e.g. {:?}",
            missing.len(),
            ids.len(),
            &missing[..missing.len().min(5)]
        );
    }

    /// Waits until `n` rows are delivered, then asserts none failed.
    pub fn wait_all_delivered(&self, n: i64, deadline: Duration) {
        wait_until(&format!("{n} rows delivered"), deadline, || {
            self.count_status(Status::Delivered) == n
        });
        assert_eq!(self.count_status(Status::Failed), 0, "no message may fail");
    }
}

/// A row a test writes into `msg_log` itself, past the submit checks: a
/// message the socket would refuse (a `CC` header that is a string, say),
/// as a database written by hand or by an older version may hold one.
#[derive(Debug, Clone)]
pub struct RawRow {
    pub id: String,
    pub exchange: String,
    pub routing_key: String,
    /// The body, stored as TEXT.
    pub body: String,
    /// The `headers` column: the JSON text of an object, stored as it is.
    pub headers: Option<String>,
}

impl Agent {
    /// Inserts `rows` in one transaction as the agent stores a submit:
    /// delivering, no attempt yet, due now, content type
    /// `application/json`. The agent may run: nothing wakes its forwarder,
    /// so a running agent publishes them at its next pass
    /// (`publish.resend_every`). Panics on a duplicate id.
    pub fn insert_rows(&self, rows: &[RawRow]) {
        let mut conn = self.db();
        let tx = conn.transaction().expect("transaction");
        {
            let mut insert = tx
                .prepare(
                    "INSERT INTO msg_log (id, msg, exchange, routing_key, status, try_count, \
                     next_try_time, create_time, update_time, headers, content_type) \
                     VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?6, ?6, ?7, 'application/json')",
                )
                .expect("prepare");
            let now = edge_outbox::store::now_ms();
            for r in rows {
                insert
                    .execute(rusqlite::params![
                        r.id,
                        r.body,
                        r.exchange,
                        r.routing_key,
                        Status::Delivering as i64,
                        now,
                        r.headers
                    ])
                    .unwrap_or_else(|e| panic!("inserting row {}: {e}", r.id));
            }
        }
        tx.commit().expect("commit");
    }

    /// `update_time - create_time` in ms of each row of `ids` that is
    /// delivered (or consumed): how long after it was stored its confirm
    /// was recorded. Rows in other statuses are left out.
    pub fn delivery_times_ms(&self, ids: &[String]) -> Vec<i64> {
        let conn = self.db();
        let mut stmt = conn
            .prepare(
                "SELECT status, update_time - create_time FROM msg_log \
                 WHERE id = ?1",
            )
            .expect("prepare");
        ids.iter()
            .filter_map(|id| {
                stmt.query_row([id.as_str()], |r| Ok((get_status(r, 0)?, r.get(1)?)))
                    .optional()
                    .unwrap_or_else(|e| panic!("row {id}: {e}"))
            })
            .filter(|(status, _)| matches!(status, Status::Delivered | Status::Consumed))
            .map(|(_, ms)| ms)
            .collect()
    }
}
