//! Opening the database: the lock file, the pragmas, the integrity check and
//! the schema migrations (docs/storage.md, Start-up).
//!
//! Owns [`MIGRATIONS`] (the ordered schema history), [`SCHEMA_VERSION`], the
//! lock on `<path>.lock`, and the writer connection until it is handed to
//! the writer thread. [`apply_schema`] lends the same migrations to tests
//! and benchmarks that prefill a database.
//!
//! Invariants:
//! - The lock is taken before anything reads or writes the file: a second
//!   agent must not migrate or write the live agent's database.
//! - WAL and the configured `synchronous` are read back after they are set;
//!   a database that does not take them is not opened.
//! - A file that fails `quick_check` (or is not a database) is reported
//!   [`StoreError::Corrupt`] and left in place, never replaced or repaired.
//! - Migrations only append: entry `i` of [`MIGRATIONS`] brings
//!   `user_version` from `i` to `i + 1`, each in its own transaction with
//!   the version bump; a file newer than [`SCHEMA_VERSION`] is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

use super::error::open_error;
use super::{Database, StoreError};
use crate::config::Synchronous;

/// Migrations, in order: entry `i` brings `user_version` from `i` to `i + 1`.
/// Never edit one that shipped; add the next one after it.
const MIGRATIONS: &[&str] = &[
    include_str!("../../schema.sql"),
    include_str!("../../schema-v2.sql"),
];
/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a statement waits for another connection's write lock (the CLI
/// writes while the agent runs) before it fails.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the writer connection, sets and checks its pragmas.
pub(crate) fn open_writer_connection(
    database: &Database,
    sync: Synchronous,
) -> Result<Connection, StoreError> {
    let path = database.path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| open_error(path, e))?;
    }
    let conn = Connection::open(path).map_err(|e| open_error(path, e))?;
    database.unlock(&conn)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
        path: path.to_path_buf(),
        details: e.to_string(),
    };
    // A file that is not a database (or not with this key) fails here, on
    // the first read.
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| database.first_read_error(e))?;
    prepare_new(&conn, version)?;
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
pub(crate) fn lock_database(path: &Path) -> Result<std::fs::File, StoreError> {
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

/// Creates or migrates the `msg_log` schema on `conn` up to
/// [`SCHEMA_VERSION`] with the agent's own migrations: what the agent does to
/// the file when it starts, without the lock, the journal mode and the
/// integrity check. For tests and benchmarks that prefill a database the
/// agent then opens.
pub fn apply_schema(conn: &Connection) -> Result<(), StoreError> {
    let path = PathBuf::from(conn.path().unwrap_or_default());
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    prepare_new(conn, version)?;
    migrate(conn, &path, version)
}

/// What a new file (`user_version` 0) needs before its first table.
fn prepare_new(conn: &Connection, version: i64) -> Result<(), StoreError> {
    if version == 0 {
        // Must precede the first table: purge hands pages back to the filesystem.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL")?;
    }
    Ok(())
}

/// Applies the migrations after `found` (the file's `user_version`).
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

#[cfg(test)]
mod tests {
    use super::*;

    fn db_path(dir: &Path) -> PathBuf {
        dir.join("t.db")
    }

    #[test]
    fn schema_version_is_set_and_reopen_keeps_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(dir.path());
        let conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        drop(conn);
        open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
    }

    #[test]
    fn garbage_file_is_reported_corrupt_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(dir.path());
        let junk = vec![0x42u8; 8192];
        std::fs::write(&path, &junk).unwrap();
        let err = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }

    #[test]
    fn apply_schema_makes_the_file_the_agent_would_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(dir.path());
        let conn = Connection::open(&path).unwrap();
        apply_schema(&conn).unwrap();
        apply_schema(&conn).unwrap();
        let pragma = |name: &str| -> i64 {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(pragma("user_version"), SCHEMA_VERSION);
        assert_eq!(pragma("auto_vacuum"), 2, "incremental");
        drop(conn);
        open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(dir.path());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!("PRAGMA user_version = {}", SCHEMA_VERSION + 1))
            .unwrap();
        drop(conn);
        let err = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { .. }), "{err}");
    }

    /// The shipped schema's `DEFAULT` for `status` (frozen migration text,
    /// never edited) is the status a submitted row is born with.
    #[test]
    fn the_schema_default_status_is_delivering() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer_connection(&Database::plain(db_path(dir.path())), Synchronous::Full)
            .unwrap();
        let default: String = conn
            .query_row(
                "SELECT dflt_value FROM pragma_table_info('msg_log') WHERE name = 'status'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(default, crate::store::Status::Delivering.code().to_string());
    }

    /// A file at version 1 with rows (what agents before priorities wrote)
    /// upgrades in place: its rows keep everything and get priority 0 and
    /// no expiry.
    #[test]
    fn a_version_1_file_upgrades_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(dir.path());
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA auto_vacuum = INCREMENTAL; {}; PRAGMA user_version = 1; \
             INSERT INTO msg_log (id, msg, create_time) VALUES ('old', 'body', 7);",
            MIGRATIONS[0]
        ))
        .unwrap();
        drop(conn);
        let conn = open_writer_connection(&Database::plain(&path), Synchronous::Full).unwrap();
        let (msg, created, priority, expires): (String, i64, i64, Option<i64>) = conn
            .query_row(
                "SELECT msg, create_time, priority, expire_time FROM msg_log WHERE id = 'old'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            (msg.as_str(), created, priority, expires),
            ("body", 7, 0, None)
        );
        let bad = conn.execute(
            "INSERT INTO msg_log (id, msg, priority) VALUES ('x', 'y', 10)",
            [],
        );
        assert!(bad.is_err(), "priority 10 must be refused by the schema");
    }
}
