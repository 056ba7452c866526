//! Store errors: every way a store operation can fail, worded for the
//! operator who reads them in the log or on the command line.
//!
//! Owns [`StoreError`] and the mapping from SQLite's error codes to it.
//!
//! Invariant: a full disk is [`StoreError::StorageFull`] and a damaged file
//! is [`StoreError::Corrupt`] wherever SQLite reports them, so callers answer
//! `storage_full` and the agent stops on corruption instead of retrying
//! (docs/storage.md, Limits; docs/storage.md, Start-up).

use std::path::PathBuf;

use rusqlite::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "database {path} is corrupt ({details}); it was left untouched: \
         restore it from a backup, or move it aside to start empty"
    )]
    Corrupt { path: PathBuf, details: String },
    #[error(
        "cannot read database {path} with the key from store.key_file: the key is wrong, \
         or the file was not encrypted with it (a plain database is not encrypted by \
         setting a key: docs/storage.md, Encryption at rest)"
    )]
    WrongKey { path: PathBuf },
    #[error("cannot read store.key_file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
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
    #[error("{delivering} messages are waiting to be forwarded (store.max_pending = {max})")]
    BufferFull { delivering: u64, max: u64 },
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

/// An error about the file at `path` that kept it from opening.
pub(crate) fn open_error(path: &std::path::Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// A copy of a group's error for each of its requests (the error itself is
/// not `Clone`: it may hold a `rusqlite::Error`).
pub(crate) fn same_kind(error: &StoreError, message: &str) -> StoreError {
    match error {
        StoreError::StorageFull(_) => StoreError::StorageFull(message.to_string()),
        StoreError::Closed => StoreError::Closed,
        _ => StoreError::WriteFailed(message.to_string()),
    }
}
